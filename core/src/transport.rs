//! The traits every transport implements: [`Publisher`], [`Subscriber`],
//! [`TopicAdmin`], bundled as [`Transport`] with the [`Capabilities`] it
//! claims.
//!
//! Delivery contract of a [`Subscriber`]:
//! - a group's members split the topic's partitions; each event is delivered
//!   to one member of each group;
//! - two deliveries with the same key are never outstanding at once: the
//!   next event of a key is released only after the previous one was acked,
//!   and a nacked event is delivered again before any later event of its key.
//!   A consumer may therefore handle every delivery it receives in parallel
//!   and per-key order still holds;
//! - a position is committed only when a delivery is acked, and only up to
//!   the lowest unacked event of the partition, so a crash re-delivers at
//!   most the in-flight window (at-least-once).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::delivery::{Deliveries, RawRecord};
use crate::envelope::Envelope;
use crate::error::{Error, Result};

/// The broker's acknowledgement of one stored event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Topic the event was stored in (the Kafka and JetStream publishers
    /// share one among a batch's receipts: not an allocation per event).
    /// Compare it as text with `&*receipt.topic == "orders"`.
    pub topic: Arc<str>,
    /// Partition the key mapped to.
    pub partition: u32,
    /// Kafka offset or JetStream stream sequence.
    pub position: u64,
    /// The broker recognised the event id as already stored (publish-side
    /// de-duplication); `position` is then the original's.
    pub duplicate: bool,
}

/// The outcome of an event [`Publisher::publish_each`] could not see
/// acknowledged `within` its bound: retriable, and it may be stored.
pub fn past_deadline(topic: &str, within: Duration) -> Error {
    Error::Timeout {
        operation: format!(
            "publishing to `{topic}` (no acknowledgement in time; the event may still be stored)"
        ),
        after: within,
    }
}

/// One event's outcome in [`Publisher::publish_each`].
#[derive(Debug)]
pub enum Sent {
    /// The broker acknowledged it.
    Stored(Receipt),
    /// Not acknowledged: the error says why and whether trying again may
    /// succeed. A lost acknowledgement (a timeout) may hide a stored event:
    /// publishing it again is at least once, as for a failed batch.
    Failed(Error),
    /// Not sent: the batch stopped at a failure, or ran out of its bound
    /// before sending it, or (on JetStream) an earlier event of its key
    /// was not stored.
    NotSent,
}

/// Publishes events and returns only after the broker acknowledged them.
/// A flush is never taken as proof of storage.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one event; resolves once the broker has stored it.
    async fn publish(&self, topic: &str, event: Envelope) -> Result<Receipt>;

    /// Publishes a batch, pipelining the sends, and resolves once every event
    /// was acknowledged (receipts in input order).
    ///
    /// On error some events may have been stored: the caller retries the
    /// whole batch, and event ids let consumers de-duplicate
    /// ([`Publisher::publish_each`] says which were stored). Transports
    /// keep per-key order within a batch: an event is never acknowledged
    /// after a failed earlier event of its key.
    async fn publish_batch(&self, topic: &str, events: Vec<Envelope>) -> Result<Vec<Receipt>> {
        let mut receipts = Vec::with_capacity(events.len());
        for event in events {
            receipts.push(self.publish(topic, event).await?);
        }
        Ok(receipts)
    }

    /// Publishes a batch like [`Publisher::publish_batch`] and reports
    /// each event's own outcome, in input order, instead of failing the
    /// whole batch: a caller that retries (the outbox relay) re-sends only
    /// what the broker does not have.
    ///
    /// Sending stops once a failure is seen: an event that cannot be sent
    /// is [`Sent::Failed`] and the events not sent [`Sent::NotSent`] (every
    /// later one, or, where a transport sends a key's next event only once
    /// the previous one is stored, as JetStream's does, any event — but
    /// never one before a stored or failed event of its key). Events
    /// already on their way (with pipelining, possibly the whole batch) are
    /// awaited and reported as they come back, so an event may be
    /// [`Sent::Stored`] after a failed earlier event of its key (its
    /// acknowledgement failed while the later one's did not): a caller
    /// keeping per-key order treats such an event as not yet published.
    /// The result has exactly one outcome per event.
    ///
    /// `within` bounds the call: an event not acknowledged by then is
    /// [`Sent::Failed`] with a retriable [`Error::Timeout`] (it may still be
    /// stored) and one not sent by then [`Sent::NotSent`] (or, if it was
    /// being handed to the client when time ran out, that timeout), while what the
    /// broker acknowledged before is [`Sent::Stored`]. A caller with a
    /// deadline of its own (the relay's leases) keeps what the broker has.
    ///
    /// The default publishes one event at a time.
    async fn publish_each(
        &self,
        topic: &str,
        events: Vec<Envelope>,
        within: Duration,
    ) -> Vec<Sent> {
        let deadline = tokio::time::Instant::now() + within;
        let mut outcomes = Vec::with_capacity(events.len());
        let total = events.len();
        for event in events {
            match tokio::time::timeout_at(deadline, self.publish(topic, event)).await {
                Ok(Ok(receipt)) => outcomes.push(Sent::Stored(receipt)),
                Ok(Err(e)) => {
                    outcomes.push(Sent::Failed(e));
                    break;
                }
                Err(_) => {
                    outcomes.push(Sent::Failed(past_deadline(topic, within)));
                    break;
                }
            }
        }
        outcomes.resize_with(total, || Sent::NotSent);
        outcomes
    }

    /// Publishes a stored record as it is — key, headers and payload
    /// untouched — to the partition its key maps to (partition 0 without a
    /// key). For dead letters, redrive and restore, where the record may not
    /// be a valid Keel event. No broker-side de-duplication applies: the
    /// record's event id header (if any) is carried, not enforced.
    async fn publish_record(&self, topic: &str, record: RawRecord) -> Result<Receipt>;
}

