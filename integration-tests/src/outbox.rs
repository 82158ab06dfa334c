//! What the outbox tests share: a migrated outbox in a fresh database,
//! writers that enqueue `key:n` events under a per-key counter (the row
//! lock a real aggregate takes), relays with test-speed timings, and the
//! checks a consumer would make — every committed event arrived, no
//! rolled-back one did, and each key's first sightings run in order.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keel_core::{Envelope, EventId, StartFrom, Subscriber, Subscription};
use keel_producers::outbox::{
    Outbox, OutboxError, OutboxRelay, OutboxTables, RelayConfig, RelayStats,
};
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::TestDatabase;

/// Event type of the test events (their payload is `key:n`, not Avro).
pub const SEQ_EVENT: &str = "keel.test.Seq";

/// A fresh database with the outbox's tables and the writers' counters.
pub async fn outbox_database(tables: &OutboxTables) -> TestDatabase {
    let db = TestDatabase::create().await;
    tables.migrate(db.pool()).await.unwrap();
    sqlx::query("CREATE TABLE key_counters (key TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(db.pool())
        .await
        .unwrap();
    db
}

/// An outbox on `tables` with a codec on an in-process registry (the
/// writers enqueue pre-built envelopes; the codec is for typed tests).
pub fn outbox(tables: &OutboxTables) -> Outbox {
    let codec = keel_schemas::AvroCodec::new(
        Arc::new(keel_schemas::LocalRegistry::new()),
        keel_schemas::CodecOptions {
            auto_register: true,
            ..Default::default()
        },
    );
    Outbox::new(tables.clone(), Arc::new(codec))
}

/// A relay running in this process: `stop` ends it (send `true`), `stats`
/// follows it, `task` returns how it ended.
pub struct RunningRelay {
    /// Send `true` to stop the relay.
    pub stop: watch::Sender<bool>,
    /// The relay's live figures.
    pub stats: watch::Receiver<RelayStats>,
    /// The relay's task.
    pub task: tokio::task::JoinHandle<Result<(), OutboxError>>,
}

impl RunningRelay {
    /// Runs `relay` on a task of its own.
    pub fn spawn(relay: OutboxRelay) -> RunningRelay {
        let stats = relay.stats();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(relay.run(async move {
            let _ = stopped.changed().await;
        }));
        RunningRelay { stop, stats, task }
    }

    /// Stops the relay and fails the test if it ended with an error.
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap().unwrap();
    }
}

/// A new topic `<prefix>-<random>` with `partitions`, through `admin`.
pub async fn new_topic(admin: &dyn keel_core::TopicAdmin, prefix: &str, partitions: u32) -> String {
    let name = crate::unique_name(prefix);
    admin
        .ensure_topic(&keel_core::TopicSpec {
            name: name.clone(),
            partitions,
        })
        .await
        .unwrap();
    name
}

/// Relay settings for tests: 200 ms heartbeats, a 2 s session, batches of
/// `batch_size`.
pub fn relay_config(relay_id: &str, batch_size: usize) -> RelayConfig {
    RelayConfig {
        relay_id: relay_id.into(),
        batch_size,
        heartbeat: Duration::from_millis(200),
        session_timeout: Duration::from_secs(2),
        publish_timeout: Duration::from_millis(900),
        poll_interval: Duration::from_millis(250),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
        stats_interval: Duration::from_millis(200),
        ..RelayConfig::default()
    }
}

/// Relay settings for tests whose point is not a take-over: a 20 s session
/// and a 5 s publish timeout, so that a loaded machine's stall of a few
/// seconds neither lets a lease run out (handing the relay's slots to
/// another mid-test) nor times out an ack that then arrives (sending a row
/// twice). A graceful stop still hands over at once: leaving releases the
/// leases.
pub fn steady_relay_config(relay_id: &str, batch_size: usize) -> RelayConfig {
    RelayConfig {
        heartbeat: Duration::from_millis(500),
        session_timeout: Duration::from_secs(20),
        publish_timeout: Duration::from_secs(5),
        ..relay_config(relay_id, batch_size)
    }
}

/// One committed event as its writer saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Written {
    /// The event id.
    pub id: EventId,
    /// Its key.
    pub key: String,
    /// Its number in the key's sequence (1, 2, … in commit order).
    pub n: i64,
}

/// What a set of writers committed and rolled back.
#[derive(Debug, Default)]
pub struct Writes {
    /// Events of committed transactions.
    pub committed: Vec<Written>,
    /// Event ids of rolled-back transactions.
    pub rolled_back: HashSet<EventId>,
}

