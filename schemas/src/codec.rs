//! The Avro codec: typed events ⇄ Confluent-framed Avro bytes.
//!
//! Encoding looks up (or, when allowed, registers) the event type's schema
//! under the subject its [`SubjectNameStrategy`] names, then writes
//! `0x00`, the schema id and the Avro body. Decoding reads the writer's
//! schema id, fetches that schema once, and resolves it against the
//! reader's Rust type by field name: fields the writer lacks take the
//! reader's default (`#[serde(default)]`), fields the reader lacks are
//! skipped, numeric promotions apply. After the first event of each type
//! and each writer schema, encode and decode make no registry calls
//! ([`AvroCodec::registry_calls`] counts them).
//!
//! The hot path is `serde_avro_fast` — measured faster than `apache-avro`
//! in both directions (see `BENCHMARKS.md`) and bounded on hostile input:
//! lengths are checked against the bytes actually present before anything
//! is allocated, sequences are capped relative to the payload's size, and
//! nesting depth is limited, so garbage costs an error, not memory.

use std::any::TypeId;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_avro_fast::Schema as FastSchema;
use serde_avro_fast::de::{DeserializerConfig, DeserializerState};
use serde_avro_fast::ser::SerializerConfig;

use crate::canonical::{References, resolve};
use crate::error::{Result, SchemaError};
use crate::events::Event;
use crate::framing::{self, MAGIC};
use crate::registry::Registry;
use crate::subject::SubjectNameStrategy;

/// How the codec finds writer schemas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodecOptions {
    /// Subject naming. Default: topic-name.
    pub strategy: SubjectNameStrategy,
    /// Register a type's schema when the subject lacks it. Default `false`:
    /// in production schemas are registered by CI (`keel schema register`),
    /// as with Confluent's `auto.register.schemas=false`.
    pub auto_register: bool,
}

impl Default for CodecOptions {
    fn default() -> Self {
        CodecOptions {
            strategy: SubjectNameStrategy::TopicName,
            auto_register: false,
        }
    }
}

struct Writer {
    id: u32,
    schema: FastSchema,
    /// `schema` has its decimals as plain `bytes`, which the type's
    /// [`Money`](crate::events::Money) fields write themselves
    /// ([`Event::MONEY_DECIMALS`]).
    money_as_bytes: bool,
}

/// A writer schema fetched by id, for decoding.
struct Reader {
    id: u32,
    schema: FastSchema,
    /// The same schema with its decimals as plain `bytes`, which
    /// [`Event::MONEY_DECIMALS`] types' [`Money`](crate::events::Money)
    /// fields read themselves; `None` when a decimal is `fixed`-based or of
    /// another scale.
    money: Option<FastSchema>,
}

impl Reader {
    fn decode<T: DeserializeOwned>(&self, body: &[u8], money_decimals: bool) -> Result<T> {
        match &self.money {
            Some(money) if money_decimals => {
                let _money = crate::events::MoneyAsBytes::enter();
                decode_body(money, self.id, body)
            }
            _ => decode_body(&self.schema, self.id, body),
        }
    }
}

/// Encodes and decodes events against a [`Registry`], caching schemas.
pub struct AvroCodec {
    registry: Arc<dyn Registry>,
    options: CodecOptions,
    /// Writer schemas by (Rust type, topic). A codec sees a handful of
    /// pairs, so a linear scan (no hashing, no allocation) beats a map here.
    writers: RwLock<Vec<(TypeId, String, Arc<Writer>)>>,
    /// Writer schemas by id, for decoding (few per codec: scanned, not hashed).
    readers: RwLock<Vec<Arc<Reader>>>,
    registry_calls: AtomicU64,
}

impl std::fmt::Debug for AvroCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvroCodec")
            .field("options", &self.options)
            .field("registry_calls", &self.registry_calls())
            .finish_non_exhaustive()
    }
}

impl AvroCodec {
    /// A codec on `registry`.
    pub fn new(registry: Arc<dyn Registry>, options: CodecOptions) -> Self {
        AvroCodec {
            registry,
            options,
            writers: RwLock::default(),
            readers: RwLock::default(),
            registry_calls: AtomicU64::new(0),
        }
    }

