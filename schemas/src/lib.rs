//! `keel-schemas`: how Keel events look on the wire.
//!
//! | module | what it holds |
//! |---|---|
//! | [`codec`] | [`AvroCodec`]: typed events ⇄ framed Avro, with schema resolution and caching |
//! | [`framing`] | the Confluent wire format: `0x00`, 4-byte big-endian schema id, Avro body |
//! | [`client`] | [`RegistryClient`]: any Confluent-compatible registry over HTTP, cached, retrying |
//! | [`registry`] | the [`Registry`] trait the codec uses, and the in-memory [`LocalRegistry`] |
//! | [`compat`] | compatibility levels and Avro's resolution rules (Java `SchemaCompatibility`) |
//! | [`diff`] | field-by-field changes between two schemas |
//! | [`canonical`] | resolving references and the normal form schemas are compared in |
//! | [`server`] | the Confluent-compatible registry server (PostgreSQL or SQLite) |
//! | [`subject`] | subject name strategies: topic-name, record-name, topic-record-name |
//! | [`events`] | the example domain's event types (`OrderPlaced`, `PaymentCaptured`, …) |
//! | [`domain`] | the example domain's `.avsc` files, embedded |
//! | [`error`] | [`SchemaError`] |
//! | [`testdata`] | sample events for tests, benchmarks and fuzzing |

#![forbid(unsafe_code)]

pub mod canonical;
pub mod client;
pub mod codec;
pub mod compat;
mod defaults;
pub mod diff;
pub mod domain;
pub mod error;
pub mod events;
pub mod framing;
mod logical;
pub mod registry;
pub mod server;
pub mod subject;
pub mod testdata;

pub use client::{ClientOptions, RegistryClient};
pub use codec::{AvroCodec, CodecOptions};
pub use error::SchemaError;
pub use registry::{LocalRegistry, Registry};
pub use subject::SubjectNameStrategy;
