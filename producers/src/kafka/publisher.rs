//! `KafkaPublisher`: Keel events to Kafka through an idempotent
//! librdkafka producer.
//!
//! Delivery guarantee: a publish resolves only when the broker has
//! acknowledged the event with `acks=all` (a local enqueue or flush is never
//! taken as storage). Idempotence keeps retried batches from duplicating or
//! reordering events; keys map to partitions by murmur2 as in Kafka's Java
//! clients. A batch is enqueued in order — waiting on a full local queue
//! rather than letting a later event overtake — and its acknowledgements are
//! awaited together.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::transport::{Publisher, Receipt, Sent};
use keel_core::{Envelope, Error, EventId, RawRecord, Result, wire};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tracing::Instrument;

use super::config::KafkaPublisherConfig;
use super::context::ErrorMemory;

/// How long to wait before retrying an enqueue into a full local queue.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

/// How long an answer to "does this topic exist" is reused.
const MISSING_TTL: Duration = Duration::from_secs(5);

/// How long that question waits for the broker's metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(1);

/// Most topics whose answer is kept (past it, the answers start afresh).
const MAX_TOPIC_CHECKS: usize = 1024;

/// What the broker said of topics: asked after a publish timed out, and
/// before a bounded publish's first batch to a topic (see
/// [`KafkaPublisher::topic_missing`]).
#[derive(Default)]
struct TopicChecks {
    /// Per topic: when it answered, and whether the topic is missing.
    answers: std::collections::HashMap<String, (std::time::Instant, bool)>,
    /// Topics being asked about now.
    asking: std::collections::HashSet<String>,
}

/// A producer and its generation (see [`KafkaPublisher::recover`]).
type Current = (u64, FutureProducer<ErrorMemory>);

/// A producer for `config` whose client errors go to `errors`.
fn create(
    config: &KafkaPublisherConfig,
    errors: &ErrorMemory,
) -> rdkafka::error::KafkaResult<FutureProducer<ErrorMemory>> {
    config.client_config().create_with_context(errors.clone())
}

/// Publishes Keel events to Kafka.
pub struct KafkaPublisher {
    /// The producer and its generation: replaced (see [`Self::recover`])
    /// when the broker stops accepting its idempotent sequence.
    producer: std::sync::RwLock<Current>,
    /// The producers' last client-level error, told with a timeout.
    errors: ErrorMemory,
    /// Whether topics whose publishes timed out exist (see
    /// [`Self::topic_missing`]).
    missing: Arc<std::sync::Mutex<TopicChecks>>,
    config: KafkaPublisherConfig,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("bootstrap", &self.config.client.bootstrap)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A publisher with validated `config`. Connects lazily.
    pub fn new(config: KafkaPublisherConfig) -> Result<Self> {
        config.validate()?;
        let errors = ErrorMemory::default();
        let producer = create(&config, &errors).map_err(|e| {
            Error::config(
                "kafka",
                format!("librdkafka refused the producer configuration: {e}"),
            )
        })?;
        Ok(KafkaPublisher {
            producer: std::sync::RwLock::new((0, producer)),
            errors,
            missing: Arc::default(),
            config,
        })
    }

