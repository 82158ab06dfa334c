//! Dead letters: an event that cannot be handled — poison, an unknown type
//! (when the router's policy says so), a fatal handler error, a spent retry
//! budget — is stored in a dead-letter topic, and only then terminated
//! (`+TERM` on JetStream; Kafka commits past it).
//!
//! The dead-letter record is the original record — key, payload untouched,
//! the event's headers — plus headers that say what happened
//! ([`headers`]): the error, the reason, the attempt count, the original
//! topic, partition and position (Kafka offset or stream sequence), the
//! group and the time. The event id header is kept, so a redrive back to
//! the original topic is de-duplicated by inboxes.
//!
//! If the dead-letter topic cannot take the record, the event is not acked:
//! it is re-delivered after `retry_delay` and goes through the handler (and
//! its budget) again — nothing is dropped. On NATS, where topic names cannot
//! contain `.`, the default suffix is `-dlq` (`orders-dlq`); elsewhere it
//! is `.dlq` (`orders.dlq`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use keel_core::{
    Envelope, Error, Publisher, RawRecord, Receipt, Result, TopicSpec, Transport, wire,
};

use super::context::Context;
use super::layer::{DeadLetterReason, Layer, Next, Verdict};

/// Names of the headers a dead letter carries besides the original ones.
pub mod headers {
    /// The error that sent it here, one line.
    pub const ERROR: &str = "keel-dlq-error";
    /// [`DeadLetterReason`](super::DeadLetterReason) as text (`poison`,
    /// `unknown-type`, `fatal`, `retries-exhausted`).
    pub const REASON: &str = "keel-dlq-reason";
    /// Attempts made (the failing one included).
    pub const ATTEMPTS: &str = "keel-dlq-attempts";
    /// The topic it was consumed from.
    pub const TOPIC: &str = "keel-dlq-topic";
    /// The partition it was consumed from.
    pub const PARTITION: &str = "keel-dlq-partition";
    /// Its Kafka offset or JetStream stream sequence there.
    pub const POSITION: &str = "keel-dlq-position";
    /// The consumer group that gave up on it.
    pub const GROUP: &str = "keel-dlq-group";
    /// When it was dead-lettered (RFC 3339, UTC).
    pub const AT: &str = "keel-dlq-at";
    /// On a redrive marker (see [`redrive_marker`](super::redrive_marker)):
    /// which dead letter was sent back, as `<partition>@<position>` in the
    /// dead-letter topic.
    pub const REDRIVEN: &str = "keel-dlq-redriven";
    /// On a redrive marker: when (RFC 3339, UTC).
    pub const REDRIVEN_AT: &str = "keel-dlq-redriven-at";
    /// Every dead-letter header, to strip them for a redrive.
    pub const ALL: [&str; 10] = [
        ERROR,
        REASON,
        ATTEMPTS,
        TOPIC,
        PARTITION,
        POSITION,
        GROUP,
        AT,
        REDRIVEN,
        REDRIVEN_AT,
    ];
}

/// Longest error text kept in a header.
const MAX_ERROR_LEN: usize = 4096;

/// Longest error text of a dead letter sent again after the broker refused
/// it for good (too large, most likely: an event near the size limit with
/// a long error beside it).
const SHORT_ERROR_LEN: usize = 256;

