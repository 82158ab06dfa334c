//! `JetStreamPublisher`: Keel events to JetStream streams.
//!
//! Delivery guarantee: a publish resolves only when the server's PubAck
//! arrived (a send or flush is never taken as storage), within the
//! publisher's own ack timeout. `Nats-Msg-Id` is the event id, so publishing
//! the same event again inside the stream's duplicate window stores it once
//! and the receipt says `duplicate`. Keys map to the partition subjects
//! `<topic>.<p>` by murmur2, as Kafka's Java clients map them to partitions.
//!
//! A batch is sent on one connection while at most
//! [`JetStreamPublisherConfig::max_outstanding_acks`] acknowledgements are
//! awaited concurrently (async-nats refuses publishes once its own ack
//! window is full, so sending everything before awaiting anything stalls),
//! and at most one per key: a key's next event goes out once the previous
//! one is stored, so a connection lost mid-batch cannot leave a later
//! event of a key stored before an earlier one. Events of different keys
//! are pipelined. Every event of a batch is encoded and size-checked
//! before the first is sent, so a bad event fails the batch without storing
//! the events around it.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use async_nats::{HeaderMap, HeaderName};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use keel_core::partition::partition_for_key;
use keel_core::transport::{Publisher, Receipt, Sent};
use keel_core::{Envelope, Error, RawRecord, Result, wire};
use tracing::Instrument;

use super::admin::{JetStreamAdmin, partitions_of, topic_error};
use super::config::{NatsClientConfig, validate_name};
use super::groups;

/// Publisher settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JetStreamPublisherConfig {
    /// Connection.
    pub client: NatsClientConfig,
    /// How long to wait for each PubAck (default 5 s).
    pub ack_timeout: Duration,
    /// Most acknowledgements a batch awaits at once (default 1024; below
    /// async-nats' own limit of 5,000).
    pub max_outstanding_acks: usize,
}

impl Default for JetStreamPublisherConfig {
    fn default() -> Self {
        JetStreamPublisherConfig {
            client: NatsClientConfig::default(),
            ack_timeout: Duration::from_secs(5),
            max_outstanding_acks: 1024,
        }
    }
}

impl JetStreamPublisherConfig {
    /// Settings for `client` with defaults otherwise.
    pub fn new(client: NatsClientConfig) -> Self {
        JetStreamPublisherConfig {
            client,
            ..JetStreamPublisherConfig::default()
        }
    }

    /// Refuses settings that cannot work, naming them.
    pub fn validate(&self) -> Result<()> {
        self.client.validate()?;
        if self.ack_timeout.is_zero() {
            return Err(Error::config("ack_timeout", "must be positive"));
        }
        if self.max_outstanding_acks == 0 || self.max_outstanding_acks > 5000 {
            return Err(Error::config(
                "max_outstanding_acks",
                "must be 1 to 5000 (async-nats refuses publishes beyond 5000 outstanding acks)",
            ));
        }
        Ok(())
    }
}

/// What the publisher knows about a topic's stream.
#[derive(Clone, Debug)]
struct StreamShape {
    partitions: u32,
    /// `<topic>.<p>` by partition (cheap to clone: shared bytes).
    subjects: std::sync::Arc<[async_nats::Subject]>,
    /// Largest message the stream accepts (payload + headers), if limited.
    max_message_size: Option<usize>,
    /// The server's `max_payload` when the stream was looked up.
    max_payload: usize,
    /// When the stream was looked up (see [`SHAPE_RECHECK`]).
    read_at: std::time::Instant,
}

/// A cached stream shape that refuses an event by size is read again when
/// it is at least this old: the limit may have been raised since (the fix
/// for rows the outbox relay parked as too large, then requeued). Younger
/// answers stand, so a run of oversized events costs a lookup a second at
/// most.
const SHAPE_RECHECK: Duration = Duration::from_secs(1);

/// An event ready to send.
struct Prepared {
    subject: async_nats::Subject,
    partition: u32,
    message: PublishMessage,
}

/// Keel's own header names, built once: a static name costs no allocation
/// per event.
static KEEL_HEADERS: [(&str, HeaderName); 10] = [
    (wire::EVENT_ID, HeaderName::from_static(wire::EVENT_ID)),
    (wire::EVENT_TYPE, HeaderName::from_static(wire::EVENT_TYPE)),
    (
        wire::OCCURRED_AT,
        HeaderName::from_static(wire::OCCURRED_AT),
    ),
    (wire::SOURCE, HeaderName::from_static(wire::SOURCE)),
    (
        wire::CORRELATION_ID,
        HeaderName::from_static(wire::CORRELATION_ID),
    ),
    (
        wire::CAUSATION_ID,
        HeaderName::from_static(wire::CAUSATION_ID),
    ),
    (
        wire::TRACEPARENT,
        HeaderName::from_static(wire::TRACEPARENT),
    ),
    (wire::TRACESTATE, HeaderName::from_static(wire::TRACESTATE)),
    (wire::KEY, HeaderName::from_static(wire::KEY)),
    (wire::KEY_BASE64, HeaderName::from_static(wire::KEY_BASE64)),
];

