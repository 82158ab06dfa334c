//! Kafka consumer groups under faults, with separate OS processes: 100k
//! events over 1,000 keys consumed by 3 members, one SIGKILLed mid-run and a
//! fourth joining later. Every event is handled; per key, no event is
//! handled for the first time before an earlier one was; duplicates come
//! from the killed member's uncommitted window (counted, bounded by it) or —
//! checked against the assignments each member recorded — from a partition
//! the broker gave to two live members at once (tansu 0.6.0 does; a Kafka
//! broker fences this with generations). Graceful joins and leaves alone
//! hand on no handled event at all.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_core::{Envelope, Publisher};
use keel_integration_tests::faults::{
    DOUBLE_ASSIGNMENT_REACH, Worker, distinct, explained_by_double_assignment, files, handled,
    numbered, ownership, owns_some, wait_until,
};
use keel_integration_tests::{
    TansuUnderTest, TempDir, eventually, kafka_publisher, kafka_topic, unique_name,
};
use keel_producers::kafka::{KafkaClientConfig, KafkaPublisher};

const EVENTS: usize = 100_000;
const KEYS: usize = 1_000;
const PARTITIONS: u32 = 6;
const WINDOW: usize = 200;

/// Starts a worker whose handlers each take `pace_ms` (and record the
/// event); with `fail_every` n > 0, each key's events numbered 1 modulo n
/// fail their first attempt and are retried after a delay.
fn start(
    bootstrap: &str,
    topic: &str,
    group: &str,
    name: &str,
    dir: &Path,
    (pace_ms, fail_every): (u64, u64),
) -> Worker {
    let child = Command::new(env!("CARGO_BIN_EXE_kafka_group_worker"))
        .args([bootstrap, topic, group, name])
        .arg(dir.join(format!("{name}.log")))
        .arg(WINDOW.to_string())
        .arg(pace_ms.to_string())
        .arg(fail_every.to_string())
        // Rebalances, commits and warnings: what a failure report quotes.
        .env("RUST_LOG", "warn,keel_consumers=info")
        .stderr(File::create(dir.join(format!("{name}.stderr"))).expect("create a worker's log"))
        .spawn()
        .expect("start a worker process");
    Worker {
        name: name.to_owned(),
        child,
    }
}

/// What a fault test runs on: a broker of its own (the events should
/// neither slow nor be slowed by what the rest of the suite stored in the
/// shared one), a topic, a group name, a publisher and a directory for the
/// workers' records.
struct Run {
    _tansu: TansuUnderTest,
    bootstrap: String,
    topic: String,
    group: String,
    publisher: KafkaPublisher,
    dir: TempDir,
}

impl Run {
    async fn start(name: &str) -> Run {
        let tansu = TansuUnderTest::start_in_memory().await;
        let bootstrap = tansu.bootstrap.clone();
        let mut client = KafkaClientConfig::new([bootstrap.clone()]);
        let topic = kafka_topic(&client, name, PARTITIONS).await;
        // One record per producer batch: tansu's `memory://` storage
        // answers a fetch from inside a batch with the *next* batch, so a
        // member resuming at a committed offset mid-batch would never see
        // the batch's rest (tansu-storage 0.6.0, dynostore `fetch`:
        // `offsets.split_off(&offset)` keeps only batches starting at or
        // after the offset). Real Kafka, and tansu's SQL storages, return
        // the batch holding the offset.
        client
            .librdkafka
            .insert("batch.num.messages".to_owned(), "1".to_owned());
        Run {
            _tansu: tansu,
            bootstrap,
            topic,
            group: unique_name(&format!("{name}-g")),
            publisher: kafka_publisher(&client),
            dir: TempDir::new(),
        }
    }
}

/// Quotes the workers' rebalances and warnings when the test fails, however
/// it fails (a stall, a crashed worker, a broken guarantee).
struct ReportOnFailure<'a>(&'a Path);

impl Drop for ReportOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "the workers' rebalances and warnings:\n{}",
                rebalances(self.0)
            );
        }
    }
}