/// The dead-letter layer.
pub struct DeadLetters {
    transport: Arc<dyn Transport>,
    suffix: String,
    partitions: u32,
    retry_delay: Duration,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("transport", &self.transport.name())
            .field("suffix", &self.suffix)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// Dead letters on `transport`, to `<topic>.dlq` (`<topic>-dlq` on
    /// NATS), created with 1 partition when missing.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        let suffix = default_suffix(transport.name()).to_owned();
        DeadLetters {
            transport,
            suffix,
            partitions: 1,
            retry_delay: Duration::from_secs(5),
        }
    }

    /// Uses `<topic><suffix>` as the dead-letter topic. An empty suffix
    /// would make every topic its own dead-letter topic (a failed event
    /// handled again and again); it is refused.
    pub fn suffix(mut self, suffix: impl Into<String>) -> Result<Self> {
        let suffix = suffix.into();
        if suffix.is_empty() {
            return Err(Error::config(
                "dead_letters.suffix",
                "must not be empty: the dead-letter topic would be the topic itself",
            ));
        }
        self.suffix = suffix;
        Ok(self)
    }

    /// Partitions of dead-letter topics the router creates (default 1). An
    /// existing topic must have this count.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions.max(1);
        self
    }

    /// How long to wait before handling an event again when its dead
    /// letter could not be stored. Default 5 s.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// The dead-letter topic of `topic`.
    pub fn topic_for(&self, topic: &str) -> String {
        format!("{topic}{}", self.suffix)
    }

    /// Stores the context's record in its dead-letter topic.
    async fn send(&self, ctx: &Context, error: &Error, reason: DeadLetterReason) -> Result<String> {
        let topic = self.topic_for(&ctx.info().coordinates.topic);
        let error = error.to_string();
        let letter = dead_letter(original_record(ctx)?, ctx, &error, reason, MAX_ERROR_LEN);
        match self.transport.publish_record(&topic, letter).await {
            Ok(_) => Ok(topic),
            // Refused for good, with an error text that a short one could
            // replace: once more with it cut (the event stays whole).
            Err(e) if !e.is_retriable() && error.len() > SHORT_ERROR_LEN => {
                tracing::debug!(%topic, error = %e, "dead letter refused; sending it again with its error text cut short");
                let letter =
                    dead_letter(original_record(ctx)?, ctx, &error, reason, SHORT_ERROR_LEN);
                self.transport.publish_record(&topic, letter).await?;
                Ok(topic)
            }
            Err(e) => Err(e),
        }
    }
}

/// The record a dead letter carries: the one delivered.
fn original_record(ctx: &Context) -> Result<RawRecord> {
    match (ctx.record(), ctx.event()) {
        (Ok(record), _) => Ok(record),
        // Stored headers a publisher refuses (a line break in a value,
        // which Kafka allows): kept, with the breaks made spaces, rather
        // than losing the event.
        (Err(_), Some(event)) => Ok(lossy_record(event)),
        (Err(e), None) => Err(e),
    }
}

/// The dead-letter suffix used on a transport by default.
pub fn default_suffix(transport: &str) -> &'static str {
    if transport == "nats" { "-dlq" } else { ".dlq" }
}

/// `record` with the dead-letter headers of `ctx` (earlier ones replaced,
/// for an event that was redriven and failed again).
fn dead_letter(
    mut record: RawRecord,
    ctx: &Context,
    error: &str,
    reason: DeadLetterReason,
    max_error_len: usize,
) -> RawRecord {
    let info = ctx.info();
    strip_dead_letter_headers(&mut record);
    let text = cut(one_line(error), max_error_len);
    let fields = [
        (headers::ERROR, text),
        (headers::REASON, reason.as_str().to_owned()),
        (headers::ATTEMPTS, info.attempt.to_string()),
        (headers::TOPIC, info.coordinates.topic.clone()),
        (headers::PARTITION, info.coordinates.partition.to_string()),
        (headers::POSITION, info.coordinates.position.to_string()),
        (headers::GROUP, info.group.clone()),
        (
            headers::AT,
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
    ];
    for (name, value) in fields {
        record.headers.push((name.to_owned(), Bytes::from(value)));
    }
    record
}

/// The record of `event` with every header kept, values made single-line
/// (and cut as an error text is): for an event whose stored headers a
/// publisher refuses (a line break in a value, which Kafka allows).
pub fn lossy_record(event: &Envelope) -> RawRecord {
    let mut headers = vec![
        (wire::EVENT_ID, event.id().to_string()),
        (wire::EVENT_TYPE, one_line(event.event_type())),
        (
            wire::OCCURRED_AT,
            event
                .occurred_at()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
    ];
    let optional = [
        (wire::SOURCE, event.source()),
        (wire::CORRELATION_ID, event.correlation_id()),
        (wire::CAUSATION_ID, event.causation_id()),
        (wire::TRACEPARENT, event.trace().traceparent.as_deref()),
        (wire::TRACESTATE, event.trace().tracestate.as_deref()),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            headers.push((name, one_line(value)));
        }
    }
    let mut record = RawRecord {
        key: Some(Bytes::copy_from_slice(event.key().as_bytes())),
        headers: headers
            .into_iter()
            .map(|(n, v)| (n.to_owned(), Bytes::from(v)))
            .collect(),
        payload: event.payload().clone(),
    };
    for (name, value) in event.all_headers() {
        record
            .headers
            .push((name.to_owned(), Bytes::from(one_line(value))));
    }
    record
}

/// `text` on one line (NATS headers cannot carry line breaks), at most
/// [`MAX_ERROR_LEN`] bytes.
fn one_line(text: &str) -> String {
    let out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    cut(out, MAX_ERROR_LEN)
}

/// `text` cut to at most `max` bytes (and an ellipsis), on a character
/// boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
        text.push('…');
    }
    text
}

