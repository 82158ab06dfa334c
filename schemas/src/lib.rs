//! `keel-schemas`: how Keel events look on the wire.
//!
//! | module | what it holds |
//! |---|---|
//! | [`framing`] | the Confluent wire format: `0x00`, 4-byte big-endian schema id, Avro body |
//! | [`events`] | the example domain's event types (`OrderPlaced`, `PaymentCaptured`, …) |
//! | [`domain`] | the example domain's `.avsc` files, embedded |
//!
//! The example domain's `.avsc` schemas, the Avro codec, the registry client
//! and the Confluent-compatible registry server land here with the schema
//! capability.

#![forbid(unsafe_code)]

pub mod domain;
pub mod events;
pub mod framing;
