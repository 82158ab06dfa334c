//! `JetStreamPublisher` and `JetStreamAdmin` against the machine's
//! nats-server: de-duplication by event id, Keel headers on the wire,
//! murmur2 partition subjects, large pipelined batches, optimistic
//! concurrency, checks before sending, and streams that are validated,
//! described, listed, lagged and reset.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::Duration;

use futures::StreamExt;
use keel_consumers::nats::JetStreamGroupConsumer;
use keel_core::partition::partition_for_key;
use keel_core::{Deliveries, Envelope, Publisher, Subscriber, Subscription, TopicSpec};
use keel_integration_tests::{eventually, nats_consumer_config, nats_url, read_acked, unique_name};
use keel_producers::kafka::ResetTo;
use keel_producers::nats::{
    JetStreamAdmin, JetStreamPublisher, JetStreamPublisherConfig, NatsClientConfig, StreamSettings,
};

struct Setup {
    client: NatsClientConfig,
    admin: JetStreamAdmin,
    publisher: JetStreamPublisher,
    topic: String,
}

async fn setup(partitions: u32, settings: StreamSettings) -> Setup {
    let client = NatsClientConfig::new(nats_url().await);
    let js = client.jetstream().await.unwrap();
    let admin = JetStreamAdmin::new(js.clone());
    let topic = unique_name("pub");
    admin
        .ensure_stream(
            &TopicSpec {
                name: topic.clone(),
                partitions,
            },
            &settings,
        )
        .await
        .unwrap();
    let publisher =
        JetStreamPublisher::with_context(js, JetStreamPublisherConfig::new(client.clone()));
    Setup {
        client,
        admin,
        publisher,
        topic,
    }
}

impl Setup {
    /// Creates the topic's stream (again, after a deletion) with one
    /// partition and the default settings.
    async fn create_one_partition(&self) {
        self.admin
            .ensure_stream(
                &TopicSpec {
                    name: self.topic.clone(),
                    partitions: 1,
                },
                &StreamSettings::default(),
            )
            .await
            .unwrap();
    }
}

fn event(key: &str, n: usize) -> Envelope {
    Envelope::new("keel.test.Numbered", key, format!("{key}:{n}"))
        .with_source("nats-test")
        .with_header("app", "yes")
}

#[tokio::test]
async fn the_same_event_id_inside_the_duplicate_window_is_stored_once() {
    let s = setup(3, StreamSettings::default()).await;
    let e = event("order-1", 0);
    let first = s.publisher.publish(&s.topic, e.clone()).await.unwrap();
    let again = s.publisher.publish(&s.topic, e.clone()).await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate, "the server recognised the event id");
    assert_eq!(again.position, first.position, "the original's sequence");
    // A batch repeating it stores nothing new either.
    let receipts = s
        .publisher
        .publish_batch(&s.topic, vec![e.clone(), event("order-1", 1)])
        .await
        .unwrap();
    assert!(receipts[0].duplicate && !receipts[1].duplicate);
    let d = s.admin.describe_topic(&s.topic).await.unwrap();
    assert_eq!(d.messages_per_partition.iter().sum::<u64>(), 2);
}

#[tokio::test]
async fn headers_key_and_partition_subject_are_what_keel_promises() {
    let s = setup(4, StreamSettings::default()).await;
    let e = event("customer-7", 1).with_correlation_id("corr-1");
    let r = s.publisher.publish(&s.topic, e.clone()).await.unwrap();
    let p = partition_for_key(b"customer-7", 4);
    assert_eq!(r.partition, p, "murmur2, as Kafka's Java clients");
    let stream = s.admin.context().get_stream(&s.topic).await.unwrap();
    let raw = stream.get_raw_message(r.position).await.unwrap();
    assert_eq!(raw.subject.as_str(), format!("{}.{p}", s.topic));
    let h = raw.headers;
    let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(get("Nats-Msg-Id"), Some(e.id().to_string()));
    assert_eq!(get("keel-event-id"), Some(e.id().to_string()));
    assert_eq!(
        get("keel-event-type").as_deref(),
        Some("keel.test.Numbered")
    );
    assert_eq!(get("keel-key").as_deref(), Some("customer-7"));
    assert_eq!(get("keel-correlation-id").as_deref(), Some("corr-1"));
    assert_eq!(get("app").as_deref(), Some("yes"));
    assert_eq!(&raw.payload[..], e.payload().as_ref());
}

