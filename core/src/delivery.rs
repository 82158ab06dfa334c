//! What a subscriber hands out: a [`Delivery`] per event, settled by ack or
//! nack, and the [`Deliveries`] stream of one group member.
//!
//! Settling is idempotent and never waits: the first `ack`/`nack` wins, later
//! calls return `false` and do nothing. A delivery dropped unsettled counts
//! as a nack, so a forgotten or panicked handler leads to re-delivery, never
//! to a committed position for an unhandled event.
//!
//! A record that is not a Keel event arrives as
//! [`Error::Undecodable`](crate::Error::Undecodable) carrying an
//! [`Undecodable`], which is settled
//! the same way — bad input takes its turn in the partition, it never stops
//! it.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

use crate::envelope::Envelope;
use crate::error::{Error, Result};

/// Where an event is stored: topic, partition and position (Kafka offset or
/// JetStream stream sequence).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Coordinates {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset (Kafka) or stream sequence (JetStream).
    pub position: u64,
}

impl fmt::Display for Coordinates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.position)
    }
}

/// Facts about one delivery that a handler may want.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// Where the event is stored.
    pub coordinates: Coordinates,
    /// The consumer group it was delivered to.
    pub group: String,
    /// 1 for the first delivery, 2 after one nack or re-delivery, …
    pub attempt: u32,
}

/// How a delivery was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handled: the position may be committed.
    Ack,
    /// Not handled: deliver again after `delay` (before any later event of
    /// the same key).
    Nack {
        /// How long to wait before re-delivery.
        delay: Duration,
    },
    /// Not handled, through no fault of the event (the registry, the
    /// inbox's database or the dead-letter topic is down): deliver again
    /// after `delay`, as a nack, but the re-delivery keeps this delivery's
    /// attempt number, so waiting out an outage spends no retry budget.
    Backoff {
        /// How long to wait before re-delivery.
        delay: Duration,
    },
    /// Given up for good — handed to dead letters, or deliberately
    /// dropped: never delivered again, and the position moves on as after
    /// an ack. JetStream terminates the message (`+TERM`, which raises a
    /// server advisory); Kafka commits past it.
    Term,
}

impl Outcome {
    /// For a transport's bookkeeping: the outcome with a
    /// [`Outcome::Backoff`] turned into the nack it is, and whether the
    /// delivery counts as an attempt (`false` for a backoff only).
    pub fn counted(self) -> (Outcome, bool) {
        match self {
            Outcome::Backoff { delay } => (Outcome::Nack { delay }, false),
            other => (other, true),
        }
    }
}

/// The transport side of settling: receives each delivery's outcome once.
/// Implementations must not block (take a short lock at most).
pub trait Settle: Send + Sync {
    /// Records `outcome` for the delivery identified by `token`. Outcomes for
    /// deliveries the member no longer owns (after a rebalance) are ignored.
    fn settle(&self, token: u64, outcome: Outcome);

    /// Whether the member still owns the delivery identified by `token`:
    /// `false` once its partition is being revoked (unless the revocation
    /// still runs it first, as Kafka's does for events below ones already
    /// settled), was given up after a drain timeout, or was lost. The
    /// default (a transport without rebalances) is always `true`.
    fn is_owned(&self, _token: u64) -> bool {
        true
    }

    /// Hands the delivery identified by `token` to a handler about to run
    /// it: `true` when the member still owns it. From then on a
    /// revocation of its partition waits for its outcome (up to the drain
    /// timeout); a delivery never begun (still queued for a handler) is
    /// abandoned at once instead, uncommitted, for the next owner (unless
    /// the revocation still runs it, see [`Settle::is_owned`]). The
    /// default is [`Settle::is_owned`].
    fn begin(&self, token: u64) -> bool {
        self.is_owned(token)
    }