fn keel_header_name(name: &str) -> Option<HeaderName> {
    KEEL_HEADERS
        .iter()
        .find(|(known, _)| std::ptr::eq(*known, name) || *known == name)
        .map(|(_, header)| header.clone())
}

/// Publishes Keel events to JetStream.
pub struct JetStreamPublisher {
    js: jetstream::Context,
    admin: JetStreamAdmin,
    config: JetStreamPublisherConfig,
    shapes: RwLock<HashMap<String, StreamShape>>,
}

impl std::fmt::Debug for JetStreamPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamPublisher")
            .field(
                "servers",
                &keel_core::config::redact(&self.config.client.servers),
            )
            .finish_non_exhaustive()
    }
}

/// The order a batch's events go out in, at most one event per key
/// awaiting its acknowledgement: a key's next event is sent only once the
/// previous one is stored. When the connection dies, async-nats sends the
/// publishes still queued in the client after it reconnects, while those
/// the dead connection held are lost; with two events of a key in flight,
/// the later could be stored and the earlier lost, to be stored after it
/// when sent again. Other keys' events go out meanwhile, so a batch of
/// distinct keys is pipelined whole.
struct KeyTurns<'a> {
    keys: Vec<&'a [u8]>,
    /// The next event not yet looked at.
    next: usize,
    /// Keys with an event awaiting its acknowledgement (or about to be
    /// sent), and their later events held back, in order.
    busy: HashMap<&'a [u8], VecDeque<usize>>,
    /// Held-back events whose key's previous event is stored, oldest first.
    ready: VecDeque<usize>,
}

impl<'a> KeyTurns<'a> {
    fn new(keys: Vec<&'a [u8]>) -> Self {
        KeyTurns {
            keys,
            next: 0,
            busy: HashMap::new(),
            ready: VecDeque::new(),
        }
    }

    /// The event to send next, if one may go now.
    fn next(&mut self) -> Option<usize> {
        if let Some(i) = self.ready.pop_front() {
            return Some(i);
        }
        while let Some(&key) = self.keys.get(self.next) {
            let i = self.next;
            self.next += 1;
            match self.busy.entry(key) {
                Entry::Occupied(mut held) => held.get_mut().push_back(i),
                Entry::Vacant(free) => {
                    free.insert(VecDeque::new());
                    return Some(i);
                }
            }
        }
        None
    }

    /// Event `i` is stored: its key's next event may go.
    fn stored(&mut self, i: usize) {
        let key = self.keys[i];
        if let Some(held) = self.busy.get_mut(key) {
            match held.pop_front() {
                Some(after) => self.ready.push_back(after),
                None => {
                    self.busy.remove(key);
                }
            }
        }
    }
}

/// Which of a batch's acknowledged events need a copy to keep their key's
/// order, and the sequence each copy must follow: for each key, from its
/// first event stored before an earlier event of the key (a duplicate of
/// an earlier try) on, every later one, up to the key's first failure.
/// `done`: each event's key and outcome (`None`: not sent), in input order.
fn order_copies<'a>(
    done: impl Iterator<Item = (&'a [u8], Option<&'a Result<Receipt>>)>,
) -> Vec<(usize, u64)> {
    #[derive(Default)]
    struct KeyState {
        last: u64,
        after: Option<u64>,
        failed: bool,
    }
    let mut keys: HashMap<&[u8], KeyState> = HashMap::new();
    let mut copies = Vec::new();
    for (at, (key, receipt)) in done.enumerate() {
        let key = keys.entry(key).or_default();
        match receipt {
            _ if key.failed => {}
            None | Some(Err(_)) => key.failed = true,
            Some(Ok(receipt)) => {
                if key.after.is_none() && receipt.position < key.last {
                    key.after = Some(key.last);
                }
                if let Some(after) = key.after {
                    copies.push((at, after));
                }
                key.last = key.last.max(receipt.position);
            }
        }
    }
    copies
}

/// A publish that found no stream for `topic` (deleted, or without a
/// leader for now): retriable, as when the stream is looked up.
fn stream_missing(topic: &str, e: &(dyn std::fmt::Display + Sync)) -> Error {
    topic_error(
        topic,
        format!(
            "no stream answered (create it with `keel topics create`, or wait for its leader): {e}"
        ),
        true,
    )
}

