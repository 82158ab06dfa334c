//! JetStream publish throughput and latency: Keel (Avro encode through the
//! codec + framing + Keel headers + `JetStreamPublisher::publish_batch`,
//! the next batch encoded while the previous one is on the wire)
//! against raw async-nats publishing pre-encoded bytes with the same
//! headers and a `Nats-Msg-Id` each — pipelined under the same window of
//! outstanding acks in batches of the same size (each batch awaits all its
//! acks, as a `publish_batch` caller does), and one at a time (publish,
//! await the ack, repeat). A continuous pipelined stream without batch
//! boundaries is reported for context.
//! Same server, same run, one warm-up round each, then alternating rounds.
//!
//! Run: `KEEL_TEST_NATS=nats://127.0.0.1:4222 cargo bench -p keel-integration-tests --bench nats_publish`
//! Optional: `-- <events> <batch>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use keel_core::partition::partition_for_key;
use keel_core::{Envelope, Publisher, TopicSpec};
use keel_integration_tests::{bench, nats_url, unique_name};
use keel_producers::nats::{
    JetStreamAdmin, JetStreamPublisher, JetStreamPublisherConfig, NatsClientConfig, StreamSettings,
};
use keel_schemas::{AvroCodec, CodecOptions, LocalRegistry, SubjectNameStrategy, testdata};

const ROUNDS: usize = 7;
const PARTITIONS: u32 = 6;
const LATENCY_SAMPLES: usize = 1000;
/// One-at-a-time publishing is slow: it gets this many events per round.
const ONE_AT_A_TIME: usize = 3000;

fn main() -> anyhow::Result<()> {
    bench::main(run)
}

