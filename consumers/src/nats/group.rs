//! `JetStreamGroupConsumer`: Kafka-style consumer groups with per-key order
//! on NATS JetStream, coordinated through JetStream alone.
//!
//! Delivery guarantee: at-least-once. Each owned partition is read through
//! the group's durable pull consumer `<group>_p<partition>` with explicit
//! acks; a message is acked only after its handler succeeded, so the
//! consumer's ack floor is the group's committed position. A crash
//! re-delivers at most each partition's window (its `max_ack_pending`).
//!
//! Membership and ownership live in the KV bucket
//! [`KEEL_GROUPS`](keel_producers::nats::groups::BUCKET):
//! - every member re-puts its heartbeat key each `heartbeat`; a member
//!   unseen for `session_timeout` is dead;
//! - the live members, sorted, split the partitions round-robin;
//! - a partition is owned through its lease key, taken only by
//!   compare-and-set on the revision the taker last saw: from nobody, from
//!   a member that released it, or from a dead member after its lease went
//!   unrenewed for `session_timeout`;
//! - the owner renews every lease each heartbeat by compare-and-set; a
//!   renewal that finds another revision means the lease was taken and the
//!   partition is dropped at once, and a member that could not renew for
//!   60 % of `session_timeout` stops the partition itself — before anyone
//!   else may take it, so two live members never process a partition at
//!   once (the fault test checks this from handler timings);
//! - a member handing a partition over stops dispatching it, waits (up to
//!   `drain_timeout`) for the deliveries its handlers are running (those
//!   still queued for a handler are given back at once, never run), flushes
//!   their acks, waits (at most a heartbeat, in the release task) for the
//!   server's ack floor to take them, and only then releases the lease. If
//!   the floor took them, the lease names the events it settled past the
//!   oldest one still open (all of them, or it names none) and the
//!   consumer they lie on: the next owner, reading that consumer from its
//!   ack floor, settles those again as they come instead of handling them
//!   twice, which keeps each key's order.
//!
//! Taking a partition re-creates its durable consumer one past the old ack
//! floor, so the new owner reads every unhandled event in stream order
//! before any newer one: per-key order survives crashes. The floor is also
//! written into the lease, which survives a crash between deleting and
//! re-creating the consumer.
//!
//! Inside a member the shared engine dispatches one delivery per key at a
//! time and different keys in parallel, as on Kafka. A nack is retried by
//! the engine (later events of the key wait) and sent to the server as a
//! nak with the same delay, so the server counts the redelivery and
//! restarts its ack timer; the copy it re-sends is recognised and ignored.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::jetstream::{self, consumer, kv};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use keel_core::delivery::{Deliveries, Membership, Outcome};
use keel_core::transport::{StartFrom, Subscriber, Subscription};
use keel_core::{Error, Result, wire};
use keel_producers::nats::admin::{self, JetStreamAdmin, MAX_NATS_DURATION};
use keel_producers::nats::config::{NatsClientConfig, validate_name};
use keel_producers::nats::groups::{self, GroupKey, HandedOn, LeaseRecord, MemberRecord};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::engine::{Engine, Fetched, Limits};

/// Consumer settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JetStreamConsumerConfig {
    /// Connection.
    pub client: NatsClientConfig,
    /// Most unacked events per partition (the durable consumer's
    /// `max_ack_pending`); bounds re-delivery after a crash and memory.
    /// Default 1000.
    pub partition_window: u32,
    /// A member unseen this long is dead and its partitions are taken over.
    /// Default 10 s, at most 1 hour.
    pub session_timeout: Duration,
    /// How often a member heartbeats and renews its leases. Default 1 s.
    pub heartbeat: Duration,
    /// How long a hand-over or a graceful leave waits for the deliveries
    /// its handlers are running before abandoning them unacked (those
    /// still queued for a handler are given back at once). Default 10 s,
    /// at most 1 hour.
    pub drain_timeout: Duration,
    /// The server re-sends an unacked message after this long (Keel ignores
    /// such re-sends of a message it still holds). Default 5 min.
    pub ack_wait: Duration,
    /// A fixed member id (static membership): a restarted member with the
    /// same id takes its share of the partitions back without waiting for
    /// its old session to expire. Of two live processes under one id, the
    /// one that joined later keeps it and the earlier one's deliveries end
    /// with an error (as Kafka fences an older static member; an
    /// application that subscribes again on that error fences the other in
    /// turn). Processes of Keel versions before this fencing are not
    /// fenced, nor do they fence. Default: a fresh id per subscription.
    pub member_id: Option<String>,
}

impl Default for JetStreamConsumerConfig {
    fn default() -> Self {
        JetStreamConsumerConfig {
            client: NatsClientConfig::default(),
            partition_window: 1000,
            session_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            ack_wait: Duration::from_secs(300),
            member_id: None,
        }
    }
}

/// The longest `session_timeout` and `drain_timeout`: a dead member's
/// partitions stand still this long at most (Kafka's default ceiling for a
/// session, `group.max.session.timeout.ms`, is 30 minutes), and the
/// member's timers stay far from overflowing.
const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(3600);

impl JetStreamConsumerConfig {
    /// Refuses invalid settings, naming them.
    pub fn validate(&self) -> Result<()> {
        self.client.validate()?;
        if self.partition_window == 0 {
            return Err(Error::config("nats.partition_window", "must be at least 1"));
        }
        for (name, timeout) in [
            ("nats.session_timeout", self.session_timeout),
            ("nats.drain_timeout", self.drain_timeout),
        ] {
            if timeout > MAX_SESSION_TIMEOUT {
                return Err(Error::config(
                    name,
                    format!("{timeout:?} is longer than {MAX_SESSION_TIMEOUT:?}"),
                ));
            }
        }
        if self.heartbeat.is_zero()
            || self
                .heartbeat
                .checked_mul(4)
                .is_none_or(|h| h > self.session_timeout)
        {
            return Err(Error::config(
                "nats.heartbeat",
                format!(
                    "must be positive and at most a quarter of session_timeout ({:?})",
                    self.session_timeout
                ),
            ));
        }
        if self.ack_wait < Duration::from_secs(1) || self.ack_wait > MAX_NATS_DURATION {
            return Err(Error::config(
                "nats.ack_wait",
                format!("must be at least 1 s and at most {MAX_NATS_DURATION:?}"),
            ));
        }
        if let Some(id) = &self.member_id {
            validate_name("nats.member_id", id)?;
        }
        Ok(())
    }

    /// How long a member keeps processing a partition without a confirmed
    /// renewal: well inside the session timeout others wait for.
    fn lease_validity(&self) -> Duration {
        self.session_timeout.mul_f64(0.6)
    }
}

/// Joins JetStream consumer groups.
#[derive(Clone, Debug)]
pub struct JetStreamGroupConsumer {
    config: JetStreamConsumerConfig,
    admin: JetStreamAdmin,
}

impl JetStreamGroupConsumer {
    /// Connects with validated `config`.
    pub async fn connect(config: JetStreamConsumerConfig) -> Result<Self> {
        config.validate()?;
        let js = config.client.jetstream().await?;
        Ok(Self::with_context(js, config))
    }

    /// A consumer on an existing JetStream context.
    pub fn with_context(js: jetstream::Context, config: JetStreamConsumerConfig) -> Self {
        JetStreamGroupConsumer {
            config,
            admin: JetStreamAdmin::new(js),
        }
    }
}

