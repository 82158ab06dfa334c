//! `keel-schemas`: how Keel events look on the wire.
//!
//! | module | what it holds |
//! |---|---|
//! | [`codec`] | [`AvroCodec`]: typed events ⇄ framed Avro, with schema resolution and caching |
//! | [`framing`] | the Confluent wire format: `0x00`, 4-byte big-endian schema id, Avro body |
//! | [`registry`] | the [`Registry`] trait the codec uses, and the in-memory [`LocalRegistry`] |
//! | [`compat`] | compatibility levels and Avro's resolution rules (Java `SchemaCompatibility`) |
//! | [`canonical`] | resolving references and the normal form schemas are compared in |
//! | [`subject`] | subject name strategies: topic-name, record-name, topic-record-name |
//! | [`events`] | the example domain's event types (`OrderPlaced`, `PaymentCaptured`, …) |
//! | [`domain`] | the example domain's `.avsc` files, embedded |
//! | [`error`] | [`SchemaError`] |
//! | [`testdata`] | sample events for tests, benchmarks and fuzzing |
//!
//! The registry client and the Confluent-compatible registry server land
//! here next.

#![forbid(unsafe_code)]

pub mod canonical;
pub mod codec;
pub mod compat;
pub mod domain;
pub mod error;
pub mod events;
pub mod framing;
pub mod registry;
pub mod subject;
pub mod testdata;

pub use codec::{AvroCodec, CodecOptions};
pub use error::SchemaError;
pub use registry::{LocalRegistry, Registry};
pub use subject::SubjectNameStrategy;
