//! The transport conformance suite (feature `testkit`).
//!
//! One generic set of async tests that every transport must pass for the
//! features it claims in [`Capabilities`]. A transport's test file calls
//! [`conformance_tests!`](crate::conformance_tests) with an expression that
//! builds the transport, and gets one `#[tokio::test]` per case:
//!
//! ```ignore
//! keel_core::conformance_tests!(MemoryTransport::new());
//! ```
//!
//! Every case uses a fresh topic (and groups) named after itself plus a
//! random suffix, so cases run in parallel against one broker. Cases assert
//! what a user would check — every event arrived, in key order, once where
//! de-duplication is claimed — never a transport's internals. A feature the
//! transport does not claim is checked at the weaker, universal level
//! (at-least-once) instead of being skipped.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use tokio::time::timeout;

use crate::delivery::{Deliveries, Delivery};
use crate::envelope::{Envelope, EventId};
use crate::partition::partition_for_key;
use crate::transport::{StartFrom, Subscription, TopicSpec, Transport};

/// How long any single wait in the suite may take before the case fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// The event type every conformance event carries.
pub const EVENT_TYPE: &str = "keel.conformance.Numbered";

/// A unique name: `conf-<case>-<random>`, valid as a Kafka topic, a NATS
/// stream and a consumer group name.
pub fn unique_name(case: &str) -> String {
    let suffix: u64 = rand::rng().random();
    format!("conf-{case}-{suffix:016x}")
}

/// Creates a fresh topic for a case.
pub async fn fresh_topic(t: &dyn Transport, case: &str, partitions: u32) -> String {
    let name = unique_name(case);
    t.ensure_topic(&TopicSpec {
        name: name.clone(),
        partitions,
    })
    .await
    .unwrap_or_else(|e| panic!("[{}] cannot create topic {name}: {e}", t.name()));
    name
}

/// Event number `seq` of `key`: the payload is `key:seq`.
pub fn numbered(key: &str, seq: u32) -> Envelope {
    Envelope::new(EVENT_TYPE, key, format!("{key}:{seq}"))
        .with_source("conformance")
        .with_header("seq", seq.to_string())
}

/// Reads `(key, seq)` back from a numbered event's payload.
pub fn number_of(event: &Envelope) -> (String, u32) {
    let text = std::str::from_utf8(event.payload()).expect("conformance payloads are text");
    let (key, seq) = text.rsplit_once(':').expect("payload is key:seq");
    (key.to_owned(), seq.parse().expect("seq is a number"))
}

/// `keys` keys × `per_key` events, interleaved (seq-major) as a real
/// workload would be.
pub fn workload(case: &str, keys: u32, per_key: u32) -> Vec<Envelope> {
    let mut events = Vec::with_capacity((keys * per_key) as usize);
    for seq in 0..per_key {
        for k in 0..keys {
            events.push(numbered(&format!("{case}-key-{k}"), seq));
        }
    }
    events
}

/// One key per partition: `(partition, key)` found by murmur2.
pub fn key_per_partition(prefix: &str, partitions: u32) -> Vec<(u32, String)> {
    let mut found: HashMap<u32, String> = HashMap::new();
    let mut i = 0u64;
    while found.len() < partitions as usize {
        let key = format!("{prefix}-{i}");
        found
            .entry(partition_for_key(key.as_bytes(), partitions))
            .or_insert(key);
        i += 1;
    }
    let mut v: Vec<_> = found.into_iter().collect();
    v.sort();
    v
}

/// Publishes half the events one by one and half as one batch, checking
/// that every receipt names the key's murmur2 partition.
pub async fn publish_all(t: &dyn Transport, topic: &str, partitions: u32, events: Vec<Envelope>) {
    let half = events.len() / 2;
    let mut events = events;
    let batch = events.split_off(half);
    let check = |event: &Envelope, partition: u32| {
        assert_eq!(
            partition,
            partition_for_key(event.key().as_bytes(), partitions),
            "[{}] key {} went to partition {partition}, not its murmur2 partition",
            t.name(),
            event.key()
        );
    };
    for event in events {
        let receipt = t
            .publish(topic, event.clone())
            .await
            .unwrap_or_else(|e| panic!("[{}] publish failed: {e}", t.name()));
        check(&event, receipt.partition);
    }
    let receipts = t
        .publish_batch(topic, batch.clone())
        .await
        .unwrap_or_else(|e| panic!("[{}] batch publish failed: {e}", t.name()));
    assert_eq!(receipts.len(), batch.len());
    for (event, receipt) in batch.iter().zip(&receipts) {
        check(event, receipt.partition);
    }
}

