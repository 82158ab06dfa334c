//! Envelope metadata as broker headers — the same names on Kafka and NATS.
//!
//! | header | value |
//! |---|---|
//! | `keel-event-id` | UUIDv7, hyphenated (on NATS also `Nats-Msg-Id`) |
//! | `keel-event-type` | Avro full name of the payload schema |
//! | `keel-occurred-at` | RFC 3339, UTC, milliseconds |
//! | `keel-source` | producing service (optional) |
//! | `keel-correlation-id` | optional |
//! | `keel-causation-id` | optional |
//! | `traceparent`, `tracestate` | W3C trace context, verbatim (optional) |
//! | `keel-key` / `keel-key-b64` | NATS only (no record key there): the key as text, or base64 when it is not printable text |
//!
//! Any other header is an application header and round-trips untouched;
//! `Nats-*` headers belong to the transport and are not part of the event.
//! Keel's own names compare case-insensitively; application header names
//! exactly (as Kafka and async-nats compare them).
//! Values are text so that NATS (text headers) and Kafka (byte headers) carry
//! the same thing; decoding never panics on foreign bytes and names the
//! offending header.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::envelope::{Envelope, EnvelopeParts, EventId, Key, TraceContext};
use crate::error::{Error, Result};

/// Header carrying the event id.
pub const EVENT_ID: &str = "keel-event-id";
/// Header carrying the event type.
pub const EVENT_TYPE: &str = "keel-event-type";
/// Header carrying the occurred-at timestamp.
pub const OCCURRED_AT: &str = "keel-occurred-at";
/// Header carrying the producing service.
pub const SOURCE: &str = "keel-source";
/// Header carrying the correlation id.
pub const CORRELATION_ID: &str = "keel-correlation-id";
/// Header carrying the causation id.
pub const CAUSATION_ID: &str = "keel-causation-id";
/// W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// On NATS, which has no record key: the event key as text.
pub const KEY: &str = "keel-key";
/// On NATS: the event key in base64, when it is not printable text.
pub const KEY_BASE64: &str = "keel-key-b64";

const TRANSPORT_PREFIX: &str = "Nats-";

/// The largest header value Keel accepts when decoding, in bytes. Larger
/// values are refused as malformed rather than copied.
pub const MAX_HEADER_VALUE: usize = 64 * 1024;

/// The envelope's metadata as `(name, value)` header pairs, Keel's first.
///
/// Fails when an application header uses a reserved name or a character
/// that a broker cannot carry (NATS header names are visible ASCII without
/// `:`; values cannot contain line breaks).
pub fn encode_headers(event: &Envelope) -> Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(8 + event.headers().len());
    visit_headers(event, |name, value| {
        out.push((name.to_owned(), String::from_utf8_lossy(value).into_owned()));
    })?;
    Ok(out)
}

/// Hands each header of `event` to `emit` as `(name, value bytes)`, Keel's
/// first, without allocating: the hot path of every publish. Validates as
/// [`encode_headers`] does, before emitting anything.
pub fn visit_headers(event: &Envelope, mut emit: impl FnMut(&str, &[u8])) -> Result<()> {
    check_value(EVENT_TYPE, event.event_type())?;
    let optional = [
        (SOURCE, event.source()),
        (CORRELATION_ID, event.correlation_id()),
        (CAUSATION_ID, event.causation_id()),
        (TRACEPARENT, event.trace().traceparent.as_deref()),
        (TRACESTATE, event.trace().tracestate.as_deref()),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            check_value(name, value)?;
        }
    }
    for (name, value) in event.all_headers() {
        if is_reserved(name) {
            return Err(Error::malformed(format!(
                "application header `{name}` uses a name reserved for Keel's own metadata; rename it"
            )));
        }
        if is_transport_header(name) {
            return Err(Error::malformed(format!(
                "application header `{name}` uses a name reserved for the transport; rename it"
            )));
        }
        check_name(name)?;
        check_value(name, value)?;
    }
    let mut id = uuid::Uuid::encode_buffer();
    emit(
        EVENT_ID,
        event
            .id()
            .as_uuid()
            .hyphenated()
            .encode_lower(&mut id)
            .as_bytes(),
    );
    emit(EVENT_TYPE, event.event_type().as_bytes());
    let mut at = [0u8; 32];
    emit(OCCURRED_AT, format_millis(event.occurred_at(), &mut at));
    for (name, value) in optional {
        if let Some(value) = value {
            emit(name, value.as_bytes());
        }
    }
    for (name, value) in event.all_headers() {
        emit(name, value.as_bytes());
    }
    Ok(())
}