/// Per owned partition: ordinal → message, so acks reach the server.
#[derive(Default)]
struct PartitionAcks {
    /// Ordinal of the next message (the engine's contiguous offsets).
    next: i64,
    /// Highest stream sequence received in this assignment.
    last_sequence: u64,
    /// Unacked messages by ordinal: stream sequence and acker.
    pending: BTreeMap<i64, (u64, Arc<jetstream::message::Acker>)>,
    /// The most recently acked stream sequences (at most `ACKED_MEMORY`)
    /// and how (`Ack` or `Term`): a re-send of one of them (its ack was
    /// lost) is acked — or terminated — again, not handled again.
    acked: BTreeMap<u64, AckKind>,
    /// The consumer sequence of the last delivery: every delivery,
    /// re-sends included, advances it by one, so a jump means one was lost.
    last_delivery: u64,
    /// Sequences the previous owner settled past its resume position
    /// ([`HandedOn`]): settled again on arrival, not handled.
    inherited: std::collections::BTreeSet<u64>,
    /// The highest sequence forgotten from `acked` (its memory is bounded).
    forgotten: u64,
}

impl PartitionAcks {
    /// Where the group resumes: the oldest unacked sequence, else one past
    /// the highest received.
    fn resume(&self) -> Option<u64> {
        self.pending
            .values()
            .next()
            .map(|(s, _)| *s)
            .or((self.last_sequence > 0).then_some(self.last_sequence.saturating_add(1)))
    }

    /// The highest sequence this member acked (or terminated) before
    /// `resume`, remembered or forgotten: the server's ack floor must reach
    /// it before the partition is handed over.
    fn acked_before(&self, resume: Option<u64>) -> u64 {
        let below = resume.unwrap_or(u64::MAX);
        let remembered = self.acked.range(..below).next_back().map(|(s, _)| *s);
        remembered
            .unwrap_or(0)
            .max(self.forgotten.min(below.saturating_sub(1)))
    }

    /// The sequences settled here at or past `resume`, for the next owner:
    /// the lowest [`MAX_HANDED_ON`] (whatever lies past them is handled
    /// again, in order); `None` when one of them may have been forgotten,
    /// as skipping a later event of a key while handling an earlier one
    /// again would run its key backwards.
    fn settled_from(&self, resume: u64) -> Option<Vec<u64>> {
        if self.forgotten >= resume {
            return None;
        }
        let mut settled: Vec<u64> = self.acked.range(resume..).map(|(s, _)| *s).collect();
        // Handed on to this member and not come yet.
        settled.extend(self.inherited.range(resume..));
        settled.sort_unstable();
        settled.truncate(MAX_HANDED_ON);
        Some(settled)
    }

    /// Remembers `sequence` as settled with `kind`, within the memory's
    /// bound.
    fn remember(&mut self, sequence: u64, kind: AckKind) {
        self.acked.insert(sequence, kind);
        if self.acked.len() > ACKED_MEMORY
            && let Some((oldest, _)) = self.acked.pop_first()
        {
            self.forgotten = self.forgotten.max(oldest);
        }
    }

    /// Takes the acker of `ordinal` out, remembering its sequence as acked
    /// with `kind`.
    fn take_for_ack(
        &mut self,
        ordinal: i64,
        kind: AckKind,
    ) -> Option<(u64, Arc<jetstream::message::Acker>)> {
        let (sequence, acker) = self.pending.remove(&ordinal)?;
        self.remember(sequence, kind);
        Some((sequence, acker))
    }

    /// Whether `sequence` is held unacked.
    fn holds(&self, sequence: u64) -> bool {
        self.pending.values().any(|(s, _)| *s == sequence)
    }

    /// Decides what becomes of the delivery numbered `delivery` (the
    /// consumer sequence) of stream sequence `sequence`.
    ///
    /// Every assignment reads a consumer created for it, whose deliveries
    /// are numbered from 1 and advance by one with every delivery,
    /// re-sends included: any other number means one never reached this
    /// reader (a reconnect, a lost pull batch), the first one included.
    fn admit(&mut self, sequence: u64, delivery: u64) -> Admit {
        let expected = self.last_delivery.saturating_add(1);
        if delivery != expected {
            return Admit::Lost { expected };
        }
        self.last_delivery = delivery;
        if sequence > self.last_sequence {
            self.last_sequence = sequence;
            if self.inherited.remove(&sequence) {
                // Handled by the previous owner: re-sends ack again too.
                self.remember(sequence, AckKind::Ack);
                return Admit::AckAgain(AckKind::Ack);
            }
            return Admit::New;
        }
        // A re-send: of a message still held (ignored), or of one settled
        // whose ack was lost (acked again). This assignment's consumer
        // started at the ack floor and saw every delivery in order (a gap
        // re-opens it), so a sequence at or below the last one that is not
        // held was settled here, even when its kind is no longer
        // remembered: left unacked, it would hold the floor and an
        // ack-pending slot for good.
        if self.holds(sequence) {
            Admit::Skip
        } else {
            Admit::AckAgain(self.acked.get(&sequence).copied().unwrap_or(AckKind::Ack))
        }
    }

    /// Holds a delivery [`PartitionAcks::admit`] found new; its ordinal.
    fn hold(&mut self, sequence: u64, acker: jetstream::message::Acker) -> i64 {
        let ordinal = self.next;
        self.next += 1;
        self.pending.insert(ordinal, (sequence, Arc::new(acker)));
        ordinal
    }
}

/// What the reader does with a delivery.
#[derive(Debug)]
enum Admit {
    /// The delivery numbered `expected` never arrived: handling what
    /// follows could overtake it within its key.
    Lost { expected: u64 },
    /// New: held and handed to the engine.
    New,
    /// A re-send of a message settled here whose ack (or term) was lost:
    /// settled again so.
    AckAgain(AckKind),
    /// A re-send of a message still held.
    Skip,
}

/// How many acked sequences a partition remembers for re-sends whose ack
/// was lost (a reconnect loses at most what was in flight).
const ACKED_MEMORY: usize = 4096;

/// A hand-over's ack floor, taken: the consumer (its creation time) and the
/// resume position it was checked for.
#[derive(Debug)]
struct Checked {
    consumer: String,
    resume: Option<u64>,
}

/// Most settled sequences a hand-over names in the lease (past them, the
/// next owner handles events again: at least once).
const MAX_HANDED_ON: usize = 1024;

type AckMap = Arc<Mutex<HashMap<u32, PartitionAcks>>>;

fn lock(acks: &AckMap) -> std::sync::MutexGuard<'_, HashMap<u32, PartitionAcks>> {
    acks.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the ack pump does.
enum Pump {
    /// Ack (`AckKind::Ack`) or terminate (`AckKind::Term`, after dead
    /// letters) `(partition, ordinal)` on the server.
    Ack(i32, i64, AckKind),
    /// Nak `(partition, ordinal)` with a redelivery delay: the server
    /// counts the retry and restarts its ack timer; Keel itself delivers
    /// the event again (the server's re-send is recognised and ignored).
    Nak(i32, i64, Duration),
    /// Answer once every earlier ack was sent.
    Barrier(oneshot::Sender<()>),
}

/// A lease as last seen in the bucket.
#[derive(Clone, Debug)]
struct LeaseView {
    record: Option<LeaseRecord>,
    revision: u64,
    seen: Instant,
}

/// A partition this member owns.
struct Owned {
    /// Processing stops here unless a renewal confirms the lease (the
    /// lease's revision is in `Member::leases`).
    valid_until: Instant,
    reader: JoinHandle<()>,
    releasing: bool,
    /// Re-open instead of handing over once drained (a delivery was lost).
    reopen: bool,
    /// Which assignment of this member it is (see `Member::assignments`).
    assignment: i64,
}

/// How the member should stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Running,
    Leave,
    Abandon,
}

