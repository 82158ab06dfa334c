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
//! ([`AvroCodec::registry_calls`] counts them); an id the registry does not
//! know is asked about again only after 10 s, so poison records framed with
//! it do not each cost a registry call.
//!
//! The hot path is `serde_avro_fast` — measured faster than `apache-avro`
//! in both directions (see `BENCHMARKS.md`) and bounded on hostile input:
//! lengths are checked against the bytes actually present before anything
//! is allocated, sequences are capped relative to the payload's size, and
//! nesting depth is limited, so garbage costs an error, not memory.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

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
    /// The schema's graph, for checking JSON values against its logical
    /// types ([`AvroCodec::encode_json`]).
    graph: Option<serde_avro_fast::schema::SchemaMut>,
    /// The schema's JSON, for filling in defaults
    /// ([`AvroCodec::encode_json`]).
    json: Option<serde_json::Value>,
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
    /// Ids the registry said it does not know, and when: a stream of
    /// records framed with such an id (poison) asks the registry once per
    /// [`UNKNOWN_ID_TTL`], not once per record.
    unknown: Mutex<HashMap<u32, Instant>>,
    registry_calls: AtomicU64,
}

/// How long an id the registry does not know is answered from memory.
const UNKNOWN_ID_TTL: Duration = Duration::from_secs(10);

