//! A JetStream consumer-group member as its own OS process, for the fault-injection
//! tests: it joins the group and runs
//! [`faults::work`](keel_integration_tests::faults::work), which records
//! every handled event (before acking it) and every assignment change.
//!
//! Usage: `nats_group_worker <nats-url> <topic> <group> <worker-name> <out-file> [window [member-id]]`
//! (a member id makes it a static member).

use keel_consumers::nats::JetStreamGroupConsumer;
use keel_core::{Subscriber, Subscription};
use keel_integration_tests::faults::{init_worker_tracing, work};
use keel_integration_tests::nats_consumer_config;
use keel_producers::nats::NatsClientConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, topic, group, name, out, rest @ ..] = args.as_slice() else {
        anyhow::bail!(
            "usage: nats_group_worker <nats-url> <topic> <group> <worker-name> <out-file> [window [member-id]]"
        );
    };
    let window: u32 = rest.first().map(|w| w.parse()).transpose()?.unwrap_or(200);
    init_worker_tracing();
    tracing::info!(worker = %name, "starting");
    let mut config = nats_consumer_config(NatsClientConfig::new(url.clone()));
    config.partition_window = window;
    config.member_id = rest.get(1).cloned();
    let consumer = JetStreamGroupConsumer::connect(config).await?;
    let deliveries = consumer
        .subscribe(Subscription::new(topic.clone(), group.clone()).max_in_flight(64))
        .await?;
    work(deliveries, out, name, std::time::Duration::ZERO, 0).await
}
