//! Measuring helpers the benchmark binaries share (`benches/`).

use std::time::{Duration, Instant};

use futures::StreamExt;
use keel_core::{Envelope, Publisher, Subscriber, Subscription};
use keel_schemas::{AvroCodec, testdata};
use tokio::sync::mpsc::UnboundedReceiver;

/// `(events, batch)` from the bench's arguments (`-- <events> <batch>`),
/// defaulting to 100,000 and 1,000.
pub fn args() -> anyhow::Result<(usize, usize)> {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with("--")).collect();
    let events = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let batch = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    Ok((events, batch))
}

/// A bench binary's `main`: `run(events, batch)` (from [`args`]) on a fresh
/// runtime, logging to stderr as `RUST_LOG` asks.
pub fn main<F, Fut>(run: F) -> anyhow::Result<()>
where
    F: FnOnce(usize, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let (events, batch) = args()?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Runtime::new()?.block_on(run(events, batch))
}

/// Rates of two contenders measured the same way: one warm-up round of
/// each, then `rounds` alternating rounds. Returns each side's median and
/// its rounds (sorted).
pub async fn alternate<A, FA, B, FB>(
    rounds: usize,
    mut a: A,
    mut b: B,
) -> anyhow::Result<((f64, Vec<f64>), (f64, Vec<f64>))>
where
    A: FnMut() -> FA,
    FA: std::future::Future<Output = anyhow::Result<f64>>,
    B: FnMut() -> FB,
    FB: std::future::Future<Output = anyhow::Result<f64>>,
{
    a().await?;
    b().await?;
    let (mut a_rates, mut b_rates) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a_rates.push(a().await?);
        b_rates.push(b().await?);
    }
    Ok((
        (median(&mut a_rates), a_rates),
        (median(&mut b_rates), b_rates),
    ))
}

/// The median of `rates` (sorts them, so printing them after shows the
/// spread).
pub fn median(rates: &mut [f64]) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// CPU time (user + system, every thread) this process has used so far,
/// from `/proc/self/stat` in clock ticks (10 ms: rounds take seconds). With
/// the broker on the same cores, the client's CPU per event is what a
/// throughput ratio turns on; `None` without procfs.
pub fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name (in parentheses, maybe with
    // spaces): state first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Runs `work` and returns its output with this process's CPU time per
/// event while it ran, in µs (`events` events; NaN without procfs).
pub async fn cpu_per_event<T>(
    events: usize,
    work: impl std::future::Future<Output = T>,
) -> (T, f64) {
    let before = process_cpu();
    let output = work.await;
    let used = process_cpu()
        .zip(before)
        .map_or(f64::NAN, |(after, before)| {
            (after - before).as_secs_f64() * 1e6 / events as f64
        });
    (output, used)
}

/// p50 and p99 of `samples`.
pub fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

/// p50/p99 from an awaited publish to a reader reporting the event on
/// `seen` (payload text, when), one event at a time. A `warm-up` event
/// first lets the reader join and position itself.
pub async fn publish_to_seen(
    publisher: &dyn Publisher,
    topic: &str,
    seen: &mut UnboundedReceiver<(String, Instant)>,
    samples: usize,
    reader: &str,
) -> anyhow::Result<(Duration, Duration)> {
    publisher
        .publish(topic, Envelope::new("bench.Ping", "warm-up", "warm-up"))
        .await?;
    let (first, _) = tokio::time::timeout(Duration::from_secs(60), seen.recv())
        .await
        .map_err(|_| anyhow::anyhow!("the {reader} latency reader saw nothing within 60 s"))?
        .ok_or_else(|| anyhow::anyhow!("the {reader} latency reader stopped"))?;
    anyhow::ensure!(first == "warm-up", "unexpected first event {first}");
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        let text = format!("{i}");
        let at = Instant::now();
        publisher
            .publish(
                topic,
                Envelope::new("bench.Ping", format!("k{i}"), text.clone()),
            )
            .await?;
        let (got, when) = tokio::time::timeout(Duration::from_secs(30), seen.recv())
            .await
            .map_err(|_| anyhow::anyhow!("event {i} not seen within 30 s ({reader})"))?
            .ok_or_else(|| anyhow::anyhow!("the {reader} latency reader stopped"))?;
        anyhow::ensure!(got == text, "expected {text}, saw {got}");
        out.push(when.duration_since(at));
    }
    Ok(percentiles(out))
}

