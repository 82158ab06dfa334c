//! The in-memory transport: a broker inside the process, with the same
//! contract as Kafka and JetStream — fixed partitions, key → partition by
//! murmur2, consumer groups that split partitions and rebalance, per-key
//! order with parallelism across keys, re-delivery after nack, commits up to
//! the lowest unacked event, and publish-side de-duplication by event id.
//!
//! Records are stored in their wire form (headers as the Kafka and NATS
//! transports write them) and decoded on delivery, so the header codec is
//! exercised end to end here too. Nothing survives the process: this is for
//! unit tests, the conformance suite's self-test and the embedded demo,
//! never a stand-in for a real broker in an integration test.
//!
//! One mutex guards the broker's state. Settling a delivery takes it
//! briefly; deliveries are sent to members after it is released, so a
//! dropped delivery (which settles itself) can never deadlock the broker.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
// tokio's clock, not the system's: a test that pauses it sees delayed
// re-deliveries and the dedup window follow its virtual time.
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::delivery::{
    Assignment, Coordinates, Deliveries, Delivery, DeliveryInfo, Membership, Outcome, RawRecord,
    Settle, Undecodable,
};
use crate::envelope::{Envelope, EventId};
use crate::error::{Error, Result};
use crate::partition::partition_for_key;
use crate::transport::{
    Capabilities, Publisher, Receipt, StartFrom, Subscriber, Subscription, TopicAdmin, TopicSpec,
    Transport,
};
use crate::wire;

/// How long a published event id is remembered for de-duplication
/// (JetStream's default duplicate window is also two minutes).
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// Longest re-delivery delay honoured; longer ones are cut to this.
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(24 * 3600);

/// How long a member's graceful leave lets its running handlers finish
/// before abandoning them (their events go back unsettled), unless
/// [`MemoryTransport::with_drain_timeout`] says otherwise: the brokers'
/// default too.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// An in-process broker. Clones share the same broker.
#[derive(Clone)]
pub struct MemoryTransport {
    broker: Arc<Broker>,
    drain_timeout: Duration,
}

impl MemoryTransport {
    /// A new, empty broker.
    pub fn new() -> Self {
        MemoryTransport {
            broker: Arc::new_cyclic(|me| Broker {
                me: me.clone(),
                state: Mutex::new(State::default()),
            }),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }

    /// Members subscribed through this handle let their running handlers
    /// finish for at most `timeout` when they leave gracefully (`serve`'s
    /// and the router's shutdown); handlers still running then are dropped
    /// and their events go back to the group unsettled. Default
    /// [`DEFAULT_DRAIN_TIMEOUT`]; clones made before keep theirs.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Stores `record` in `partition` exactly as given, as a foreign
    /// producer would: for tests of how consumers treat records that are not
    /// Keel events (no key, missing headers, garbage payloads).
    pub fn publish_raw(&self, topic: &str, partition: u32, record: RawRecord) -> Result<Receipt> {
        let mut out = Vec::new();
        let receipt = {
            let mut state = self.broker.lock();
            let t = state.topics.get_mut(topic).ok_or_else(|| Error::Publish {
                topic: topic.to_owned(),
                event_id: "raw record".into(),
                reason: "topic does not exist; create it first (TopicAdmin::ensure_topic)".into(),
                retriable: false,
                source: None,
            })?;
            let log = t
                .partitions
                .get_mut(partition as usize)
                .ok_or_else(|| Error::Publish {
                    topic: topic.to_owned(),
                    event_id: "raw record".into(),
                    reason: format!("partition {partition} does not exist"),
                    retriable: false,
                    source: None,
                })?;
            log.push(Record {
                key: record.key,
                headers: record.headers,
                payload: record.payload,
                stored_at: chrono::Utc::now(),
            });
            let receipt = Receipt {
                topic: topic.into(),
                partition,
                position: (log.len() - 1) as u64,
                duplicate: false,
            };
            let groups: Vec<String> = t.groups.keys().cloned().collect();
            for group in groups {
                self.broker.dispatch(&mut state, topic, &group, &mut out);
            }
            receipt
        };
        send(out);
        Ok(receipt)
    }

    /// The committed position (next offset to consume) of `group` on each
    /// partition of `topic`; `None` where the group never started.
    pub fn committed(&self, topic: &str, group: &str) -> Option<Vec<Option<u64>>> {
        let state = self.broker.lock();
        let group = state.topics.get(topic)?.groups.get(group)?;
        Some(group.partitions.iter().map(|p| p.committed).collect())
    }
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport").finish_non_exhaustive()
    }
}

struct Broker {
    me: Weak<Broker>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Topic>,
    /// Outstanding deliveries by token.
    tokens: HashMap<u64, TokenRef>,
    next_token: u64,
    next_member: u64,
}

struct Topic {
    partitions: Vec<Vec<Record>>,
    dedup: HashMap<EventId, Receipt>,
    dedup_order: VecDeque<(Instant, EventId)>,
    groups: HashMap<String, Group>,
}

