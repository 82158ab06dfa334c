//! Publishing to NATS JetStream (nats-server 2.9+; JetStream enabled).
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | typed, validated connection settings: servers, credentials, TLS |
//! | [`admin`] | [`JetStreamAdmin`]: one stream per topic, validated; lag; group resets |
//! | [`publisher`] | [`JetStreamPublisher`]: de-duplicated, acked, pipelined publishes |
//! | [`groups`] | the KV layout consumer groups coordinate through |

pub mod admin;
pub mod config;
pub mod groups;
pub mod publisher;

pub use admin::{
    GroupSummary, JetStreamAdmin, PartitionPending, StreamDescription, StreamSettings,
};
pub use config::NatsClientConfig;
pub use keel_core::config::{NatsAuth, NatsTls};
pub use publisher::{JetStreamPublisher, JetStreamPublisherConfig};