/// The original record of a dead letter: its dead-letter headers removed
/// and the topic it came from (for a redrive).
pub fn original(mut record: RawRecord) -> (Option<String>, RawRecord) {
    let topic = record.header(headers::TOPIC).map(str::to_owned);
    strip_dead_letter_headers(&mut record);
    (topic, record)
}

/// Removes every `keel-dlq-*` header [`headers::ALL`] names.
fn strip_dead_letter_headers(record: &mut RawRecord) {
    record
        .headers
        .retain(|(name, _)| !headers::ALL.iter().any(|h| name.eq_ignore_ascii_case(h)));
}

/// Publishes a dead letter's original record back to the topic it came
/// from, with its event id, so inboxes de-duplicate a redrive of an event
/// that was handled meanwhile. Fails, without publishing, for a record that
/// is not a Keel dead letter.
pub async fn redrive(publisher: &dyn Publisher, dead_letter: RawRecord) -> Result<Receipt> {
    if is_redrive_marker(&dead_letter) {
        return Err(Error::malformed(format!(
            "the record is a redrive marker (`{}`), not a dead letter",
            headers::REDRIVEN
        )));
    }
    let (topic, record) = original(dead_letter);
    let topic = topic.ok_or_else(|| {
        Error::malformed(format!(
            "the record has no `{}` header; it is not a Keel dead letter",
            headers::TOPIC
        ))
    })?;
    publisher.publish_record(&topic, record).await
}

/// The record that says, in the dead-letter log itself, that the dead
/// letter at `partition@position` of the dead-letter topic went back to its
/// topic at `at` (RFC 3339): `keel-dlq-redriven` names the letter,
/// `keel-dlq-redriven-at` the time, the event id is kept for people
/// reading the log; no key, no payload, and no `keel-dlq-topic`, so nothing
/// takes it for a dead letter to send. A later redrive skips that letter;
/// a newer letter of the event (it failed again) goes back again.
pub fn redrive_marker(
    dead_letter: &RawRecord,
    partition: u32,
    position: u64,
    at: &str,
) -> RawRecord {
    let mut marker_headers: Vec<(String, Bytes)> = dead_letter
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(wire::EVENT_ID))
        .cloned()
        .collect();
    marker_headers.push((
        headers::REDRIVEN.to_owned(),
        Bytes::from(letter_at(partition, position)),
    ));
    marker_headers.push((
        headers::REDRIVEN_AT.to_owned(),
        Bytes::copy_from_slice(at.as_bytes()),
    ));
    RawRecord {
        key: None,
        headers: marker_headers,
        payload: Bytes::new(),
    }
}