#[tokio::test]
async fn a_batch_beyond_the_client_ack_window_completes_in_key_order() {
    // async-nats refuses publishes once 5,000 acks are outstanding; a batch
    // four times that must neither stall nor reorder. 10,000 keys (one
    // event of each in flight at a time) fill the publisher's window.
    let s = setup(3, StreamSettings::default()).await;
    let events: Vec<Envelope> = (0..20_000)
        .map(|i| event(&format!("k{}", i % 10_000), i / 10_000))
        .collect();
    let receipts = tokio::time::timeout(
        Duration::from_secs(120),
        s.publisher.publish_batch(&s.topic, events.clone()),
    )
    .await
    .expect("a 20k batch completes")
    .unwrap();
    assert_eq!(receipts.len(), 20_000);
    let mut last: std::collections::HashMap<&str, u64> = Default::default();
    for (e, r) in events.iter().zip(&receipts) {
        let key = e.key().as_str().unwrap();
        let prev = last.insert(key, r.position).unwrap_or(0);
        assert!(r.position > prev, "key {key} stored out of order");
    }
    s.admin.delete_topic(&s.topic).await.unwrap();
}

#[tokio::test]
async fn concurrent_batches_sharing_the_clients_ack_limit_all_complete() {
    // async-nats frees a place in its context-wide limit of 5,000 awaited
    // acks only when the ack's future completes. Batches at once on one
    // publisher whose windows together exceed the limit (here each may
    // await all 5,000) must keep taking in their acks while they wait for
    // a place, or all wait for each other forever.
    let mut s = setup(3, StreamSettings::default()).await;
    let js = s.client.jetstream().await.unwrap();
    s.publisher = JetStreamPublisher::with_context(
        js,
        JetStreamPublisherConfig {
            max_outstanding_acks: 5_000,
            ..JetStreamPublisherConfig::new(s.client.clone())
        },
    );
    // The stream's shape is known before the batches start, so they
    // send at once rather than one after the other.
    s.publisher
        .publish(&s.topic, event("warm", 0))
        .await
        .unwrap();
    let batches: Vec<Vec<Envelope>> = (0..3)
        .map(|b| (0..6_000).map(|i| event(&format!("b{b}k{i}"), i)).collect())
        .collect();
    let results = tokio::time::timeout(
        Duration::from_secs(120),
        futures::future::join_all(
            batches
                .iter()
                .map(|events| s.publisher.publish_batch(&s.topic, events.clone())),
        ),
    )
    .await
    .expect("concurrent batches complete");
    for (b, receipts) in results.into_iter().enumerate() {
        assert_eq!(receipts.unwrap().len(), 6_000, "batch {b}");
    }
    let d = s.admin.describe_topic(&s.topic).await.unwrap();
    assert_eq!(d.messages_per_partition.iter().sum::<u64>(), 18_001);
    s.admin.delete_topic(&s.topic).await.unwrap();
}

#[tokio::test]
async fn expected_last_sequence_refuses_a_concurrent_writer() {
    let s = setup(1, StreamSettings::default()).await;
    let first = s
        .publisher
        .publish_expecting(&s.topic, event("acct", 0), 0)
        .await
        .unwrap();
    s.publisher
        .publish_expecting(&s.topic, event("acct", 1), first.position)
        .await
        .unwrap();
    let e = s
        .publisher
        .publish_expecting(&s.topic, event("acct", 2), first.position)
        .await
        .unwrap_err();
    assert!(!e.is_retriable(), "{e}");
    assert!(e.to_string().contains("after sequence"), "{e}");
    let d = s.admin.describe_topic(&s.topic).await.unwrap();
    assert_eq!(d.messages_per_partition, vec![2]);
}

#[tokio::test]
async fn a_bad_event_fails_its_batch_before_anything_is_sent() {
    let s = setup(
        2,
        StreamSettings {
            max_message_size: Some(2048),
            ..StreamSettings::default()
        },
    )
    .await;
    let big = Envelope::new("keel.test.Big", "k", vec![b'x'; 4096]);
    let e = s
        .publisher
        .publish_batch(&s.topic, vec![event("k", 0), big, event("k", 2)])
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("max_message_size") && text.contains("event 2 of 3"),
        "{text}"
    );
    assert!(text.contains("nothing was sent"), "{text}");
    let d = s.admin.describe_topic(&s.topic).await.unwrap();
    assert_eq!(d.messages_per_partition.iter().sum::<u64>(), 0);
    // Past the server's max_payload (1 MiB by default) on a stream with no
    // limit of its own: also refused before anything is sent.
    let unlimited = setup(1, StreamSettings::default()).await;
    let huge = Envelope::new("keel.test.Big", "k", vec![b'x'; 2 << 20]);
    let e = unlimited
        .publisher
        .publish_batch(&unlimited.topic, vec![event("k", 0), huge])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("max_payload") && e.contains("nothing was sent"),
        "{e}"
    );
    let d = unlimited
        .admin
        .describe_topic(&unlimited.topic)
        .await
        .unwrap();
    assert_eq!(d.messages_per_partition, vec![0]);
    // A topic that does not exist is named.
    let e = s
        .publisher
        .publish("no-such-topic-here", event("k", 0))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no-such-topic-here"), "{e}");
}

