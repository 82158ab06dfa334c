//! The event envelope: what travels between services, whatever the broker.
//!
//! Like Watermill's message the core is tiny — an id, metadata and payload
//! bytes — but the metadata Keel relies on (event type, key, occurred-at,
//! producing service, correlation and causation ids, W3C trace context) has
//! typed accessors instead of stringly-typed map lookups. The payload is
//! opaque here: the schema crate frames it (Confluent wire format).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::Error;

/// A globally unique event id (UUIDv7: time-ordered, so ids sort roughly by
/// creation time). It is the de-duplication key everywhere in Keel.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(Uuid);

impl EventId {
    /// A new UUIDv7 id.
    pub fn new() -> Self {
        id_and_time().0
    }

    /// Wraps an existing UUID (for example one read back from a database).
    pub fn from_uuid(uuid: Uuid) -> Self {
        EventId(uuid)
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({})", self.0.hyphenated())
    }
}

impl FromStr for EventId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Uuid::parse_str(s)
            .map(EventId)
            .map_err(|e| Error::malformed(format!("event id `{s}` is not a UUID: {e}")))
    }
}

/// The partitioning key: the id of the entity or aggregate the event is
/// about. Events with the same key keep their order end to end.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(Bytes);

impl Key {
    /// A key from raw bytes (Kafka keys are bytes; Keel's are usually text).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        Key(bytes.into())
    }

    /// The key's bytes, as hashed by the partitioner.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key as text, when it is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Key(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Key {
    fn from(s: String) -> Self {
        Key(Bytes::from(s))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_str() {
            Some(s) => f.write_str(s),
            None => write!(f, "0x{}", hex(&self.0)),
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// W3C trace context (`traceparent` / `tracestate`), carried verbatim so a
/// consumer continues the producer's trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// The `traceparent` header, e.g. `00-<trace-id>-<span-id>-01`.
    pub traceparent: Option<String>,
    /// The `tracestate` header (vendor-specific trace data).
    pub tracestate: Option<String>,
}

/// One event: id, type, key, metadata and opaque payload bytes.
///
/// Build it with [`Envelope::new`] and the `with_*` methods; a consumer gets
/// it back with the same values, whichever broker carried it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    id: EventId,
    // Borrowed when given a `&'static str` (an event type's full name, a
    // service's fixed name): no allocation per event.
    event_type: Cow<'static, str>,
    key: Key,
    occurred_at: DateTime<Utc>,
    source: Option<Cow<'static, str>>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    trace: TraceContext,
    headers: BTreeMap<String, String>,
    /// Earlier values of application headers a record carried more than
    /// once (Kafka and NATS allow it): sorted by name, a name's values in
    /// record order; `headers` holds each name's last value. Empty (no
    /// allocation) for almost every event.
    repeated_headers: Vec<(String, String)>,
    payload: Bytes,
}

impl Envelope {
    /// A new event with a fresh UUIDv7 id, occurring now.
    ///
    /// `event_type` is the Avro full name of the payload's schema
    /// (`shop.orders.OrderPlaced`): a `&'static str` (such as
    /// `Event::FULL_NAME`) is kept as it is, a `String` is taken over; pass
    /// a borrowed, non-`'static` `&str` as `s.to_owned()`.
    pub fn new(
        event_type: impl Into<Cow<'static, str>>,
        key: impl Into<Key>,
        payload: impl Into<Bytes>,
    ) -> Self {
        let (id, occurred_at) = id_and_time();
        Envelope {
            id,
            event_type: event_type.into(),
            key: key.into(),
            occurred_at,
            source: None,
            correlation_id: None,
            causation_id: None,
            trace: TraceContext::default(),
            headers: BTreeMap::new(),
            repeated_headers: Vec::new(),
            payload: payload.into(),
        }
    }

    /// Replaces the id, e.g. to re-publish an event under its original id so
    /// consumers de-duplicate it.
    pub fn with_id(mut self, id: EventId) -> Self {
        self.id = id;
        self
    }

