//! The per-key-parallel dispatch engine of one group member, shared by the
//! Kafka and JetStream consumers.
//!
//! Records fetched from the broker are buffered per partition and queued per key.
//! Only a key's oldest unacked record can be out at a time, so different
//! keys — also inside one partition — are handled in parallel while each
//! key keeps its order. A partition's commit position is its lowest unacked
//! offset (or one past the highest fetched when all are acked). Where
//! commits are made (Kafka), nothing is dispatched a partition window or
//! more past the last commit sent — a crash re-delivers from the last commit
//! that landed, so at most the window (two, if the crash lost the commit in
//! flight) — and a commit goes out early once half the window is used.
//! (JetStream acks each message on the server; there the window counts from
//! the lowest unacked.)
//!
//! All state sits behind one mutex: the poll thread adds records and
//! assignments, settling deliveries dispatches the next ones directly, and
//! deliveries are sent to the member's stream after the lock is released.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_core::delivery::{Outcome, Settle};
use keel_core::{Coordinates, Delivery, DeliveryInfo, Error, RawRecord, Result, Undecodable, wire};
use tokio::sync::mpsc;

/// Longest re-delivery delay honoured.
const MAX_NACK_DELAY: Duration = Duration::from_secs(24 * 3600);

/// A record as fetched.
pub(crate) struct Fetched {
    /// The engine's contiguous position of the record in its partition
    /// (the Kafka offset; on JetStream an ordinal per assignment).
    pub(crate) offset: i64,
    /// Where the broker stored it, as users see it (Kafka offset or
    /// JetStream stream sequence).
    pub(crate) position: u64,
    pub(crate) key: Option<Bytes>,
    pub(crate) headers: Vec<(String, Bytes)>,
    pub(crate) payload: Bytes,
}

struct Buffered {
    key: Bytes,
    position: u64,
    record: RawRecord,
}

/// Acked ranges a partition keeps before merging the oldest across their
/// gap (see [`PartitionState::forget_old_gaps`]).
const KEPT_ACKED_RANGES: usize = 256;

#[derive(Default)]
struct PartitionState {
    /// Bumped on every assignment: tokens of earlier ones are stale.
    generation: u64,
    /// No new deliveries: the partition is being revoked.
    revoking: bool,
    /// While revoking, the offset below which its records still run (see
    /// [`PartitionState::fill_line`]); `None`: none do.
    fill_below: Option<i64>,
    /// While filling, until when a delayed retry is waited for rather than
    /// ending the line: half the revocation's wait, leaving the rest for
    /// the retry's handler (see [`PartitionState::fill_line`]).
    fill_until: Option<Instant>,
    /// Events whose retry this fill waits for: once each, so a key that
    /// keeps failing ends the line at its second failure.
    fill_waited: HashSet<i64>,
    /// Unacked records by offset (dispatched or not).
    records: BTreeMap<i64, Buffered>,
    queues: HashMap<Bytes, VecDeque<i64>>,
    ready: BTreeSet<i64>,
    /// Deliveries out (queued for a handler or running).
    in_flight: usize,
    /// Of those, the ones a handler began: what a revocation waits for.
    running: usize,
    attempts: HashMap<i64, u32>,
    retry_at: HashMap<i64, Instant>,
    /// One past the highest offset fetched.
    fetched_end: Option<i64>,
    /// Acked offsets of this assignment as merged `start → end` ranges
    /// (contiguous offsets collapse into one): tells a re-sent record from
    /// one never seen.
    acked: BTreeMap<i64, i64>,
    /// The last position committed (or found committed).
    committed: Option<i64>,
    /// The position committed before `committed`: what the group falls
    /// back to when the commit of `committed` fails (the broker still
    /// holds an earlier one, so the window must not move on from it).
    committed_before: Option<i64>,
}

impl PartitionState {
    /// Whether the delivery `t` is of this assignment and may still run
    /// (the partition is not on its way out).
    fn owns(&self, t: &TokenRef) -> bool {
        self.generation == t.generation && (!self.revoking || self.fills(t.offset))
    }

    /// Whether `offset` still runs on a revoking partition: it lies below
    /// an event already settled (see [`PartitionState::fill_line`]).
    fn fills(&self, offset: i64) -> bool {
        self.fill_below.is_some_and(|line| offset < line)
    }

    /// Where a graceful revocation stops running this partition's events
    /// (`None`: at once). Events of different keys settle out of order, so
    /// events are often settled above the lowest one still open, where the
    /// commit stops; given back as they are, the next owner would handle
    /// those settled events again. So the events below the highest one
    /// settled or running (`running_end`: one past the highest a handler
    /// began; it settles before the commit) run here first (the handlers of
    /// the partition's other keys, and the key's next events as its earlier
    /// ones settle), and the commit then lies above every event this member
    /// handled. A record waiting for a delayed retry due within the first
    /// half of the fill's time runs when due, as a slow handler would
    /// (once: see `settle_locked`); the line stops below one due later,
    /// whose key cannot move on in time.
    fn fill_line(&self, running_end: Option<i64>) -> Option<i64> {
        let &position = self.records.keys().next()?;
        let settled_end = self.acked.values().next_back().copied();
        let end = settled_end.max(running_end)?;
        // The key's head: a late record of the key may sit before the
        // retried one, and only the tick makes it ready.
        let line = self
            .retry_at
            .iter()
            .filter(|&(_, &at)| !self.due_in_fill(at))
            .map(|(&waiting, _)| self.head_of(waiting))
            .min()
            .map_or(end, |waiting| end.min(waiting));
        (line > position).then_some(line)
    }

    /// Whether a retry due `at` comes before this partition's fill ends.
    fn due_in_fill(&self, at: Instant) -> bool {
        self.fill_until.is_some_and(|until| at <= until)
    }

    /// When the next delayed retry below the fill line is due.
    fn next_retry_in_fill(&self) -> Option<Instant> {
        self.retry_at
            .iter()
            .filter(|&(&offset, _)| self.fills(self.head_of(offset)))
            .map(|(_, &at)| at)
            .min()
    }

    /// Whether a revoking partition still has events below its fill line.
    fn filling(&self) -> bool {
        self.fill_below
            .is_some_and(|line| self.records.range(..line).next().is_some())
    }

    /// Where the group may resume: the lowest unacked offset, else one past
    /// the highest fetched.
    fn position(&self) -> Option<i64> {
        self.records.keys().next().copied().or(self.fetched_end)
    }

    fn acked(&mut self, offset: i64) {
        self.mark_acked(offset);
        self.attempts.remove(&offset);
        self.retry_at.remove(&offset);
        let removed = self.records.remove(&offset);
        self.forget_old_gaps();
        if let Some(b) = removed
            && let Some(queue) = self.queues.get_mut(&b.key)
        {
            // Usually the head; a late record of the key may sit before it.
            if let Some(at) = queue.iter().position(|&o| o == offset) {
                queue.remove(at);
            }
            match queue.front() {
                Some(&next) => {
                    if !self.retry_at.contains_key(&next) {
                        self.ready.insert(next);
                    }
                }
                None => {
                    self.queues.remove(&b.key);
                }
            }
        }
    }

    /// Adds `offset` to the acked ranges, merging neighbours.
    fn mark_acked(&mut self, offset: i64) {
        let mut start = offset;
        let mut end = offset.saturating_add(1);
        if let Some((&s, &e)) = self.acked.range(..=offset).next_back()
            && e >= offset
        {
            if e > offset {
                return; // already inside a range
            }
            start = s;
        }
        if let Some(&e) = self.acked.get(&end) {
            self.acked.remove(&end);
            end = e;
        }
        self.acked.insert(start, end);
    }

    /// Bounds the acked ranges where offsets have gaps (a compacted topic,
    /// transaction markers), which never merge: past
    /// [`KEPT_ACKED_RANGES`], the lowest two ranges become one when both
    /// lie wholly below the position (the gap between them long passed).
    fn forget_old_gaps(&mut self) {
        if self.acked.len() <= KEPT_ACKED_RANGES {
            return;
        }
        let Some(position) = self.position() else {
            return;
        };
        let mut lowest = self.acked.iter();
        let (Some((&first, _)), Some((&second, &end))) = (lowest.next(), lowest.next()) else {
            return;
        };
        if end <= position {
            self.acked.remove(&second);
            self.acked.insert(first, end);
        }
    }

