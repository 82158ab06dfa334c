//! `KafkaAdmin` against a real broker: topics listed and described, groups
//! listed, lag per partition, and a stopped group reset to the earliest
//! offset or to a time — then replayed from there.
//!
//! Events are published one per record batch: tansu 0.6.0's `memory://`
//! storage answers ListOffsets per batch (the high watermark is the last
//! batch's base offset + 1, a time maps to a batch), which is exact only for
//! one-record batches. (Its `sqlite://` storage gets offsets right but fails
//! to list or describe any group: it double-encodes the group's JSON.)
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_consumers::kafka::{KafkaConsumerConfig, KafkaGroupConsumer};
use keel_core::{Deliveries, Envelope, Publisher, Subscriber, Subscription, TopicSpec};
use keel_integration_tests::{kafka_bootstrap, read_acked, unique_name};
use keel_producers::kafka::{
    CleanupPolicy, KafkaAdmin, KafkaClientConfig, KafkaPublisher, KafkaPublisherConfig, ResetTo,
    TopicSettings,
};

const PARTITIONS: u32 = 3;

async fn publish(publisher: &KafkaPublisher, topic: &str, tag: &str, n: usize) {
    let batch = (0..n)
        .map(|i| {
            Envelope::new(
                "keel.test.Numbered",
                format!("key-{i}"),
                format!("{tag}:{i}"),
            )
        })
        .collect();
    publisher.publish_batch(topic, batch).await.unwrap();
}

async fn join(client: &KafkaClientConfig, topic: &str, group: &str) -> Deliveries {
    KafkaGroupConsumer::new(KafkaConsumerConfig {
        client: client.clone(),
        commit_interval_ms: 100,
        ..KafkaConsumerConfig::default()
    })
    .unwrap()
    .subscribe(Subscription::new(topic, group))
    .await
    .unwrap()
}

/// Waits until the broker lists `group` without members (a leave takes a
/// moment to show).
async fn wait_until_empty(admin: &KafkaAdmin, group: &str) {
    for _ in 0..100 {
        let groups = admin.list_groups().await.unwrap();
        if groups.iter().all(|g| g.name != group || g.members == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{group} still has members 10 s after they left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_groups_lag_and_resets() {
    let client = KafkaClientConfig::new([kafka_bootstrap().await]);
    let admin = KafkaAdmin::new(&client, 1).unwrap();
    let topic = unique_name("admin");
    admin
        .ensure_topic_with(
            &TopicSpec {
                name: topic.clone(),
                partitions: PARTITIONS,
            },
            &TopicSettings {
                retention_ms: Some(7 * 24 * 3600 * 1000),
                cleanup_policy: Some(CleanupPolicy::Delete),
            },
        )
        .await
        .unwrap();
    assert!(admin.list_topics().await.unwrap().contains(&topic));
    assert!(
        admin
            .describe_topic(&unique_name("absent"))
            .await
            .unwrap()
            .is_none()
    );

    let mut one_per_batch = client.clone();
    one_per_batch
        .librdkafka
        .insert("batch.num.messages".into(), "1".into());
    let publisher = KafkaPublisher::new(KafkaPublisherConfig {
        client: one_per_batch,
        ..KafkaPublisherConfig::default()
    })
    .unwrap();
    publish(&publisher, &topic, "a", 100).await;
    let described = admin.describe_topic(&topic).await.unwrap().unwrap();
    assert_eq!(described.partitions.len(), PARTITIONS as usize);
    assert_eq!(
        described
            .partitions
            .iter()
            .map(|p| p.latest - p.earliest)
            .sum::<i64>(),
        100
    );

    // A group that read everything has no lag; new events show up as lag.
    let group = unique_name("admin-g");
    let mut member = join(&client, &topic, &group).await;
    read_acked(&mut member, 100).await;
    member.leave().await.unwrap();
    wait_until_empty(&admin, &group).await;
    let lag: i64 = admin
        .lag(&group, &topic)
        .await
        .unwrap()
        .iter()
        .map(|p| p.lag)
        .sum();
    assert_eq!(lag, 0);
    let listed = admin.list_groups().await.unwrap();
    assert!(
        listed.iter().any(|g| g.name == group),
        "{group} in {listed:?}"
    );

    std::thread::sleep(Duration::from_millis(50));
    let cut = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    std::thread::sleep(Duration::from_millis(50));
    publish(&publisher, &topic, "b", 50).await;
    let lag = admin.lag(&group, &topic).await.unwrap();
    assert_eq!(lag.iter().map(|p| p.lag).sum::<i64>(), 50, "{lag:?}");

    // Reset to a time: the group replays exactly what came after it.
    admin
        .reset_group(&group, &topic, ResetTo::Timestamp(cut))
        .await
        .unwrap();
    assert_eq!(
        admin
            .lag(&group, &topic)
            .await
            .unwrap()
            .iter()
            .map(|p| p.lag)
            .sum::<i64>(),
        50
    );
    let mut member = join(&client, &topic, &group).await;
    let replayed: HashSet<String> = read_acked(&mut member, 50).await.into_iter().collect();
    assert!(replayed.iter().all(|p| p.starts_with("b:")), "{replayed:?}");
    assert_eq!(replayed.len(), 50);

    // A group with a live member is not reset.
    let refused = admin
        .reset_group(&group, &topic, ResetTo::Earliest)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("active member"), "{refused}");
    member.leave().await.unwrap();
    wait_until_empty(&admin, &group).await;

    // A time after the last event: the end, not a replay of everything
    // (tansu answers offset 0 for it where Kafka answers none).
    let after_all = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 1_000;
    admin
        .reset_group(&group, &topic, ResetTo::Timestamp(after_all))
        .await
        .unwrap();
    let lag = admin.lag(&group, &topic).await.unwrap();
    assert_eq!(lag.iter().map(|p| p.lag).sum::<i64>(), 0, "{lag:?}");

    // Per partition: only the partitions named move.
    let positions = admin
        .reset_group(&group, &topic, ResetTo::Offsets(vec![(1, 0)]))
        .await
        .unwrap();
    assert_eq!(positions, vec![(1, 0)]);
    let lag = admin.lag(&group, &topic).await.unwrap();
    assert_eq!(lag[0].lag, 0, "{lag:?}");
    assert_eq!(lag[1].lag, lag[1].end, "{lag:?}");
    let missing = admin
        .reset_group(&group, &topic, ResetTo::Offsets(vec![(9, 0)]))
        .await
        .unwrap_err()
        .to_string();
    assert!(missing.contains("partition 9 does not exist"), "{missing}");
    // A negative offset is refused, not taken for the earliest.
    for to in [ResetTo::Offset(-1), ResetTo::Offsets(vec![(0, 3), (1, -2)])] {
        let negative = admin
            .reset_group(&group, &topic, to)
            .await
            .unwrap_err()
            .to_string();
        assert!(negative.contains("is negative"), "{negative}");
    }
    let lag = admin.lag(&group, &topic).await.unwrap();
    assert_eq!(lag[0].lag, 0, "nothing moved: {lag:?}");

    // Reset to the earliest: everything again.
    let positions = admin
        .reset_group(&group, &topic, ResetTo::Earliest)
        .await
        .unwrap();
    assert_eq!(positions.len(), PARTITIONS as usize);
    let mut member = join(&client, &topic, &group).await;
    let all: HashSet<String> = read_acked(&mut member, 150).await.into_iter().collect();
    assert_eq!(all.len(), 150);
    member.leave().await.unwrap();
}