    /// Whether the delivery identified by `token` is unsettled and the
    /// assignment of its partition it came under still stands: `false`
    /// once it was settled, or given back unbegun, or once its partition
    /// was lost, given up or re-opened since (its events are, or will be,
    /// delivered again, so a handler still running it should be stopped).
    /// A begun delivery of a partition being revoked still counts until
    /// the revocation completes, since the revocation waits for it. The
    /// default (a transport without rebalances) is always `true`.
    fn is_current(&self, _token: u64) -> bool {
        true
    }
}

/// The ack/nack half of a delivery: settles once, nacks when dropped unsettled.
struct Settlement {
    settler: Arc<dyn Settle>,
    token: u64,
    settled: AtomicBool,
}

impl Settlement {
    fn new(settler: Arc<dyn Settle>, token: u64) -> Self {
        Settlement {
            settler,
            token,
            settled: AtomicBool::new(false),
        }
    }

    fn settle(&self, outcome: Outcome) -> bool {
        if self.settled.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.settler.settle(self.token, outcome);
        true
    }

    fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    fn is_owned(&self) -> bool {
        self.settler.is_owned(self.token)
    }

    fn begin(&self) -> bool {
        self.settler.begin(self.token)
    }

    fn ownership(&self) -> Ownership {
        Ownership {
            settler: self.settler.clone(),
            token: self.token,
        }
    }
}

/// Tells whether the assignment a delivery came under still stands, for a
/// consumer that keeps track of its running handlers after the delivery
/// moved into one (see [`Delivery::ownership`]).
pub struct Ownership {
    settler: Arc<dyn Settle>,
    token: u64,
}

impl Ownership {
    /// `false` once the delivery was settled (its handler is done with
    /// it), or its partition was lost, given up or re-opened since it was
    /// delivered (see [`Settle::is_current`]): a handler still running an
    /// unsettled delivery then runs alongside the event's next delivery and
    /// should be stopped.
    pub fn is_current(&self) -> bool {
        self.settler.is_current(self.token)
    }
}

impl fmt::Debug for Ownership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ownership")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.settle(Outcome::Nack {
            delay: Duration::ZERO,
        });
    }
}

/// The ack/nack handle of a delivery taken apart with
/// [`Delivery::into_parts`] or [`Undecodable::into_parts`]: settles once,
/// and nacks (immediate re-delivery) when dropped unsettled.
pub struct Settler(Settlement);

impl Settler {
    /// Marks the event handled. Returns `false` if it was already settled.
    pub fn ack(&self) -> bool {
        self.0.settle(Outcome::Ack)
    }

    /// Asks for re-delivery after `delay`; later events of the same key wait.
    /// Returns `false` if already settled.
    pub fn nack_with_delay(&self, delay: Duration) -> bool {
        self.0.settle(Outcome::Nack { delay })
    }

    /// Asks for re-delivery after `delay` without counting an attempt (see
    /// [`Outcome::Backoff`]). Returns `false` if already settled.
    pub fn backoff(&self, delay: Duration) -> bool {
        self.0.settle(Outcome::Backoff { delay })
    }

    /// Gives the event up for good (see [`Outcome::Term`]). Returns
    /// `false` if already settled.
    pub fn term(&self) -> bool {
        self.0.settle(Outcome::Term)
    }

    /// Whether `ack`, `nack` or `term` was called.
    pub fn is_settled(&self) -> bool {
        self.0.is_settled()
    }
}

impl fmt::Debug for Settler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settler")
            .field("settled", &self.is_settled())
            .finish()
    }
}

/// One event delivered to one group member, to be acked or nacked.
pub struct Delivery {
    envelope: Envelope,
    info: DeliveryInfo,
    settlement: Settlement,
}

impl Delivery {
    /// A delivery whose outcome goes to `settler` under `token` (for
    /// transport implementations).
    pub fn new(
        envelope: Envelope,
        info: DeliveryInfo,
        settler: Arc<dyn Settle>,
        token: u64,
    ) -> Self {
        Delivery {
            envelope,
            info,
            settlement: Settlement::new(settler, token),
        }
    }

