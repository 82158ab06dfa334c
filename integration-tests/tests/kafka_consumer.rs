//! `KafkaGroupConsumer` against a real broker: flow control past the
//! partition window and per-key parallelism inside one partition.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use keel_consumers::kafka::{KafkaConsumerConfig, KafkaGroupConsumer};
use keel_core::{Deliveries, Delivery, Envelope, Publisher, Subscriber, Subscription};
use keel_integration_tests::{kafka_bootstrap, kafka_publisher, kafka_topic, unique_name};
use keel_producers::kafka::KafkaClientConfig;

/// A one-partition topic holding `events` (key, payload) in order.
async fn topic_with(client: &KafkaClientConfig, events: &[(String, String)]) -> String {
    let topic = kafka_topic(client, "consumer", 1).await;
    let batch = events
        .iter()
        .map(|(key, payload)| Envelope::new("keel.test.Numbered", key.as_str(), payload.clone()))
        .collect();
    kafka_publisher(client)
        .publish_batch(&topic, batch)
        .await
        .unwrap();
    topic
}

async fn member(client: &KafkaClientConfig, topic: &str, window: u32) -> Deliveries {
    KafkaGroupConsumer::new(KafkaConsumerConfig {
        client: client.clone(),
        partition_window: window,
        commit_interval_ms: 100,
        ..KafkaConsumerConfig::default()
    })
    .unwrap()
    .subscribe(Subscription::new(topic, unique_name("g")).max_in_flight(64))
    .await
    .unwrap()
}

async fn next(deliveries: &mut Deliveries, what: &str) -> Delivery {
    tokio::time::timeout(Duration::from_secs(30), deliveries.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery within 30 s: {what}"))
        .expect("the stream ended")
        .expect("a decodable delivery")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_the_partition_window_is_delivered_in_full() {
    let client = KafkaClientConfig::new([kafka_bootstrap().await]);
    let events: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("k{}", i % 50), i.to_string()))
        .collect();
    let topic = topic_with(&client, &events).await;
    let mut deliveries = member(&client, &topic, 200).await;
    let mut seen = HashSet::new();
    while seen.len() < events.len() {
        let delivery = next(&mut deliveries, &format!("{} of 2000 seen", seen.len())).await;
        seen.insert(delivery.info().coordinates.position);
        delivery.ack();
    }
    assert_eq!(seen, (0..2000u64).collect::<HashSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_key_does_not_hold_up_other_keys_in_its_partition() {
    let client = KafkaClientConfig::new([kafka_bootstrap().await]);
    // One partition: the slow key's events sit between everybody else's.
    let mut events = Vec::new();
    for seq in 0..100 {
        events.push(("slow".to_owned(), format!("slow:{seq}")));
        for k in 0..9 {
            events.push((format!("fast-{k}"), format!("fast-{k}:{seq}")));
        }
    }
    let topic = topic_with(&client, &events).await;
    let mut deliveries = member(&client, &topic, 2000).await;

    // Hold the slow key's first event unsettled while taking the rest.
    let mut held: Option<Delivery> = None;
    let mut fast_done: HashMap<String, u32> = HashMap::new();
    let fast_total = 900;
    let mut handled = 0;
    while handled < fast_total {
        let delivery = next(
            &mut deliveries,
            &format!("{handled} of {fast_total} fast events handled while `slow` is held"),
        )
        .await;
        let text = String::from_utf8_lossy(delivery.envelope().payload()).into_owned();
        let (key, seq) = text.rsplit_once(':').unwrap();
        let seq: u32 = seq.parse().unwrap();
        if key == "slow" {
            assert!(
                held.is_none(),
                "slow:{seq} delivered while slow:0 is still unsettled"
            );
            assert_eq!(seq, 0);
            held = Some(delivery);
            continue;
        }
        let expected = fast_done.entry(key.to_owned()).or_insert(0);
        assert_eq!(seq, *expected, "key {key} out of order");
        *expected += 1;
        handled += 1;
        delivery.ack();
    }
    assert!(held.is_some(), "the slow key's first event was delivered");

    // Released, the slow key catches up in order.
    held.take().unwrap().ack();
    for expected in 1..100 {
        let delivery = next(&mut deliveries, &format!("slow:{expected}")).await;
        let text = String::from_utf8_lossy(delivery.envelope().payload()).into_owned();
        assert_eq!(text, format!("slow:{expected}"));
        delivery.ack();
    }
    deliveries.leave().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_partition_does_not_hold_up_the_members_other_partitions() {
    let client = KafkaClientConfig::new([kafka_bootstrap().await]);
    let topic = kafka_topic(&client, "consumer", 2).await;
    let publisher = kafka_publisher(&client);
    // Keys by partition (murmur2 over 2 partitions).
    let partition_of = |key: &str| keel_core::partition::partition_for_key(key.as_bytes(), 2);
    let stuck = (0..)
        .map(|i| format!("stuck-{i}"))
        .find(|k| partition_of(k) == 0)
        .unwrap();
    let flowing: Vec<String> = (0..)
        .map(|i| format!("flow-{i}"))
        .filter(|k| partition_of(k) == 1)
        .take(20)
        .collect();
    // Partition 0: 300 events of one key, its first one held unsettled, so
    // with a window of 50 the partition fills up.
    let stuck_events: Vec<Envelope> = (0..300)
        .map(|i| Envelope::new("keel.test.Numbered", stuck.as_str(), format!("{stuck}:{i}")))
        .collect();
    publisher.publish_batch(&topic, stuck_events).await.unwrap();
    let mut deliveries = member(&client, &topic, 50).await;
    let held = next(&mut deliveries, "the stuck key's first event").await;
    assert_eq!(held.info().coordinates.partition, 0);

    // Partition 1: 2,000 events over 20 keys, all handled meanwhile.
    let flowing_events: Vec<Envelope> = (0..2000)
        .map(|i| {
            let key = &flowing[i % flowing.len()];
            Envelope::new("keel.test.Numbered", key.as_str(), format!("{key}:{i}"))
        })
        .collect();
    publisher
        .publish_batch(&topic, flowing_events)
        .await
        .unwrap();
    let mut flowed = 0;
    // A member throttled to ten records a second would take 200 s; the
    // shared broker on a loaded machine takes a few.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while flowed < 2000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {flowed} of partition 1's 2,000 events while partition 0 is full"
        );
        let d = next(&mut deliveries, &format!("{flowed} of 2000 flowed")).await;
        assert_eq!(
            d.info().coordinates.partition,
            1,
            "the stuck key's next event came out while its first is unsettled"
        );
        flowed += 1;
        d.ack();
    }
    held.ack();
    // The stuck key's next events are out now and never taken: leave
    // without waiting for them.
    drop(deliveries);
}