/// How writers behave.
#[derive(Clone, Copy, Debug)]
pub struct WriterPlan {
    /// Concurrent writers.
    pub writers: usize,
    /// Events enqueued in all (committed or not).
    pub events: usize,
    /// Distinct keys.
    pub keys: usize,
    /// Most events per transaction (1..=this, random).
    pub max_per_tx: usize,
    /// Longest a transaction stays open after enqueuing (random up to this).
    pub max_hold: Duration,
    /// Fraction of transactions rolled back.
    pub rollback: f64,
}

/// Runs `plan.writers` writers against `topic` until `plan.events` events
/// were enqueued. Each transaction takes its keys' counter rows in key
/// order (so a key's events are numbered in commit order), enqueues one
/// event per key — one by one or as a batch, at random — holds the
/// transaction open for a random time and commits or rolls back.
pub async fn write(pool: &PgPool, outbox: &Outbox, topic: &str, plan: WriterPlan) -> Writes {
    let remaining = Arc::new(std::sync::atomic::AtomicI64::new(plan.events as i64));
    let tasks: Vec<_> = (0..plan.writers)
        .map(|_| {
            let (pool, outbox, topic, remaining) = (
                pool.clone(),
                outbox.clone(),
                topic.to_owned(),
                remaining.clone(),
            );
            tokio::spawn(async move {
                let mut writes = Writes::default();
                loop {
                    let (mut keys, hold, roll_back, as_batch) = {
                        let mut rng = rand::rng();
                        let count = rng.random_range(1..=plan.max_per_tx);
                        let keys: Vec<String> = (0..count)
                            .map(|_| format!("key-{}", rng.random_range(0..plan.keys)))
                            .collect();
                        (
                            keys,
                            plan.max_hold.mul_f64(rng.random_range(0.0..1.0)),
                            rng.random_bool(plan.rollback),
                            rng.random_bool(0.5),
                        )
                    };
                    let left =
                        remaining.fetch_sub(keys.len() as i64, std::sync::atomic::Ordering::SeqCst);
                    if left <= 0 {
                        return writes;
                    }
                    keys.truncate(left as usize);
                    keys.sort();
                    let mut tx = pool.begin().await.unwrap();
                    let mut events = Vec::with_capacity(keys.len());
                    for key in keys {
                        let n: i64 = sqlx::query_scalar(
                            "INSERT INTO key_counters (key, n) VALUES ($1, 1) \
                             ON CONFLICT (key) DO UPDATE SET n = key_counters.n + 1 RETURNING n",
                        )
                        .bind(&key)
                        .fetch_one(&mut *tx)
                        .await
                        .unwrap();
                        let event = Envelope::new(SEQ_EVENT, key.as_str(), format!("{key}:{n}"));
                        events.push((
                            Written {
                                id: event.id(),
                                key,
                                n,
                            },
                            event,
                        ));
                    }
                    let enqueued = if as_batch {
                        let batch: Vec<(&str, &Envelope)> =
                            events.iter().map(|(_, e)| (topic.as_str(), e)).collect();
                        outbox.enqueue_batch(&mut tx, &batch).await
                    } else {
                        let mut enqueued = Ok(());
                        for (_, event) in &events {
                            enqueued = outbox.enqueue(&mut tx, &topic, event).await;
                            if enqueued.is_err() {
                                break;
                            }
                        }
                        enqueued
                    };
                    if let Err(e) = enqueued {
                        // Two writers locking keys in different orders:
                        // PostgreSQL aborts one with a deadlock (retriable),
                        // as the outbox documents. Like an application,
                        // this writer gives the transaction up; its events
                        // count as rolled back.
                        assert!(e.is_retriable(), "{e}");
                        let _ = tx.rollback().await;
                        writes.rolled_back.extend(events.iter().map(|(w, _)| w.id));
                        continue;
                    }
                    tokio::time::sleep(hold).await;
                    if roll_back {
                        tx.rollback().await.unwrap();
                        writes.rolled_back.extend(events.iter().map(|(w, _)| w.id));
                    } else {
                        tx.commit().await.unwrap();
                        writes.committed.extend(events.into_iter().map(|(w, _)| w));
                    }
                }
            })
        })
        .collect();
    let mut all = Writes::default();
    for task in tasks {
        let writes = task.await.unwrap();
        all.committed.extend(writes.committed);
        all.rolled_back.extend(writes.rolled_back);
    }
    all
}