/// `id`: the event id (or what stands for it) that the error names.
fn publish_error(
    topic: &str,
    id: &(dyn std::fmt::Display + Sync),
    reason: impl Into<String>,
    retriable: bool,
) -> Error {
    Error::Publish {
        topic: topic.to_owned(),
        event_id: id.to_string(),
        reason: reason.into(),
        retriable,
        source: None,
    }
}

impl JetStreamPublisher {
    /// Connects with validated `config`.
    pub async fn connect(config: JetStreamPublisherConfig) -> Result<Self> {
        config.validate()?;
        let client = config.client.connect().await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .build(client);
        Ok(Self::with_context(js, config))
    }

    /// A publisher on an existing JetStream context (its connection
    /// settings in `config.client` are then not used, and the context's
    /// timeout bounds each acknowledgement).
    pub fn with_context(js: jetstream::Context, config: JetStreamPublisherConfig) -> Self {
        JetStreamPublisher {
            admin: JetStreamAdmin::new(js.clone()),
            js,
            config,
            shapes: RwLock::new(HashMap::new()),
        }
    }

    async fn shape(&self, topic: &str) -> Result<StreamShape> {
        if let Some(shape) = self
            .shapes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
        {
            return Ok(shape.clone());
        }
        validate_name("topic", topic)?;
        let mut stream = self.js.get_stream(topic).await.map_err(|e| {
            topic_error(
                topic,
                format!("cannot look up its stream (create it with `keel topics create`): {e}"),
                true,
            )
        })?;
        let info = stream
            .info()
            .await
            .map_err(|e| topic_error(topic, format!("cannot read its stream: {e}"), true))?;
        let partitions =
            partitions_of(&info.config).map_err(|reason| topic_error(topic, reason, false))?;
        let shape = StreamShape {
            partitions,
            subjects: (0..partitions)
                .map(|p| async_nats::Subject::from(groups::partition_subject(topic, p)))
                .collect(),
            max_payload: self.js.client().server_info().max_payload,
            max_message_size: usize::try_from(info.config.max_message_size)
                .ok()
                .filter(|s| *s > 0),
            read_at: std::time::Instant::now(),
        };
        self.shapes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned(), shape.clone());
        Ok(shape)
    }

    /// The stream's shape read again when `shape`, which refused an event
    /// by size, is older than [`SHAPE_RECHECK`]; `None` when it is recent.
    /// A lookup that fails is `None` too: the refusal stands as it was.
    async fn reread(&self, topic: &str, shape: &StreamShape) -> Result<Option<StreamShape>> {
        if shape.read_at.elapsed() < SHAPE_RECHECK {
            return Ok(None);
        }
        self.forget_shape(topic);
        Ok(self.shape(topic).await.ok())
    }

    /// The shape `event` is checked against, and the check: a refusal by
    /// an old shape is checked again against the stream as it is now.
    async fn checked(&self, topic: &str, event: &Envelope) -> Result<StreamShape> {
        let shape = self.shape(topic).await?;
        match self.check(topic, &shape, event) {
            Ok(()) => Ok(shape),
            Err(e) => match self.reread(topic, &shape).await? {
                Some(fresh) => self.check(topic, &fresh, event).map(|()| fresh),
                None => Err(e),
            },
        }
    }

    fn forget_shape(&self, topic: &str) {
        self.shapes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic);
    }

    /// Refuses an event the server would refuse (bad headers, larger than
    /// the stream's `max_message_size`), without building anything.
    fn check(&self, topic: &str, shape: &StreamShape, event: &Envelope) -> Result<()> {
        let mut size = 0;
        wire::visit_headers(event, |name, value| size += name.len() + value.len() + 4)
            .map_err(|e| publish_error(topic, &event.id(), e.to_string(), false))?;
        // Key header (base64 at worst) and `Nats-Msg-Id` with the event id.
        size += wire::KEY_BASE64.len() + event.key().as_bytes().len().div_ceil(3) * 4 + 4;
        // (`~` and a sequence more for a copy keeping a key's order.)
        size += "Nats-Msg-Id".len() + 36 + 21 + 4 + event.payload().len() + 16;
        // The server's own limit applies to every message, stream limit or not.
        let max_payload = shape.max_payload;
        if max_payload > 0 && size > max_payload {
            return Err(publish_error(
                topic,
                &event.id(),
                format!(
                    "the event is about {size} bytes with headers; the server accepts at most {max_payload} (max_payload)"
                ),
                false,
            ));
        }
        if let Some(max) = shape.max_message_size
            && size > max
        {
            return Err(publish_error(
                topic,
                &event.id(),
                format!(
                    "the event is about {size} bytes with headers; the stream accepts at most {max} (max_message_size)"
                ),
                false,
            ));
        }
        Ok(())
    }

    /// Headers and subject of a checked event.
    fn prepare(&self, topic: &str, shape: &StreamShape, event: &Envelope) -> Result<Prepared> {
        let mut headers = HeaderMap::new();
        // A header the event carries more than once keeps every value
        // (appended; otherwise a plain insert, one look-up fewer).
        let repeated = event.has_repeated_headers();
        wire::visit_headers(event, |name, value| {
            let value = String::from_utf8_lossy(value);
            match (keel_header_name(name), repeated) {
                (Some(known), _) => headers.insert(known, value.as_ref()),
                (None, false) => headers.insert(name, value.as_ref()),
                (None, true) => headers.append(name, value.as_ref()),
            }
        })
        .map_err(|e| publish_error(topic, &event.id(), e.to_string(), false))?;
        let (name, value) = wire::key_header(event.key().as_bytes());
        match keel_header_name(name) {
            Some(known) => headers.insert(known, value.as_str()),
            None => headers.insert(name, value.as_str()),
        }
        let partition = partition_for_key(event.key().as_bytes(), shape.partitions);
        let mut id = uuid::Uuid::encode_buffer();
        let id = event.id().as_uuid().hyphenated().encode_lower(&mut id);
        Ok(Prepared {
            subject: shape.subjects[partition as usize % shape.subjects.len()].clone(),
            partition,
            message: PublishMessage::build()
                .payload(event.payload().clone())
                .headers(headers)
                .message_id(&*id),
        })
    }

    /// Sends a prepared event; the returned future resolves with the
    /// server's acknowledgement (or its timeout: the context's, which
    /// [`JetStreamPublisher::connect`] sets to `ack_timeout`).
    async fn send(
        &self,
        topic: &str,
        id: &(dyn std::fmt::Display + Sync),
        prepared: Prepared,
    ) -> Result<(u32, jetstream::context::PublishAckFuture)> {
        let Prepared {
            subject,
            partition,
            message,
        } = prepared;
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(|e| self.failed(topic, id, e.kind(), &e))?;
        Ok((partition, ack))
    }

    /// The receipt, or an error naming the event, of an awaited ack.
    fn receipt(
        &self,
        topic: &Arc<str>,
        id: &(dyn std::fmt::Display + Sync),
        partition: u32,
        ack: std::result::Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    ) -> Result<Receipt> {
        match ack {
            Ok(ack) => Ok(Receipt {
                topic: topic.clone(),
                partition,
                position: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(e) if e.kind() == PublishErrorKind::TimedOut => Err(publish_error(
                topic,
                id,
                format!(
                    "no acknowledgement within {:?}; it may or may not be stored (publishing it again is safe: the server de-duplicates by event id)",
                    self.config.ack_timeout
                ),
                true,
            )),
            // No stream answered (deleted, or without a leader for now):
            // the topic's problem, not this event's; the shape is read
            // again on the next publish.
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                self.forget_shape(topic);
                Err(stream_missing(topic, &e))
            }
            Err(e) => {
                let retriable = !matches!(
                    e.kind(),
                    PublishErrorKind::WrongLastSequence
                        | PublishErrorKind::WrongLastMessageId
                        | PublishErrorKind::MaxPayloadExceeded
                );
                Err(publish_error(
                    topic,
                    id,
                    format!("the server did not acknowledge it: {e}"),
                    retriable,
                ))
            }
        }
    }

    fn failed(
        &self,
        topic: &str,
        id: &(dyn std::fmt::Display + Sync),
        kind: PublishErrorKind,
        e: &(dyn std::fmt::Display + Sync),
    ) -> Error {
        if kind == PublishErrorKind::StreamNotFound {
            self.forget_shape(topic);
            return stream_missing(topic, e);
        }
        let retriable = kind != PublishErrorKind::MaxPayloadExceeded;
        publish_error(topic, id, format!("cannot send: {e}"), retriable)
    }

    /// Publishes `event` only if the last event stored on its partition has
    /// stream sequence `expected` (0: the partition is empty) — optimistic
    /// concurrency for writers that must not interleave. A mismatch fails
    /// without storing, and is not retriable.
    pub async fn publish_expecting(
        &self,
        topic: &str,
        event: Envelope,
        expected: u64,
    ) -> Result<Receipt> {
        let shape = self.checked(topic, &event).await?;
        let mut prepared = self.prepare(topic, &shape, &event)?;
        prepared.message = prepared.message.expected_last_subject_sequence(expected);
        let (partition, ack) = self.send(topic, &event.id(), prepared).await?;
        let ack = ack.await;
        self.receipt(&topic.into(), &event.id(), partition, ack).map_err(|e| match e {
            Error::Publish {
                topic,
                event_id,
                reason,
                ..
            } if reason.contains("wrong last sequence") => Error::Publish {
                topic,
                event_id,
                reason: format!(
                    "another event was stored on its partition after sequence {expected}: {reason}"
                ),
                retriable: false,
                source: None,
            },
            other => other,
        })
    }

    /// Sends the first `count` of `events` (checked by the caller), at
    /// most `max_outstanding_acks` awaiting their acknowledgement and at
    /// most one of each key (see [`KeyTurns`]), and returns the outcome of
    /// each event, in input order (the `i`-th is event `i`'s; `None`: not
    /// sent). Sending stops once a failure is seen (a send that fails,
    /// returned second with its event's place, or a failed
    /// acknowledgement). With `limit` (an instant and the bound it came
    /// from), sending stops when a quarter of the bound is left (a send
    /// waiting for room in the client's queue then, and an acknowledgement
    /// not in by the instant, fail as
    /// [`keel_core::transport::past_deadline`]).
    async fn send_batch(
        &self,
        topic: &str,
        shape: &StreamShape,
        events: &[Envelope],
        count: usize,
        limit: Option<(tokio::time::Instant, Duration)>,
    ) -> (Vec<Option<Result<Receipt>>>, Option<(usize, Error)>) {
        // (`with_context` takes the settings unchecked.)
        let window = self.config.max_outstanding_acks.max(1);
        let mut outstanding = FuturesUnordered::new();
        let mut failed = false;
        // One topic name shared by the batch's receipts.
        let shared: Arc<str> = topic.into();
        // Returned once every acknowledgement is in: a re-sent event may
        // need a copy stored after the others (see `keep_key_order`).
        let mut done: Vec<Option<Result<Receipt>>> =
            std::iter::repeat_with(|| None).take(count).collect();
        let mut turns = KeyTurns::new(
            events
                .iter()
                .take(count)
                .map(|e| e.key().as_bytes())
                .collect(),
        );
        let mut stopped = None;
        // With `limit`, new sends stop once a quarter of the bound is left,
        // so what is in flight can still be acknowledged in time (a key's
        // events go one after another: a batch of one key takes a round
        // trip per event).
        let last_send =
            limit.map(|(at, within)| (at.checked_sub(within / 4).unwrap_or(at), within));
        // An acknowledgement's outcome, in `done`; a failure stops sending.
        let settle = |(i, partition, ack): (usize, u32, Option<_>),
                      done: &mut [Option<Result<Receipt>>],
                      turns: &mut KeyTurns<'_>,
                      failed: &mut bool| {
            // No acknowledgement only when `within` passed first.
            let receipt = match ack {
                Some(ack) => self.receipt(&shared, &events[i].id(), partition, ack),
                None => Err(keel_core::transport::past_deadline(
                    topic,
                    limit.map(|(_, within)| within).unwrap_or_default(),
                )),
            };
            match receipt {
                Ok(_) => turns.stored(i),
                Err(_) => *failed = true,
            }
            done[i] = Some(receipt);
        };
        loop {
            let may_send = !failed
                && stopped.is_none()
                && outstanding.len() < window
                && last_send.is_none_or(|(by, _)| tokio::time::Instant::now() < by);
            let turn = if may_send { turns.next() } else { None };
            let Some(i) = turn else {
                let Some(acked) = outstanding.next().await else {
                    break;
                };
                settle(acked, &mut done, &mut turns, &mut failed);
                continue;
            };
            // Headers are built as each event goes out, while earlier ones
            // are on the wire.
            let event = &events[i];
            let id = event.id();
            let send = match self.prepare(topic, shape, event) {
                Ok(prepared) => self.send(topic, &id, prepared),
                Err(e) => {
                    stopped = Some((i, e));
                    continue;
                }
            };
            // A send still waiting for room in the client's queue when
            // sending has to stop fails (retriable; it is not sent): the
            // queue stays full while the connection is down, and the
            // caller must see that to back off.
            let send = async {
                match last_send {
                    Some((by, within)) => {
                        tokio::time::timeout_at(by, send).await.unwrap_or_else(|_| {
                            Err(keel_core::transport::past_deadline(topic, within))
                        })
                    }
                    None => send.await,
                }
            };
            // The acknowledgements in flight are taken in while the send
            // waits: async-nats frees an acknowledgement's place in its
            // limit (5,000 for a context) only when its future completes,
            // so batches sharing the context, each waiting for a place
            // without polling its own, would wait for each other forever.
            tokio::pin!(send);
            let sent = loop {
                tokio::select! {
                    biased;
                    sent = &mut send => break sent,
                    Some(acked) = outstanding.next(), if !outstanding.is_empty() => {
                        settle(acked, &mut done, &mut turns, &mut failed);
                    }
                }
            };
            match sent {
                Ok((partition, ack)) => outstanding.push(async move {
                    let ack = match limit {
                        Some((at, _)) => tokio::time::timeout_at(at, ack).await.ok(),
                        None => Some(ack.await),
                    };
                    (i, partition, ack)
                }),
                Err(e) => stopped = Some((i, e)),
            }
        }
        self.keep_key_order(topic, &shared, shape, events, &mut done, limit)
            .await;
        (done, stopped)
    }

    /// Keeps each key's order as a consumer reads the stream when events
    /// are published again (an earlier try stored some and lost others):
    /// the server de-duplicates a re-sent event by its `Nats-Msg-Id`, so
    /// its copy stays where the earlier try stored it, before an event of
    /// its key that only now got stored. Every such event, and every later
    /// one of its key in the batch, is sent once more, in order, after the
    /// rest, under the id `<event id>~<sequence it must follow>` (itself
    /// de-duplicated when this is tried again). The copy's receipt replaces
    /// the event's, so the last copy of each event keeps the key's order,
    /// as on Kafka (a consumer that keeps only the first copy of an event,
    /// as an inbox does, still sees the two in the order stored first).
    ///
    /// `done`: the outcome of each event, in input order (the `i`-th is
    /// event `i`'s; `None`: not sent). A key's events after
    /// its first failure are left as they are (the caller holds them back).
    /// When a copy fails, every event of its key in the batch fails with
    /// it, the stored ones too: tried again, the same events make the same
    /// copies, where a retry of the unsettled ones alone could no longer
    /// see the disorder.
    async fn keep_key_order(
        &self,
        topic: &str,
        shared: &Arc<str>,
        shape: &StreamShape,
        events: &[Envelope],
        done: &mut [Option<Result<Receipt>>],
        limit: Option<(tokio::time::Instant, Duration)>,
    ) {
        // Only a duplicate can have been stored before an earlier event.
        if !done.iter().any(|r| matches!(r, Some(Ok(r)) if r.duplicate)) {
            return;
        }
        let copies = order_copies(
            events
                .iter()
                .map(|e| e.key().as_bytes())
                .zip(done.iter().map(Option::as_ref)),
        );
        let mut failed_keys: Vec<&[u8]> = Vec::new();
        for (at, after) in copies {
            let event = &events[at];
            if failed_keys.contains(&event.key().as_bytes()) {
                continue;
            }
            let id = event.id();
            let copy = async {
                let mut prepared = self.prepare(topic, shape, event)?;
                prepared.message = prepared.message.message_id(format!("{id}~{after}"));
                let (partition, ack) = self.send(topic, &id, prepared).await?;
                self.receipt(shared, &id, partition, ack.await)
            };
            match crate::bounded(topic, limit, copy).await {
                Ok(receipt) => {
                    tracing::debug!(topic, event_id = %id, after, position = receipt.position, "event stored again after an earlier event of its key");
                    done[at] = Some(Ok(receipt));
                }
                Err(e) => {
                    tracing::debug!(topic, event_id = %id, error = %e, "a copy keeping its key's order failed");
                    done[at] = Some(Err(e));
                    failed_keys.push(event.key().as_bytes());
                }
            }
        }
        for (event, receipt) in events.iter().zip(done.iter_mut()) {
            if failed_keys.contains(&event.key().as_bytes()) && matches!(receipt, Some(Ok(_))) {
                *receipt = Some(Err(publish_error(
                    topic,
                    &event.id(),
                    "an event of its key was stored before an earlier one, and its copy \
                     after it failed; publishing the key's events again sends it",
                    true,
                )));
            }
        }
    }

    /// The admin on this publisher's connection.
    pub fn admin(&self) -> &JetStreamAdmin {
        &self.admin
    }
}

