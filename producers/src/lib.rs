//! `keel-producers`: the publishing side of Keel.
//!
//! | module | what it holds |
//! |---|---|
//! | [`kafka`] | [`KafkaPublisher`](kafka::KafkaPublisher) and [`KafkaAdmin`](kafka::KafkaAdmin) |
//! | [`nats`] | [`JetStreamPublisher`](nats::JetStreamPublisher) and [`JetStreamAdmin`](nats::JetStreamAdmin) |
//! | [`outbox`] | the transactional outbox on PostgreSQL: [`Outbox`](outbox::Outbox), [`OutboxRelay`](outbox::OutboxRelay), [`Inbox`](outbox::Inbox) |

#![forbid(unsafe_code)]

pub mod kafka;
pub mod nats;
pub mod outbox;

/// `e`, which failed the event `event` of a batch, with `progress` (how
/// much of the batch the broker has) added to its reason.
pub(crate) fn batch_failure(
    e: keel_core::Error,
    topic: &str,
    event: keel_core::EventId,
    progress: String,
) -> keel_core::Error {
    use keel_core::Error;
    match e {
        Error::Publish {
            topic,
            event_id,
            reason,
            retriable,
            source,
        } => Error::Publish {
            topic,
            event_id,
            reason: format!("{reason} ({progress})"),
            retriable,
            source,
        },
        // A problem with the topic itself (missing, not authorised) stays
        // one: it is no single event's fault.
        Error::Topic {
            topic,
            reason,
            retriable,
            source,
        } => Error::Topic {
            topic,
            reason: format!("{reason} ({progress})"),
            retriable,
            source,
        },
        other => Error::Publish {
            topic: topic.to_owned(),
            event_id: event.to_string(),
            reason: format!("{other} ({progress})"),
            retriable: other.is_retriable(),
            source: Some(Box::new(other)),
        },
    }
}

/// `step`, or the [`keel_core::transport::past_deadline`] error of `topic`
/// when `limit` (the instant, and the bound it came from) passes first.
pub(crate) async fn bounded<T>(
    topic: &str,
    limit: Option<(tokio::time::Instant, std::time::Duration)>,
    step: impl std::future::Future<Output = keel_core::Result<T>>,
) -> keel_core::Result<T> {
    match limit {
        Some((at, within)) => tokio::time::timeout_at(at, step)
            .await
            .unwrap_or_else(|_| Err(keel_core::transport::past_deadline(topic, within))),
        None => step.await,
    }
}