async fn run(events: usize, batch: usize) -> anyhow::Result<()> {
    let client = NatsClientConfig::new(nats_url().await);
    let js = client.jetstream().await?;
    let topic = unique_name("bench-publish");
    JetStreamAdmin::new(js.clone())
        .ensure_stream(
            &TopicSpec {
                name: topic.clone(),
                partitions: PARTITIONS,
            },
            &StreamSettings::default(),
        )
        .await?;
    let config = JetStreamPublisherConfig::new(client.clone());
    let window = config.max_outstanding_acks;
    let keel = JetStreamPublisher::with_context(js.clone(), config);
    let codec = Arc::new(AvroCodec::new(
        Arc::new(LocalRegistry::new()),
        CodecOptions {
            strategy: SubjectNameStrategy::TopicName,
            auto_register: true,
        },
    ));
    let pre_encoded = codec.encode(&topic, &testdata::order_placed()).await?;
    let sample = Envelope::new("shop.orders.OrderPlaced", "order-0", pre_encoded.clone())
        .with_source("bench");
    let mut headers = HeaderMap::new();
    for (k, v) in keel_core::wire::encode_headers(&sample)? {
        headers.insert(k.as_str(), v.as_str());
    }
    headers.insert("keel-key", "order-0");
    let raw = Raw {
        js: js.clone(),
        topic: topic.clone(),
        payload: pre_encoded.into(),
        headers,
        window,
    };
    println!(
        "jetstream publish: {events} events of {} bytes over {PARTITIONS} partitions in batches of {batch} (ack window {window}), {ROUNDS} rounds each; one-at-a-time {ONE_AT_A_TIME} per round",
        raw.payload.len()
    );

    let mut run_id = 0;
    raw.pipelined(events / 4, Some(batch), &mut run_id).await?;
    keel_throughput(&keel, &codec, &topic, events / 4, batch, None).await?;
    let (mut raw_rates, mut keel_rates, mut single_rates, mut stream_rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut diagnostic_rates = Vec::new();
    for _ in 0..ROUNDS {
        raw_rates.push(raw.pipelined(events, Some(batch), &mut run_id).await?);
        keel_rates.push(keel_throughput(&keel, &codec, &topic, events, batch, None).await?);
        diagnostic_rates
            .push(keel_throughput(&keel, &codec, &topic, events, batch, Some(&raw.payload)).await?);
        single_rates.push(raw.one_at_a_time(ONE_AT_A_TIME, &mut run_id).await?);
        stream_rates.push(raw.pipelined(events, None, &mut run_id).await?);
    }
    let (raw_rate, keel_rate, single_rate, stream_rate) = (
        bench::median(&mut raw_rates),
        bench::median(&mut keel_rates),
        bench::median(&mut single_rates),
        bench::median(&mut stream_rates),
    );
    println!(
        "throughput  raw async-nats pipelined   {raw_rate:>10.0} msg/s  rounds {raw_rates:.0?} (batches of {batch}, like Keel's)"
    );
    println!(
        "throughput  raw pipelined, no batches  {stream_rate:>10.0} msg/s  rounds {stream_rates:.0?} (one continuous stream, for context)"
    );
    println!(
        "throughput  raw async-nats one-by-one  {single_rate:>10.0} msg/s  rounds {single_rates:.0?}"
    );
    println!(
        "throughput  keel (encode+headers)      {keel_rate:>10.0} msg/s  rounds {keel_rates:.0?}"
    );
    let diagnostic = bench::median(&mut diagnostic_rates);
    println!(
        "throughput  keel, payload pre-encoded   {diagnostic:>10.0} msg/s  rounds {diagnostic_rates:.0?} (diagnostic: without the Avro encode, ratio {:.2})",
        diagnostic / raw_rate
    );
    println!(
        "ratio keel/raw pipelined {:.2} (target >= 0.80); keel/raw one-by-one {:.1} (target >= 10)",
        keel_rate / raw_rate,
        keel_rate / single_rate
    );

    let raw_lat = raw.latency(&mut run_id).await?;
    let keel_lat = bench::keel_publish_latency(&keel, &codec, &topic, LATENCY_SAMPLES).await?;
    println!(
        "latency one-at-a-time  raw  p50 {:?} p99 {:?}",
        raw_lat.0, raw_lat.1
    );
    println!(
        "latency one-at-a-time  keel p50 {:?} p99 {:?}",
        keel_lat.0, keel_lat.1
    );
    // Hundreds of thousands of events are not left on the server.
    JetStreamAdmin::new(js).delete_topic(&topic).await?;
    Ok(())
}

struct Raw {
    js: jetstream::Context,
    topic: String,
    payload: bytes::Bytes,
    headers: HeaderMap,
    window: usize,
}

impl Raw {
    fn message(&self, i: usize, run_id: &mut usize) -> (String, PublishMessage) {
        *run_id += 1;
        let key = format!("order-{}", i % 1000);
        let p = partition_for_key(key.as_bytes(), PARTITIONS);
        (
            format!("{}.{p}", self.topic),
            PublishMessage::build()
                .payload(self.payload.clone())
                .headers(self.headers.clone())
                .message_id(format!("raw-{run_id}")),
        )
    }

    /// Pipelined under the ack window; with `batch`, every `batch` events
    /// wait for all their acks (what `publish_batch` callers get), else one
    /// continuous stream.
    async fn pipelined(
        &self,
        events: usize,
        batch: Option<usize>,
        run_id: &mut usize,
    ) -> anyhow::Result<f64> {
        let start = Instant::now();
        let mut outstanding = FuturesOrdered::new();
        for i in 0..events {
            while outstanding.len() >= self.window {
                if let Some(ack) = outstanding.next().await {
                    ack?;
                }
            }
            let (subject, message) = self.message(i, run_id);
            outstanding.push_back(self.js.send_publish(subject, message).await?.into_future());
            if batch.is_some_and(|b| (i + 1) % b == 0) {
                while let Some(ack) = outstanding.next().await {
                    ack?;
                }
            }
        }
        while let Some(ack) = outstanding.next().await {
            ack?;
        }
        Ok(events as f64 / start.elapsed().as_secs_f64())
    }

    async fn one_at_a_time(&self, events: usize, run_id: &mut usize) -> anyhow::Result<f64> {
        let start = Instant::now();
        for i in 0..events {
            let (subject, message) = self.message(i, run_id);
            self.js.send_publish(subject, message).await?.await?;
        }
        Ok(events as f64 / start.elapsed().as_secs_f64())
    }

    async fn latency(&self, run_id: &mut usize) -> anyhow::Result<(Duration, Duration)> {
        let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
        for i in 0..LATENCY_SAMPLES {
            let start = Instant::now();
            let (subject, message) = self.message(i, run_id);
            self.js.send_publish(subject, message).await?.await?;
            samples.push(start.elapsed());
        }
        Ok(bench::percentiles(samples))
    }
}

/// Keel's encode + headers + publish, as a steady producer runs it: each
/// batch is encoded while the previous one is on the wire (a batch starts
/// sending only after the previous one was fully acknowledged, so per-key
/// order holds across batches). All of Keel's work is inside the timing.
async fn keel_throughput(
    p: &JetStreamPublisher,
    codec: &AvroCodec,
    topic: &str,
    events: usize,
    batch: usize,
    pre_encoded: Option<&[u8]>,
) -> anyhow::Result<f64> {
    let order = testdata::order_placed();
    let encode = |from: usize| {
        let order = &order;
        async move {
            let mut envelopes = Vec::with_capacity(batch);
            for i in from..(from + batch).min(events) {
                let payload = match pre_encoded {
                    Some(bytes) => bytes.to_vec(),
                    None => codec.encode(topic, order).await?,
                };
                envelopes.push(
                    Envelope::new(
                        "shop.orders.OrderPlaced",
                        format!("order-{}", i % 1000),
                        payload,
                    )
                    .with_source("bench"),
                );
            }
            anyhow::Ok(envelopes)
        }
    };
    let start = Instant::now();
    let mut next = encode(0).await?;
    let mut n = batch;
    while !next.is_empty() {
        let current = std::mem::take(&mut next);
        let (sent, encoded) = tokio::join!(p.publish_batch(topic, current), async {
            if n < events {
                encode(n).await
            } else {
                Ok(Vec::new())
            }
        });
        sent?;
        next = encoded?;
        n += batch;
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}
