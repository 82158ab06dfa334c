//! What the layers and the handler of one delivery share: the incoming
//! event (or undecodable record), its delivery facts, the trace context of
//! this handling, and — with the inbox layer — the database transaction the
//! handler's effects and follow-up events go into.

use std::sync::Arc;

use keel_core::{DeliveryInfo, Envelope, Error, EventId, Key, RawRecord, Result, TraceContext};
use keel_producers::outbox::Outbox;
use keel_schemas::events::Event;
use sqlx::{PgConnection, Postgres, Transaction};

use super::trace::TraceParent;

/// What arrived.
#[derive(Debug)]
pub enum Incoming {
    /// A Keel event (its payload is decoded by the route's handler).
    Event(Envelope),
    /// A record that is not a Keel event.
    Undecodable {
        /// The record as stored.
        record: RawRecord,
        /// Why it is not an event.
        reason: String,
    },
}

/// One delivery on its way through the layers.
pub struct Context {
    pub(crate) incoming: Incoming,
    pub(crate) info: DeliveryInfo,
    /// The event type of the route that will handle it, if one is
    /// registered (the route itself travels in [`Next`](super::Next)).
    pub(crate) routed: Option<&'static str>,
    pub(crate) span: Option<TraceParent>,
    pub(crate) transaction: Option<Transaction<'static, Postgres>>,
    pub(crate) outbox: Option<Arc<Outbox>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("incoming", &self.incoming)
            .field("info", &self.info)
            .field("routed", &self.routed)
            .field("in_transaction", &self.transaction.is_some())
            .finish_non_exhaustive()
    }
}

impl Context {
    pub(crate) fn new(
        incoming: Incoming,
        info: DeliveryInfo,
        routed: Option<&'static str>,
    ) -> Self {
        Context {
            incoming,
            info,
            routed,
            span: None,
            transaction: None,
            outbox: None,
        }
    }

    /// A context for testing a layer on its own: `event` delivered from
    /// `topic`, partition 0, position 0, attempt `attempt`, group `g`, with
    /// no route (the chain's end answers with the router's unknown-type
    /// policy).
    pub fn for_test(topic: &str, event: Envelope, attempt: u32) -> Self {
        let info = DeliveryInfo {
            coordinates: keel_core::Coordinates {
                topic: topic.to_owned(),
                partition: 0,
                position: 0,
            },
            group: "g".to_owned(),
            attempt,
        };
        Context::new(Incoming::Event(event), info, None)
    }

    /// What arrived.
    pub fn incoming(&self) -> &Incoming {
        &self.incoming
    }

    /// The event, unless the record is undecodable.
    pub fn event(&self) -> Option<&Envelope> {
        match &self.incoming {
            Incoming::Event(event) => Some(event),
            Incoming::Undecodable { .. } => None,
        }
    }

    /// Coordinates, group and attempt number.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// The event type a handler is registered for, if one is.
    pub fn routed_type(&self) -> Option<&'static str> {
        self.routed
    }

    /// The trace context follow-up events carry: this handling's span
    /// (set by the tracing layer, a child of the producer's) with the
    /// producer's `tracestate` when the span continues the producer's trace,
    /// else the producer's context as it came.
    pub fn trace(&self) -> TraceContext {
        trace_of(self.event(), self.span)
    }

    /// This handling's span, if the tracing layer set one.
    pub fn span(&self) -> Option<TraceParent> {
        self.span
    }

    /// Sets this handling's span (the tracing layer does).
    pub fn set_span(&mut self, span: TraceParent) {
        self.span = Some(span);
    }

    /// The record as it was stored (rebuilt from the event's envelope for
    /// decodable events): what a dead letter carries.
    pub fn record(&self) -> Result<RawRecord> {
        match &self.incoming {
            Incoming::Event(event) => RawRecord::from_envelope(event),
            Incoming::Undecodable { record, .. } => Ok(record.clone()),
        }
    }

    /// Puts the handling into `transaction` (the inbox layer does; it
    /// commits after the handler succeeded), with `outbox` for follow-ups.
    pub fn begin(
        &mut self,
        transaction: Transaction<'static, Postgres>,
        outbox: Option<Arc<Outbox>>,
    ) {
        self.transaction = Some(transaction);
        self.outbox = outbox;
    }

    /// Takes the transaction back out (to commit or roll it back).
    pub fn take_transaction(&mut self) -> Option<Transaction<'static, Postgres>> {
        self.outbox = None;
        self.transaction.take()
    }
}

