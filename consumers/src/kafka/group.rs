//! `KafkaGroupConsumer`: one member of a Kafka consumer group per
//! subscription.
//!
//! Delivery guarantee: at-least-once. An offset is committed only once every
//! record below it was acked (or dead-lettered by the caller). Nothing is
//! dispatched a partition window or more past the last commit sent, and a
//! commit goes out early once half the window is used, so a crash
//! re-delivers at most the window per partition (two windows if the crash
//! also lost the commit in flight).
//!
//! A dedicated thread owns the librdkafka consumer: it polls records into
//! the engine, commits positions periodically, and runs the rebalance
//! callbacks. While a partition holds a full window of unacked records the
//! thread stops reading that partition's own fetch queue (each owned
//! partition is split into one) until acks make room, while the member's
//! other partitions keep flowing. On revocation it stops dispatching the
//! revoked partitions, waits (up to the drain timeout) for the deliveries
//! their handlers are running to settle, commits their final positions and
//! only then gives them up — so nothing is committed for a partition this
//! member no longer owns. Events of different keys settle out of order, so
//! a partition often has events settled above the lowest one still open,
//! where its commit stops: the revocation first runs the events below the
//! highest settled one (other keys' queued deliveries, a key's next events
//! as its earlier ones settle, a key's delayed retry — once — when it is
//! due within half the drain timeout), so the commit hands on no event this
//! member handled. Deliveries of a revoked partition above that line that no
//! handler began (`Delivery::begin`; queued behind busy handlers) are given
//! back at once, uncommitted, and never run here; so are all of them when
//! the drain timeout passes first. A graceful leave through `serve()` or a
//! router does the same before it commits. An assignment
//! *lost* (session or poll interval expired: the partitions are already
//! someone else's) is given up at once, with no wait and no commit. On
//! assignment it fixes each
//! partition's start position (committed offset, else earliest or the
//! current end for `Latest`) before listing it as owned.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use keel_core::delivery::{Deliveries, Membership};
use keel_core::transport::{StartFrom, Subscriber, Subscription};
use keel_core::{Error, Result};
use keel_producers::kafka::KafkaClientConfig;
use keel_producers::kafka::admin::correct_time_offsets;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::engine::{Engine, Fetched, Limits};

/// Consumer settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConsumerConfig {
    /// Connection settings.
    pub client: KafkaClientConfig,
    /// Most offsets a partition may run ahead of its last commit; bounds
    /// re-delivery after a crash and memory per partition (a commit goes out
    /// early once half of it is used). Default 1000.
    pub partition_window: u32,
    /// How often acked positions are committed, in ms. Default 1000.
    pub commit_interval_ms: u64,
    /// How long a revocation or a graceful leave waits, in ms, for the
    /// deliveries its handlers are running, and for the events below the
    /// partition's highest settled or running one (see the module docs,
    /// a retry due within half this time included), to settle before
    /// abandoning them uncommitted; deliveries above that
    /// line still queued for a handler are given back at once. While a
    /// revocation waits, the member's other partitions are not fetched or
    /// committed. Default 10000.
    pub drain_timeout_ms: u64,
    /// Session timeout (`session.timeout.ms`). Default 45000 (Kafka's).
    pub session_timeout_ms: u64,
    /// Static membership (`group.instance.id`): a restarted member with the
    /// same id gets its partitions back without a rebalance.
    pub instance_id: Option<String>,
}

impl Default for KafkaConsumerConfig {
    fn default() -> Self {
        KafkaConsumerConfig {
            client: KafkaClientConfig::default(),
            partition_window: 1000,
            commit_interval_ms: 1000,
            drain_timeout_ms: 10_000,
            session_timeout_ms: 45_000,
            instance_id: None,
        }
    }
}