struct Record {
    key: Option<Bytes>,
    headers: Vec<(String, Bytes)>,
    payload: Bytes,
    stored_at: chrono::DateTime<chrono::Utc>,
}

impl Record {
    fn key_bytes(&self) -> Bytes {
        self.key.clone().unwrap_or_default()
    }
}

#[derive(Default)]
struct Group {
    /// Members in join order; the assignment follows this order.
    members: Vec<Member>,
    partitions: Vec<PartitionState>,
    /// When timers will dispatch this group again for delayed re-deliveries
    /// (one sleeping task each, removed once past).
    wakes: std::collections::BTreeSet<Instant>,
    /// Partition the next dispatch starts from, rotating so that one busy
    /// partition cannot take a member's whole in-flight budget every time.
    next_first: usize,
}

struct Member {
    id: u64,
    tx: mpsc::UnboundedSender<Result<Delivery>>,
    assignment: watch::Sender<Assignment>,
    max_in_flight: usize,
    in_flight: usize,
    start: StartFrom,
}

/// A group's view of one partition.
///
/// Unacked offsets are queued per key; only a key's head can be delivered,
/// and only while no delivery of that key is outstanding. `ready` holds the
/// heads that can go out now, oldest first, so dispatching costs O(1) per
/// delivery however far a slow key holds the committed position back.
#[derive(Default)]
struct PartitionState {
    owner: Option<u64>,
    /// Set while the partition is being handed from `owner` to this member:
    /// no new deliveries go out until those the owner's handlers began
    /// settle.
    handover_to: Option<u64>,
    /// Next offset not yet acked contiguously: what a new owner starts from.
    committed: Option<u64>,
    /// Offsets below this are in `queues` (or acked).
    indexed: u64,
    queues: HashMap<Bytes, VecDeque<u64>>,
    ready: BTreeSet<u64>,
    acked: BTreeSet<u64>,
    in_flight: HashMap<u64, u64>,
    /// Of the deliveries in flight, those a handler began: what a handover
    /// waits for.
    running: usize,
    attempts: HashMap<u64, u32>,
    /// Key heads nacked with a delay, and when they become ready.
    retry_at: HashMap<u64, Instant>,
}

impl PartitionState {
    /// Gives the partition to `owner` (or to nobody). A new owner counts
    /// attempts afresh, as a Kafka or JetStream member does after a
    /// rebalance (and a delivery the old owner dropped unrun counts none).
    fn hand_over(&mut self, owner: Option<u64>) {
        if self.owner != owner {
            self.attempts.clear();
        }
        self.owner = owner;
        self.handover_to = None;
        self.running = 0;
    }

    /// Starts the group's position on first ownership.
    fn start(&mut self, start: StartFrom, log: &[Record]) {
        if self.committed.is_none() {
            let at = match start {
                StartFrom::Earliest => 0,
                StartFrom::Latest => log.len() as u64,
                StartFrom::Timestamp(at) => log.partition_point(|r| r.stored_at < at) as u64,
            };
            self.committed = Some(at);
            self.indexed = at;
        }
    }

    /// Queues records appended since the last call.
    fn index(&mut self, log: &[Record]) {
        for offset in self.indexed..log.len() as u64 {
            let queue = self
                .queues
                .entry(log[offset as usize].key_bytes())
                .or_default();
            queue.push_back(offset);
            if queue.len() == 1 {
                self.ready.insert(offset);
            }
        }
        self.indexed = self.indexed.max(log.len() as u64);
    }

    /// Makes delayed heads that are due ready; returns the next due time.
    fn release_due(&mut self, now: Instant) -> Option<Instant> {
        let mut next = None;
        let ready = &mut self.ready;
        self.retry_at.retain(|&offset, &mut at| {
            if at <= now {
                ready.insert(offset);
                false
            } else {
                next = Some(next.map_or(at, |n: Instant| n.min(at)));
                true
            }
        });
        next
    }

    /// An acked offset leaves its key's queue; the key's next event is ready.
    fn acked(&mut self, offset: u64, key: &Bytes) {
        if let Some(queue) = self.queues.get_mut(key) {
            if queue.front() == Some(&offset) {
                queue.pop_front();
            }
            match queue.front() {
                Some(&next) => {
                    self.ready.insert(next);
                }
                None => {
                    self.queues.remove(key);
                }
            }
        }
        self.acked.insert(offset);
        self.attempts.remove(&offset);
        if let Some(committed) = self.committed.as_mut() {
            while self.acked.remove(committed) {
                *committed += 1;
            }
        }
    }
}

#[derive(Clone)]
struct TokenRef {
    topic: String,
    group: String,
    partition: u32,
    offset: u64,
    member: u64,
    /// A handler began it ([`Settle::begin`]).
    begun: bool,
}

/// A delivery decided under the lock and sent after it is released.
struct Outgoing {
    tx: mpsc::UnboundedSender<Result<Delivery>>,
    item: Result<Delivery>,
}

