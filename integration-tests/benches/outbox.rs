//! Outbox throughput and latency against its raw parts, same rows, same
//! run: raw batched INSERT of the rows into a copy of the outbox table; raw
//! rdkafka produce of the same records (pre-encoded payload and headers);
//! then the outbox end to end — writers enqueue in transactions while the
//! relay publishes, timed from the first enqueue to the last broker
//! acknowledgement marked — and the relay alone draining a pre-filled
//! outbox. Target: end to end ≥ 0.5× the slower raw figure.
//!
//! Latency: writers commit at half the measured end-to-end maximum, and
//! each event's commit (when `COMMIT` returned) is compared with its
//! `published_at` (set by the relay right after the broker acknowledged
//! it; both from this machine's clock). Target p99 ≤ 25 ms.
//!
//! Run: `KEEL_TEST_KAFKA=127.0.0.1:9092 KEEL_TEST_DATABASE_URL=postgres://postgres@127.0.0.1/postgres \
//!   cargo bench -p keel-integration-tests --bench outbox` (optional `-- <events> <batch>`).
//! Knobs: `KEEL_BENCH_LINGER_MS` (default 1), `KEEL_BENCH_WRITERS` (4),
//! `KEEL_BENCH_PER_TX` (100 events per writer transaction) and
//! `KEEL_BENCH_RETENTION_SECS` (the relay's retention; 0 deletes published
//! rows, and then no latency is measured). A value that is not a positive
//! number (non-negative for the retention) stops the bench.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use keel_core::{Envelope, EventId, Publisher, TopicAdmin, TopicSpec};
use keel_integration_tests::outbox::{outbox, outbox_database};
use keel_integration_tests::{bench, kafka_bootstrap, unique_name};
use keel_producers::kafka::{KafkaAdmin, KafkaClientConfig, KafkaPublisher, KafkaPublisherConfig};
use keel_producers::outbox::{Outbox, OutboxRelay, OutboxTables, RelayConfig, RelayStats};
use keel_schemas::testdata;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use sqlx::PgPool;
use tokio::sync::watch;

/// How the bench's writers enqueue.
#[derive(Clone, Copy)]
struct Writers {
    /// Concurrent writers (`KEEL_BENCH_WRITERS`, default 4).
    count: usize,
    /// Events per writer transaction (`KEEL_BENCH_PER_TX`, default 100).
    per_tx: usize,
}

/// `name`'s value from the environment (`default` when unset); an error
/// for anything but a number of at least `min`.
fn knob(name: &str, default: u64, min: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => {
            text.parse().ok().filter(|&n| n >= min).ok_or_else(|| {
                anyhow::anyhow!("{name}={text}: give a whole number of at least {min}")
            })
        }
    }
}
/// How long the latency run lasts.
const LATENCY_RUN: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    // Relay batches of 500 (the relay's default) unless a batch size is
    // given after the event count.
    let given = std::env::args().filter(|a| !a.starts_with("--")).count();
    bench::main(|events, batch| run(events, if given > 2 { batch } else { 500 }))
}