    /// The current producer and its generation.
    fn producer(&self) -> Current {
        match self.producer.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// After a delivery failed on producer `generation`: when librdkafka
    /// declared the producer fatally failed, or the broker refused its
    /// idempotent producer state (as after a broker restart that lost or
    /// rejected the producer's sequence — tansu answers these with an
    /// unknown server error), replaces it with a new producer (a new
    /// producer id). Without this every later publish would fail the same
    /// way until the process restarts. Events sent again under the new id
    /// may be stored twice (at least once, as always).
    fn recover(&self, generation: u64, e: &KafkaError) {
        let (_, current) = self.producer();
        let fatal = current.client().fatal_error().is_some();
        let stuck = matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Unknown
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::Fatal
            )
        );
        if !(fatal || stuck) {
            return;
        }
        let Ok(mut slot) = self.producer.write() else {
            return;
        };
        if slot.0 != generation {
            return; // already replaced by another failed delivery
        }
        match create(&self.config, &self.errors) {
            Ok(fresh) => {
                tracing::warn!(error = %e, fatal, generation, "replacing the Kafka producer: the broker no longer accepts its idempotent state");
                *slot = (generation + 1, fresh);
            }
            Err(create) => {
                tracing::error!(error = %create, "cannot replace the failed Kafka producer");
            }
        }
    }

    /// Whether the broker said `topic` does not exist, asked after a
    /// publish timed out (librdkafka holds the events of a topic it does
    /// not know until their timeout rather than fail them) or before a
    /// bounded publish's first batch to it. The last answer
    /// is used however old; one older than [`MISSING_TTL`], or none, starts
    /// one metadata request for the topic (none while one is running),
    /// whose answer later calls see. With `wait`, waits for the request it
    /// started (at most [`METADATA_TIMEOUT`]); without, never waits, so a
    /// bounded publish keeps to its bound.
    async fn topic_missing(&self, topic: &str, wait: bool) -> bool {
        let (last, ask) = {
            let mut checks = self.missing.lock().unwrap_or_else(|p| p.into_inner());
            let last = checks.answers.get(topic).copied();
            let stale = last.is_none_or(|(at, _)| at.elapsed() >= MISSING_TTL);
            (last, stale && checks.asking.insert(topic.to_owned()))
        };
        if ask {
            let (_, producer) = self.producer();
            let (checks, name) = (self.missing.clone(), topic.to_owned());
            // Answered into the shared map even if this caller is gone.
            let asked = tokio::task::spawn_blocking(move || {
                let missing = producer
                    .client()
                    .fetch_metadata(Some(&name), METADATA_TIMEOUT)
                    .ok()
                    .map(|metadata| listed_as_missing(&metadata, &name));
                let mut checks = checks.lock().unwrap_or_else(|p| p.into_inner());
                checks.asking.remove(&name);
                if let Some(missing) = missing {
                    if checks.answers.len() >= MAX_TOPIC_CHECKS {
                        checks.answers.clear();
                    }
                    checks
                        .answers
                        .insert(name, (std::time::Instant::now(), missing));
                }
                missing
            });
            if wait && let Ok(Some(missing)) = asked.await {
                return missing;
            }
        }
        last.is_some_and(|(_, missing)| missing)
    }

    /// `topic` took an event: an answer that said it is missing (asked
    /// before it was created, or of a broker that did not know it yet) is
    /// out of date, and a later timeout must not be named after it.
    fn stored_in(&self, topic: &str) {
        let mut checks = self.missing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(answer) = checks.answers.get_mut(topic)
            && answer.1
        {
            *answer = (std::time::Instant::now(), false);
        }
    }

    /// Whether the broker was asked about `topic` (or is being asked).
    fn asked_about(&self, topic: &str) -> bool {
        let checks = self.missing.lock().unwrap_or_else(|p| p.into_inner());
        checks.answers.contains_key(topic) || checks.asking.contains(topic)
    }

    /// Waits until every enqueued event was acknowledged or failed.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let (_, producer) = self.producer();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| Error::closed(format!("kafka flush task: {e}")))?
            .map_err(|e| Error::Timeout {
                operation: format!("kafka flush ({e})"),
                after: timeout,
            })
    }

    /// Enqueues one event, waiting while the local queue is full.
    async fn enqueue(
        &self,
        current: &Current,
        topic: &str,
        event: &Envelope,
    ) -> Result<(u64, DeliveryFuture)> {
        let mut owned = Some(OwnedHeaders::new_with_capacity(8 + event.headers().len()));
        wire::visit_headers(event, |name, value| {
            if let Some(headers) = owned.take() {
                owned = Some(headers.insert(Header {
                    key: name,
                    value: Some(value),
                }));
            }
        })?;
        let record = FutureRecord::to(topic)
            .key(event.key().as_bytes())
            .payload(event.payload().as_ref())
            .headers(owned.unwrap_or_default());
        self.send(current, topic, What::Event(event.id()), record)
            .await
    }

    /// Hands `record` to the producer, waiting while the local queue is full.
    async fn send(
        &self,
        current: &Current,
        topic: &str,
        what: What<'_>,
        mut record: FutureRecord<'_, [u8], [u8]>,
    ) -> Result<(u64, DeliveryFuture)> {
        let (generation, producer) = (current.0, &current.1);
        // The clock is read only once the queue is full: not per event.
        let mut deadline = None;
        loop {
            match producer.send_result(record) {
                Ok(future) => return Ok((generation, future)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    let now = tokio::time::Instant::now();
                    let deadline = *deadline.get_or_insert(now + self.config.ack_timeout());
                    if now >= deadline {
                        return Err(publish_error(
                            topic,
                            what,
                            &self.with_last_error(
                                "the local producer queue stayed full (is the broker reachable?)",
                            ),
                            true,
                            None,
                        ));
                    }
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                // librdkafka already found the topic missing (see
                // `UNKNOWN_TOPIC_WAIT_MS`): refused at once.
                Err((e, _)) if unknown_topic(&e) => return Err(missing_topic(topic)),
                Err((e, _)) => {
                    self.recover(generation, &e);
                    let retriable = retriable(&e);
                    return Err(publish_error(
                        topic,
                        what,
                        "cannot enqueue",
                        retriable,
                        Some(e),
                    ));
                }
            }
        }
    }

    /// Enqueues `events` in order, then hands each acknowledgement to
    /// `acked`, in input order. Sending stops at the first event that
    /// cannot be enqueued: it comes back (its place in the batch, its id,
    /// the error) once every event sent before it was acknowledged or not.
    /// With `within`, what is not enqueued or acknowledged by then fails
    /// as [`keel_core::transport::past_deadline`]
    /// (what was acknowledged before still counts).
    async fn send_batch(
        &self,
        topic: &str,
        events: Vec<Envelope>,
        within: Option<Duration>,
        mut acked: impl FnMut(Result<Receipt>),
    ) -> Option<(usize, EventId, Error)> {
        let limit = within.map(|w| (tokio::time::Instant::now() + w, w));
        let mut pending = Vec::with_capacity(events.len());
        // One producer for the whole batch: not a lock and a clone per event.
        let current = self.producer();
        let mut stopped = None;
        // Each envelope is dropped once librdkafka has its copy: freed
        // while the batch goes out rather than a thousand at the end.
        for (i, event) in events.into_iter().enumerate() {
            match crate::bounded(topic, limit, self.enqueue(&current, topic, &event)).await {
                Ok(future) => pending.push((event.id(), future)),
                Err(e) => {
                    stopped = Some((i, event.id(), e));
                    break;
                }
            }
        }
        // One topic name shared by the batch's receipts.
        let shared: Arc<str> = topic.into();
        // Acknowledgements come back about in order: awaiting them one by
        // one wakes this task about once per broker response, where a
        // join of a thousand futures would allocate, wake and re-order for
        // each of them.
        for (id, future) in pending {
            let ack = self.acknowledged(&shared, What::Event(id), future);
            acked(crate::bounded(topic, limit, ack).await);
        }
        stopped
    }

    /// `what` went wrong, and the client's last error if there was one
    /// (a timeout alone does not say that the credentials were refused).
    fn with_last_error(&self, what: &str) -> String {
        // An error older than the acknowledgement timeout (plus a margin
        // for the clock reads) did not make this publish time out.
        match self
            .errors
            .last(self.config.ack_timeout() + Duration::from_secs(5))
        {
            Some(last) => format!("{what}; the client's last error: {last}"),
            None => what.to_owned(),
        }
    }

    async fn acknowledged(
        &self,
        topic: &Arc<str>,
        what: What<'_>,
        (generation, future): (u64, DeliveryFuture),
    ) -> Result<Receipt> {
        match future.await {
            Ok(Ok(delivery)) => Ok(Receipt {
                topic: topic.clone(),
                partition: u32::try_from(delivery.partition).unwrap_or_default(),
                position: u64::try_from(delivery.offset).unwrap_or_default(),
                duplicate: false,
            }),
            Ok(Err((e, _))) => {
                self.recover(generation, &e);
                let retriable = retriable(&e);
                let why = "the broker did not acknowledge it";
                let why = match e.rdkafka_error_code() {
                    // Not listed by the broker for `UNKNOWN_TOPIC_WAIT_MS`.
                    _ if unknown_topic(&e) => return Err(missing_topic(topic)),
                    Some(RDKafkaErrorCode::MessageTimedOut) => {
                        if self.topic_missing(topic, true).await {
                            return Err(missing_topic(topic));
                        }
                        self.with_last_error(why)
                    }
                    _ => why.to_owned(),
                };
                Err(publish_error(topic, what, &why, retriable, Some(e)))
            }
            Err(_) => Err(publish_error(
                topic,
                what,
                "the producer shut down before the acknowledgement",
                true,
                None,
            )),
        }
    }
}