struct Member {
    id: String,
    /// This subscription's [`MemberRecord::token`].
    token: String,
    /// The revision of this subscription's first heartbeat, once written.
    joined: u64,
    /// Set when a later process joined under this member id.
    fenced: Option<String>,
    topic: String,
    group: String,
    partitions: u32,
    start: StartFrom,
    config: JetStreamConsumerConfig,
    admin: JetStreamAdmin,
    store: kv::Store,
    engine: Arc<Engine>,
    acks: AckMap,
    pump: mpsc::UnboundedSender<Pump>,
    assignment: watch::Sender<Vec<u32>>,
    members: HashMap<String, (u64, Instant)>,
    leases: HashMap<u32, LeaseView>,
    owned: HashMap<u32, Owned>,
    /// Per-member counter that gives every assignment its own ordinal
    /// range, so a late ack of an earlier assignment never hits a new one.
    assignments: i64,
    released: mpsc::UnboundedSender<(u32, i64, Option<Checked>)>,
    /// Readers report a lost delivery here as `(partition, assignment)`.
    broken: mpsc::UnboundedSender<(u32, i64)>,
    /// When each partition was last dropped without draining: it is not
    /// taken again until `drain_timeout` has passed, so its abandoned
    /// handlers are not still running when its events come back.
    dropped: HashMap<u32, Instant>,
}

/// Ordinals of one assignment start at `assignment << 40`.
const ORDINAL_SHIFT: u32 = 40;

#[async_trait]
impl Subscriber for JetStreamGroupConsumer {
    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries> {
        let Subscription {
            topic,
            group,
            start,
            max_in_flight,
        } = subscription;
        validate_name("topic", &topic)?;
        validate_name("group", &group)?;
        let partitions = self.admin.partitions(&topic).await?;
        let store = self.admin.groups_bucket().await?;
        let id = self
            .config
            .member_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = Engine::new(
            topic.clone(),
            group.clone(),
            Limits {
                max_in_flight: max_in_flight.max(1),
                partition_window: i64::from(self.config.partition_window),
            },
            tx,
        );
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        engine.on_ack(ack_tx);
        tokio::spawn(release_due_retries(Arc::downgrade(&engine)));
        let (pump_tx, pump_rx) = mpsc::unbounded_channel();
        let acks: AckMap = Arc::default();
        let client = self.admin.context().client();
        tokio::spawn(pump_acks(ack_rx, pump_rx, acks.clone(), client));
        let watch_prefix = format!("{}.>", groups::group_prefix(&topic, &group));
        let updates =
            store
                .watch_with_history(&watch_prefix)
                .await
                .map_err(|e| Error::Subscribe {
                    topic: topic.clone(),
                    group: group.clone(),
                    reason: format!("cannot watch the group's keys in {}: {e}", groups::BUCKET),
                    retriable: true,
                    source: None,
                })?;
        let (assignment_tx, assignment_rx) = watch::channel(Vec::new());
        let (stop_tx, stop_rx) = watch::channel(Stop::Running);
        let (released_tx, released_rx) = mpsc::unbounded_channel();
        let (broken_tx, broken_rx) = mpsc::unbounded_channel();
        let stopper = engine.clone();
        let member = Member {
            id: id.clone(),
            token: format!("{:016x}", rand::random::<u64>()),
            joined: 0,
            fenced: None,
            topic: topic.clone(),
            group: group.clone(),
            partitions,
            start,
            config: self.config.clone(),
            admin: self.admin.clone(),
            store,
            engine,
            acks,
            pump: pump_tx,
            assignment: assignment_tx,
            members: HashMap::new(),
            leases: HashMap::new(),
            owned: HashMap::new(),
            assignments: 0,
            released: released_tx,
            broken: broken_tx,
            dropped: HashMap::new(),
        };
        let task = tokio::spawn(member.run(updates, stop_rx, released_rx, broken_rx));
        tracing::info!(%topic, %group, member = %id, "joined JetStream consumer group");
        Ok(Deliveries::new(
            UnboundedReceiverStream::new(rx),
            assignment_rx,
            Box::new(NatsMembership {
                stop: stop_tx,
                engine: stopper,
                drain_timeout: self.config.drain_timeout,
                task: Some(task),
            }),
        ))
    }
}

/// How often delayed re-deliveries are checked for being due.
const RETRY_TICK: Duration = Duration::from_millis(5);

/// Releases nacked deliveries whose delay has passed, until the engine is
/// gone.
async fn release_due_retries(engine: std::sync::Weak<Engine>) {
    let mut tick = tokio::time::interval(RETRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let out = engine.tick();
        engine.send(out);
    }
}

/// Sends acks to the server in the order the engine reported them.
async fn pump_acks(
    mut acked: mpsc::UnboundedReceiver<(i32, i64, Outcome)>,
    mut control: mpsc::UnboundedReceiver<Pump>,
    acks: AckMap,
    client: async_nats::Client,
) {
    loop {
        let job = tokio::select! {
            biased;
            a = acked.recv() => match a {
                Some((p, o, Outcome::Ack)) => Pump::Ack(p, o, AckKind::Ack),
                Some((p, o, Outcome::Term)) => Pump::Ack(p, o, AckKind::Term),
                Some((p, o, Outcome::Nack { delay } | Outcome::Backoff { delay })) => {
                    Pump::Nak(p, o, delay)
                }
                None => break,
            },
            c = control.recv() => match c {
                Some(c) => c,
                None => break,
            },
        };
        match job {
            Pump::Ack(p, ordinal, kind) => ack_on_server(&acks, p, ordinal, kind).await,
            Pump::Nak(p, ordinal, delay) => {
                // The entry stays in place while the nak is out: the
                // message is still held (a re-send of it is ignored, the
                // resume position stays at or before it); its ack comes
                // later, through this pump.
                let held = lock(&acks)
                    .get(&(p as u32))
                    .and_then(|pa| pa.pending.get(&ordinal).cloned());
                if let Some((sequence, acker)) = held
                    && let Err(e) = acker.ack_with(AckKind::Nak(Some(delay))).await
                {
                    tracing::debug!(error = %e, partition = p, sequence, "cannot send a nak");
                }
            }
            Pump::Barrier(done) => {
                // Acks reported before the barrier are queued ahead of it.
                while let Ok((p, ordinal, outcome)) = acked.try_recv() {
                    match outcome {
                        Outcome::Ack => ack_on_server(&acks, p, ordinal, AckKind::Ack).await,
                        Outcome::Term => ack_on_server(&acks, p, ordinal, AckKind::Term).await,
                        Outcome::Nack { .. } | Outcome::Backoff { .. } => {}
                    }
                }
                let _ = client.flush().await;
                let _ = done.send(());
            }
        }
    }
}

/// Acks (or terminates) `(partition, ordinal)` on the server, if still
/// held.
async fn ack_on_server(acks: &AckMap, p: i32, ordinal: i64, kind: AckKind) {
    let acker = lock(acks)
        .get_mut(&(p as u32))
        .and_then(|pa| pa.take_for_ack(ordinal, kind));
    if let Some((sequence, acker)) = acker
        && let Err(e) = acker.ack_with(kind).await
    {
        tracing::warn!(error = %e, partition = p, sequence, "cannot send an ack; the server will re-send the event and it is acked again then");
    }
}

impl Member {
    /// Where a group starting at the end begins: after the stream's last
    /// event.
    async fn stream_end(
        &self,
        stream: &jetstream::stream::Stream,
    ) -> Result<consumer::DeliverPolicy> {
        let last = stream
            .get_info()
            .await
            .map_err(|e| self.error(format!("cannot read the stream: {e}")))?
            .state
            .last_sequence;
        Ok(consumer::DeliverPolicy::ByStartSequence {
            start_sequence: last.saturating_add(1),
        })
    }