impl KafkaConsumerConfig {
    /// Refuses invalid settings, naming them.
    pub fn validate(&self) -> Result<()> {
        self.client.validate()?;
        if self.partition_window == 0 {
            return Err(Error::config(
                "kafka.partition_window",
                "must be at least 1",
            ));
        }
        if self.commit_interval_ms == 0 {
            return Err(Error::config(
                "kafka.commit_interval_ms",
                "must be at least 1",
            ));
        }
        // A dead member's partitions stand still this long at most, and the
        // member's timers stay far from overflowing.
        if self.drain_timeout_ms > MAX_DRAIN_TIMEOUT_MS {
            return Err(Error::config(
                "kafka.drain_timeout_ms",
                format!(
                    "{} is longer than an hour ({MAX_DRAIN_TIMEOUT_MS})",
                    self.drain_timeout_ms
                ),
            ));
        }
        for (key, value) in &self.client.librdkafka {
            let fixed = matches!(
                key.as_str(),
                "enable.auto.commit"
                    | "enable.auto.offset.store"
                    | "group.id"
                    | "partition.assignment.strategy"
            );
            if fixed {
                return Err(Error::config(
                    format!("kafka.librdkafka.{key}"),
                    format!(
                        "`{value}` is refused: Keel manages this setting to commit only handled events"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The longest `drain_timeout_ms`: an hour.
const MAX_DRAIN_TIMEOUT_MS: u64 = 3_600_000;

/// Joins Kafka consumer groups.
#[derive(Clone, Debug)]
pub struct KafkaGroupConsumer {
    config: KafkaConsumerConfig,
}

impl KafkaGroupConsumer {
    /// A subscriber with validated `config`.
    pub fn new(config: KafkaConsumerConfig) -> Result<Self> {
        config.validate()?;
        Ok(KafkaGroupConsumer { config })
    }
}

/// How long an idle member waits on its consumer queue per loop turn: also
/// the longest a record waits in its partition queue when nothing else is
/// happening.
const IDLE_POLL: Duration = Duration::from_millis(2);

/// How the poll thread should stop.
const RUNNING: u8 = 0;
const LEAVE_GRACEFULLY: u8 = 1;
const ABANDON: u8 = 2;

struct Control {
    stop: AtomicU8,
    /// The group took this member in (an assignment arrived, even an
    /// empty one).
    joined: AtomicBool,
}

struct KeelContext {
    engine: Arc<Engine>,
    control: Arc<Control>,
    start: StartFrom,
    topic: String,
    drain_timeout: Duration,
    assignment: watch::Sender<Vec<u32>>,
    /// librdkafka's last error-level log line: the detail (e.g. "SASL
    /// authentication error: …") that its error events leave out.
    last_failure: Mutex<Option<String>>,
    /// The client's settings, to check a time start's offsets with.
    time_reader: rdkafka::ClientConfig,
    /// The consumer this is the context of, set once it exists: splitting
    /// a partition's queue off takes the consumer's `Arc`.
    consumer: std::sync::OnceLock<std::sync::Weak<BaseConsumer<KeelContext>>>,
}

impl ClientContext for KeelContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}");
                *self.last_failure() = Some(message.to_owned());
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
            L::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }
}

impl KeelContext {
    fn last_failure(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.last_failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Each partition's start: the committed offset, else earliest or the
    /// current end (`Latest`).
    fn positioned(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> (TopicPartitionList, Vec<(i32, Option<i64>)>) {
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(committed) => committed,
            Err(e) => {
                // Not knowing the commit is not "nothing committed": let
                // librdkafka resume from the stored offset itself.
                tracing::warn!(error = %e, topic = %self.topic, "cannot read committed offsets; resuming from the group's stored positions");
                let mut out = TopicPartitionList::new();
                let mut starts = Vec::new();
                for e in tpl.elements() {
                    let _ = out.add_partition_offset(e.topic(), e.partition(), Offset::Stored);
                    starts.push((e.partition(), None));
                }
                return (out, starts);
            }
        };
        // For a time start: each partition's first offset at or after it,
        // for the partitions the group has not committed on.
        let by_time = match self.start {
            StartFrom::Timestamp(at) => {
                let mut query = TopicPartitionList::new();
                let uncommitted = committed.elements().into_iter().filter(|e| {
                    e.error().is_ok() && !matches!(e.offset(), Offset::Offset(o) if o >= 0)
                });
                for e in uncommitted {
                    let _ = query.add_partition_offset(
                        e.topic(),
                        e.partition(),
                        Offset::Offset(at.timestamp_millis()),
                    );
                }
                if query.count() == 0 {
                    return self.place(consumer, &committed, None);
                }
                consumer
                    .offsets_for_times(query, Duration::from_secs(10))
                    .map_err(|e| tracing::warn!(error = %e, topic = %self.topic, "cannot look up offsets for the start time; starting from the earliest"))
                    .ok()
                    .map(|found| self.corrected(consumer, &found, at.timestamp_millis()))
            }
            _ => None,
        };
        self.place(consumer, &committed, by_time.as_deref())
    }

    /// Each partition's start: its committed offset, else where the
    /// subscription starts (`by_time`: the offsets for a time start).
    fn place(
        &self,
        consumer: &BaseConsumer<Self>,
        committed: &TopicPartitionList,
        by_time: Option<&[(i32, Offset)]>,
    ) -> (TopicPartitionList, Vec<(i32, Option<i64>)>) {
        let mut out = TopicPartitionList::new();
        let mut starts = Vec::new();
        for e in committed.elements() {
            let p = e.partition();
            let (offset, start) = match e.offset() {
                _ if e.error().is_err() => (Offset::Stored, None),
                Offset::Offset(o) if o >= 0 => (Offset::Offset(o), Some(o)),
                _ => match self.start {
                    StartFrom::Latest => {
                        match consumer.fetch_watermarks(e.topic(), p, Duration::from_secs(10)) {
                            Ok((_, high)) => (Offset::Offset(high), Some(high)),
                            Err(_) => (Offset::End, None),
                        }
                    }
                    StartFrom::Timestamp(_) => {
                        match by_time
                            .and_then(|t| t.iter().find(|(q, _)| *q == p))
                            .map(|&(_, found)| found)
                        {
                            Some(Offset::Offset(o)) if o >= 0 => (Offset::Offset(o), Some(o)),
                            // No event at or after the time: the end.
                            Some(Offset::End) | Some(Offset::Offset(_)) => (Offset::End, None),
                            _ => (Offset::Beginning, None),
                        }
                    }
                    _ => (Offset::Beginning, None),
                },
            };
            let _ = out.add_partition_offset(e.topic(), p, offset);
            starts.push((p, start));
        }
        (out, starts)
    }

    /// Each partition's offsets-for-times answer, checked against the
    /// record it names (see [`correct_time_offsets`]).
    fn corrected(
        &self,
        consumer: &BaseConsumer<Self>,
        found: &TopicPartitionList,
        at_ms: i64,
    ) -> Vec<(i32, Offset)> {
        let mut answers = Vec::new();
        let mut others = Vec::new();
        for e in found.elements() {
            match e.offset() {
                Offset::Offset(o) if o >= 0 => {
                    match consumer.fetch_watermarks(
                        e.topic(),
                        e.partition(),
                        Duration::from_secs(10),
                    ) {
                        Ok((low, high)) => answers.push((e.partition(), o, low, high)),
                        Err(_) => others.push((e.partition(), e.offset())),
                    }
                }
                offset => others.push((e.partition(), offset)),
            }
        }
        if let Err(e) = correct_time_offsets(&self.time_reader, &self.topic, at_ms, &mut answers) {
            tracing::warn!(error = %e, topic = %self.topic, "cannot check the broker's offsets for the start time; taking them as they are");
        }
        answers
            .into_iter()
            .map(|(p, o, _, _)| (p, Offset::Offset(o)))
            .chain(others)
            .collect()
    }

    fn commit(&self, consumer: &BaseConsumer<Self>, positions: &[(i32, i64)], mode: CommitMode) {
        if positions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, pos) in positions {
            let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*pos));
        }
        tracing::debug!(topic = %self.topic, ?positions, ?mode, "commit");
        if let Err(e) = consumer.commit(&tpl, mode) {
            tracing::warn!(error = %e, topic = %self.topic, "commit failed; will retry with the next one");
            for (p, pos) in positions {
                self.engine.commit_failed(*p, *pos);
            }
        }
    }

    fn publish_assignment(&self) {
        let owned = self.engine.assignment();
        self.assignment.send_if_modified(|current| {
            let changed = *current != owned;
            *current = owned;
            changed
        });
    }

    /// Splits the queues of partitions about to be assigned off the
    /// consumer's own queue, before fetching starts: librdkafka forwards a
    /// partition's fetch queue to the consumer's at fetch start only when
    /// the application has not set its forwarding (`RD_KAFKA_Q_F_FWD_APP`,
    /// `rd_kafka_toppar_op_fetch_start`), and keeps that setting after the
    /// handle is dropped, so every record of the partition is fetched into
    /// its own queue (the poll loop takes a handle to it once the partition
    /// is owned). Split only after the assignment, a partition's first
    /// records would reach the consumer's own queue, and a later record
    /// taken from the partition's queue could overtake an earlier one of
    /// its key still waiting there.
    fn split_before_fetching(&self, partitions: &TopicPartitionList) {
        let Some(consumer) = self.consumer.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        for element in partitions.elements() {
            drop(consumer.split_partition_queue(element.topic(), element.partition()));
        }
    }
}

impl ConsumerContext for KeelContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.control.joined.store(true, Ordering::Release);
                // Whatever failed before is not what a later refusal is about.
                *self.last_failure() = None;
                let (positioned, starts) = self.positioned(consumer, tpl);
                self.split_before_fetching(&positioned);
                let assigned = if cooperative {
                    consumer.incremental_assign(&positioned)
                } else {
                    consumer.assign(&positioned)
                };
                if let Err(e) = assigned {
                    tracing::error!(error = %e, topic = %self.topic, "cannot take the assigned partitions");
                    return;
                }
                self.engine.assign(&starts);
                tracing::info!(topic = %self.topic, starts = ?starts, "partitions assigned");
                self.publish_assignment();
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                // Leaving: a graceful leave already waited for its
                // deliveries (see `poll_loop`), an abandoning one does not.
                let leaving = self.control.stop.load(Ordering::Acquire) != RUNNING;
                // Lost (the member's session or poll interval expired): the
                // group has already given the partitions to others, so
                // waiting for their deliveries only holds the new owners'
                // work back, and a commit now could overwrite theirs.
                let lost = consumer.assignment_lost();
                // A graceful revocation first runs the events below each
                // partition's highest settled one, so the commit hands on
                // none this member handled.
                self.engine
                    .start_revoking(&revoked, (!leaving && !lost).then_some(self.drain_timeout));
                if lost {
                    tracing::warn!(topic = %self.topic, ?revoked, "assignment lost (this member's session or max.poll.interval.ms expired): nothing is committed for these partitions; their unsettled events go to their new owners");
                } else if !leaving && !self.engine.wait_drained(&revoked, self.drain_timeout) {
                    tracing::warn!(topic = %self.topic, ?revoked, "revoked partitions did not drain in time; their unsettled events will be re-delivered");
                }
                let positions = self.engine.remove(&revoked);
                if !lost {
                    tracing::info!(topic = %self.topic, ?revoked, ?positions, "revocation commits");
                    self.commit(consumer, &positions, CommitMode::Sync);
                }
                let released = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = released {
                    tracing::warn!(error = %e, "cannot release revoked partitions");
                }
                tracing::info!(topic = %self.topic, ?revoked, "partitions revoked");
                self.publish_assignment();
            }
            other => tracing::error!(topic = %self.topic, error = ?other, "rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        for e in offsets.elements() {
            let failed = result.clone().and(e.error()).err();
            if let (Some(error), Offset::Offset(position)) = (failed, e.offset()) {
                tracing::warn!(%error, topic = %self.topic, partition = e.partition(), position, "commit failed; the next commit carries the position again");
                self.engine.commit_failed(e.partition(), position);
            }
        }
    }
}

