//! Exactly-once effects through a chain of services: orders → billing →
//! shipping, each handler applying a database effect and enqueuing the next
//! event into the outbox in the transaction the inbox opened, with the
//! services as separate OS processes of which one billing and one shipping
//! process are SIGKILLed mid-run (re-delivering what they had in flight to
//! the survivors and the newcomers). Every order is charged once and
//! dispatched once; every follow-up event is enqueued once, carrying the
//! order's correlation id and its cause's event id.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::{Publisher, Transport};
use keel_integration_tests::chain::{SCHEMA, Topics, codec};
use keel_integration_tests::faults::Worker;
use keel_integration_tests::outbox::{RunningRelay, new_topic, relay_config};
use keel_integration_tests::{
    RegistryBackend, RegistryUnderTest, TansuUnderTest, TempDir, TestDatabase, kafka_publisher,
    kafka_transport_on, nats_transport,
};
use keel_producers::kafka::KafkaClientConfig;
use keel_producers::kafka::admin::KafkaAdmin;
use keel_producers::outbox::{Outbox, OutboxRelay, OutboxTables};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use uuid::Uuid;

const ORDERS: usize = 10_000;

struct Chain {
    broker: &'static str,
    /// Consumer groups of their own (Kafka groups span topics: a shared
    /// name would rebalance with other tests' members).
    billing: String,
    shipping: String,
    db: TestDatabase,
    registry: String,
    topics: Topics,
    /// Each worker's stderr, `<name>.log`, and this process's warnings,
    /// `relay.log`: quoted when the chain stalls.
    logs: TempDir,
    /// For a stall report: the groups' committed offsets (Kafka).
    kafka: Option<KafkaAdmin>,
    /// For a stall report: the broker to read the topics from (Kafka).
    bootstrap: Option<String>,
    /// The orders written, in order.
    order_ids: Vec<Uuid>,
}