    fn error(&self, reason: String) -> Error {
        Error::Subscribe {
            topic: self.topic.clone(),
            group: self.group.clone(),
            reason,
            retriable: true,
            source: None,
        }
    }

    async fn run(
        mut self,
        mut updates: kv::Watch,
        mut stop: watch::Receiver<Stop>,
        mut released: mpsc::UnboundedReceiver<(u32, i64, Option<Checked>)>,
        mut broken: mpsc::UnboundedReceiver<(u32, i64)>,
    ) {
        let mut tick = tokio::time::interval(self.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first round waits one heartbeat so the current members and
        // leases are known before anything is taken.
        tick.tick().await;
        self.heartbeat().await;
        let how = loop {
            tokio::select! {
                entry = updates.next() => match entry {
                    Some(Ok(entry)) => {
                        self.observe(entry);
                        if self.fenced.is_some() {
                            break Stop::Abandon;
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, topic = %self.topic, group = %self.group, "group watch error"),
                    None => {
                        tracing::warn!(topic = %self.topic, group = %self.group, "group watch ended; re-watching");
                        let prefix = format!("{}.>", groups::group_prefix(&self.topic, &self.group));
                        match self.store.watch_with_history(&prefix).await {
                            Ok(w) => updates = w,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot re-watch the group");
                                tokio::time::sleep(self.config.heartbeat).await;
                            }
                        }
                    }
                },
                Some((p, a, floor)) = released.recv() => self.finish_release(p, a, floor).await,
                Some((p, a)) = broken.recv() => {
                    if self.owned.get(&p).is_some_and(|o| o.assignment == a && !o.releasing) {
                        if let Some(o) = self.owned.get_mut(&p) {
                            o.reopen = true;
                        }
                        self.start_release(p);
                    }
                }
                _ = tick.tick() => self.round().await,
                changed = stop.changed() => {
                    let how = if changed.is_err() { Stop::Abandon } else { *stop.borrow() };
                    if how != Stop::Running {
                        break how;
                    }
                }
            }
        };
        self.leave(how, &mut released).await;
    }

    fn observe(&mut self, entry: kv::Entry) {
        let Some(key) = groups::parse_key(&self.topic, &self.group, &entry.key) else {
            return;
        };
        let now = Instant::now();
        let removed = entry.operation != kv::Operation::Put;
        match key {
            GroupKey::Member(id) => {
                if id == self.id && !removed {
                    self.check_fenced(&entry);
                }
                if removed {
                    self.members.remove(&id);
                } else if self
                    .members
                    .get(&id)
                    .is_none_or(|(r, _)| entry.revision > *r)
                {
                    self.members.insert(id, (entry.revision, now));
                }
            }
            GroupKey::Lease(p) => {
                if self
                    .leases
                    .get(&p)
                    .is_some_and(|l| l.revision >= entry.revision)
                {
                    return; // our own write, already applied
                }
                let record = if removed {
                    None
                } else {
                    serde_json::from_slice::<LeaseRecord>(&entry.value).ok()
                };
                // Newer than anything we wrote: ours (a renewal that timed
                // out here but landed) is simply adopted below; anyone
                // else's means the partition was taken.
                let ours =
                    record.as_ref().and_then(|r| r.owner.as_deref()) == Some(self.id.as_str());
                if !ours && self.owned.contains_key(&p) {
                    tracing::warn!(topic = %self.topic, group = %self.group, partition = p, "lease taken by another member; dropping the partition");
                    self.drop_partition(p);
                }
                self.leases.insert(
                    p,
                    LeaseView {
                        record,
                        revision: entry.revision,
                        seen: now,
                    },
                );
            }
        }
    }

    /// Notices a later process that joined under this member id (a
    /// static id given to two processes, or a restart while the old one
    /// still runs): as Kafka fences an older static member, this one stops,
    /// and the later one keeps the id and its partitions.
    fn check_fenced(&mut self, entry: &kv::Entry) {
        let Ok(record) = serde_json::from_slice::<MemberRecord>(&entry.value) else {
            return;
        };
        if record.token == self.token || record.token.is_empty() || self.joined == 0 {
            // Ours; a Keel version without tokens (every heartbeat of it
            // would look like a new joiner); or seen before this one joined
            // (an earlier process's).
            return;
        }
        let joined = if record.joined == 0 {
            entry.revision
        } else {
            record.joined
        };
        if joined > self.joined && self.fenced.is_none() {
            self.fenced = Some(format!(
                "another process ({}) joined the group as member `{}` and took its \
                 partitions over; this one stopped (give each process its own member_id)",
                record.whereabouts(),
                self.id
            ));
        }
    }

    /// Remembers a lease record this member wrote.
    fn recorded(&mut self, p: u32, record: LeaseRecord, revision: u64) {
        self.leases.insert(
            p,
            LeaseView {
                record: Some(record),
                revision,
                seen: Instant::now(),
            },
        );
    }

    /// The resume position the lease of `p` last recorded.
    fn recorded_resume(&self, p: u32) -> Option<u64> {
        self.leases
            .get(&p)
            .and_then(|l| l.record.as_ref())
            .and_then(|r| r.resume)
    }

    /// What the lease of `p` last recorded as handed on.
    fn recorded_handed_on(&self, p: u32) -> Option<HandedOn> {
        self.leases
            .get(&p)
            .and_then(|l| l.record.as_ref())
            .and_then(|r| r.handed_on.clone())
    }

    async fn heartbeat(&mut self) {
        let record = MemberRecord {
            member: self.id.clone(),
            host: std::env::var("HOSTNAME").unwrap_or_default(),
            pid: std::process::id(),
            token: self.token.clone(),
            joined: self.joined,
        };
        let key = groups::member_key(&self.topic, &self.group, &self.id);
        let put = self
            .store
            .put(&key, serde_json::to_vec(&record).unwrap_or_default().into());
        match within(self.config.heartbeat, put).await {
            Ok(revision) => {
                if self.joined == 0 {
                    self.joined = revision;
                }
                self.members
                    .insert(self.id.clone(), (revision, Instant::now()));
            }
            Err(e) => tracing::warn!(error = %e, %key, "cannot heartbeat"),
        }
    }

    fn live_members(&self) -> Vec<String> {
        let mut live: Vec<String> = self
            .members
            .iter()
            .filter(|(id, (_, seen))| {
                **id == self.id || seen.elapsed() < self.config.session_timeout
            })
            .map(|(id, _)| id.clone())
            .collect();
        if !live.contains(&self.id) {
            live.push(self.id.clone());
        }
        live.sort();
        live
    }

    async fn round(&mut self) {
        self.heartbeat().await;
        self.renew().await;
        let live = self.live_members();
        let me = live.iter().position(|m| *m == self.id).unwrap_or(0);
        let mine = |p: u32| p as usize % live.len() == me;
        for p in 0..self.partitions {
            let owned = self.owned.get(&p).map(|o| o.releasing);
            match owned {
                Some(false) if !mine(p) => self.start_release(p),
                None if mine(p) => self.try_acquire(p, &live).await,
                None if self.holds_unowned(p) => {
                    // The lease names this member but nothing here reads
                    // the partition: an earlier process under this static
                    // id held it, or it was dropped when a renewal could
                    // not be confirmed. Its owner is live, so nobody else
                    // would ever take it: given back.
                    tracing::info!(topic = %self.topic, group = %self.group, partition = p, "giving back a lease held under this member's id");
                    self.give_back(p, self.recorded_resume(p)).await;
                }
                _ => {}
            }
        }
        // Forget members that are gone for good, so the bucket does not
        // grow with every crashed process.
        let dead: Vec<(String, u64)> = self
            .members
            .iter()
            .filter(|(id, (_, seen))| {
                **id != self.id && seen.elapsed() > self.config.session_timeout * 3
            })
            .map(|(id, (r, _))| (id.clone(), *r))
            .collect();
        for (id, revision) in dead {
            let key = groups::member_key(&self.topic, &self.group, &id);
            let _ = self
                .store
                .delete_expect_revision(&key, Some(revision))
                .await;
            self.members.remove(&id);
        }
    }

    /// Renews every owned lease (concurrently, each bounded by one
    /// heartbeat); drops partitions whose lease was taken or could not be
    /// renewed in time.
    async fn renew(&mut self) {
        let started = Instant::now();
        let mut writes = Vec::new();
        for &p in self.owned.keys() {
            let Some(revision) = self.leases.get(&p).map(|l| l.revision) else {
                continue;
            };
            let resume = lock(&self.acks)
                .get(&p)
                .and_then(PartitionAcks::resume)
                .or_else(|| self.recorded_resume(p));
            let record = LeaseRecord {
                owner: Some(self.id.clone()),
                resume,
                // Kept as it is: valid only on the consumer it names.
                handed_on: self.recorded_handed_on(p),
            };
            let key = groups::lease_key(&self.topic, &self.group, p);
            let value: Bytes = serde_json::to_vec(&record).unwrap_or_default().into();
            let (store, limit) = (self.store.clone(), self.config.heartbeat);
            writes.push(async move {
                let result = tokio::time::timeout(limit, store.update(&key, value, revision)).await;
                (p, record, result)
            });
        }
        for (p, record, result) in futures::future::join_all(writes).await {
            match result {
                Ok(Ok(new)) => {
                    if let Some(o) = self.owned.get_mut(&p) {
                        o.valid_until = started + self.config.lease_validity();
                    }
                    self.recorded(p, record, new);
                }
                Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(topic = %self.topic, group = %self.group, partition = p, "lease was taken over; dropping the partition");
                    self.drop_partition(p);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, partition = p, "cannot renew the lease"),
                Err(_) => tracing::warn!(partition = p, "lease renewal timed out"),
            }
        }
        self.stop_expired();
    }