#[async_trait]
impl Subscriber for KafkaGroupConsumer {
    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries> {
        let Subscription {
            topic,
            group,
            start,
            max_in_flight,
        } = subscription;
        let (tx, rx) = mpsc::unbounded_channel();
        let (assignment_tx, assignment_rx) = watch::channel(Vec::new());
        let engine = Engine::new(
            topic.clone(),
            group.clone(),
            Limits {
                max_in_flight: max_in_flight.max(1),
                partition_window: i64::from(self.config.partition_window),
            },
            tx.clone(),
        );
        let control = Arc::new(Control {
            stop: AtomicU8::new(RUNNING),
            joined: AtomicBool::new(false),
        });
        let stopper = engine.clone();
        let context = KeelContext {
            engine: engine.clone(),
            control: control.clone(),
            start,
            topic: topic.clone(),
            drain_timeout: Duration::from_millis(self.config.drain_timeout_ms),
            assignment: assignment_tx,
            last_failure: Mutex::new(None),
            time_reader: self.config.client.client_config(),
            consumer: std::sync::OnceLock::new(),
        };
        let mut client = self.config.client.client_config();
        client
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set(
                "session.timeout.ms",
                self.config.session_timeout_ms.to_string(),
            )
            .set(
                "auto.offset.reset",
                match start {
                    StartFrom::Latest => "latest",
                    _ => "earliest",
                },
            );
        if let Some(id) = &self.config.instance_id {
            client.set("group.instance.id", id);
        }
        // Each owned partition is read from a queue of its own, and
        // librdkafka's prefetch limits then apply per partition: by default
        // 100,000 messages or 64 MiB each, buffered even while a stuck key
        // holds its partition's window full. Lower defaults bound a member's
        // memory by its partition count (the pass-through map still wins).
        for (key, value) in PREFETCH_PER_PARTITION {
            if client.get(key).is_none() {
                client.set(key, value);
            }
        }
        let subscribe_error = |reason: String, retriable: bool| Error::Subscribe {
            topic: topic.clone(),
            group: group.clone(),
            reason,
            retriable,
            source: None,
        };
        let consumer: Arc<BaseConsumer<KeelContext>> = client
            .create_with_context(context)
            .map(Arc::new)
            .map_err(|e| {
                subscribe_error(
                    format!("librdkafka refused the consumer configuration: {e}"),
                    false,
                )
            })?;
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        consumer
            .subscribe(&[&topic])
            .map_err(|e| subscribe_error(format!("cannot subscribe: {e}"), true))?;
        let (done_tx, done_rx) = oneshot::channel();
        let commit_interval = Duration::from_millis(self.config.commit_interval_ms);
        let drain_timeout = Duration::from_millis(self.config.drain_timeout_ms);
        let thread = {
            let (engine, control) = (engine.clone(), control.clone());
            let (topic, group) = (topic.clone(), group.clone());
            std::thread::Builder::new()
                .name(format!("keel-kafka-{group}"))
                .spawn(move || {
                    poll_loop(
                        &consumer,
                        &engine,
                        &control,
                        (&topic, &group),
                        commit_interval,
                        drain_timeout,
                        &tx,
                    );
                    drop(consumer); // leaves the group (runs the revocation)
                    let _ = done_tx.send(());
                })
                .map_err(|e| subscribe_error(format!("cannot start the poll thread: {e}"), true))?
        };
        tracing::info!(%topic, %group, "joined consumer group");
        Ok(Deliveries::new(
            UnboundedReceiverStream::new(rx),
            assignment_rx,
            Box::new(KafkaMembership {
                control,
                engine: stopper,
                drain_timeout,
                done: Some(done_rx),
                thread: Some(thread),
            }),
        ))
    }
}