    /// The event.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Coordinates, group and attempt number.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// Marks the event handled. Returns `false` if it was already settled.
    pub fn ack(&self) -> bool {
        self.settlement.settle(Outcome::Ack)
    }

    /// Asks for immediate re-delivery. Returns `false` if already settled.
    pub fn nack(&self) -> bool {
        self.nack_with_delay(Duration::ZERO)
    }

    /// Asks for re-delivery after `delay`; later events of the same key wait.
    /// Returns `false` if already settled.
    pub fn nack_with_delay(&self, delay: Duration) -> bool {
        self.settlement.settle(Outcome::Nack { delay })
    }

    /// Asks for re-delivery after `delay` without counting an attempt (see
    /// [`Outcome::Backoff`]). Returns `false` if already settled.
    pub fn backoff(&self, delay: Duration) -> bool {
        self.settlement.settle(Outcome::Backoff { delay })
    }

    /// Gives the event up for good — after handing it to dead letters (see
    /// [`Outcome::Term`]). Returns `false` if already settled.
    pub fn term(&self) -> bool {
        self.settlement.settle(Outcome::Term)
    }

    /// Whether `ack`, `nack` or `term` was called.
    pub fn is_settled(&self) -> bool {
        self.settlement.is_settled()
    }

    /// Whether this member still owns the event: `false` once its partition
    /// is being revoked, was given up or lost. Unless a handler began it
    /// before ([`Delivery::begin`], whose outcome a revocation waits for),
    /// the partition's next owner delivers it again, so starting a handler
    /// on it now would only duplicate that work and could run alongside
    /// it, out of its key's order. [`Delivery::begin`] checks this.
    pub fn is_owned(&self) -> bool {
        self.settlement.is_owned()
    }

    /// Claims the event for a handler about to run it: `false` when this
    /// member no longer owns it (see [`Delivery::is_owned`]); once begun,
    /// a revocation of its partition waits for its outcome, while
    /// deliveries never begun are abandoned at once. Consumers call this
    /// right before they start a handler.
    pub fn begin(&self) -> bool {
        self.settlement.begin()
    }

    /// A handle that tells, after the delivery moved into a handler,
    /// whether the assignment it came under still stands
    /// ([`Ownership::is_current`]): a consumer stops the handler once it
    /// does not.
    pub fn ownership(&self) -> Ownership {
        self.settlement.ownership()
    }

    /// The event, its facts and its ack/nack handle, without copying the
    /// event (a router hands the envelope to its handler and keeps the
    /// settler).
    pub fn into_parts(self) -> (Envelope, DeliveryInfo, Settler) {
        (self.envelope, self.info, Settler(self.settlement))
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.envelope.id())
            .field("type", &self.envelope.event_type())
            .field("key", self.envelope.key())
            .field("at", &self.info.coordinates)
            .field("attempt", &self.info.attempt)
            .field("settled", &self.is_settled())
            .finish()
    }
}

/// A record exactly as the broker stored it: what dead letters keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawRecord {
    /// The record key, if any.
    pub key: Option<Bytes>,
    /// Every header, in broker order.
    pub headers: Vec<(String, Bytes)>,
    /// The payload, untouched.
    pub payload: Bytes,
}

impl RawRecord {
    /// The record a Keel publisher stores for `event`: its key, Keel's
    /// headers and the payload (to dead-letter, archive or re-publish it).
    /// Fails like publishing would on headers a broker cannot carry.
    pub fn from_envelope(event: &Envelope) -> Result<RawRecord> {
        let mut headers = Vec::with_capacity(8 + event.headers().len());
        crate::wire::visit_headers(event, |name, value| {
            headers.push((name.to_owned(), Bytes::copy_from_slice(value)));
        })?;
        Ok(RawRecord {
            key: Some(Bytes::copy_from_slice(event.key().as_bytes())),
            headers,
            payload: event.payload().clone(),
        })
    }