/// One header name's values as text formats show them (`keel tail`, `keel
/// dlq list`, the outbox's `headers` column): a single value as itself, a
/// header given more than once as the list of its values in order.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum HeaderValues<V> {
    /// The header appears once.
    One(V),
    /// The header appears more than once: every value, in order.
    Many(Vec<V>),
}

/// Groups `(name, value)` pairs by name (in name order), a repeated name's
/// values in the order given: see [`HeaderValues`].
pub fn group_headers<'a, V>(
    pairs: impl IntoIterator<Item = (&'a str, V)>,
) -> BTreeMap<&'a str, HeaderValues<V>> {
    let mut grouped: BTreeMap<&'a str, Vec<V>> = BTreeMap::new();
    for (name, value) in pairs {
        grouped.entry(name).or_default().push(value);
    }
    grouped
        .into_iter()
        .map(|(name, mut values)| match values.len() {
            1 => (name, HeaderValues::One(values.remove(0))),
            _ => (name, HeaderValues::Many(values)),
        })
        .collect()
}

/// `2026-11-28T01:02:03.456Z` into `buf` (what `to_rfc3339_opts(Millis,
/// true)` writes, without its allocation and formatting machinery).
fn format_millis(at: DateTime<Utc>, buf: &mut [u8; 32]) -> &[u8] {
    use chrono::{Datelike, Timelike};
    let year = at.year();
    if !(0..=9999).contains(&year) {
        // Outside four-digit years, let chrono spell it.
        let text = at.to_rfc3339_opts(SecondsFormat::Millis, true);
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        return &buf[..n];
    }
    let fields = [
        (year as u32, 4usize),
        (at.month(), 2),
        (at.day(), 2),
        (at.hour(), 2),
        (at.minute(), 2),
        (at.second().min(59), 2),
        (at.timestamp_subsec_millis().min(999), 3),
    ];
    let separators = [b'-', b'-', b'T', b':', b':', b'.', b'Z'];
    let mut i = 0;
    for ((value, width), sep) in fields.into_iter().zip(separators) {
        let mut v = value;
        for pos in (0..width).rev() {
            buf[i + pos] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        i += width;
        buf[i] = sep;
        i += 1;
    }
    &buf[..i]
}

/// Rebuilds an envelope from a record's key, headers and payload.
///
/// Fails with [`Error::MalformedEvent`] naming the header when the record is
/// not a Keel event (missing key, id, type or time; non-UTF-8 or oversize
/// values; a Keel header given twice).
pub fn decode<'a>(
    key: Option<&[u8]>,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    payload: Bytes,
) -> Result<Envelope> {
    let key = key.ok_or_else(|| Error::malformed("record has no key; Keel events are keyed"))?;
    let mut id = None;
    let mut event_type = None;
    let mut occurred_at = None;
    let mut source = None;
    let mut correlation_id = None;
    let mut causation_id = None;
    let mut trace = TraceContext::default();
    let mut app = BTreeMap::new();
    let mut repeated = Vec::new();

    for (name, raw) in headers {
        if raw.len() > MAX_HEADER_VALUE {
            return Err(Error::malformed(format!(
                "header `{name}` is {} bytes, over the {MAX_HEADER_VALUE}-byte limit",
                raw.len()
            )));
        }
        let value = std::str::from_utf8(raw)
            .map_err(|_| Error::malformed(format!("header `{name}` is not UTF-8 text")))?;
        if is_transport_header(name) {
            continue;
        }
        let slot = match reserved(name).unwrap_or(name) {
            EVENT_ID => {
                set_once(&mut id, name, value.parse::<EventId>()?)?;
                continue;
            }
            EVENT_TYPE => &mut event_type,
            OCCURRED_AT => {
                let at = DateTime::parse_from_rfc3339(value)
                    .map_err(|e| {
                        Error::malformed(format!(
                            "header `{OCCURRED_AT}` = `{value}` is not an RFC 3339 time: {e}"
                        ))
                    })?
                    .with_timezone(&Utc);
                set_once(&mut occurred_at, name, at)?;
                continue;
            }
            SOURCE => &mut source,
            CORRELATION_ID => &mut correlation_id,
            CAUSATION_ID => &mut causation_id,
            TRACEPARENT => &mut trace.traceparent,
            TRACESTATE => &mut trace.tracestate,
            // Carried outside the envelope; see `key_from_headers`.
            KEY | KEY_BASE64 => continue,
            // Other names (including `keel-` names a newer Keel may add)
            // are application headers; they must survive re-publishing, so
            // only what every broker can carry is accepted.
            other => {
                check_name(other)?;
                check_value(other, value)?;
                // Kafka and NATS let a record carry a header more than
                // once: every value is kept, for re-publishing.
                crate::envelope::add_header(
                    &mut app,
                    &mut repeated,
                    other.to_owned(),
                    value.to_owned(),
                );
                continue;
            }
        };
        set_once(slot, name, value.to_owned())?;
    }

    let missing =
        |h: &str| Error::malformed(format!("record has no `{h}` header; is it a Keel event?"));
    Ok(Envelope::from_parts(EnvelopeParts {
        id: id.ok_or_else(|| missing(EVENT_ID))?,
        event_type: event_type.ok_or_else(|| missing(EVENT_TYPE))?.into(),
        key: Key::from_bytes(Bytes::copy_from_slice(key)),
        occurred_at: occurred_at.ok_or_else(|| missing(OCCURRED_AT))?,
        source: source.map(Into::into),
        correlation_id,
        causation_id,
        trace,
        headers: app,
        repeated_headers: repeated,
        payload,
    }))
}

