//! Kafka publish throughput and latency: Keel (Avro encode through the
//! codec + framing + Keel headers + KafkaPublisher) against a raw rdkafka
//! `FutureProducer` sending pre-encoded bytes — the same payload and the
//! same header bytes, built once — so the ratio is Keel's own cost. Same
//! broker, same run, one warm-up round each, then alternating rounds; the
//! client process's CPU per event is printed too (with the broker on the
//! same cores it is what the ratio turns on, and it is steadier).
//!
//! Run: `KEEL_TEST_KAFKA=127.0.0.1:9092 cargo bench -p keel-integration-tests --bench kafka_publish`
//! (`infra/local/tansu.sh` starts a broker). Optional: `-- <events> <batch>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::{Envelope, Publisher, TopicAdmin, TopicSpec};
use keel_integration_tests::{bench, kafka_bootstrap, unique_name};
use keel_producers::kafka::{KafkaAdmin, KafkaClientConfig, KafkaPublisher, KafkaPublisherConfig};
use keel_schemas::{AvroCodec, CodecOptions, LocalRegistry, SubjectNameStrategy, testdata};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const ROUNDS: usize = 5;
const LATENCY_SAMPLES: usize = 1000;

fn main() -> anyhow::Result<()> {
    bench::main(run)
}

async fn run(events: usize, batch: usize) -> anyhow::Result<()> {
    let client = KafkaClientConfig::new([kafka_bootstrap().await]);
    let admin = KafkaAdmin::new(&client, 1)?;
    let topic = unique_name("bench-publish");
    admin
        .ensure_topic(&TopicSpec {
            name: topic.clone(),
            partitions: 6,
        })
        .await?;
    let config = KafkaPublisherConfig {
        client: client.clone(),
        ..KafkaPublisherConfig::default()
    };
    let keel = KafkaPublisher::new(config.clone())?;
    // The raw baseline gets the very same librdkafka settings.
    let raw: FutureProducer = config.client_config().create()?;
    let codec = Arc::new(AvroCodec::new(
        Arc::new(LocalRegistry::new()),
        CodecOptions {
            strategy: SubjectNameStrategy::TopicName,
            auto_register: true,
        },
    ));
    let order = testdata::order_placed();
    let pre_encoded = codec.encode(&topic, &order).await?;
    println!(
        "kafka publish: {events} events of {} bytes in batches of {batch}, {ROUNDS} rounds each",
        pre_encoded.len()
    );

    let sample = Envelope::new("shop.orders.OrderPlaced", "order-0", pre_encoded.clone())
        .with_source("bench");
    let mut headers = OwnedHeaders::new();
    for (k, v) in keel_core::wire::encode_headers(&sample)? {
        headers = headers.insert(Header {
            key: &k,
            value: Some(v.as_bytes()),
        });
    }
    bench::raw_kafka_produce_rate(&raw, &topic, &pre_encoded, &headers, events / 4, batch).await?;
    keel_throughput(&keel, &codec, &topic, events / 4, batch).await?;
    let (mut raw_rates, mut keel_rates) = (Vec::new(), Vec::new());
    // The client process's CPU per event (librdkafka's threads included).
    let (mut raw_cpu, mut keel_cpu) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (rate, cpu) = bench::cpu_per_event(
            events,
            bench::raw_kafka_produce_rate(&raw, &topic, &pre_encoded, &headers, events, batch),
        )
        .await;
        raw_rates.push(rate?);
        raw_cpu.push(cpu);
        let (rate, cpu) = bench::cpu_per_event(
            events,
            keel_throughput(&keel, &codec, &topic, events, batch),
        )
        .await;
        keel_rates.push(rate?);
        keel_cpu.push(cpu);
    }
    let (raw_rate, keel_rate) = (
        bench::median(&mut raw_rates),
        bench::median(&mut keel_rates),
    );
    println!(
        "throughput  raw rdkafka (pre-encoded)  {raw_rate:>10.0} msg/s  rounds {raw_rates:.0?}"
    );
    println!(
        "throughput  keel (encode+headers)      {keel_rate:>10.0} msg/s  rounds {keel_rates:.0?}"
    );
    println!(
        "ratio keel/raw {:.2} (target >= 0.90)",
        keel_rate / raw_rate
    );
    println!(
        "client cpu per event  raw {:.2} us  keel {:.2} us  (medians; rounds {raw_cpu:.2?} / {keel_cpu:.2?})",
        bench::median(&mut raw_cpu),
        bench::median(&mut keel_cpu)
    );

    let raw_lat = raw_latency(&raw, &topic, &pre_encoded, &headers).await?;
    let keel_lat = bench::keel_publish_latency(&keel, &codec, &topic, LATENCY_SAMPLES).await?;
    println!(
        "latency one-at-a-time  raw  p50 {:?} p99 {:?}",
        raw_lat.0, raw_lat.1
    );
    println!(
        "latency one-at-a-time  keel p50 {:?} p99 {:?}",
        keel_lat.0, keel_lat.1
    );
    Ok(())
}

async fn keel_throughput(
    p: &KafkaPublisher,
    codec: &AvroCodec,
    topic: &str,
    events: usize,
    batch: usize,
) -> anyhow::Result<f64> {
    let order = testdata::order_placed();
    let start = Instant::now();
    let mut n = 0;
    while n < events {
        let mut envelopes = Vec::with_capacity(batch);
        for i in n..(n + batch).min(events) {
            let payload = codec.encode(topic, &order).await?;
            envelopes.push(
                Envelope::new(
                    "shop.orders.OrderPlaced",
                    format!("order-{}", i % 1000),
                    payload,
                )
                .with_source("bench"),
            );
        }
        p.publish_batch(topic, envelopes).await?;
        n += batch;
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}

async fn raw_latency(
    p: &FutureProducer,
    topic: &str,
    payload: &[u8],
    headers: &OwnedHeaders,
) -> anyhow::Result<(Duration, Duration)> {
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        let key = format!("order-{}", i % 1000);
        let start = Instant::now();
        p.send(
            FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(payload)
                .headers(headers.clone()),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)?;
        samples.push(start.elapsed());
    }
    Ok(bench::percentiles(samples))
}
