//! JetStream consumer groups under faults, with separate OS processes: 100k
//! events over 1,000 keys consumed by 3 members, one SIGKILLed mid-run and a
//! fourth joining later, against the machine's nats-server. Every event is
//! handled; per key, no event is handled for the first time before an
//! earlier one was; duplicates come only from the killed member's unacked
//! window (counted, bounded by it); the killed member's partitions are
//! taken over within the session timeout; and no partition is ever handled
//! by two members at once — checked from every handler's start and end
//! times, not assumed. And static membership: a member restarted after a
//! crash gives back the leases its earlier process held that now fall to
//! another member, and of two live processes under one member id the later
//! one keeps it while the earlier one stops. A handler still running when
//! its partition is taken from the member is stopped, not left running
//! alongside the new owner's.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_core::{Envelope, Publisher, TopicSpec};
use keel_integration_tests::faults::{
    Handled, Worker, distinct, handled, numbered, ownership, wait_until,
};
use keel_integration_tests::{TempDir, nats_consumer_config, nats_url, unique_name};
use keel_producers::nats::{
    JetStreamAdmin, JetStreamPublisher, JetStreamPublisherConfig, NatsClientConfig, StreamSettings,
};

const EVENTS: usize = 100_000;
const KEYS: usize = 1_000;
const PARTITIONS: u32 = 6;
const WINDOW: usize = 200;
/// The workers' `max_in_flight` (see `nats_group_worker`).
const MAX_IN_FLIGHT: usize = 64;

fn start(url: &str, topic: &str, group: &str, name: &str, dir: &Path) -> Worker {
    start_as(url, topic, group, name, None, dir)
}