#[async_trait]
impl Publisher for JetStreamPublisher {
    async fn publish(&self, topic: &str, event: Envelope) -> Result<Receipt> {
        let span = tracing::debug_span!("publish", event_id = %event.id(), event_type = event.event_type(), topic, partition = tracing::field::Empty);
        async {
            let shape = self.checked(topic, &event).await?;
            let prepared = self.prepare(topic, &shape, &event)?;
            tracing::Span::current().record("partition", prepared.partition);
            let (partition, ack) = self.send(topic, &event.id(), prepared).await?;
            let ack = ack.await;
            self.receipt(&topic.into(), &event.id(), partition, ack)
        }
        .instrument(span)
        .await
    }

    async fn publish_batch(&self, topic: &str, events: Vec<Envelope>) -> Result<Vec<Receipt>> {
        let mut shape = self.shape(topic).await?;
        // Everything is checked before anything is sent.
        let check_all = |shape: &StreamShape| {
            events.iter().enumerate().try_for_each(|(i, e)| {
                self.check(topic, shape, e).map_err(|err| {
                    crate::batch_failure(
                        err,
                        topic,
                        e.id(),
                        format!("event {} of {}; nothing was sent", i + 1, events.len()),
                    )
                })
            })
        };
        if let Err(e) = check_all(&shape) {
            let Some(fresh) = self.reread(topic, &shape).await? else {
                return Err(e);
            };
            check_all(&fresh)?;
            shape = fresh;
        }
        let (done, stopped) = self
            .send_batch(topic, &shape, &events, events.len(), None)
            .await;
        let mut receipts = Vec::with_capacity(done.len());
        // The earliest failure is the batch's.
        let mut failure: Option<(usize, Error)> = stopped;
        for (i, acked) in done.into_iter().enumerate() {
            match acked {
                Some(Ok(r)) => receipts.push(r),
                Some(Err(e)) if failure.as_ref().is_none_or(|(at, _)| i < *at) => {
                    failure = Some((i, e));
                }
                Some(Err(_)) | None => {}
            }
        }
        match failure {
            None => Ok(receipts),
            Some((i, e)) => {
                let acked = receipts.len();
                Err(crate::batch_failure(
                    e,
                    topic,
                    events[i].id(),
                    format!(
                        "event {} of {} in the batch; {acked} were acknowledged",
                        i + 1,
                        events.len()
                    ),
                ))
            }
        }
    }

