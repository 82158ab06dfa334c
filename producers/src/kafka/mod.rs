//! Publishing to Kafka (Apache Kafka, Redpanda, MSK, Confluent Cloud; tansu
//! in tests).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | typed, validated client and publisher settings → librdkafka |
//! | [`publisher`] | [`KafkaPublisher`]: idempotent, murmur2-partitioned, acked publishes |
//! | [`admin`] | [`KafkaAdmin`]: idempotent topic creation |
//! | [`context`] | [`ErrorMemory`]: the client's last error, for timeouts that say why |

pub mod admin;
pub mod config;
pub mod context;
pub mod publisher;

pub use admin::{
    CleanupPolicy, GroupSummary, KafkaAdmin, PartitionDescription, PartitionLag, ResetTo,
    TopicDescription, TopicSettings,
};
pub use config::{Compression, KafkaClientConfig, KafkaPublisherConfig, KafkaSecurity};
pub use context::ErrorMemory;
pub use publisher::KafkaPublisher;