/// What a publish was about, for its error.
#[derive(Clone, Copy)]
enum What<'a> {
    Event(EventId),
    Record(&'a RawRecord),
}

impl What<'_> {
    fn id(self) -> String {
        match self {
            What::Event(id) => id.to_string(),
            What::Record(record) => record
                .header(wire::EVENT_ID)
                .map_or_else(|| "(record without an event id)".to_owned(), str::to_owned),
        }
    }
}

fn publish_error(
    topic: &str,
    sent: What<'_>,
    what: &str,
    retriable: bool,
    e: Option<KafkaError>,
) -> Error {
    let about_topic = e
        .as_ref()
        .and_then(KafkaError::rdkafka_error_code)
        .is_some_and(|code| {
            is_unknown_topic(code)
                || matches!(
                    code,
                    RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed
                )
        });
    if about_topic {
        // The topic is missing or not ours to write: no event's fault, so
        // the error names none (the outbox relay then backs off instead of
        // parking rows).
        return Error::Topic {
            topic: topic.to_owned(),
            reason: match &e {
                Some(e) => format!("{what}: {e}"),
                None => what.to_owned(),
            },
            retriable,
            source: e.map(|e| Box::new(e) as keel_core::BoxError),
        };
    }
    Error::Publish {
        topic: topic.to_owned(),
        event_id: sent.id(),
        reason: match &e {
            Some(e) => format!("{what}: {e}"),
            None => what.to_owned(),
        },
        retriable,
        source: e.map(|e| Box::new(e) as keel_core::BoxError),
    }
}