/// A stream's size limit raised after the publisher refused an event by
/// it (the fix for outbox rows parked as too large): the same publisher
/// stores the event once asked again, without a restart — through
/// `publish`, `publish_batch` and `publish_each` (the relay's) alike.
#[tokio::test]
async fn a_size_limit_raised_on_the_server_is_seen_by_the_same_publisher() {
    async fn publish(s: &Setup, way: &str, event: Envelope) -> keel_core::Result<()> {
        match way {
            "publish" => s.publisher.publish(&s.topic, event).await.map(drop),
            "publish_batch" => s
                .publisher
                .publish_batch(&s.topic, vec![event])
                .await
                .map(drop),
            _ => match s
                .publisher
                .publish_each(&s.topic, vec![event], Duration::from_secs(5))
                .await
                .pop()
            {
                Some(keel_core::Sent::Stored(_)) => Ok(()),
                Some(keel_core::Sent::Failed(e)) => Err(e),
                other => panic!("one outcome expected: {other:?}"),
            },
        }
    }
    for way in ["publish", "publish_batch", "publish_each"] {
        let s = setup(
            1,
            StreamSettings {
                max_message_size: Some(2048),
                ..StreamSettings::default()
            },
        )
        .await;
        let big = || Envelope::new("keel.test.Big", "k", vec![b'x'; 4096]);
        let e = publish(&s, way, big()).await.unwrap_err();
        assert!(e.to_string().contains("max_message_size"), "{way}: {e}");
        let js = s.client.jetstream().await.unwrap();
        let mut config = js
            .get_stream(&s.topic)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .clone();
        config.max_message_size = 64 * 1024;
        js.update_stream(config).await.unwrap();
        // The publisher reads a stream again at most once a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        publish(&s, way, big())
            .await
            .unwrap_or_else(|e| panic!("{way}: {e}"));
        let d = s.admin.describe_topic(&s.topic).await.unwrap();
        assert_eq!(d.messages_per_partition, vec![1], "{way}");
        s.admin.delete_topic(&s.topic).await.unwrap();
    }
}

#[tokio::test]
async fn streams_are_created_once_and_never_changed_silently() {
    let s = setup(4, StreamSettings::default()).await;
    let spec = |n| TopicSpec {
        name: s.topic.clone(),
        partitions: n,
    };
    s.admin
        .ensure_stream(&spec(4), &StreamSettings::default())
        .await
        .unwrap();
    let e = s
        .admin
        .ensure_stream(
            &spec(6),
            &StreamSettings {
                max_age: Some(Duration::from_secs(3600)),
                ..StreamSettings::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 partitions, 6 requested"), "{e}");
    assert!(e.contains("max_age"), "{e}");
    assert_eq!(s.admin.partitions(&s.topic).await.unwrap(), 4);
    assert!(s.admin.list_topics().await.unwrap().contains(&s.topic));
    // A topic name NATS cannot carry is refused up front.
    let e = s
        .admin
        .ensure_stream(
            &TopicSpec {
                name: "orders.v1".into(),
                partitions: 1,
            },
            &StreamSettings::default(),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("orders.v1"), "{e}");
}

async fn join(client: &NatsClientConfig, topic: &str, group: &str) -> Deliveries {
    JetStreamGroupConsumer::connect(nats_consumer_config(client.clone()))
        .await
        .unwrap()
        .subscribe(Subscription::new(topic, group))
        .await
        .unwrap()
}

#[tokio::test]
async fn lag_counts_what_the_group_has_not_handled_and_reset_replays() {
    let s = setup(2, StreamSettings::default()).await;
    let group = unique_name("lag-g");
    let batch: Vec<Envelope> = (0..10).map(|i| event(&format!("k{i}"), i)).collect();
    s.publisher.publish_batch(&s.topic, batch).await.unwrap();
    let before = s.admin.lag(&group, &s.topic).await.unwrap();
    assert_eq!(before.iter().map(|p| p.lag()).sum::<u64>(), 10);
    assert!(
        before
            .iter()
            .all(|p| p.position.is_none() && p.starts_at.is_none())
    );

    let mut member = join(&s.client, &s.topic, &group).await;
    read_acked(&mut member, 10).await;
    // A reset is refused while a member is alive.
    let e = s
        .admin
        .reset_group(&group, &s.topic, ResetTo::Earliest, Duration::from_secs(4))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("live member"), "{e}");
    member.leave().await.unwrap();
    let after = s.admin.lag(&group, &s.topic).await.unwrap();
    assert_eq!(after.iter().map(|p| p.lag()).sum::<u64>(), 0, "{after:?}");
    assert!(after.iter().all(|p| p.position.is_some()));

    // Reset to a time before everything: the group's start is that time
    // until it reads (not "committed nothing"), and all is pending again.
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    s.admin
        .reset_group(
            &group,
            &s.topic,
            ResetTo::Timestamp(hour_ago.timestamp_millis()),
            Duration::from_secs(4),
        )
        .await
        .unwrap();
    let by_time = s.admin.lag(&group, &s.topic).await.unwrap();
    assert_eq!(
        by_time.iter().map(|p| p.lag()).sum::<u64>(),
        10,
        "{by_time:?}"
    );
    for p in &by_time {
        assert!(p.position.is_none(), "{p:?}");
        let at = p.starts_at.expect("a start by time");
        assert_eq!(at.timestamp_millis(), hour_ago.timestamp_millis(), "{p:?}");
    }

    s.admin
        .reset_group(&group, &s.topic, ResetTo::Earliest, Duration::from_secs(4))
        .await
        .unwrap();
    let reset = s.admin.lag(&group, &s.topic).await.unwrap();
    assert_eq!(reset.iter().map(|p| p.lag()).sum::<u64>(), 10, "{reset:?}");
    let mut member = join(&s.client, &s.topic, &group).await;
    let mut again = read_acked(&mut member, 10).await;
    again.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("k{i}:{i}")).collect();
    expected.sort();
    assert_eq!(again, expected, "the reset group replays everything");
    member.leave().await.unwrap();
}