/// p50/p99 of one awaited Keel publish at a time, Avro encode included.
pub async fn keel_publish_latency(
    publisher: &dyn Publisher,
    codec: &AvroCodec,
    topic: &str,
    samples: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let order = testdata::order_placed();
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        let start = Instant::now();
        let payload = codec.encode(topic, &order).await?;
        publisher
            .publish(
                topic,
                Envelope::new(
                    "shop.orders.OrderPlaced",
                    format!("order-{}", i % 1000),
                    payload,
                ),
            )
            .await?;
        out.push(start.elapsed());
    }
    Ok(percentiles(out))
}

/// Events per second through a Keel group member: `events` deliveries
/// acked one by one (decode and dispatch included), timed from the first
/// delivery to a completed graceful leave, on a fresh group.
pub async fn keel_consume_rate(
    consumer: &dyn Subscriber,
    topic: &str,
    events: usize,
) -> anyhow::Result<f64> {
    let mut deliveries = consumer
        .subscribe(Subscription::new(topic, crate::unique_name("keel")))
        .await?;
    let mut bytes = 0usize;
    let mut start = None;
    for _ in 0..events {
        let delivery = deliveries
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the delivery stream ended"))??;
        start.get_or_insert_with(Instant::now);
        bytes += delivery.envelope().payload().len();
        delivery.ack();
    }
    deliveries.leave().await?;
    let elapsed = start.map_or(Duration::ZERO, |s| s.elapsed());
    std::hint::black_box(bytes);
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// Publishes the consume benchmarks' load: `events` events of a typical
/// Avro event's size (120 bytes) over 1,000 keys, in batches of 1,000;
/// returns the payload.
pub async fn publish_consume_load(
    publisher: &dyn Publisher,
    topic: &str,
    events: usize,
) -> anyhow::Result<Vec<u8>> {
    let payload = vec![7u8; 120];
    for from in (0..events).step_by(1000) {
        let batch = (from..(from + 1000).min(events))
            .map(|i| {
                Envelope::new(
                    "shop.orders.OrderPlaced",
                    format!("order-{}", i % 1000),
                    payload.clone(),
                )
                .with_source("bench")
            })
            .collect();
        publisher.publish_batch(topic, batch).await?;
    }
    Ok(payload)
}

/// Raw rdkafka produce rate (msg/s): `events` records of `payload` with
/// `headers`, keys `order-<i % 1000>`, sent `batch` at a time and every
/// delivery awaited before the next batch — the baseline Keel's publishers
/// and the outbox relay are measured against.
pub async fn raw_kafka_produce_rate(
    p: &rdkafka::producer::FutureProducer,
    topic: &str,
    payload: &[u8],
    headers: &rdkafka::message::OwnedHeaders,
    events: usize,
    batch: usize,
) -> anyhow::Result<f64> {
    use rdkafka::producer::FutureRecord;
    let start = Instant::now();
    let mut n = 0;
    while n < events {
        let mut pending = Vec::with_capacity(batch);
        for i in n..(n + batch).min(events) {
            let key = format!("order-{}", i % 1000);
            let mut record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(payload)
                .headers(headers.clone());
            loop {
                match p.send_result(record) {
                    Ok(f) => break pending.push(f),
                    Err((_, back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        // In order, as Keel's `publish_batch` awaits them (one wake-up per
        // broker response rather than per event).
        for f in pending {
            f.await?.map_err(|(e, _)| e)?;
        }
        n += batch;
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}
