//! Proves the Kafka-compatible broker is really reached: a record produced
//! with rdkafka (idempotent, acks=all) is read back with its key and headers.

use std::time::Duration;

use futures::StreamExt;
use keel_integration_tests::{kafka_bootstrap, unique_name};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::test]
async fn a_produced_record_is_read_back() {
    let bootstrap = kafka_bootstrap().await;
    let topic = unique_name("smoke");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap_or_else(|e| panic!("Kafka at {bootstrap}: cannot create topic: {e}"));
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap();
    let delivered = producer
        .send(
            FutureRecord::to(&topic)
                .key("order-1")
                .payload("hello tansu")
                .headers(OwnedHeaders::new().insert(Header {
                    key: "keel-event-id",
                    value: Some("0193a4d0-0000-7000-8000-000000000001"),
                })),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("Kafka at {bootstrap}: produce not acknowledged: {e}"));
    assert_eq!(delivered.partition, 0);
    assert_eq!(delivered.offset, 0, "a fresh topic starts at offset 0");

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", unique_name("smoke-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(60), consumer.stream().next())
        .await
        .unwrap_or_else(|_| panic!("Kafka at {bootstrap}: nothing consumed within 60 s"))
        .expect("consumer stream ended")
        .unwrap_or_else(|e| panic!("Kafka at {bootstrap}: consume failed: {e}"));
    assert_eq!(message.key(), Some(&b"order-1"[..]));
    assert_eq!(message.payload(), Some(&b"hello tansu"[..]));
    assert_eq!(message.offset(), 0);
    let headers = message.headers().expect("headers survive the broker");
    let header = headers
        .iter()
        .find(|h| h.key == "keel-event-id")
        .expect("keel-event-id header");
    assert_eq!(
        header.value,
        Some(&b"0193a4d0-0000-7000-8000-000000000001"[..])
    );
}
