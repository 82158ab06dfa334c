//! `keel-consumers`: what runs on the consuming side of Keel.
//!
//! | module | what it holds |
//! |---|---|
//! | [`kafka`] | [`KafkaGroupConsumer`](kafka::KafkaGroupConsumer): per-key-parallel Kafka consumer groups |
//! | [`nats`] | [`JetStreamGroupConsumer`](nats::JetStreamGroupConsumer): per-key-ordered consumer groups on JetStream, coordinated through a KV bucket |
//! | `engine` | the per-key-parallel dispatch engine both group consumers share |
//! | [`serve`] | [`serve()`]: drive a group member's deliveries through a [`Handler`](keel_core::Handler) with bounded concurrency, ack on success, nack with backoff on failure, graceful drain on shutdown |
//! | [`router`] | [`Router`](router::Router): typed handlers per event type and topic, with middleware layers — retry, timeout, dead letters, poison detection, inbox, tracing, metrics, limits |
//!
//! Delivery guarantee: at-least-once. An event is acked only after its
//! handler returned `Ok`; a failed, panicked or abandoned handler leads to
//! re-delivery (per-key order is kept by the transport). With the router,
//! events that cannot be handled go to dead letters before they are acked.

#![forbid(unsafe_code)]

mod engine;
pub mod kafka;
pub mod nats;
mod pump;
pub mod router;
pub mod serve;

pub use serve::{ServeOptions, ServeReport, serve};