/// A reset past what is stored starts at its end, as Kafka clamps
/// offsets: a start further on would skip the events published next.
#[tokio::test]
async fn a_reset_past_the_end_starts_at_the_end() {
    let s = setup(1, StreamSettings::default()).await;
    let group = unique_name("past-g");
    let old: Vec<Envelope> = (0..3).map(|i| event("old", i)).collect();
    s.publisher.publish_batch(&s.topic, old).await.unwrap();
    let later_than_all = chrono::DateTime::parse_from_rfc3339("2099-01-01T00:00:00Z")
        .unwrap()
        .timestamp_millis();
    for (i, to) in [ResetTo::Offset(99_999), ResetTo::Timestamp(later_than_all)]
        .into_iter()
        .enumerate()
    {
        let at = s
            .admin
            .reset_group(&group, &s.topic, to, Duration::from_secs(4))
            .await
            .unwrap();
        let next = 4 + i;
        assert_eq!(at, vec![(0, format!("sequence {next}"))]);
        s.publisher
            .publish(&s.topic, event("new", next))
            .await
            .unwrap();
        let mut member = join(&s.client, &s.topic, &group).await;
        assert_eq!(
            read_acked(&mut member, 1).await,
            vec![format!("new:{next}")],
            "the event published after the reset is delivered"
        );
        member.leave().await.unwrap();
    }
    let e = s
        .admin
        .reset_group(&group, &s.topic, ResetTo::Offset(0), Duration::from_secs(4))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("start at 1"), "{e}");
}

/// A stream deleted by hand (`nats stream rm`, not `keel topics delete`,
/// which clears the groups' records too) and created again numbers its
/// events from 1 anew; the group's position recorded for the old stream
/// lies past the new one's end and is not where the group resumes (it
/// would skip every event until the sequence caught up): it reads the new
/// stream from its first event.
#[tokio::test]
async fn a_group_reads_a_re_created_stream_from_its_first_event() {
    let s = setup(1, StreamSettings::default()).await;
    let group = unique_name("recreated-g");
    let old: Vec<Envelope> = (0..5).map(|i| event("old", i)).collect();
    s.publisher.publish_batch(&s.topic, old).await.unwrap();
    let mut member = join(&s.client, &s.topic, &group).await;
    read_acked(&mut member, 5).await;
    member.leave().await.unwrap();

    s.client
        .jetstream()
        .await
        .unwrap()
        .delete_stream(&s.topic)
        .await
        .unwrap();
    s.create_one_partition().await;
    let new: Vec<Envelope> = (0..2).map(|i| event("new", i)).collect();
    s.publisher.publish_batch(&s.topic, new).await.unwrap();
    let mut member = join(&s.client, &s.topic, &group).await;
    assert_eq!(read_acked(&mut member, 2).await, ["new:0", "new:1"]);
    member.leave().await.unwrap();
    s.admin.delete_topic(&s.topic).await.unwrap();
}