impl Broker {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated
        // in a way that matters more than stopping the whole broker would.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn settler(&self) -> Arc<dyn Settle> {
        match self.me.upgrade() {
            Some(me) => me,
            None => Arc::new(NoBroker),
        }
    }

    fn publish_one(
        &self,
        state: &mut State,
        topic_name: &str,
        event: &Envelope,
    ) -> Result<Receipt> {
        let headers = wire::encode_headers(event)?;
        let topic = state
            .topics
            .get_mut(topic_name)
            .ok_or_else(|| Error::Publish {
                topic: topic_name.to_owned(),
                event_id: event.id().to_string(),
                reason: "topic does not exist; create it first (TopicAdmin::ensure_topic)".into(),
                retriable: false,
                source: None,
            })?;
        let now = Instant::now();
        while let Some((at, id)) = topic.dedup_order.front() {
            if now.duration_since(*at) < DEDUP_WINDOW {
                break;
            }
            topic.dedup.remove(id);
            topic.dedup_order.pop_front();
        }
        if let Some(original) = topic.dedup.get(&event.id()) {
            return Ok(Receipt {
                duplicate: true,
                ..original.clone()
            });
        }
        let partition = partition_for_key(event.key().as_bytes(), topic.partitions.len() as u32);
        let log = &mut topic.partitions[partition as usize];
        log.push(Record {
            key: Some(Bytes::copy_from_slice(event.key().as_bytes())),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k, Bytes::from(v)))
                .collect(),
            payload: event.payload().clone(),
            stored_at: chrono::Utc::now(),
        });
        let receipt = Receipt {
            topic: topic_name.into(),
            partition,
            position: (log.len() - 1) as u64,
            duplicate: false,
        };
        topic.dedup.insert(event.id(), receipt.clone());
        topic.dedup_order.push_back((now, event.id()));
        Ok(receipt)
    }

    /// Decides what every member of `group` on `topic` can be sent now.
    fn dispatch(
        &self,
        state: &mut State,
        topic_name: &str,
        group_name: &str,
        out: &mut Vec<Outgoing>,
    ) {
        let settler = self.settler();
        let State {
            topics,
            tokens,
            next_token,
            ..
        } = state;
        let Some(topic) = topics.get_mut(topic_name) else {
            return;
        };
        let Some(group) = topic.groups.get_mut(group_name) else {
            return;
        };
        let now = Instant::now();
        let mut earliest_retry: Option<Instant> = None;
        let count = group.partitions.len();
        let first = group.next_first % count.max(1);
        group.next_first = group.next_first.wrapping_add(1);
        for p in (first..count).chain(0..first) {
            let ps = &mut group.partitions[p];
            let (Some(owner), None) = (ps.owner, ps.handover_to) else {
                continue;
            };
            let Some(member) = group.members.iter_mut().find(|m| m.id == owner) else {
                continue;
            };
            let log = &topic.partitions[p];
            ps.start(member.start, log);
            ps.index(log);
            if let Some(at) = ps.release_due(now) {
                earliest_retry = Some(earliest_retry.map_or(at, |e| e.min(at)));
            }
            while member.in_flight < member.max_in_flight {
                let Some(offset) = ps.ready.pop_first() else {
                    break;
                };
                let record = &log[offset as usize];
                let attempt = ps.attempts.entry(offset).or_insert(0);
                *attempt += 1;
                *next_token += 1;
                let token = *next_token;
                tokens.insert(
                    token,
                    TokenRef {
                        topic: topic_name.to_owned(),
                        group: group_name.to_owned(),
                        partition: p as u32,
                        offset,
                        member: owner,
                        begun: false,
                    },
                );
                ps.in_flight.insert(offset, token);
                member.in_flight += 1;
                let info = DeliveryInfo {
                    coordinates: Coordinates {
                        topic: topic_name.to_owned(),
                        partition: p as u32,
                        position: offset,
                    },
                    group: group_name.to_owned(),
                    attempt: *attempt,
                };
                let decoded = wire::decode(
                    record.key.as_deref(),
                    record.headers.iter().map(|(k, v)| (k.as_str(), v.as_ref())),
                    record.payload.clone(),
                );
                let item = match decoded {
                    Ok(envelope) => Ok(Delivery::new(envelope, info, settler.clone(), token)),
                    Err(e) => {
                        let raw = RawRecord {
                            key: record.key.clone(),
                            headers: record.headers.clone(),
                            payload: record.payload.clone(),
                        };
                        let reason = e.to_string();
                        let undecodable =
                            Undecodable::new(raw, info, reason, settler.clone(), token);
                        Err(Error::Undecodable(Box::new(undecodable)))
                    }
                };
                out.push(Outgoing {
                    tx: member.tx.clone(),
                    item,
                });
            }
        }
        group.wakes.retain(|w| *w > now);
        // A timer due by then wakes this dispatch again, which then sets one
        // for the retry: a timer per earliest retry, not one per dispatch
        // (a key retrying every second beside one waiting a day must not
        // leave a day-long timer behind at each of its retries).
        if let Some(at) = earliest_retry
            && group.wakes.range(..=at).next().is_none()
            && self.dispatch_at(at, topic_name, group_name)
        {
            group.wakes.insert(at);
        }
    }

    /// Dispatches again once a delayed re-delivery is due; whether a timer
    /// was set.
    fn dispatch_at(&self, at: Instant, topic: &str, group: &str) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Outside a runtime the next publish or settle dispatches.
            return false;
        };
        let broker = self.me.clone();
        let (topic, group) = (topic.to_owned(), group.to_owned());
        runtime.spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(broker) = broker.upgrade() {
                broker.dispatch_and_send(&topic, &group);
            }
        });
        true
    }

    fn dispatch_and_send(&self, topic: &str, group: &str) {
        let mut out = Vec::new();
        {
            let mut state = self.lock();
            self.dispatch(&mut state, topic, group, &mut out);
        }
        send(out);
    }

    /// Recomputes which member owns which partition. Partitions whose owner
    /// is still a member are handed over only after the deliveries its
    /// handlers began settle.
    fn rebalance(group: &mut Group, tokens: &mut HashMap<u64, TokenRef>) {
        let n = group.members.len();
        for p in 0..group.partitions.len() {
            let target = (n > 0).then(|| group.members[p % n].id);
            let ps = &mut group.partitions[p];
            match (ps.owner, target) {
                (Some(owner), Some(t)) if owner == t => ps.handover_to = None,
                (Some(owner), _) if group.members.iter().any(|m| m.id == owner) => {
                    ps.handover_to = target;
                    Self::take_back(group, p, tokens);
                    let ps = &mut group.partitions[p];
                    if ps.running == 0 {
                        ps.hand_over(target);
                    }
                }
                _ => ps.hand_over(target),
            }
        }
        publish_assignments(group);
    }

    /// Takes back the deliveries of partition `p` that no handler of its
    /// owner began (queued behind busy handlers): their offsets are ready
    /// again (the attempt not counted: they never ran) and their late
    /// outcomes ignored. A handover waits only for the ones begun (none
    /// can begin, nor go out, while it is pending).
    fn take_back(group: &mut Group, p: usize, tokens: &mut HashMap<u64, TokenRef>) {
        let Group {
            members,
            partitions,
            ..
        } = group;
        let ps = &mut partitions[p];
        let mut taken_back = 0;
        ps.in_flight.retain(|&offset, token| {
            if tokens.get(token).is_some_and(|t| t.begun) {
                return true;
            }
            tokens.remove(token);
            ps.ready.insert(offset);
            if let Some(attempt) = ps.attempts.get_mut(&offset) {
                *attempt = attempt.saturating_sub(1);
            }
            taken_back += 1;
            false
        });
        if let Some(member) = members.iter_mut().find(|m| Some(m.id) == ps.owner) {
            member.in_flight = member.in_flight.saturating_sub(taken_back);
        }
    }

    fn leave(&self, topic_name: &str, group_name: &str, member_id: u64) {
        let mut out = Vec::new();
        {
            let mut state = self.lock();
            let State { topics, tokens, .. } = &mut *state;
            let Some(group) = topics
                .get_mut(topic_name)
                .and_then(|t| t.groups.get_mut(group_name))
            else {
                return;
            };
            if let Some(leaving) = group.members.iter().find(|m| m.id == member_id) {
                leaving.assignment.send_replace(Vec::new());
            }
            group.members.retain(|m| m.id != member_id);
            // Its unsettled deliveries go back to the pool; their late acks
            // are ignored (the token is gone).
            tokens.retain(|_, t| {
                !(t.member == member_id && t.topic == topic_name && t.group == group_name)
            });
            for ps in &mut group.partitions {
                let ready = &mut ps.ready;
                ps.in_flight.retain(|&offset, token| {
                    let kept = tokens.contains_key(token);
                    if !kept {
                        ready.insert(offset);
                    }
                    kept
                });
            }
            Self::rebalance(group, tokens);
            self.dispatch(&mut state, topic_name, group_name, &mut out);
        }
        send(out);
    }
}