    /// The first header called `name` (ASCII case-insensitive, as NATS
    /// compares them), as text; `None` when absent or not UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The partitioning key: the record key, else the key header a NATS
    /// message carries ([`wire::key_header`](crate::wire::key_header)).
    pub fn partition_key(&self) -> Option<Bytes> {
        self.key.clone().or_else(|| {
            crate::wire::key_from_headers(
                self.headers.iter().map(|(n, v)| (n.as_str(), v.as_ref())),
            )
            .ok()
            .flatten()
        })
    }
}

/// A stored record that is not a valid Keel event (no key, missing or
/// malformed Keel headers). It arrives as
/// [`Error::Undecodable`](crate::Error::Undecodable) on the
/// member's stream and holds its place like any delivery: settle it (ack
/// once it is dead-lettered or deliberately skipped) or the partition's
/// committed position cannot move past it.
pub struct Undecodable {
    record: RawRecord,
    info: DeliveryInfo,
    reason: String,
    settlement: Settlement,
}

impl Undecodable {
    /// An undecodable record whose outcome goes to `settler` under `token`
    /// (for transport implementations).
    pub fn new(
        record: RawRecord,
        info: DeliveryInfo,
        reason: impl Into<String>,
        settler: Arc<dyn Settle>,
        token: u64,
    ) -> Self {
        Undecodable {
            record,
            info,
            reason: reason.into(),
            settlement: Settlement::new(settler, token),
        }
    }

    /// The record as stored.
    pub fn record(&self) -> &RawRecord {
        &self.record
    }

    /// Coordinates, group and attempt number.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// Why it could not be decoded.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Done with it (dead-lettered or skipped): the position may move on.
    pub fn ack(&self) -> bool {
        self.settlement.settle(Outcome::Ack)
    }

    /// Deliver it again after `delay` (e.g. the dead-letter topic was down).
    pub fn nack_with_delay(&self, delay: Duration) -> bool {
        self.settlement.settle(Outcome::Nack { delay })
    }

    /// Given up for good after it was dead-lettered (see [`Outcome::Term`]).
    pub fn term(&self) -> bool {
        self.settlement.settle(Outcome::Term)
    }

    /// Whether this member still owns the record (see
    /// [`Delivery::is_owned`]).
    pub fn is_owned(&self) -> bool {
        self.settlement.is_owned()
    }

    /// Claims the record for a handler (see [`Delivery::begin`]).
    pub fn begin(&self) -> bool {
        self.settlement.begin()
    }

    /// See [`Delivery::ownership`].
    pub fn ownership(&self) -> Ownership {
        self.settlement.ownership()
    }

    /// The record, its facts, why it is undecodable and its ack/nack handle.
    pub fn into_parts(self) -> (RawRecord, DeliveryInfo, String, Settler) {
        (
            self.record,
            self.info,
            self.reason,
            Settler(self.settlement),
        )
    }
}

impl fmt::Debug for Undecodable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Undecodable")
            .field("at", &self.info.coordinates)
            .field("reason", &self.reason)
            .field("payload_len", &self.record.payload.len())
            .finish()
    }
}

impl fmt::Display for Undecodable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "undecodable record at {}: {}",
            self.info.coordinates, self.reason
        )
    }
}

/// A member's group membership, owned by its [`Deliveries`]. Dropping it
/// leaves the group abruptly (like a crash: in-flight events are
/// re-delivered to the next owner).
#[async_trait]
pub trait Membership: Send + Sync {
    /// Starts a graceful leave that first settles what its commit would
    /// otherwise hand on: events of different keys settle out of order, so
    /// a partition may have events settled above the lowest one still
    /// open. Such a transport keeps delivering the events below each
    /// partition's highest settled or running one (and only those; a
    /// partition assigned meanwhile delivers nothing) until
    /// [`ready_to_leave`](Self::ready_to_leave); the consumer loop handles
    /// them as usual, then leaves. Returns whether it does; the default
    /// does nothing.
    fn start_leaving(&self) -> bool {
        false
    }