#[tokio::test]
async fn a_partition_handed_over_before_any_ack_resumes_where_it_stood() {
    // A `Latest` group's member takes the partition and leaves before any
    // event arrives; the next member must start where the first one was
    // told to, not at the stream's start (a fresh consumer reports an ack
    // floor of 0).
    let s = setup(1, StreamSettings::default()).await;
    let group = unique_name("latest-g");
    let old: Vec<Envelope> = (0..10).map(|i| event("old", i)).collect();
    s.publisher.publish_batch(&s.topic, old).await.unwrap();
    let member = JetStreamGroupConsumer::connect(nats_consumer_config(s.client.clone()))
        .await
        .unwrap()
        .subscribe(Subscription::new(&s.topic, &group).start_from(keel_core::StartFrom::Latest))
        .await
        .unwrap();
    let mut assigned = member.assignment_changes();
    tokio::time::timeout(
        Duration::from_secs(30),
        assigned.wait_for(|a| !a.is_empty()),
    )
    .await
    .expect("assigned within 30 s")
    .unwrap();
    drop(assigned);
    member.leave().await.unwrap();
    let new: Vec<Envelope> = (0..5).map(|i| event("new", i)).collect();
    s.publisher.publish_batch(&s.topic, new).await.unwrap();
    let mut next = join(&s.client, &s.topic, &group).await;
    let got = read_acked(&mut next, 5).await;
    assert!(got.iter().all(|p| p.starts_with("new:")), "{got:?}");
    let more = tokio::time::timeout(Duration::from_secs(2), next.next()).await;
    assert!(more.is_err(), "nothing beyond the 5 new events: {more:?}");
    next.leave().await.unwrap();
}