/// How a [`redrive_marker`] names its letter: `<partition>@<position>` in
/// the dead-letter topic.
pub fn letter_at(partition: u32, position: u64) -> String {
    format!("{partition}@{position}")
}

/// Whether `record` is a [`redrive_marker`], not a dead letter.
pub fn is_redrive_marker(record: &RawRecord) -> bool {
    record.header(headers::REDRIVEN).is_some()
}

#[async_trait]
impl Layer for DeadLetters {
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        match next.run(ctx).await {
            Verdict::DeadLetter { error, reason } => match self.send(ctx, &error, reason).await {
                Ok(topic) => Verdict::DeadLettered { topic, reason },
                Err(e) => {
                    // Refused for good (too large for the dead-letter
                    // topic, or not ours to write): only a change to that
                    // topic lets it through, so say which.
                    let remedy = if e.is_retriable() {
                        String::new()
                    } else {
                        format!(
                            "; `{}` refuses it as it is: raise that topic's size limit \
                             (Kafka `max.message.bytes`, JetStream `max_msg_size`) or grant \
                             the write; until then the event is tried again every {:?} and \
                             later events of its key wait",
                            self.topic_for(&ctx.info().coordinates.topic),
                            self.retry_delay
                        )
                    };
                    Verdict::Backoff {
                        error: Error::retriable(format!(
                            "cannot store the dead letter ({e}) of an event that failed ({error}){remedy}"
                        )),
                        delay: Some(self.retry_delay),
                    }
                }
            },
            other => other,
        }
    }

    async fn start(&self, topics: &[String]) -> Result<()> {
        for topic in topics {
            let spec = TopicSpec {
                name: self.topic_for(topic),
                partitions: self.partitions,
            };
            self.transport.ensure_topic(&spec).await.map_err(|e| {
                Error::config(
                    "dead_letters",
                    format!(
                        "cannot prepare dead-letter topic `{}` for `{topic}`: {e} \
                         (set DeadLetters::partitions to the existing topic's count, or a suffix)",
                        spec.name
                    ),
                )
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use keel_core::{Envelope, MemoryTransport, Subscriber, Subscription, TopicAdmin};

    use super::*;
    use crate::router::testing::run_layer;

    async fn transport() -> Arc<MemoryTransport> {
        let t = Arc::new(MemoryTransport::new());
        t.ensure_topic(&TopicSpec {
            name: "orders".into(),
            partitions: 1,
        })
        .await
        .unwrap();
        t
    }

    async fn first_record(t: &MemoryTransport, topic: &str) -> Envelope {
        let mut member = t
            .subscribe(Subscription::new(topic, "check"))
            .await
            .unwrap();
        let delivery = member.next().await.unwrap().unwrap();
        delivery.ack();
        delivery.envelope().clone()
    }

    /// Runs `dlq` on `event` (first attempt, topic `orders`) behind a
    /// handler that fails for good with `error`.
    async fn fail_for_good(dlq: &DeadLetters, event: Envelope, error: &str) -> Verdict {
        let error = error.to_owned();
        let ctx = Context::for_test("orders", event, 1);
        run_layer(dlq, ctx, move || Verdict::DeadLetter {
            error: Error::fatal(error.clone()),
            reason: DeadLetterReason::Fatal,
        })
        .await
    }

    #[tokio::test]
    async fn a_redrive_marker_names_its_letter_and_is_never_redriven() {
        let event = Envelope::new("shop.OrderPlaced", "o-1", vec![1u8, 2, 3]);
        let mut letter = RawRecord::from_envelope(&event).unwrap();
        letter
            .headers
            .push((headers::TOPIC.into(), Bytes::from_static(b"orders")));
        let marker = redrive_marker(&letter, 2, 17, "2026-12-01T11:00:00Z");
        assert!(is_redrive_marker(&marker) && !is_redrive_marker(&letter));
        assert!(marker.payload.is_empty() && marker.key.is_none());
        assert_eq!(marker.header(headers::REDRIVEN), Some("2@17"));
        let id = event.id().to_string();
        assert_eq!(marker.header(wire::EVENT_ID), Some(id.as_str()));
        assert_eq!(marker.header(headers::TOPIC), None, "not a letter to send");
        let t = transport().await;
        let e = redrive(t.as_ref(), marker).await.unwrap_err();
        assert!(e.to_string().contains("redrive marker"), "{e}");
    }

    #[tokio::test]
    async fn a_dead_letter_keeps_the_event_and_says_what_happened() {
        let t = transport().await;
        let dlq = DeadLetters::new(t.clone());
        dlq.start(&["orders".into()]).await.unwrap();
        let event = Envelope::new("shop.OrderPlaced", "o-1", vec![0u8, 0, 0, 0, 7, 42])
            .with_header("tenant", "acme");
        let ctx = Context::for_test("orders", event.clone(), 5);
        let verdict = run_layer(&dlq, ctx, || Verdict::DeadLetter {
            error: Error::fatal("card declined\nfor good"),
            reason: DeadLetterReason::Exhausted,
        })
        .await;
        match verdict {
            Verdict::DeadLettered { topic, reason } => {
                assert_eq!(topic, "orders.dlq");
                assert_eq!(reason, DeadLetterReason::Exhausted);
            }
            other => panic!("{other:?}"),
        }
        let stored = first_record(&t, "orders.dlq").await;
        assert_eq!(stored.id(), event.id());
        assert_eq!(stored.key(), event.key());
        assert_eq!(stored.payload(), event.payload(), "payload untouched");
        let h = stored.headers();
        assert_eq!(h["tenant"], "acme");
        assert_eq!(h[headers::REASON], "retries-exhausted");
        assert_eq!(h[headers::ATTEMPTS], "5");
        assert_eq!(h[headers::TOPIC], "orders");
        assert_eq!(h[headers::PARTITION], "0");
        assert_eq!(h[headers::POSITION], "0");
        assert_eq!(h[headers::GROUP], "g");
        assert!(
            h[headers::ERROR].contains("card declined for good"),
            "{h:?}"
        );

        // The original comes back for a redrive.
        let (topic, record) = original(RawRecord::from_envelope(&stored).unwrap());
        assert_eq!(topic.as_deref(), Some("orders"));
        assert!(
            record
                .headers
                .iter()
                .all(|(n, _)| !n.starts_with("keel-dlq-"))
        );
        assert_eq!(record, RawRecord::from_envelope(&event).unwrap());
    }

    #[tokio::test]
    async fn a_dead_letter_that_cannot_be_stored_is_retried_not_lost() {
        let t = transport().await; // no orders.dlq: start() was not called
        let dlq = DeadLetters::new(t.clone()).retry_delay(Duration::from_millis(7));
        let verdict = fail_for_good(&dlq, Envelope::new("e", "k", ""), "bad").await;
        match verdict {
            Verdict::Backoff { error, delay } => {
                assert_eq!(delay, Some(Duration::from_millis(7)));
                assert!(error.to_string().contains("orders.dlq"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        // Other verdicts pass untouched.
        let ctx = Context::for_test("orders", Envelope::new("e", "k", ""), 1);
        assert!(matches!(
            run_layer(&dlq, ctx, || Verdict::Handled).await,
            Verdict::Handled
        ));
    }

    /// The in-memory broker with a size limit per record, as brokers have.
    struct Limited(Arc<MemoryTransport>, usize);

    #[async_trait]
    impl keel_core::Publisher for Limited {
        async fn publish(&self, topic: &str, event: Envelope) -> Result<keel_core::Receipt> {
            self.publish_record(topic, RawRecord::from_envelope(&event)?)
                .await
        }

        async fn publish_record(
            &self,
            topic: &str,
            record: RawRecord,
        ) -> Result<keel_core::Receipt> {
            let size = record.payload.len()
                + record
                    .headers
                    .iter()
                    .map(|(n, v)| n.len() + v.len())
                    .sum::<usize>();
            if size > self.1 {
                return Err(Error::Publish {
                    topic: topic.into(),
                    event_id: "letter".into(),
                    reason: format!("{size} bytes; the broker takes at most {}", self.1),
                    retriable: false,
                    source: None,
                });
            }
            self.0.publish_record(topic, record).await
        }
    }

    #[async_trait]
    impl Subscriber for Limited {
        async fn subscribe(&self, subscription: Subscription) -> Result<keel_core::Deliveries> {
            self.0.subscribe(subscription).await
        }
    }

    #[async_trait]
    impl TopicAdmin for Limited {
        async fn ensure_topic(&self, spec: &TopicSpec) -> Result<()> {
            self.0.ensure_topic(spec).await
        }
    }

    impl Transport for Limited {
        fn name(&self) -> &'static str {
            "limited"
        }

        fn capabilities(&self) -> keel_core::transport::Capabilities {
            self.0.capabilities()
        }
    }

    #[tokio::test]
    async fn a_letter_too_large_with_its_error_goes_with_the_error_cut_short() {
        let t = transport().await;
        // Room for the event and a short error, not for a 4 KiB one.
        let dlq = DeadLetters::new(Arc::new(Limited(t.clone(), 3_000)));
        dlq.start(&["orders".into()]).await.unwrap();
        let event = Envelope::new("e", "k", vec![7u8; 2_000]);
        let verdict = fail_for_good(&dlq, event.clone(), &"x".repeat(10_000)).await;
        assert!(
            matches!(verdict, Verdict::DeadLettered { .. }),
            "{verdict:?}"
        );
        let stored = first_record(&t, "orders.dlq").await;
        assert_eq!(stored.payload(), event.payload(), "payload untouched");
        let error = &stored.headers()[headers::ERROR];
        assert!(
            error.len() <= SHORT_ERROR_LEN + '…'.len_utf8(),
            "{}",
            error.len()
        );
        assert!(error.contains("xxx"), "{error}");
        // Too large even so: backed off, not lost, naming the topic to fix.
        let verdict = fail_for_good(
            &dlq,
            Envelope::new("e", "k", vec![7u8; 3_000]),
            &"x".repeat(10_000),
        )
        .await;
        let Verdict::Backoff { error, delay } = verdict else {
            panic!("{verdict:?}");
        };
        assert_eq!(delay, Some(Duration::from_secs(5)));
        let error = error.to_string();
        assert!(
            error.contains("`orders.dlq` refuses it as it is")
                && error.contains("size limit (Kafka `max.message.bytes`")
                && error.contains("every 5s and later events of its key wait"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_event_with_headers_a_publisher_refuses_is_still_dead_lettered() {
        let t = transport().await;
        let dlq = DeadLetters::new(t.clone());
        dlq.start(&["orders".into()]).await.unwrap();
        // Kafka carries a line break in a header value; Keel's encoder
        // refuses one, so the envelope cannot be re-encoded as it is.
        let event = Envelope::new("e", "k", "p").with_source("billing\nv2");
        assert!(RawRecord::from_envelope(&event).is_err());
        let verdict = fail_for_good(&dlq, event.clone(), "bad").await;
        assert!(
            matches!(verdict, Verdict::DeadLettered { .. }),
            "{verdict:?}"
        );
        let stored = first_record(&t, "orders.dlq").await;
        assert_eq!(stored.id(), event.id());
        assert_eq!(stored.source(), Some("billing v2"));
    }

    #[test]
    fn errors_fit_in_one_header_line() {
        let long = "é".repeat(5000);
        let line = one_line(&format!("a\r\nb {long}"));
        assert!(line.starts_with("a  b "));
        assert!(line.len() <= MAX_ERROR_LEN + '…'.len_utf8());
        assert_eq!(default_suffix("nats"), "-dlq");
        assert_eq!(default_suffix("kafka"), ".dlq");
    }
}
