//! The transactional outbox and inbox against real PostgreSQL, Kafka
//! (tansu) and NATS JetStream: committed events are published, rolled-back
//! ones never, nothing is skipped when transactions commit out of id order,
//! keys keep their commit order, refused rows are parked, lost database
//! connections are survived, and the inbox applies an effect once.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{Envelope, Publisher, StartFrom, Subscriber, Subscription, TopicAdmin, TopicSpec};
use keel_integration_tests::outbox::{
    RunningRelay, SEQ_EVENT, WriterPlan, Writes, Written, assert_duplicates_explained, consume,
    new_topic, outbox, outbox_database, read_and_check, relay_config, steady_relay_config,
    unpublished, write,
};
use keel_integration_tests::{
    TestDatabase, eventually, kafka_transport, nats_transport, unique_name,
};
use keel_producers::outbox::{
    Inbox, OutboxError, OutboxRelay, OutboxTables, RelayConfig, RelayStats,
};
use tokio::sync::watch;

/// 8 writers, 50,000 events over 200 keys, transactions of 1–8 events held
/// open up to 20 ms, 10 % rolled back: later ids routinely commit first.
const PLAN: WriterPlan = WriterPlan {
    writers: 8,
    events: 50_000,
    keys: 200,
    max_per_tx: 8,
    max_hold: Duration::from_millis(20),
    rollback: 0.1,
};

/// Runs the default outbox's relay in this process.
fn start_relay(pool: &sqlx::PgPool, publisher: Arc<dyn Publisher>, relay_id: &str) -> RunningRelay {
    RunningRelay::spawn(
        OutboxRelay::new(
            pool.clone(),
            OutboxTables::default(),
            publisher,
            steady_relay_config(relay_id, 500),
        )
        .unwrap(),
    )
}

/// Enqueues `events` to `topic` in one committed transaction.
async fn enqueue_committed(
    pool: &sqlx::PgPool,
    outbox: &keel_producers::outbox::Outbox,
    topic: &str,
    events: &[&Envelope],
) {
    let rows: Vec<(&str, &Envelope)> = events.iter().map(|e| (topic, *e)).collect();
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_batch(&mut tx, &rows).await.unwrap();
    tx.commit().await.unwrap();
}

async fn wait_for(
    stats: &mut watch::Receiver<RelayStats>,
    what: &str,
    pred: impl Fn(&RelayStats) -> bool,
) {
    let reached = tokio::time::timeout(Duration::from_secs(60), stats.wait_for(|s| pred(s)))
        .await
        .is_ok();
    assert!(
        reached,
        "relay never reached: {what}; stats: {:?}",
        *stats.borrow()
    );
}