/// Copies a fetched message out of librdkafka's buffer.
fn fetched(message: &BorrowedMessage<'_>) -> Fetched {
    let headers = message.headers().map(copy_headers).unwrap_or_default();
    Fetched {
        offset: message.offset(),
        position: u64::try_from(message.offset()).unwrap_or_default(),
        key: message.key().map(Bytes::copy_from_slice),
        headers,
        payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
    }
}

/// Copies a record's headers. rdkafka (0.39) reads each header name as a C
/// string and panics (`to_str().unwrap()`) on one that is not UTF-8 —
/// bytes any producer may write, which would take the poll thread, and one
/// member after another, down. Such a header is dropped with a warning (its
/// bytes cannot be reached without that panic); the record goes on as
/// usual, and is dead-lettered if it was a Keel header it needed.
fn copy_headers<H: Headers + ?Sized>(headers: &H) -> Vec<(String, Bytes)> {
    (0..headers.count())
        .filter_map(|idx| {
            let copy = std::panic::AssertUnwindSafe(|| {
                headers.try_get(idx).map(|h| {
                    (
                        h.key.to_owned(),
                        Bytes::copy_from_slice(h.value.unwrap_or_default()),
                    )
                })
            });
            std::panic::catch_unwind(copy).unwrap_or_else(|_| {
                tracing::warn!(
                    header = idx,
                    "a record header whose name is not UTF-8 was dropped"
                );
                None
            })
        })
        .collect()
}

