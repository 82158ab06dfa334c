//! The transport conformance suite against a real Kafka-compatible broker
//! (tansu in CI): every feature the Kafka transport claims.

use keel_integration_tests::kafka_transport;

keel_core::conformance_tests!(kafka_transport().await);