async fn published_set_equals_committed_set<T>(transport: Arc<T>, partitions: u32)
where
    T: Publisher + Subscriber + TopicAdmin + 'static,
{
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let topic = new_topic(transport.as_ref(), "outbox", partitions).await;
    // The relay runs while the writers write: it sees rows commit out of
    // id order all the time.
    let RunningRelay {
        stop,
        mut stats,
        task: relay,
    } = start_relay(db.pool(), transport.clone(), "relay-a");
    let writes = write(db.pool(), &outbox(&tables), &topic, PLAN).await;
    assert!(
        writes.committed.len() > 40_000,
        "{}",
        writes.committed.len()
    );
    assert!(!writes.rolled_back.is_empty());
    let duplicates =
        read_and_check(transport.as_ref(), &topic, &writes, Duration::from_secs(2)).await;
    // One relay that never crashed publishes each row once, unless a
    // publish it saw fail had landed.
    assert_duplicates_explained(duplicates, &[&stats.borrow()], 500);
    wait_for(&mut stats, "an empty backlog", |s| s.backlog == 0).await;
    assert_eq!(unpublished(db.pool(), &tables).await, 0);
    assert_eq!(stats.borrow().published as usize, writes.committed.len());
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_gets_every_committed_event_once_in_key_order_and_no_rolled_back_one() {
    published_set_equals_committed_set(Arc::new(kafka_transport().await), 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_gets_every_committed_event_once_in_key_order_and_no_rolled_back_one() {
    let transport = Arc::new(nats_transport().await);
    published_set_equals_committed_set(transport, 8).await;
}

#[tokio::test]
async fn typed_events_are_encoded_at_enqueue_and_published_only_on_commit() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(kafka_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-typed", 2).await;
    let outbox = outbox(&tables);
    let order = keel_schemas::testdata::order_placed();

    let mut tx = db.pool().begin().await.unwrap();
    let kept = outbox
        .enqueue_event(&mut tx, &topic, order.order_id.to_string(), &order)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    outbox
        .enqueue_event(&mut tx, &topic, "rolled-back", &order)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // A follow-up event carries its cause.
    let cause = Envelope::new("x", "k", "").with_correlation_id("flow-1");
    let follow_up = outbox
        .envelope(&topic, order.order_id.to_string(), &order)
        .await
        .unwrap()
        .caused_by(&cause)
        .with_source("orders")
        .with_header("tenant", "acme")
        // A header given twice (as an event read from a broker may carry
        // it) keeps both values through the outbox.
        .with_added_header("x-hop", "gateway")
        .with_added_header("x-hop", "orders");
    let mut tx = db.pool().begin().await.unwrap();
    outbox.enqueue(&mut tx, &topic, &follow_up).await.unwrap();
    // The same event id twice is refused, naming it.
    let again = outbox
        .enqueue(&mut tx, &topic, &follow_up)
        .await
        .unwrap_err();
    assert!(
        matches!(again, OutboxError::DuplicateEvent(id) if id == follow_up.id()),
        "{again}"
    );
    tx.rollback().await.unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    outbox.enqueue(&mut tx, &topic, &follow_up).await.unwrap();
    tx.commit().await.unwrap();

    let RunningRelay {
        stop,
        stats: _,
        task: relay,
    } = start_relay(db.pool(), transport.clone(), "relay-typed");
    let expected: HashSet<_> = [kept, follow_up.id()].into();
    let seen = consume(
        transport.as_ref(),
        &topic,
        &expected,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    // Exactly the committed events (the rolled-back one never); a copy
    // more of them is at-least-once (tansu has been seen storing a
    // retried produce request twice), not what this test is about.
    let ids: HashSet<_> = seen.iter().map(|e| e.id()).collect();
    assert_eq!(ids, expected, "{seen:?}");
    let first = seen.iter().find(|e| e.id() == kept).unwrap();
    assert_eq!(first.event_type(), "shop.orders.OrderPlaced");
    let decoded: keel_schemas::events::OrderPlaced =
        outbox.codec().decode(first.payload()).await.unwrap();
    assert_eq!(decoded, order);
    let published = seen.iter().find(|e| e.id() == follow_up.id()).unwrap();
    assert_eq!(
        published, &follow_up,
        "every field of the envelope survives the outbox"
    );
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
}

/// The relay's publisher, counting per event id how often the relay had
/// it sent (an event the publisher reports as not sent is not counted).
struct Counting {
    inner: keel_producers::kafka::KafkaPublisher,
    sent: std::sync::Mutex<std::collections::HashMap<keel_core::EventId, usize>>,
}

impl Counting {
    fn count(&self, events: &[Envelope], sent: Option<&[keel_core::Sent]>) {
        let mut counts = self.sent.lock().unwrap();
        for (i, event) in events.iter().enumerate() {
            if !matches!(sent.and_then(|s| s.get(i)), Some(keel_core::Sent::NotSent)) {
                *counts.entry(event.id()).or_default() += 1;
            }
        }
    }
}

#[async_trait::async_trait]
impl Publisher for Counting {
    async fn publish(&self, topic: &str, event: Envelope) -> keel_core::Result<keel_core::Receipt> {
        self.count(std::slice::from_ref(&event), None);
        self.inner.publish(topic, event).await
    }

    async fn publish_batch(
        &self,
        topic: &str,
        events: Vec<Envelope>,
    ) -> keel_core::Result<Vec<keel_core::Receipt>> {
        self.count(&events, None);
        self.inner.publish_batch(topic, events).await
    }

    async fn publish_each(
        &self,
        topic: &str,
        events: Vec<Envelope>,
        within: Duration,
    ) -> Vec<keel_core::Sent> {
        let outcomes = self.inner.publish_each(topic, events.clone(), within).await;
        self.count(&events, Some(&outcomes));
        outcomes
    }

    async fn publish_record(
        &self,
        topic: &str,
        record: keel_core::RawRecord,
    ) -> keel_core::Result<keel_core::Receipt> {
        self.inner.publish_record(topic, record).await
    }
}

/// A row the Kafka client refuses (larger than its `message.max.bytes`)
/// stops the publisher's batch at that row. The rows the broker
/// acknowledged before it are sent once: not again with the rest of the
/// batch, nor with each retry of the refused row. (Counted as the relay
/// sends them: tansu, unlike Kafka, may store a retried produce request
/// of librdkafka's twice, so the log's length would not show it.)
#[tokio::test]
async fn rows_acknowledged_beside_a_refused_row_are_published_once() {
    use keel_producers::kafka::{KafkaClientConfig, KafkaPublisher, KafkaPublisherConfig};
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = kafka_transport().await;
    let topic = new_topic(&transport, "outbox-beside", 1).await;
    let mut client = KafkaClientConfig::new([keel_integration_tests::kafka_bootstrap().await]);
    client
        .librdkafka
        .insert("message.max.bytes".into(), "20000".into());
    let publisher = Arc::new(Counting {
        inner: KafkaPublisher::new(KafkaPublisherConfig {
            client,
            ..KafkaPublisherConfig::default()
        })
        .unwrap(),
        sent: Default::default(),
    });
    // The producer's first send to a new topic waits for its metadata,
    // which can take a good part of a publish timeout on tansu: done once
    // here, outside the count.
    let warm_up = Envelope::new("t", "w", "warm-up");
    publisher
        .inner
        .publish(&topic, warm_up.clone())
        .await
        .unwrap();
    let outbox = outbox(&tables);
    let first = Envelope::new("t", "a", "first");
    let second = Envelope::new("t", "b", "second");
    let huge = Envelope::new("t", "k", vec![b'x'; 50_000]);
    let third = Envelope::new("t", "c", "third");
    let after = Envelope::new("t", "k", "after");
    enqueue_committed(
        db.pool(),
        &outbox,
        &topic,
        &[&first, &second, &huge, &third, &after],
    )
    .await;

    let RunningRelay {
        stop,
        mut stats,
        task: relay,
    } = start_relay(db.pool(), publisher.clone(), "relay-beside");
    wait_for(&mut stats, "the huge row parked, the others out", |s| {
        s.parked == 1 && s.backlog == 1 && s.published == 3
    })
    .await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    let sent = publisher.sent.lock().unwrap().clone();
    assert_eq!(
        [first.id(), second.id(), third.id(), huge.id()].map(|id| sent.get(&id).copied()),
        [Some(1), Some(1), Some(1), Some(5)],
        "each acknowledged row sent once, the refused one once per attempt: {sent:?}"
    );
    assert_eq!(sent.get(&after.id()), None, "the held-back row never sent");
    let expected: HashSet<_> = [warm_up.id(), first.id(), second.id(), third.id()].into();
    let seen = consume(
        &transport,
        &topic,
        &expected,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    assert!(
        seen.iter().all(|e| expected.contains(&e.id())),
        "only the acknowledged rows"
    );
}

/// Relays of one outbox must split it into the same number of slots (a
/// key's slot is `key_hash % slots`): one with another count is refused
/// while the others live, and a relay whose outbox was re-split under it
/// (by a relay with another count, once its heartbeat had gone stale)
/// stops instead of publishing under the old mapping.
#[tokio::test]
async fn relays_splitting_the_outbox_differently_never_run_together() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport: Arc<dyn Publisher> = Arc::new(nats_transport().await);
    let RunningRelay {
        stop,
        mut stats,
        task: first,
    } = start_relay(db.pool(), transport.clone(), "relay-sixteen");
    wait_for(&mut stats, "the first relay holding slots", |s| {
        !s.slots.is_empty()
    })
    .await;
    let other = OutboxRelay::new(
        db.pool().clone(),
        OutboxTables::default(),
        transport.clone(),
        RelayConfig {
            slots: 8,
            ..relay_config("relay-eight", 500)
        },
    )
    .unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        other.run(std::future::pending::<()>()),
    )
    .await
    .expect("the second relay stops at once")
    .unwrap_err()
    .to_string();
    assert!(refused.contains("relay.slots"), "{refused}");
    assert!(!first.is_finished(), "the first relay goes on");
    // The re-split another count makes once no live relay is seen.
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("DELETE FROM keel.outbox_leases")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO keel.outbox_leases (slot) SELECT generate_series(0, 7)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("the first relay stops after the re-split")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(stopped.contains("relay.slots"), "{stopped}");
    let owners: i64 =
        sqlx::query_scalar("SELECT count(*) FROM keel.outbox_leases WHERE owner IS NOT NULL")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(
        owners, 0,
        "no lease of the new split taken under the old one"
    );
    drop(stop);
}

/// A relay with another slot count does not re-split the outbox while
/// another process under its own relay id runs, nor while a relay whose
/// heartbeat went stale (a stall) still trusts its leases: either would
/// publish keys under the old mapping while the re-split one publishes them
/// under the new.
#[tokio::test]
async fn a_re_split_waits_for_every_live_process_and_every_running_lease() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport: Arc<dyn Publisher> = Arc::new(nats_transport().await);
    let first = start_relay(db.pool(), transport.clone(), "split");
    let mut stats = first.stats.clone();
    wait_for(&mut stats, "the first relay holding slots", |s| {
        !s.slots.is_empty()
    })
    .await;
    let eight = |id: &str| {
        OutboxRelay::new(
            db.pool().clone(),
            OutboxTables::default(),
            transport.clone(),
            RelayConfig {
                slots: 8,
                ..relay_config(id, 500)
            },
        )
        .unwrap()
    };
    let refused = |outcome: Result<Result<(), OutboxError>, _>, what: &str| {
        let refused = outcome
            .unwrap_or_else(|_| panic!("{what}: the relay with 8 slots ran on (it re-split)"))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("relay.slots"), "{what}: {refused}");
    };
    // Another process under the same relay id, with another count.
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        eight("split").run(std::future::pending::<()>()),
    )
    .await;
    refused(outcome, "same relay id");
    // The first process stalls: its heartbeat goes stale while the leases
    // it renewed last still run.
    let stop = stall(db.pool(), first, "1 minute").await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        eight("another").run(std::future::pending::<()>()),
    )
    .await;
    refused(outcome, "stale heartbeat, running leases");
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.outbox_leases")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(slots, 16, "the outbox was re-split");
    drop(stop);
}

