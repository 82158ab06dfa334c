//! A consumer-group member as its own OS process, for the fault-injection
//! tests: it joins the group and runs
//! [`faults::work`](keel_integration_tests::faults::work), which records
//! every handled event (before acking it) and every assignment change.
//!
//! Usage: `kafka_group_worker <bootstrap> <topic> <group> <worker-name> <out-file> [window [pace-ms [fail-every]]]`
//! (a pace makes every handler sleep that long first; with fail-every n,
//! each key's events numbered 1 modulo n fail their first attempt).

use std::time::Duration;

use keel_consumers::kafka::{KafkaConsumerConfig, KafkaGroupConsumer};
use keel_core::{Subscriber, Subscription};
use keel_integration_tests::faults::{init_worker_tracing, work};
use keel_producers::kafka::KafkaClientConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, bootstrap, topic, group, name, out, rest @ ..] = args.as_slice() else {
        anyhow::bail!(
            "usage: kafka_group_worker <bootstrap> <topic> <group> <worker-name> <out-file> [window [pace-ms [fail-every]]]"
        );
    };
    let window: u32 = rest.first().map(|w| w.parse()).transpose()?.unwrap_or(200);
    let pace: u64 = rest.get(1).map(|p| p.parse()).transpose()?.unwrap_or(0);
    let fail_every: u64 = rest.get(2).map(|f| f.parse()).transpose()?.unwrap_or(0);
    init_worker_tracing();
    tracing::info!(worker = %args[4], "starting");
    let consumer = KafkaGroupConsumer::new(KafkaConsumerConfig {
        client: KafkaClientConfig::new([bootstrap.clone()]),
        partition_window: window,
        commit_interval_ms: 100,
        drain_timeout_ms: 5_000,
        session_timeout_ms: 10_000,
        ..KafkaConsumerConfig::default()
    })?;
    let deliveries = consumer
        .subscribe(Subscription::new(topic.clone(), group.clone()).max_in_flight(64))
        .await?;
    work(
        deliveries,
        out,
        name,
        Duration::from_millis(pace),
        fail_every,
    )
    .await
}