/// What a typed handler gets besides its decoded event: the envelope, the
/// delivery facts and, with the inbox layer, the transaction its database
/// effects go into and an outbox for follow-up events.
pub struct EventContext<'a> {
    pub(crate) envelope: &'a Envelope,
    pub(crate) info: &'a DeliveryInfo,
    pub(crate) span: Option<TraceParent>,
    pub(crate) transaction: &'a mut Option<Transaction<'static, Postgres>>,
    pub(crate) outbox: Option<&'a Arc<Outbox>>,
}

impl std::fmt::Debug for EventContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventContext")
            .field("event_id", &self.envelope.id())
            .field("info", self.info)
            .field("in_transaction", &self.transaction.is_some())
            .finish_non_exhaustive()
    }
}

impl EventContext<'_> {
    /// The event's envelope (id, key, correlation, headers…).
    pub fn envelope(&self) -> &Envelope {
        self.envelope
    }

    /// Coordinates, group and attempt number.
    pub fn info(&self) -> &DeliveryInfo {
        self.info
    }

    /// The transaction the inbox layer opened for this event: apply the
    /// effect on it; the layer commits it, with the inbox record, once the
    /// handler returned `Ok`.
    pub fn transaction(&mut self) -> Result<&mut PgConnection> {
        match self.transaction.as_mut() {
            Some(tx) => Ok(&mut **tx),
            None => Err(Error::config(
                "router layers",
                "the handler asked for a transaction, but no inbox layer runs before it; add `Inboxed` to the router",
            )),
        }
    }

    /// Encodes `event` and enqueues it into the service's outbox in this
    /// handling's transaction, as caused by the event being handled
    /// (causation id = its id; correlation id and trace inherited). It is
    /// published once the transaction commits. Returns its event id.
    pub async fn enqueue<T: Event + 'static>(
        &mut self,
        topic: &str,
        key: impl Into<Key>,
        event: &T,
    ) -> Result<EventId> {
        let outbox = self.outbox.cloned().ok_or_else(|| {
            Error::config(
                "router layers",
                "the handler enqueued a follow-up event, but the inbox layer has no outbox; build it with `Inboxed::with_outbox`",
            )
        })?;
        let follow_up = outbox
            .envelope(topic, key, event)
            .await
            .map_err(outbox_error)?
            .caused_by(self.envelope)
            .with_trace(trace_of(Some(self.envelope), self.span));
        let id = follow_up.id();
        outbox
            .enqueue(self.transaction()?, topic, &follow_up)
            .await
            .map_err(outbox_error)?;
        Ok(id)
    }
}

/// The trace context a follow-up of `event` carries when handled in `span`.
fn trace_of(event: Option<&Envelope>, span: Option<TraceParent>) -> TraceContext {
    match (span, event) {
        (Some(span), event) => TraceContext {
            traceparent: Some(span.to_string()),
            // The producer's vendor state belongs to its trace: it goes
            // along only where the span continues that trace (W3C: a
            // traceparent that does not parse restarts the trace and drops
            // the tracestate).
            tracestate: event
                .filter(|e| {
                    e.trace()
                        .traceparent
                        .as_deref()
                        .and_then(TraceParent::parse)
                        .is_some_and(|parent| parent.trace_id == span.trace_id)
                })
                .and_then(|e| e.trace().tracestate.clone()),
        },
        (None, Some(event)) => event.trace().clone(),
        (None, None) => TraceContext::default(),
    }
}

/// An outbox failure as a handler error, keeping whether it may pass.
pub(crate) fn outbox_error(e: keel_producers::outbox::OutboxError) -> Error {
    if e.is_retriable() {
        Error::retriable(e)
    } else {
        Error::fatal(e)
    }
}