/// librdkafka's prefetch limits per partition queue, unless the client's
/// pass-through map sets them: 10,000 messages (seconds of a busy
/// partition) or 8 MiB.
const PREFETCH_PER_PARTITION: [(&str, &str); 2] = [
    ("queued.min.messages", "10000"),
    ("queued.max.messages.kbytes", "8192"),
];

/// Most records taken from one partition queue per loop turn.
const PARTITION_BATCH: usize = 512;

fn poll_loop(
    consumer: &Arc<BaseConsumer<KeelContext>>,
    engine: &Arc<Engine>,
    control: &Control,
    (topic, group): (&str, &str),
    commit_interval: Duration,
    drain_timeout: Duration,
    tx: &mpsc::UnboundedSender<Result<keel_core::Delivery>>,
) {
    let context = consumer.context();
    let mut last_commit = Instant::now();
    let mut last_report = Instant::now();
    // Each owned partition is fetched into its own queue, read only while
    // the partition has room in its window: a stuck key holds back its own
    // partition, never the member's others. (Pausing the partition or
    // seeking back stalled fetching for good against tansu.)
    let mut queues: HashMap<i32, rdkafka::consumer::base_consumer::PartitionQueue<KeelContext>> =
        HashMap::new();
    while control.stop.load(Ordering::Acquire) == RUNNING {
        let owned = engine.assignment();
        queues.retain(|p, _| owned.contains(&(*p as u32)));
        for p in owned {
            let p = p as i32;
            if let std::collections::hash_map::Entry::Vacant(slot) = queues.entry(p)
                && let Some(queue) = consumer.split_partition_queue(topic, p)
            {
                slot.insert(queue);
            }
        }
        let mut took = 0;
        for (&p, queue) in &queues {
            // Only records ingest adds take room, so this bound holds for
            // the whole turn; acks meanwhile only make more.
            let room = engine.room(p).min(PARTITION_BATCH);
            let mut n = 0;
            while n < room {
                match queue.poll(Duration::ZERO) {
                    Some(Ok(message)) => {
                        let out = engine.ingest(p, fetched(&message));
                        engine.send(out);
                        n += 1;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, %topic, partition = p, "kafka fetch error");
                        break;
                    }
                    None => break,
                }
            }
            took += n;
        }
        // The consumer's own queue serves rebalances and errors (records
        // come there only if a partition's split at assignment failed).
        let wait = if took > 0 { Duration::ZERO } else { IDLE_POLL };
        match consumer.poll(wait) {
            Some(Ok(message)) => {
                let out = engine.ingest(message.partition(), fetched(&message));
                engine.send(out);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, %topic, "kafka consumer error");
                let code = e.rdkafka_error_code();
                // librdkafka retries refused credentials for ever; a member
                // the group never took in ends here, saying why, instead of
                // waiting silently (credentials refused before that are a
                // setting to fix). One that was in rides out a passing
                // refusal (credentials being rotated, a broker restarting).
                let joined = control.joined.load(Ordering::Acquire);
                let refused = !joined && code.is_some_and(is_refusal);
                if refused || code.is_some_and(is_fatal) {
                    let reason = if refused {
                        let detail = context
                            .last_failure()
                            .take()
                            .map(|d| format!(" ({d})"))
                            .unwrap_or_default();
                        format!(
                            "the brokers refused this member before it joined: {e}{detail}; {CHECK_SECURITY}"
                        )
                    } else {
                        e.to_string()
                    };
                    let _ = tx.send(Err(Error::Subscribe {
                        topic: topic.to_owned(),
                        group: group.to_owned(),
                        reason,
                        retriable: false,
                        source: None,
                    }));
                    break;
                }
            }
            None => {}
        }
        let out = engine.tick();
        engine.send(out);
        if last_report.elapsed() >= Duration::from_secs(5) {
            tracing::debug!(%topic, state = %engine.summary(), "engine");
            last_report = Instant::now();
        }
        // Periodically, and early when a partition has used half its
        // window past its last commit (dispatch stops at the whole window).
        let due = last_commit.elapsed() >= commit_interval
            || (last_commit.elapsed() >= EARLY_COMMIT_SPACING && engine.commit_due());
        if due {
            // The next turn's tick dispatches what the commit let through.
            context.commit(consumer, &engine.positions_to_commit(), CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    drop(queues);
    // Leaving: a graceful leave lets the deliveries begun finish first.
    if control.stop.load(Ordering::Acquire) == LEAVE_GRACEFULLY {
        let owned: Vec<i32> = engine.assignment().iter().map(|p| *p as i32).collect();
        // Nothing fills any more: the member's stream is gone (what the
        // leave's consumer loop could still run ran before, see
        // `Membership::start_leaving`).
        engine.start_revoking(&owned, None);
        engine.wait_drained(&owned, drain_timeout);
    }
    // The final positions, whether or not an earlier async commit of the
    // same value landed.
    context.commit(consumer, &engine.all_positions(), CommitMode::Sync);
}

/// Least time between two commits sent early (a partition's window half
/// used past its last commit): bounds the commit rate under load.
const EARLY_COMMIT_SPACING: Duration = Duration::from_millis(10);

fn is_fatal(code: rdkafka::error::RDKafkaErrorCode) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(
        code,
        C::GroupAuthorizationFailed | C::TopicAuthorizationFailed | C::Fatal | C::InvalidGroupId
    )
}

