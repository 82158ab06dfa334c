//! The transport conformance suite against a real Kafka-compatible broker
//! (tansu in CI): every feature the Kafka transport claims.

use keel_consumers::kafka::{KafkaConsumerConfig, KafkaTransport};
use keel_integration_tests::kafka_bootstrap;
use keel_producers::kafka::{KafkaClientConfig, KafkaPublisherConfig};

async fn kafka_transport() -> KafkaTransport {
    let client = KafkaClientConfig::new([kafka_bootstrap().await]);
    KafkaTransport::new(
        KafkaPublisherConfig {
            client: client.clone(),
            ..KafkaPublisherConfig::default()
        },
        KafkaConsumerConfig {
            client,
            commit_interval_ms: 100,
            drain_timeout_ms: 5_000,
            session_timeout_ms: 10_000,
            ..KafkaConsumerConfig::default()
        },
        1,
    )
    .unwrap_or_else(|e| panic!("cannot build the Kafka transport: {e}"))
}

keel_core::conformance_tests!(kafka_transport().await);
