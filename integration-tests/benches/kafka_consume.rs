//! Kafka consume + commit throughput and end-to-end latency: Keel's
//! `KafkaGroupConsumer` (decode the envelope, per-key dispatch, ack, commit
//! the lowest contiguous offset) against a raw rdkafka `StreamConsumer` loop
//! (read payload and headers, store the offset, auto-commit). Same broker,
//! same records, same run; a fresh group per round, timed from the first
//! record to the final commit; one warm-up round each, then alternating.
//!
//! Run: `KEEL_TEST_KAFKA=127.0.0.1:9092 cargo bench -p keel-integration-tests --bench kafka_consume`
//! (`infra/local/tansu.sh` starts a broker). Optional: `-- <events>`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use keel_consumers::kafka::{KafkaConsumerConfig, KafkaGroupConsumer};
use keel_core::{Subscriber, Subscription};
use keel_integration_tests::{bench, kafka_bootstrap, kafka_publisher, kafka_topic, unique_name};
use keel_producers::kafka::{KafkaClientConfig, KafkaPublisher};
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Headers;

const ROUNDS: usize = 3;
const LATENCY_SAMPLES: usize = 200;
const PARTITIONS: u32 = 6;

fn main() -> anyhow::Result<()> {
    bench::main(|events, _| run(events))
}

async fn run(events: usize) -> anyhow::Result<()> {
    let client = KafkaClientConfig::new([kafka_bootstrap().await]);
    let topic = kafka_topic(&client, "bench-consume", PARTITIONS).await;
    let publisher = kafka_publisher(&client);
    let payload = bench::publish_consume_load(&publisher, &topic, events).await?;
    println!(
        "kafka consume + commit: {events} events of {} bytes over {PARTITIONS} partitions, 1000 keys, {ROUNDS} rounds each",
        payload.len()
    );

    let ((raw_rate, raw_rates), (keel_rate, keel_rates)) = bench::alternate(
        ROUNDS,
        || raw_round(&client, &topic, events),
        || keel_round(&client, &topic, events),
    )
    .await?;
    println!("throughput  raw StreamConsumer loop  {raw_rate:>10.0} msg/s  rounds {raw_rates:.0?}");
    println!(
        "throughput  keel group consumer      {keel_rate:>10.0} msg/s  rounds {keel_rates:.0?}"
    );
    println!(
        "ratio keel/raw {:.2} (target >= 0.80)",
        keel_rate / raw_rate
    );

    let (keel_p50, keel_p99) = latency(&client, &publisher, true).await?;
    let (raw_p50, raw_p99) = latency(&client, &publisher, false).await?;
    println!("latency publish -> handled  raw  p50 {raw_p50:?} p99 {raw_p99:?}");
    println!("latency publish -> handled  keel p50 {keel_p50:?} p99 {keel_p99:?}");
    Ok(())
}

fn raw_consumer(client: &KafkaClientConfig, group: &str) -> anyhow::Result<StreamConsumer> {
    let mut config = client.client_config();
    config
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "cooperative-sticky");
    Ok(config.create()?)
}

/// Events per second through a raw loop: read, store the offset, commit.
async fn raw_round(client: &KafkaClientConfig, topic: &str, events: usize) -> anyhow::Result<f64> {
    let consumer = raw_consumer(client, &unique_name("raw"))?;
    consumer.subscribe(&[topic])?;
    let mut bytes = 0usize;
    let mut start = None;
    for _ in 0..events {
        let m = consumer.recv().await?;
        start.get_or_insert_with(Instant::now);
        bytes += m.payload().map_or(0, <[u8]>::len) + m.headers().map_or(0, |h| h.count());
        consumer.store_offset_from_message(&m)?;
    }
    consumer.commit_consumer_state(CommitMode::Sync)?;
    let elapsed = start.map_or(Duration::ZERO, |s| s.elapsed());
    std::hint::black_box(bytes);
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// Events per second through Keel: decode, dispatch, ack, commit on leave.
async fn keel_round(client: &KafkaClientConfig, topic: &str, events: usize) -> anyhow::Result<f64> {
    let consumer = KafkaGroupConsumer::new(KafkaConsumerConfig {
        client: client.clone(),
        ..KafkaConsumerConfig::default()
    })?;
    bench::keel_consume_rate(&consumer, topic, events).await
}

/// p50/p99 from an awaited publish to the consumer seeing the event, one
/// event at a time, on a topic of its own.
async fn latency(
    client: &KafkaClientConfig,
    publisher: &KafkaPublisher,
    keel: bool,
) -> anyhow::Result<(Duration, Duration)> {
    // tansu answers a fetch only when its wait (librdkafka's
    // `fetch.wait.max.ms`, 500 ms by default) ends, not when data arrives:
    // both readers poll every 10 ms so the figure shows the client's cost.
    let mut client = client.clone();
    client
        .librdkafka
        .insert("fetch.wait.max.ms".into(), "10".into());
    let client = &client;
    let topic = kafka_topic(client, "bench-latency", PARTITIONS).await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let reader = {
        let (client, topic) = (client.clone(), topic.clone());
        tokio::spawn(async move {
            if keel {
                let consumer = KafkaGroupConsumer::new(KafkaConsumerConfig {
                    client,
                    ..KafkaConsumerConfig::default()
                })?;
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
                let consumer = raw_consumer(&client, &unique_name("raw-lat"))?;
                consumer.subscribe(&[&topic])?;
                loop {
                    let m = consumer.recv().await?;
                    let text =
                        String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                    consumer.store_offset_from_message(&m)?;
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
    result
}