impl Settle for Broker {
    fn settle(&self, token: u64, outcome: Outcome) {
        let mut out = Vec::new();
        {
            let mut state = self.lock();
            let Some(t) = state.tokens.remove(&token) else {
                return;
            };
            let Some(Topic {
                partitions, groups, ..
            }) = state.topics.get_mut(&t.topic)
            else {
                return;
            };
            let Some(group) = groups.get_mut(&t.group) else {
                return;
            };
            if let Some(member) = group.members.iter_mut().find(|m| m.id == t.member) {
                member.in_flight = member.in_flight.saturating_sub(1);
            }
            let ps = &mut group.partitions[t.partition as usize];
            ps.in_flight.remove(&t.offset);
            if t.begun {
                ps.running = ps.running.saturating_sub(1);
            }
            let (outcome, counted) = outcome.counted();
            if !counted && let Some(attempt) = ps.attempts.get_mut(&t.offset) {
                // The re-delivery gets this delivery's number again.
                *attempt = attempt.saturating_sub(1);
            }
            match outcome {
                Outcome::Ack | Outcome::Term => {
                    let key = partitions[t.partition as usize][t.offset as usize].key_bytes();
                    ps.acked(t.offset, &key);
                }
                Outcome::Nack { delay } if delay.is_zero() => {
                    ps.ready.insert(t.offset);
                }
                Outcome::Nack { delay } | Outcome::Backoff { delay } => {
                    let now = Instant::now();
                    let at = now.checked_add(delay.min(MAX_NACK_DELAY)).unwrap_or(now);
                    ps.retry_at.insert(t.offset, at);
                }
            }
            if ps.handover_to.is_some() && ps.running == 0 {
                let to = ps.handover_to;
                ps.hand_over(to);
                publish_assignments(group);
            }
            self.dispatch(&mut state, &t.topic, &t.group, &mut out);
        }
        send(out);
    }

