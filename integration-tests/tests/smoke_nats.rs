//! Proves NATS JetStream is really reached: a publish is acknowledged with a
//! stream sequence, fetched through a durable pull consumer and acked.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use keel_integration_tests::{nats_url, unique_name};

#[tokio::test]
async fn a_published_message_is_acknowledged_and_fetched() {
    let url = nats_url().await;
    let client = async_nats::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("NATS at {url}: cannot connect: {e}"));
    let js = jetstream::new(client);
    let name = unique_name("smoke");
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| {
            panic!("NATS at {url}: cannot create a JetStream stream (is -js on?): {e}")
        });

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "0193a4d0-0000-7000-8000-000000000001");
    let ack = js
        .publish_with_headers(
            format!("{name}.0"),
            headers.clone(),
            "hello jetstream".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap_or_else(|e| panic!("NATS at {url}: publish not acknowledged: {e}"));
    assert_eq!(ack.stream, name);
    assert_eq!(ack.sequence, 1);
    assert!(!ack.duplicate);

    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("smoke".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.fetch().max_messages(1).messages().await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("fetched within 10 s")
        .expect("one message")
        .unwrap();
    assert_eq!(message.subject.as_str(), format!("{name}.0"));
    assert_eq!(&message.payload[..], b"hello jetstream");
    assert_eq!(message.info().unwrap().stream_sequence, 1);
    message.ack().await.unwrap();

    js.delete_stream(&name).await.unwrap();
}