/// Whether `metadata` lists `topic` with an unknown-topic error, or not
/// at all.
fn listed_as_missing(metadata: &rdkafka::metadata::Metadata, topic: &str) -> bool {
    metadata
        .topics()
        .iter()
        .filter(|t| super::admin::topic_name(t) == Some(topic))
        .all(|t| t.error().is_some_and(|e| is_unknown_topic(e.into())))
}

/// A publish to a topic the broker does not have: no event's fault, and
/// not retriable, as librdkafka's own unknown-topic error (which it gives
/// after `topic.metadata.propagation.max.ms`) is classed.
fn missing_topic(topic: &str) -> Error {
    Error::Topic {
        topic: topic.to_owned(),
        reason: format!(
            "the broker has no such topic: create it with `keel topics create {topic}` \
             (or KafkaAdmin::ensure_topic)"
        ),
        retriable: false,
        source: None,
    }
}

/// Whether librdkafka failed an event for want of its topic.
fn unknown_topic(e: &KafkaError) -> bool {
    e.rdkafka_error_code().is_some_and(is_unknown_topic)
}

/// Whether `code` says the broker has no such topic.
fn is_unknown_topic(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition
    )
}

/// Whether librdkafka's error may go away by trying again.
fn retriable(e: &KafkaError) -> bool {
    !matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, topic: &str, event: Envelope) -> Result<Receipt> {
        let span = tracing::debug_span!("publish", event_id = %event.id(), event_type = event.event_type(), topic);
        async {
            let future = self.enqueue(&self.producer(), topic, &event).await?;
            let receipt = self
                .acknowledged(&topic.into(), What::Event(event.id()), future)
                .await?;
            tracing::Span::current().record("partition", receipt.partition);
            Ok(receipt)
        }
        .instrument(span)
        .await
    }

    async fn publish_batch(&self, topic: &str, events: Vec<Envelope>) -> Result<Vec<Receipt>> {
        let total = events.len();
        let mut receipts = Vec::with_capacity(total);
        // The first failure is the batch's; the rest are still awaited, so
        // none is left unobserved.
        let mut failed = None;
        let stopped = self
            .send_batch(topic, events, None, |acked| match acked {
                Ok(receipt) => receipts.push(receipt),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            })
            .await;
        if let Some((i, id, e)) = stopped {
            // What was already sent is on its way: say how much of the
            // batch the broker has, so a retry can skip it.
            let progress = format!(
                "event {} of {total} in the batch; {} before it were acknowledged, none after it was sent",
                i + 1,
                receipts.len(),
            );
            return Err(crate::batch_failure(e, topic, id, progress));
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(receipts),
        }
    }

    async fn publish_each(
        &self,
        topic: &str,
        events: Vec<Envelope>,
        within: Duration,
    ) -> Vec<Sent> {
        let total = events.len();
        // The first bounded publish to a topic asks, in the background,
        // whether the broker has it: a batch that times out for want of
        // the topic then says so, the first one included (the question is
        // not waited for on a timeout, to keep to the bound).
        if !self.asked_about(topic) {
            self.topic_missing(topic, false).await;
        }
        let mut outcomes = Vec::with_capacity(total);
        let stopped = self
            .send_batch(topic, events, Some(within), |acked| {
                outcomes.push(match acked {
                    Ok(receipt) => Sent::Stored(receipt),
                    Err(e) => Sent::Failed(e),
                })
            })
            .await;
        if let Some((_, _, e)) = stopped {
            outcomes.push(Sent::Failed(e));
        }
        outcomes.resize_with(total, || Sent::NotSent);
        let timed_out = |o: &Sent| matches!(o, Sent::Failed(Error::Timeout { .. }));
        if outcomes.iter().any(|o| matches!(o, Sent::Stored(_))) {
            // The topic is there: timeouts stay timeouts.
            self.stored_in(topic);
        } else if outcomes.iter().any(timed_out) && self.topic_missing(topic, false).await {
            for outcome in outcomes.iter_mut().filter(|o| timed_out(o)) {
                *outcome = Sent::Failed(missing_topic(topic));
            }
        }
        outcomes
    }

    async fn publish_record(&self, topic: &str, record: RawRecord) -> Result<Receipt> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_ref()),
            });
        }
        // A record from NATS carries its key in a header: it becomes the
        // Kafka key, so the record lands where Keel's producers put its key.
        let key = record.partition_key();
        let mut outgoing = FutureRecord::to(topic)
            .payload(record.payload.as_ref())
            .headers(headers);
        if let Some(key) = &key {
            outgoing = outgoing.key(key.as_ref());
        } else {
            outgoing = outgoing.partition(0);
        }
        let sent = self
            .send(&self.producer(), topic, What::Record(&record), outgoing)
            .await?;
        self.acknowledged(&topic.into(), What::Record(&record), sent)
            .await
    }
}
