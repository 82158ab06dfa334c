//! `keel-core`: the contract every Keel crate shares.
//!
//! | module | what it holds |
//! |---|---|
//! | [`envelope`] | [`Envelope`], [`EventId`] (UUIDv7), [`Key`], [`TraceContext`] |
//! | [`wire`] | envelope metadata ⇄ broker headers, the same on Kafka and NATS |
//! | [`partition`] | key → partition by murmur2, as Kafka's Java clients do |
//! | [`transport`] | [`Publisher`], [`Subscriber`], [`TopicAdmin`], [`Transport`], [`Capabilities`] |
//! | [`delivery`] | [`Delivery`] (ack/nack), [`Deliveries`] (a group member's stream) |
//! | [`handler`] | the [`Handler`] trait and [`handler_fn`] |
//! | [`config`] | [`KeelConfig`] from `keel.toml` + `KEEL_*`, [`BrokerUrl`] |
//! | [`error`] | [`Error`] with its retriable/fatal distinction |
//! | [`memory`] | [`MemoryTransport`], the in-process broker |
//! | `testkit` | the transport conformance suite (feature `testkit`) |
//!
//! The guarantees behind these traits (at-least-once, per-key order, commit
//! only after success) are stated in [`transport`] and tested for every
//! transport by the conformance suite.

#![forbid(unsafe_code)]

pub mod config;
pub mod delivery;
pub mod envelope;
pub mod error;
pub mod handler;
pub mod memory;
pub mod partition;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod transport;
pub mod wire;

pub use config::{BrokerUrl, KeelConfig, NatsAuth};
pub use delivery::{
    Coordinates, Deliveries, Delivery, DeliveryInfo, RawRecord, Settler, Undecodable,
};
pub use envelope::{Envelope, EventId, Key, TraceContext};
pub use error::{BoxError, Error, Result};
pub use handler::{Handler, handler_fn};
pub use memory::MemoryTransport;
pub use transport::{
    Capabilities, Publisher, Receipt, Sent, StartFrom, Subscriber, Subscription, TopicAdmin,
    TopicSpec, Transport,
};