async fn run(events: usize, batch: usize) -> anyhow::Result<()> {
    let linger_ms = knob("KEEL_BENCH_LINGER_MS", 1, 0)?;
    // KEEL_BENCH_RETENTION_SECS=0: published rows are deleted, not archived.
    let retention = Duration::from_secs(knob(
        "KEEL_BENCH_RETENTION_SECS",
        RelayConfig::default().retention.as_secs(),
        0,
    )?);
    let writers = Writers {
        count: knob("KEEL_BENCH_WRITERS", 4, 1)? as usize,
        per_tx: knob("KEEL_BENCH_PER_TX", 100, 1)? as usize,
    };
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let pool = db.pool().clone();
    let client = KafkaClientConfig::new([kafka_bootstrap().await]);
    let topic = unique_name("bench-outbox");
    KafkaAdmin::new(&client, 1)?
        .ensure_topic(&TopicSpec {
            name: topic.clone(),
            partitions: 6,
        })
        .await?;
    let outbox = outbox(&tables);
    let payload = outbox
        .codec()
        .encode(&topic, &testdata::order_placed())
        .await?;
    let sample = event(0, 0, &payload);
    println!(
        "outbox: {events} events of {} bytes, relay batches of {batch}, {} writers x {} events per transaction, linger.ms {linger_ms}, retention {retention:?}",
        payload.len(),
        writers.count,
        writers.per_tx
    );

    // Raw parts.
    sqlx::query("CREATE TABLE raw_rows (LIKE keel.outbox INCLUDING ALL)")
        .execute(&pool)
        .await?;
    let insert_rate = raw_insert_rate(&pool, &payload, events, batch).await?;
    // The relay sends whole batches and awaits them: lingering for more
    // records only delays it. Raw and relay share these settings.
    let config = KafkaPublisherConfig {
        client: client.clone(),
        linger_ms,
        ..KafkaPublisherConfig::default()
    };
    let raw: FutureProducer = config.client_config().create()?;
    let mut headers = OwnedHeaders::new();
    for (k, v) in keel_core::wire::encode_headers(&sample)? {
        headers = headers.insert(Header {
            key: &k,
            value: Some(v.as_bytes()),
        });
    }
    bench::raw_kafka_produce_rate(&raw, &topic, &payload, &headers, events / 4, batch).await?;
    let produce_rate =
        bench::raw_kafka_produce_rate(&raw, &topic, &payload, &headers, events, batch).await?;
    println!("raw batched INSERT       {insert_rate:>10.0} rows/s");
    println!("raw rdkafka produce      {produce_rate:>10.0} msg/s");

    // The outbox.
    let publisher: Arc<dyn Publisher> = Arc::new(KafkaPublisher::new(config)?);
    let relay_config = RelayConfig {
        batch_size: batch,
        retention,
        ..RelayConfig::default()
    };
    let (stop, stats, relay) = start_relay(&pool, &tables, publisher.clone(), &relay_config)?;
    // Warm-up: the relay owns its slots and the producer knows the topic.
    enqueue(&pool, &outbox, &topic, &payload, 2_000, writers).await?;
    published(&stats, 2_000).await?;

    let before = stats.borrow().published;
    let start = Instant::now();
    enqueue(&pool, &outbox, &topic, &payload, events, writers).await?;
    published(&stats, before + events as u64).await?;
    let end_to_end = events as f64 / start.elapsed().as_secs_f64();
    stop.send(true)?;
    relay.await??;

    // The relay alone, draining a pre-filled outbox (and the writers
    // alone, filling it).
    let start = Instant::now();
    enqueue(&pool, &outbox, &topic, &payload, events, writers).await?;
    let enqueue_rate = events as f64 / start.elapsed().as_secs_f64();
    let (stop, stats, relay) = start_relay(&pool, &tables, publisher.clone(), &relay_config)?;
    let start = Instant::now();
    published(&stats, events as u64).await?;
    let drain = events as f64 / start.elapsed().as_secs_f64();
    let slower = insert_rate.min(produce_rate);
    println!(
        "outbox end to end        {end_to_end:>10.0} msg/s  (enqueue -> broker ack, relay running alongside)"
    );
    println!("writers alone, enqueuing {enqueue_rate:>10.0} msg/s  (no relay running)");
    println!("relay draining a backlog {drain:>10.0} msg/s");
    println!(
        "ratio end-to-end / slower raw {:.2} (target >= 0.50)",
        end_to_end / slower
    );

    // Latency at half the end-to-end maximum (read off the archive's
    // publication times: not without it).
    if retention.is_zero() {
        println!("commit -> broker ack: not measured with retention 0 (no archive to read)");
        stop.send(true)?;
        relay.await??;
        return Ok(());
    }
    let rate = end_to_end / 2.0;
    let before = stats.borrow().published;
    let committed = paced(&pool, &outbox, &topic, &payload, rate, LATENCY_RUN, writers).await?;
    published(&stats, before + committed.len() as u64).await?;
    let latencies = commit_to_ack(&pool, &committed).await?;
    let (p50, p99) = bench::percentiles(latencies);
    println!(
        "commit -> broker ack at {rate:.0} msg/s ({} events): p50 {p50:?} p99 {p99:?} (target p99 <= 25 ms)",
        committed.len()
    );
    stop.send(true)?;
    relay.await??;
    Ok(())
}

/// Event `i` of `writer`: each writer has its own 1,000 orders, as
/// independent services or requests touch different aggregates (same-key
/// writes wait for each other in the outbox, by design).
fn event(writer: usize, i: usize, payload: &[u8]) -> Envelope {
    Envelope::new(
        "shop.orders.OrderPlaced",
        format!("order-{writer}-{}", i % 1000),
        payload.to_vec(),
    )
    .with_source("bench")
}

type RelayTask = tokio::task::JoinHandle<Result<(), keel_producers::outbox::OutboxError>>;

fn start_relay(
    pool: &PgPool,
    tables: &OutboxTables,
    publisher: Arc<dyn Publisher>,
    config: &RelayConfig,
) -> anyhow::Result<(watch::Sender<bool>, watch::Receiver<RelayStats>, RelayTask)> {
    let relay = OutboxRelay::new(pool.clone(), tables.clone(), publisher, config.clone())?;
    let stats = relay.stats();
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(relay.run(async move {
        let _ = stopped.changed().await;
    }));
    Ok((stop, stats, task))
}