    /// How many registry calls this codec has made (zero per message once
    /// warm).
    pub fn registry_calls(&self) -> u64 {
        self.registry_calls.load(Ordering::Relaxed)
    }

    /// The subject `T` is registered under on `topic`.
    pub fn subject<T: Event>(&self, topic: &str) -> String {
        self.options.strategy.subject(topic, T::FULL_NAME)
    }

    /// Encodes `event` for `topic`: Confluent framing + Avro body.
    pub async fn encode<T: Event + 'static>(&self, topic: &str, event: &T) -> Result<Vec<u8>> {
        {
            let writers = read(&self.writers);
            if let Some((_, _, writer)) = writers
                .iter()
                .find(|(ty, t, _)| *ty == TypeId::of::<T>() && t == topic)
            {
                return encode_with(writer, event);
            }
        }
        let writer = self.writer::<T>(topic).await?;
        encode_with(&writer, event)
    }

    /// Decodes a framed payload into the event type `T`, resolving the
    /// writer's schema against `T`.
    pub async fn decode<T: Event>(&self, payload: &[u8]) -> Result<T> {
        self.decode_as::<T>(payload, T::MONEY_DECIMALS).await
    }

    /// Decodes a framed payload into any deserializable `T` (not only an
    /// [`Event`]), resolving the writer's schema against it.
    pub async fn decode_value<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T> {
        self.decode_as::<T>(payload, false).await
    }

    /// Decodes a framed payload into JSON (for `keel tail` and dead-letter
    /// listings): records as objects, decimals as strings, timestamps as
    /// epoch milliseconds.
    pub async fn decode_json(&self, payload: &[u8]) -> Result<serde_json::Value> {
        self.decode_value::<serde_json::Value>(payload).await
    }

    async fn decode_as<T: DeserializeOwned>(
        &self,
        payload: &[u8],
        money_decimals: bool,
    ) -> Result<T> {
        let (id, body) = framing::unframe(payload)?;
        {
            let readers = read(&self.readers);
            if let Some(reader) = readers.iter().find(|r| r.id == id) {
                return reader.decode(body, money_decimals);
            }
        }
        self.reader(id).await?.decode(body, money_decimals)
    }

    /// Encodes any serializable value (e.g. JSON from `keel publish`) with
    /// the schema registered under `id`.
    pub async fn encode_with_id<V: Serialize + ?Sized>(
        &self,
        id: u32,
        value: &V,
    ) -> Result<Vec<u8>> {
        let schema = &self.reader(id).await?.schema;
        let mut out = Vec::with_capacity(128);
        out.push(MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        let mut config = SerializerConfig::new(schema);
        serde_avro_fast::to_datum(value, out, &mut config).map_err(|e| SchemaError::Encode {
            schema_id: id,
            rust_type: std::any::type_name::<V>(),
            reason: e.to_string(),
        })
    }

    /// The writer schema for `T` on `topic`, from the registry (the cached
    /// case is handled inline by `encode`).
    async fn writer<T: Event + 'static>(&self, topic: &str) -> Result<Arc<Writer>> {
        let subject = self.subject::<T>(topic);
        let derived = serde_json::to_value(T::get_schema())
            .map_err(|e| SchemaError::InvalidSchema(format!("{}: {e}", T::FULL_NAME)))?;
        let text = resolve(&derived, &References::new())?.to_string();
        self.registry_calls.fetch_add(1, Ordering::Relaxed);
        let id = match self.registry.lookup(&subject, &text).await? {
            Some(id) => id,
            None if self.options.auto_register => {
                self.registry_calls.fetch_add(1, Ordering::Relaxed);
                self.registry.register(&subject, &text).await?
            }
            None => {
                return Err(SchemaError::NotRegistered {
                    subject,
                    rust_type: std::any::type_name::<T>(),
                });
            }
        };
        let plain = if T::MONEY_DECIMALS {
            money_as_bytes(
                &serde_json::from_str(&text)
                    .map_err(|e| SchemaError::InvalidSchema(format!("{}: {e}", T::FULL_NAME)))?,
            )
        } else {
            None
        };
        let writer = Arc::new(match plain {
            Some(plain) => Writer {
                id,
                schema: parse_fast(&plain.to_string())?,
                money_as_bytes: true,
            },
            None => Writer {
                id,
                schema: parse_fast(&text)?,
                money_as_bytes: false,
            },
        });
        let mut writers = write(&self.writers);
        if !writers
            .iter()
            .any(|(ty, t, _)| *ty == TypeId::of::<T>() && t == topic)
        {
            writers.push((TypeId::of::<T>(), topic.to_owned(), writer.clone()));
        }
        Ok(writer)
    }

    /// The writer schema with id `id`, from the cache or the registry.
    async fn reader(&self, id: u32) -> Result<Arc<Reader>> {
        if let Some(r) = read(&self.readers).iter().find(|r| r.id == id) {
            return Ok(r.clone());
        }
        self.registry_calls.fetch_add(1, Ordering::Relaxed);
        let text = self.registry.schema_by_id(id).await?;
        let schema = parse_fast(&text)?;
        let money = match serde_json::from_str(&text)
            .ok()
            .as_ref()
            .and_then(money_as_bytes)
        {
            Some(plain) => Some(parse_fast(&plain.to_string())?),
            None => None,
        };
        let reader = Arc::new(Reader { id, schema, money });
        let mut readers = write(&self.readers);
        match readers.iter().find(|r| r.id == id) {
            Some(r) => Ok(r.clone()),
            None => {
                readers.push(reader.clone());
                Ok(reader)
            }
        }
    }
}