    fn is_owned(&self, token: u64) -> bool {
        self.token_holds(token, |ps, member| {
            ps.owner == Some(member) && ps.handover_to.is_none()
        })
    }

    fn begin(&self, token: u64) -> bool {
        let mut state = self.lock();
        let State { topics, tokens, .. } = &mut *state;
        let Some(t) = tokens.get_mut(&token) else {
            return false;
        };
        let Some(ps) = topics
            .get_mut(&t.topic)
            .and_then(|topic| topic.groups.get_mut(&t.group))
            .and_then(|group| group.partitions.get_mut(t.partition as usize))
            .filter(|ps| ps.owner == Some(t.member) && ps.handover_to.is_none())
        else {
            return false;
        };
        if !t.begun {
            t.begun = true;
            ps.running += 1;
        }
        true
    }

    fn is_current(&self, token: u64) -> bool {
        // A token goes with its settlement or its member's leave; a
        // partition being handed over (`handover_to`) still counts until
        // the hand-over completes.
        self.token_holds(token, |ps, member| ps.owner == Some(member))
    }
}

impl Broker {
    /// Whether `token` is outstanding and its partition passes `check`
    /// (given the member it went to).
    fn token_holds(&self, token: u64, check: impl FnOnce(&PartitionState, u64) -> bool) -> bool {
        let state = self.lock();
        state.tokens.get(&token).is_some_and(|t| {
            state
                .topics
                .get(&t.topic)
                .and_then(|topic| topic.groups.get(&t.group))
                .and_then(|group| group.partitions.get(t.partition as usize))
                .is_some_and(|ps| check(ps, t.member))
        })
    }
}

/// Settles nothing: for deliveries outliving their broker.
struct NoBroker;

impl Settle for NoBroker {
    fn settle(&self, _token: u64, _outcome: Outcome) {}
}

fn publish_assignments(group: &Group) {
    for member in &group.members {
        let owned: Assignment = group
            .partitions
            .iter()
            .enumerate()
            .filter(|(_, ps)| ps.owner == Some(member.id))
            .map(|(p, _)| p as u32)
            .collect();
        member.assignment.send_if_modified(|current| {
            let changed = *current != owned;
            *current = owned;
            changed
        });
    }
}

fn send(out: Vec<Outgoing>) {
    for Outgoing { tx, item } in out {
        // A failed send means the member is leaving; the delivery it carries
        // settles as a nack whose token the leave has already removed.
        let _ = tx.send(item);
    }
}

#[async_trait]
impl Publisher for MemoryTransport {
    async fn publish(&self, topic: &str, event: Envelope) -> Result<Receipt> {
        let mut out = Vec::new();
        let receipt = {
            let mut state = self.broker.lock();
            let receipt = self.broker.publish_one(&mut state, topic, &event)?;
            let groups: Vec<String> = state.topics[topic].groups.keys().cloned().collect();
            for group in groups {
                self.broker.dispatch(&mut state, topic, &group, &mut out);
            }
            receipt
        };
        send(out);
        Ok(receipt)
    }

    async fn publish_batch(&self, topic: &str, events: Vec<Envelope>) -> Result<Vec<Receipt>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let receipts = {
            let mut state = self.broker.lock();
            // Validate every event first so a bad one stores none of the batch.
            for event in &events {
                wire::encode_headers(event)?;
            }
            let receipts = events
                .iter()
                .map(|event| self.broker.publish_one(&mut state, topic, event))
                .collect::<Result<Vec<_>>>()?;
            let groups: Vec<String> = state.topics[topic].groups.keys().cloned().collect();
            for group in groups {
                self.broker.dispatch(&mut state, topic, &group, &mut out);
            }
            receipts
        };
        send(out);
        Ok(receipts)
    }

    async fn publish_record(&self, topic: &str, record: RawRecord) -> Result<Receipt> {
        let partitions = {
            let state = self.broker.lock();
            state
                .topics
                .get(topic)
                .map_or(1, |t| t.partitions.len() as u32)
        };
        let partition = record
            .partition_key()
            .map_or(0, |key| partition_for_key(&key, partitions));
        self.publish_raw(topic, partition, record)
    }
}

