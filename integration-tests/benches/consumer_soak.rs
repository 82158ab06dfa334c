//! Consumer memory over a soak (DESIGN.md: bounded by the configured
//! in-flight limits, flat over a 10-minute soak), Keel against a raw
//! rdkafka loop in the same run.
//!
//! Events are published at a steady 4,000 msg/s (6 partitions, 10,000
//! keys, a 148-byte Avro `OrderPlaced` payload) while two consumers, each a
//! process of its own in its own group, read the topic with handlers that
//! take 10 ms each, at most 32 at a time: under 3,200 msg/s, so both fall
//! further behind all along and only their limits keep what they hold
//! from growing with the backlog. **Keel**: `KafkaGroupConsumer` with its
//! defaults (256 deliveries in flight per subscription, 1,000 per
//! partition, librdkafka's prefetch bounded per partition queue) under
//! `serve()` with 32 handlers.
//! **Raw**: a `StreamConsumer` (librdkafka's defaults) whose loop takes a
//! record, hands it to a handler task once one of 32 permits is free, and
//! stores its offset when done. Every 10 s the resident set of each
//! process (`VmRSS`) is sampled; the growth is fitted over the second half
//! of the run (in the first, the prefetch fills up to its bounds).
//!
//! Run: `KEEL_TEST_KAFKA=127.0.0.1:9092 cargo bench -p keel-integration-tests --bench consumer_soak`
//! Optional: `-- <seconds>` (default 600).

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use keel_consumers::kafka::{KafkaConsumerConfig, KafkaGroupConsumer};
use keel_consumers::{ServeOptions, serve};
use keel_core::{Envelope, Publisher, Subscriber, Subscription, handler_fn};
use keel_integration_tests::{kafka_bootstrap, kafka_publisher, kafka_topic, unique_name};
use keel_producers::kafka::KafkaClientConfig;
use keel_schemas::events::{Event, OrderPlaced};
use keel_schemas::{AvroCodec, CodecOptions, LocalRegistry, testdata};
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Semaphore;

const PARTITIONS: u32 = 6;
const KEYS: usize = 10_000;
/// Published per second.
const RATE: usize = 4_000;
/// Each handler's time per event, and how many run at once.
const HANDLER: Duration = Duration::from_millis(10);
const HANDLERS: usize = 32;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples before this are the warm-up (joining, the first fetches).
const WARM_UP: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.first().map(String::as_str) {
        Some("member") => match (args.get(1), args.get(2), args.get(3)) {
            (Some(kind), Some(topic), Some(bootstrap)) => {
                runtime.block_on(member(kind, topic, bootstrap))
            }
            _ => anyhow::bail!("usage: consumer_soak member keel|raw <topic> <bootstrap>"),
        },
        seconds => {
            let seconds = seconds
                .map(|s| s.parse::<u64>())
                .transpose()
                .context("the soak's length in seconds")?
                .unwrap_or(600);
            runtime.block_on(soak(Duration::from_secs(seconds)))
        }
    }
}

/// A consumer process: prints how many events it handled, every second,
/// and exits when its standard input closes (the soak ended or died).
async fn member(kind: &str, topic: &str, bootstrap: &str) -> anyhow::Result<()> {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let client = KafkaClientConfig::new([bootstrap.to_owned()]);
    let handled = Arc::new(AtomicU64::new(0));
    let report = {
        let handled = handled.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                println!("handled {}", handled.load(Ordering::Relaxed));
            }
        })
    };
    match kind {
        "keel" => {
            let consumer = KafkaGroupConsumer::new(KafkaConsumerConfig {
                client,
                ..KafkaConsumerConfig::default()
            })?;
            let deliveries = consumer
                .subscribe(Subscription::new(topic, unique_name("soak-keel")))
                .await?;
            let handler = handler_fn(move |event: Envelope, _info| {
                let handled = handled.clone();
                async move {
                    std::hint::black_box(event.payload().len());
                    tokio::time::sleep(HANDLER).await;
                    handled.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            });
            serve(
                deliveries,
                Arc::new(handler),
                ServeOptions {
                    concurrency: HANDLERS,
                    ..ServeOptions::default()
                },
                std::future::pending(),
            )
            .await?;
        }
        "raw" => {
            let mut config = client.client_config();
            config
                .set("group.id", unique_name("soak-raw"))
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "true")
                .set("enable.auto.offset.store", "false")
                .set("partition.assignment.strategy", "cooperative-sticky");
            let consumer: Arc<StreamConsumer> = Arc::new(config.create()?);
            consumer.subscribe(&[topic])?;
            let permits = Arc::new(Semaphore::new(HANDLERS));
            loop {
                let permit = permits.clone().acquire_owned().await?;
                let message = consumer.recv().await?.detach();
                let (consumer, handled) = (consumer.clone(), handled.clone());
                tokio::spawn(async move {
                    std::hint::black_box(message.payload().map_or(0, <[u8]>::len));
                    tokio::time::sleep(HANDLER).await;
                    // (Out of order across handlers: the naive loop.)
                    let _ = consumer.store_offset(
                        message.topic(),
                        message.partition(),
                        message.offset() + 1,
                    );
                    handled.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
        }
        other => anyhow::bail!("unknown member kind `{other}` (keel or raw)"),
    }
    report.abort();
    Ok(())
}

/// One consumer process under watch.
struct Watched {
    child: tokio::process::Child,
    pid: u32,
    handled: Arc<AtomicU64>,
    /// (seconds since the start, resident set in MiB), after the warm-up.
    samples: Vec<(f64, f64)>,
    peak: f64,
}

impl Watched {
    fn spawn(kind: &str, topic: &str, bootstrap: &str) -> anyhow::Result<Watched> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["member", kind, topic, bootstrap])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().context("the member exited at once")?;
        let handled = Arc::new(AtomicU64::new(0));
        let stdout = child.stdout.take().context("no stdout")?;
        let counter = handled.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(n) = line.strip_prefix("handled ").and_then(|n| n.parse().ok()) {
                    counter.store(n, Ordering::Relaxed);
                }
            }
        });
        Ok(Watched {
            child,
            pid,
            handled,
            samples: Vec::new(),
            peak: 0.0,
        })
    }

    /// The process's resident set in MiB (`VmRSS`).
    fn rss(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("the member process is gone")?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS: the member process exited (see its errors above)")?;
        Ok(kib / 1024.0)
    }

    /// MiB per minute, least squares over the second half of the samples
    /// (the first fill the prefetch up to its bounds).
    fn slope(&self) -> f64 {
        let half = &self.samples[self.samples.len() / 2..];
        let n = half.len() as f64;
        let (sx, sy) = half
            .iter()
            .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
        let (mx, my) = (sx / n, sy / n);
        let (num, den) = half.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
            (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
        });
        if den == 0.0 { 0.0 } else { num / den * 60.0 }
    }
}