/// `schema` with every `bytes`-based `decimal` of Money's scale turned into
/// plain `bytes`, for a type whose decimals are all
/// [`Money`](crate::events::Money): it writes and reads the decimal's bytes
/// itself, so the encoding is the same. `None` when a decimal is
/// `fixed`-based (Money writes the shortest form, which a `fixed` size need
/// not match) or of another scale: such a type goes through decimal text.
fn money_as_bytes(schema: &serde_json::Value) -> Option<serde_json::Value> {
    use serde_json::Value;
    Some(match schema {
        Value::Object(fields) => {
            if fields.get("logicalType").and_then(Value::as_str) == Some("decimal") {
                let scale = fields.get("scale").and_then(Value::as_u64);
                if fields.get("type").and_then(Value::as_str) != Some("bytes")
                    || scale != Some(crate::events::Money::SCALE as u64)
                {
                    return None;
                }
                return Some(serde_json::json!({"type": "bytes"}));
            }
            let mut plain = serde_json::Map::with_capacity(fields.len());
            for (name, value) in fields {
                plain.insert(name.clone(), money_as_bytes(value)?);
            }
            Value::Object(plain)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(money_as_bytes)
                .collect::<Option<Vec<_>>>()?,
        ),
        other => other.clone(),
    })
}

fn encode_with<T: Serialize>(writer: &Writer, event: &T) -> Result<Vec<u8>> {
    let _money = writer
        .money_as_bytes
        .then(crate::events::MoneyAsBytes::enter);
    let mut out = Vec::with_capacity(256);
    out.push(MAGIC);
    out.extend_from_slice(&writer.id.to_be_bytes());
    let mut config = SerializerConfig::new(&writer.schema);
    serde_avro_fast::to_datum(event, out, &mut config).map_err(|e| SchemaError::Encode {
        schema_id: writer.id,
        rust_type: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}

fn parse_fast(text: &str) -> Result<FastSchema> {
    text.parse::<FastSchema>()
        .map_err(|e| SchemaError::InvalidSchema(e.to_string()))
}

/// Decodes an Avro body (no framing) written with `schema`.
pub fn decode_body<T: DeserializeOwned>(schema: &FastSchema, id: u32, body: &[u8]) -> Result<T> {
    let mut config = DeserializerConfig::new(schema);
    // Bounds the work hostile block counts can cause: real sequences are
    // never longer than their bytes (plus a little for zero-size items).
    config.max_seq_size = body.len().saturating_mul(8).saturating_add(1024);
    config.allowed_depth = 64;
    let mut state =
        DeserializerState::with_config(serde_avro_fast::de::read::SliceRead::new(body), config);
    T::deserialize(state.deserializer()).map_err(|e| SchemaError::Decode {
        schema_id: id,
        rust_type: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}
