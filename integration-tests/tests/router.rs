//! The handler router on the real brokers (tansu and nats-server) with the
//! inbox on PostgreSQL: poison among valid events goes to dead letters with
//! its context while the partition flows on; a handler failing three times
//! then succeeding is retried three times; one that always fails is
//! dead-lettered after its budget and, once fixed, handled exactly once
//! after a redrive (a second redrive is a duplicate for the inbox); one that
//! panics is dead-lettered after its budget too; a payload over the
//! router's limit is dead-lettered undecoded; a key that keeps failing
//! does not hold up the other keys of its partition.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use keel_consumers::router::dead_letter::{self, headers};
use keel_consumers::router::{
    Context, EventContext, EventHandler, Inboxed, Layer, Next, RetryPolicy, Router, RouterOptions,
    Verdict,
};
use keel_core::{Envelope, Error, RawRecord, Result, Subscriber, Subscription, Transport};
use keel_integration_tests::outbox::new_topic;
use keel_integration_tests::{TestDatabase, kafka_transport, nats_transport};
use keel_producers::outbox::OutboxTables;
use keel_schemas::events::{Event, OrderPlaced};
use keel_schemas::{AvroCodec, CodecOptions, LocalRegistry};

const KEYS: usize = 100;
const EVENTS: usize = 10_000;
/// Events of other keys queued behind the blocking key's failing event.
const PARTNERS: usize = 200;
const MAX_ATTEMPTS: u32 = 8;
/// The router's payload limit (`RouterOptions::max_payload_bytes`).
const MAX_PAYLOAD: usize = 64 << 10;

/// What the handler saw, shared with the test.
#[derive(Default)]
struct Seen {
    /// Per key, the sequence numbers handled, in handling order.
    order: HashMap<String, Vec<u64>>,
    /// Attempts per event id.
    attempts: HashMap<String, u32>,
}

struct Orders {
    seen: Arc<Mutex<Seen>>,
    partners_handled: Arc<AtomicU64>,
    fixed: Arc<AtomicBool>,
}

fn key_and_seq(order: &OrderPlaced) -> (String, u64) {
    let (key, n) = order.customer_id.rsplit_once(':').unwrap();
    (key.to_owned(), n.parse().unwrap())
}