/// Most unknown ids remembered (a hostile stream of random ids is bounded;
/// past it the memory starts afresh).
const MAX_UNKNOWN_IDS: usize = 1024;

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
            unknown: Mutex::default(),
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

    /// Encodes a JSON value (`keel publish`'s input) with the schema
    /// registered under `id`. Values the schema's logical types cannot hold
    /// exactly are refused, naming the field: a decimal with more places
    /// than its scale (never rounded) or more digits than its precision, a
    /// `uuid` string that is not a hyphenated UUID. Decimals are JSON
    /// strings or integers (a JSON number with a fraction is refused: it
    /// is a binary float once parsed). Record fields the value leaves out
    /// take their schema defaults, as an Avro reader fills fields an older
    /// writer did not know (not `bytes` or `fixed` ones, decimals among
    /// them: their defaults are not decimal text).
    pub async fn encode_json(&self, id: u32, value: &serde_json::Value) -> Result<Vec<u8>> {
        let reader = self.reader(id).await?;
        let refused = |reason| SchemaError::Json {
            schema_id: id,
            reason,
        };
        // Fields an older version of the record did not have take their
        // defaults, as an Avro reader would fill them.
        let filled = reader
            .json
            .as_ref()
            .and_then(|schema| crate::defaults::fill(schema, value));
        let value = filled.as_ref().unwrap_or(value);
        if let Some(graph) = &reader.graph {
            crate::logical::check(graph, value).map_err(refused)?;
        }
        let mut out = Vec::with_capacity(128);
        out.push(MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        let mut config = SerializerConfig::new(&reader.schema);
        serde_avro_fast::to_datum(value, out, &mut config).map_err(|e| refused(e.to_string()))
    }

    /// Encodes any serializable value with the schema registered under
    /// `id` (for JSON, [`AvroCodec::encode_json`] also checks logical
    /// types).
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
        let resolved = resolve(&derived, &References::new())?;
        let text = resolved.to_string();
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
        let money = T::MONEY_DECIMALS
            .then(|| money_as_bytes(&resolved))
            .flatten();
        let writer = Arc::new(match money {
            Some(schema) => Writer {
                id,
                schema,
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

    /// Whether the registry said in the last [`UNKNOWN_ID_TTL`] that it does
    /// not know `id`.
    fn recently_unknown(&self, id: u32) -> bool {
        let mut unknown = lock(&self.unknown);
        match unknown.get(&id) {
            Some(at) if at.elapsed() < UNKNOWN_ID_TTL => true,
            Some(_) => {
                unknown.remove(&id);
                false
            }
            None => false,
        }
    }

    /// The writer schema with id `id`, from the cache or the registry.
    async fn reader(&self, id: u32) -> Result<Arc<Reader>> {
        if let Some(r) = read(&self.readers).iter().find(|r| r.id == id) {
            return Ok(r.clone());
        }
        if self.recently_unknown(id) {
            return Err(SchemaError::UnknownSchemaId(id));
        }
        self.registry_calls.fetch_add(1, Ordering::Relaxed);
        let text = match self.registry.schema_by_id(id).await {
            Err(SchemaError::UnknownSchemaId(_)) => {
                let mut unknown = lock(&self.unknown);
                if unknown.len() >= MAX_UNKNOWN_IDS {
                    unknown.clear();
                }
                unknown.insert(id, Instant::now());
                return Err(SchemaError::UnknownSchemaId(id));
            }
            answer => answer?,
        };
        let schema = parse_fast(&text)?;
        let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        let money = json.as_ref().and_then(money_as_bytes);
        let graph = text.parse().ok();
        let reader = Arc::new(Reader {
            id,
            schema,
            money,
            graph,
            json,
        });
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
/// itself, so the encoding is the same. `None` when the schema has no such
/// decimal, when a decimal is `fixed`-based (Money writes the shortest
/// form, which a `fixed` size need not match) or of another scale, or when
/// the result does not parse: such types go through decimal text.
fn money_as_bytes(schema: &serde_json::Value) -> Option<FastSchema> {
    let mut changed = false;
    let plain = plain_decimals(schema, &mut changed)?;
    if !changed {
        return None;
    }
    plain.to_string().parse().ok()
}

/// The type `schema` with its decimals as plain `bytes` (see
/// [`money_as_bytes`]), walking type positions only: union branches,
/// record fields' types, array items, map values.
fn plain_decimals(schema: &serde_json::Value, changed: &mut bool) -> Option<serde_json::Value> {
    use serde_json::Value;
    match schema {
        Value::Array(branches) => branches
            .iter()
            .map(|b| plain_decimals(b, changed))
            .collect::<Option<Vec<_>>>()
            .map(Value::Array),
        Value::Object(fields) => {
            if fields.get("logicalType").and_then(Value::as_str) == Some("decimal") {
                let money = fields.get("type").and_then(Value::as_str) == Some("bytes")
                    && fields.get("scale").and_then(Value::as_u64)
                        == Some(crate::events::Money::SCALE as u64);
                if !money {
                    return None;
                }
                *changed = true;
                return Some(serde_json::json!({"type": "bytes"}));
            }
            let mut plain = fields.clone();
            match fields.get("type").and_then(Value::as_str) {
                Some("record" | "error") => {
                    if let Some(Value::Array(members)) = plain.get_mut("fields") {
                        for member in members {
                            if let Some(t) = member.get_mut("type") {
                                *t = plain_decimals(t, changed)?;
                            }
                        }
                    }
                }
                Some("array") => {
                    if let Some(items) = plain.get_mut("items") {
                        *items = plain_decimals(items, changed)?;
                    }
                }
                Some("map") => {
                    if let Some(values) = plain.get_mut("values") {
                        *values = plain_decimals(values, changed)?;
                    }
                }
                // `{"type": {…}}`: a type wrapped in another object.
                None => {
                    if let Some(inner) = plain.get_mut("type") {
                        *inner = plain_decimals(inner, changed)?;
                    }
                }
                Some(_) => {}
            }
            Some(Value::Object(plain))
        }
        other => Some(other.clone()),
    }
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{money_as_bytes, plain_decimals};

    fn plain(schema: &serde_json::Value) -> Option<serde_json::Value> {
        let mut changed = false;
        plain_decimals(schema, &mut changed).filter(|_| changed)
    }

    #[test]
    fn only_money_decimals_in_type_positions_become_bytes() {
        let money = json!({"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2});
        let schema = json!({"type": "record", "name": "r", "fields": [
            {"name": "total", "type": money},
            {"name": "maybe", "type": ["null", money]},
            {"name": "lines", "type": {"type": "array", "items": money}},
            {"name": "by_sku", "type": {"type": "map", "values": money}},
            // Field-level logicalType is not a type: left as it is.
            {"name": "odd", "type": "bytes", "logicalType": "decimal", "scale": 2},
        ]});
        let bytes = json!({"type": "bytes"});
        assert_eq!(
            plain(&schema),
            Some(json!({"type": "record", "name": "r", "fields": [
                {"name": "total", "type": bytes},
                {"name": "maybe", "type": ["null", bytes]},
                {"name": "lines", "type": {"type": "array", "items": bytes}},
                {"name": "by_sku", "type": {"type": "map", "values": bytes}},
                {"name": "odd", "type": "bytes", "logicalType": "decimal", "scale": 2},
            ]}))
        );
        assert!(money_as_bytes(&schema).is_some());
    }

    #[test]
    fn schemas_money_cannot_hold_keep_the_text_path() {
        let record = |t: serde_json::Value| json!({"type": "record", "name": "r", "fields": [{"name": "a", "type": t}]});
        // No decimal at all: nothing to gain, no second schema.
        assert!(money_as_bytes(&record(json!("string"))).is_none());
        // Another scale, or a fixed-size decimal.
        assert!(
            money_as_bytes(&record(
                json!({"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 3})
            ))
            .is_none()
        );
        assert!(
            money_as_bytes(&record(json!({"type": "fixed", "name": "f", "size": 8,
            "logicalType": "decimal", "precision": 12, "scale": 2})))
            .is_none()
        );
    }
}
