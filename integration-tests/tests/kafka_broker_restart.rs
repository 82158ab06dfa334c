//! The broker goes away mid-publish: a private tansu with durable `sqlite://`
//! storage is SIGKILLed while batches are in flight, stays down for 10 s and
//! comes back on the same port and storage. Every publish call ends — acked
//! after the restart or failed with an error naming the topic and the cause
//! — and every acknowledged event is in the topic afterwards.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use keel_consumers::kafka::{KafkaConsumerConfig, KafkaGroupConsumer};
use keel_core::{Envelope, EventId, Publisher, Subscriber, Subscription};
use keel_integration_tests::{TansuUnderTest, kafka_publisher, kafka_topic, unique_name};
use keel_producers::kafka::KafkaClientConfig;

const BATCHES: usize = 120;
const BATCH: usize = 50;

/// What one `publish_batch` call came to.
struct Outcome {
    started: Instant,
    ended: Instant,
    result: Result<Vec<EventId>, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_a_broker_restart() {
    let mut tansu = TansuUnderTest::start().await;
    let client = KafkaClientConfig::new([tansu.bootstrap.clone()]);
    let topic = kafka_topic(&client, "restart", 3).await;
    let publisher = Arc::new(kafka_publisher(&client));

    // Publish batch after batch, through the outage.
    let acked = Arc::new(AtomicUsize::new(0));
    let publishing = {
        let (publisher, topic, acked) = (publisher.clone(), topic.clone(), acked.clone());
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for b in 0..BATCHES {
                let events: Vec<Envelope> = (0..BATCH)
                    .map(|i| {
                        Envelope::new("keel.test.Numbered", format!("key-{i}"), format!("{b}:{i}"))
                    })
                    .collect();
                let ids: Vec<EventId> = events.iter().map(Envelope::id).collect();
                let started = Instant::now();
                let result = publisher.publish_batch(&topic, events).await;
                let result = match result {
                    Ok(receipts) => {
                        assert_eq!(receipts.len(), ids.len());
                        acked.fetch_add(ids.len(), Ordering::Relaxed);
                        Ok(ids)
                    }
                    Err(e) => Err(e.to_string()),
                };
                outcomes.push(Outcome {
                    started,
                    ended: Instant::now(),
                    result,
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            outcomes
        })
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < BATCHES * BATCH / 4 {
        assert!(
            Instant::now() < deadline && !publishing.is_finished(),
            "publishing stalled before the outage: {} acked",
            acked.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tansu.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    tansu.restart().await;
    let restarted = Instant::now();

    let outcomes = tokio::time::timeout(Duration::from_secs(180), publishing)
        .await
        .expect("every publish call ends")
        .unwrap();
    let spanning = outcomes
        .iter()
        .filter(|o| o.started < killed + Duration::from_secs(1) && o.ended > restarted)
        .count();
    // What each call came to around the outage, for the failure report.
    let timeline: Vec<String> = outcomes
        .iter()
        .filter(|o| o.ended + Duration::from_secs(1) > killed)
        .take(12)
        .map(|o| {
            let at = |t: Instant| t.saturating_duration_since(killed).as_millis();
            match &o.result {
                Ok(_) => format!("{}..{} ms ok", at(o.started), at(o.ended)),
                Err(e) => format!("{}..{} ms failed: {e}", at(o.started), at(o.ended)),
            }
        })
        .collect();
    assert!(
        spanning >= 1,
        "a publish call started by the kill was in flight until after the restart \
         ({} ms after the kill); calls from the kill on, times from the kill: {timeline:#?}",
        restarted.duration_since(killed).as_millis()
    );
    let mut acked_ids = HashSet::new();
    let mut failures = Vec::new();
    for o in &outcomes {
        match &o.result {
            Ok(ids) => acked_ids.extend(ids.iter().copied()),
            Err(e) => failures.push(e.clone()),
        }
    }
    for e in &failures {
        assert!(e.contains(&topic), "a failed publish names the topic: {e}");
    }
    println!(
        "{} batches: {} acked events, {} failed batches ({:?}); {spanning} in flight across the outage",
        outcomes.len(),
        acked_ids.len(),
        failures.len(),
        failures.first()
    );
    assert!(
        outcomes
            .iter()
            .any(|o| o.started > restarted && o.result.is_ok()),
        "publishing works again after the restart"
    );

    // Read the topic back: every acknowledged event is there.
    let mut deliveries = KafkaGroupConsumer::new(KafkaConsumerConfig {
        client,
        ..KafkaConsumerConfig::default()
    })
    .unwrap()
    .subscribe(Subscription::new(&topic, unique_name("check")))
    .await
    .unwrap();
    let mut stored = HashSet::new();
    let mut missing = acked_ids.len();
    while missing > 0 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), deliveries.next())
            .await
            .unwrap_or_else(|_| {
                panic!("{missing} acknowledged events are not in the topic after the restart")
            })
            .unwrap()
            .unwrap();
        let id = delivery.envelope().id();
        if stored.insert(id) && acked_ids.contains(&id) {
            missing -= 1;
        }
        delivery.ack();
    }
    deliveries.leave().await.unwrap();
}