    /// After [`start_leaving`](Self::start_leaving): whether nothing is
    /// left to settle before the leave (the default: nothing ever is).
    fn ready_to_leave(&self) -> bool {
        true
    }

    /// Stops handing out deliveries (the start of a graceful leave):
    /// settling one no longer dispatches the next, so deliveries not yet
    /// read can be dropped (nacked) without coming back to this member.
    /// Returns whether it did; the default (a transport whose leave does
    /// not wait for outstanding deliveries) does nothing.
    fn stop_dispatching(&self) -> bool {
        false
    }

    /// How long a graceful leave waits for the deliveries begun before
    /// abandoning them uncommitted (re-delivered to the next owner); `None`
    /// (the default) for a transport whose leave does not wait.
    fn drain_timeout(&self) -> Option<Duration> {
        None
    }

    /// Leaves the group gracefully: commits what was acked, then hands the
    /// partitions over.
    async fn leave(self: Box<Self>) -> Result<()>;
}

/// The partitions a member currently owns, sorted.
pub type Assignment = Vec<u32>;

/// One group member's stream of deliveries.
///
/// Yields `Err` for failures the member cannot hide (the broker refused the
/// group, the connection is gone for good); a transport retries transient
/// failures itself.
pub struct Deliveries {
    // Declared before `stream` so it drops first: the member leaves before
    // buffered deliveries are dropped, and their nacks are then ignored
    // instead of re-dispatched to a member that is going away.
    membership: Option<Box<dyn Membership>>,
    stream: Pin<Box<dyn Stream<Item = Result<Delivery>> + Send>>,
    assignment: watch::Receiver<Assignment>,
    /// Whether reading a delivery begins it ([`Delivery::begin`]).
    begin_on_read: bool,
}

impl Deliveries {
    /// Assembles a member's stream (for transport implementations).
    pub fn new(
        stream: impl Stream<Item = Result<Delivery>> + Send + 'static,
        assignment: watch::Receiver<Assignment>,
        membership: Box<dyn Membership>,
    ) -> Self {
        Deliveries {
            membership: Some(membership),
            stream: Box::pin(stream),
            assignment,
            begin_on_read: true,
        }
    }

    /// Whether each delivery is begun ([`Delivery::begin`]) as it is read
    /// (the default): a revocation of its partition then waits for its
    /// outcome, and deliveries of partitions revoked while they waited
    /// unread are dropped instead of read. A consumer that reads ahead of
    /// its handlers (a pool waiting for a free handler) turns this off and
    /// begins each delivery when a handler starts it, so that deliveries
    /// still waiting are given back at once by a revocation instead of
    /// holding it up.
    pub fn begin_on_read(&mut self, begin: bool) {
        self.begin_on_read = begin;
    }

    /// The partitions this member owns right now. A partition is listed only
    /// once the member's start position on it is fixed, so events published
    /// after a partition appears here are delivered even from `Latest`.
    pub fn assignment(&self) -> Assignment {
        self.assignment.borrow().clone()
    }

    /// A receiver that sees every change of this member's assignment.
    pub fn assignment_changes(&self) -> watch::Receiver<Assignment> {
        self.assignment.clone()
    }

    /// How long [`leave`](Self::leave) waits for the deliveries begun
    /// ([`Delivery::begin`]) before abandoning them uncommitted (`None`: it
    /// does not wait), so a consumer loop can give its running handlers the
    /// same time.
    pub fn drain_timeout(&self) -> Option<Duration> {
        self.membership.as_ref().and_then(|m| m.drain_timeout())
    }

    /// Starts a graceful leave that first hands out what its commit would
    /// otherwise hand on to the next owner (see
    /// [`Membership::start_leaving`]): keep handling the deliveries that
    /// still come until [`ready_to_leave`](Self::ready_to_leave), then
    /// [`leave`](Self::leave). Returns whether the transport does this
    /// (`false`: leave at once). `serve()` and the router do it.
    pub fn start_leaving(&self) -> bool {
        self.membership.as_ref().is_some_and(|m| m.start_leaving())
    }