/// The header that carries `key` on a broker without record keys (NATS):
/// `keel-key` when the key is printable text, else `keel-key-b64`.
pub fn key_header(key: &[u8]) -> (&'static str, String) {
    match std::str::from_utf8(key) {
        Ok(text) if !text.is_empty() && text.chars().all(|c| !c.is_control()) => {
            (KEY, text.to_owned())
        }
        _ => {
            use base64::Engine as _;
            (
                KEY_BASE64,
                base64::engine::general_purpose::STANDARD.encode(key),
            )
        }
    }
}

/// The key a NATS message carries in its headers ([`key_header`]), if any.
/// Fails naming the header when it is given twice or is not valid base64.
pub fn key_from_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<Option<Bytes>> {
    let mut key = None;
    for (name, value) in headers {
        let decoded = if name.eq_ignore_ascii_case(KEY) {
            Bytes::copy_from_slice(value)
        } else if name.eq_ignore_ascii_case(KEY_BASE64) {
            use base64::Engine as _;
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .map_err(|e| Error::malformed(format!("header `{name}` is not base64: {e}")))?,
            )
        } else {
            continue;
        };
        set_once(&mut key, name, decoded)?;
    }
    Ok(key)
}

fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<()> {
    if slot.is_some() {
        return Err(Error::malformed(format!(
            "header `{name}` appears more than once"
        )));
    }
    *slot = Some(value);
    Ok(())
}

/// Keel's own header names, which application headers may not use.
const RESERVED: [&str; 10] = [
    KEY,
    KEY_BASE64,
    EVENT_ID,
    EVENT_TYPE,
    OCCURRED_AT,
    SOURCE,
    CORRELATION_ID,
    CAUSATION_ID,
    TRACEPARENT,
    TRACESTATE,
];

/// Keel's header name for `name` (header names compare case-insensitively,
/// as in HTTP and NATS), if it is one.
fn reserved(name: &str) -> Option<&'static str> {
    RESERVED.into_iter().find(|r| r.eq_ignore_ascii_case(name))
}

fn is_reserved(name: &str) -> bool {
    reserved(name).is_some()
}

