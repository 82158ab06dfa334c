//! The error type of `keel-schemas`.

use keel_core::BoxError;

/// `Result` with [`SchemaError`] as the default error type.
pub type Result<T, E = SchemaError> = std::result::Result<T, E>;

/// What went wrong encoding, decoding or registering a schema.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The payload is not in the Confluent wire format.
    #[error("payload is not Confluent-framed Avro: {0}")]
    Framing(String),

    /// The payload names a schema id the registry does not know.
    #[error("schema id {0} is not in the registry")]
    UnknownSchemaId(u32),

    /// No schema is registered for a subject (and auto-registration is off).
    #[error(
        "no schema for `{rust_type}` is registered under subject `{subject}`; \
         register it (keel schema register) or enable auto-registration"
    )]
    NotRegistered {
        /// The subject looked up.
        subject: String,
        /// The Rust type being encoded.
        rust_type: &'static str,
    },

    /// Avro bytes could not be decoded into the reader's type.
    #[error("cannot decode a `{rust_type}` written with schema {schema_id}: {reason}")]
    Decode {
        /// The writer's schema id.
        schema_id: u32,
        /// The reader's Rust type.
        rust_type: &'static str,
        /// What failed.
        reason: String,
    },

    /// A value could not be encoded with its schema.
    #[error("cannot encode a `{rust_type}` with schema {schema_id}: {reason}")]
    Encode {
        /// The writer's schema id.
        schema_id: u32,
        /// The Rust type.
        rust_type: &'static str,
        /// What failed.
        reason: String,
    },

    /// A JSON value does not fit the schema it is encoded with.
    #[error("the JSON value does not fit schema {schema_id}: {reason}")]
    Json {
        /// The schema's id.
        schema_id: u32,
        /// What does not fit, naming the field.
        reason: String,
    },

    /// A schema document is not valid Avro.
    #[error("invalid Avro schema: {0}")]
    InvalidSchema(String),

    /// A registry client setting is wrong (the URL, the CA certificate,
    /// the basic-auth credentials).
    #[error("schema registry client settings: {0}")]
    Settings(String),

    /// A subject name strategy Keel does not know.
    #[error(
        "unknown subject name strategy `{0}`; use topic-name, record-name or topic-record-name"
    )]
    UnknownStrategy(String),

    /// A registry server setting is wrong (the body limit, the basic-auth
    /// credentials).
    #[error("schema registry server settings: {0}")]
    ServerSettings(String),

    /// The registry answered with an error.
    #[error("schema registry answered {status} (error code {code}): {message}")]
    Registry {
        /// HTTP status.
        status: u16,
        /// Confluent error code (`40401`, `42201`, …).
        code: i64,
        /// The registry's message.
        message: String,
    },

    /// The registry could not be reached or did not answer in time.
    #[error("schema registry at {url} is unreachable: {cause}")]
    Unreachable {
        /// The registry URL.
        url: String,
        /// The HTTP client's error (in the message, not chained, so that
        /// reports do not repeat it).
        cause: BoxError,
    },
}

impl SchemaError {
    /// Whether the payload itself is at fault — bytes that will never
    /// decode (bad framing, a schema id the registry does not know, a body
    /// its schema does not read) — rather than the registry (unreachable,
    /// refusing, misconfigured), after which the same payload may decode.
    pub fn is_poison(&self) -> bool {
        matches!(
            self,
            SchemaError::Framing(_) | SchemaError::UnknownSchemaId(_) | SchemaError::Decode { .. }
        )
    }

    /// Whether trying again may succeed (registry unavailable or failing
    /// with a 5xx); decode errors and invalid schemas never will.
    pub fn is_retriable(&self) -> bool {
        match self {
            SchemaError::Unreachable { .. } => true,
            SchemaError::Registry { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

impl From<SchemaError> for keel_core::Error {
    fn from(e: SchemaError) -> Self {
        match e {
            // Bytes that will never decode: poison for dead letters.
            e if e.is_poison() => keel_core::Error::malformed(e.to_string()),
            e if e.is_retriable() => keel_core::Error::retriable(e),
            e => keel_core::Error::fatal(e),
        }
    }
}