impl Chain {
    fn start(&self, role: &str, name: &str) -> Worker {
        let mut command = Command::new(env!("CARGO_BIN_EXE_router_chain_worker"));
        command
            .args([
                role,
                if role == "billing" {
                    &self.billing
                } else {
                    &self.shipping
                },
                self.broker,
                self.db.url(),
                &self.registry,
                &self.topics.orders,
                &self.topics.payments,
                &self.topics.shipments,
            ])
            // Assignments and hand-overs at info: what a stall report needs.
            // Skipped offsets (engine, debug): what a lost record's report
            // needs.
            .env(
                "RUST_LOG",
                "warn,keel_consumers=info,keel_consumers::engine=debug",
            )
            .stdin(Stdio::null())
            .stderr(File::create(self.logs.path().join(format!("{name}.log"))).unwrap());
        if let Some(bootstrap) = &self.bootstrap {
            // The test's own broker (see `chain_on_kafka_…`).
            command.env(keel_integration_tests::KAFKA_ENV, bootstrap);
        }
        let child = command.spawn().unwrap();
        Worker {
            name: name.to_owned(),
            child,
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }

    async fn wait_for(&self, what: &str, sql: &str, at_least: i64) {
        let started = Instant::now();
        loop {
            let n = self.count(sql).await;
            if n >= at_least {
                return;
            }
            if started.elapsed() >= Duration::from_secs(300) {
                panic!(
                    "{what}: {n} of {at_least} after 300 s; {}; the workers' logs:\n{}",
                    self.progress().await,
                    self.worker_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where the chain stands: rows the relay has not published yet and,
    /// on Kafka, each group's committed offset and lag per partition.
    async fn progress(&self) -> String {
        let unpublished = self.count("SELECT count(*) FROM keel.outbox").await;
        let mut out = format!("outbox rows not published: {unpublished}");
        if let Some(admin) = &self.kafka {
            for (group, topic) in [
                (&self.billing, &self.topics.orders),
                (&self.shipping, &self.topics.payments),
            ] {
                let lag = admin.lag(group, topic).await;
                out.push_str(&format!("; {group} on {topic}: {lag:?}"));
            }
        }
        out.push_str(&self.missing().await);
        out
    }

    /// Which orders have not been charged, and which charged ones not
    /// dispatched; on Kafka, where their records lie in the topics (read
    /// from the start with a plain consumer) and whether the topics have
    /// offsets missing: a record skipped by a consumer, or never stored.
    async fn missing(&self) -> String {
        let ids = |sql: &'static str| async move {
            sqlx::query_scalar::<_, Uuid>(sql)
                .fetch_all(self.db.pool())
                .await
                .unwrap()
                .into_iter()
                .collect::<HashSet<_>>()
        };
        let charged = ids("SELECT order_id FROM charges").await;
        let dispatched = ids("SELECT order_id FROM dispatches").await;
        let not_charged: Vec<String> = self
            .order_ids
            .iter()
            .filter(|id| !charged.contains(id))
            .map(Uuid::to_string)
            .collect();
        let not_dispatched: Vec<String> = self
            .order_ids
            .iter()
            .filter(|id| charged.contains(id) && !dispatched.contains(id))
            .map(Uuid::to_string)
            .collect();
        let mut out = format!(
            "; orders charged: {} of {}, of which dispatched: {}",
            charged.len(),
            self.order_ids.len(),
            dispatched.len()
        );
        let Some(bootstrap) = self.bootstrap.clone() else {
            return out;
        };
        for (topic, missing, what) in [
            (&self.topics.orders, not_charged, "not charged"),
            (
                &self.topics.payments,
                not_dispatched,
                "charged, not dispatched",
            ),
            (
                &format!("{}.dlq", self.topics.orders),
                Vec::new(),
                "billing's dead letters",
            ),
            (
                &format!("{}.dlq", self.topics.payments),
                Vec::new(),
                "shipping's dead letters",
            ),
        ] {
            let (bootstrap, topic) = (bootstrap.clone(), topic.clone());
            let scan = tokio::task::spawn_blocking(move || records_by_key(&bootstrap, &topic))
                .await
                .unwrap();
            out.push_str(&format!("; {what}: {}", where_they_are(&missing, scan)));
        }
        out
    }

    /// Every worker's log, line by line under its name: its group changes
    /// (info) and any warning, error or panic — who held which partition
    /// when the chain stopped, and why a worker failed.
    fn worker_logs(&self) -> String {
        let mut logs: Vec<_> = std::fs::read_dir(self.logs.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        logs.sort();
        let mut out = String::new();
        for log in logs {
            let name = log.file_stem().unwrap_or_default().to_string_lossy();
            for line in std::fs::read_to_string(&log).unwrap_or_default().lines() {
                out.push_str(&format!("{name}: {line}\n"));
            }
        }
        out
    }
}

/// A topic as a plain consumer reads it from the start of each partition
/// to its end: each key's records `(partition, offset)`, the offsets the
/// broker did not return (`(partition, expected, got)`), what was still
/// unread after 60 s (`(partition, next, end)`) and the errors met.
struct Scan {
    records: usize,
    keys: HashMap<String, Vec<(i32, i64)>>,
    gaps: Vec<(i32, i64, i64)>,
    unread: Vec<(i32, i64, i64)>,
    errors: Vec<String>,
}

fn records_by_key(bootstrap: &str, topic: &str) -> Result<Scan, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            keel_integration_tests::unique_name("chain-report"),
        )
        .set("enable.auto.commit", "false")
        // A partition's end is reached even when its last offsets never
        // come (skipped, or never stored).
        .set("enable.partition.eof", "true")
        .create()
        .map_err(|e| e.to_string())?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| format!("metadata: {e}"))?;
    let Some(listed) = metadata.topics().first() else {
        return Err("the broker did not list it".to_owned());
    };
    if let Some(e) = listed.error() {
        return Err(format!(
            "metadata: {:?}",
            rdkafka::error::RDKafkaErrorCode::from(e)
        ));
    }
    // Each partition's next offset expected (from its low watermark) and
    // its end.
    let mut next = BTreeMap::new();
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..listed.partitions().len() as i32 {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| format!("watermarks of {p}: {e}"))?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|e| e.to_string())?;
            next.insert(p, low);
            ends.insert(p, high);
        }
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let mut scan = Scan {
        records: 0,
        keys: HashMap::new(),
        gaps: Vec::new(),
        unread: Vec::new(),
        errors: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() && Instant::now() < deadline {
        let message = match consumer.poll(Duration::from_millis(500)) {
            None => continue,
            Some(Ok(message)) => message,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let (Some(end), Some(&at)) = (ends.remove(&p), next.get(&p))
                    && at < end
                {
                    scan.gaps.push((p, at, end));
                }
                continue;
            }
            Some(Err(e)) => {
                if scan.errors.len() < 5 {
                    scan.errors.push(e.to_string());
                }
                continue;
            }
        };
        let (p, offset) = (message.partition(), message.offset());
        let expected = next.get(&p).copied().unwrap_or(0);
        if offset != expected {
            scan.gaps.push((p, expected, offset));
        }
        next.insert(p, offset + 1);
        scan.records += 1;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        scan.keys.entry(key).or_default().push((p, offset));
        if ends.get(&p).is_some_and(|&end| offset + 1 >= end) {
            ends.remove(&p);
        }
    }
    scan.unread = ends
        .into_iter()
        .map(|(p, end)| (p, next.get(&p).copied().unwrap_or(0), end))
        .collect();
    Ok(scan)
}