/// Headers that belong to a transport, not to the event (`Nats-Msg-Id`, …).
fn is_transport_header(name: &str) -> bool {
    name.as_bytes()
        .get(..TRANSPORT_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(TRANSPORT_PREFIX.as_bytes()))
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(Error::malformed(format!(
            "header name `{}` must be non-empty visible ASCII without `:`",
            name.escape_debug()
        )));
    }
    Ok(())
}

fn check_value(name: &str, value: &str) -> Result<()> {
    if value.contains(['\r', '\n']) {
        return Err(Error::malformed(format!(
            "header `{name}` contains a line break, which brokers cannot carry"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(event: &Envelope) -> Envelope {
        let headers = encode_headers(event).unwrap();
        decode(
            Some(event.key().as_bytes()),
            headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
            event.payload().clone(),
        )
        .unwrap()
    }

    #[test]
    fn the_fast_time_format_is_rfc3339_millis() {
        for ms in [0, 1, 999, 1_764_292_000_123, 253_402_300_799_999] {
            let at = DateTime::from_timestamp_millis(ms).unwrap();
            let mut buf = [0u8; 32];
            assert_eq!(
                std::str::from_utf8(format_millis(at, &mut buf)).unwrap(),
                at.to_rfc3339_opts(SecondsFormat::Millis, true)
            );
        }
    }

    #[test]
    fn every_field_round_trips() {
        let event = Envelope::new(
            "shop.orders.OrderPlaced",
            "order-1",
            &b"\0\0\0\0\x01avro"[..],
        )
        .with_source("orders")
        .with_correlation_id("corr-1")
        .with_causation_id("cause-1")
        .with_trace(TraceContext {
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: Some("congo=t61rcWkgMzE".into()),
        })
        .with_header("tenant", "acme");
        assert_eq!(roundtrip(&event), event);
        let bare = Envelope::new("t", Key::from_bytes(vec![0, 255]), Bytes::new());
        assert_eq!(roundtrip(&bare), bare);
    }

    #[test]
    fn foreign_records_are_refused_by_name() {
        let err = decode(Some(b"k"), [("foo", &b"bar"[..])], Bytes::new()).unwrap_err();
        assert!(err.to_string().contains(EVENT_ID), "{err}");
        let err = decode(None, [], Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("no key"), "{err}");
        let id = EventId::new().to_string();
        let err = decode(
            Some(b"k"),
            [(EVENT_ID, id.as_bytes()), (EVENT_ID, id.as_bytes())],
            Bytes::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("more than once"), "{err}");
        let err = decode(Some(b"k"), [(EVENT_TYPE, &[0xff, 0xfe][..])], Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        let err = decode(
            Some(b"k"),
            [
                (EVENT_ID, id.as_bytes()),
                (EVENT_TYPE, b"t"),
                (OCCURRED_AT, b"yesterday"),
            ],
            Bytes::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("yesterday"), "{err}");
        let err = decode(Some(b"k"), [("a:b", &b"x"[..])], Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("a:b"), "{err}");
        let err = decode(Some(b"k"), [("x", &b"a\r\nb"[..])], Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("line break"), "{err}");
        let err = decode(Some(b"k"), [("abcd\u{e9}", &b"x"[..])], Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("visible ASCII"), "{err}");
        let huge = vec![b'a'; MAX_HEADER_VALUE + 1];
        let err = decode(Some(b"k"), [("x", huge.as_slice())], Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
    }

    #[test]
    fn names_compare_case_insensitively_and_transport_headers_are_dropped() {
        let id = EventId::new().to_string();
        let event = decode(
            Some(b"k"),
            [
                ("Keel-Event-Id", id.as_bytes()),
                ("KEEL-EVENT-TYPE", b"t"),
                ("keel-occurred-at", b"2026-11-28T01:02:03.456Z"),
                (
                    "Traceparent",
                    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
                ("Nats-Msg-Id", id.as_bytes()),
                ("keel-future-field", b"kept"),
            ],
            Bytes::new(),
        )
        .unwrap();
        assert_eq!(event.id().to_string(), id);
        assert!(event.trace().traceparent.is_some());
        assert_eq!(event.headers().len(), 1, "{:?}", event.headers());
        assert_eq!(event.headers()["keel-future-field"], "kept");
        // What decoding accepts, encoding can write back.
        assert!(encode_headers(&event).is_ok());
    }

    #[test]
    fn a_repeated_application_header_keeps_every_value_in_order() {
        let id = EventId::new().to_string();
        let event = decode(
            Some(b"k"),
            [
                (EVENT_ID, id.as_bytes()),
                (EVENT_TYPE, b"t"),
                (OCCURRED_AT, b"2026-11-28T01:02:03.456Z"),
                ("x-hop", b"a"),
                ("tenant", b"acme"),
                ("x-hop", b"b"),
                ("x-hop", b"c"),
            ],
            Bytes::new(),
        )
        .unwrap();
        assert_eq!(event.headers()["x-hop"], "c", "the map shows the last");
        assert!(event.has_repeated_headers());
        let written = encode_headers(&event).unwrap();
        let hops: Vec<&str> = written
            .iter()
            .filter(|(n, _)| n == "x-hop")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(hops, ["a", "b", "c"]);
        assert_eq!(roundtrip(&event), event);
        let grouped = group_headers(event.all_headers());
        assert_eq!(grouped["x-hop"], HeaderValues::Many(vec!["a", "b", "c"]));
        assert_eq!(grouped["tenant"], HeaderValues::One("acme"));
        // Two names repeated, interleaved: the same envelope whatever the
        // order of names (NATS hands a message's headers over by name, in
        // no set order), written back name by name.
        let interleaved = Envelope::new("t", "k", "")
            .with_added_header("b", "1")
            .with_added_header("a", "1")
            .with_added_header("b", "2")
            .with_added_header("a", "2");
        assert_eq!(
            interleaved.all_headers().collect::<Vec<_>>(),
            [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]
        );
        assert_eq!(roundtrip(&interleaved), interleaved);
        let by_name = Envelope::new("t", "k", "")
            .with_added_header("a", "1")
            .with_added_header("a", "2")
            .with_added_header("b", "1")
            .with_added_header("b", "2");
        assert_eq!(
            by_name
                .clone()
                .with_id(interleaved.id())
                .with_occurred_at(interleaved.occurred_at()),
            interleaved
        );
        // Setting a header replaces every value it had.
        let set = event.with_header("x-hop", "d");
        assert!(!set.has_repeated_headers());
        assert_eq!(encode_headers(&set).unwrap().len(), 5);
        let added = Envelope::new("t", "k", "")
            .with_added_header("x", "1")
            .with_added_header("x", "2");
        assert_eq!(
            added.all_headers().collect::<Vec<_>>(),
            [("x", "1"), ("x", "2")]
        );
    }

    #[test]
    fn keys_travel_in_headers_as_text_or_base64() {
        for key in [&b"order-42"[..], &b"\x00\xffbinary"[..], "Zoë".as_bytes()] {
            let (name, value) = key_header(key);
            let back = key_from_headers([(name, value.as_bytes()), ("other", &b"x"[..])]).unwrap();
            assert_eq!(back.as_deref(), Some(key));
        }
        assert_eq!(key_header(b"a b").0, KEY);
        assert_eq!(key_header(b"a\nb").0, KEY_BASE64);
        assert!(key_from_headers([(KEY, &b"a"[..]), (KEY, &b"b"[..])]).is_err());
        assert!(key_from_headers([(KEY_BASE64, &b"!!"[..])]).is_err());
        assert_eq!(key_from_headers([("x", &b"y"[..])]).unwrap(), None);
    }

    #[test]
    fn reserved_and_uncarriable_application_headers_are_refused() {
        let err = encode_headers(&Envelope::new("t", "k", "").with_header("Nats-Msg-Id", "x"))
            .unwrap_err();
        assert!(err.to_string().contains("transport"), "{err}");
        let err = encode_headers(&Envelope::new("t", "k", "").with_header("Keel-Event-Id", "x"))
            .unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        let err = encode_headers(&Envelope::new("t", "k", "").with_header("a:b", "x")).unwrap_err();
        assert!(err.to_string().contains("a:b"), "{err}");
        let err =
            encode_headers(&Envelope::new("t", "k", "").with_header("a", "x\r\ny")).unwrap_err();
        assert!(err.to_string().contains("line break"), "{err}");
    }
}