/// Reads `topic` from the start as a new group until every id of
/// `expected` arrived (up to `patience` without progress), then `linger`
/// longer for stragglers and duplicates; returns the events in the order
/// they were delivered.
pub async fn consume(
    subscriber: &dyn Subscriber,
    topic: &str,
    expected: &HashSet<EventId>,
    patience: Duration,
    linger: Duration,
) -> Vec<Envelope> {
    let group = crate::unique_name("outbox-check");
    let mut deliveries = subscriber
        .subscribe(
            Subscription::new(topic, group)
                .start_from(StartFrom::Earliest)
                .max_in_flight(1024),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut missing: HashSet<EventId> = expected.clone();
    let mut until = None;
    loop {
        let wait = match until {
            Some(at) => match at {
                at if tokio::time::Instant::now() >= at => break,
                at => at - tokio::time::Instant::now(),
            },
            None => patience,
        };
        match tokio::time::timeout(wait, deliveries.next()).await {
            Ok(Some(Ok(d))) => {
                missing.remove(&d.envelope().id());
                seen.push(d.envelope().clone());
                d.ack();
                if missing.is_empty() && until.is_none() {
                    until = Some(tokio::time::Instant::now() + linger);
                }
            }
            Ok(Some(Err(e))) => panic!("delivery failed: {e}"),
            Ok(None) => panic!("the delivery stream ended"),
            Err(_) if until.is_some() => break,
            Err(_) => panic!(
                "{} of {} committed events never arrived within {patience:?} of the last one",
                missing.len(),
                expected.len()
            ),
        }
    }
    let _ = deliveries.leave().await;
    seen
}

/// Checks what a consumer saw against what was written: exactly the
/// committed events arrived (none rolled back, none missing) and, taking
/// each event at its first sighting (what an inbox does), every key's
/// numbers run 1, 2, 3, … in order. Returns the number of duplicates.
pub fn check(writes: &Writes, seen: &[Envelope]) -> usize {
    let committed: HashMap<EventId, &Written> =
        writes.committed.iter().map(|w| (w.id, w)).collect();
    let mut first: HashSet<EventId> = HashSet::new();
    let mut next_n: HashMap<&str, i64> = HashMap::new();
    let mut duplicates = 0;
    for event in seen {
        assert!(
            !writes.rolled_back.contains(&event.id()),
            "event {} of a rolled-back transaction was published",
            event.id()
        );
        let written = committed
            .get(&event.id())
            .unwrap_or_else(|| panic!("event {} was never written", event.id()));
        if !first.insert(event.id()) {
            duplicates += 1;
            continue;
        }
        let expect = next_n.entry(written.key.as_str()).or_insert(1);
        assert_eq!(
            written.n, *expect,
            "key {} out of order: event #{} arrived where #{} was due",
            written.key, written.n, expect
        );
        *expect += 1;
    }
    assert_eq!(
        first.len(),
        committed.len(),
        "{} committed events were not published",
        committed.len() - first.len()
    );
    duplicates
}

/// As [`check`], but taking each event at its last copy (what a consumer
/// that applies every copy ends with): every key's numbers run 1, 2, 3, …
/// in the order of their last copies. Returns the number of duplicates.
pub fn check_last_copies(writes: &Writes, seen: &[Envelope]) -> usize {
    let mut taken = HashSet::new();
    let mut last: Vec<Envelope> = seen
        .iter()
        .rev()
        .filter(|e| taken.insert(e.id()))
        .cloned()
        .collect();
    last.reverse();
    check(writes, &last);
    seen.len() - last.len()
}

/// Reads `topic` as a new group until every committed event of `writes`
/// arrived, then `linger` longer, and [`check`]s what came: returns the
/// number of duplicates.
pub async fn read_and_check(
    subscriber: &dyn Subscriber,
    topic: &str,
    writes: &Writes,
    linger: Duration,
) -> usize {
    let expected: HashSet<EventId> = writes.committed.iter().map(|w| w.id).collect();
    let seen = consume(
        subscriber,
        topic,
        &expected,
        Duration::from_secs(60),
        linger,
    )
    .await;
    check(writes, &seen)
}

/// Fails the test when relays that were never killed delivered more
/// duplicates than their failed publishes explain. A publish that timed out
/// or failed may still have reached the broker, and the relay sends its rows
/// again (at least once): each failed batch, and each refused row (on Kafka
/// its key's rows sent after it and stored go again), accounts for at most
/// one batch of duplicates. With no failure there must be none.
pub fn assert_duplicates_explained(duplicates: usize, relays: &[&RelayStats], batch_size: usize) {
    let failed: u64 = relays.iter().map(|s| s.failed_batches + s.failures).sum();
    eprintln!("{duplicates} duplicates; relays' failed batches and refused rows: {failed}");
    assert!(
        duplicates as u64 <= failed * batch_size as u64,
        "{duplicates} duplicates, but the relays report {failed} failed publishes \
         (batches of {batch_size}): {relays:?}"
    );
}

/// Rows of the outbox not yet published (parked ones included).
pub async fn unpublished(pool: &PgPool, tables: &OutboxTables) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".outbox WHERE published_at IS NULL",
        tables.schema()
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}
