//! Consuming from Kafka.
//!
//! | module | what it holds |
//! |---|---|
//! | [`group`] | [`KafkaGroupConsumer`]: group membership, rebalances, commits |
//! | `engine` | the per-key-parallel dispatch engine of one member |
//! | [`transport`] | [`KafkaTransport`]: publisher + group consumer + admin as one [`keel_core::Transport`] |

mod engine;
pub mod group;
pub mod transport;

pub use group::{KafkaConsumerConfig, KafkaGroupConsumer};
pub use transport::KafkaTransport;