/// A worker; with `member`, a static member of that id.
fn start_as(
    url: &str,
    topic: &str,
    group: &str,
    name: &str,
    member: Option<&str>,
    dir: &Path,
) -> Worker {
    let child = Command::new(env!("CARGO_BIN_EXE_nats_group_worker"))
        .args([url, topic, group, name])
        .arg(dir.join(format!("{name}.log")))
        .arg(WINDOW.to_string())
        .args(member)
        .spawn()
        .expect("start a worker process");
    Worker {
        name: name.to_owned(),
        child,
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Per partition, handler runs of different members that overlap in time.
fn overlapping_handlers(records: &[Handled]) -> Vec<String> {
    let mut by_partition: BTreeMap<u32, Vec<&Handled>> = BTreeMap::new();
    for h in records {
        by_partition.entry(h.partition).or_default().push(h);
    }
    let mut out = Vec::new();
    for (p, mut runs) in by_partition {
        runs.sort_by_key(|h| h.started.unwrap());
        // The latest end so far, and whose it was.
        let mut reach: Option<(u128, &str)> = None;
        for h in runs {
            let start = h.started.unwrap();
            if let Some((end, who)) = reach
                && start < end
                && who != h.worker
            {
                out.push(format!(
                    "partition {p}: {} started {}:{} at {start} while {who} was handling until {end}",
                    h.worker, h.key, h.seq
                ));
            }
            if reach.is_none_or(|(end, _)| h.nanos > end) {
                reach = Some((h.nanos, h.worker.as_str()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_join_mid_run_lose_nothing_keep_key_order_and_never_share_a_partition() {
    let url = nats_url().await;
    let client = NatsClientConfig::new(url.clone());
    let js = client.jetstream().await.unwrap();
    let topic = unique_name("faults");
    let admin = JetStreamAdmin::new(js.clone());
    admin
        .ensure_stream(
            &TopicSpec {
                name: topic.clone(),
                partitions: PARTITIONS,
            },
            &StreamSettings::default(),
        )
        .await
        .unwrap();
    let group = unique_name("faults-g");
    let publisher =
        JetStreamPublisher::with_context(js.clone(), JetStreamPublisherConfig::new(client.clone()));
    let dir = TempDir::new();

    let mut workers = vec![
        start(&url, &topic, &group, "w1", dir.path()),
        start(&url, &topic, &group, "w2", dir.path()),
        start(&url, &topic, &group, "w3", dir.path()),
    ];
    let topic_for_join = topic.clone();
    let publishing = tokio::spawn(async move {
        let per_key = EVENTS / KEYS;
        for seq in 0..per_key {
            let batch: Vec<Envelope> = (0..KEYS).map(|k| numbered(k, seq)).collect();
            publisher.publish_batch(&topic, batch).await.unwrap();
        }
    });

    wait_until(dir.path(), "before the kill", |n| n >= EVENTS * 3 / 10).await;
    let mut victim = workers.remove(1);
    victim.child.kill().unwrap(); // SIGKILL: no leave, no ack
    victim.child.wait().unwrap();
    let killed_nanos = now_nanos();
    let killed_at = distinct(&handled(dir.path()));

    wait_until(dir.path(), "before the join", |n| n >= EVENTS * 6 / 10).await;
    workers.push(start(&url, &topic_for_join, &group, "w4", dir.path()));
    publishing.await.unwrap();
    wait_until(dir.path(), "all events", |n| n >= EVENTS).await;
    // The group rebalances onto the newcomer whether or not events remain.
    let joined_by = Instant::now() + Duration::from_secs(30);
    while ownership(dir.path(), &HashMap::new())
        .keys()
        .all(|(w, _)| w != "w4")
    {
        assert!(
            Instant::now() < joined_by,
            "the member that joined late was given no partition within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(workers);

    let records = handled(dir.path());
    // 100k events are not left on the shared server (passed or not).
    admin.delete_topic(&topic_for_join).await.unwrap();
    assert_eq!(distinct(&records), EVENTS, "every event handled");

    let overlaps = overlapping_handlers(&records);
    assert!(
        overlaps.is_empty(),
        "{} times two members handled one partition at once, e.g. {:?}",
        overlaps.len(),
        &overlaps[..overlaps.len().min(5)]
    );

    // Per key: an event is handled for the first time only after every
    // earlier event of its key was; repeats are re-deliveries, and only the
    // killed member leaves work to re-deliver (hand-overs between live
    // members drain and ack first).
    let mut next: HashMap<&str, u32> = HashMap::new();
    let mut first_by: HashMap<(&str, u32), &str> = HashMap::new();
    let mut from_victim = 0;
    let mut from_live = Vec::new();
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
            from_live.push(format!(
                "{}:{} by {original} then {}",
                h.key, h.seq, h.worker
            ));
        }
    }

    // The killed member's partitions went to live members within the
    // session timeout (plus a heartbeat and the time to re-create the
    // durable consumer).
    let mut ended = HashMap::new();
    ended.insert(victim.name.clone(), killed_nanos);
    let owners = ownership(dir.path(), &ended);
    let orphaned: Vec<u32> = owners
        .iter()
        .filter(|((w, _), spans)| *w == victim.name && spans.iter().any(|s| s.1 == killed_nanos))
        .map(|((_, p), _)| *p)
        .collect();
    let session = nats_consumer_config(client).session_timeout;
    let mut takeover = Duration::ZERO;
    for p in &orphaned {
        let taken = owners
            .iter()
            .filter(|((w, q), _)| q == p && *w != victim.name)
            .flat_map(|(_, spans)| spans.iter().map(|s| s.0))
            .filter(|start| *start >= killed_nanos)
            .min()
            .unwrap_or_else(|| panic!("partition {p} of the killed member was never taken over"));
        takeover = takeover.max(Duration::from_nanos((taken - killed_nanos) as u64));
    }
    let joined: Vec<u32> = owners
        .keys()
        .filter(|(w, _)| w == "w4")
        .map(|(_, p)| *p)
        .collect();
    let mut per_worker: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &records {
        *per_worker.entry(h.worker.as_str()).or_default() += 1;
    }
    println!("handled per worker: {per_worker:?}; w4 owned partitions {joined:?}");
    println!(
        "killed {} after {killed_at} events owning {orphaned:?}; taken over after {takeover:?}; \
         {} deliveries; duplicates: {from_victim} from the killed member's window, {} from live members",
        victim.name,
        records.len(),
        from_live.len()
    );
    assert!(!orphaned.is_empty(), "the killed member owned partitions");
    assert!(
        takeover <= session + Duration::from_secs(5),
        "take-over took {takeover:?}, session timeout {session:?}"
    );
    assert!(
        from_live.is_empty(),
        "live members' handled events came back: {:?}",
        &from_live[..from_live.len().min(5)]
    );
    // What comes back lies above each partition's ack floor: at most the
    // window Keel dispatched past the oldest unacked event, plus acks that
    // were sent but still on their way when the process died (at most the
    // member's in-flight limit).
    let bound = (WINDOW + MAX_IN_FLIGHT) * orphaned.len();
    assert!(
        from_victim <= bound,
        "{from_victim} duplicates exceed the killed member's window (({WINDOW} + {MAX_IN_FLIGHT}) x {} partitions)",
        orphaned.len()
    );
}

/// A fresh stream of `partitions` partitions and a group name.
async fn stream_of(
    prefix: &str,
    partitions: u32,
) -> (String, NatsClientConfig, JetStreamAdmin, String, String) {
    let url = nats_url().await;
    let client = NatsClientConfig::new(url.clone());
    let js = client.jetstream().await.unwrap();
    let topic = unique_name(prefix);
    let admin = JetStreamAdmin::new(js);
    admin
        .ensure_stream(
            &TopicSpec {
                name: topic.clone(),
                partitions,
            },
            &StreamSettings::default(),
        )
        .await
        .unwrap();
    let group = unique_name(&format!("{prefix}-g"));
    (url, client, admin, topic, group)
}

/// Waits until `worker` was given all 4 partitions.
async fn until_owns_all(dir: &Path, worker: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while owned_by(dir).get(worker).map_or(0, Vec::len) < 4 {
        assert!(
            Instant::now() < deadline,
            "{worker} was not given all 4 partitions within 30 s: {:?}",
            owned_by(dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `count` numbered events over 100 keys; `from` numbers the first.
async fn publish_numbered(client: &NatsClientConfig, topic: &str, from: usize, count: usize) {
    let js = client.jetstream().await.unwrap();
    let publisher =
        JetStreamPublisher::with_context(js, JetStreamPublisherConfig::new(client.clone()));
    let batch: Vec<Envelope> = (from..from + count)
        .map(|i| numbered(i % 100, i / 100))
        .collect();
    publisher.publish_batch(topic, batch).await.unwrap();
}

/// Waits up to 40 s until `count` distinct events were handled; how many were.
async fn handled_within(dir: &Path, count: usize) -> std::result::Result<(), usize> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let n = distinct(&handled(dir));
        if n >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(n);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Which partitions each worker was ever given.
fn owned_by(dir: &Path) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (w, p) in ownership(dir, &HashMap::new()).into_keys() {
        out.entry(w).or_default().push(p);
    }
    for partitions in out.values_mut() {
        partitions.sort_unstable();
    }
    out
}

/// A static member SIGKILLed while it held every partition, restarted under
/// its id while another member joins: the restarted member takes back only
/// its share, and gives back the leases its earlier process held for the
/// other member's share. (Kept, those leases name a live member, so the
/// other member would never take them: their partitions would stand still
/// for as long as the restarted member runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_static_member_gives_back_what_its_crashed_process_held() {
    const EVENTS: usize = 400;
    let (url, client, admin, topic, group) = stream_of("static", 4).await;
    let dir = TempDir::new();

    let mut first = start_as(&url, &topic, &group, "a1", Some("a"), dir.path());
    until_owns_all(dir.path(), "a1").await;
    first.child.kill().unwrap(); // SIGKILL: its leases stay, naming `a`
    first.child.wait().unwrap();
    // The other member first, so the restarted one sees it in its first
    // round and takes only its share (`a`, dead, is live to `b` for the
    // 4 s session from when `b` first saw it; `a2` heartbeats as `a` from
    // its start on).
    let other = start(&url, &topic, &group, "b", dir.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let members = admin
            .live_members(&group, &topic, Duration::from_secs(30))
            .await
            .unwrap();
        if members.iter().any(|m| m.member != "a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other member did not heartbeat within 30 s: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _workers = [
        start_as(&url, &topic, &group, "a2", Some("a"), dir.path()),
        other,
    ];
    publish_numbered(&client, &topic, 0, EVENTS).await;

    let handled_all = handled_within(dir.path(), EVENTS).await;
    let owners = owned_by(dir.path());
    admin.delete_topic(&topic).await.unwrap();
    if let Err(n) = handled_all {
        panic!(
            "{n} of {EVENTS} events handled 40 s after the restart; partitions given: {owners:?}"
        );
    }
    assert!(
        owners.get("b").is_some_and(|p| !p.is_empty()),
        "the member that joined was given none of the partitions: {owners:?}"
    );
}

/// Two live processes under one static member id: the one that joined later
/// keeps the id and the partitions; the earlier one stops with an error, as
/// Kafka fences an older static member. (Left running, both would take the
/// id's leases as theirs and handle the same partitions at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_live_processes_under_one_static_id_the_earlier_stops() {
    const EVENTS: usize = 400;
    let (url, client, admin, topic, group) = stream_of("fence", 4).await;
    let dir = TempDir::new();

    let mut first = start_as(&url, &topic, &group, "a1", Some("a"), dir.path());
    until_owns_all(dir.path(), "a1").await;
    let mut second = start_as(&url, &topic, &group, "a2", Some("a"), dir.path());

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = first.child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let Some(status) = status else {
        let _ = second.child.kill();
        admin.delete_topic(&topic).await.unwrap();
        panic!(
            "the earlier process under member id `a` still runs 20 s after another joined as `a`"
        );
    };
    assert!(
        !status.success(),
        "the earlier process stopped, but without an error: {status}"
    );
    until_owns_all(dir.path(), "a2").await;

    publish_numbered(&client, &topic, 0, EVENTS).await;
    let handled_all = handled_within(dir.path(), EVENTS).await;
    admin.delete_topic(&topic).await.unwrap();
    if let Err(n) = handled_all {
        panic!("{n} of {EVENTS} events handled by the process that kept the id");
    }
    drop(second);
}

/// Ends a handler's run: `finished` when it ran to its end, `stopped` when
/// it was dropped before.
struct RunEnd {
    ended: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
    finished: bool,
}

impl Drop for RunEnd {
    fn drop(&mut self) {
        let how = if self.finished { "finished" } else { "stopped" };
        self.ended.lock().unwrap().push(how);
    }
}

/// The lease of a partition whose handler is still running is taken by
/// another member (here written over in the group's bucket, as a member
/// that found this one's lease expired would): the member drops the
/// partition and the handler is stopped rather than left running on
/// alongside the new owner's run of the same event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_of_a_partition_taken_away_is_stopped() {
    use std::sync::{Arc, Mutex};

    use keel_consumers::nats::JetStreamGroupConsumer;
    use keel_consumers::{ServeOptions, serve};
    use keel_core::{DeliveryInfo, Subscriber, Subscription, handler_fn};
    use keel_producers::nats::groups::{self, LeaseRecord};

    let (_, client, admin, topic, group) = stream_of("taken", 1).await;
    let js = client.jetstream().await.unwrap();
    let consumer = JetStreamGroupConsumer::connect(nats_consumer_config(client.clone()))
        .await
        .unwrap();
    let deliveries = consumer
        .subscribe(Subscription::new(topic.clone(), group.clone()))
        .await
        .unwrap();
    let started = Arc::new(Mutex::new(0usize));
    let ended = Arc::new(Mutex::new(Vec::new()));
    let (s, e) = (started.clone(), ended.clone());
    let handler = handler_fn(move |_event: Envelope, _info: DeliveryInfo| {
        let (started, ended) = (s.clone(), e.clone());
        async move {
            *started.lock().unwrap() += 1;
            let mut run = RunEnd {
                ended,
                finished: false,
            };
            tokio::time::sleep(Duration::from_secs(60)).await;
            run.finished = true;
            Ok(())
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve(
        deliveries,
        Arc::new(handler),
        ServeOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let publisher =
        JetStreamPublisher::with_context(js.clone(), JetStreamPublisherConfig::new(client.clone()));
    publisher
        .publish(&topic, Envelope::new("keel.test.Slow", "k", "slow"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while *started.lock().unwrap() == 0 {
        assert!(Instant::now() < deadline, "the handler never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let bucket = js.get_key_value(groups::BUCKET).await.unwrap();
    let taken = LeaseRecord {
        owner: Some("another-member".into()),
        resume: None,
        handed_on: None,
    };
    bucket
        .put(
            groups::lease_key(&topic, &group, 0),
            serde_json::to_vec(&taken).unwrap().into(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let outcome = loop {
        let ended = ended.lock().unwrap().clone();
        if !ended.is_empty() || Instant::now() > deadline {
            break ended;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), serving).await;
    admin.delete_topic(&topic).await.unwrap();
    assert_eq!(
        outcome,
        vec!["stopped"],
        "the handler of the partition taken away was not stopped within 10 s"
    );
}