/// Where a group starts reading when it has no committed position yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartFrom {
    /// The oldest event still stored.
    #[default]
    Earliest,
    /// Only events published after the member got the partition.
    Latest,
    /// The first event stored at or after this time (the end where there is
    /// none): replay from a point in time, e.g. before an incident.
    Timestamp(chrono::DateTime<chrono::Utc>),
}

/// What to consume, as which group.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// The topic to consume.
    pub topic: String,
    /// The consumer group: members of one group split the partitions.
    pub group: String,
    /// Where to start when the group has no committed position.
    pub start: StartFrom,
    /// Most deliveries this member has outstanding (not yet acked or nacked)
    /// at once, across partitions. Bounds memory and the re-delivery window
    /// after a crash.
    pub max_in_flight: usize,
}

impl Subscription {
    /// Default for [`Subscription::max_in_flight`].
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

    /// A subscription starting from the earliest event, with the default
    /// in-flight limit.
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        Subscription {
            topic: topic.into(),
            group: group.into(),
            start: StartFrom::Earliest,
            max_in_flight: Self::DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// Sets where a group without a committed position starts.
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Sets the in-flight limit (at least 1).
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.max_in_flight = limit.max(1);
        self
    }
}

/// Joins consumer groups.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Joins `subscription.group` on `subscription.topic` and returns this
    /// member's stream of deliveries. Dropping the stream leaves the group;
    /// [`Deliveries::leave`] leaves gracefully.
    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries>;
}

/// A topic's shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Fixed partition count; keys map to partitions by murmur2.
    pub partitions: u32,
}

/// Creates topics.
#[async_trait]
pub trait TopicAdmin: Send + Sync {
    /// Creates the topic if it does not exist; succeeds if it exists with the
    /// same partition count and fails, naming the difference, otherwise.
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<()>;
}

/// The features a transport claims; the conformance suite tests each one
/// that is claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Members of a group split partitions and rebalance on join/leave.
    pub consumer_groups: bool,
    /// Per-key order holds while different keys are handled in parallel.
    pub per_key_order: bool,
    /// Events stay stored: a new group can read from the start.
    pub replay_from_start: bool,
    /// A nacked delivery is delivered again.
    pub redelivery_after_nack: bool,
    /// Publishing the same event id twice stores it once.
    pub publish_dedup: bool,
    /// How long a rebalance may take on this transport (conformance waits
    /// this long for assignments to settle).
    pub rebalance_timeout: Duration,
}

/// A complete transport: publish, subscribe, create topics.
pub trait Transport: Publisher + Subscriber + TopicAdmin {
    /// A short name for logs (`memory`, `kafka`, `nats`).
    fn name(&self) -> &'static str;
    /// The features this transport claims.
    fn capabilities(&self) -> Capabilities;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores at once, except an event keyed `slow`, which never returns.
    struct Slow;

    #[async_trait]
    impl Publisher for Slow {
        async fn publish(&self, topic: &str, event: Envelope) -> Result<Receipt> {
            if event.key().as_bytes() == b"slow" {
                std::future::pending::<()>().await;
            }
            Ok(Receipt {
                topic: topic.into(),
                partition: 0,
                position: 0,
                duplicate: false,
            })
        }

        async fn publish_record(&self, _: &str, _: RawRecord) -> Result<Receipt> {
            Err(Error::closed("records"))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn publish_each_reports_every_event_within_its_bound() {
        let events = ["a", "b", "slow", "c"]
            .map(|k| Envelope::new("t", k, "x"))
            .to_vec();
        // Paused clock: a bound ignored fails here at once, not by hanging.
        let outcomes = tokio::time::timeout(
            Duration::from_secs(5),
            Slow.publish_each("orders", events, Duration::from_secs(1)),
        )
        .await
        .expect("publish_each kept to its bound");
        assert!(
            matches!(
                outcomes[..],
                [
                    Sent::Stored(_),
                    Sent::Stored(_),
                    Sent::Failed(Error::Timeout { .. }),
                    Sent::NotSent
                ]
            ),
            "{outcomes:?}"
        );
    }
}