    /// The head of `offset`'s key queue: what goes out when `offset` is
    /// due again (a late record of the key may sit before it).
    fn head_of(&self, offset: i64) -> i64 {
        self.records
            .get(&offset)
            .and_then(|b| self.queues.get(&b.key))
            .and_then(|queue| queue.front().copied())
            .unwrap_or(offset)
    }

    /// Whether `offset` was already received in this assignment.
    fn seen(&self, offset: i64) -> bool {
        self.records.contains_key(&offset)
            || self
                .acked
                .range(..=offset)
                .next_back()
                .is_some_and(|(_, &end)| offset < end)
    }
}

struct TokenRef {
    partition: i32,
    offset: i64,
    generation: u64,
    /// A handler began it ([`Settle::begin`]).
    begun: bool,
}

/// Limits of one member.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Most outstanding deliveries across partitions.
    pub(crate) max_in_flight: usize,
    /// Most offsets a partition may run ahead of its commit position.
    pub(crate) partition_window: i64,
}

pub(crate) struct State {
    topic: String,
    group: String,
    limits: Limits,
    partitions: HashMap<i32, PartitionState>,
    tokens: HashMap<u64, TokenRef>,
    next_token: u64,
    in_flight: usize,
    next_generation: u64,
    /// Rotates which partition dispatch starts from.
    next_first: usize,
    /// A graceful leave began ([`Engine::start_leaving`]): partitions
    /// assigned from now on are not dispatched.
    leaving: bool,
    /// [`Engine::stop_dispatching`] was called: nothing fills any more.
    stopped: bool,
    tx: mpsc::UnboundedSender<Result<Delivery>>,
    /// Told `(partition, offset, outcome)` of every settlement (JetStream
    /// acks and naks each message on the server).
    on_ack: Option<mpsc::UnboundedSender<(i32, i64, Outcome)>>,
}

/// A delivery decided under the lock and sent after it is released.
pub(crate) type Outgoing = Vec<Result<Delivery>>;

/// The shared engine.
pub(crate) struct Engine {
    me: Weak<Engine>,
    state: Mutex<State>,
    /// Signalled whenever a delivery settles (revocation waits on it).
    settled: Condvar,
}

impl Engine {
    pub(crate) fn new(
        topic: String,
        group: String,
        limits: Limits,
        tx: mpsc::UnboundedSender<Result<Delivery>>,
    ) -> Arc<Engine> {
        Arc::new_cyclic(|me| Engine {
            me: me.clone(),
            state: Mutex::new(State {
                topic,
                group,
                limits,
                partitions: HashMap::new(),
                tokens: HashMap::new(),
                next_token: 0,
                in_flight: 0,
                next_generation: 0,
                next_first: 0,
                leaving: false,
                stopped: false,
                tx,
                on_ack: None,
            }),
            settled: Condvar::new(),
        })
    }