#[async_trait]
impl EventHandler<OrderPlaced> for Orders {
    async fn handle(&self, order: OrderPlaced, mut ctx: EventContext<'_>) -> Result<()> {
        let (key, n) = key_and_seq(&order);
        let id = ctx.envelope().id().to_string();
        let attempt = {
            let mut seen = self.seen.lock().unwrap();
            let a = seen.attempts.entry(id.clone()).or_default();
            *a += 1;
            *a
        };
        sqlx::query("INSERT INTO effects (event_id, key, n) VALUES ($1, $2, $3)")
            .bind(&id)
            .bind(&key)
            .bind(n as i64)
            .execute(ctx.transaction()?)
            .await
            .map_err(Error::retriable)?;
        match key.as_str() {
            "flaky" if attempt <= 3 => return Err(Error::retriable("flaky: not yet")),
            "panicky" => panic!("panicky: cannot handle this"),
            "doomed" if !self.fixed.load(Ordering::SeqCst) => {
                return Err(Error::retriable("doomed: always fails until fixed"));
            }
            "blocker" if self.partners_handled.load(Ordering::SeqCst) < PARTNERS as u64 => {
                return Err(Error::retriable(
                    "blocker: waits for its partition's other keys",
                ));
            }
            k if k.starts_with("partner-") => {
                self.partners_handled.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        self.seen
            .lock()
            .unwrap()
            .order
            .entry(key)
            .or_default()
            .push(n);
        Ok(())
    }
}

/// Counts final verdicts by name (outermost layer).
#[derive(Default)]
struct Verdicts(Mutex<HashMap<&'static str, u64>>);

#[async_trait]
impl Layer for Verdicts {
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        let verdict = next.run(ctx).await;
        let name = match &verdict {
            Verdict::Skipped { reason } => reason,
            other => other.name(),
        };
        *self.0.lock().unwrap().entry(name).or_default() += 1;
        verdict
    }
}

impl Verdicts {
    fn get(&self, name: &str) -> u64 {
        self.0.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

async fn order(codec: &AvroCodec, topic: &str, key: &str, n: usize) -> Envelope {
    let mut order = keel_schemas::testdata::order_placed();
    order.customer_id = format!("{key}:{n}");
    let payload = codec.encode(topic, &order).await.unwrap();
    Envelope::new(OrderPlaced::FULL_NAME, key, payload)
}

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads `n` records of `topic` (as a fresh group) as raw records.
async fn read_records(transport: &dyn Subscriber, topic: &str, n: usize) -> Vec<RawRecord> {
    let group = keel_integration_tests::unique_name("inspect");
    let mut member = transport
        .subscribe(Subscription::new(topic, &group))
        .await
        .unwrap();
    let mut records = Vec::new();
    while records.len() < n {
        let item = tokio::time::timeout(Duration::from_secs(60), member.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records in {topic}", records.len()))
            .unwrap();
        match item {
            Ok(delivery) => {
                records.push(RawRecord::from_envelope(delivery.envelope()).unwrap());
                delivery.ack();
            }
            Err(Error::Undecodable(u)) => {
                let (record, _, _, settler) = u.into_parts();
                records.push(record);
                settler.ack();
            }
            Err(e) => panic!("{e}"),
        }
    }
    member.leave().await.unwrap();
    records
}

async fn scenario(transport: Arc<dyn Transport>) {
    let tables = OutboxTables::default();
    let db = TestDatabase::create().await;
    tables.migrate(db.pool()).await.unwrap();
    sqlx::query(
        "CREATE TABLE effects (event_id TEXT NOT NULL, key TEXT NOT NULL, n BIGINT NOT NULL)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let codec = Arc::new(AvroCodec::new(
        Arc::new(LocalRegistry::new()),
        CodecOptions {
            auto_register: true,
            ..CodecOptions::default()
        },
    ));
    let orders = new_topic(&*transport, "router-orders", 4).await;
    let blocking = new_topic(&*transport, "router-blocking", 1).await;

    // 10k valid events over 100 keys, with poison of three kinds among
    // them, an event type nobody handles, a flaky and a doomed event.
    let mut events = Vec::new();
    for n in 0..EVENTS {
        let key = format!("key-{}", n % KEYS);
        events.push(order(&codec, &orders, &key, n / KEYS).await);
        if n == EVENTS / 2 {
            events.push(Envelope::new(
                OrderPlaced::FULL_NAME,
                "key-7",
                "not avro at all",
            ));
            events.push(Envelope::new(
                OrderPlaced::FULL_NAME,
                "key-8",
                vec![0u8, 0, 0, 0x27, 0x0f, 2, 4],
            ));
            events.push(Envelope::new("shop.orders.Unheard", "key-9", vec![0u8]));
            events.push(order(&codec, &orders, "flaky", 0).await);
            // A header given twice (Kafka and NATS allow it): the dead
            // letter keeps both values.
            events.push(
                order(&codec, &orders, "doomed", 0)
                    .await
                    .with_added_header("x-hop", "gateway")
                    .with_added_header("x-hop", "orders"),
            );
            events.push(order(&codec, &orders, "panicky", 0).await);
            // A valid event over the router's payload limit: dead-lettered
            // without being decoded.
            let mut big = keel_schemas::testdata::order_placed();
            big.customer_id = "oversize:0".into();
            big.currency = "X".repeat(2 * MAX_PAYLOAD);
            let payload = codec.encode(&orders, &big).await.unwrap();
            events.push(Envelope::new(OrderPlaced::FULL_NAME, "oversize", payload));
        }
    }
    let id_of = |key: &str| {
        events
            .iter()
            .find(|e| e.key().as_str() == Some(key))
            .unwrap()
            .id()
            .to_string()
    };
    let (flaky_id, doomed_id, panicky_id) = (id_of("flaky"), id_of("doomed"), id_of("panicky"));
    let oversize = events
        .iter()
        .find(|e| e.key().as_str() == Some("oversize"))
        .unwrap()
        .payload()
        .clone();
    // Where each event was stored, by event id: the dead letters name it.
    let mut stored_at = HashMap::new();
    for chunk in events.chunks(1000) {
        let receipts = transport
            .publish_batch(&orders, chunk.to_vec())
            .await
            .unwrap();
        for (event, receipt) in chunk.iter().zip(receipts) {
            stored_at.insert(
                event.id().to_string(),
                (receipt.partition, receipt.position),
            );
        }
    }
    let not_an_event = RawRecord {
        key: Some(Bytes::from_static(b"key-3")),
        headers: vec![("x-origin".into(), Bytes::from_static(b"legacy"))],
        payload: Bytes::from_static(b"{\"legacy\":true}"),
    };
    let receipt = transport
        .publish_record(&orders, not_an_event.clone())
        .await
        .unwrap();
    let not_an_event_at = (receipt.partition, receipt.position);

    // One partition: the blocking key's event first, then its partners.
    let mut queued = vec![order(&codec, &blocking, "blocker", 0).await];
    for n in 0..PARTNERS {
        queued.push(order(&codec, &blocking, &format!("partner-{}", n % 10), n / 10).await);
    }
    queued.push(order(&codec, &blocking, "blocker", 1).await);
    transport.publish_batch(&blocking, queued).await.unwrap();

    let seen = Arc::new(Mutex::new(Seen::default()));
    let partners_handled = Arc::new(AtomicU64::new(0));
    let fixed = Arc::new(AtomicBool::new(false));
    let verdicts = Arc::new(Verdicts::default());
    let handler = || Orders {
        seen: seen.clone(),
        partners_handled: partners_handled.clone(),
        fixed: fixed.clone(),
    };
    let retry = RetryPolicy {
        max_attempts: MAX_ATTEMPTS,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
        jitter: true,
    };
    let router = Router::new(
        keel_integration_tests::unique_name("billing"),
        codec.clone(),
    )
    .layer(verdicts.clone())
    .standard_layers(transport.clone(), retry)
    .unwrap()
    .layer(Inboxed::new(db.pool().clone(), &tables))
    .options(RouterOptions {
        max_payload_bytes: MAX_PAYLOAD,
        ..RouterOptions::default()
    })
    .route(orders.clone(), handler());
    // The blocking key retries for as long as it takes (its budget is not
    // what this part tests), so only counts decide the outcome.
    let patient = RetryPolicy {
        max_attempts: u32::MAX,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        jitter: true,
    };
    let blocking_router = Router::new(
        keel_integration_tests::unique_name("billing"),
        codec.clone(),
    )
    .layer(verdicts.clone())
    .standard_layers(transport.clone(), patient)
    .unwrap()
    .layer(Inboxed::new(db.pool().clone(), &tables))
    .route(blocking.clone(), handler());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let running = tokio::spawn(router.run(transport.clone(), until(stopped.clone())));
    let running_blocking = tokio::spawn(blocking_router.run(transport.clone(), until(stopped)));

    let handled = |key_prefix: &str| -> usize {
        seen.lock()
            .unwrap()
            .order
            .iter()
            .filter(|(k, _)| k.starts_with(key_prefix))
            .map(|(_, v)| v.len())
            .sum()
    };
    // Valid events, the flaky one, both blocker events and the partners.
    wait_for("every valid event", 300, || {
        handled("key-") == EVENTS
            && handled("flaky") == 1
            && handled("blocker") == 2
            && handled("partner-") == PARTNERS
    })
    .await;
    wait_for("six dead letters", 120, || {
        verdicts.get("dead-lettered") == 6
    })
    .await;

    {
        let seen = seen.lock().unwrap();
        for (key, ns) in &seen.order {
            assert!(
                ns.windows(2).all(|w| w[0] < w[1]),
                "key {key} handled out of order: {ns:?}"
            );
        }
        // The blocking key's first event was retried until every partner
        // behind it in its partition was handled: retrying it held up no
        // other key.
        assert_eq!(seen.order["blocker"], vec![0, 1]);
        assert_eq!(
            seen.attempts[&flaky_id], 4,
            "the flaky event succeeded on its 4th attempt, after 3 retries"
        );
        for id in [&doomed_id, &panicky_id] {
            assert_eq!(
                seen.attempts[id], MAX_ATTEMPTS,
                "the doomed and the panicking event spent their budget"
            );
        }
    }
    assert_eq!(
        verdicts.get("unknown-type"),
        1,
        "the unheard-of type was skipped"
    );

    // The dead letters, with their context.
    let dlq = format!("{orders}{}", dead_letter::default_suffix(transport.name()));
    let dead = read_records(&*transport, &dlq, 6).await;
    let mut reasons: Vec<&str> = dead
        .iter()
        .map(|r| r.header(headers::REASON).unwrap())
        .collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        [
            "poison",
            "poison",
            "poison",
            "poison",
            "retries-exhausted",
            "retries-exhausted"
        ]
    );
    for record in &dead {
        assert_eq!(record.header(headers::TOPIC), Some(orders.as_str()));
        // The original's own coordinates, as its publish stored it.
        let at = (
            record
                .header(headers::PARTITION)
                .unwrap()
                .parse::<u32>()
                .unwrap(),
            record
                .header(headers::POSITION)
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
        let expected = match record.header(keel_core::wire::EVENT_ID) {
            Some(id) => stored_at[id],
            None => not_an_event_at,
        };
        assert_eq!(
            at,
            expected,
            "coordinates of {:?}",
            record.header(headers::ERROR)
        );
        let original = events
            .iter()
            .find(|e| Some(e.id().to_string().as_str()) == record.header(keel_core::wire::EVENT_ID))
            .map_or(&not_an_event.payload, |e| e.payload());
        assert_eq!(&record.payload, original, "payload untouched");
        assert!(!record.header(headers::ERROR).unwrap().is_empty());
        assert!(
            record
                .header(headers::GROUP)
                .unwrap()
                .starts_with("billing")
        );
        chrono::DateTime::parse_from_rfc3339(record.header(headers::AT).unwrap()).unwrap();
    }
    let raw = dead
        .iter()
        .find(|r| r.header("x-origin").is_some())
        .expect("the record that is not an event is among the dead letters");
    assert_eq!(raw.payload, not_an_event.payload, "payload untouched");
    assert_eq!(raw.partition_key(), not_an_event.key);
    let error_of = |needle: &str| {
        dead.iter()
            .find(|r| r.header(headers::ERROR).unwrap().contains(needle))
            .unwrap_or_else(|| panic!("no dead letter's error mentions {needle:?}"))
    };
    let panicky = error_of("panicky: cannot handle this");
    assert!(panicky.header(headers::ERROR).unwrap().contains("panicked"));
    assert_eq!(
        panicky.header(headers::ATTEMPTS),
        Some(MAX_ATTEMPTS.to_string().as_str())
    );
    error_of("schema id 9999");
    let big = error_of("RouterOptions::max_payload_bytes");
    assert_eq!(big.header(headers::REASON), Some("poison"));
    assert_eq!(big.payload, oversize);
    assert_eq!(handled("oversize"), 0, "never given to the handler");
    let doomed = error_of("doomed: always fails").clone();
    assert_eq!(doomed.header(headers::REASON), Some("retries-exhausted"));
    assert_eq!(
        doomed.header(headers::ATTEMPTS),
        Some(MAX_ATTEMPTS.to_string().as_str())
    );
    assert_eq!(
        doomed.header(keel_core::wire::EVENT_ID),
        Some(doomed_id.as_str())
    );
    let hops: Vec<&[u8]> = doomed
        .headers
        .iter()
        .filter(|(n, _)| n == "x-hop")
        .map(|(_, v)| v.as_ref())
        .collect();
    assert_eq!(hops, [&b"gateway"[..], b"orders"], "every value, in order");

    // Fixed: a redrive handles it once; a second redrive is a duplicate.
    fixed.store(true, Ordering::SeqCst);
    dead_letter::redrive(&*transport, doomed.clone())
        .await
        .unwrap();
    wait_for("the redriven event", 60, || handled("doomed") == 1).await;
    let duplicates = verdicts.get("duplicate");
    dead_letter::redrive(&*transport, doomed).await.unwrap();
    wait_for("the second redrive", 60, || {
        verdicts.get("duplicate") > duplicates
    })
    .await;
    assert_eq!(handled("doomed"), 1, "the second redrive was not applied");

    stop.send(true).unwrap();
    let report = running.await.unwrap().unwrap();
    running_blocking.await.unwrap().unwrap();
    assert_eq!(report.dead_lettered, 6);
    assert!(report.duplicates >= 1);
    // The router's own count: the flaky event's three retries and the
    // doomed and the panicking event's until their budget was spent.
    assert_eq!(report.retried, 3 + 2 * u64::from(MAX_ATTEMPTS - 1));

    let effects: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_id, count(*) FROM effects GROUP BY event_id")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert!(
        effects.iter().all(|(_, n)| *n == 1),
        "every effect applied once"
    );
    assert_eq!(effects.len(), EVENTS + 1 + 2 + PARTNERS + 1);
    assert!(effects.iter().any(|(id, _)| *id == doomed_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_on_kafka() {
    scenario(Arc::new(kafka_transport().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_on_nats() {
    // JetStream hears that dead-lettered events were given up for good
    // (`+TERM`: a terminated-message advisory each), not merely acked.
    let client = async_nats::connect(keel_integration_tests::nats_url().await)
        .await
        .unwrap();
    let mut terminated = client
        .subscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.>")
        .await
        .unwrap();
    client.flush().await.unwrap();
    scenario(Arc::new(nats_transport().await)).await;
    // Terminated messages, by stream and stream sequence: a message the
    // server re-sent before its termination landed (a busy machine) is
    // terminated again, by design, and advised twice.
    let mut ours = HashSet::new();
    while let Ok(Some(advisory)) =
        tokio::time::timeout(Duration::from_secs(1), terminated.next()).await
    {
        // `….MSG_TERMINATED.<stream>.<consumer>`: this test's streams only
        // (other tests may run meanwhile).
        if advisory.subject.as_str().contains(".router-orders-") {
            let body: serde_json::Value = serde_json::from_slice(&advisory.payload).unwrap();
            ours.insert((body["stream"].to_string(), body["stream_seq"].to_string()));
        }
    }
    assert_eq!(
        ours.len(),
        6,
        "each of the six dead-lettered events (four poison, the doomed and the panicky one) is terminated on the server: {ours:?}"
    );
}

/// The same behaviour on the in-process transport (the inbox still on the
/// real PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_on_memory() {
    scenario(Arc::new(keel_core::MemoryTransport::new())).await;
}