    async fn publish_each(
        &self,
        topic: &str,
        events: Vec<Envelope>,
        within: Duration,
    ) -> Vec<Sent> {
        let total = events.len();
        // The bound covers the stream's lookup too (two requests when its
        // shape is not cached).
        let limit = (tokio::time::Instant::now() + within, within);
        let shape = match crate::bounded(topic, Some(limit), self.shape(topic)).await {
            Ok(shape) => shape,
            Err(e) => {
                let mut outcomes = vec![Sent::Failed(e)];
                outcomes.resize_with(total, || Sent::NotSent);
                return outcomes;
            }
        };
        // The events before the first that cannot go out as it is go.
        let first_refused = |shape: &StreamShape| {
            events
                .iter()
                .enumerate()
                .find_map(|(i, event)| self.check(topic, shape, event).err().map(|e| (i, e)))
        };
        let mut refused = first_refused(&shape);
        let mut shape = shape;
        if refused.is_some()
            && let Ok(Some(fresh)) =
                crate::bounded(topic, Some(limit), self.reread(topic, &shape)).await
        {
            refused = first_refused(&fresh);
            shape = fresh;
        }
        let (sendable, refused) = match refused {
            Some((i, e)) => (i, Some(e)),
            None => (total, None),
        };
        let (done, stopped) = self
            .send_batch(topic, &shape, &events, sendable, Some(limit))
            .await;
        let mut outcomes = Vec::with_capacity(total);
        outcomes.extend(done.into_iter().map(|acked| match acked {
            Some(Ok(receipt)) => Sent::Stored(receipt),
            Some(Err(e)) => Sent::Failed(e),
            None => Sent::NotSent,
        }));
        // Sending stopped at the refused event only when everything before
        // it went out.
        let all_sent = stopped.is_none() && !outcomes.iter().any(|o| matches!(o, Sent::NotSent));
        if let Some((i, e)) = stopped {
            outcomes[i] = Sent::Failed(e);
        }
        if let Some(e) = refused.filter(|_| all_sent) {
            outcomes.push(Sent::Failed(e));
        }
        outcomes.resize_with(total, || Sent::NotSent);
        outcomes
    }