    /// Reports every settlement to `hook` as `(partition, offset, outcome)`.
    pub(crate) fn on_ack(&self, hook: mpsc::UnboundedSender<(i32, i64, Outcome)>) {
        self.lock().on_ack = Some(hook);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settler(&self) -> Arc<dyn Settle> {
        match self.me.upgrade() {
            Some(me) => me,
            None => Arc::new(Detached),
        }
    }

    /// Starts owning `partitions`; `committed` is each one's resume position.
    pub(crate) fn assign(&self, partitions: &[(i32, Option<i64>)]) {
        let mut state = self.lock();
        // Taken while leaving: kept untouched for the next owner (handled
        // here, they too would settle out of order above their commit).
        let revoking = state.leaving || state.stopped;
        for &(p, committed) in partitions {
            state.next_generation += 1;
            let generation = state.next_generation;
            state.partitions.insert(
                p,
                PartitionState {
                    generation,
                    committed,
                    revoking,
                    ..PartitionState::default()
                },
            );
        }
    }

    /// Stops dispatching every partition (a graceful leave's start),
    /// including what [`Engine::start_revoking`] with `fill` still let run.
    pub(crate) fn stop_dispatching(&self) {
        let mut state = self.lock();
        state.stopped = true;
        for ps in state.partitions.values_mut() {
            ps.revoking = true;
            ps.fill_below = None;
            ps.fill_until = None;
        }
        drop(state);
        // A revocation waiting for its fill waits no more.
        self.settled.notify_all();
    }

    /// Starts a graceful leave that first runs what its commit would
    /// otherwise hand on, for at most `fill_for`: every partition revokes
    /// with a fill (see [`Engine::start_revoking`]), and partitions assigned
    /// meanwhile are not dispatched.
    pub(crate) fn start_leaving(&self, fill_for: Duration) {
        let owned = {
            let mut state = self.lock();
            state.leaving = true;
            let mut owned: Vec<i32> = state.partitions.keys().copied().collect();
            owned.sort_unstable();
            owned
        };
        self.start_revoking(&owned, Some(fill_for));
    }

    /// Whether no revoking partition has events left below its fill line
    /// (what a graceful leave runs before it commits).
    pub(crate) fn filled(&self) -> bool {
        !self.lock().partitions.values().any(PartitionState::filling)
    }

    /// Stops dispatching `partitions` (the first half of a revocation).
    /// Their deliveries that no handler began (queued behind busy
    /// handlers) are given back at once, uncommitted, as nacks that count
    /// no attempt (the on-ack hook hears them: JetStream keeps them
    /// pending, below the floor the next owner resumes from): they go to
    /// the next owner, and a revocation waits only for the handlers
    /// running. The room they held goes to the member's other partitions.
    ///
    /// With a `fill` time (Kafka, whose commit is one offset per
    /// partition: the revocation's drain timeout), the events below each
    /// partition's highest settled one still run first
    /// ([`PartitionState::fill_line`]), and [`Engine::wait_drained`] waits
    /// for them too: the commit then hands on no event this member handled.
    pub(crate) fn start_revoking(&self, partitions: &[i32], fill: Option<Duration>) {
        let mut state = self.lock();
        // Once dispatching stopped (the member's stream is going), nothing
        // would run what a fill lets through.
        let fill = fill.filter(|_| !state.stopped);
        let now = Instant::now();
        // Past the clock's range (never, with validated settings): retries
        // are not waited for.
        let fill_until = fill.and_then(|f| now.checked_add(f / 2));
        let mut running_end: HashMap<i32, i64> = HashMap::new();
        for t in state.tokens.values().filter(|t| fill.is_some() && t.begun) {
            let end = running_end
                .entry(t.partition)
                .or_insert(t.offset.saturating_add(1));
            *end = (*end).max(t.offset.saturating_add(1));
        }
        for p in partitions {
            if let Some(ps) = state.partitions.get_mut(p) {
                // A partition already given up (lost, its fill timed out,
                // taken while leaving) stays given up: a leave that follows
                // does not run it again before the revocation removes it.
                let given_up = ps.revoking && ps.fill_below.is_none();
                ps.revoking = true;
                ps.fill_until = fill_until.filter(|_| !given_up);
                ps.fill_below = if fill.is_some() && !given_up {
                    ps.fill_line(running_end.get(p).copied())
                } else {
                    None
                };
                ps.fill_waited = match ps.fill_below {
                    Some(_) => ps
                        .retry_at
                        .iter()
                        .filter(|&(_, &at)| ps.due_in_fill(at))
                        .map(|(&offset, _)| offset)
                        .collect(),
                    None => HashSet::new(),
                };
            }
        }
        let State {
            tokens,
            partitions: owned,
            ..
        } = &*state;
        let queued: Vec<u64> = tokens
            .iter()
            .filter(|(_, t)| {
                !t.begun
                    && partitions.contains(&t.partition)
                    && !owned.get(&t.partition).is_some_and(|ps| ps.fills(t.offset))
            })
            .map(|(&token, _)| token)
            .collect();
        for token in queued {
            if let Some(t) = state.tokens.remove(&token) {
                // Not an attempt: it never ran.
                settle_locked(
                    &mut state,
                    &t,
                    Outcome::Backoff {
                        delay: Duration::ZERO,
                    },
                );
            }
        }
        let out = self.dispatch(&mut state);
        drop(state);
        self.settled.notify_all();
        self.send(out);
    }

    /// Waits until no handler runs a delivery of `partitions` and none has
    /// events left below its fill line, or `timeout` passes; returns
    /// whether they drained. Other deliveries no handler began (queued
    /// behind busy handlers) are not waited for: they can no longer begin
    /// ([`Settle::begin`] refuses a revoking partition's) and go to the
    /// next owner uncommitted.
    pub(crate) fn wait_drained(&self, partitions: &[i32], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let busy = partitions.iter().any(|p| {
                state
                    .partitions
                    .get(p)
                    .is_some_and(|ps| ps.running > 0 || ps.filling())
            });
            if !busy {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                // Nothing more begins there: what did not run in time goes
                // to the next owner, not beside it.
                for p in partitions {
                    if let Some(ps) = state.partitions.get_mut(p) {
                        ps.fill_below = None;
                        ps.fill_until = None;
                    }
                }
                return false;
            }
            // A delayed retry below a fill line: the poll thread that ticks
            // is the one waiting here (in its rebalance callback), so the
            // retry is made ready here when due.
            let retry = partitions
                .iter()
                .filter_map(|p| state.partitions.get(p))
                .filter_map(PartitionState::next_retry_in_fill)
                .min();
            if retry.is_some_and(|at| at <= now) {
                drop(state);
                let out = self.tick();
                self.send(out);
                state = self.lock();
                continue;
            }
            let wake = retry.map_or(deadline, |at| at.min(deadline));
            state = match self.settled.wait_timeout(state, wake - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Forgets `partitions` (the second half of a revocation): their
    /// outstanding deliveries become stale and their buffered records are
    /// dropped; returns their final commit positions (all of them).
    pub(crate) fn remove(&self, partitions: &[i32]) -> Vec<(i32, i64)> {
        let mut state = self.lock();
        let mut positions = Vec::new();
        for p in partitions {
            if let Some(ps) = state.partitions.remove(p) {
                state.in_flight = state.in_flight.saturating_sub(ps.in_flight);
                // Committed again even when unchanged: an async commit of
                // the same value may still fail.
                if let Some(pos) = ps.position() {
                    positions.push((*p, pos));
                }
            }
        }
        state
            .tokens
            .retain(|_, t| !partitions.contains(&t.partition));
        positions
    }

    /// Buffers a fetched record and dispatches what can go out.
    pub(crate) fn ingest(&self, partition: i32, record: Fetched) -> Outgoing {
        let mut state = self.lock();
        let State {
            partitions, topic, ..
        } = &mut *state;
        let Some(ps) = partitions.get_mut(&partition) else {
            // Not (or no longer) ours: a stale fetch from before a revocation.
            return Vec::new();
        };
        if ps.seen(record.offset) {
            return Vec::new();
        }
        let key = record.key.clone().unwrap_or_default();
        if ps.fetched_end.is_none()
            && let Some(start) = ps.committed
            && record.offset > start
        {
            // Legitimate after compaction, retention or transaction markers;
            // otherwise the broker skipped records (tansu's `memory://`
            // storage answers a fetch from inside a record batch with the
            // next batch).
            tracing::warn!(
                topic = %topic,
                partition,
                asked = start,
                got = record.offset,
                "the first record fetched after assignment lies past the start position; offsets in between were not delivered"
            );
        } else if let Some(end) = ps.fetched_end
            && record.offset > end
        {
            // Usual on a compacted topic or past transaction markers (hence
            // debug); otherwise the broker skipped records.
            tracing::debug!(
                topic = %topic,
                partition,
                expected = end,
                got = record.offset,
                "offsets skipped between two fetched records"
            );
        }
        let late = ps.fetched_end.is_some_and(|end| record.offset < end);
        if late {
            // An offset below what was already fetched but never seen (a
            // fetch that raced a rebalance): take it, in offset order, so
            // the position cannot move past it.
            tracing::warn!(
                partition,
                offset = record.offset,
                "record arrived out of offset order"
            );
        }
        ps.fetched_end = Some(
            ps.fetched_end
                .map_or(record.offset.saturating_add(1), |end| {
                    end.max(record.offset.saturating_add(1))
                }),
        );
        let queue = ps.queues.entry(key.clone()).or_default();
        let at = queue.partition_point(|&o| o < record.offset);
        queue.insert(at, record.offset);
        if at == 0 {
            // The new head of its key goes first — unless the previous head
            // is already out (or waiting for its retry): one delivery per key
            // at a time, so it follows when that one is acked.
            let previous_waits = match queue.get(1) {
                Some(previous) => ps.ready.remove(previous),
                None => true,
            };
            if previous_waits {
                ps.ready.insert(record.offset);
            } else if queue.iter().skip(1).any(|o| {
                ps.retry_at
                    .get(o)
                    .is_some_and(|&at| ps.fill_until.is_none_or(|until| at > until))
            }) && ps.fills(record.offset)
            {
                // It waits for its key's retry, due after the fill ends:
                // the line ends before it.
                ps.fill_below = Some(record.offset);
            }
        }
        ps.records.insert(
            record.offset,
            Buffered {
                key,
                position: record.position,
                record: RawRecord {
                    key: record.key,
                    headers: record.headers,
                    payload: record.payload,
                },
            },
        );
        self.dispatch(&mut state)
    }

    /// Makes due delayed re-deliveries ready and dispatches.
    pub(crate) fn tick(&self) -> Outgoing {
        let mut state = self.lock();
        let now = Instant::now();
        for ps in state.partitions.values_mut() {
            let due: Vec<i64> = ps
                .retry_at
                .iter()
                .filter(|&(_, &at)| at <= now)
                .map(|(&offset, _)| offset)
                .collect();
            for offset in due {
                ps.retry_at.remove(&offset);
                let head = ps.head_of(offset);
                ps.ready.insert(head);
            }
        }
        self.dispatch(&mut state)
    }

    /// How many more records `partition` may take before it holds a full
    /// window of unacked ones (the poll thread stops reading its queue
    /// then); 0 for a partition not owned.
    pub(crate) fn room(&self, partition: i32) -> usize {
        let state = self.lock();
        let window = state.limits.partition_window.max(1) as usize;
        state
            .partitions
            .get(&partition)
            .map_or(0, |ps| window.saturating_sub(ps.records.len()))
    }

    /// Commit positions that moved since the last commit; marks them
    /// committed.
    pub(crate) fn positions_to_commit(&self) -> Vec<(i32, i64)> {
        let mut state = self.lock();
        let mut out = Vec::new();
        for (&p, ps) in state.partitions.iter_mut() {
            if let Some(pos) = ps.position()
                && Some(pos) != ps.committed
            {
                ps.committed_before = ps.committed;
                ps.committed = Some(pos);
                out.push((p, pos));
            }
        }
        out
    }

    /// Every owned partition's position (for the final commit).
    pub(crate) fn all_positions(&self) -> Vec<(i32, i64)> {
        let state = self.lock();
        let mut out: Vec<(i32, i64)> = state
            .partitions
            .iter()
            .filter_map(|(&p, ps)| ps.position().map(|pos| (p, pos)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Whether some partition's position ran half a window or more past its
    /// last commit: committing now keeps dispatch (bounded by that commit)
    /// flowing without waiting for the commit interval.
    pub(crate) fn commit_due(&self) -> bool {
        let state = self.lock();
        let half = (state.limits.partition_window / 2).max(1);
        state
            .partitions
            .values()
            .any(|ps| match (ps.position(), ps.committed) {
                (Some(position), Some(committed)) => position - committed >= half,
                _ => false,
            })
    }

    /// A commit of `position` did not land: the next one sends it again,
    /// and until one lands the window counts from the commit sent before
    /// it, so however many commits fail in a row, dispatch runs at most a
    /// window past that one (two while an earlier commit is still in flight
    /// and fails too) instead of without bound.
    pub(crate) fn commit_failed(&self, partition: i32, position: i64) {
        let mut state = self.lock();
        if let Some(ps) = state.partitions.get_mut(&partition)
            && ps.committed == Some(position)
        {
            ps.committed = ps.committed_before.filter(|&before| before < position);
        }
    }

    /// One line per partition for debug logs: buffered, out, paused,
    /// position, committed.
    pub(crate) fn summary(&self) -> String {
        let state = self.lock();
        let mut parts: Vec<String> = state
            .partitions
            .iter()
            .map(|(p, ps)| {
                format!(
                    "p{p}: buffered {} out {} running {} ready {} revoking {} position {:?} committed {:?}",
                    ps.records.len(),
                    ps.in_flight,
                    ps.running,
                    ps.ready.len(),
                    ps.revoking,
                    ps.position(),
                    ps.committed
                )
            })
            .collect();
        parts.sort();
        format!("in flight {}; {}", state.in_flight, parts.join("; "))
    }

    /// Owned partitions, sorted.
    pub(crate) fn assignment(&self) -> Vec<u32> {
        let state = self.lock();
        let mut owned: Vec<u32> = state.partitions.keys().map(|p| *p as u32).collect();
        owned.sort_unstable();
        owned
    }

    /// Outstanding deliveries of this member.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    fn dispatch(&self, state: &mut State) -> Outgoing {
        let mut out = Vec::new();
        // The member's stream is gone (it left or was dropped): deliveries
        // would only bounce back as nacks.
        if state.tx.is_closed() {
            return out;
        }
        let settler = self.settler();
        let State {
            topic,
            group,
            limits,
            partitions,
            tokens,
            next_token,
            in_flight,
            next_first,
            ..
        } = state;
        let mut order: Vec<i32> = partitions.keys().copied().collect();
        order.sort_unstable();
        if !order.is_empty() {
            let first = *next_first % order.len();
            order.rotate_left(first);
            *next_first = next_first.wrapping_add(1);
        }
        for p in order {
            let Some(ps) = partitions.get_mut(&p) else {
                continue;
            };
            if ps.revoking && ps.fill_below.is_none() {
                continue;
            }
            let Some(position) = ps.position() else {
                continue;
            };
            // The window counts from the last commit sent.
            let base = ps.committed.map_or(position, |c| c.min(position));
            while *in_flight < limits.max_in_flight {
                let Some(&offset) = ps.ready.first() else {
                    break;
                };
                // Below a fill line, the window no longer applies: those
                // events were inside one when they came (a commit that
                // failed since may have moved the window's base back).
                if !ps.fills(offset)
                    && (ps.revoking || offset >= base.saturating_add(limits.partition_window))
                {
                    break;
                }
                ps.ready.remove(&offset);
                let Some(buffered) = ps.records.get(&offset) else {
                    continue;
                };
                let attempt = ps.attempts.entry(offset).or_insert(0);
                *attempt += 1;
                *next_token += 1;
                let token = *next_token;
                tokens.insert(
                    token,
                    TokenRef {
                        partition: p,
                        offset,
                        generation: ps.generation,
                        begun: false,
                    },
                );
                ps.in_flight += 1;
                *in_flight += 1;
                let info = DeliveryInfo {
                    coordinates: Coordinates {
                        topic: topic.clone(),
                        partition: p as u32,
                        position: buffered.position,
                    },
                    group: group.clone(),
                    attempt: *attempt,
                };
                let r = &buffered.record;
                let headers = || r.headers.iter().map(|(k, v)| (k.as_str(), v.as_ref()));
                let decoded =
                    wire::decode(r.key.as_deref(), headers(), r.payload.clone()).map_err(|e| {
                        match wire::key_from_headers(headers()) {
                            // No key because its header is broken (NATS): that
                            // is the fault to name, not a missing key.
                            Err(bad_key) if r.key.is_none() => bad_key,
                            _ => e,
                        }
                    });
                out.push(match decoded {
                    Ok(envelope) => Ok(Delivery::new(envelope, info, settler.clone(), token)),
                    Err(e) => Err(Error::Undecodable(Box::new(Undecodable::new(
                        r.clone(),
                        info,
                        e.to_string(),
                        settler.clone(),
                        token,
                    )))),
                });
            }
        }
        out
    }

    /// Sends dispatched deliveries to the member's stream (outside the lock).
    pub(crate) fn send(&self, out: Outgoing) {
        let tx = self.lock().tx.clone();
        for item in out {
            // A closed stream means the member is leaving; the delivery's
            // nack on drop finds its token stale or removed.
            let _ = tx.send(item);
        }
    }
}

impl Settle for Engine {
    fn settle(&self, token: u64, outcome: Outcome) {
        let out = {
            let mut state = self.lock();
            let Some(t) = state.tokens.remove(&token) else {
                return;
            };
            if !settle_locked(&mut state, &t, outcome) {
                return;
            }
            self.dispatch(&mut state)
        };
        self.settled.notify_all();
        self.send(out);
    }

    fn is_owned(&self, token: u64) -> bool {
        self.token_holds(token, PartitionState::owns)
    }

    fn begin(&self, token: u64) -> bool {
        let mut state = self.lock();
        let State {
            tokens, partitions, ..
        } = &mut *state;
        let Some(t) = tokens.get_mut(&token) else {
            return false;
        };
        let Some(ps) = partitions.get_mut(&t.partition).filter(|ps| ps.owns(t)) else {
            return false;
        };
        if !t.begun {
            t.begun = true;
            ps.running += 1;
        }
        true
    }

    fn is_current(&self, token: u64) -> bool {
        // A token outlives neither its settlement nor its partition's
        // removal; the generation tells it from a partition assigned
        // again over one still held.
        self.token_holds(token, |ps, t| ps.generation == t.generation)
    }
}

impl Engine {
    /// Whether `token` is outstanding and its partition passes `check`.
    fn token_holds(
        &self,
        token: u64,
        check: impl FnOnce(&PartitionState, &TokenRef) -> bool,
    ) -> bool {
        let state = self.lock();
        state.tokens.get(&token).is_some_and(|t| {
            state
                .partitions
                .get(&t.partition)
                .is_some_and(|ps| check(ps, t))
        })
    }
}

/// Records `outcome` for the delivery `t` (its token already taken out of
/// the state); `false` when it belongs to an assignment gone since.
fn settle_locked(state: &mut State, t: &TokenRef, outcome: Outcome) -> bool {
    let hook = state.on_ack.clone();
    let Some(ps) = state.partitions.get_mut(&t.partition) else {
        return false;
    };
    if ps.generation != t.generation {
        return false;
    }
    ps.in_flight = ps.in_flight.saturating_sub(1);
    if t.begun {
        ps.running = ps.running.saturating_sub(1);
    }
    let (outcome, counted) = outcome.counted();
    if !counted && let Some(attempt) = ps.attempts.get_mut(&t.offset) {
        // The re-delivery gets this delivery's number again.
        *attempt = attempt.saturating_sub(1);
    }
    if let Some(hook) = hook {
        let _ = hook.send((t.partition, t.offset, outcome));
    }
    match outcome {
        Outcome::Ack | Outcome::Term => ps.acked(t.offset),
        Outcome::Nack { delay } if delay.is_zero() => {
            let head = ps.head_of(t.offset);
            ps.ready.insert(head);
        }
        Outcome::Nack { delay } | Outcome::Backoff { delay } => {
            let now = Instant::now();
            let at = now.checked_add(delay.min(MAX_NACK_DELAY)).unwrap_or(now);
            ps.retry_at.insert(t.offset, at);
            // Its key waits for the delay: a revocation no longer runs what
            // lies above it (see `PartitionState::fill_line`) — unless the
            // retry is due in time, it is the event's first failure in this
            // fill, and something this member handled lies above its key
            // (otherwise waiting only delays the revocation).
            let head = ps.head_of(t.offset);
            if ps.fills(head) {
                let handled_above = || {
                    ps.acked.values().next_back().is_some_and(|&end| end > head)
                        || state.tokens.values().any(|o| {
                            o.begun
                                && o.partition == t.partition
                                && o.generation == ps.generation
                                && o.offset > head
                        })
                };
                let wait =
                    ps.due_in_fill(at) && !ps.fill_waited.contains(&t.offset) && handled_above();
                if wait {
                    ps.fill_waited.insert(t.offset);
                } else {
                    ps.fill_below = Some(head);
                }
            }
        }
    }
    state.in_flight = state.in_flight.saturating_sub(1);
    true
}

/// Settles nothing: for deliveries outliving their engine.
struct Detached;

impl Settle for Detached {
    fn settle(&self, _token: u64, _outcome: Outcome) {}
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use keel_core::Envelope;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    use super::*;

    /// How long the tests' revocations may fill.
    const FILL_TIME: Duration = Duration::from_secs(30);
    const FILL: Option<Duration> = Some(FILL_TIME);

    fn record(offset: i64, key: &str) -> Fetched {
        let event = Envelope::new("t", key, format!("{key}@{offset}"));
        let headers = wire::encode_headers(&event)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect();
        Fetched {
            offset,
            position: offset as u64,
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            headers,
            payload: event.payload().clone(),
        }
    }

    fn engine(
        max_in_flight: usize,
        window: i64,
    ) -> (Arc<Engine>, UnboundedReceiverStream<Result<Delivery>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let e = Engine::new(
            "t".into(),
            "g".into(),
            Limits {
                max_in_flight,
                partition_window: window,
            },
            tx,
        );
        (e, UnboundedReceiverStream::new(rx))
    }

    #[tokio::test]
    async fn keys_run_in_parallel_and_each_in_order() {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, None)]);
        for (o, k) in [(10, "a"), (11, "b"), (12, "a"), (13, "c")] {
            let out = e.ingest(0, record(o, k));
            e.send(out);
        }
        // a@10, b@11, c@13 go out at once; a@12 waits for a@10.
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(rx.next().await.unwrap().unwrap());
        }
        let offsets: Vec<u64> = got.iter().map(|d| d.info().coordinates.position).collect();
        assert_eq!(offsets, vec![10, 11, 13]);
        assert_eq!(e.positions_to_commit(), vec![(0, 10)]);
        got[1].ack(); // b@11
        assert!(
            e.positions_to_commit().is_empty(),
            "a@10 still holds the position"
        );
        got[0].ack(); // a@10 → a@12 goes out
        let next = rx.next().await.unwrap().unwrap();
        assert_eq!(next.info().coordinates.position, 12);
        assert_eq!(e.positions_to_commit(), vec![(0, 12)]);
        next.ack();
        got[2].ack();
        assert_eq!(e.positions_to_commit(), vec![(0, 14)]);
    }

    #[test]
    fn acked_offsets_merge_into_ranges() {
        let mut ps = PartitionState::default();
        for o in [5, 7, 6, 9, 10, 8] {
            ps.mark_acked(o);
        }
        assert_eq!(
            ps.acked.iter().map(|(s, e)| (*s, *e)).collect::<Vec<_>>(),
            vec![(5, 11)]
        );
        assert!(ps.seen(5) && ps.seen(10) && !ps.seen(11) && !ps.seen(4));
        ps.mark_acked(20);
        assert_eq!(ps.acked.len(), 2);
    }

    #[tokio::test]
    async fn a_late_record_below_what_was_fetched_still_holds_the_position() {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, None)]);
        let out = e.ingest(0, record(20, "a"));
        e.send(out);
        let d20 = rx.next().await.unwrap().unwrap();
        // 10 was never seen: it is taken, goes before 20's successors of
        // its key, and the position cannot pass it.
        let out = e.ingest(0, record(10, "b"));
        e.send(out);
        let d10 = rx.next().await.unwrap().unwrap();
        assert_eq!(d10.info().coordinates.position, 10);
        d20.ack();
        assert_eq!(e.positions_to_commit(), vec![(0, 10)]);
        d10.ack();
        assert_eq!(e.positions_to_commit(), vec![(0, 21)]);
        // Re-sent records are recognised.
        assert!(e.ingest(0, record(10, "b")).is_empty());
        assert!(e.ingest(0, record(20, "a")).is_empty());
    }

    #[tokio::test]
    async fn a_late_record_of_a_key_with_one_out_waits_for_it() {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, None)]);
        let out = e.ingest(0, record(20, "a"));
        e.send(out);
        let d20 = rx.next().await.unwrap().unwrap();
        // a@10 arrives late while a@20 is out: one delivery per key at a
        // time, so it waits and goes out once a@20 is acked.
        assert!(e.ingest(0, record(10, "a")).is_empty());
        d20.ack();
        let d10 = rx.next().await.unwrap().unwrap();
        assert_eq!(d10.info().coordinates.position, 10);
        d10.ack();
        assert_eq!(e.positions_to_commit(), vec![(0, 21)]);
        assert_eq!(e.in_flight(), 0);
    }

    #[tokio::test]
    async fn the_window_bounds_how_far_a_partition_runs_ahead() {
        let (e, mut rx) = engine(100, 2);
        e.assign(&[(0, None)]);
        for o in 0..5 {
            let out = e.ingest(0, record(o, &format!("k{o}")));
            e.send(out);
        }
        let first = rx.next().await.unwrap().unwrap();
        let second = rx.next().await.unwrap().unwrap();
        assert_eq!(e.in_flight(), 2, "offsets 2.. wait for the window");
        assert_eq!(e.room(0), 0, "a full window stops intake");
        first.ack();
        assert_eq!(
            rx.next()
                .await
                .unwrap()
                .unwrap()
                .info()
                .coordinates
                .position,
            2
        );
        drop(second);
    }

    /// The last commit sent bounds dispatch: a crash then re-delivers at
    /// most the window, however much was acked since that commit.
    #[tokio::test]
    async fn the_window_counts_from_the_last_commit() {
        let (e, mut rx) = engine(100, 4);
        e.assign(&[(0, Some(0))]);
        for o in 0..10 {
            let out = e.ingest(0, record(o, &format!("k{o}")));
            e.send(out);
        }
        for expected in 0..4 {
            let d = rx.next().await.unwrap().unwrap();
            assert_eq!(d.info().coordinates.position, expected);
            d.ack();
        }
        assert_eq!(e.in_flight(), 0, "acked, but nothing committed yet");
        assert!(e.commit_due(), "half the window used past the commit");
        assert_eq!(e.positions_to_commit(), vec![(0, 4)]);
        assert!(!e.commit_due());
        let out = e.tick();
        e.send(out);
        let mut next = Vec::new();
        for _ in 0..4 {
            next.push(rx.next().await.unwrap().unwrap());
        }
        let positions: Vec<u64> = next.iter().map(|d| d.info().coordinates.position).collect();
        assert_eq!(positions, vec![4, 5, 6, 7]);
        assert_eq!(e.in_flight(), 4, "offset 8 waits for the next commit");
        drop(next);
    }

    #[tokio::test]
    async fn revoked_partitions_drain_and_late_settles_are_ignored() {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, Some(5)), (1, None)]);
        let out = e.ingest(0, record(5, "a"));
        e.send(out);
        let d = rx.next().await.unwrap().unwrap();
        assert!(d.begin());
        e.start_revoking(&[0], None);
        assert!(!e.wait_drained(&[0], Duration::from_millis(20)));
        d.ack();
        assert!(e.wait_drained(&[0], Duration::from_millis(20)));
        assert_eq!(e.remove(&[0]), vec![(0, 6)]);
        assert_eq!(e.assignment(), vec![1]);
        // A record of a partition we no longer own is ignored.
        assert!(e.ingest(0, record(6, "a")).is_empty());
    }

    #[tokio::test]
    async fn a_revocation_waits_for_running_handlers_not_for_queued_deliveries() {
        let (e, mut rx) = engine(10, 100);
        let (hook, mut heard) = mpsc::unbounded_channel();
        e.on_ack(hook);
        e.assign(&[(0, Some(0))]);
        for (offset, key) in [(0, "a"), (1, "b"), (2, "c")] {
            let out = e.ingest(0, record(offset, key));
            e.send(out);
        }
        let running = rx.next().await.unwrap().unwrap();
        assert!(running.begin());
        assert!(running.begin(), "beginning twice counts once");
        assert!(e.summary().contains("running 1"), "{}", e.summary());
        // Offsets 1 and 2 are out too, queued behind busy handlers.
        let queued = rx.next().await.unwrap().unwrap();
        assert_eq!(e.in_flight(), 3);
        e.start_revoking(&[0], None);
        assert_eq!(e.in_flight(), 1, "the queued ones are given back at once");
        let given_back = Outcome::Nack {
            delay: Duration::ZERO,
        };
        let mut told = vec![heard.try_recv().unwrap(), heard.try_recv().unwrap()];
        told.sort_by_key(|&(_, offset, _)| offset);
        assert_eq!(
            told,
            vec![(0, 1, given_back), (0, 2, given_back)],
            "the transport hears them (JetStream keeps them pending for the next owner)"
        );
        assert!(
            !queued.begin(),
            "a queued delivery of a revoking partition cannot begin"
        );
        assert!(
            !e.wait_drained(&[0], Duration::from_millis(20)),
            "the running handler is waited for"
        );
        running.ack();
        assert!(
            e.wait_drained(&[0], Duration::from_millis(20)),
            "queued deliveries are not waited for"
        );
        // What the running handler acked is committed; the queued ones go
        // to the next owner.
        assert_eq!(e.remove(&[0]), vec![(0, 1)]);
        drop(queued);
    }

    /// Partition 0 holding `records`, with the first `N` dispatched
    /// taken and begun.
    async fn begun<const N: usize>(
        records: &[(i64, &str)],
    ) -> (
        Arc<Engine>,
        UnboundedReceiverStream<Result<Delivery>>,
        [Delivery; N],
    ) {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, Some(0))]);
        for &(offset, key) in records {
            let out = e.ingest(0, record(offset, key));
            e.send(out);
        }
        let mut out = Vec::new();
        for _ in 0..N {
            let d = rx.next().await.unwrap().unwrap();
            assert!(d.begin());
            out.push(d);
        }
        let Ok(out) = <[Delivery; N]>::try_from(out) else {
            unreachable!("N deliveries taken")
        };
        (e, rx, out)
    }

    /// Partition 0 holding a's 0 and 1 and b's 2, with a's 0 and b's 2
    /// out and begun (a's 1 waits for a's 0).
    async fn a0_a1_b2_running() -> (
        Arc<Engine>,
        UnboundedReceiverStream<Result<Delivery>>,
        Delivery,
        Delivery,
    ) {
        let (e, rx, [a0, b2]) = begun(&[(0, "a"), (1, "a"), (2, "b")]).await;
        (e, rx, a0, b2)
    }

    #[tokio::test]
    async fn a_filling_revocation_runs_what_lies_below_a_settled_event_first() {
        // Offsets 0 (a), 1 (b), 2 (a), 3 (c), 4 (d): b settles first, so
        // the commit would stop at 0 and hand b on to be handled again.
        let (e, mut rx) = engine(3, 100);
        e.assign(&[(0, Some(0))]);
        for (offset, key) in [(0, "a"), (1, "b"), (2, "a"), (3, "c"), (4, "d")] {
            let out = e.ingest(0, record(offset, key));
            e.send(out);
        }
        let mut out = Vec::new();
        for _ in 0..3 {
            out.push(rx.next().await.unwrap().unwrap());
        }
        let [a0, b1, c3] = <[Delivery; 3]>::try_from(out).ok().unwrap();
        assert_eq!(c3.info().coordinates.position, 3);
        assert!(a0.begin() && b1.begin());
        b1.ack();
        // The fill line is 2, past b: a's 0 runs on, c's 3 (queued, not
        // begun) is given back, and 2 and 4 are not needed.
        e.start_revoking(&[0], FILL);
        assert!(!c3.begin(), "above the fill line: given back");
        assert!(
            !e.wait_drained(&[0], Duration::from_millis(20)),
            "a's 0 is waited for"
        );
        a0.ack();
        assert!(
            e.wait_drained(&[0], Duration::from_millis(20)),
            "nothing is left below the line"
        );
        assert_eq!(e.remove(&[0]), vec![(0, 2)], "the commit lies above b");

        // A key that fails below the line lowers it: nothing above the
        // failed event is waited for.
        let (e, _rx, a0, b2) = a0_a1_b2_running().await;
        b2.ack();
        e.start_revoking(&[0], FILL);
        a0.nack_with_delay(Duration::from_secs(60));
        assert!(e.wait_drained(&[0], Duration::from_millis(20)));
        assert!(e.filled());
        assert_eq!(e.remove(&[0]), vec![(0, 0)]);

        // A key's next event becomes ready while filling: it runs too.
        let (e, mut rx, a0, b2) = a0_a1_b2_running().await;
        b2.ack();
        e.start_revoking(&[0], FILL);
        assert!(!e.filled());
        a0.ack();
        let a1 = rx.next().await.unwrap().unwrap();
        assert_eq!(a1.info().coordinates.position, 1);
        assert!(a1.begin(), "below the fill line: it still runs");
        assert!(!e.wait_drained(&[0], Duration::from_millis(20)));
        a1.ack();
        assert!(e.wait_drained(&[0], Duration::from_millis(20)));
        assert!(e.filled());
        assert_eq!(e.remove(&[0]), vec![(0, 3)]);

        // What is running counts as settled: it settles before the commit.
        let (e, mut rx, a0, b2) = a0_a1_b2_running().await;
        e.start_revoking(&[0], FILL);
        a0.ack();
        b2.ack();
        let a1 = rx.next().await.unwrap().unwrap();
        assert!(a1.begin(), "below the running b: it still runs");
        a1.ack();
        assert!(e.wait_drained(&[0], Duration::from_millis(20)));
        assert_eq!(e.remove(&[0]), vec![(0, 3)]);
    }

    /// Waits for partition 0 to drain on a thread of its own, as Kafka's
    /// poll thread does in its rebalance callback.
    fn drain_in_thread(e: &Arc<Engine>, timeout: Duration) -> std::thread::JoinHandle<bool> {
        let e = e.clone();
        std::thread::spawn(move || e.wait_drained(&[0], timeout))
    }

    #[tokio::test]
    async fn a_retry_due_before_the_fill_ends_runs_and_keeps_the_line() {
        // a's 0 fails with a short delay after b's 2 settled: the retry is
        // due long before the fill ends, so the revocation waits for it
        // (made ready by the waiting thread itself: in Kafka it is the poll
        // thread, in its rebalance callback) and for a's 1 after it, and
        // the commit lies above b instead of handing b on.
        let (e, mut rx, a0, b2) = a0_a1_b2_running().await;
        b2.ack();
        e.start_revoking(&[0], FILL);
        a0.nack_with_delay(Duration::from_millis(50));
        let waiting = drain_in_thread(&e, Duration::from_secs(30));
        let a0 = tokio::time::timeout(Duration::from_secs(5), rx.next())
            .await
            .expect("a's 0 is retried while the revocation waits")
            .unwrap()
            .unwrap();
        assert_eq!((a0.info().coordinates.position, a0.info().attempt), (0, 2));
        assert!(a0.begin(), "below the line: it runs");
        a0.ack();
        let a1 = rx.next().await.unwrap().unwrap();
        assert_eq!(a1.info().coordinates.position, 1);
        assert!(a1.begin());
        assert!(!waiting.is_finished(), "a's 1 is waited for");
        a1.ack();
        assert!(waiting.join().unwrap(), "drained once a's 1 settled");
        assert_eq!(e.remove(&[0]), vec![(0, 3)], "the commit lies above b");

        // Due after the fill ends: the line ends at a's 0 as before.
        let (e, _rx, a0, b2) = a0_a1_b2_running().await;
        b2.ack();
        e.start_revoking(&[0], Some(Duration::from_millis(100)));
        a0.nack_with_delay(Duration::from_secs(1));
        assert!(e.wait_drained(&[0], Duration::from_millis(20)));
        assert_eq!(e.remove(&[0]), vec![(0, 0)]);

        // Waited for once: failing again, even with a short delay, ends the
        // line (a key that keeps failing does not hold the revocation).
        let (e, mut rx, a0, b2) = a0_a1_b2_running().await;
        b2.ack();
        e.start_revoking(&[0], FILL);
        a0.nack_with_delay(Duration::from_millis(20));
        let waiting = drain_in_thread(&e, Duration::from_secs(30));
        let a0 = rx.next().await.unwrap().unwrap();
        assert!(a0.begin());
        a0.nack_with_delay(Duration::from_millis(20));
        assert!(waiting.join().unwrap(), "nothing is left below the line");
        assert_eq!(e.remove(&[0]), vec![(0, 0)]);

        // Due past half the fill's time (the rest is the handler's): not
        // waited for.
        let (e, _rx, a0, b2) = a0_a1_b2_running().await;
        b2.ack();
        e.start_revoking(&[0], Some(Duration::from_secs(2)));
        a0.nack_with_delay(Duration::from_millis(1500));
        assert!(e.wait_drained(&[0], Duration::from_millis(20)));
        assert_eq!(e.remove(&[0]), vec![(0, 0)]);

        // Nothing handled above the failed key (the line stood only for
        // its own running event): waiting would only delay the revocation.
        let (e, _rx, [a0]) = begun::<1>(&[(0, "a"), (1, "a")]).await;
        e.start_revoking(&[0], FILL);
        assert!(!e.filled(), "a's 0 runs below the line");
        a0.nack_with_delay(Duration::from_millis(20));
        assert!(e.filled());
        assert!(e.wait_drained(&[0], Duration::from_millis(20)));
        assert_eq!(e.remove(&[0]), vec![(0, 0)]);

        // Already waiting when the revocation starts: the same.
        let (e, mut rx, a0, b2) = a0_a1_b2_running().await;
        b2.ack();
        a0.nack_with_delay(Duration::from_millis(50));
        e.start_revoking(&[0], FILL);
        assert!(!e.filled(), "a's 0 and 1 lie below the line");
        let waiting = drain_in_thread(&e, Duration::from_secs(30));
        for offset in [0, 1] {
            let d = rx.next().await.unwrap().unwrap();
            assert_eq!(d.info().coordinates.position, offset);
            assert!(d.begin());
            d.ack();
        }
        assert!(waiting.join().unwrap());
        assert_eq!(e.remove(&[0]), vec![(0, 3)]);
    }

    #[tokio::test]
    async fn a_leave_fills_what_it_owned_and_stops_filling_when_dispatch_stops() {
        let (e, _rx, a0, b2) = a0_a1_b2_running().await;
        b2.ack();
        e.start_leaving(FILL_TIME);
        assert!(!e.filled(), "a's 0 and 1 lie below b");
        // Taken while leaving: left for the next owner.
        e.assign(&[(1, Some(0))]);
        assert!(e.ingest(1, record(0, "c")).is_empty(), "not dispatched");
        // Dispatch stops (the stream is going): the fill ends, a revocation
        // waiting for it waits only for what runs, and a later revocation
        // does not fill again.
        let waiting = drain_in_thread(&e, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
        e.stop_dispatching();
        a0.ack();
        assert!(waiting.join().unwrap(), "drained once a's 0 settled");
        assert!(e.filled());
        e.start_revoking(&[0], FILL);
        assert!(e.filled(), "no fill after dispatch stopped");
        assert_eq!(e.remove(&[0]), vec![(0, 1)]);
    }

    #[tokio::test]
    async fn a_fill_that_times_out_lets_nothing_more_begin() {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, Some(0))]);
        for (offset, key) in [(0, "a"), (1, "b"), (2, "c")] {
            let out = e.ingest(0, record(offset, key));
            e.send(out);
        }
        let a0 = rx.next().await.unwrap().unwrap();
        let b1 = rx.next().await.unwrap().unwrap();
        let c2 = rx.next().await.unwrap().unwrap();
        assert!(a0.begin() && c2.begin());
        c2.ack();
        e.start_revoking(&[0], FILL);
        assert!(b1.is_owned(), "below c: it would still run");
        assert!(!e.wait_drained(&[0], Duration::from_millis(20)));
        assert!(
            !b1.begin(),
            "the revocation gave up: it goes to the next owner"
        );
        drop(a0);
    }

    #[tokio::test]
    async fn a_partition_given_up_is_not_filled_again_by_a_leave() {
        // Its fill timed out: a leave that starts before the revocation
        // removes it does not run its events again.
        let (e, _rx, a0, b2) = a0_a1_b2_running().await;
        b2.ack();
        e.start_revoking(&[0], FILL);
        assert!(!e.wait_drained(&[0], Duration::from_millis(20)));
        e.start_leaving(FILL_TIME);
        assert!(e.filled(), "given up: nothing fills");
        a0.ack();
        assert!(e.filled(), "a's 1 is not dispatched");
        assert_eq!(e.remove(&[0]), vec![(0, 1)]);

        // Lost: the same.
        let (e, _rx, a0, b2) = a0_a1_b2_running().await;
        b2.ack();
        e.start_revoking(&[0], None);
        e.start_leaving(FILL_TIME);
        a0.ack();
        assert!(e.filled());
        assert_eq!(e.remove(&[0]), vec![(0, 1)]);
    }

    #[tokio::test]
    async fn a_fill_runs_below_its_line_after_a_commit_failed() {
        let (e, mut rx) = engine(10, 4);
        e.assign(&[(0, Some(0))]);
        let mut out = Vec::new();
        for (offset, key) in [(0, "a"), (1, "b"), (2, "c"), (3, "d")] {
            out.extend(e.ingest(0, record(offset, key)));
        }
        e.send(out);
        for _ in 0..4 {
            assert!(rx.next().await.unwrap().unwrap().ack());
        }
        // The commit of 4 lets 4..8 out, then fails: the window counts
        // from 0 again.
        assert_eq!(e.positions_to_commit(), vec![(0, 4)]);
        let mut out = Vec::new();
        for (offset, key) in [(4, "e"), (5, "f"), (6, "e"), (7, "h")] {
            out.extend(e.ingest(0, record(offset, key)));
        }
        e.send(out);
        e.commit_failed(0, 4);
        let e4 = rx.next().await.unwrap().unwrap();
        let f5 = rx.next().await.unwrap().unwrap();
        let h7 = rx.next().await.unwrap().unwrap();
        assert!(e4.begin() && f5.begin());
        h7.ack();
        // The line is 8 (past h): e's 6 runs once e's 4 settled, though
        // it lies past the window of the commit the broker holds.
        e.start_revoking(&[0], FILL);
        e4.ack();
        f5.ack();
        let e6 = tokio::time::timeout(Duration::from_secs(5), rx.next())
            .await
            .expect("e's 6 lies below the line: dispatched")
            .unwrap()
            .unwrap();
        assert_eq!(e6.info().coordinates.position, 6);
        assert!(e6.begin());
        e6.ack();
        assert!(e.wait_drained(&[0], Duration::from_millis(20)));
        assert_eq!(e.remove(&[0]), vec![(0, 8)]);
    }

    /// Partition 0 holding b's 0, a's 3 and c's 4, all begun; a's 3
    /// failed and waits a minute for its retry.
    async fn b0_c4_running_a3_waiting() -> (
        Arc<Engine>,
        UnboundedReceiverStream<Result<Delivery>>,
        Delivery,
        Delivery,
    ) {
        let (e, rx, [b0, a3, c4]) = begun(&[(0, "b"), (3, "a"), (4, "c")]).await;
        a3.nack_with_delay(Duration::from_secs(60));
        (e, rx, b0, c4)
    }

    #[tokio::test]
    async fn a_late_record_behind_a_retry_ends_the_fill_before_it() {
        let (e, _rx, b0, c4) = b0_c4_running_a3_waiting().await;
        c4.ack();
        e.start_revoking(&[0], FILL);
        // a's 2 arrives during the fill, below its line (3), and can only
        // follow a's retry: the fill does not wait for it. Nor for a's 1,
        // which then arrives before a's 2.
        assert!(e.ingest(0, record(2, "a")).is_empty());
        assert!(e.ingest(0, record(1, "a")).is_empty());
        b0.ack();
        assert!(
            e.wait_drained(&[0], Duration::from_millis(50)),
            "nothing below a's new head is left"
        );
        assert_eq!(e.remove(&[0]), vec![(0, 1)]);
    }

    #[tokio::test]
    async fn a_retry_ends_the_fill_at_its_keys_head() {
        // a's 3 fails and waits; a late record of a (offset 1) arrives
        // before it, so a's head is 1: the fill stops there, not at 3.
        let (e, _rx, b0, c4) = b0_c4_running_a3_waiting().await;
        let out = e.ingest(0, record(1, "a"));
        assert!(out.is_empty(), "a waits for its retry");
        c4.ack();
        e.start_revoking(&[0], FILL);
        b0.ack();
        assert!(
            e.wait_drained(&[0], Duration::from_millis(50)),
            "nothing below a's head is left"
        );
        assert_eq!(e.remove(&[0]), vec![(0, 1)]);
    }

    #[tokio::test]
    async fn a_late_record_of_a_key_waiting_for_its_retry_goes_first() {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, None)]);
        let out = e.ingest(0, record(10, "a"));
        e.send(out);
        let first = rx.next().await.unwrap().unwrap();
        first.nack_with_delay(Duration::from_millis(1));
        // a@5 turns up late while a@10 waits for its retry: it waits too.
        assert!(e.ingest(0, record(5, "a")).is_empty());
        tokio::time::sleep(Duration::from_millis(5)).await;
        let out = e.tick();
        let offsets: Vec<u64> = out
            .iter()
            .map(|d| d.as_ref().unwrap().info().coordinates.position)
            .collect();
        assert_eq!(
            offsets,
            vec![5],
            "one of the key at a time, the lower first"
        );
        e.send(out);
        let late = rx.next().await.unwrap().unwrap();
        late.ack();
        let again = rx.next().await.unwrap().unwrap();
        assert_eq!(again.info().coordinates.position, 10);
        assert_eq!(again.info().attempt, 2);
    }

    #[tokio::test]
    async fn failing_commits_keep_the_window_at_the_last_commit_that_may_have_landed() {
        let (e, mut rx) = engine(100, 4);
        e.assign(&[(0, Some(0))]);
        let mut out = Vec::new();
        for offset in 0..20 {
            out.extend(e.ingest(0, record(offset, &format!("k{offset}"))));
        }
        e.send(out);
        let mut dispatched = 0;
        for _ in 0..5 {
            while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(20), rx.next()).await
            {
                dispatched += 1;
                assert!(d.unwrap().ack());
            }
            for (p, pos) in e.positions_to_commit() {
                e.commit_failed(p, pos);
            }
            let out = e.tick();
            e.send(out);
        }
        assert_eq!(dispatched, 4, "one window past the commit the broker holds");
        // The commit lands: the window moves on.
        assert_eq!(e.positions_to_commit(), vec![(0, 4)]);
        let out = e.tick();
        assert_eq!(out.len(), 4);
    }

    #[tokio::test]
    async fn offsets_with_gaps_keep_a_bounded_record_of_what_was_acked() {
        // Every other offset, as on a compacted topic.
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, Some(0))]);
        for i in 0..2_000 {
            let out = e.ingest(0, record(2 * i, "k"));
            e.send(out);
            let d = rx.next().await.unwrap().unwrap();
            assert!(d.ack());
            e.positions_to_commit();
        }
        assert_eq!(e.all_positions(), vec![(0, 3_999)]);
        let ranges = e.lock().partitions[&0].acked.len();
        assert!(ranges <= KEPT_ACKED_RANGES + 1, "{ranges} ranges kept");
        // Re-sent records are still told apart from new ones.
        assert!(e.ingest(0, record(3_998, "k")).is_empty());
        assert!(e.ingest(0, record(10, "k")).is_empty());
        assert_eq!(e.ingest(0, record(4_000, "k")).len(), 1);
    }

    #[tokio::test]
    async fn a_backoff_redelivers_with_the_same_attempt_number_and_a_nack_counts() {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, None)]);
        let out = e.ingest(0, record(0, "a"));
        e.send(out);
        let mut attempts = Vec::new();
        for step in ["backoff", "backoff", "nack", "backoff", "ack"] {
            let d = rx.next().await.unwrap().unwrap();
            attempts.push(d.info().attempt);
            match step {
                "backoff" => assert!(d.backoff(Duration::ZERO)),
                "nack" => assert!(d.nack_with_delay(Duration::ZERO)),
                _ => assert!(d.ack()),
            }
            let out = e.tick();
            e.send(out);
        }
        assert_eq!(attempts, vec![1, 1, 1, 2, 2]);
    }

    #[tokio::test]
    async fn a_late_record_of_a_key_goes_before_its_nacked_head() {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, None)]);
        let out = e.ingest(0, record(10, "a"));
        e.send(out);
        let first = rx.next().await.unwrap().unwrap();
        assert!(e.ingest(0, record(5, "a")).is_empty(), "a@10 is out");
        first.nack();
        let late = rx.next().await.unwrap().unwrap();
        assert_eq!(late.info().coordinates.position, 5);
        late.ack();
        let again = rx.next().await.unwrap().unwrap();
        assert_eq!(again.info().coordinates.position, 10);
    }

    #[tokio::test]
    async fn deliveries_of_a_revoked_or_reassigned_partition_are_not_owned() {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, None), (1, None)]);
        for p in [0, 1] {
            let out = e.ingest(p, record(0, "a"));
            e.send(out);
        }
        let (d0, d1) = (
            rx.next().await.unwrap().unwrap(),
            rx.next().await.unwrap().unwrap(),
        );
        let (d0, d1) = if d0.info().coordinates.partition == 0 {
            (d0, d1)
        } else {
            (d1, d0)
        };
        assert!(d0.is_owned() && d1.is_owned());
        e.start_revoking(&[0], None);
        assert!(
            !d0.is_owned(),
            "a partition being revoked is on its way out"
        );
        assert!(d1.is_owned());
        e.remove(&[0]);
        e.assign(&[(0, None)]);
        assert!(
            !d0.is_owned(),
            "a delivery of an earlier assignment stays stale"
        );
        let out = e.ingest(0, record(0, "a"));
        e.send(out);
        let again = rx.next().await.unwrap().unwrap();
        assert!(again.is_owned());
        e.stop_dispatching();
        assert!(
            !again.is_owned() && !d1.is_owned(),
            "a leave gives everything up"
        );
    }

    #[tokio::test]
    async fn a_delivery_stays_current_through_a_revocation_until_it_is_settled_or_its_partition_goes()
     {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, None), (1, None)]);
        for (p, offset, k) in [(0, 0, "a"), (0, 1, "b"), (1, 0, "a")] {
            let out = e.ingest(p, record(offset, k));
            e.send(out);
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(rx.next().await.unwrap().unwrap());
        }
        got.sort_by_key(|d| {
            (
                d.info().coordinates.partition,
                d.info().coordinates.position,
            )
        });
        let [a0, b0, a1]: [Delivery; 3] = got.try_into().unwrap();
        let (a0_now, b0_now, a1_now) = (a0.ownership(), b0.ownership(), a1.ownership());
        assert!(a0.begin() && b0.begin());
        e.start_revoking(&[0], None);
        assert!(
            a0_now.is_current() && b0_now.is_current(),
            "a revocation waits for its begun handlers: they are not stopped"
        );
        b0.ack();
        assert!(!b0_now.is_current(), "settled");
        // The partition is lost and assigned again before its handler ends.
        e.remove(&[0]);
        e.assign(&[(0, None)]);
        assert!(
            !a0_now.is_current(),
            "a delivery of an earlier assignment of its partition is stale"
        );
        let out = e.ingest(0, record(0, "a"));
        e.send(out);
        let again = rx.next().await.unwrap().unwrap();
        assert!(again.ownership().is_current());
        assert!(a1_now.is_current(), "another partition is untouched");
    }

    #[tokio::test]
    async fn undecodable_records_are_settleable_errors() {
        let (e, mut rx) = engine(10, 100);
        e.assign(&[(0, None)]);
        let out = e.ingest(
            0,
            Fetched {
                offset: 0,
                position: 0,
                key: None,
                headers: vec![],
                payload: Bytes::from_static(b"junk"),
            },
        );
        e.send(out);
        let Some(Err(Error::Undecodable(u))) = rx.next().await else {
            panic!("expected an undecodable record");
        };
        assert_eq!(u.record().payload, Bytes::from_static(b"junk"));
        assert!(u.reason().contains("no key"), "{}", u.reason());
        u.ack();
        assert_eq!(e.positions_to_commit(), vec![(0, 1)]);
        // A key header that is there but broken (a NATS record) is the
        // fault named, not a missing key.
        let out = e.ingest(
            0,
            Fetched {
                offset: 1,
                position: 1,
                key: None,
                headers: vec![(wire::KEY_BASE64.into(), Bytes::from_static(b"%%%"))],
                payload: Bytes::from_static(b"junk"),
            },
        );
        e.send(out);
        let Some(Err(Error::Undecodable(u))) = rx.next().await else {
            panic!("expected an undecodable record");
        };
        assert!(
            u.reason().contains(wire::KEY_BASE64) && u.reason().contains("not base64"),
            "{}",
            u.reason()
        );
        u.ack();
    }
}