    /// Stops a partition at once: in-flight deliveries are abandoned
    /// (their acks are ignored) and re-delivered to the next owner.
    fn drop_partition(&mut self, p: u32) {
        if let Some(owned) = self.owned.remove(&p) {
            self.dropped.insert(p, Instant::now());
            owned.reader.abort();
            // Removed at once (no revocation first: its acks and naks
            // would go to a consumer another member now reads).
            lock(&self.acks).remove(&p);
            self.engine.remove(&[p as i32]);
            self.publish_assignment();
        }
    }

    fn publish_assignment(&self) {
        let mut owned: Vec<u32> = self.owned.keys().copied().collect();
        owned.sort_unstable();
        self.assignment.send_if_modified(|current| {
            let changed = *current != owned;
            *current = owned;
            changed
        });
    }

    async fn try_acquire(&mut self, p: u32, live: &[String]) {
        if self
            .dropped
            .get(&p)
            .is_some_and(|at| at.elapsed() < self.config.drain_timeout)
        {
            return;
        }
        let key = groups::lease_key(&self.topic, &self.group, p);
        let view = self.leases.get(&p).cloned();
        let hint = self.recorded_resume(p);
        let record = LeaseRecord {
            owner: Some(self.id.clone()),
            resume: hint,
            handed_on: self.recorded_handed_on(p),
        };
        let value: Bytes = serde_json::to_vec(&record).unwrap_or_default().into();
        let started = Instant::now();
        // Each write bounded by a heartbeat, as renewals are: a slow server
        // must not keep this member from stopping the partitions whose
        // leases it can no longer renew. (A write that lands after its
        // timeout names this member in the lease; the next round takes it
        // or gives it back.)
        let limit = self.config.heartbeat;
        let taken = match &view {
            None => within(limit, self.store.create(&key, value)).await,
            Some(v) => {
                let owner = v.record.as_ref().and_then(|r| r.owner.clone());
                let free = match &owner {
                    None => true,
                    Some(o) if *o == self.id => true,
                    Some(o) => !live.contains(o) && v.seen.elapsed() > self.config.session_timeout,
                };
                if !free {
                    return;
                }
                if let Some(o) = owner.filter(|o| *o != self.id) {
                    tracing::info!(topic = %self.topic, group = %self.group, partition = p, dead = %o, "taking over the partition of a member that stopped heartbeating");
                }
                within(limit, self.store.update(&key, value, v.revision)).await
            }
        };
        let revision = match taken {
            Ok(revision) => revision,
            Err(e) => {
                tracing::debug!(error = %e, partition = p, "lease not taken (someone else was faster)");
                return;
            }
        };
        self.recorded(p, record, revision);
        match self.open_bounded(p, hint).await {
            Ok((reader, assignment)) => {
                self.owned.insert(
                    p,
                    Owned {
                        valid_until: started + self.config.lease_validity(),
                        reader,
                        releasing: false,
                        reopen: false,
                        assignment,
                    },
                );
                self.publish_assignment();
            }
            Err(e) => {
                tracing::warn!(error = %e, partition = p, "cannot start reading the partition; releasing it");
                // The newest resume position recorded, not the one found.
                let resume = self.recorded_resume(p).or(hint);
                self.give_back(p, resume).await;
            }
        }
        // Acquiring takes requests: re-check the leases held meanwhile.
        self.stop_expired();
    }

    /// Whether the lease of `p` names this member while the partition is
    /// not read here, and any deliveries it was dropped with had their
    /// time to end (as before taking it again).
    fn holds_unowned(&self, p: u32) -> bool {
        let named = self
            .leases
            .get(&p)
            .and_then(|l| l.record.as_ref())
            .and_then(|r| r.owner.as_deref())
            == Some(self.id.as_str());
        named
            && !self.owned.contains_key(&p)
            && self
                .dropped
                .get(&p)
                .is_none_or(|at| at.elapsed() >= self.config.drain_timeout)
    }

