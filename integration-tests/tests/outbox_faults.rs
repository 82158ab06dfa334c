//! The outbox relay as separate OS processes, SIGKILLed: nothing committed
//! is lost, a crash re-publishes at most the one batch in flight, keys keep
//! their order as a consumer sees them, and a surviving relay takes a
//! killed one's slots over.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_consumers::nats::NatsTransport;
use keel_integration_tests::faults::Worker;
use keel_integration_tests::outbox::{
    RunningRelay, assert_duplicates_explained, check, check_last_copies, consume, relay_config,
};
use keel_integration_tests::outbox::{
    WriterPlan, new_topic, outbox, outbox_database, read_and_check, unpublished, write,
};
use keel_integration_tests::{NatsUnderTest, nats_consumer_config};
use keel_integration_tests::{
    TempDir, TestDatabase, kafka_bootstrap, kafka_transport, nats_transport,
};
use keel_producers::nats::{JetStreamPublisherConfig, NatsClientConfig, StreamSettings};
use keel_producers::outbox::{OutboxRelay, OutboxTables, RelayConfig};
use rand::Rng;

/// Rows per relay batch in the workers: the most one crash may re-publish.
const BATCH: usize = 200;
/// The workers' session timeout (`relay_config`).
const SESSION: Duration = Duration::from_secs(2);

/// Starts a relay process; its count of failed publishes goes to
/// `<dir>/<name>.out` ([`failed_publishes`]).
fn start_relay(db: &TestDatabase, broker: &str, name: &str, dir: &Path) -> Worker {
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_outbox_relay_worker"))
        .args([db.url(), broker, name, &BATCH.to_string()])
        .env("RUST_LOG", "warn,keel_producers=info")
        .stdin(Stdio::null())
        .stdout(out)
        .spawn()
        .unwrap();
    Worker {
        name: name.to_owned(),
        child,
    }
}

/// Failed publishes (batches and refused rows) the relay processes started
/// in `dir` reported, summed: each may re-send up to a batch.
fn failed_publishes(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
        .map(|out| {
            out.lines()
                .filter_map(|l| l.strip_prefix("failed publishes "))
                .filter_map(|n| n.parse::<usize>().ok())
                .next_back()
                .unwrap_or(0)
        })
        .sum()
}

/// Slots each relay (by id) holds now (unexpired leases; an owner is the
/// relay id and its process's token).
async fn owners(db: &TestDatabase) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT regexp_replace(owner, '#[0-9a-f]{16}$', '') AS relay, count(*) \
         FROM keel.outbox_leases \
         WHERE owner IS NOT NULL AND expires_at > clock_timestamp() GROUP BY relay",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
    .into_iter()
    .collect()
}