async fn published(stats: &watch::Receiver<RelayStats>, n: u64) -> anyhow::Result<()> {
    let mut stats = stats.clone();
    tokio::time::timeout(
        Duration::from_secs(300),
        stats.wait_for(|s| s.published >= n),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the relay did not publish {n} events within 5 minutes"))??;
    Ok(())
}

/// Raw batched INSERT rate: the same rows, `batch` per statement and
/// transaction, into a copy of the outbox table (same indexes).
async fn raw_insert_rate(
    pool: &PgPool,
    payload: &[u8],
    events: usize,
    batch: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0;
    while n < events {
        let rows: Vec<Envelope> = (n..(n + batch).min(events))
            .map(|i| event(0, i, payload))
            .collect();
        let ids: Vec<uuid::Uuid> = rows.iter().map(|e| *e.id().as_uuid()).collect();
        let keys: Vec<&[u8]> = rows.iter().map(|e| e.key().as_bytes()).collect();
        let hashes: Vec<i32> = rows
            .iter()
            .map(|e| keel_core::partition::murmur2(e.key().as_bytes()) & 0x7fff_ffff)
            .collect();
        let at: Vec<_> = rows.iter().map(|e| e.occurred_at()).collect();
        let payloads: Vec<&[u8]> = rows.iter().map(|e| e.payload().as_ref()).collect();
        sqlx::query(
            "INSERT INTO raw_rows (topic, event_id, event_type, event_key, key_hash, occurred_at, source, headers, payload) \
             SELECT 'bench', e, 'shop.orders.OrderPlaced', k, h, o, 'bench', '{}'::jsonb, p \
             FROM UNNEST($1::uuid[], $2::bytea[], $3::int4[], $4::timestamptz[], $5::bytea[]) AS u(e, k, h, o, p)",
        )
        .bind(&ids)
        .bind(&keys)
        .bind(&hashes)
        .bind(&at)
        .bind(&payloads)
        .execute(pool)
        .await?;
        n += batch;
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}

/// `writers.count` writers enqueue `events` in transactions of
/// `writers.per_tx`.
async fn enqueue(
    pool: &PgPool,
    outbox: &Outbox,
    topic: &str,
    payload: &[u8],
    events: usize,
    writers: Writers,
) -> anyhow::Result<()> {
    let tasks: Vec<_> = (0..writers.count)
        .map(|w| {
            // Every event is written: the first writers take the remainder.
            let per_writer = events / writers.count + usize::from(w < events % writers.count);
            let (pool, outbox, topic, payload) = (
                pool.clone(),
                outbox.clone(),
                topic.to_owned(),
                payload.to_vec(),
            );
            tokio::spawn(async move {
                let mut done = 0;
                while done < per_writer {
                    let n = writers.per_tx.min(per_writer - done);
                    let rows: Vec<Envelope> =
                        (0..n).map(|i| event(w, done + i, &payload)).collect();
                    let batch: Vec<(&str, &Envelope)> =
                        rows.iter().map(|e| (topic.as_str(), e)).collect();
                    let mut tx = pool.begin().await?;
                    outbox.enqueue_batch(&mut tx, &batch).await?;
                    tx.commit().await?;
                    done += n;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Commits `rate` events per second for `duration` (transactions of 10
/// events, spread over the writers); returns each event's commit time.
async fn paced(
    pool: &PgPool,
    outbox: &Outbox,
    topic: &str,
    payload: &[u8],
    rate: f64,
    duration: Duration,
    writers: Writers,
) -> anyhow::Result<HashMap<EventId, SystemTime>> {
    const EVENTS_PER_TX: usize = 10;
    let interval = Duration::from_secs_f64(EVENTS_PER_TX as f64 * writers.count as f64 / rate);
    let tasks: Vec<_> = (0..writers.count)
        .map(|w| {
            let (pool, outbox, topic, payload) = (
                pool.clone(),
                outbox.clone(),
                topic.to_owned(),
                payload.to_vec(),
            );
            tokio::spawn(async move {
                let mut committed = HashMap::new();
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let end = Instant::now() + duration;
                let mut i = 0;
                while Instant::now() < end {
                    tick.tick().await;
                    let rows: Vec<Envelope> = (0..EVENTS_PER_TX)
                        .map(|j| event(w, i + j, &payload))
                        .collect();
                    i += EVENTS_PER_TX;
                    let batch: Vec<(&str, &Envelope)> =
                        rows.iter().map(|e| (topic.as_str(), e)).collect();
                    let mut tx = pool.begin().await?;
                    outbox.enqueue_batch(&mut tx, &batch).await?;
                    tx.commit().await?;
                    let at = SystemTime::now();
                    committed.extend(rows.iter().map(|e| (e.id(), at)));
                }
                anyhow::Ok(committed)
            })
        })
        .collect();
    let mut all = HashMap::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

async fn commit_to_ack(
    pool: &PgPool,
    committed: &HashMap<EventId, SystemTime>,
) -> anyhow::Result<Vec<Duration>> {
    let ids: Vec<uuid::Uuid> = committed.keys().map(|id| *id.as_uuid()).collect();
    let rows: Vec<(uuid::Uuid, f64)> = sqlx::query_as(
        "SELECT event_id, extract(epoch FROM published_at)::float8 FROM keel.outbox_archive WHERE event_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, published)| {
            let commit = committed.get(&EventId::from_uuid(id))?;
            let commit = commit
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()?
                .as_secs_f64();
            Some(Duration::from_secs_f64((published - commit).max(0.0)))
        })
        .collect())
}