/// What to check when the brokers refuse a member.
const CHECK_SECURITY: &str = "check the kafka security settings (sasl_mechanism, sasl_username, \
     sasl_password, tls, ca_location, certificate_location, key_location)";

/// The brokers refused the client itself: its credentials or its TLS
/// handshake.
fn is_refusal(code: rdkafka::error::RDKafkaErrorCode) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(
        code,
        C::Authentication | C::SaslAuthenticationFailed | C::SSL
    )
}

struct KafkaMembership {
    control: Arc<Control>,
    engine: Arc<Engine>,
    drain_timeout: Duration,
    done: Option<oneshot::Receiver<()>>,
    thread: Option<JoinHandle<()>>,
}

#[async_trait]
impl Membership for KafkaMembership {
    fn start_leaving(&self) -> bool {
        self.engine.start_leaving(self.drain_timeout);
        true
    }

    fn ready_to_leave(&self) -> bool {
        self.engine.filled()
    }

    fn stop_dispatching(&self) -> bool {
        self.engine.stop_dispatching();
        true
    }

    fn drain_timeout(&self) -> Option<Duration> {
        Some(self.drain_timeout)
    }

    async fn leave(mut self: Box<Self>) -> Result<()> {
        self.control.stop.store(LEAVE_GRACEFULLY, Ordering::Release);
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        Ok(())
    }
}