#[async_trait]
impl Subscriber for MemoryTransport {
    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries> {
        let Subscription {
            topic,
            group,
            start,
            max_in_flight,
        } = subscription;
        let (tx, rx) = mpsc::unbounded_channel();
        let (assignment_tx, assignment_rx) = watch::channel(Vec::new());
        let mut out = Vec::new();
        let member_id = {
            let mut state = self.broker.lock();
            state.next_member += 1;
            let member_id = state.next_member;
            let State { topics, tokens, .. } = &mut *state;
            let t = topics.get_mut(&topic).ok_or_else(|| Error::Subscribe {
                topic: topic.clone(),
                group: group.clone(),
                reason: "topic does not exist; create it first (TopicAdmin::ensure_topic)".into(),
                retriable: false,
                source: None,
            })?;
            let partitions = t.partitions.len();
            let g = t.groups.entry(group.clone()).or_insert_with(|| Group {
                partitions: (0..partitions).map(|_| PartitionState::default()).collect(),
                ..Group::default()
            });
            g.members.push(Member {
                id: member_id,
                tx,
                assignment: assignment_tx,
                max_in_flight: max_in_flight.max(1),
                in_flight: 0,
                start,
            });
            Broker::rebalance(g, tokens);
            self.broker.dispatch(&mut state, &topic, &group, &mut out);
            member_id
        };
        send(out);
        tracing::debug!(%topic, %group, member = member_id, "joined group");
        let membership = MemoryMembership {
            broker: Arc::downgrade(&self.broker),
            topic,
            group,
            member: member_id,
            left: false,
            drain_timeout: self.drain_timeout,
        };
        Ok(Deliveries::new(
            UnboundedReceiverStream::new(rx),
            assignment_rx,
            Box::new(membership),
        ))
    }
}

struct MemoryMembership {
    broker: Weak<Broker>,
    topic: String,
    group: String,
    member: u64,
    left: bool,
    drain_timeout: Duration,
}

impl MemoryMembership {
    fn leave_now(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        if let Some(broker) = self.broker.upgrade() {
            broker.leave(&self.topic, &self.group, self.member);
            tracing::debug!(topic = %self.topic, group = %self.group, member = self.member, "left group");
        }
    }
}

#[async_trait]
impl Membership for MemoryMembership {
    fn drain_timeout(&self) -> Option<Duration> {
        Some(self.drain_timeout)
    }

    async fn leave(mut self: Box<Self>) -> Result<()> {
        // Acks are applied as they happen, so there is nothing to flush.
        self.leave_now();
        Ok(())
    }
}

impl Drop for MemoryMembership {
    fn drop(&mut self) {
        self.leave_now();
    }
}

#[async_trait]
impl TopicAdmin for MemoryTransport {
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<()> {
        if spec.partitions == 0 {
            return Err(Error::Topic {
                topic: spec.name.clone(),
                reason: "a topic needs at least 1 partition".into(),
                retriable: false,
                source: None,
            });
        }
        let mut state = self.broker.lock();
        match state.topics.get(&spec.name) {
            Some(existing) if existing.partitions.len() as u32 != spec.partitions => {
                Err(Error::Topic {
                    topic: spec.name.clone(),
                    reason: format!(
                        "exists with {} partitions, {} requested; partition counts cannot change without remapping keys",
                        existing.partitions.len(),
                        spec.partitions
                    ),
                    retriable: false,
                    source: None,
                })
            }
            Some(_) => Ok(()),
            None => {
                state.topics.insert(
                    spec.name.clone(),
                    Topic {
                        partitions: (0..spec.partitions).map(|_| Vec::new()).collect(),
                        dedup: HashMap::new(),
                        dedup_order: VecDeque::new(),
                        groups: HashMap::new(),
                    },
                );
                Ok(())
            }
        }
    }
}

impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            consumer_groups: true,
            per_key_order: true,
            replay_from_start: true,
            redelivery_after_nack: true,
            publish_dedup: true,
            rebalance_timeout: Duration::from_secs(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    crate::conformance_tests!(MemoryTransport::new());

    /// A transport with a one-partition `orders` topic holding one event of
    /// `key`, and a member of group `g` on it.
    async fn one_event(key: &str) -> (MemoryTransport, Deliveries) {
        let t = MemoryTransport::new();
        topic(&t, "orders", 1).await;
        t.publish("orders", Envelope::new("e", key, ""))
            .await
            .unwrap();
        let member = t.subscribe(Subscription::new("orders", "g")).await.unwrap();
        (t, member)
    }

    async fn topic(t: &MemoryTransport, name: &str, partitions: u32) {
        t.ensure_topic(&TopicSpec {
            name: name.into(),
            partitions,
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn unknown_topics_and_partition_changes_are_refused() {
        let t = MemoryTransport::new();
        let err = t
            .publish("nope", Envelope::new("e", "k", ""))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("topic `nope`"), "{err}");
        // An empty batch stores nothing, wherever it is sent.
        assert!(
            t.publish_batch("nope", Vec::new())
                .await
                .unwrap()
                .is_empty()
        );
        let err = t
            .subscribe(Subscription::new("nope", "g"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        topic(&t, "orders", 3).await;
        topic(&t, "orders", 3).await;
        let err = t
            .ensure_topic(&TopicSpec {
                name: "orders".into(),
                partitions: 4,
            })
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("3 partitions, 4 requested"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_bad_event_in_a_batch_stores_nothing() {
        let t = MemoryTransport::new();
        topic(&t, "orders", 1).await;
        let good = Envelope::new("e", "k", "");
        let bad = Envelope::new("e", "k", "").with_header("keel-event-id", "forged");
        assert!(t.publish_batch("orders", vec![good, bad]).await.is_err());
        let receipt = t
            .publish("orders", Envelope::new("e", "k", ""))
            .await
            .unwrap();
        assert_eq!(receipt.position, 0);
    }

    #[tokio::test]
    async fn commits_stop_at_the_lowest_unacked_event() {
        let t = MemoryTransport::new();
        topic(&t, "orders", 1).await;
        for key in ["a", "b", "c"] {
            t.publish("orders", Envelope::new("e", key, ""))
                .await
                .unwrap();
        }
        let mut member = t.subscribe(Subscription::new("orders", "g")).await.unwrap();
        let first = member.next().await.unwrap().unwrap();
        let second = member.next().await.unwrap().unwrap();
        let third = member.next().await.unwrap().unwrap();
        third.ack();
        second.ack();
        assert_eq!(t.committed("orders", "g"), Some(vec![Some(0)]));
        first.ack();
        assert_eq!(t.committed("orders", "g"), Some(vec![Some(3)]));
    }

    #[tokio::test]
    async fn undecodable_records_take_their_turn_and_are_settled_like_events() {
        let t = MemoryTransport::new();
        topic(&t, "orders", 1).await;
        let raw = RawRecord {
            key: None,
            headers: vec![("x".into(), Bytes::from_static(b"y"))],
            payload: Bytes::from_static(b"not an event"),
        };
        t.publish_raw("orders", 0, raw.clone()).unwrap();
        t.publish("orders", Envelope::new("e", "k", ""))
            .await
            .unwrap();
        let mut member = t.subscribe(Subscription::new("orders", "g")).await.unwrap();
        let Some(Err(Error::Undecodable(poison))) = member.next().await else {
            panic!("expected the undecodable record first");
        };
        assert_eq!(poison.record(), &raw);
        assert!(poison.reason().contains("no key"), "{}", poison.reason());
        assert_eq!(poison.info().coordinates.position, 0);
        assert!(poison.nack_with_delay(Duration::ZERO));
        // The keyed event and the redelivered record may come in either order.
        let mut redelivered = false;
        for _ in 0..2 {
            match member.next().await.unwrap() {
                Ok(event) => assert!(event.ack()),
                Err(Error::Undecodable(again)) => {
                    assert_eq!(again.info().attempt, 2);
                    assert!(again.ack());
                    redelivered = true;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(redelivered, "a nacked undecodable record comes back");
        assert_eq!(t.committed("orders", "g"), Some(vec![Some(2)]));
    }

    #[tokio::test]
    async fn a_key_retrying_fast_beside_a_long_delay_leaves_no_timers_behind() {
        let t = MemoryTransport::new();
        topic(&t, "orders", 1).await;
        for key in ["slow", "fast"] {
            t.publish("orders", Envelope::new("e", key, ""))
                .await
                .unwrap();
        }
        let mut member = t.subscribe(Subscription::new("orders", "g")).await.unwrap();
        let next = async |member: &mut Deliveries| {
            tokio::time::timeout(Duration::from_secs(5), member.next())
                .await
                .expect("a delivery within 5 s")
                .unwrap()
                .unwrap()
        };
        let slow = next(&mut member).await;
        assert_eq!(slow.envelope().key().as_str(), Some("slow"));
        assert!(slow.nack_with_delay(Duration::from_secs(3600)));
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        for attempt in 1..=20 {
            let fast = next(&mut member).await;
            assert_eq!(
                (fast.envelope().key().as_str(), fast.info().attempt),
                (Some("fast"), attempt)
            );
            assert!(fast.nack_with_delay(Duration::from_millis(2)));
        }
        // The hour-long timer is the one set at first; the fast key's
        // last retry may have one pending.
        let after = metrics.num_alive_tasks();
        assert!(
            after <= before + 1,
            "{before} tasks before the fast key's retries, {after} after"
        );
    }

    /// Delayed re-deliveries follow tokio's clock, so a test that pauses it
    /// (`start_paused`, `tokio::time::advance`) sees them when its virtual
    /// time reaches them, not after the same wall-clock time (or never).
    #[tokio::test(start_paused = true)]
    async fn delayed_redeliveries_follow_a_paused_tokio_clock() {
        let (t, mut member) = one_event("k").await;
        let first = member.next().await.unwrap().unwrap();
        let wall = std::time::Instant::now();
        let virtual_start = tokio::time::Instant::now();
        assert!(first.nack_with_delay(Duration::from_secs(3600)));
        let again = tokio::time::timeout(Duration::from_secs(2 * 3600), member.next())
            .await
            .expect("the re-delivery once an hour of tokio's time has passed")
            .unwrap()
            .unwrap();
        assert_eq!(again.info().attempt, 2);
        assert!(virtual_start.elapsed() >= Duration::from_secs(3600));
        assert!(
            wall.elapsed() < Duration::from_secs(60),
            "took {:?} of wall-clock time",
            wall.elapsed()
        );
        // The dedup window runs on the same clock.
        let event = Envelope::new("e", "k2", "");
        let receipt = t.publish("orders", event.clone()).await.unwrap();
        tokio::time::advance(DEDUP_WINDOW + Duration::from_secs(1)).await;
        let later = t.publish("orders", event).await.unwrap();
        assert!(!later.duplicate && later.position > receipt.position);
    }

    #[tokio::test]
    async fn absurd_nack_delays_are_capped_not_overflowed() {
        let (t, mut member) = one_event("k").await;
        let d = member.next().await.unwrap().unwrap();
        assert!(d.nack_with_delay(Duration::MAX));
        assert_eq!(t.committed("orders", "g"), Some(vec![Some(0)]));
    }

    #[tokio::test]
    async fn a_backoff_redelivers_with_the_same_attempt_number_and_a_nack_counts() {
        let (_t, mut member) = one_event("a").await;
        let mut attempts = Vec::new();
        for step in ["backoff", "backoff", "nack", "backoff", "ack"] {
            let d = member.next().await.unwrap().unwrap();
            attempts.push(d.info().attempt);
            match step {
                "backoff" => assert!(d.backoff(Duration::ZERO)),
                "nack" => assert!(d.nack_with_delay(Duration::ZERO)),
                _ => assert!(d.ack()),
            }
        }
        assert_eq!(attempts, vec![1, 1, 1, 2, 2]);
    }

    #[tokio::test]
    async fn a_crashed_member_loses_its_uncommitted_work_to_the_next_owner() {
        let (t, mut first) = one_event("a").await;
        let held = first.next().await.unwrap().unwrap();
        drop(first); // crash: leaves without settling
        assert!(held.ack(), "settling is still allowed, but it is stale");
        let mut second = t.subscribe(Subscription::new("orders", "g")).await.unwrap();
        let again = second.next().await.unwrap().unwrap();
        assert_eq!(again.envelope().id(), held.envelope().id());
        assert_eq!(
            again.info().attempt,
            1,
            "a new owner counts afresh, as Kafka and JetStream members do"
        );
    }

    #[tokio::test]
    async fn a_handover_waits_for_what_the_owner_began_not_for_what_it_never_read() {
        use futures::FutureExt;
        let t = MemoryTransport::new();
        topic(&t, "orders", 2).await;
        // Three keys of partition 1, which the second member will own.
        let keys: Vec<String> = (0..)
            .map(|i| format!("k{i}"))
            .filter(|k| crate::partition::partition_for_key(k.as_bytes(), 2) == 1)
            .take(3)
            .collect();
        for key in &keys {
            t.publish("orders", Envelope::new("e", key.as_str(), ""))
                .await
                .unwrap();
        }
        let mut first = t.subscribe(Subscription::new("orders", "g")).await.unwrap();
        // Read, so begun; the other two wait unread in its stream.
        let running = first.next().await.unwrap().unwrap();
        let second = t.subscribe(Subscription::new("orders", "g")).await.unwrap();
        assert_eq!(
            second.assignment(),
            Vec::<u32>::new(),
            "partition 1 is handed over once the delivery being handled settles"
        );
        running.ack();
        assert_eq!(second.assignment(), vec![1]);
        let mut second = second;
        let mut positions = Vec::new();
        for _ in 0..2 {
            let d = second.next().await.unwrap().unwrap();
            positions.push(d.info().coordinates.position);
            d.ack();
        }
        positions.sort_unstable();
        assert_eq!(
            positions,
            vec![1, 2],
            "what the first never read goes over at once"
        );
        assert!(
            first.next().now_or_never().is_none(),
            "the first member reads nothing of a partition it gave up"
        );
        assert_eq!(t.committed("orders", "g"), Some(vec![Some(0), Some(3)]));
    }
}