    /// Stops every partition whose lease validity has passed.
    fn stop_expired(&mut self) {
        let expired: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, o)| Instant::now() >= o.valid_until)
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            tracing::warn!(topic = %self.topic, group = %self.group, partition = p, "lease not renewed in time; stopping the partition before another member may take it");
            self.drop_partition(p);
        }
    }

    /// [`Member::open`], bounded so a slow server cannot keep this member
    /// from renewing the leases it already holds past their validity.
    async fn open_bounded(&mut self, p: u32, hint: Option<u64>) -> Result<(JoinHandle<()>, i64)> {
        let limit = self.config.lease_validity() / 2;
        match tokio::time::timeout(limit, self.open(p, hint)).await {
            Ok(opened) => opened,
            Err(_) => Err(self.error(format!("positioning partition {p} timed out"))),
        }
    }

    /// Positions the partition's durable consumer and starts reading it;
    /// returns the reader and the assignment number.
    async fn open(&mut self, p: u32, hint: Option<u64>) -> Result<(JoinHandle<()>, i64)> {
        let stream = self
            .admin
            .context()
            .get_stream(&self.topic)
            .await
            .map_err(|e| self.error(format!("cannot look up the stream: {e}")))?;
        let name = groups::consumer_name(&self.group, p);
        // The group's position: the durable consumer's (what it acked, else
        // where it was told to start), else what the lease recorded, else
        // where a new group starts.
        let existing = match stream.consumer_info(&name).await {
            Ok(info) => Some(info),
            Err(e) if admin::is_not_found(&e) => None,
            Err(e) => return Err(self.error(format!("cannot read consumer `{name}`: {e}"))),
        };
        // What the last owner handed on, if it was checked against this
        // very consumer (not one re-created since, by a reset or by hand).
        let inherited = match (&existing, self.recorded_handed_on(p)) {
            (Some(info), Some(h)) if h.consumer == consumer_created(info) => {
                h.settled.into_iter().collect()
            }
            _ => Default::default(),
        };
        let policy = match (existing, hint) {
            (Some(info), _) => admin::resume_policy(&info),
            (None, Some(s)) => {
                let state = &stream.cached_info().state;
                let start_sequence = if s > state.last_sequence.saturating_add(1) {
                    // Past the stream's end: the stream was re-created since
                    // (its sequence starts again at 1) and the recorded
                    // position belongs to the old one. Starting there would
                    // skip every event until the sequence caught up.
                    tracing::warn!(
                        topic = %self.topic,
                        group = %self.group,
                        partition = p,
                        recorded = s,
                        last = state.last_sequence,
                        "the group's recorded position lies past the stream's end (the stream was re-created); reading the partition from its first event"
                    );
                    state.first_sequence
                } else {
                    s
                };
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start_sequence.max(1),
                }
            }
            (None, None) => match self.start {
                // Resolved now, so a later owner resumes at the same place.
                // A time still to come has no event yet: the end, as for
                // Kafka (nats-server would also wrap a time past 2262 and
                // start at the beginning).
                StartFrom::Latest => self.stream_end(&stream).await?,
                StartFrom::Timestamp(at) if at > chrono::Utc::now() => {
                    self.stream_end(&stream).await?
                }
                // Before 1970 nothing was stored (and nats-server would
                // wrap a time before 1678 too): everything.
                StartFrom::Timestamp(at) if at.timestamp() < 0 => consumer::DeliverPolicy::All,
                StartFrom::Timestamp(at) => consumer::DeliverPolicy::ByStartTime { start_time: at },
                _ => consumer::DeliverPolicy::All,
            },
        };
        let resume = match policy {
            consumer::DeliverPolicy::ByStartSequence { start_sequence } => Some(start_sequence),
            _ => hint,
        };
        if resume != self.recorded_resume(p) {
            // Recorded before the consumer is replaced: a crash in between
            // leaves the next owner this position. So is a position the
            // caller knew from this member's own acks (a re-open): were the
            // new consumer deleted too before anything else was acked, the
            // next re-open would otherwise start from the lease's older one.
            self.write_lease(p, resume).await?;
        }
        let durable = self
            .admin
            .recreate_consumer(
                &self.group,
                &self.topic,
                p,
                policy,
                self.config.ack_wait,
                i64::from(self.config.partition_window),
            )
            .await?;
        // A list handed on is void on the new consumer: not written again.
        if let Some(record) = self.leases.get_mut(&p).and_then(|l| l.record.as_mut()) {
            record.handed_on = None;
        }
        self.assignments += 1;
        let base = self.assignments << ORDINAL_SHIFT;
        lock(&self.acks).insert(
            p,
            PartitionAcks {
                next: base,
                inherited,
                ..PartitionAcks::default()
            },
        );
        self.engine.assign(&[(p as i32, None)]);
        tracing::info!(topic = %self.topic, group = %self.group, partition = p, from = ?policy, "partition assigned");
        let reader = tokio::spawn(read_partition(
            durable,
            p,
            self.assignments,
            self.engine.clone(),
            self.acks.clone(),
            self.topic.clone(),
            self.broken.clone(),
        ));
        Ok((reader, self.assignments))
    }

    /// Records `resume` in the lease of `p`, which this member holds.
    async fn write_lease(&mut self, p: u32, resume: Option<u64>) -> Result<()> {
        let key = groups::lease_key(&self.topic, &self.group, p);
        let revision = self
            .leases
            .get(&p)
            .map(|l| l.revision)
            .ok_or_else(|| self.error(format!("lease `{key}` is not held")))?;
        let record = LeaseRecord {
            owner: Some(self.id.clone()),
            resume,
            handed_on: self.recorded_handed_on(p),
        };
        let new = self
            .store
            .update(
                &key,
                serde_json::to_vec(&record).unwrap_or_default().into(),
                revision,
            )
            .await
            .map_err(|e| self.error(format!("cannot record the lease `{key}`: {e}")))?;
        self.recorded(p, record, new);
        Ok(())
    }

    /// Begins handing `p` over: no new deliveries, those queued for a
    /// handler given back; a task waits for the running ones and reports
    /// back.
    fn start_release(&mut self, p: u32) {
        let Some(owned) = self.owned.get_mut(&p).filter(|o| !o.releasing) else {
            return; // not ours, or already draining
        };
        owned.releasing = true;
        owned.reader.abort();
        let assignment = owned.assignment;
        self.engine.start_revoking(&[p as i32], None);
        let engine = self.engine.clone();
        let pump = self.pump.clone();
        let released = self.released.clone();
        let timeout = self.config.drain_timeout;
        let (js, acks, heartbeat) = (
            self.admin.context().clone(),
            self.acks.clone(),
            self.config.heartbeat,
        );
        let (topic, consumer) = (self.topic.clone(), groups::consumer_name(&self.group, p));
        tracing::info!(topic = %self.topic, group = %self.group, partition = p, "handing the partition over");
        tokio::spawn(async move {
            let drained =
                tokio::task::spawn_blocking(move || engine.wait_drained(&[p as i32], timeout))
                    .await
                    .unwrap_or(false);
            if !drained {
                tracing::warn!(
                    partition = p,
                    "partition did not drain in time; its unsettled events will be re-delivered"
                );
            }
            let (done_tx, done_rx) = oneshot::channel();
            if pump.send(Pump::Barrier(done_tx)).is_ok() {
                let _ = done_rx.await;
            }
            // Checked against this resume position: a handler that outlived
            // the drain timeout and settles meanwhile moves it, and the
            // list is then not handed on.
            let checked = lock(&acks).get(&p).map(|a| {
                let resume = a.resume();
                (resume, a.acked_before(resume))
            });
            let floor = match checked {
                Some((resume, acked)) => ack_floor_taken(&js, &topic, &consumer, acked, heartbeat)
                    .await
                    .map(|consumer| Checked { consumer, resume }),
                None => None,
            };
            let _ = released.send((p, assignment, floor));
        });
    }

    /// Completes a hand-over once `p` drained and its acks were sent;
    /// `floor` names the consumer whose ack floor took them all.
    async fn finish_release(&mut self, p: u32, assignment: i64, floor: Option<Checked>) {
        let Some(owned) = self
            .owned
            .get(&p)
            .filter(|o| o.releasing && o.assignment == assignment)
        else {
            return; // dropped (or re-taken) meanwhile
        };
        let reopen = owned.reopen;
        self.engine.remove(&[p as i32]);
        if reopen {
            // The assignment reads the same, but every delivery of `p`
            // so far is stale: handlers still running one past the drain
            // timeout are stopped (the pump checks on any notification)
            // before the partition is read again.
            self.assignment.send_modify(|_| {});
        }
        let (resume, settled) = lock(&self.acks)
            .remove(&p)
            .map(|a| {
                let resume = a.resume();
                (resume, resume.and_then(|r| a.settled_from(r)))
            })
            .unwrap_or_default();
        let handed_on = match (floor, settled) {
            (Some(checked), Some(settled)) if checked.resume == resume && !settled.is_empty() => {
                Some(HandedOn {
                    consumer: checked.consumer,
                    settled,
                })
            }
            _ => None,
        };
        let hint = resume.or_else(|| self.recorded_resume(p));
        if reopen {
            // Still ours: read again from the ack floor.
            match self.open_bounded(p, hint).await {
                Ok((reader, assignment)) => {
                    if let Some(o) = self.owned.get_mut(&p) {
                        o.reader = reader;
                        o.releasing = false;
                        o.reopen = false;
                        o.assignment = assignment;
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, partition = p, "cannot re-open the partition; releasing it");
                }
            }
        }
        // No longer ours before the lease is free: handlers still running
        // past the drain timeout are stopped before another member can
        // take the partition (a release that fails is retried by `round`).
        self.owned.remove(&p);
        self.publish_assignment();
        self.release_lease(p, hint, handed_on).await;
        tracing::info!(topic = %self.topic, group = %self.group, partition = p, "partition handed over");
    }

    /// Frees the lease of `p` without handing anything on: what it
    /// recorded as handed on (if this member never read the partition)
    /// stays.
    async fn give_back(&mut self, p: u32, resume: Option<u64>) {
        self.release_lease(p, resume, self.recorded_handed_on(p))
            .await;
    }

    /// Marks the lease of `p` free (owner none), if this member still
    /// holds it.
    async fn release_lease(&mut self, p: u32, resume: Option<u64>, handed_on: Option<HandedOn>) {
        let Some(revision) = self.leases.get(&p).map(|l| l.revision) else {
            return;
        };
        let key = groups::lease_key(&self.topic, &self.group, p);
        let record = LeaseRecord {
            owner: None,
            resume,
            handed_on,
        };
        // Bounded like every other lease write (a release that lands after
        // its timeout is seen through the watch).
        let update = self.store.update(
            &key,
            serde_json::to_vec(&record).unwrap_or_default().into(),
            revision,
        );
        match within(self.config.heartbeat, update).await {
            Ok(new) => self.recorded(p, record, new),
            Err(e) => {
                tracing::debug!(error = %e, %key, "lease not released (no longer ours, or no answer)")
            }
        }
    }

    async fn leave(
        mut self,
        how: Stop,
        released: &mut mpsc::UnboundedReceiver<(u32, i64, Option<Checked>)>,
    ) {
        if let Some(reason) = self.fenced.take() {
            // The id, its record and its leases are the later process's
            // now: nothing is released or deleted, only stopped here.
            tracing::error!(topic = %self.topic, group = %self.group, member = %self.id, "{reason}");
            let owned: Vec<u32> = self.owned.keys().copied().collect();
            for p in owned {
                self.drop_partition(p);
            }
            let error = Error::Subscribe {
                topic: self.topic.clone(),
                group: self.group.clone(),
                reason,
                retriable: false,
                source: None,
            };
            self.engine.send(vec![Err(error)]);
            return;
        }
        let owned: Vec<u32> = self.owned.keys().copied().collect();
        // Leaving: nothing is re-opened any more, only handed over.
        for o in self.owned.values_mut() {
            o.reopen = false;
        }
        if how == Stop::Leave {
            for &p in &owned {
                self.start_release(p);
            }
            // Keep heartbeating and renewing while draining, so nobody
            // takes a partition that still has deliveries out.
            let deadline = Instant::now() + self.config.drain_timeout + Duration::from_secs(5);
            let mut tick = tokio::time::interval(self.config.heartbeat);
            while self.owned.values().any(|o| o.releasing) && Instant::now() < deadline {
                tokio::select! {
                    Some((p, a, floor)) = released.recv() => self.finish_release(p, a, floor).await,
                    _ = tick.tick() => {
                        self.heartbeat().await;
                        self.renew().await;
                    }
                }
            }
        }
        // Abandoning (or what did not finish): free the leases at once so
        // others need not wait out the session; unacked events go to the
        // next owner.
        let rest: Vec<u32> = self.owned.keys().copied().collect();
        for p in rest {
            self.drop_partition(p);
            self.give_back(p, self.recorded_resume(p)).await;
        }
        let key = groups::member_key(&self.topic, &self.group, &self.id);
        let _ = self.store.delete(&key).await;
        self.publish_assignment();
        tracing::info!(topic = %self.topic, group = %self.group, member = %self.id, ?how, "left JetStream consumer group");
    }
}