    /// Whether a leave begun with [`start_leaving`](Self::start_leaving)
    /// has nothing left to settle first.
    pub fn ready_to_leave(&self) -> bool {
        self.membership.as_ref().is_none_or(|m| m.ready_to_leave())
    }

    /// Stops taking deliveries, ahead of a [`leave`](Self::leave): those
    /// dispatched but not read are given back (dropped, so nacked, on
    /// partitions no longer dispatched: they go to the next owner
    /// uncommitted), and nothing more is dispatched, so a revocation
    /// meanwhile waits only for the deliveries begun. Settle those, then
    /// leave. Does nothing for a transport whose leave does not wait.
    pub fn stop_taking(&mut self) {
        if let Some(membership) = &self.membership
            && membership.stop_dispatching()
        {
            self.stream = Box::pin(futures::stream::empty());
        }
    }

    /// Leaves the group gracefully. Settle the deliveries you still hold
    /// first: acks arriving after leaving are ignored and those events are
    /// re-delivered to the next owner.
    pub async fn leave(mut self) -> Result<()> {
        match self.membership.take() {
            Some(membership) => {
                // Deliveries dispatched but never read are given back now
                // (see `stop_taking`); the leave waits only for the ones
                // begun.
                if membership.stop_dispatching() {
                    self.stream = Box::pin(futures::stream::empty());
                }
                membership.leave().await
            }
            None => Ok(()),
        }
    }
}

impl Stream for Deliveries {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let next = self.stream.as_mut().poll_next(cx);
            if self.begin_on_read {
                // A delivery this member no longer owns (its partition was
                // revoked while it waited unread) goes to the next owner:
                // dropped here, nacked and ignored, never handled twice.
                let begun = match &next {
                    Poll::Ready(Some(Ok(delivery))) => delivery.begin(),
                    Poll::Ready(Some(Err(Error::Undecodable(record)))) => record.begin(),
                    _ => true,
                };
                if !begun {
                    continue;
                }
            }
            return next;
        }
    }
}

impl fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliveries")
            .field("assignment", &*self.assignment.borrow())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Outcome)>>);

    impl Settle for Recorder {
        fn settle(&self, token: u64, outcome: Outcome) {
            self.0.lock().unwrap().push((token, outcome));
        }
    }

    fn delivery(recorder: &Arc<Recorder>, token: u64) -> Delivery {
        let info = DeliveryInfo {
            coordinates: Coordinates {
                topic: "t".into(),
                partition: 0,
                position: token,
            },
            group: "g".into(),
            attempt: 1,
        };
        Delivery::new(Envelope::new("e", "k", ""), info, recorder.clone(), token)
    }

    #[test]
    fn first_settlement_wins_and_later_calls_are_no_ops() {
        let recorder = Arc::new(Recorder::default());
        let d = delivery(&recorder, 1);
        assert!(d.ack());
        assert!(!d.ack());
        assert!(!d.nack());
        assert!(!d.term());
        drop(d);
        let d = delivery(&recorder, 2);
        assert!(d.term());
        assert!(!d.ack());
        drop(d);
        assert_eq!(
            *recorder.0.lock().unwrap(),
            vec![(1, Outcome::Ack), (2, Outcome::Term)]
        );
    }

    #[test]
    fn dropping_unsettled_nacks() {
        let recorder = Arc::new(Recorder::default());
        drop(delivery(&recorder, 7));
        let d = delivery(&recorder, 8);
        assert!(d.nack_with_delay(Duration::from_millis(5)));
        drop(d);
        assert_eq!(
            *recorder.0.lock().unwrap(),
            vec![
                (
                    7,
                    Outcome::Nack {
                        delay: Duration::ZERO
                    }
                ),
                (
                    8,
                    Outcome::Nack {
                        delay: Duration::from_millis(5)
                    }
                )
            ]
        );
    }
}
