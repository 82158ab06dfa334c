//! Kafka consumer groups under faults, with separate OS processes: 100k
//! events over 1,000 keys consumed by 3 members, one SIGKILLed mid-run and a
//! fourth joining later. Every event is handled; per key, no event is
//! handled for the first time before an earlier one was; duplicates come
//! from the killed member's uncommitted window (counted, bounded by it) or —
//! checked against the assignments each member recorded — from a partition
//! the broker gave to two live members at once (tansu 0.6.0 does; a Kafka
//! broker fences this with generations).
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use keel_core::{Envelope, Publisher};
use keel_integration_tests::faults::{Worker, distinct, files, handled, ownership, wait_until};
use keel_integration_tests::{TansuUnderTest, TempDir, kafka_publisher, kafka_topic, unique_name};
use keel_producers::kafka::KafkaClientConfig;

const EVENTS: usize = 100_000;
const KEYS: usize = 1_000;
const PARTITIONS: u32 = 6;
const WINDOW: usize = 200;

fn start(bootstrap: &str, topic: &str, group: &str, name: &str, dir: &Path) -> Worker {
    let child = Command::new(env!("CARGO_BIN_EXE_kafka_group_worker"))
        .args([bootstrap, topic, group, name])
        .arg(dir.join(format!("{name}.log")))
        .arg(WINDOW.to_string())
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

/// When the broker first had `partition` assigned to two members at once,
/// if it ever did. From then on that partition's committed position is not
/// trustworthy: tansu does not fence commits by generation, so the member
/// behind can commit over the one ahead, and a later owner resumes from
/// there.
fn first_double_assignment(
    owners: &HashMap<(String, u32), Vec<(u128, u128)>>,
    partition: u32,
) -> Option<u128> {
    let intervals: Vec<(&str, (u128, u128))> = owners
        .iter()
        .filter(|((_, p), _)| *p == partition)
        .flat_map(|((w, _), v)| v.iter().map(move |i| (w.as_str(), *i)))
        .collect();
    let mut first: Option<u128> = None;
    for (a, x) in &intervals {
        for (b, y) in &intervals {
            let (from, to) = (x.0.max(y.0), x.1.min(y.1));
            if a != b && from < to {
                first = Some(first.map_or(from, |f| f.min(from)));
            }
        }
    }
    first
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
    // A broker of its own: 100k events should neither slow nor be slowed
    // by what the rest of the suite stored in the shared one.
    let tansu = TansuUnderTest::start_in_memory().await;
    let bootstrap = tansu.bootstrap.clone();
    let client = KafkaClientConfig::new([bootstrap.clone()]);
    let topic = kafka_topic(&client, "faults", PARTITIONS).await;
    let group = unique_name("faults-g");
    // One record per producer batch: tansu's `memory://` storage answers a
    // fetch from inside a batch with the *next* batch, so a member resuming
    // at a committed offset mid-batch would never see the batch's rest
    // (tansu-storage 0.6.0, dynostore `fetch`: `offsets.split_off(&offset)`
    // keeps only batches starting at or after the offset). Real Kafka, and
    // tansu's SQL storages, return the batch holding the offset.
    let mut client = client;
    client
        .librdkafka
        .insert("batch.num.messages".to_owned(), "1".to_owned());
    let publisher = kafka_publisher(&client);
    let dir = TempDir::new();
    let _report = ReportOnFailure(dir.path());

    let mut workers = vec![
        start(&bootstrap, &topic, &group, "w1", dir.path()),
        start(&bootstrap, &topic, &group, "w2", dir.path()),
        start(&bootstrap, &topic, &group, "w3", dir.path()),
    ];
    let topic_for_join = topic.clone();
    // Publish while the members work: seq-major, so every key advances.
    let publishing = tokio::spawn(async move {
        let per_key = EVENTS / KEYS;
        for seq in 0..per_key {
            let batch: Vec<Envelope> = (0..KEYS)
                .map(|k| {
                    Envelope::new(
                        "keel.test.Numbered",
                        format!("key-{k}"),
                        format!("key-{k}:{seq}"),
                    )
                })
                .collect();
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
    workers.push(start(&bootstrap, &topic_for_join, &group, "w4", dir.path()));
    publishing.await.unwrap();
    wait_until(dir.path(), "all events", |n| n >= EVENTS).await;
    drop(workers);
    let mut ended = HashMap::new();
    ended.insert(victim.name.clone(), killed_nanos);
    let owners = ownership(dir.path(), &ended);
    let double_assigned_since: HashMap<u32, Option<u128>> = (0..PARTITIONS)
        .map(|p| (p, first_double_assignment(&owners, p)))
        .collect();
    let records = handled(dir.path());
    assert_eq!(distinct(&records), EVENTS, "every event handled");

    // Per key: an event is handled for the first time only after every
    // earlier event of its key was; repeats are re-deliveries.
    let mut next: HashMap<&str, u32> = HashMap::new();
    let mut first_by: HashMap<(&str, u32), &str> = HashMap::new();
    let mut from_victim = 0;
    let mut from_double_assignment: BTreeMap<(u32, &str, &str), usize> = BTreeMap::new();
    for h in &records {
        let expected = next.entry(h.key.as_str()).or_insert(0);
        if h.seq == *expected {
            *expected += 1;
            first_by.insert((h.key.as_str(), h.seq), h.worker.as_str());
            continue;
        }
        assert!(
            h.seq < *expected,
            "key {}: {} handled before {expected}",
            h.key,
            h.seq
        );
        let original = first_by[&(h.key.as_str(), h.seq)];
        if original == victim.name {
            from_victim += 1;
        } else {
            // A live member's handled events come back only after the broker
            // gave their partition to two members at once (tansu 0.6.0's
            // coordinator answers each JoinGroup at once, with the other
            // members' last-known owned partitions, and does not fence
            // commits by generation). Anything else is a commit Keel lost.
            let since = double_assigned_since[&h.partition];
            assert!(
                since.is_some_and(|t| t <= h.nanos),
                "{} re-handled {}:{} (partition {}, offset {}) at {} first handled by live member \
                 {original}, and partition {} had not been assigned to two members at once before; \
                 first handled at {:?}; who owned the partition when (unix nanos): {:?}",
                h.worker,
                h.key,
                h.seq,
                h.partition,
                h.offset,
                h.nanos,
                h.partition,
                records
                    .iter()
                    .find(|r| r.key == h.key && r.seq == h.seq)
                    .map(|r| r.nanos),
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
    // each partition it could have owned.
    assert!(
        from_victim <= WINDOW * PARTITIONS as usize,
        "{from_victim} duplicates exceed the killed member's window ({WINDOW} x {PARTITIONS})"
    );
}