    /// Sets when the event happened (truncated to milliseconds, the wire's
    /// precision).
    pub fn with_occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = truncate_to_millis(at);
        self
    }

    /// Names the producing service (a `&'static str` is not copied; pass a
    /// borrowed, non-`'static` one as `s.to_owned()`).
    pub fn with_source(mut self, service: impl Into<Cow<'static, str>>) -> Self {
        self.source = Some(service.into());
        self
    }

    /// Sets the correlation id shared by every event of one business flow.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id: the id of the event (or command) that caused this one.
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Marks this event as caused by `cause`: causation id = the cause's id;
    /// correlation id and trace context are inherited (a flow's first event
    /// is its own correlation id).
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.causation_id = Some(cause.id.to_string());
        self.correlation_id = Some(
            cause
                .correlation_id
                .clone()
                .unwrap_or_else(|| cause.id.to_string()),
        );
        self.trace = cause.trace.clone();
        self
    }

    /// Sets the W3C trace context.
    pub fn with_trace(mut self, trace: TraceContext) -> Self {
        self.trace = trace;
        self
    }

    /// Sets an application header (replacing every value it had). Names
    /// starting with `keel-` and the trace-context names are Keel's own;
    /// the wire encoder refuses them.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        self.repeated_headers.retain(|(n, _)| *n != name);
        self.headers.insert(name, value.into());
        self
    }

    /// Adds one more value of an application header, keeping those it
    /// already has: a record may carry a header more than once, as Kafka
    /// and NATS allow. [`headers`](Self::headers) shows each name's last
    /// value, [`all_headers`](Self::all_headers) every value.
    pub fn with_added_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        add_header(
            &mut self.headers,
            &mut self.repeated_headers,
            name.into(),
            value.into(),
        );
        self
    }

    /// The event id.
    pub fn id(&self) -> EventId {
        self.id
    }

    /// The event type (Avro full name of the payload's schema).
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The partitioning key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// When the event happened (millisecond precision).
    pub fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }

    /// The producing service, if set.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The correlation id, if set.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// The causation id, if set.
    pub fn causation_id(&self) -> Option<&str> {
        self.causation_id.as_deref()
    }

    /// The W3C trace context.
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }

    /// Application headers (Keel's own metadata has the typed accessors
    /// above): each name's last value, for a header the record carried more
    /// than once (see [`all_headers`](Self::all_headers)).
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// Every application header value in name order, a repeated header's
    /// values in the order the record carried them: what Keel writes when
    /// it stores the event again (publish, dead letter, redrive, outbox).
    pub fn all_headers(&self) -> impl Iterator<Item = (&str, &str)> {
        // Both are sorted by name, and every repeated name is in the map.
        let mut earlier = self.repeated_headers.as_slice();
        self.headers.iter().flat_map(move |(name, last)| {
            let n = earlier.iter().take_while(|(n, _)| n == name).count();
            let (mine, rest) = earlier.split_at(n);
            earlier = rest;
            mine.iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .chain(std::iter::once((name.as_str(), last.as_str())))
        })
    }

    /// Whether some application header has more than one value.
    pub fn has_repeated_headers(&self) -> bool {
        !self.repeated_headers.is_empty()
    }

    /// The payload bytes (Confluent-framed Avro for schema-registered events).
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Total size on the wire, roughly: payload + key + header bytes. Used
    /// for size limits, not for billing.
    pub fn approximate_size(&self) -> usize {
        self.payload.len()
            + self.key.as_bytes().len()
            + self.event_type.len()
            + self
                .all_headers()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 128
    }

    // Fields set by the wire decoder, which is in a sibling module.
    pub(crate) fn from_parts(parts: EnvelopeParts) -> Self {
        Envelope {
            id: parts.id,
            event_type: parts.event_type,
            key: parts.key,
            occurred_at: parts.occurred_at,
            source: parts.source,
            correlation_id: parts.correlation_id,
            causation_id: parts.causation_id,
            trace: parts.trace,
            headers: parts.headers,
            repeated_headers: parts.repeated_headers,
            payload: parts.payload,
        }
    }
}