async fn wait_for_owners(
    db: &TestDatabase,
    what: &str,
    within: Duration,
    pred: impl Fn(&BTreeMap<String, i64>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let now = owners(db).await;
        if pred(&now) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{what}: not within {within:?}; leases: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn published(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM keel.outbox_archive")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// Waits until the relays have published past `before` rows.
async fn wait_for_progress(db: &TestDatabase, before: i64) {
    let started = Instant::now();
    while published(db).await == before {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no row published within 30 s (still {before})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn drained(db: &TestDatabase, tables: &OutboxTables) {
    let started = Instant::now();
    while unpublished(db.pool(), tables).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the relay did not drain the outbox"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_ten_times_loses_nothing_and_repeats_at_most_a_batch_per_kill() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(kafka_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-kill", 4).await;
    let broker = format!("kafka://{}", kafka_bootstrap().await);
    let plan = WriterPlan {
        writers: 4,
        events: 20_000,
        keys: 300,
        max_per_tx: 8,
        // Holding transactions open up to 100 ms, the writers take about a
        // minute: ten relay rounds (each waits out the killed one's 2 s
        // session) end well before them on a loaded machine.
        max_hold: Duration::from_millis(100),
        rollback: 0.1,
    };
    let writer = {
        let (pool, outbox, topic) = (db.pool().clone(), outbox(&tables), topic.clone());
        tokio::spawn(async move { write(&pool, &outbox, &topic, plan).await })
    };
    // Kafka keeps every re-published copy (a new producer id per process),
    // so duplicates are visible to the consumer and can be counted.
    let out = TempDir::new();
    let mut at_kill = Vec::new();
    for round in 0..10 {
        let name = format!("relay-{round}");
        let mut relay = start_relay(&db, &broker, &name, out.path());
        wait_for_owners(
            &db,
            "the new relay owns slots",
            Duration::from_secs(20),
            |o| o.contains_key(&name),
        )
        .await;
        // Kill it while it publishes, not before it starts.
        let before = published(&db).await;
        wait_for_progress(&db, before).await;
        let pause = rand::rng().random_range(0..300);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        at_kill.push((!writer.is_finished(), unpublished(db.pool(), &tables).await));
        relay.child.kill().unwrap();
        relay.child.wait().unwrap();
    }
    let kills = at_kill.len();
    // Every kill came while the writers still wrote (events flowing), so
    // each may have cut a batch short.
    eprintln!("at each kill, (writers still writing, rows waiting): {at_kill:?}");
    assert!(
        at_kill.iter().all(|&(writing, _)| writing),
        "a relay was killed after the writers had finished: {at_kill:?}"
    );
    let writes = writer.await.unwrap();
    let _last = start_relay(&db, &broker, "relay-final", out.path());
    drained(&db, &tables).await;
    let duplicates =
        read_and_check(transport.as_ref(), &topic, &writes, Duration::from_secs(2)).await;
    // A kill re-publishes at most the batch in flight; a failed publish
    // (a timeout on a loaded machine) may have reached the broker too.
    let failed = failed_publishes(out.path());
    eprintln!(
        "{} committed events, {kills} kills, {failed} failed publishes, {duplicates} duplicates (bound {})",
        writes.committed.len(),
        (kills + failed) * BATCH
    );
    assert!(
        duplicates <= (kills + failed) * BATCH,
        "{duplicates} duplicates from {kills} kills and {failed} failed publishes of relays with {BATCH}-row batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_the_outbox_and_a_survivor_takes_a_killed_ones_slots() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    // Kafka keeps every re-published copy, so the kill's duplicates show.
    let transport = Arc::new(kafka_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-pair", 4).await;
    let broker = format!("kafka://{}", kafka_bootstrap().await);
    let out = TempDir::new();
    let mut first = start_relay(&db, &broker, "relay-a", out.path());
    let _second = start_relay(&db, &broker, "relay-b", out.path());
    wait_for_owners(
        &db,
        "both relays hold slots",
        Duration::from_secs(20),
        |o| o.len() == 2 && o.values().sum::<i64>() == 16,
    )
    .await;
    let plan = WriterPlan {
        writers: 4,
        events: 10_000,
        keys: 300,
        max_per_tx: 8,
        max_hold: Duration::from_millis(30),
        rollback: 0.1,
    };
    let writer = {
        let (pool, outbox, topic) = (db.pool().clone(), outbox(&tables), topic.clone());
        tokio::spawn(async move { write(&pool, &outbox, &topic, plan).await })
    };
    // Kill relay-a while the two publish, not before they start.
    wait_for_progress(&db, published(&db).await).await;
    let pause = rand::rng().random_range(0..300);
    tokio::time::sleep(Duration::from_millis(pause)).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let takeover = wait_for_owners(&db, "relay-b owns every slot", SESSION * 4, |o| {
        o.get("relay-b") == Some(&16)
    })
    .await;
    eprintln!("relay-b took relay-a's slots over {takeover:?} after the kill");
    let writes = writer.await.unwrap();
    drained(&db, &tables).await;
    let duplicates =
        read_and_check(transport.as_ref(), &topic, &writes, Duration::from_secs(2)).await;
    let failed = failed_publishes(out.path());
    eprintln!(
        "{duplicates} duplicates after one kill and {failed} failed publishes (bound {})",
        (1 + failed) * BATCH
    );
    assert!(
        duplicates <= (1 + failed) * BATCH,
        "{duplicates} duplicates from one kill and {failed} failed publishes of relays with {BATCH}-row batches"
    );
}

/// The broker goes away for a while: the relay backs off (no busy loop),
/// publishes nothing it cannot get acknowledged, and catches up by itself
/// once the broker is back. A private nats-server with file storage (the
/// stream survives its restart; async-nats reconnects on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_backs_off_while_the_broker_is_down_and_catches_up_after() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let mut nats = NatsUnderTest::start("", "nats");
    let config = relay_config("relay-outage", BATCH);
    let transport = private_nats_transport(&nats, &config).await;
    let topic = new_topic(transport.as_ref(), "outbox-outage", 2).await;
    let relay =
        OutboxRelay::new(db.pool().clone(), tables.clone(), transport.clone(), config).unwrap();
    let RunningRelay {
        stop,
        mut stats,
        task,
    } = RunningRelay::spawn(relay);
    let plan = WriterPlan {
        writers: 2,
        events: 500,
        keys: 50,
        max_per_tx: 5,
        max_hold: Duration::from_millis(5),
        rollback: 0.0,
    };
    let outbox = outbox(&tables);
    let mut writes = write(db.pool(), &outbox, &topic, plan).await;
    let first = writes.committed.len() as u64;
    tokio::time::timeout(
        Duration::from_secs(60),
        stats.wait_for(|s| s.published == first),
    )
    .await
    .expect("the first events were not published")
    .unwrap();

    // The broker goes away; events keep being committed.
    nats.kill();
    let failed_before = stats.borrow().failed_batches;
    let during = write(
        db.pool(),
        &outbox,
        &topic,
        WriterPlan {
            events: 2_000,
            ..plan
        },
    )
    .await;
    writes.committed.extend(during.committed);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (failed, published) = {
        let s = stats.borrow();
        (s.failed_batches - failed_before, s.published)
    };
    eprintln!("{failed} failed batches in the outage");
    assert!(
        failed >= 1,
        "the relay never tried while the broker was down"
    );
    assert!(
        failed <= 25,
        "{failed} failed batches within ~5 s: the relay does not back off"
    );
    assert_eq!(
        published, first,
        "nothing can be acknowledged without a broker"
    );

    // Back: the relay catches up by itself.
    nats.restart();
    drained(&db, &tables).await;
    read_and_check(transport.as_ref(), &topic, &writes, Duration::from_secs(1)).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// A transport to a private nats-server, with the relay's publish timeout
/// as its ack timeout.
async fn private_nats_transport(nats: &NatsUnderTest, config: &RelayConfig) -> Arc<NatsTransport> {
    let client = NatsClientConfig::new(nats.url.clone());
    Arc::new(
        NatsTransport::connect(
            JetStreamPublisherConfig {
                ack_timeout: config.publish_timeout,
                ..JetStreamPublisherConfig::new(client.clone())
            },
            nats_consumer_config(client),
            StreamSettings::default(),
        )
        .await
        .unwrap(),
    )
}

/// The broker is SIGKILLed three times while the relay drains a backlog —
/// in the middle of a batch — and comes back each time: what it acknowledged stays published, the
/// rest goes again, nothing is lost, each key's first and last copies
/// arrive in commit order, and the duplicates stay within what the failed publishes
/// explain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_killed_mid_batch_loses_nothing_and_keeps_each_keys_order() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let mut nats = NatsUnderTest::start("", "nats");
    let config = relay_config("relay-mid-batch", BATCH);
    let transport = private_nats_transport(&nats, &config).await;
    let topic = new_topic(transport.as_ref(), "outbox-mid-batch", 2).await;
    const EVENTS: usize = 20_000;
    let writes = write(
        db.pool(),
        &outbox(&tables),
        &topic,
        WriterPlan {
            writers: 2,
            events: EVENTS,
            keys: 100,
            max_per_tx: 50,
            max_hold: Duration::from_millis(1),
            rollback: 0.0,
        },
    )
    .await;
    let relay =
        OutboxRelay::new(db.pool().clone(), tables.clone(), transport.clone(), config).unwrap();
    let RunningRelay {
        stop,
        mut stats,
        task,
    } = RunningRelay::spawn(relay);
    // Three outages, each once two more batches went out since the last.
    let mut kills = Vec::new();
    for _ in 0..3 {
        let from = stats.borrow().published;
        tokio::time::timeout(
            Duration::from_secs(60),
            stats.wait_for(|s| s.published >= from + 2 * BATCH as u64),
        )
        .await
        .expect("the relay did not publish between outages")
        .unwrap();
        nats.kill();
        let at_kill = stats.borrow().published;
        assert!(
            at_kill < EVENTS as u64,
            "the backlog was drained before the kill: nothing was in flight"
        );
        let failed_before = stats.borrow().failed_batches;
        tokio::time::timeout(
            Duration::from_secs(30),
            stats.wait_for(|s| s.failed_batches > failed_before),
        )
        .await
        .expect("no publish failed while the broker was down")
        .unwrap();
        nats.restart();
        kills.push(at_kill);
    }
    drained(&db, &tables).await;
    // Publishes the client queued when the connection died go out after
    // it reconnects, the re-sent rows that the dead connection lost after
    // them: with one event per key in flight, neither a key's first copies
    // (what an inbox keeps) nor its last ones are out of order.
    let expected = writes.committed.iter().map(|w| w.id).collect();
    let seen = consume(
        transport.as_ref(),
        &topic,
        &expected,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    let duplicates = check(&writes, &seen);
    check_last_copies(&writes, &seen);
    eprintln!("killed at {kills:?} published; {duplicates} duplicates");
    assert_duplicates_explained(duplicates, &[&stats.borrow()], BATCH);
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// PostgreSQL crashes (every backend killed, no checkpoint) and comes back
/// under a running relay: it reconnects and publishes what was committed
/// before and after. A private cluster, since the shared server serves the
/// other tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_reconnects_after_postgresql_crashes_and_restarts() {
    use keel_integration_tests::PostgresUnderTest;

    let postgres = PostgresUnderTest::start();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&postgres.url)
        .await
        .unwrap();
    let tables = OutboxTables::default();
    tables.migrate(&pool).await.unwrap();
    sqlx::query("CREATE TABLE key_counters (key TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let transport = Arc::new(nats_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-pg-crash", 2).await;
    let mut relay = RunningRelay::spawn(
        OutboxRelay::new(
            pool.clone(),
            tables.clone(),
            transport.clone(),
            relay_config("relay-pg-crash", BATCH),
        )
        .unwrap(),
    );
    let plan = WriterPlan {
        writers: 2,
        events: 500,
        keys: 50,
        max_per_tx: 5,
        max_hold: Duration::from_millis(5),
        rollback: 0.1,
    };
    let outbox = outbox(&tables);
    let mut writes = write(&pool, &outbox, &topic, plan).await;
    let first = writes.committed.len() as u64;
    tokio::time::timeout(
        Duration::from_secs(60),
        relay.stats.wait_for(|s| s.published == first),
    )
    .await
    .expect("the first events were not published")
    .unwrap();

    postgres.crash();
    tokio::time::sleep(Duration::from_secs(2)).await;
    postgres.restart();
    // The pool hands out fresh connections; the relay's failed statements
    // are retried after a back-off.
    let after = write(
        &pool,
        &outbox,
        &topic,
        WriterPlan {
            events: 1_000,
            ..plan
        },
    )
    .await;
    writes.committed.extend(after.committed);
    writes.rolled_back.extend(after.rolled_back);
    let total = writes.committed.len() as u64;
    let caught_up = tokio::time::timeout(
        Duration::from_secs(60),
        relay.stats.wait_for(|s| s.published >= total),
    )
    .await
    .is_ok();
    assert!(
        caught_up,
        "not all published after the restart: {:?}",
        *relay.stats.borrow()
    );
    read_and_check(transport.as_ref(), &topic, &writes, Duration::from_secs(1)).await;
    relay.finish().await;
    pool.close().await;
    keel_integration_tests::delete_nats_topic(&topic).await;
}