async fn next(t: &dyn Transport, member: &mut Deliveries, what: &str) -> Delivery {
    match timeout(WAIT, member.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("[{}] {what}: subscription failed: {e}", t.name()),
        Ok(None) => panic!("[{}] {what}: subscription ended", t.name()),
        Err(_) => panic!("[{}] {what}: nothing delivered within {WAIT:?}", t.name()),
    }
}

async fn subscribe(t: &dyn Transport, subscription: Subscription) -> Deliveries {
    let what = format!("{}/{}", subscription.topic, subscription.group);
    t.subscribe(subscription)
        .await
        .unwrap_or_else(|e| panic!("[{}] cannot subscribe {what}: {e}", t.name()))
}

/// Waits until the members' assignments are disjoint, non-empty and cover
/// every partition.
async fn settled_assignment(t: &dyn Transport, members: &[&Deliveries], partitions: u32) {
    let deadline = tokio::time::Instant::now() + t.capabilities().rebalance_timeout + WAIT;
    loop {
        let assignments: Vec<Vec<u32>> = members.iter().map(|m| m.assignment()).collect();
        let all: Vec<u32> = assignments.iter().flatten().copied().collect();
        let distinct: BTreeSet<u32> = all.iter().copied().collect();
        if all.len() == partitions as usize
            && distinct.len() == partitions as usize
            && assignments.iter().all(|a| !a.is_empty())
        {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "[{}] assignments never settled over {partitions} partitions: {assignments:?}",
                t.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every event is delivered once to a single member and acked (every fifth
/// terminated instead, as after dead-lettering); after the member leaves and
/// rejoins, neither acked nor terminated events are delivered again. Also
/// checks that every envelope field survives the trip.
pub async fn every_event_delivered_and_acked(t: &dyn Transport) {
    let partitions = 4;
    let topic = fresh_topic(t, "acked", partitions).await;
    let group = unique_name("acked-g");
    // Every seventh event carries two headers twice each, interleaved (as
    // Kafka and NATS allow): every value must arrive.
    let events: Vec<Envelope> = workload("acked", 20, 20)
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            if i % 7 == 0 {
                e.with_added_header("x-hop", "gateway")
                    .with_added_header("x-via", "1")
                    .with_added_header("x-hop", "orders")
                    .with_added_header("x-via", "2")
            } else {
                e
            }
        })
        .collect();
    let mut by_id: HashMap<EventId, Envelope> =
        events.iter().map(|e| (e.id(), e.clone())).collect();
    publish_all(t, &topic, partitions, events).await;

    let mut member = subscribe(t, Subscription::new(&topic, &group)).await;
    let total = by_id.len();
    for n in 0..total {
        let d = next(t, &mut member, &format!("event {n} of {total}")).await;
        let sent = by_id
            .remove(&d.envelope().id())
            .unwrap_or_else(|| panic!("[{}] unexpected or duplicate delivery {d:?}", t.name()));
        assert_eq!(
            d.envelope(),
            &sent,
            "[{}] the event changed in transit",
            t.name()
        );
        assert_eq!(d.info().attempt, 1);
        assert_eq!(d.info().coordinates.topic, topic);
        if n % 5 == 0 {
            assert!(d.term(), "term settles");
            assert!(!d.ack(), "an ack after term is a no-op");
        } else {
            assert!(d.ack(), "first ack settles");
            assert!(!d.ack(), "second ack is a no-op");
        }
    }
    member.leave().await.expect("graceful leave");

    // Acked (or terminated) means committed: a rejoining member sees only
    // newer events. One marker per partition — an uncommitted older event
    // would precede it.
    let markers: HashSet<EventId> = {
        let mut ids = HashSet::new();
        for (_, key) in key_per_partition(&format!("{topic}-marker"), partitions) {
            let e = numbered(&key, 0);
            ids.insert(e.id());
            t.publish(&topic, e).await.expect("publish marker");
        }
        ids
    };
    let mut member = subscribe(t, Subscription::new(&topic, &group)).await;
    let mut seen = HashSet::new();
    while seen.len() < markers.len() {
        let d = next(t, &mut member, "markers after rejoin").await;
        assert!(
            markers.contains(&d.envelope().id()),
            "[{}] acked or terminated event {:?} was delivered again after rejoining",
            t.name(),
            d.envelope().key()
        );
        seen.insert(d.envelope().id());
        d.ack();
    }
    member.leave().await.expect("graceful leave");
}

/// Deliveries are handled concurrently (random handler times) and still,
/// per key, in publish order with at most one handler per key at a time.
pub async fn per_key_order_under_parallel_consumption(t: &dyn Transport) {
    if !t.capabilities().per_key_order {
        return every_event_delivered_and_acked(t).await;
    }
    let partitions = 2;
    let topic = fresh_topic(t, "order", partitions).await;
    let events = workload("order", 24, 25);
    let total = events.len();
    publish_all(t, &topic, partitions, events).await;

    let mut member = subscribe(
        t,
        Subscription::new(&topic, unique_name("order-g")).max_in_flight(64),
    )
    .await;
    let handled: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let active_keys: Arc<Mutex<HashSet<String>>> = Arc::default();
    let active = Arc::new(AtomicUsize::new(0));
    let max_active = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    while tasks.len() < total {
        let d = next(t, &mut member, "ordered events").await;
        let (handled, active_keys, active, max_active, done) = (
            handled.clone(),
            active_keys.clone(),
            active.clone(),
            max_active.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (key, seq) = number_of(d.envelope());
            assert!(
                active_keys.lock().unwrap().insert(key.clone()),
                "two handlers ran for key {key} at once"
            );
            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
            max_active.fetch_max(now, Ordering::SeqCst);
            handled
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_default()
                .push(seq);
            let pause = rand::rng().random_range(0..4);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            active.fetch_sub(1, Ordering::SeqCst);
            active_keys.lock().unwrap().remove(&key);
            d.ack();
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    for task in tasks {
        task.await.expect("handler task");
    }
    member.leave().await.expect("graceful leave");

    let handled = handled.lock().unwrap();
    assert_eq!(handled.len(), 24);
    for (key, seqs) in handled.iter() {
        let expected: Vec<u32> = (0..25).collect();
        assert_eq!(
            seqs,
            &expected,
            "[{}] key {key} handled out of order",
            t.name()
        );
    }
    assert!(
        max_active.load(Ordering::SeqCst) > 1,
        "[{}] handlers never overlapped: the test proved nothing about parallelism",
        t.name()
    );
}

/// What a group handled, checked as a user would: every event's *first*
/// handling comes in key order (a re-delivery may repeat a handled event,
/// never skip ahead of an unhandled one).
#[derive(Default)]
struct HandledLog {
    first: HashSet<EventId>,
    next_seq: HashMap<String, u32>,
    /// Events handled again, in the order seen.
    repeats: Vec<EventId>,
}

impl HandledLog {
    fn handle(&mut self, t: &dyn Transport, d: &Delivery) {
        let (key, seq) = number_of(d.envelope());
        if !self.first.insert(d.envelope().id()) {
            self.repeats.push(d.envelope().id());
        } else {
            let expected = self.next_seq.entry(key.clone()).or_insert(0);
            assert_eq!(
                seq,
                *expected,
                "[{}] key {key}: event {seq} handled before event {expected}",
                t.name()
            );
            *expected += 1;
        }
        d.ack();
    }
}

/// Two members split the partitions; `depart` takes member A away mid-run
/// while it holds deliveries it never settled; B takes over every partition
/// and nothing is lost. Only events A handled may come again, each once.
async fn hand_over(t: &dyn Transport, case: &str, graceful: bool) {
    if !t.capabilities().consumer_groups {
        return every_event_delivered_and_acked(t).await;
    }
    let partitions = 4;
    let topic = fresh_topic(t, case, partitions).await;
    let group = unique_name(&format!("{case}-g"));
    let mut a = subscribe(t, Subscription::new(&topic, &group).max_in_flight(16)).await;
    let mut b = subscribe(t, Subscription::new(&topic, &group).max_in_flight(16)).await;
    settled_assignment(t, &[&a, &b], partitions).await;

    let events = workload(case, 40, 25);
    let total = events.len();
    let ids: HashSet<EventId> = events.iter().map(|e| e.id()).collect();
    publish_all(t, &topic, partitions, events).await;

    let mut log = HandledLog::default();
    let (mut a_received, mut b_before) = (0usize, 0usize);
    let (mut a_held, mut a_handled) = (Vec::new(), HashSet::new());
    while a_received < 30 {
        tokio::select! {
            d = next(t, &mut a, "member A") => {
                a_received += 1;
                if a_received % 3 == 0 {
                    a_held.push(d);
                } else {
                    a_handled.insert(d.envelope().id());
                    log.handle(t, &d);
                }
            }
            d = next(t, &mut b, "member B") => {
                b_before += 1;
                log.handle(t, &d);
            }
        }
    }
    if graceful {
        a.leave().await.expect("graceful leave");
        drop(a_held); // late nacks of a departed member are ignored
    } else {
        drop(a); // a crash: no leave, no settling
        drop(a_held);
    }

    while log.first.len() < total {
        let d = next(t, &mut b, "member B after A left").await;
        log.handle(t, &d);
    }
    let after = b.assignment();
    b.leave().await.expect("graceful leave");

    assert_eq!(
        log.first,
        ids,
        "[{}] events lost in the hand-over",
        t.name()
    );
    assert!(
        b_before > 0,
        "[{}] B got no work while A was a member",
        t.name()
    );
    assert_eq!(
        after,
        (0..partitions).collect::<Vec<_>>(),
        "[{}] B did not take over",
        t.name()
    );
    // Only what A handled may come again (B's next owner is B itself), and
    // each at most once: what A held unsettled is a first handling by B.
    let repeats: HashSet<EventId> = log.repeats.iter().copied().collect();
    assert_eq!(
        repeats.len(),
        log.repeats.len(),
        "[{}] an event came again more than once: {:?}",
        t.name(),
        log.repeats
    );
    let not_a: Vec<&EventId> = repeats.difference(&a_handled).collect();
    assert!(
        not_a.is_empty(),
        "[{}] {} events A never handled came again (of {} repeats): {not_a:?}",
        t.name(),
        not_a.len(),
        log.repeats.len()
    );
}

/// A member leaves gracefully mid-run holding unsettled deliveries; the
/// other takes over every partition with nothing lost.
pub async fn member_leaving_hands_over(t: &dyn Transport) {
    hand_over(t, "leave", true).await;
}

/// A member disappears without leaving (its stream dropped, nothing
/// settled); the other takes over every partition with nothing lost.
pub async fn crashed_member_hands_over(t: &dyn Transport) {
    hand_over(t, "crash", false).await;
}

/// A member that settled everything it read leaves at once, though the
/// transport had dispatched more it never read (settling each read one
/// hands out the next): those are given back, not waited for until the
/// drain timeout (10 s by default; the suite's broker transports use 5 s,
/// and leaving takes 0.01–0.1 s with nothing in a handler), and the next
/// member gets every event not acked.
pub async fn leave_gives_back_unread_deliveries(t: &dyn Transport) {
    let case = "unread";
    let partitions = 2;
    let topic = fresh_topic(t, case, partitions).await;
    let group = unique_name(&format!("{case}-g"));
    let events = workload(case, 10, 10);
    let ids: HashSet<EventId> = events.iter().map(|e| e.id()).collect();
    publish_all(t, &topic, partitions, events).await;

    let subscription = || {
        Subscription::new(&topic, &group)
            .start_from(StartFrom::Earliest)
            .max_in_flight(8)
    };
    let mut a = subscribe(t, subscription()).await;
    let mut log = HandledLog::default();
    let mut acked = HashSet::new();
    for _ in 0..8 {
        let d = next(t, &mut a, "member A").await;
        log.handle(t, &d);
        acked.insert(d.envelope().id());
        d.ack();
    }
    let started = std::time::Instant::now();
    a.leave().await.expect("graceful leave");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "[{}] leaving with only unread deliveries out took {took:?}: it waited for them",
        t.name()
    );

    let mut b = subscribe(t, subscription()).await;
    let rest: HashSet<EventId> = ids.difference(&acked).copied().collect();
    let mut seen = HashSet::new();
    while !rest.is_subset(&seen) {
        let d = next(t, &mut b, "member B").await;
        seen.insert(d.envelope().id());
        d.ack();
    }
    b.leave().await.expect("graceful leave");
}

/// A nacked delivery comes back (attempt 2, after its delay) before any
/// later event of its key, while other keys keep flowing.
pub async fn nack_redelivers(t: &dyn Transport) {
    if !t.capabilities().redelivery_after_nack {
        return every_event_delivered_and_acked(t).await;
    }
    let topic = fresh_topic(t, "nack", 1).await;
    let events = vec![
        numbered("a", 0),
        numbered("a", 1),
        numbered("b", 0),
        numbered("b", 1),
    ];
    for e in &events {
        t.publish(&topic, e.clone()).await.expect("publish");
    }
    let mut member = subscribe(t, Subscription::new(&topic, unique_name("nack-g"))).await;
    let mut log: Vec<(String, u32, u32)> = Vec::new();
    let mut nacked_once = false;
    while log.iter().filter(|(_, _, attempt)| *attempt > 0).count() < 4 {
        let d = next(t, &mut member, "nack/redelivery").await;
        let (key, seq) = number_of(d.envelope());
        if key == "a" && seq == 0 && !nacked_once {
            nacked_once = true;
            assert_eq!(d.info().attempt, 1);
            // Long enough that a loaded machine reads key b's two events
            // within it: b must not wait for a's re-delivery.
            assert!(d.nack_with_delay(Duration::from_secs(2)));
            assert!(!d.ack(), "ack after nack is a no-op");
            log.push((key, seq, 0));
            continue;
        }
        log.push((key, seq, d.info().attempt));
        d.ack();
    }
    member.leave().await.expect("graceful leave");
    let a: Vec<_> = log.iter().filter(|(k, _, _)| k == "a").cloned().collect();
    assert_eq!(
        a,
        vec![("a".into(), 0, 0), ("a".into(), 0, 2), ("a".into(), 1, 1)],
        "[{}] a:0 must come back (attempt 2) before a:1",
        t.name()
    );
    let b: Vec<_> = log
        .iter()
        .filter(|(k, _, _)| k == "b")
        .map(|(_, s, _)| *s)
        .collect();
    assert_eq!(b, vec![0, 1], "[{}] key b", t.name());
    let redelivery = log.iter().position(|e| *e == ("a".into(), 0, 2));
    let b_done = log.iter().position(|e| *e == ("b".into(), 1, 1));
    assert!(
        b_done < redelivery,
        "[{}] key b waited for key a's delayed re-delivery: {log:?}",
        t.name()
    );
}

/// The same event id published twice is handled once where de-duplication
/// is claimed, and at least once everywhere.
pub async fn same_event_id_twice(t: &dyn Transport) {
    let topic = fresh_topic(t, "dedup", 1).await;
    let event = numbered("k", 0);
    let first = t.publish(&topic, event.clone()).await.expect("publish");
    let second = t
        .publish(&topic, event.clone())
        .await
        .expect("publish again");
    let marker = numbered("k", 1);
    t.publish(&topic, marker.clone())
        .await
        .expect("publish marker");
    if t.capabilities().publish_dedup {
        assert!(
            second.duplicate,
            "[{}] second publish not flagged duplicate",
            t.name()
        );
        assert_eq!(second.position, first.position);
    }
    let mut member = subscribe(t, Subscription::new(&topic, unique_name("dedup-g"))).await;
    let mut copies = 0;
    loop {
        let d = next(t, &mut member, "dedup").await;
        d.ack();
        if d.envelope().id() == marker.id() {
            break;
        }
        assert_eq!(d.envelope().id(), event.id());
        copies += 1;
    }
    member.leave().await.expect("graceful leave");
    if t.capabilities().publish_dedup {
        assert_eq!(
            copies,
            1,
            "[{}] duplicate publish was delivered twice",
            t.name()
        );
    } else {
        assert!(copies >= 1, "[{}] event lost", t.name());
    }
}

/// A new group reads everything published before it existed (Earliest);
/// a group starting at Latest sees only what follows its assignment; one
/// starting at a time sees only what was stored after it.
pub async fn replay_from_start(t: &dyn Transport) {
    if !t.capabilities().replay_from_start {
        return every_event_delivered_and_acked(t).await;
    }
    let partitions = 2;
    let topic = fresh_topic(t, "replay", partitions).await;
    let old = workload("replay-old", 5, 10);
    let old_ids: HashSet<EventId> = old.iter().map(|e| e.id()).collect();
    publish_all(t, &topic, partitions, old).await;

    let mut earliest = subscribe(t, Subscription::new(&topic, unique_name("replay-e"))).await;
    let mut seen = HashSet::new();
    while seen.len() < old_ids.len() {
        let d = next(t, &mut earliest, "replay from earliest").await;
        assert!(old_ids.contains(&d.envelope().id()));
        seen.insert(d.envelope().id());
        d.ack();
    }
    earliest.leave().await.expect("graceful leave");

    let mut latest = subscribe(
        t,
        Subscription::new(&topic, unique_name("replay-l")).start_from(StartFrom::Latest),
    )
    .await;
    settled_assignment(t, &[&latest], partitions).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let new = workload("replay-new", 5, 2);
    let new_ids: HashSet<EventId> = new.iter().map(|e| e.id()).collect();
    publish_all(t, &topic, partitions, new).await;
    read_only(
        t,
        &mut latest,
        &new_ids,
        "events after a Latest start",
        "a Latest group got an event published before it joined",
    )
    .await;
    latest.leave().await.expect("graceful leave");

    // From a point in time: exactly what was stored after it.
    let mut from_time = subscribe(
        t,
        Subscription::new(&topic, unique_name("replay-t")).start_from(StartFrom::Timestamp(cut)),
    )
    .await;
    read_only(
        t,
        &mut from_time,
        &new_ids,
        "events after the start time",
        "a group starting at a time got an event stored before it",
    )
    .await;
    from_time.leave().await.expect("graceful leave");

    // From a time after every stored event: what follows, not a replay of
    // the whole partition (the answer of a broker that has no offset for
    // such a time must read as the end).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after_all = chrono::Utc::now();
    let mut from_later = subscribe(
        t,
        Subscription::new(&topic, unique_name("replay-f"))
            .start_from(StartFrom::Timestamp(after_all)),
    )
    .await;
    // Far in the future (a mistyped year; past 2262 a count of
    // nanoseconds since 1970 no longer fits 64 bits): the end too, not a
    // wrapped time that replays everything.
    let far = chrono::DateTime::parse_from_rfc3339("3000-01-01T00:00:00Z")
        .expect("a valid time")
        .to_utc();
    let mut from_future = subscribe(
        t,
        Subscription::new(&topic, unique_name("replay-ff")).start_from(StartFrom::Timestamp(far)),
    )
    .await;
    settled_assignment(t, &[&from_later], partitions).await;
    settled_assignment(t, &[&from_future], partitions).await;
    let newest = workload("replay-newest", 3, 2);
    let newest_ids: HashSet<EventId> = newest.iter().map(|e| e.id()).collect();
    publish_all(t, &topic, partitions, newest).await;
    for (member, what) in [
        (&mut from_later, "past the last event"),
        (&mut from_future, "in the year 3000"),
    ] {
        read_only(
            t,
            member,
            &newest_ids,
            &format!("events after a start time {what}"),
            &format!("a group starting at a time {what} got an event stored before its start"),
        )
        .await;
    }
    from_later.leave().await.expect("graceful leave");
    from_future.leave().await.expect("graceful leave");
}

/// Reads `member` (acking) until it delivered every event of `ids`; any
/// other event fails the test with `stray`.
async fn read_only(
    t: &dyn Transport,
    member: &mut Deliveries,
    ids: &HashSet<EventId>,
    what: &str,
    stray: &str,
) {
    let mut seen = HashSet::new();
    while seen.len() < ids.len() {
        let d = next(t, member, what).await;
        assert!(ids.contains(&d.envelope().id()), "[{}] {stray}", t.name());
        seen.insert(d.envelope().id());
        d.ack();
    }
}

/// Members of one group split the partitions and never receive an event
/// from a partition they do not own; a second group gets every event too.
pub async fn groups_split_partitions_and_fan_out(t: &dyn Transport) {
    if !t.capabilities().consumer_groups {
        return every_event_delivered_and_acked(t).await;
    }
    let partitions = 4;
    let topic = fresh_topic(t, "split", partitions).await;
    let group = unique_name("split-g");
    let mut a = subscribe(t, Subscription::new(&topic, &group)).await;
    let mut b = subscribe(t, Subscription::new(&topic, &group)).await;
    settled_assignment(t, &[&a, &b], partitions).await;
    let (owned_a, owned_b) = (a.assignment(), b.assignment());
    let events = workload("split", 30, 4);
    let ids: HashSet<EventId> = events.iter().map(|e| e.id()).collect();
    publish_all(t, &topic, partitions, events).await;

    let mut seen = HashSet::new();
    while seen.len() < ids.len() {
        let (who, owned, d) = tokio::select! {
            d = next(t, &mut a, "member A") => ("A", &owned_a, d),
            d = next(t, &mut b, "member B") => ("B", &owned_b, d),
        };
        assert!(
            owned.contains(&d.info().coordinates.partition),
            "[{}] member {who} got partition {} but owns {owned:?}",
            t.name(),
            d.info().coordinates.partition
        );
        assert!(
            seen.insert(d.envelope().id()),
            "[{}] delivered to both members",
            t.name()
        );
        d.ack();
    }
    a.leave().await.expect("leave");
    b.leave().await.expect("leave");

    let mut other = subscribe(t, Subscription::new(&topic, unique_name("split-other"))).await;
    let mut seen = HashSet::new();
    while seen.len() < ids.len() {
        let d = next(t, &mut other, "second group").await;
        seen.insert(d.envelope().id());
        d.ack();
    }
    other.leave().await.expect("leave");
}

/// Runs a case against a transport built by `make` (used by the macro).
pub async fn run<T, F, C, Fut>(make: F, case: C)
where
    T: Transport + 'static,
    F: Future<Output = T>,
    C: FnOnce(Arc<dyn Transport>) -> Fut,
    Fut: Future<Output = ()>,
{
    let transport: Arc<dyn Transport> = Arc::new(make.await);
    case(transport).await;
}

/// Generates one `#[tokio::test]` per conformance case for the transport
/// built by `$make` (an expression, evaluated per test; it may be `async`
/// by ending in `.await` inside a block).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@case $make,
            every_event_delivered_and_acked,
            per_key_order_under_parallel_consumption,
            member_leaving_hands_over,
            crashed_member_hands_over,
            leave_gives_back_unread_deliveries,
            nack_redelivers,
            same_event_id_twice,
            replay_from_start,
            groups_split_partitions_and_fan_out
        );
    };
    (@case $make:expr, $($case:ident),+) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $crate::testkit::run(async { $make }, |t| async move {
                        $crate::testkit::$case(&*t).await
                    })
                    .await;
                }
            )+
        }
    };
}
