//! Consuming from Kafka.
//!
//! | module | what it holds |
//! |---|---|
//! | [`group`] | [`KafkaGroupConsumer`]: group membership, rebalances, commits |
//! | [`transport`] | [`KafkaTransport`]: publisher + group consumer + admin as one [`keel_core::Transport`] |

pub mod group;
pub mod transport;

pub use group::{KafkaConsumerConfig, KafkaGroupConsumer};
pub use transport::KafkaTransport;