    async fn publish_record(&self, topic: &str, record: RawRecord) -> Result<Receipt> {
        let id = record
            .header(wire::EVENT_ID)
            .unwrap_or("(record without an event id)")
            .to_owned();
        let shape = self.shape(topic).await?;
        let mut headers = HeaderMap::new();
        let mut size = record.payload.len() + 16;
        for (name, value) in &record.headers {
            // The server's own headers (`Nats-Msg-Id`, `Nats-Expected-…`)
            // belong to the original publish; carrying them would make the
            // server de-duplicate or refuse this one.
            if name
                .as_bytes()
                .get(..5)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"nats-"))
            {
                continue;
            }
            let header = name.parse::<HeaderName>().map_err(|e| {
                publish_error(
                    topic,
                    &id,
                    format!("header name `{name}` cannot be carried by NATS: {e}"),
                    false,
                )
            })?;
            let value = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<async_nats::HeaderValue>().ok())
                .ok_or_else(|| {
                    publish_error(
                        topic,
                        &id,
                        format!(
                            "header `{name}` is not single-line UTF-8 text, which NATS cannot carry"
                        ),
                        false,
                    )
                })?;
            size += name.len() + value.as_str().len() + 4;
            headers.append(header, value);
        }
        let key = record.partition_key();
        if let Some(key) = &key
            && record.key.is_some()
            && wire::key_from_headers(record.headers.iter().map(|(n, v)| (n.as_str(), v.as_ref())))
                .ok()
                .flatten()
                .is_none()
        {
            let (name, value) = wire::key_header(key);
            size += name.len() + value.len() + 4;
            headers.insert(name, value.as_str());
        }
        let limit = |shape: &StreamShape| {
            [shape.max_message_size, Some(shape.max_payload)]
                .into_iter()
                .flatten()
                .filter(|l| *l > 0)
                .min()
        };
        let mut shape = shape;
        if limit(&shape).is_some_and(|limit| size > limit)
            && let Some(fresh) = self.reread(topic, &shape).await?
        {
            shape = fresh;
        }
        if let Some(limit) = limit(&shape)
            && size > limit
        {
            return Err(publish_error(
                topic,
                &id,
                format!(
                    "the record is about {size} bytes with headers; the stream accepts at most {limit}"
                ),
                false,
            ));
        }
        let partition = key.map_or(0, |k| partition_for_key(&k, shape.partitions));
        let prepared = Prepared {
            subject: shape.subjects[partition as usize % shape.subjects.len()].clone(),
            partition,
            message: PublishMessage::build()
                .payload(record.payload.clone())
                .headers(headers),
        };
        let (partition, ack) = self.send(topic, &id, prepared).await?;
        let ack = ack.await;
        self.receipt(&topic.into(), &id, partition, ack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(position: u64, duplicate: bool) -> Result<Receipt> {
        Ok(Receipt {
            topic: "t".into(),
            partition: 0,
            position,
            duplicate,
        })
    }

    fn failed() -> Result<Receipt> {
        Err(publish_error("t", &"e", "lost", true))
    }

    fn copies(done: &[(&str, Result<Receipt>)]) -> Vec<(usize, u64)> {
        order_copies(done.iter().map(|(k, r)| (k.as_bytes(), Some(r))))
    }

    /// Drives `KeyTurns`: takes what may go, then, step by step, reports
    /// the events of each of `acks` stored and takes what may go then;
    /// returns the events taken at each step.
    fn rounds(keys: &[&str], acks: &[&[usize]]) -> Vec<Vec<usize>> {
        let mut turns = KeyTurns::new(keys.iter().map(|k| k.as_bytes()).collect());
        let mut sent = vec![std::iter::from_fn(|| turns.next()).collect::<Vec<_>>()];
        for acked in acks {
            for &i in *acked {
                turns.stored(i);
            }
            sent.push(std::iter::from_fn(|| turns.next()).collect());
        }
        sent
    }

    #[test]
    fn distinct_keys_go_out_at_once() {
        assert_eq!(rounds(&["a", "b", "c"], &[]), [vec![0, 1, 2]]);
    }

    #[test]
    fn a_keys_next_event_waits_for_the_previous_ones_acknowledgement() {
        let keys = ["a", "b", "a", "c", "a", "b"];
        assert_eq!(
            rounds(&keys, &[&[1], &[0], &[2, 3], &[5], &[4]]),
            [vec![0, 1, 3], vec![5], vec![2], vec![4], vec![], vec![]]
        );
    }

    #[test]
    fn a_failed_event_holds_back_its_keys_later_ones() {
        // Event 0 is never stored: event 2 of its key never goes.
        let keys = ["a", "b", "a", "b"];
        assert_eq!(rounds(&keys, &[&[1], &[3]]), [vec![0, 1], vec![3], vec![]]);
    }

    #[test]
    fn in_order_acknowledgements_need_no_copy() {
        let done = [
            ("a", stored(1, true)),
            ("b", stored(2, false)),
            ("a", stored(3, false)),
        ];
        assert!(copies(&done).is_empty());
    }

    #[test]
    fn a_duplicate_stored_before_an_earlier_event_and_its_keys_later_events_are_copied() {
        let done = [
            ("a", stored(12, false)),
            ("b", stored(13, false)),
            ("a", stored(11, true)),
            ("b", stored(14, false)),
            ("a", stored(15, false)),
        ];
        assert_eq!(copies(&done), [(2, 12), (4, 12)]);
    }

    #[test]
    fn another_keys_failure_does_not_stop_the_copies() {
        let done = [
            ("x", failed()),
            ("b", stored(12, false)),
            ("b", stored(11, true)),
        ];
        assert_eq!(copies(&done), [(2, 12)]);
    }

    #[test]
    fn a_key_stops_at_its_first_event_not_sent() {
        let done = [
            ("a", Some(stored(12, false))),
            ("a", None),
            ("b", Some(stored(11, true))),
            ("a", Some(stored(10, true))),
        ];
        assert!(order_copies(done.iter().map(|(k, r)| (k.as_bytes(), r.as_ref()))).is_empty());
    }

    #[test]
    fn a_keys_events_after_its_failure_are_left_to_the_caller() {
        let done = [
            ("a", stored(12, false)),
            ("a", stored(10, true)),
            ("a", failed()),
            ("a", stored(11, true)),
        ];
        assert_eq!(copies(&done), [(1, 12)]);
    }
}