/// Stops `relay` as a stall looks from the database: its heartbeat an hour
/// old while the leases it holds still run for `leases_run_for` (an SQL
/// interval). Returns its stop handle.
async fn stall(
    pool: &sqlx::PgPool,
    relay: RunningRelay,
    leases_run_for: &str,
) -> watch::Sender<bool> {
    relay.task.abort();
    let _ = relay.task.await;
    sqlx::query(&format!(
        "UPDATE keel.outbox_leases SET expires_at = clock_timestamp() + interval '{leases_run_for}' \
         WHERE owner IS NOT NULL"
    ))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE keel.outbox_relays SET heartbeat_at = clock_timestamp() - interval '1 hour'",
    )
    .execute(pool)
    .await
    .unwrap();
    relay.stop
}

#[tokio::test]
async fn a_row_the_broker_refuses_is_parked_and_holds_its_key_until_discarded() {
    use keel_producers::nats::{JetStreamAdmin, NatsClientConfig, StreamSettings};
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(nats_transport().await);
    let topic = unique_name("outbox-park");
    let admin = JetStreamAdmin::connect(&NatsClientConfig::new(
        keel_integration_tests::nats_url().await,
    ))
    .await
    .unwrap();
    admin
        .ensure_stream(
            &TopicSpec {
                name: topic.clone(),
                partitions: 1,
            },
            &StreamSettings {
                max_message_size: Some(4096),
                ..StreamSettings::default()
            },
        )
        .await
        .unwrap();
    let outbox = outbox(&tables);
    let before = Envelope::new("t", "k", "before");
    let huge = Envelope::new("t", "k", vec![b'x'; 10_000]);
    let after = Envelope::new("t", "k", "after");
    let other = Envelope::new("t", "other-key", "other");
    enqueue_committed(
        db.pool(),
        &outbox,
        &topic,
        &[&before, &huge, &after, &other],
    )
    .await;

    let RunningRelay {
        stop,
        mut stats,
        task: relay,
    } = start_relay(db.pool(), transport.clone(), "relay-park");
    // Another key is not held up by the refused row: it goes out with the
    // first attempt's round.
    wait_for(&mut stats, "the other key published", |s| s.published >= 1).await;
    let other_state: (bool, i32) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM keel.outbox_archive WHERE event_id = $1), \
         (SELECT attempts FROM keel.outbox WHERE event_id = $2)",
    )
    .bind(other.id().as_uuid())
    .bind(huge.id().as_uuid())
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(other_state.0);
    // Parked: its key's earlier row goes, its later row waits behind it.
    wait_for(&mut stats, "the huge row parked", |s| {
        s.parked == 1 && s.backlog == 1 && s.published == 2
    })
    .await;
    let after_waits: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM keel.outbox WHERE event_id = $1 AND parked_at IS NULL)",
    )
    .bind(after.id().as_uuid())
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(after_waits, "the key's later row is held back");
    let (attempts, error): (i32, String) = sqlx::query_as(
        "SELECT attempts, last_error FROM keel.outbox WHERE event_id = $1 AND parked_at IS NOT NULL",
    )
    .bind(huge.id().as_uuid())
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(attempts, 5, "parked after max_attempts");
    // Once the cause is fixed (here: it is not), an operator requeues it;
    // it is tried again from zero attempts and parked again.
    assert_eq!(
        outbox
            .requeue_parked(db.pool(), Some("other-topic"))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        outbox
            .requeue_parked(db.pool(), Some(&topic))
            .await
            .unwrap(),
        1
    );
    wait_for(&mut stats, "the requeued row parked again", |s| {
        s.parked_by_me == 2
    })
    .await;
    assert!(
        error.contains("max_message_size") || error.contains("bytes"),
        "{error}"
    );
    // It can never go out: discarded, the key goes on.
    let discarded = outbox
        .discard_parked(db.pool(), Some(&topic))
        .await
        .unwrap();
    assert_eq!(
        discarded.iter().map(|r| r.event_id).collect::<Vec<_>>(),
        [*huge.id().as_uuid()]
    );
    wait_for(&mut stats, "the held-back row published", |s| {
        s.published >= 3 && s.backlog == 0 && s.parked == 0
    })
    .await;
    let expected: HashSet<_> = [before.id(), after.id(), other.id()].into();
    let seen = consume(
        transport.as_ref(),
        &topic,
        &expected,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    let payloads: Vec<_> = seen
        .iter()
        .filter(|e| e.key().as_bytes() == b"k")
        .map(|e| String::from_utf8_lossy(e.payload()).into_owned())
        .collect();
    assert_eq!(payloads, ["before", "after"], "the key's order holds");
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    admin.delete_topic(&topic).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_time_cannot_be_read_is_parked_and_the_relay_goes_on() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(nats_transport().await);
    let topic = new_topic(&*transport, "outbox-time", 1).await;
    let outbox = outbox(&tables);
    let (infinite, far, good) = (
        Envelope::new("t", "a", "infinite"),
        Envelope::new("t", "b", "far"),
        Envelope::new("t", "c", "good"),
    );
    let mut tx = db.pool().begin().await.unwrap();
    outbox
        .enqueue_batch(
            &mut tx,
            &[(&topic, &infinite), (&topic, &far), (&topic, &good)],
        )
        .await
        .unwrap();
    // Edited by hand: times PostgreSQL stores and chrono cannot hold (a
    // decode of them panics inside sqlx).
    sqlx::query(
        "UPDATE keel.outbox SET occurred_at = CASE event_id \
         WHEN $1 THEN 'infinity'::timestamptz ELSE '270000-01-01'::timestamptz END \
         WHERE event_id IN ($1, $2)",
    )
    .bind(infinite.id().as_uuid())
    .bind(far.id().as_uuid())
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let RunningRelay {
        stop,
        mut stats,
        task: relay,
    } = start_relay(db.pool(), transport.clone(), "relay-time");
    wait_for(&mut stats, "the good row out, the two others parked", |s| {
        s.published == 1 && s.parked_by_me == 2
    })
    .await;
    let errors: Vec<String> = sqlx::query_scalar(
        "SELECT last_error FROM keel.outbox WHERE parked_at IS NOT NULL ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(errors.len(), 2);
    for error in &errors {
        assert!(error.contains("occurred_at"), "{error}");
    }
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    // An operator's listing reads such times as unknown, not a panic.
    sqlx::query("UPDATE keel.outbox SET enqueued_at = 'infinity', parked_at = '-infinity' WHERE event_id = $1")
        .bind(infinite.id().as_uuid())
        .execute(db.pool())
        .await
        .unwrap();
    let listed = keel_producers::outbox::parked::list(db.pool(), &tables, &Default::default(), 10)
        .await
        .unwrap();
    let times: Vec<_> = listed
        .iter()
        .map(|r| (r.enqueued_at.is_some(), r.parked_at.is_some()))
        .collect();
    assert_eq!(times, [(false, false), (true, true)], "{listed:?}");
    keel_integration_tests::delete_nats_topic(&topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_survives_its_database_connections_being_killed() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(kafka_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-reconnect", 4).await;
    // The relay's connections are named so they can be told apart.
    let options: sqlx::postgres::PgConnectOptions = db.url().parse().unwrap();
    let relay_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.application_name("keel-relay"))
        .await
        .unwrap();
    let RunningRelay {
        stop,
        mut stats,
        task: relay,
    } = start_relay(&relay_pool, transport.clone(), "relay-reconnect");
    let plan = WriterPlan {
        writers: 4,
        events: 4_000,
        rollback: 0.0,
        ..PLAN
    };
    let writer = {
        let (pool, outbox, topic) = (db.pool().clone(), outbox(&tables), topic.clone());
        tokio::spawn(async move { write(&pool, &outbox, &topic, plan).await })
    };
    // Kill every other connection to the database a few times while events
    // flow: the relay's queries and its LISTEN connection die under it.
    let server = sqlx::PgPool::connect(&keel_integration_tests::postgres_url().await)
        .await
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        // The relay reconnects at its next query, which on a loaded machine
        // may be more than a moment away: wait for a connection to kill.
        eventually(
            "the relay reconnects to the database",
            Duration::from_secs(30),
            async || {
                let killed: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name = 'keel-relay'",
                )
                .bind(db.name())
                .fetch_all(&server)
                .await
                .unwrap();
                !killed.is_empty()
            },
        )
        .await;
    }
    let writes = writer.await.unwrap();
    read_and_check(transport.as_ref(), &topic, &writes, Duration::from_secs(1)).await;
    wait_for(&mut stats, "an empty backlog", |s| s.backlog == 0).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_inbox_applies_an_event_delivered_three_times_once() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    sqlx::query("CREATE TABLE balances (account TEXT PRIMARY KEY, cents BIGINT NOT NULL)")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("INSERT INTO balances VALUES ('acme', 0)")
        .execute(db.pool())
        .await
        .unwrap();
    let transport = kafka_transport().await;
    let topic = new_topic(&transport, "inbox", 1).await;
    // Kafka has no publish-side de-duplication: three copies are stored.
    let payment = Envelope::new("PaymentCaptured", "acme", "100");
    for _ in 0..3 {
        transport.publish(&topic, payment.clone()).await.unwrap();
    }
    let inbox = Inbox::new(&tables);
    let mut deliveries = transport
        // A group of its own: Kafka groups span topics, so a shared name
        // would rebalance with every other test's members of that group.
        .subscribe(
            Subscription::new(&topic, keel_integration_tests::unique_name("billing"))
                .start_from(StartFrom::Earliest),
        )
        .await
        .unwrap();
    let mut applied = 0;
    for _ in 0..3 {
        let d = tokio::time::timeout(
            Duration::from_secs(30),
            futures::StreamExt::next(&mut deliveries),
        )
        .await
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(d.envelope().id(), payment.id());
        if let Some(mut tx) = inbox
            .begin(db.pool(), "billing", d.envelope().id())
            .await
            .unwrap()
        {
            sqlx::query("UPDATE balances SET cents = cents + 100 WHERE account = 'acme'")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            applied += 1;
        }
        d.ack();
    }
    deliveries.leave().await.unwrap();
    let cents: i64 = sqlx::query_scalar("SELECT cents FROM balances WHERE account = 'acme'")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!((applied, cents), (1, 100));
    // Another group applies it for itself.
    assert!(
        inbox
            .begin(db.pool(), "shipping", payment.id())
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_deliveries_of_one_event_apply_it_once_and_a_rollback_frees_it() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let inbox = Inbox::new(&tables);
    let id = keel_core::EventId::new();
    // The first transaction holds its record open; the racers wait for it.
    let first = inbox.begin(db.pool(), "g", id).await.unwrap().unwrap();
    let racers: Vec<_> = (0..3)
        .map(|_| {
            let (inbox, pool) = (inbox.clone(), db.pool().clone());
            tokio::spawn(async move {
                match inbox.begin(&pool, "g", id).await.unwrap() {
                    Some(tx) => {
                        tx.commit().await.unwrap();
                        1
                    }
                    None => 0,
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Rolled back: exactly one racer takes over.
    first.rollback().await.unwrap();
    let mut winners = 0;
    for racer in racers {
        winners += racer.await.unwrap();
    }
    assert_eq!(winners, 1);
    assert!(inbox.begin(db.pool(), "g", id).await.unwrap().is_none());
    let purged = inbox.purge(db.pool(), Duration::ZERO, 10).await.unwrap();
    assert_eq!(purged, 1);
    assert!(inbox.begin(db.pool(), "g", id).await.unwrap().is_some());
}

/// The router's inbox layer purges records past its retention while it
/// runs, keeps younger ones, stops purging once dropped, and refuses
/// settings that would defeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_layer_purges_records_past_their_retention() {
    use keel_consumers::router::{Inboxed, Layer};

    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let inbox_table = format!("\"{}\".\"{}\"", tables.schema(), tables.inbox_name());
    let backdate = |id: keel_core::EventId, age_secs: i64| {
        let (pool, table) = (db.pool().clone(), inbox_table.clone());
        async move {
            sqlx::query(&format!(
                "INSERT INTO {table} (consumer_group, event_id, processed_at) \
                 VALUES ('g', $1, now() - $2 * interval '1 second')"
            ))
            .bind(id.as_uuid())
            .bind(age_secs)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let count = |id: keel_core::EventId| {
        let (pool, table) = (db.pool().clone(), inbox_table.clone());
        async move {
            sqlx::query_scalar::<_, i64>(&format!(
                "SELECT count(*) FROM {table} WHERE event_id = $1"
            ))
            .bind(id.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (old, young) = (keel_core::EventId::new(), keel_core::EventId::new());
    backdate(old, 7200).await;
    backdate(young, 60).await;

    for (layer, setting) in [
        (
            Inboxed::new(db.pool().clone(), &tables).retention(Some(Duration::ZERO)),
            "inbox.retention",
        ),
        (
            Inboxed::new(db.pool().clone(), &tables).retention(Some(Duration::MAX)),
            "inbox.retention",
        ),
        (
            Inboxed::new(db.pool().clone(), &tables).purge_interval(Duration::ZERO),
            "inbox.purge_interval",
        ),
    ] {
        let refused = layer.start(&[]).await.unwrap_err().to_string();
        assert!(refused.contains(setting), "{refused}");
    }
    assert_eq!(count(old).await, 1, "a refused layer purges nothing");

    let layer = Inboxed::new(db.pool().clone(), &tables)
        .retention(Some(Duration::from_secs(3600)))
        .purge_interval(Duration::from_millis(100));
    layer.start(&[]).await.unwrap();
    eventually(
        "the record past the retention is purged",
        Duration::from_secs(10),
        async || count(old).await == 0,
    )
    .await;
    // A record past the retention written later goes at a later round.
    let later = keel_core::EventId::new();
    backdate(later, 7200).await;
    eventually(
        "a later record past the retention is purged",
        Duration::from_secs(10),
        async || count(later).await == 0,
    )
    .await;
    assert_eq!(count(young).await, 1, "a record within the retention stays");

    // Gone with the layer: a record past the retention now stays (written
    // once a round that began before the drop is surely over).
    drop(layer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = keel_core::EventId::new();
    backdate(after, 7200).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        count(after).await,
        1,
        "the purge went on after the layer was dropped"
    );
}

/// An outbox migrated before the archive existed kept its published rows
/// in the outbox table: the archive migration moves them (and nothing
/// else), so they are purged from the archive and never scanned again.
#[tokio::test]
async fn rows_published_before_the_archive_migration_move_into_it() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let outbox = outbox(&tables);
    let mut tx = db.pool().begin().await.unwrap();
    for key in ["published-1", "published-2", "waiting"] {
        outbox
            .enqueue(&mut tx, "t", &Envelope::new("t", key, key))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // The state the first migration and its relay left: no archive, the
    // published-time index, published rows marked in place. Then the
    // archive migration runs, as on an upgrade.
    for sql in [
        "DROP TABLE keel.outbox_archive",
        "CREATE INDEX outbox_published ON keel.outbox USING brin (published_at)",
        "ALTER TABLE keel.outbox RESET (autovacuum_vacuum_threshold)",
        "UPDATE keel.outbox SET published_at = now() WHERE event_key <> 'waiting'::bytea",
        "DELETE FROM keel._sqlx_migrations WHERE description = 'keel outbox archive'",
    ] {
        sqlx::query(sql).execute(db.pool()).await.unwrap();
    }
    tables.migrate(db.pool()).await.unwrap();
    let (index_gone, vacuum_set): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('keel.outbox_published') IS NULL, \
         (SELECT 'autovacuum_vacuum_threshold=10000' = ANY(reloptions) FROM pg_class \
          WHERE oid = 'keel.outbox'::regclass)",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(
        index_gone && vacuum_set,
        "the upgrade drops the published-time index and sets autovacuum"
    );
    let keys = |table: &'static str| {
        let pool = db.pool().clone();
        async move {
            sqlx::query_scalar::<_, Vec<u8>>(&format!(
                "SELECT event_key FROM keel.{table} ORDER BY id"
            ))
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(keys("outbox").await, [b"waiting".to_vec()]);
    assert_eq!(
        keys("outbox_archive").await,
        [b"published-1".to_vec(), b"published-2".to_vec()]
    );

    // A relay of the previous version, still running after the upgrade,
    // marks a row in place: the next purge round moves it to the archive
    // (keeping its publication time) and leaves the waiting row alone.
    sqlx::query(
        "UPDATE keel.outbox SET published_at = '2026-01-02T03:04:05Z' \
         WHERE event_key = 'waiting'::bytea",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let relay = OutboxRelay::new(
        db.pool().clone(),
        tables,
        Arc::new(keel_core::MemoryTransport::new()),
        keel_producers::outbox::RelayConfig {
            purge_interval: Duration::from_millis(100),
            // Long enough to keep the row's old publication time.
            retention: Duration::from_secs(5 * 365 * 24 * 3600),
            ..relay_config("relay-sweep", 10)
        },
    )
    .unwrap();
    let running = RunningRelay::spawn(relay);
    let started = std::time::Instant::now();
    while !keys("outbox").await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the row marked in place was not moved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.finish().await;
    let kept: bool = sqlx::query_scalar(
        "SELECT published_at = '2026-01-02T03:04:05Z'::timestamptz FROM keel.outbox_archive \
         WHERE event_key = 'waiting'::bytea",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(kept, "the archive keeps the row's publication time");
}

/// A relay whose outbox lacks the archive (the migrations not applied
/// since it was added) would fail every mark and publish the same batch
/// again and again: it refuses to start, saying what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refuses_an_outbox_without_its_archive() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    sqlx::query("DROP TABLE keel.outbox_archive")
        .execute(db.pool())
        .await
        .unwrap();
    let relay = OutboxRelay::new(
        db.pool().clone(),
        tables,
        Arc::new(keel_core::MemoryTransport::new()),
        relay_config("relay-no-archive", 10),
    )
    .unwrap();
    let ran = tokio::time::timeout(Duration::from_secs(10), relay.run(std::future::pending()))
        .await
        .expect("the relay stops at once");
    let error = ran.unwrap_err().to_string();
    assert!(
        error.contains("outbox_archive") && error.contains("migrat"),
        "{error}"
    );
}

#[tokio::test]
async fn custom_names_migrate_idempotently_and_bad_ones_are_refused() {
    let db = TestDatabase::create().await;
    // Reserved words work as names: they are quoted, never spliced raw.
    let tables = OutboxTables::new("shop", "order", "user").unwrap();
    tables.migrate(db.pool()).await.unwrap();
    tables.migrate(db.pool()).await.unwrap();
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'shop' ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        names,
        [
            "_sqlx_migrations",
            "order",
            "order_archive",
            "order_leases",
            "order_relays",
            "user"
        ]
    );
    // The application's own public schema is untouched.
    let public: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(public, 0);
    // Other names in the same schema are refused with a clear message.
    let other = OutboxTables::new("shop", "outbox2", "inbox2").unwrap();
    let e = other.migrate(db.pool()).await.unwrap_err().to_string();
    assert!(e.contains("one schema per outbox"), "{e}");
    // A schema a newer Keel migrated: an older relay says so by name
    // instead of sqlx's "previously applied but missing".
    let unknown = |version: i64, description: &str| {
        format!(
            "INSERT INTO shop._sqlx_migrations \
             (version, description, success, checksum, execution_time) \
             VALUES ({version}, '{description}', true, '\\x00', 0)"
        )
    };
    let forget =
        |version: i64| format!("DELETE FROM shop._sqlx_migrations WHERE version = {version}");
    sqlx::query(&unknown(29991231000001, "keel outbox from a later release"))
        .execute(db.pool())
        .await
        .unwrap();
    let e = tables.migrate(db.pool()).await.unwrap_err().to_string();
    assert!(
        e.contains("migrated by a newer Keel") && e.contains("29991231000001"),
        "{e}"
    );
    sqlx::query(&forget(29991231000001))
        .execute(db.pool())
        .await
        .unwrap();
    // The application's own sqlx migrations in the same schema (a
    // timestamp version, as `sqlx migrate add` makes): not "a newer Keel".
    sqlx::query(&unknown(20260101120000, "create users"))
        .execute(db.pool())
        .await
        .unwrap();
    let e = tables.migrate(db.pool()).await.unwrap_err().to_string();
    assert!(
        e.contains("not Keel's")
            && e.contains("20260101120000")
            && e.contains("create users")
            && e.contains("schema of its own")
            && !e.contains("newer Keel"),
        "{e}"
    );
    sqlx::query(&forget(20260101120000))
        .execute(db.pool())
        .await
        .unwrap();
    let e = OutboxTables::new("shop; drop table x", "o", "i")
        .unwrap_err()
        .to_string();
    assert!(e.contains("outbox.schema"), "{e}");

    // Enqueue and relay through the custom tables.
    let transport = Arc::new(kafka_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-custom", 1).await;
    let custom = outbox(&tables);
    let event = Envelope::new("t", "k", "custom");
    let mut tx = db.pool().begin().await.unwrap();
    custom.enqueue(&mut tx, &topic, &event).await.unwrap();
    tx.commit().await.unwrap();
    let relay = OutboxRelay::new(
        db.pool().clone(),
        tables.clone(),
        transport.clone(),
        relay_config("custom", 10),
    )
    .unwrap();
    let RunningRelay {
        stop,
        mut stats,
        task,
    } = RunningRelay::spawn(relay);
    wait_for(&mut stats, "the custom outbox relayed", |s| {
        s.published == 1
    })
    .await;
    let seen = consume(
        transport.as_ref(),
        &topic,
        &[event.id()].into(),
        Duration::from_secs(30),
        Duration::ZERO,
    )
    .await;
    assert_eq!(seen[0].id(), event.id());
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_outbox_publishes_committed_events_in_order_with_one_relay_at_a_time() {
    use keel_producers::outbox::sqlite::{SqliteInbox, SqliteOutbox, migrate_sqlite};
    use rand::Rng;

    let dir = keel_integration_tests::TempDir::new();
    // WAL, as the README asks of a SQLite outbox: with a rollback journal
    // the writers below queue the relay's claims and marks on SQLite's
    // busy handler, which is not fair.
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("outbox.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let tables = OutboxTables::default();
    migrate_sqlite(&tables, &pool).await.unwrap();
    migrate_sqlite(&tables, &pool).await.unwrap();
    let transport = Arc::new(nats_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-sqlite", 4).await;

    let relay = |id: &str| {
        let relay = OutboxRelay::sqlite(
            pool.clone(),
            &tables,
            transport.clone(),
            // The take-over below follows a's release on leaving, not an
            // expiry; with a 2 s session a loaded CI machine once kept relay
            // a from the write lock long enough to lose its lease to b
            // mid-run.
            steady_relay_config(id, 100),
        )
        .unwrap();
        RunningRelay::spawn(relay)
    };
    let RunningRelay {
        stop: stop_a,
        stats: mut stats_a,
        task: task_a,
    } = relay("sqlite-a");
    wait_for(&mut stats_a, "relay a holds the outbox", |s| {
        !s.slots.is_empty()
    })
    .await;
    // A second relay on the same file stands by.
    let RunningRelay {
        stop: stop_b,
        stats: mut stats_b,
        task: task_b,
    } = relay("sqlite-b");

    let outbox = SqliteOutbox::new(
        &tables,
        Arc::new(keel_schemas::AvroCodec::new(
            Arc::new(keel_schemas::LocalRegistry::new()),
            keel_schemas::CodecOptions::default(),
        )),
    );
    let mut writes = Writes::default();
    let mut next: std::collections::HashMap<String, i64> = Default::default();
    for round in 0..300 {
        let roll_back = rand::rng().random_bool(0.1);
        let mut tx = pool.begin().await.unwrap();
        let mut pending = Vec::new();
        for i in 0..5 {
            let key = format!("key-{}", (round * 5 + i) % 40);
            let n = next.get(&key).copied().unwrap_or(0)
                + 1
                + pending.iter().filter(|w: &&Written| w.key == key).count() as i64;
            let event = Envelope::new(SEQ_EVENT, key.as_str(), format!("{key}:{n}"));
            outbox.enqueue(&mut tx, &topic, &event).await.unwrap();
            pending.push(Written {
                id: event.id(),
                key,
                n,
            });
        }
        if roll_back {
            tx.rollback().await.unwrap();
            writes.rolled_back.extend(pending.iter().map(|w| w.id));
        } else {
            tx.commit().await.unwrap();
            for w in &pending {
                next.insert(w.key.clone(), w.n);
            }
            writes.committed.extend(pending);
        }
    }
    let duplicates =
        read_and_check(transport.as_ref(), &topic, &writes, Duration::from_secs(1)).await;
    assert_duplicates_explained(duplicates, &[&stats_a.borrow(), &stats_b.borrow()], 100);
    wait_for(&mut stats_a, "an empty backlog", |s| s.backlog == 0).await;
    assert_eq!(
        stats_b.borrow().published,
        0,
        "the standby published nothing"
    );
    assert!(stats_b.borrow().slots.is_empty());
    // Relay a renews its lease as it runs (with a session this long, the
    // standby would not notice otherwise).
    let lease = || {
        sqlx::query_as::<_, (Option<String>, i64)>(
            "SELECT owner, expires_at_ms FROM outbox_relay WHERE id = 1",
        )
        .fetch_one(&pool)
    };
    let (owner, until) = lease().await.unwrap();
    assert!(
        owner.as_deref().is_some_and(|o| o.starts_with("sqlite-a#")),
        "{owner:?}"
    );
    eventually(
        "relay a renews its lease",
        Duration::from_secs(30),
        async || {
            let (now_owner, now_until) = lease().await.unwrap();
            assert_eq!(now_owner, owner, "the lease changed hands");
            now_until > until
        },
    )
    .await;

    // The holder stops: the standby takes over and publishes what follows.
    stop_a.send(true).unwrap();
    task_a.await.unwrap().unwrap();
    wait_for(&mut stats_b, "relay b takes over", |s| !s.slots.is_empty()).await;
    // A parked row (as a relay leaves one after its attempts) holds its
    // key's later row back; other keys go on.
    let (held, blocked) = (
        Envelope::new(SEQ_EVENT, "held", "held:1"),
        Envelope::new(SEQ_EVENT, "held", "held:2"),
    );
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &topic, &held).await.unwrap();
    outbox.enqueue(&mut tx, &topic, &blocked).await.unwrap();
    sqlx::query("UPDATE outbox SET parked_at_ms = 1, attempts = 5 WHERE event_id = ?")
        .bind(held.id().to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let late = Envelope::new(SEQ_EVENT, "late", "late:1");
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &topic, &late).await.unwrap();
    tx.commit().await.unwrap();
    wait_for(
        &mut stats_b,
        "relay b published the late event, not the held-back one",
        |s| s.published == 1 && s.backlog == 1 && s.parked == 1,
    )
    .await;
    stop_b.send(true).unwrap();
    task_b.await.unwrap().unwrap();

    // The inbox applies an event once.
    let inbox = SqliteInbox::new(&tables);
    let id = keel_core::EventId::new();
    let mut applied = 0;
    for _ in 0..3 {
        let mut tx = pool.begin().await.unwrap();
        if inbox.record(&mut tx, "g", id, Some(&topic)).await.unwrap() {
            applied += 1;
        }
        tx.commit().await.unwrap();
    }
    assert_eq!(applied, 1);
    // Purged once older than the retention (zero): SQLite's clock is in
    // milliseconds, and within the same one the record is not older yet
    // (this failed now and then on a fast machine).
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(inbox.purge(&pool, Duration::ZERO, 10).await.unwrap(), 1);
    keel_integration_tests::delete_nats_topic(&topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_retention_published_rows_are_deleted_not_archived() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(kafka_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-no-retention", 2).await;
    let outbox = outbox(&tables);
    let mut tx = db.pool().begin().await.unwrap();
    let mut writes = Writes::default();
    for i in 0..40i64 {
        let (key, n) = (format!("k{}", i % 7), i / 7 + 1);
        let event = Envelope::new(SEQ_EVENT, key.as_str(), format!("{key}:{n}"));
        outbox.enqueue(&mut tx, &topic, &event).await.unwrap();
        writes.committed.push(Written {
            id: event.id(),
            key,
            n,
        });
    }
    tx.commit().await.unwrap();
    let config = keel_producers::outbox::RelayConfig {
        retention: Duration::ZERO,
        ..relay_config("relay-no-retention", 16)
    };
    let relay = OutboxRelay::new(db.pool().clone(), tables, transport.clone(), config).unwrap();
    let RunningRelay {
        stop,
        mut stats,
        task,
    } = RunningRelay::spawn(relay);
    wait_for(&mut stats, "all published", |s| s.published == 40).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).fetch_one(db.pool());
    assert_eq!(count("SELECT count(*) FROM keel.outbox").await.unwrap(), 0);
    assert_eq!(
        count("SELECT count(*) FROM keel.outbox_archive")
            .await
            .unwrap(),
        0,
        "with no retention nothing is archived"
    );
    // The broker has every event, each key's in enqueue order, once unless
    // a publish the relay saw fail had landed (seen once under CI load: a
    // whole batch of 16 twice).
    let duplicates = read_and_check(
        transport.as_ref(),
        &topic,
        &writes,
        Duration::from_millis(500),
    )
    .await;
    assert_duplicates_explained(duplicates, &[&stats.borrow()], 16);
}

#[tokio::test]
async fn a_batch_holds_no_more_bytes_than_its_bound() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(kafka_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-bytes", 1).await;
    let outbox = outbox(&tables);
    let mut tx = db.pool().begin().await.unwrap();
    let mut writes = Writes::default();
    // 100 KiB events, a 250 KiB bound: two per batch (the third would
    // pass it), whatever the row limit says.
    let padding = "x".repeat(100 << 10);
    for i in 0..10i64 {
        let (key, n) = (format!("k{}", i % 3), i / 3 + 1);
        let event = Envelope::new(SEQ_EVENT, key.as_str(), format!("{key}:{n}:{padding}"));
        outbox.enqueue(&mut tx, &topic, &event).await.unwrap();
        writes.committed.push(Written {
            id: event.id(),
            key,
            n,
        });
    }
    // A row larger than the bound goes alone rather than never.
    let (key, n) = ("k0".to_owned(), 5);
    let huge = Envelope::new(SEQ_EVENT, key.as_str(), "y".repeat(300 << 10));
    outbox.enqueue(&mut tx, &topic, &huge).await.unwrap();
    writes.committed.push(Written {
        id: huge.id(),
        key,
        n,
    });
    tx.commit().await.unwrap();
    let config = keel_producers::outbox::RelayConfig {
        max_batch_bytes: 250 << 10,
        ..relay_config("relay-bytes", 500)
    };
    let relay = OutboxRelay::new(db.pool().clone(), tables, transport.clone(), config).unwrap();
    let RunningRelay {
        stop,
        mut stats,
        task,
    } = RunningRelay::spawn(relay);
    wait_for(&mut stats, "all published", |s| s.published == 11).await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let batches = stats.borrow().batches;
    assert!(
        batches >= 6,
        "11 rows of 100 KiB and more in batches of at most 250 KiB need 6, took {batches}"
    );
    let duplicates = read_and_check(
        transport.as_ref(),
        &topic,
        &writes,
        Duration::from_millis(500),
    )
    .await;
    assert_duplicates_explained(duplicates, &[&stats.borrow()], 2);
}

#[tokio::test]
async fn published_rows_are_kept_for_the_retention_then_purged() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(kafka_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-purge", 1).await;
    let outbox = outbox(&tables);
    let mut tx = db.pool().begin().await.unwrap();
    for i in 0..30 {
        outbox
            .enqueue(&mut tx, &topic, &Envelope::new("t", format!("k{i}"), "x"))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let relay_with = |retention: Duration| {
        let config = keel_producers::outbox::RelayConfig {
            retention,
            purge_interval: Duration::from_millis(200),
            purge_batch: 7,
            ..relay_config("relay-purge", 500)
        };
        let relay = OutboxRelay::new(
            db.pool().clone(),
            OutboxTables::default(),
            transport.clone(),
            config,
        )
        .unwrap();
        RunningRelay::spawn(relay)
    };
    let pool = db.pool().clone();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let rows = || count("SELECT count(*) FROM keel.outbox_archive");
    // A long retention keeps the published rows (for replay from the
    // outbox) in the archive; the outbox keeps only unpublished ones.
    let RunningRelay {
        stop,
        mut stats,
        task,
    } = relay_with(Duration::from_secs(3600));
    wait_for(&mut stats, "all published", |s| s.published == 30).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rows().await, 30);
    assert_eq!(count("SELECT count(*) FROM keel.outbox").await, 0);
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keel.outbox_archive \
         WHERE topic = $1 AND payload = 'x'::bytea AND published_at >= enqueued_at",
    )
    .bind(&topic)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(kept, 30, "archived rows keep their columns");
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    // A short one purges them, a small batch at a time.
    let purging = relay_with(Duration::from_millis(1));
    let started = std::time::Instant::now();
    while rows().await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "published rows were not purged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    purging.finish().await;
}

/// The payloads of `key`'s rows in the outbox, in id order.
async fn payloads_of(pool: &sqlx::PgPool, key: &str) -> Vec<Vec<u8>> {
    sqlx::query_scalar("SELECT payload FROM keel.outbox WHERE event_key = $1 ORDER BY id")
        .bind(key.as_bytes())
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Enqueues `events` (topic `t`) in a transaction of its own on another
/// task and commits: one event through `enqueue` (the single-row
/// statement), more through `enqueue_batch`.
fn spawn_enqueue(
    pool: &sqlx::PgPool,
    outbox: &keel_producers::outbox::Outbox,
    events: Vec<Envelope>,
) -> tokio::task::JoinHandle<()> {
    let (pool, outbox) = (pool.clone(), outbox.clone());
    tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        if let [event] = events.as_slice() {
            outbox.enqueue(&mut tx, "t", event).await.unwrap();
        } else {
            let rows: Vec<(&str, &Envelope)> = events.iter().map(|e| ("t", e)).collect();
            outbox.enqueue_batch(&mut tx, &rows).await.unwrap();
        }
        tx.commit().await.unwrap();
    })
}

/// Asserts that `task` (an enqueue that must wait for a lock) waits: a
/// session of this database is seen waiting for an advisory lock (the
/// outbox's key locks) while the task is still running. Without the lock
/// the task finishes and no such wait ever shows.
async fn assert_waiting(pool: &sqlx::PgPool, task: &tokio::task::JoinHandle<()>, what: &str) {
    let started = std::time::Instant::now();
    loop {
        assert!(!task.is_finished(), "{what} did not wait");
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: no session waits for an outbox key lock after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still waiting once the wait is seen.
    assert!(!task.is_finished(), "{what} did not wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_enqueues_wait_for_each_other_so_id_order_is_commit_order() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let outbox = outbox(&tables);
    // No application lock at all: the outbox's own per-key lock makes the
    // second transaction wait, so it cannot take a later id yet commit
    // first.
    let mut first = db.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut first, "t", &Envelope::new("t", "same-key", "first"))
        .await
        .unwrap();
    let second = spawn_enqueue(
        db.pool(),
        &outbox,
        vec![Envelope::new("t", "same-key", "second")],
    );
    // Another key is not held up.
    let mut other = db.pool().begin().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        outbox.enqueue(&mut other, "t", &Envelope::new("t", "other-key", "other")),
    )
    .await
    .expect("a different key waited for the open transaction")
    .unwrap();
    other.commit().await.unwrap();
    assert_waiting(
        db.pool(),
        &second,
        "the same key (behind the open transaction)",
    )
    .await;
    first.commit().await.unwrap();
    second.await.unwrap();
    assert_eq!(
        payloads_of(db.pool(), "same-key").await,
        [b"first".to_vec(), b"second".to_vec()]
    );
}

/// A key other than `key` whose lock bucket (1,024 of them) is `key`'s.
fn bucket_mate(key: &str, nth: usize) -> String {
    let bucket = |k: &str| (keel_core::partition::murmur2(k.as_bytes()) & 0x7fff_ffff) % 1024;
    (0..)
        .map(|i| format!("mate-{i}"))
        .filter(|k| bucket(k) == bucket(key) && k != key)
        .nth(nth)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_sharing_a_lock_bucket_wait_only_for_a_large_batch() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let outbox = outbox(&tables);
    let mut first = db.pool().begin().await.unwrap();
    outbox
        .enqueue(&mut first, "t", &Envelope::new("t", "held-key", "first"))
        .await
        .unwrap();
    // A few keys, one in the open transaction's bucket: not held up.
    let small: Vec<Envelope> = [bucket_mate("held-key", 0), "elsewhere".into()]
        .into_iter()
        .map(|k| Envelope::new("t", k, "small"))
        .collect();
    let mut other = db.pool().begin().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        outbox.enqueue_batch(
            &mut other,
            &small.iter().map(|e| ("t", e)).collect::<Vec<_>>(),
        ),
    )
    .await
    .expect("a key sharing only a bucket waited for the open transaction")
    .unwrap();
    other.commit().await.unwrap();
    // A batch of more keys than are locked one by one takes buckets: it
    // waits for the open transaction (whose key it holds too), and its row
    // of that key comes after the open transaction's.
    let large: Vec<Envelope> = std::iter::once("held-key".to_owned())
        .chain((0..300).map(|i| format!("many-{i}")))
        .map(|k| Envelope::new("t", k, "large"))
        .collect();
    let batch = spawn_enqueue(db.pool(), &outbox, large);
    assert_waiting(
        db.pool(),
        &batch,
        "a bucket-locked batch (behind an open transaction of one of its keys)",
    )
    .await;
    first.commit().await.unwrap();
    batch.await.unwrap();
    assert_eq!(
        payloads_of(db.pool(), "held-key").await,
        [b"first".to_vec(), b"large".to_vec()]
    );
    // And a few-key transaction of a key a large open batch holds waits.
    let mut big = db.pool().begin().await.unwrap();
    let many: Vec<Envelope> = std::iter::once(bucket_mate("held-key", 1))
        .chain((0..300).map(|i| format!("more-{i}")))
        .map(|k| Envelope::new("t", k, "big"))
        .collect();
    let rows: Vec<(&str, &Envelope)> = many.iter().map(|e| ("t", e)).collect();
    outbox.enqueue_batch(&mut big, &rows).await.unwrap();
    let single = spawn_enqueue(
        db.pool(),
        &outbox,
        vec![Envelope::new("t", bucket_mate("held-key", 1), "after")],
    );
    assert_waiting(
        db.pool(),
        &single,
        "a single key (behind the open large batch holding it)",
    )
    .await;
    big.commit().await.unwrap();
    single.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_makes_the_relay_wait_not_park() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(nats_transport().await);
    let topic = unique_name("outbox-missing");
    let outbox = outbox(&tables);
    let events: Vec<Envelope> = (0..3)
        .map(|i| Envelope::new("t", format!("k{i}"), format!("{i}")))
        .collect();
    let mut tx = db.pool().begin().await.unwrap();
    for event in &events {
        outbox.enqueue(&mut tx, &topic, event).await.unwrap();
    }
    tx.commit().await.unwrap();
    let mut relay = start_relay(db.pool(), transport.clone(), "relay-missing");
    // The stream does not exist: no row is to blame, so none is parked
    // however long it takes; the relay backs off and keeps trying.
    wait_for(&mut relay.stats, "failed batches", |s| {
        s.failed_batches >= 3
    })
    .await;
    let parked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM keel.outbox WHERE parked_at IS NOT NULL")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(parked, 0);
    assert_eq!(relay.stats.borrow().published, 0);
    // An operator creates the topic: the rows go out.
    transport
        .ensure_topic(&TopicSpec {
            name: topic.clone(),
            partitions: 1,
        })
        .await
        .unwrap();
    wait_for(&mut relay.stats, "published after the topic exists", |s| {
        s.published == 3
    })
    .await;
    relay.finish().await;
    keel_integration_tests::delete_nats_topic(&topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_the_same_id_waits_for_the_old_processs_leases() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(kafka_transport().await);
    let first = start_relay(db.pool(), transport.clone(), "restarted");
    let mut first_stats = first.stats.clone();
    wait_for(&mut first_stats, "the first relay holds slots", |s| {
        s.slots.len() == 16
    })
    .await;
    // The first process stalls (here: stops) right after renewing its
    // leases, long after its last heartbeat: its relays row is stale, so a
    // process started under the same id takes the id at once, while the
    // leases are still the first's — which, resuming, would trust them.
    let old_token: String =
        sqlx::query_scalar("SELECT token FROM keel.outbox_relays WHERE relay_id = 'restarted'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    let _stop = stall(db.pool(), first, "20 seconds").await;
    let mut second = start_relay(db.pool(), transport.clone(), "restarted");
    // The new process takes the id, then heartbeats (every 500 ms) with the
    // id taken and the leases held: two more heartbeats started means the
    // one that took the id, and the next, have each had their go at the
    // leases and published their stats.
    let mut seen = Vec::new();
    eventually(
        "the new process must take the id and heartbeat for this test to say anything",
        Duration::from_secs(30),
        async || {
            let (token, at): (String, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
                "SELECT token, heartbeat_at FROM keel.outbox_relays WHERE relay_id = 'restarted'",
            )
            .fetch_one(db.pool())
            .await
            .unwrap();
            if token != old_token && seen.last() != Some(&at) {
                seen.push(at);
            }
            seen.len() >= 3
        },
    )
    .await;
    let slots = second.stats.borrow().slots.clone();
    let taken: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keel.outbox_leases WHERE owner IS DISTINCT FROM $1",
    )
    .bind(format!("restarted#{old_token}"))
    .fetch_one(db.pool())
    .await
    .unwrap();
    let expired: bool = sqlx::query_scalar(
        "SELECT bool_or(expires_at < clock_timestamp()) FROM keel.outbox_leases",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(!expired, "the test's leases must still run");
    assert!(
        slots.is_empty() && taken == 0,
        "a new process under the same id took leases the old one still holds: {slots:?}, \
         {taken} lease(s) of another owner"
    );
    // Once they expire, the new process takes every slot.
    wait_for(&mut second.stats, "the second relay holds slots", |s| {
        s.slots.len() == 16
    })
    .await;
    second.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_with_the_same_id_waits_instead_of_sharing_leases() {
    let tables = OutboxTables::default();
    let db = outbox_database(&tables).await;
    let transport = Arc::new(kafka_transport().await);
    let topic = new_topic(transport.as_ref(), "outbox-same-id", 1).await;
    let mut first = start_relay(db.pool(), transport.clone(), "same-id");
    wait_for(&mut first.stats, "the first relay holds slots", |s| {
        s.slots.len() == 16
    })
    .await;
    let mut second = start_relay(db.pool(), transport.clone(), "same-id");
    let outbox = outbox(&tables);
    let mut tx = db.pool().begin().await.unwrap();
    for i in 0..20 {
        outbox
            .enqueue(&mut tx, &topic, &Envelope::new("t", format!("k{i}"), "x"))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    wait_for(&mut first.stats, "the first relay published", |s| {
        s.published == 20
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(second.stats.borrow().published, 0);
    assert!(second.stats.borrow().slots.is_empty());
    // The first leaves gracefully: the second takes the id and the slots.
    first.finish().await;
    wait_for(&mut second.stats, "the second relay holds slots", |s| {
        s.slots.len() == 16
    })
    .await;
    second.finish().await;
}
