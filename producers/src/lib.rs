//! `keel-producers`: the publishing side of Keel.
//!
//! The Kafka publisher (idempotent, murmur2-partitioned), the JetStream
//! publisher (de-duplicating by event id) and the transactional outbox with
//! its relay land here with their capabilities. Until then, publish through
//! any [`keel_core::Publisher`], such as [`keel_core::MemoryTransport`].

#![forbid(unsafe_code)]