#[tokio::test]
async fn a_nack_is_a_nak_with_delay_on_the_server_and_comes_back_once() {
    let s = setup(1, StreamSettings::default()).await;
    let group = unique_name("nak-g");
    s.publisher.publish(&s.topic, event("k", 0)).await.unwrap();
    let mut member = join(&s.client, &s.topic, &group).await;
    let first = tokio::time::timeout(Duration::from_secs(30), member.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.nack_with_delay(Duration::from_millis(200)));
    let again = tokio::time::timeout(Duration::from_secs(30), member.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(again.info().attempt, 2);
    // The server saw the nak: it re-sent the message after the delay
    // (Keel ignored that copy: nothing else arrives).
    // Polled: on a loaded machine the re-send can take longer than the
    // delay.
    let stream = s.admin.context().get_stream(&s.topic).await.unwrap();
    let consumer = keel_producers::nats::groups::consumer_name(&group, 0);
    eventually(
        "the server re-sent the nakked message",
        Duration::from_secs(30),
        async || {
            stream
                .consumer_info(&consumer)
                .await
                .unwrap()
                .num_redelivered
                >= 1
        },
    )
    .await;
    again.ack();
    let more = tokio::time::timeout(Duration::from_secs(1), member.next()).await;
    assert!(more.is_err(), "delivered once more only: {more:?}");
    member.leave().await.unwrap();
}

#[tokio::test]
async fn a_consumer_deleted_from_outside_is_recreated_and_reading_goes_on() {
    let s = setup(1, StreamSettings::default()).await;
    let group = unique_name("rm-g");
    let first: Vec<Envelope> = (0..5).map(|i| event("a", i)).collect();
    s.publisher.publish_batch(&s.topic, first).await.unwrap();
    let mut member = join(&s.client, &s.topic, &group).await;
    read_acked(&mut member, 5).await;
    // An operator runs `nats consumer rm` on the group's consumer. The
    // server (2.9) may fail the removal while the consumer's state is being
    // written ("unlinkat …: directory not empty", code 500); the operator
    // runs it again, and a consumer already gone counts as removed.
    // Twice: the second time before anything was read from the consumer
    // the member re-created, so the member must resume from where its own
    // acks left it, not from where the group first started.
    let stream = s.admin.context().get_stream(&s.topic).await.unwrap();
    let name = keel_producers::nats::groups::consumer_name(&group, 0);
    for _ in 0..2 {
        for attempt in 1.. {
            match stream.delete_consumer(&name).await {
                Ok(_) => break,
                Err(e) if attempt > 1 && e.to_string().contains("consumer not found") => break,
                Err(e) if attempt < 5 && e.to_string().contains("directory not empty") => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot remove the consumer: {e}"),
            }
        }
        // The member notices and re-creates it.
        let recreated = tokio::time::timeout(Duration::from_secs(30), async {
            while stream.consumer_info(&name).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            recreated.is_ok(),
            "the member never re-created its consumer"
        );
    }
    let second: Vec<Envelope> = (5..10).map(|i| event("a", i)).collect();
    s.publisher.publish_batch(&s.topic, second).await.unwrap();
    let got = read_acked(&mut member, 5).await;
    assert_eq!(
        got,
        (5..10).map(|i| format!("a:{i}")).collect::<Vec<_>>(),
        "reading resumed after the handled events, in order"
    );
    member.leave().await.unwrap();
}

#[tokio::test]
async fn records_are_stored_as_given_and_uncarriable_headers_refused_by_name() {
    use bytes::Bytes;
    use keel_core::RawRecord;
    let s = setup(4, StreamSettings::default()).await;
    // A record read from Kafka: its key becomes the key header, the
    // original publish's message id is not carried (it would de-duplicate).
    let record = RawRecord {
        key: Some(Bytes::from_static(b"customer-9")),
        headers: vec![
            ("Nats-Msg-Id".into(), Bytes::from_static(b"old-id")),
            ("x-origin".into(), Bytes::from_static(b"kafka")),
        ],
        payload: Bytes::from_static(b"raw bytes"),
    };
    let r = s
        .publisher
        .publish_record(&s.topic, record.clone())
        .await
        .unwrap();
    assert_eq!(r.partition, partition_for_key(b"customer-9", 4));
    let again = s.publisher.publish_record(&s.topic, record).await.unwrap();
    assert!(!again.duplicate, "no message id travels with a record");
    let stream = s.admin.context().get_stream(&s.topic).await.unwrap();
    let raw = stream.get_raw_message(r.position).await.unwrap();
    let h = raw.headers;
    assert_eq!(h.get("keel-key").map(|v| v.as_str()), Some("customer-9"));
    assert_eq!(h.get("x-origin").map(|v| v.as_str()), Some("kafka"));
    assert!(h.get("Nats-Msg-Id").is_none());
    assert_eq!(&raw.payload[..], b"raw bytes");

    for (name, value) in [
        ("caf\u{e9}", "x"),
        ("with space", "x"),
        ("ok", "two\nlines"),
    ] {
        let bad = RawRecord {
            key: None,
            headers: vec![(name.into(), Bytes::copy_from_slice(value.as_bytes()))],
            payload: Bytes::new(),
        };
        let err = s.publisher.publish_record(&s.topic, bad).await.unwrap_err();
        assert!(!err.is_retriable(), "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

/// A stream deleted under a publisher that knows its shape: every event of
/// a batch fails as the topic's problem (retriable: the outbox relay backs
/// off and keeps its rows instead of counting an attempt against each),
/// and once the stream is back the same publisher stores again.
#[tokio::test]
async fn a_stream_deleted_under_a_publisher_is_a_retriable_topic_error() {
    let s = setup(1, StreamSettings::default()).await;
    s.publisher.publish(&s.topic, event("k", 0)).await.unwrap();
    s.admin.delete_topic(&s.topic).await.unwrap();
    let outcomes = s
        .publisher
        .publish_each(
            &s.topic,
            (1..4).map(|i| event("k", i)).collect(),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(outcomes.len(), 3);
    for outcome in &outcomes {
        match outcome {
            keel_core::Sent::Failed(e @ keel_core::Error::Topic { .. }) => {
                assert!(e.is_retriable(), "{e}")
            }
            keel_core::Sent::NotSent => {}
            other => panic!("expected the topic's retriable error: {other:?}"),
        }
    }
    assert!(matches!(outcomes[0], keel_core::Sent::Failed(_)));
    s.create_one_partition().await;
    let receipt = s.publisher.publish(&s.topic, event("k", 4)).await.unwrap();
    assert_eq!(receipt.position, 1, "stored in the new stream");
    s.admin.delete_topic(&s.topic).await.unwrap();
}

/// `publish_each` keeps to its bound when the server goes away mid-way:
/// the events stored before are reported stored, the rest come back
/// failed as retriable or not sent, one outcome each, in about the bound
/// (the publisher's own acknowledgement timeout is 5 s per event).
#[tokio::test]
async fn publish_each_answers_within_its_bound() {
    let mut server = keel_integration_tests::NatsUnderTest::start("", "nats");
    let client = NatsClientConfig::new(&server.url);
    let admin = JetStreamAdmin::new(client.jetstream().await.unwrap());
    let topic = unique_name("each");
    admin
        .ensure_stream(
            &TopicSpec {
                name: topic.clone(),
                partitions: 1,
            },
            &StreamSettings::default(),
        )
        .await
        .unwrap();
    let publisher = JetStreamPublisher::connect(JetStreamPublisherConfig::new(client))
        .await
        .unwrap();
    let before = publisher
        .publish_each(&topic, vec![event("k", 0)], Duration::from_secs(5))
        .await;
    assert!(
        matches!(before[..], [keel_core::Sent::Stored(_)]),
        "{before:?}"
    );
    server.kill();
    let started = std::time::Instant::now();
    let outcomes = publisher
        .publish_each(
            &topic,
            (1..21).map(|i| event("k", i)).collect(),
            Duration::from_millis(500),
        )
        .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert_eq!(outcomes.len(), 20);
    for outcome in &outcomes {
        match outcome {
            keel_core::Sent::Failed(e) => assert!(e.is_retriable(), "{e}"),
            keel_core::Sent::NotSent => {}
            keel_core::Sent::Stored(r) => panic!("stored with the server down: {r:?}"),
        }
    }
}

/// A key's events go one after another (each once the previous one is
/// stored), so a long batch of one key outlives a short bound: what was
/// not sent in time is reported not sent — not failed, which would make
/// the relay back off a topic that is fine — and what was sent is stored,
/// in order.
#[tokio::test]
async fn a_hot_key_outliving_the_bound_leaves_the_rest_not_sent() {
    let s = setup(1, StreamSettings::default()).await;
    // The stream's shape is looked up (two requests) before the bound runs.
    s.publisher
        .publish(&s.topic, event("warm", 0))
        .await
        .unwrap();
    // A round trip per event (~100 µs): more than 3 s would take. (Not
    // many more: the bound covers checking every event before the first
    // goes, slow in a debug build on a busy machine.)
    let outcomes = s
        .publisher
        .publish_each(
            &s.topic,
            (0..50_000).map(|i| event("hot", i)).collect(),
            Duration::from_secs(3),
        )
        .await;
    assert_eq!(outcomes.len(), 50_000);
    let stored = outcomes
        .iter()
        .take_while(|o| matches!(o, keel_core::Sent::Stored(_)))
        .count();
    assert!(stored > 0, "nothing stored: {:?}", outcomes.first());
    // Sending stopped with a quarter of the bound left, so the event in
    // flight usually comes back in time; on a loaded machine its ack may
    // not, and it alone is failed (its fate unknown). Nothing after it was
    // sent.
    let in_flight = usize::from(matches!(
        outcomes.get(stored),
        Some(keel_core::Sent::Failed(_))
    ));
    let rest = &outcomes[stored + in_flight..];
    assert!(
        !rest.is_empty() && rest.iter().all(|o| matches!(o, keel_core::Sent::NotSent)),
        "after {stored} stored and {in_flight} failed: {:?}",
        rest.iter().find(|o| !matches!(o, keel_core::Sent::NotSent))
    );
    // A failed one was sent (its ack came late), not one left unsent and
    // called failed: the stream holds the warm-up event, the stored ones
    // and it.
    let expected = 1 + stored as u64 + in_flight as u64;
    let mut held = 0;
    eventually(
        "the stream holds the warm-up event, the stored ones and a failed one",
        Duration::from_secs(10),
        async || {
            held = stored_count(&s).await;
            held >= expected
        },
    )
    .await;
    assert_eq!(held, expected, "{stored} stored and {in_flight} failed");
    let mut last = 0;
    for outcome in &outcomes[..stored] {
        let keel_core::Sent::Stored(r) = outcome else {
            unreachable!()
        };
        assert!(r.position > last, "stored out of order at {}", r.position);
        last = r.position;
    }
    s.admin.delete_topic(&s.topic).await.unwrap();
}

/// How many messages the stream holds.
async fn stored_count(s: &Setup) -> u64 {
    s.admin
        .describe_topic(&s.topic)
        .await
        .unwrap()
        .messages_per_partition
        .iter()
        .sum()
}

/// The event ids of a stream's messages in stream order, read one by one.
async fn stored_ids(s: &Setup) -> Vec<String> {
    let stream = s.admin.context().get_stream(&s.topic).await.unwrap();
    let last = stored_count(s).await;
    let mut ids = Vec::new();
    for seq in 1..=last {
        let raw = stream.get_raw_message(seq).await.unwrap();
        ids.push(
            raw.headers
                .get("keel-event-id")
                .unwrap()
                .as_str()
                .to_owned(),
        );
    }
    ids
}

#[tokio::test]
async fn events_published_again_keep_their_keys_order_despite_de_duplication() {
    // The outbox relay's retry after a try that stored a key's later event
    // and lost its earlier one: the server de-duplicates the later one's
    // re-send, so without a copy it would stay before the earlier one.
    use keel_core::Sent;
    let s = setup(1, StreamSettings::default()).await;
    let [first, second, third] = [0, 1, 2].map(|n| event("order-9", n));
    let other = event("order-10", 0);
    let id = |e: &Envelope| e.id().to_string();
    // The earlier try: only `second` got stored.
    s.publisher.publish(&s.topic, second.clone()).await.unwrap();
    let batch = vec![first.clone(), other.clone(), second.clone(), third.clone()];
    let positions = |outcomes: Vec<Sent>| -> Vec<u64> {
        outcomes
            .into_iter()
            .map(|o| match o {
                Sent::Stored(r) => r.position,
                other => panic!("every event is stored: {other:?}"),
            })
            .collect()
    };
    let stored = positions(
        s.publisher
            .publish_each(&s.topic, batch.clone(), Duration::from_secs(10))
            .await,
    );
    // `second` and every later event of its key go again after `first`;
    // the other key's event does not.
    assert_eq!(
        stored_ids(&s).await,
        [&second, &first, &other, &third, &second, &third].map(id),
    );
    assert_eq!(stored, [2, 3, 5, 6], "each receipt names the last copy");
    // Tried once more (an acknowledgement lost, say): every copy is
    // de-duplicated, nothing is stored again, and the receipts are the same.
    let again = positions(
        s.publisher
            .publish_each(&s.topic, batch.clone(), Duration::from_secs(10))
            .await,
    );
    assert_eq!(again, stored);
    // The batch API keeps the order the same way.
    let receipts = s.publisher.publish_batch(&s.topic, batch).await.unwrap();
    assert_eq!(
        receipts.iter().map(|r| r.position).collect::<Vec<_>>(),
        stored
    );
    assert_eq!(stored_ids(&s).await.len(), 6);
    s.admin.delete_topic(&s.topic).await.unwrap();
}

/// Members joining and leaving while events flow hand partitions over
/// gracefully: the next owner never gets an event the previous one handled
/// and each key's events are handled in order. (Events of one partition are
/// acked out of order, one key ahead of another; the next owner reads from
/// the ack floor, below events the previous one had handled, and handled
/// them again: 20–48 of 6,000 here before the lease named them. Acks are
/// also applied by the server after a lease release sent later may be
/// seen.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_hand_overs_never_hand_on_an_acked_event() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let s = setup(8, StreamSettings::default()).await;
    let group = unique_name("handover-g");
    let total = 6_000;
    let events: Vec<Envelope> = (0..total)
        .map(|i| event(&format!("k{}", i % 300), i))
        .collect();
    s.publisher.publish_batch(&s.topic, events).await.unwrap();
    // Who handled what, in order: member, event id, payload.
    type Log = Vec<(usize, keel_core::EventId, String)>;
    let log: Arc<Mutex<Log>> = Default::default();
    let member = |n: usize| {
        let (client, topic, group, log) = (
            s.client.clone(),
            s.topic.clone(),
            group.clone(),
            log.clone(),
        );
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            // A session long enough that a loaded machine does not let a
            // lease lapse (which re-delivers, legitimately).
            let config = keel_consumers::nats::JetStreamConsumerConfig {
                heartbeat: Duration::from_secs(1),
                session_timeout: Duration::from_secs(10),
                ..nats_consumer_config(client)
            };
            let mut deliveries = JetStreamGroupConsumer::connect(config)
                .await
                .unwrap()
                .subscribe(Subscription::new(&topic, &group))
                .await
                .unwrap();
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    d = deliveries.next() => {
                        let d = d.expect("the delivery stream ended").expect("a delivery");
                        // Slow enough that every hand-over falls mid-stream.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        let payload = String::from_utf8_lossy(d.envelope().payload()).into_owned();
                        log.lock().unwrap().push((n, d.envelope().id(), payload));
                        d.ack();
                    }
                }
            }
            deliveries.leave().await.unwrap();
        });
        (stop, task)
    };
    let handled = || log.lock().unwrap().len();
    let until = |n: usize| async move {
        let started = std::time::Instant::now();
        while handled() < n.min(total) {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "only {} of {n} handled",
                handled()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    // A alone, then B joins, A leaves, C joins, B leaves, A' joins: five
    // hand-overs of several partitions each.
    let a = member(0);
    until(600).await;
    let b = member(1);
    until(1_600).await;
    a.0.send(true).unwrap();
    a.1.await.unwrap();
    until(2_600).await;
    let c = member(2);
    until(3_600).await;
    b.0.send(true).unwrap();
    b.1.await.unwrap();
    until(4_600).await;
    let a2 = member(3);
    until(total).await;
    for (stop, task) in [c, a2] {
        stop.send(true).unwrap();
        task.await.unwrap();
    }
    let log = std::mem::take(&mut *log.lock().unwrap());
    let mut per_member = [0usize; 4];
    let mut first: HashMap<keel_core::EventId, usize> = HashMap::new();
    let mut last_of_key: HashMap<String, usize> = HashMap::new();
    let mut again = Vec::new();
    for (n, id, payload) in &log {
        per_member[*n] += 1;
        if let Some(earlier) = first.insert(*id, *n) {
            again.push(format!("{payload} by {earlier} then {n}"));
            continue;
        }
        let (key, i) = payload.rsplit_once(':').unwrap();
        let i: usize = i.parse().unwrap();
        if let Some(previous) = last_of_key.insert(key.to_owned(), i) {
            assert!(
                previous < i,
                "{key} went from {previous} back to {i} (member {n})"
            );
        }
    }
    assert_eq!(first.len(), total, "every event handled");
    assert!(
        per_member.iter().all(|&h| h > 0),
        "every member handled some: {per_member:?}"
    );
    assert!(
        again.is_empty(),
        "{} handled event(s) handed on: {:?}",
        again.len(),
        &again[..again.len().min(10)]
    );
    s.admin.delete_topic(&s.topic).await.unwrap();
}
