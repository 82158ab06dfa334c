//! `keel-producers`: the publishing side of Keel.
//!
//! | module | what it holds |
//! |---|---|
//! | [`kafka`] | [`KafkaPublisher`](kafka::KafkaPublisher) and [`KafkaAdmin`](kafka::KafkaAdmin) |
//!
//! The JetStream publisher and the transactional outbox with its relay land
//! here with their capabilities.

#![forbid(unsafe_code)]

pub mod kafka;