async fn soak(length: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(
        length > WARM_UP + SAMPLE_EVERY * 3,
        "a soak shorter than {:?} has nothing to fit",
        WARM_UP + SAMPLE_EVERY * 3
    );
    let bootstrap = kafka_bootstrap().await;
    let client = KafkaClientConfig::new([bootstrap.clone()]);
    let topic = kafka_topic(&client, "bench-soak", PARTITIONS).await;
    let publisher = kafka_publisher(&client);
    let codec = AvroCodec::new(
        Arc::new(LocalRegistry::new()),
        CodecOptions {
            auto_register: true,
            ..CodecOptions::default()
        },
    );
    let payload = codec.encode(&topic, &testdata::order_placed()).await?;
    println!(
        "consumer soak on Kafka: {length:?}, {RATE} msg/s of {} bytes over {PARTITIONS} partitions and {KEYS} keys; handlers {HANDLER:?} each, {HANDLERS} at a time",
        payload.len()
    );
    let mut members = [
        ("keel", Watched::spawn("keel", &topic, &bootstrap)?),
        ("raw", Watched::spawn("raw", &topic, &bootstrap)?),
    ];
    let start = Instant::now();
    let mut published = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut next_sample = start + SAMPLE_EVERY;
    println!("     t   published | keel handled  rss MiB | raw handled  rss MiB");
    while start.elapsed() < length {
        tick.tick().await;
        // Catch up to the rate, one batch per tick.
        let due = (start.elapsed().as_secs_f64() * RATE as f64) as usize;
        let batch: Vec<Envelope> = (published..due)
            .map(|i| {
                Envelope::new(
                    OrderPlaced::FULL_NAME,
                    format!("order-{}", i % KEYS),
                    payload.clone(),
                )
            })
            .collect();
        published = due;
        publisher.publish_batch(&topic, batch).await?;
        if Instant::now() >= next_sample {
            next_sample += SAMPLE_EVERY;
            let at = start.elapsed().as_secs_f64();
            let mut line = format!("{at:>6.0} {published:>11} ");
            for (_, m) in &mut members {
                let rss = m.rss()?;
                if start.elapsed() >= WARM_UP {
                    m.samples.push((at, rss));
                    m.peak = m.peak.max(rss);
                }
                line += &format!("| {:>12} {rss:>8.1} ", m.handled.load(Ordering::Relaxed));
            }
            println!("{line}");
        }
    }
    for (name, m) in &mut members {
        let (first, last) = (
            m.samples.first().map_or(0.0, |s| s.1),
            m.samples.last().map_or(0.0, |s| s.1),
        );
        println!(
            "{name:<5} rss after warm-up {first:.1} MiB, at the end {last:.1} MiB, peak {:.1} MiB; growth over the second half {:+.2} MiB/min ({} samples); handled {} of {published} published",
            m.peak,
            m.slope(),
            m.samples.len() - m.samples.len() / 2,
            m.handled.load(Ordering::Relaxed)
        );
        m.child.kill().await.ok();
    }
    Ok(())
}