/// The workers' rebalances, commits at revocation and warnings, line by
/// line under their names.
fn rebalances(dir: &Path) -> String {
    let mut out = String::new();
    for path in files(dir, ".stderr") {
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
            if !line.contains(" INFO ")
                || line.contains("partitions")
                || line.contains("revocation")
            {
                out.push_str(&format!("{name}: {line}\n"));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_join_mid_run_lose_nothing_and_keep_key_order() {
    let Run {
        _tansu,
        bootstrap,
        topic,
        group,
        publisher,
        dir,
    } = Run::start("faults").await;
    let _report = ReportOnFailure(dir.path());

    let mut workers = vec![
        start(&bootstrap, &topic, &group, "w1", dir.path(), (0, 0)),
        start(&bootstrap, &topic, &group, "w2", dir.path(), (0, 0)),
        start(&bootstrap, &topic, &group, "w3", dir.path(), (0, 0)),
    ];
    let topic_for_join = topic.clone();
    // Publish while the members work: seq-major, so every key advances.
    let publishing = tokio::spawn(async move {
        let per_key = EVENTS / KEYS;
        for seq in 0..per_key {
            let batch: Vec<Envelope> = (0..KEYS).map(|k| numbered(k, seq)).collect();
            publisher.publish_batch(&topic, batch).await.unwrap();
        }
    });

    wait_until(dir.path(), "before the kill", |n| n >= EVENTS * 3 / 10).await;
    let mut victim = workers.remove(1);
    victim.child.kill().unwrap(); // SIGKILL: no leave, no commit
    victim.child.wait().unwrap();
    let killed_nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let killed_at = distinct(&handled(dir.path()));

    wait_until(dir.path(), "before the join", |n| n >= EVENTS * 6 / 10).await;
    workers.push(start(
        &bootstrap,
        &topic_for_join,
        &group,
        "w4",
        dir.path(),
        (0, 0),
    ));
    publishing.await.unwrap();
    wait_until(dir.path(), "all events", |n| n >= EVENTS).await;
    drop(workers);
    let mut ended = HashMap::new();
    ended.insert(victim.name.clone(), killed_nanos);
    let owners = ownership(dir.path(), &ended);
    let records = handled(dir.path());
    assert_eq!(distinct(&records), EVENTS, "every event handled");

    // Per key: an event is handled for the first time only after every
    // earlier event of its key was; repeats are re-deliveries.
    let mut next: HashMap<&str, u32> = HashMap::new();
    let mut first_by: HashMap<(&str, u32), (&str, u128)> = HashMap::new();
    let mut from_victim = 0;
    let mut from_double_assignment: BTreeMap<(u32, &str, &str), usize> = BTreeMap::new();
    for h in &records {
        let expected = next.entry(h.key.as_str()).or_insert(0);
        if h.seq == *expected {
            *expected += 1;
            first_by.insert((h.key.as_str(), h.seq), (h.worker.as_str(), h.nanos));
            continue;
        }
        assert!(
            h.seq < *expected,
            "key {}: {} handled before {expected}",
            h.key,
            h.seq
        );
        let (original, first_at) = first_by[&(h.key.as_str(), h.seq)];
        if original == victim.name {
            from_victim += 1;
        } else {
            // A live member's handled events come back only after the broker
            // gave their partition to two members at once (tansu 0.6.0's
            // coordinator answers each JoinGroup at once, with the other
            // members' last-known owned partitions, and does not fence
            // commits by generation), and only what was first handled
            // around such a spell. Anything else is a commit Keel lost.
            assert!(
                explained_by_double_assignment(&owners, h.partition, first_at, h.nanos),
                "{} re-handled {}:{} (partition {}, offset {}) at {} first handled by live member \
                 {original} at {first_at}, and partition {} had not been assigned to two members \
                 at once before, within {DOUBLE_ASSIGNMENT_REACH:?} of that; who owned the \
                 partition when (unix nanos): {:?}",
                h.worker,
                h.key,
                h.seq,
                h.partition,
                h.offset,
                h.nanos,
                h.partition,
                owners
                    .iter()
                    .filter(|((_, p), _)| *p == h.partition)
                    .collect::<BTreeMap<_, _>>(),
            );
            *from_double_assignment
                .entry((h.partition, original, h.worker.as_str()))
                .or_default() += 1;
        }
    }
    println!(
        "killed {} after {killed_at} events; {} deliveries; duplicates: {from_victim} from the killed member's window, \
         {from_double_assignment:?} (partition, first, again) while the broker had a partition assigned twice",
        victim.name,
        records.len()
    );
    // The killed member's uncommitted work comes back: at most its window on
    // each partition it owned (two, should the kill also lose the commit in
    // flight).
    let victim_partitions = owners
        .keys()
        .filter(|(worker, _)| *worker == victim.name)
        .count();
    assert!(
        victim_partitions > 0,
        "the killed member owned no partition: {owners:?}"
    );
    assert!(
        from_victim <= 2 * WINDOW * victim_partitions,
        "{from_victim} duplicates exceed the killed member's window \
         (2 x {WINDOW} on each of its {victim_partitions} partitions)"
    );
    // The member that joined late took its share.
    assert!(
        owners.keys().any(|(worker, _)| worker == "w4"),
        "w4 never owned a partition: {owners:?}"
    );
    assert!(
        records.iter().any(|h| h.worker == "w4"),
        "w4 handled nothing"
    );
}

/// Members that join and leave gracefully (SIGINT: drain, commit, leave)
/// while events flow hand their partitions on without any event a member
/// handled coming back, and each key runs in order. Handlers take a few
/// milliseconds, so many run at once, finish out of order, and every
/// hand-over falls mid-stream with events of other keys settled above ones
/// still queued — or waiting for a retry: some events fail once first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_joins_and_leaves_hand_on_no_handled_event() {
    const KEYS: usize = 300;
    const PER_ROUND: usize = 3;
    const ROUNDS: usize = 36;
    const TOTAL: usize = KEYS * PER_ROUND * ROUNDS;
    const PACE_MS: u64 = 20;
    // A key's every fourth event fails once and waits 100 ms for its retry:
    // most hand-overs fall while some key of the partition waits, which a
    // revocation waits for too (due well within half the drain timeout).
    const FAIL_EVERY: u64 = 4;
    let Run {
        _tansu,
        bootstrap,
        topic,
        group,
        publisher,
        dir,
    } = Run::start("handover").await;
    let _report = ReportOnFailure(dir.path());
    let worker = |name: &str| {
        start(
            &bootstrap,
            &topic,
            &group,
            name,
            dir.path(),
            (PACE_MS, FAIL_EVERY),
        )
    };

    let mut live = vec![worker("w1")];
    let mut ended = HashMap::new();
    // Published faster than the members handle them: every change below
    // falls while events are running, queued and settled out of order. The
    // last rounds wait for w4 to own partitions, so it has work too.
    let (w4_in, mut w4_owns) = tokio::sync::watch::channel(false);
    let publishing = tokio::spawn({
        let topic = topic.clone();
        async move {
            for round in 0..ROUNDS {
                if round == ROUNDS * 9 / 10 {
                    w4_owns.wait_for(|owns| *owns).await.unwrap();
                }
                let batch: Vec<Envelope> = (0..PER_ROUND)
                    .flat_map(|j| (0..KEYS).map(move |k| numbered(k, round * PER_ROUND + j)))
                    .collect();
                publisher.publish_batch(&topic, batch).await.unwrap();
            }
        }
    });
    let at = |share: usize| move |n: usize| n >= TOTAL * share / 100;
    wait_until(dir.path(), "before w2 joins", at(10)).await;
    live.push(worker("w2"));
    wait_until(dir.path(), "before w1 leaves", at(25)).await;
    stop(&mut live, "w1", &mut ended);
    wait_until(dir.path(), "before w3 joins", at(40)).await;
    live.push(worker("w3"));
    wait_until(dir.path(), "before w2 leaves", at(55)).await;
    stop(&mut live, "w2", &mut ended);
    wait_until(dir.path(), "before w4 joins", at(70)).await;
    live.push(worker("w4"));
    eventually(
        "w4 to own partitions",
        Duration::from_secs(60),
        async || owns_some(dir.path(), "w4"),
    )
    .await;
    w4_in.send(true).unwrap();
    publishing.await.unwrap();
    wait_until(dir.path(), "all events", at(100)).await;
    for name in ["w3", "w4"] {
        stop(&mut live, name, &mut ended);
    }

    let owners = ownership(dir.path(), &ended);
    let records = handled(dir.path());
    assert_eq!(distinct(&records), TOTAL, "every event handled");
    let mut per_worker: BTreeMap<&str, usize> = BTreeMap::new();
    let mut next: HashMap<&str, usize> = HashMap::new();
    let mut first_by: HashMap<(&str, u32), (&str, u128)> = HashMap::new();
    let mut again: BTreeMap<(u32, &str, &str), usize> = BTreeMap::new();
    let mut handed_on = Vec::new();
    for h in &records {
        *per_worker.entry(h.worker.as_str()).or_default() += 1;
        let expected = next.entry(h.key.as_str()).or_insert(0);
        if h.seq as usize == *expected {
            *expected += 1;
            first_by.insert((h.key.as_str(), h.seq), (h.worker.as_str(), h.nanos));
            continue;
        }
        assert!(
            (h.seq as usize) < *expected,
            "key {}: {} handled before {expected}",
            h.key,
            h.seq
        );
        let (original, first_at) = first_by[&(h.key.as_str(), h.seq)];
        // tansu 0.6.0 may give a partition to two members at once (see the
        // test above); only what that explains is not Keel's to answer for.
        if explained_by_double_assignment(&owners, h.partition, first_at, h.nanos) {
            *again
                .entry((h.partition, original, h.worker.as_str()))
                .or_default() += 1;
        } else {
            handed_on.push(format!(
                "{}:{} (partition {}, offset {}) by {original} then {}",
                h.key, h.seq, h.partition, h.offset, h.worker
            ));
        }
    }
    assert!(
        handed_on.is_empty(),
        "{} handled event(s) handed on by graceful hand-overs, first: {:?}",
        handed_on.len(),
        &handed_on[..handed_on.len().min(5)]
    );
    println!(
        "{} deliveries of {TOTAL} events; per worker {per_worker:?}; handled again while the broker \
         had a partition assigned twice: {again:?}",
        records.len()
    );
    assert_eq!(
        per_worker.len(),
        4,
        "every worker handled some events: {per_worker:?}"
    );
}

/// Stops `name` gracefully and notes when it had stopped.
fn stop(live: &mut Vec<Worker>, name: &str, ended: &mut HashMap<String, u128>) {
    let at = live.iter().position(|w| w.name == name).unwrap();
    live.remove(at).interrupt();
    ended.insert(
        name.to_owned(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
}