/// Adds `value` under `name`, moving an earlier value of the name to
/// `repeated` (kept sorted by name, a name's values in the order added; the
/// last one in `headers`), so that the same values in any order of names
/// make the same envelope.
pub(crate) fn add_header(
    headers: &mut BTreeMap<String, String>,
    repeated: &mut Vec<(String, String)>,
    name: String,
    value: String,
) {
    match headers.entry(name) {
        Entry::Vacant(slot) => {
            slot.insert(value);
        }
        Entry::Occupied(mut slot) => {
            let earlier = slot.insert(value);
            let name = slot.key();
            let at = repeated.partition_point(|(n, _)| n <= name);
            repeated.insert(at, (name.clone(), earlier));
        }
    }
}

/// Every field of an envelope, for the wire decoder.
pub(crate) struct EnvelopeParts {
    pub(crate) id: EventId,
    pub(crate) event_type: Cow<'static, str>,
    pub(crate) key: Key,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) source: Option<Cow<'static, str>>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<String>,
    pub(crate) trace: TraceContext,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) repeated_headers: Vec<(String, String)>,
    pub(crate) payload: Bytes,
}

/// Orders this process's event ids, as `Uuid::now_v7` does with uuid's own
/// context; Keel keeps its own so that one clock read serves both the id
/// and the envelope's time (clock reads showed up in publish profiles).
static ID_CONTEXT: std::sync::Mutex<uuid::ContextV7> =
    std::sync::Mutex::new(uuid::ContextV7::new());

/// A fresh UUIDv7 event id and the millisecond it was taken at.
fn id_and_time() -> (EventId, DateTime<Utc>) {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let timestamp = uuid::Timestamp::from_unix(
        &ID_CONTEXT,
        since_epoch.as_secs(),
        since_epoch.subsec_nanos(),
    );
    let millis = i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX);
    (
        EventId(Uuid::new_v7(timestamp)),
        DateTime::from_timestamp_millis(millis).unwrap_or_default(),
    )
}

fn truncate_to_millis(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_events_get_distinct_time_ordered_ids() {
        let a = Envelope::new("t", "k", "p");
        let b = Envelope::new("t", "k", "p");
        assert_ne!(a.id(), b.id());
        assert!(a.id() < b.id(), "UUIDv7 ids sort by creation time");
        assert_eq!(a.id().as_uuid().get_version_num(), 7);
    }

    #[test]
    fn caused_by_links_the_flow() {
        let order = Envelope::new("OrderPlaced", "o-1", "").with_trace(TraceContext {
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: None,
        });
        let payment = Envelope::new("PaymentCaptured", "o-1", "").caused_by(&order);
        assert_eq!(
            payment.causation_id(),
            Some(order.id().to_string().as_str())
        );
        assert_eq!(
            payment.correlation_id(),
            Some(order.id().to_string().as_str())
        );
        assert_eq!(payment.trace(), order.trace());
        let shipment = Envelope::new("ShipmentDispatched", "o-1", "").caused_by(&payment);
        assert_eq!(shipment.correlation_id(), payment.correlation_id());
        assert_eq!(
            shipment.causation_id(),
            Some(payment.id().to_string().as_str())
        );
    }

    #[test]
    fn event_ids_parse_back_and_reject_garbage() {
        let id = EventId::new();
        assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        let err = "not-a-uuid".parse::<EventId>().unwrap_err();
        assert!(err.to_string().contains("not-a-uuid"), "{err}");
    }

    #[test]
    fn binary_keys_display_as_hex() {
        assert_eq!(Key::from_bytes(vec![0xff, 0x00]).to_string(), "0xff00");
        assert_eq!(Key::from("order-7").to_string(), "order-7");
    }
}