impl Drop for KafkaMembership {
    fn drop(&mut self) {
        // Not left gracefully: abandon outstanding work (it is re-delivered
        // to the next owner) and let the thread close the consumer.
        let _ = self.control.stop.compare_exchange(
            RUNNING,
            ABANDON,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, Headers};

    use super::{KafkaConsumerConfig, copy_headers};

    #[test]
    fn a_drain_timeout_past_an_hour_is_refused_by_name() {
        let config = |drain_timeout_ms| KafkaConsumerConfig {
            drain_timeout_ms,
            ..KafkaConsumerConfig::default()
        };
        assert!(config(3_600_000).validate().is_ok());
        let e = config(u64::MAX).validate().unwrap_err().to_string();
        assert!(e.contains("kafka.drain_timeout_ms"), "{e}");
    }

    /// Headers whose second name is not UTF-8, as rdkafka reads them: it
    /// panics on that index.
    struct OneBadName;

    impl Headers for OneBadName {
        fn count(&self) -> usize {
            3
        }

        fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
            match idx {
                0 => Some(Header {
                    key: "keel-event-id",
                    value: Some(b"id"),
                }),
                // What rdkafka's `CStr::to_str().unwrap()` does there.
                1 => panic!("called `Result::unwrap()` on an `Err` value: Utf8Error"),
                2 => Some(Header {
                    key: "tenant",
                    value: None,
                }),
                _ => None,
            }
        }
    }

    #[test]
    fn a_header_name_rdkafka_cannot_read_is_dropped_not_fatal() {
        let copied = copy_headers(&OneBadName);
        let names: Vec<&str> = copied.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["keel-event-id", "tenant"]);
        assert_eq!(copied[0].1.as_ref(), b"id");
        assert!(copied[1].1.is_empty());
    }
}
