//! `keel-producers`: the publishing side of Keel.
//!
//! | module | what it holds |
//! |---|---|
//! | [`kafka`] | [`KafkaPublisher`](kafka::KafkaPublisher) and [`KafkaAdmin`](kafka::KafkaAdmin) |
//! | [`nats`] | [`JetStreamPublisher`](nats::JetStreamPublisher) and [`JetStreamAdmin`](nats::JetStreamAdmin) |
//!
//! The transactional outbox with its relay lands here with its capability.

#![forbid(unsafe_code)]

pub mod kafka;
pub mod nats;
