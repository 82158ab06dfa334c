//! JetStream consume throughput and end-to-end latency: Keel's
//! `JetStreamGroupConsumer` (a group member: leases, one durable pull
//! consumer per partition, decode the envelope, per-key dispatch, ack after
//! the handler) against a raw async-nats loop (one durable pull consumer on
//! the whole stream, read payload and headers, ack each). Same server, same
//! messages, same run; a fresh group per round, timed from the first
//! message to the last ack flushed (Keel: to a completed graceful leave);
//! one warm-up round each, then alternating.
//!
//! Run: `KEEL_TEST_NATS=nats://127.0.0.1:4222 cargo bench -p keel-integration-tests --bench nats_consume`
//! Optional: `-- <events>`.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use keel_consumers::nats::{JetStreamConsumerConfig, JetStreamGroupConsumer};
use keel_core::{Subscriber, Subscription, TopicSpec};
use keel_integration_tests::{bench, nats_url, unique_name};
use keel_producers::nats::{
    JetStreamAdmin, JetStreamPublisher, JetStreamPublisherConfig, NatsClientConfig, StreamSettings,
};

const ROUNDS: usize = 3;
const LATENCY_SAMPLES: usize = 200;
const PARTITIONS: u32 = 6;

fn main() -> anyhow::Result<()> {
    bench::main(|events, _| run(events))
}

async fn topic(admin: &JetStreamAdmin, prefix: &str) -> anyhow::Result<String> {
    let name = unique_name(prefix);
    admin
        .ensure_stream(
            &TopicSpec {
                name: name.clone(),
                partitions: PARTITIONS,
            },
            &StreamSettings::default(),
        )
        .await?;
    Ok(name)
}

async fn run(events: usize) -> anyhow::Result<()> {
    let client = NatsClientConfig::new(nats_url().await);
    let js = client.jetstream().await?;
    let admin = JetStreamAdmin::new(js.clone());
    let topic = topic(&admin, "bench-consume").await?;
    let publisher =
        JetStreamPublisher::with_context(js.clone(), JetStreamPublisherConfig::new(client.clone()));
    let payload = bench::publish_consume_load(&publisher, &topic, events).await?;
    println!(
        "jetstream consume + ack: {events} events of {} bytes over {PARTITIONS} partitions, 1000 keys, {ROUNDS} rounds each",
        payload.len()
    );
    let ((raw_rate, raw_rates), (keel_rate, keel_rates)) = bench::alternate(
        ROUNDS,
        || raw_round(&js, &topic, events),
        || keel_round(&js, &client, &topic, events),
    )
    .await?;
    println!("throughput  raw pull-consumer loop  {raw_rate:>10.0} msg/s  rounds {raw_rates:.0?}");
    println!(
        "throughput  keel group consumer     {keel_rate:>10.0} msg/s  rounds {keel_rates:.0?}"
    );
    println!("ratio keel/raw {:.2}", keel_rate / raw_rate);

    let (keel_p50, keel_p99) = latency(&js, &client, &admin, &publisher, true).await?;
    let (raw_p50, raw_p99) = latency(&js, &client, &admin, &publisher, false).await?;
    println!("latency publish -> handled  raw  p50 {raw_p50:?} p99 {raw_p99:?}");
    println!("latency publish -> handled  keel p50 {keel_p50:?} p99 {keel_p99:?}");
    admin.delete_topic(&topic).await?;
    Ok(())
}

async fn raw_consumer(
    js: &jetstream::Context,
    topic: &str,
) -> anyhow::Result<consumer::Consumer<consumer::pull::Config>> {
    let stream = js.get_stream(topic).await?;
    Ok(stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(unique_name("raw")),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 6000,
            ..Default::default()
        })
        .await?)
}

/// Events per second through a raw loop: read, ack each, flush at the end.
async fn raw_round(js: &jetstream::Context, topic: &str, events: usize) -> anyhow::Result<f64> {
    let consumer = raw_consumer(js, topic).await?;
    let mut messages = consumer.messages().await?;
    let mut bytes = 0usize;
    let mut start = None;
    for _ in 0..events {
        let m = messages
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the message stream ended"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        start.get_or_insert_with(Instant::now);
        bytes += m.payload.len() + m.headers.as_ref().map_or(0, |h| h.len());
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    js.client().flush().await?;
    let elapsed = start.map_or(Duration::ZERO, |s| s.elapsed());
    std::hint::black_box(bytes);
    Ok(events as f64 / elapsed.as_secs_f64())
}

fn keel_config(client: &NatsClientConfig) -> JetStreamConsumerConfig {
    JetStreamConsumerConfig {
        client: client.clone(),
        ..JetStreamConsumerConfig::default()
    }
}

/// Events per second through Keel: decode, dispatch, ack, graceful leave.
async fn keel_round(
    js: &jetstream::Context,
    client: &NatsClientConfig,
    topic: &str,
    events: usize,
) -> anyhow::Result<f64> {
    let consumer = JetStreamGroupConsumer::with_context(js.clone(), keel_config(client));
    bench::keel_consume_rate(&consumer, topic, events).await
}

/// p50/p99 from an awaited publish to the consumer seeing the event, one
/// event at a time, on a topic of its own.
async fn latency(
    js: &jetstream::Context,
    client: &NatsClientConfig,
    admin: &JetStreamAdmin,
    publisher: &JetStreamPublisher,
    keel: bool,
) -> anyhow::Result<(Duration, Duration)> {
    let topic = topic(admin, "bench-latency").await?;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let reader = {
        let (js, client, topic) = (js.clone(), client.clone(), topic.clone());
        tokio::spawn(async move {
            if keel {
                let consumer = JetStreamGroupConsumer::with_context(js, keel_config(&client));
                let mut deliveries = consumer
                    .subscribe(Subscription::new(&topic, unique_name("keel-lat")))
                    .await?;
                while let Some(delivery) = deliveries.next().await {
                    let delivery = delivery?;
                    let text = String::from_utf8_lossy(delivery.envelope().payload()).into_owned();
                    delivery.ack();
                    if seen_tx.send((text, Instant::now())).is_err() {
                        break;
                    }
                }
                deliveries.leave().await?;
            } else {
                let consumer = raw_consumer(&js, &topic).await?;
                let mut messages = consumer.messages().await?;
                while let Some(m) = messages.next().await {
                    let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
                    let text = String::from_utf8_lossy(&m.payload).into_owned();
                    m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    if seen_tx.send((text, Instant::now())).is_err() {
                        break;
                    }
                }
            }
            anyhow::Ok(())
        })
    };
    let result = bench::publish_to_seen(
        publisher,
        &topic,
        &mut seen_rx,
        LATENCY_SAMPLES,
        if keel { "keel" } else { "raw" },
    )
    .await;
    drop(seen_rx);
    reader.abort();
    admin.delete_topic(&topic).await?;
    result
}
