//! Consuming from NATS JetStream.
//!
//! | module | what it holds |
//! |---|---|
//! | [`group`] | [`JetStreamGroupConsumer`]: consumer groups with per-key order, leases in a KV bucket |
//! | [`transport`] | [`NatsTransport`]: publisher + group consumer + admin as one [`keel_core::Transport`] |

pub mod group;
pub mod transport;

pub use group::{JetStreamConsumerConfig, JetStreamGroupConsumer};
pub use transport::NatsTransport;