/// Where the records of `missing` (keys) lie in a topic's `scan`.
fn where_they_are(missing: &[String], scan: Result<Scan, String>) -> String {
    let scan = match scan {
        Ok(scan) => scan,
        Err(e) => return format!("cannot read the topic: {e}"),
    };
    let mut by_partition: BTreeMap<i32, (usize, i64, i64)> = BTreeMap::new();
    let mut absent = 0;
    for key in missing {
        match scan.keys.get(key) {
            Some(records) => {
                for &(p, offset) in records {
                    let e = by_partition.entry(p).or_insert((0, i64::MAX, i64::MIN));
                    e.0 += 1;
                    e.1 = e.1.min(offset);
                    e.2 = e.2.max(offset);
                }
            }
            None => absent += 1,
        }
    }
    format!(
        "{} keys, {} of them absent from the topic ({} records, {} keys); \
         their records by partition (count, lowest, highest offset): {by_partition:?}; \
         offsets the topic skips (partition, expected, got): {:?}; \
         unread after 60 s (partition, next, end): {:?}; errors: {:?}",
        missing.len(),
        absent,
        scan.records,
        scan.keys.len(),
        &scan.gaps[..scan.gaps.len().min(20)],
        scan.unread,
        scan.errors
    )
}

/// The chain on `transport`; on Kafka, `bootstrap` names its broker.
async fn chain(broker: &'static str, bootstrap: Option<String>, transport: Arc<dyn Transport>) {
    let tables = OutboxTables::default();
    let db = TestDatabase::create().await;
    tables.migrate(db.pool()).await.unwrap();
    sqlx::raw_sql(SCHEMA).execute(db.pool()).await.unwrap();
    let registry = RegistryUnderTest::start(RegistryBackend::Sqlite, Default::default()).await;
    let codec = codec(&registry.url);
    let topics = Topics {
        orders: new_topic(&*transport, "chain-orders", 4).await,
        payments: new_topic(&*transport, "chain-payments", 4).await,
        shipments: new_topic(&*transport, "chain-shipments", 4).await,
    };
    let kafka = bootstrap
        .as_ref()
        .map(|bootstrap| KafkaClientConfig::new([bootstrap.clone()]));
    let publisher: Arc<dyn Publisher> = if let Some(client) = &kafka {
        // One record per producer batch: tansu's `memory://` storage answers
        // a fetch from inside a batch with the next batch, so a member
        // resuming mid-batch after a SIGKILL would skip the batch's rest (see
        // kafka_group_faults.rs). Real Kafka returns the batch holding the
        // offset.
        let mut client = client.clone();
        client
            .librdkafka
            .insert("batch.num.messages".to_owned(), "1".to_owned());
        Arc::new(kafka_publisher(&client))
    } else {
        transport.clone()
    };
    // This process's warnings (the relay's: a topic it cannot publish to,
    // a row parked) go to `relay.log`, quoted with the workers' by a stall
    // (under nextest, one test per process; under `cargo test` the first
    // test to get here takes them all).
    let logs = TempDir::new();
    let relay_log = File::create(logs.path().join("relay.log")).unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::sync::Mutex::new(relay_log))
        .with_ansi(false)
        .try_init();
    let relay = RunningRelay::spawn(
        OutboxRelay::new(
            db.pool().clone(),
            tables.clone(),
            publisher,
            relay_config("chain", 500),
        )
        .unwrap(),
    );
    let order_ids: Vec<Uuid> = (0..ORDERS).map(|_| Uuid::now_v7()).collect();
    let chain = Chain {
        broker,
        billing: keel_integration_tests::unique_name("billing"),
        shipping: keel_integration_tests::unique_name("shipping"),
        db,
        registry: registry.url.clone(),
        topics,
        logs,
        kafka: kafka.map(|client| KafkaAdmin::new(&client, 1).unwrap()),
        bootstrap,
        order_ids,
    };
    let billing_a = chain.start("billing", "billing-a");
    let billing_b = chain.start("billing", "billing-b");
    let shipping_a = chain.start("shipping", "shipping-a");
    let shipping_b = chain.start("shipping", "shipping-b");

    // The orders service: 10k orders through its outbox, 100 per
    // transaction.
    let outbox = Outbox::new(tables.clone(), codec.clone());
    for (chunk, ids) in chain.order_ids.chunks(100).enumerate() {
        let mut envelopes = Vec::with_capacity(100);
        for &order_id in ids {
            let mut order = keel_schemas::testdata::order_placed();
            order.order_id = order_id;
            order.customer_id = format!("customer-{chunk}");
            envelopes.push(
                outbox
                    .envelope(&chain.topics.orders, order.order_id.to_string(), &order)
                    .await
                    .unwrap(),
            );
        }
        let batch: Vec<(&str, &keel_core::Envelope)> = envelopes
            .iter()
            .map(|e| (chain.topics.orders.as_str(), e))
            .collect();
        let mut tx = chain.db.pool().begin().await.unwrap();
        outbox.enqueue_batch(&mut tx, &batch).await.unwrap();
        tx.commit().await.unwrap();
    }

    // SIGKILL a member of each group mid-run; newcomers join.
    chain
        .wait_for(
            "charges before the kill",
            "SELECT count(*) FROM charges",
            3_000,
        )
        .await;
    drop(billing_a); // SIGKILL
    let billing_c = chain.start("billing", "billing-c");
    chain
        .wait_for(
            "dispatches before the kill",
            "SELECT count(*) FROM dispatches",
            5_000,
        )
        .await;
    drop(shipping_a); // SIGKILL
    let shipping_c = chain.start("shipping", "shipping-c");

    chain
        .wait_for(
            "every dispatch",
            "SELECT count(*) FROM dispatches",
            ORDERS as i64,
        )
        .await;
    // Graceful stops: whatever they still had in flight is settled.
    for worker in [billing_b, billing_c, shipping_b, shipping_c] {
        worker.interrupt();
    }
    chain
        .wait_for(
            "every follow-up published",
            "SELECT count(*) FROM keel.outbox_archive",
            3 * ORDERS as i64,
        )
        .await;
    relay.finish().await;

    let c = |sql: &'static str| chain.count(sql);
    assert_eq!(
        c("SELECT count(*) FROM charges").await,
        ORDERS as i64,
        "charged once each"
    );
    assert_eq!(
        c("SELECT count(DISTINCT order_id) FROM charges").await,
        ORDERS as i64
    );
    assert_eq!(
        c("SELECT count(*) FROM dispatches").await,
        ORDERS as i64,
        "dispatched once each"
    );
    assert_eq!(
        c("SELECT count(DISTINCT order_id) FROM dispatches").await,
        ORDERS as i64
    );
    let orders_charged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM charges WHERE order_id = ANY($1)")
            .bind(&chain.order_ids)
            .fetch_one(chain.db.pool())
            .await
            .unwrap();
    assert_eq!(
        orders_charged, ORDERS as i64,
        "the orders written are the ones charged"
    );
    // Follow-ups: one per order and stage, caused by the event before them,
    // correlated with the order's event.
    let per_topic: Vec<(String, i64)> = sqlx::query_as(
        "SELECT topic, count(*) FROM keel.outbox_archive GROUP BY topic ORDER BY topic",
    )
    .fetch_all(chain.db.pool())
    .await
    .unwrap();
    for (topic, n) in &per_topic {
        assert_eq!(*n, ORDERS as i64, "{topic}: {per_topic:?}");
    }
    let payments_caused_by_orders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keel.outbox_archive p JOIN keel.outbox_archive o \
           ON p.causation_id = o.event_id::text AND p.correlation_id = o.event_id::text \
         WHERE p.topic = $1 AND o.topic = $2",
    )
    .bind(&chain.topics.payments)
    .bind(&chain.topics.orders)
    .fetch_one(chain.db.pool())
    .await
    .unwrap();
    assert_eq!(payments_caused_by_orders, ORDERS as i64);
    let shipments_caused_by_payments: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keel.outbox_archive s JOIN keel.outbox_archive p \
           ON s.causation_id = p.event_id::text AND s.correlation_id = p.correlation_id \
         WHERE s.topic = $1 AND p.topic = $2",
    )
    .bind(&chain.topics.shipments)
    .bind(&chain.topics.payments)
    .fetch_one(chain.db.pool())
    .await
    .unwrap();
    assert_eq!(shipments_caused_by_payments, ORDERS as i64);
    // The trace went on from stage to stage: a shipment's traceparent is a
    // child span in its payment's trace.
    let traced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keel.outbox_archive s JOIN keel.outbox_archive p ON s.causation_id = p.event_id::text \
         WHERE s.topic = $1 AND split_part(s.traceparent, '-', 2) = split_part(p.traceparent, '-', 2) \
           AND s.traceparent <> p.traceparent",
    )
    .bind(&chain.topics.shipments)
    .fetch_one(chain.db.pool())
    .await
    .unwrap();
    assert_eq!(traced, ORDERS as i64, "follow-ups continue the trace");
}

// A broker of its own, as the group fault tests have: 30k events and their
// re-published copies neither slow nor are slowed by what the rest of the
// suite stored in the shared one (alone: 54 s, no order published twice).
// On the suite's tansu, late in a CI run (2026-12-04), the chain stalled at
// 4,704 dispatches with both groups caught up and the outbox empty, the
// orders topic holding 21k copies of the 10k orders; the cause was not
// found. A stall's panic quotes each worker's assignments and skipped
// offsets, and where the orders not handled lie in the topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_on_kafka_is_exactly_once_through_a_sigkill() {
    let tansu = TansuUnderTest::start_in_memory().await;
    let bootstrap = tansu.bootstrap.clone();
    let transport = kafka_transport_on(&bootstrap);
    chain("kafka", Some(bootstrap), Arc::new(transport)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_on_nats_is_exactly_once_through_a_sigkill() {
    chain("nats", None, Arc::new(nats_transport().await)).await;
}