/// Waits (at most `limit`) until the server's ack floor of `consumer`
/// reaches `acked`; the consumer's creation time (RFC 3339) once it has.
/// Acks are sent without waiting for a reply, and the server applies them
/// on the consumer's own queue, after a lease release
/// sent later may already be seen: the next owner, which starts one past
/// the ack floor it reads, would handle the last acked events again. (A
/// floor held below by a lost delivery or a lost ack never gets there; the
/// next owner then re-reads from it, as it must, and is handed nothing.)
async fn ack_floor_taken(
    js: &jetstream::Context,
    topic: &str,
    consumer: &str,
    acked: u64,
    limit: Duration,
) -> Option<String> {
    let taken = async {
        let stream = js.get_stream(topic).await.map_err(|e| e.to_string())?;
        loop {
            let info = stream
                .consumer_info(consumer)
                .await
                .map_err(|e| e.to_string())?;
            if info.ack_floor.stream_sequence >= acked {
                return Ok::<_, String>(consumer_created(&info));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    match within(limit, taken).await {
        Ok(created) => Some(created),
        Err(e) => {
            tracing::debug!(%topic, %consumer, acked, error = %e, "the ack floor did not take the last acks before the hand-over; the next owner may handle a few events again");
            None
        }
    }
}

/// A durable consumer's creation time, as a [`HandedOn`] names it.
fn consumer_created(info: &consumer::Info) -> String {
    info.created.to_rfc3339()
}

/// A write to the group's bucket, given up after `limit`: its error, or
/// that no answer came.
async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    write: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> std::result::Result<T, String> {
    match tokio::time::timeout(limit, write).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// Consecutive pull failures after which a partition is re-opened.
const PULL_FAILURES: u32 = 20;

/// How often the server signals a waiting pull request is alive. A pull
/// request that never reaches the consumer (seen on nats-server 2.9 for the
/// first pull right after the consumer is created: the partition then sat
/// idle until async-nats' default 2 × 15 s heartbeat check, throughput of a
/// whole group run dropping to ~3k events/s) is noticed after two missed
/// heartbeats and pulled again.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

/// How long one pull request waits on the server (longer than two
/// heartbeats, as the server requires).
const PULL_EXPIRES: Duration = Duration::from_secs(10);

/// Reads one partition's durable consumer into the engine until aborted.
async fn read_partition(
    durable: consumer::Consumer<consumer::pull::Config>,
    p: u32,
    assignment: i64,
    engine: Arc<Engine>,
    acks: AckMap,
    topic: String,
    broken: mpsc::UnboundedSender<(u32, i64)>,
) {
    // Consecutive failures to pull: past `PULL_FAILURES` the consumer is
    // taken to be gone (e.g. deleted from outside) and the partition is
    // re-opened from its recorded position.
    let mut failures = 0;
    loop {
        let pull = durable
            .stream()
            .heartbeat(PULL_HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages();
        let mut messages = match pull.await {
            Ok(m) => m,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, %topic, partition = p, failures, "cannot pull");
                if failures >= PULL_FAILURES {
                    let _ = broken.send((p, assignment));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, %topic, partition = p, failures, "pull error");
                    use consumer::pull::MessagesErrorKind as Kind;
                    // A pull that meets no consumer (deleted while no pull
                    // request was waiting on it, so no "Consumer Deleted"
                    // came) answers "no responders" or falls silent: asked
                    // whether it is gone, the server tells at once.
                    let deleted = match e.kind() {
                        Kind::ConsumerDeleted => true,
                        // `Pull`: after a reconnect async-nats asks for
                        // the consumer itself and reports its absence so.
                        Kind::NoResponders | Kind::MissingHeartbeat | Kind::Pull => {
                            consumer_gone(&durable).await
                        }
                        _ => false,
                    };
                    if deleted || failures >= PULL_FAILURES {
                        let _ = broken.send((p, assignment));
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat {
                        // The pull request is lost: a new stream pulls anew.
                        break;
                    }
                    continue;
                }
            };
            failures = 0;
            let (sequence, delivery) = match message.info() {
                Ok(info) => (info.stream_sequence, info.consumer_sequence),
                Err(e) => {
                    tracing::warn!(error = %e, %topic, partition = p, "message without JetStream metadata");
                    continue;
                }
            };
            let (message, acker) = message.split();
            let admitted = {
                let mut map = lock(&acks);
                let Some(pa) = map.get_mut(&p) else {
                    return; // no longer ours
                };
                match pa.admit(sequence, delivery) {
                    Admit::New => Ok(pa.hold(sequence, acker)),
                    other => Err((other, acker)),
                }
            };
            let ordinal = match admitted {
                Ok(ordinal) => ordinal,
                Err((Admit::Lost { expected }, _)) => {
                    // Stop here; the partition re-opens at its ack floor
                    // once what is out has drained.
                    tracing::warn!(%topic, partition = p, expected, got = delivery, "a delivery was lost; re-reading the partition from its ack floor");
                    let _ = broken.send((p, assignment));
                    return;
                }
                Err((Admit::AckAgain(kind), acker)) => {
                    let _ = acker.ack_with(kind).await;
                    continue;
                }
                Err((Admit::Skip | Admit::New, _)) => continue,
            };
            let headers: Vec<(String, Bytes)> = message
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .flat_map(|(name, values)| {
                            let name: &str = name.as_ref();
                            values.iter().map(move |v| {
                                (
                                    name.to_owned(),
                                    Bytes::copy_from_slice(v.as_str().as_bytes()),
                                )
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let key = wire::key_from_headers(headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())))
                .ok()
                .flatten();
            let out = engine.ingest(
                p as i32,
                Fetched {
                    offset: ordinal,
                    position: sequence,
                    key,
                    headers,
                    payload: message.payload,
                },
            );
            engine.send(out);
        }
    }
}

/// Whether the server says `durable` no longer exists (deleted from
/// outside); `false` when it cannot tell (unreachable, timed out).
async fn consumer_gone(durable: &consumer::Consumer<consumer::pull::Config>) -> bool {
    matches!(
        durable.get_info().await,
        Err(e) if e.kind() == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound
    )
}

struct NatsMembership {
    stop: watch::Sender<Stop>,
    engine: Arc<Engine>,
    drain_timeout: Duration,
    task: Option<JoinHandle<()>>,
}

#[async_trait]
impl Membership for NatsMembership {
    fn stop_dispatching(&self) -> bool {
        self.engine.stop_dispatching();
        true
    }

    fn drain_timeout(&self) -> Option<Duration> {
        Some(self.drain_timeout)
    }

    async fn leave(mut self: Box<Self>) -> Result<()> {
        let _ = self.stop.send(Stop::Leave);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        Ok(())
    }
}

impl Drop for NatsMembership {
    fn drop(&mut self) {
        self.stop.send_if_modified(|s| {
            if *s == Stop::Running {
                *s = Stop::Abandon;
                true
            } else {
                false
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_durations_are_refused_not_overflowed() {
        let refused = |config: JetStreamConsumerConfig, name: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        };
        refused(
            JetStreamConsumerConfig {
                heartbeat: Duration::MAX,
                ..JetStreamConsumerConfig::default()
            },
            "nats.heartbeat",
        );
        refused(
            JetStreamConsumerConfig {
                session_timeout: Duration::from_secs(3601),
                ..JetStreamConsumerConfig::default()
            },
            "nats.session_timeout",
        );
        refused(
            JetStreamConsumerConfig {
                drain_timeout: Duration::MAX,
                ..JetStreamConsumerConfig::default()
            },
            "nats.drain_timeout",
        );
        refused(
            JetStreamConsumerConfig {
                ack_wait: Duration::MAX,
                ..JetStreamConsumerConfig::default()
            },
            "nats.ack_wait",
        );
        assert!(JetStreamConsumerConfig::default().validate().is_ok());
    }

    #[test]
    fn a_first_delivery_that_never_arrived_is_noticed() {
        // Delivery 1 (stream sequence 7) was lost; delivery 2 arrives
        // first. Handling it would overtake 7 within its key, and the
        // server's later re-send of 7 would look settled and be acked
        // unhandled.
        let mut acks = PartitionAcks::default();
        let admitted = acks.admit(8, 2);
        assert!(
            matches!(admitted, Admit::Lost { expected: 1 }),
            "{admitted:?}"
        );
        assert_eq!(acks.last_sequence, 0, "nothing was admitted");
    }

    #[test]
    fn deliveries_in_order_are_admitted_and_a_later_gap_is_noticed() {
        let mut acks = PartitionAcks::default();
        assert!(matches!(acks.admit(7, 1), Admit::New));
        assert!(matches!(acks.admit(8, 2), Admit::New));
        let admitted = acks.admit(10, 4);
        assert!(
            matches!(admitted, Admit::Lost { expected: 3 }),
            "{admitted:?}"
        );
    }

    #[test]
    fn a_re_send_of_a_settled_message_is_settled_again_as_before() {
        let mut acks = PartitionAcks::default();
        assert!(matches!(acks.admit(7, 1), Admit::New));
        assert!(matches!(acks.admit(8, 2), Admit::New));
        // 7 was terminated (dead-lettered), its term lost: the re-send
        // (delivery 3) is terminated again, not handled.
        acks.acked.insert(7, AckKind::Term);
        assert!(matches!(acks.admit(7, 3), Admit::AckAgain(AckKind::Term)));
        // 8 settled long ago (no longer remembered): acked.
        assert!(matches!(acks.admit(8, 4), Admit::AckAgain(AckKind::Ack)));
        assert!(matches!(acks.admit(9, 5), Admit::New));
    }

    #[test]
    fn what_the_previous_owner_settled_is_settled_again_and_handed_on() {
        // The previous owner settled 12 and 15 ahead of 11 (another key's,
        // still open when it handed the partition over).
        let mut acks = PartitionAcks {
            inherited: [12, 15].into(),
            ..PartitionAcks::default()
        };
        assert!(matches!(acks.admit(11, 1), Admit::New));
        assert!(matches!(acks.admit(12, 2), Admit::AckAgain(AckKind::Ack)));
        assert!(matches!(acks.admit(13, 3), Admit::New));
        // Its re-send (the ack was lost) is acked again too.
        assert!(matches!(acks.admit(12, 4), Admit::AckAgain(AckKind::Ack)));
        // 10 and 13 settled here; 11 is still open. The next owner, from
        // 11, gets 12 and 13 and the inherited 15 that has not come yet;
        // the floor must first reach 10.
        acks.acked.insert(10, AckKind::Ack);
        acks.acked.insert(13, AckKind::Ack);
        assert_eq!(acks.settled_from(11), Some(vec![12, 13, 15]));
        assert_eq!(acks.acked_before(Some(11)), 10);
        // Had the memory forgotten one past 11, the next owner could run a
        // key backwards (handle an earlier event again, skip a later one):
        // nothing is handed on.
        acks.forgotten = 12;
        assert_eq!(acks.settled_from(11), None);
        // A forgotten ack below the resume position counts for the floor.
        acks.forgotten = 10;
        acks.acked.remove(&10);
        assert_eq!(acks.acked_before(Some(11)), 10);
        assert_eq!(acks.settled_from(13), Some(vec![13, 15]));
    }
}
