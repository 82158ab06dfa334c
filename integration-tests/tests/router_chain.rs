//! Exactly-once effects through a chain of services: orders → billing →
//! shipping, each handler applying a database effect and enqueuing the next
//! event into the outbox in the transaction the inbox opened, with the
//! services as separate OS processes of which one billing and one shipping
//! process are SIGKILLed mid-run (re-delivering what they had in flight to
//! the survivors and the newcomers). Every order is charged once and
//! dispatched once; every follow-up event is enqueued once, carrying the
//! order's correlation id and its cause's event id.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::{Publisher, Transport};
use keel_integration_tests::chain::{SCHEMA, Topics, codec};
use keel_integration_tests::faults::Worker;
use keel_integration_tests::outbox::{RunningRelay, new_topic, relay_config};
use keel_integration_tests::{
    RegistryBackend, RegistryUnderTest, TempDir, TestDatabase, kafka_bootstrap, kafka_publisher,
    kafka_transport, nats_transport,
};
use keel_producers::kafka::KafkaClientConfig;
use keel_producers::kafka::admin::KafkaAdmin;
use keel_producers::outbox::{Outbox, OutboxRelay, OutboxTables};

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
    /// Each worker's stderr, `<name>.log`: quoted when the chain stalls.
    logs: TempDir,
    /// For a stall report: the groups' committed offsets (Kafka).
    kafka: Option<KafkaAdmin>,
}

impl Chain {
    fn start(&self, role: &str, name: &str) -> Worker {
        let child: Child = Command::new(env!("CARGO_BIN_EXE_router_chain_worker"))
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
            .env("RUST_LOG", "warn,keel_consumers=info")
            .stdin(Stdio::null())
            .stderr(File::create(self.logs.path().join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
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

async fn chain(broker: &'static str, transport: Arc<dyn Transport>) {
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
    let kafka = match broker {
        "kafka" => Some(KafkaClientConfig::new([kafka_bootstrap().await])),
        _ => None,
    };
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
    let relay = RunningRelay::spawn(
        OutboxRelay::new(
            db.pool().clone(),
            tables.clone(),
            publisher,
            relay_config("chain", 500),
        )
        .unwrap(),
    );
    let chain = Chain {
        broker,
        billing: keel_integration_tests::unique_name("billing"),
        shipping: keel_integration_tests::unique_name("shipping"),
        db,
        registry: registry.url.clone(),
        topics,
        logs: TempDir::new(),
        kafka: kafka.map(|client| KafkaAdmin::new(&client, 1).unwrap()),
    };
    let billing_a = chain.start("billing", "billing-a");
    let billing_b = chain.start("billing", "billing-b");
    let shipping_a = chain.start("shipping", "shipping-a");
    let shipping_b = chain.start("shipping", "shipping-b");

    // The orders service: 10k orders through its outbox, 100 per
    // transaction.
    let outbox = Outbox::new(tables.clone(), codec.clone());
    let mut order_ids = Vec::with_capacity(ORDERS);
    for chunk in 0..ORDERS / 100 {
        let mut envelopes = Vec::with_capacity(100);
        for _ in 0..100 {
            let mut order = keel_schemas::testdata::order_placed();
            order.order_id = uuid::Uuid::now_v7();
            order.customer_id = format!("customer-{chunk}");
            order_ids.push(order.order_id);
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
            .bind(&order_ids)
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

// On tansu 0.6.0 the chain once stalled (2026-11-29) with 261 orders never
// delivered to the billing group after the SIGKILL and re-join. It did not
// recur in 15 runs on 2026-11-30, alone, in the whole suite and in CI; its
// cause was not found. Each worker logs its assignments (info) to a file of
// its own, quoted by a stall's panic: who held which partition when it
// stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_on_kafka_is_exactly_once_through_a_sigkill() {
    chain("kafka", Arc::new(kafka_transport().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_on_nats_is_exactly_once_through_a_sigkill() {
    chain("nats", Arc::new(nats_transport().await)).await;
}
