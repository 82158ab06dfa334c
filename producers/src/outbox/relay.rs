//! [`OutboxRelay`]: publishes committed outbox rows to the broker.
//!
//! Delivery guarantee: at least once. A row is marked published — moved
//! from the outbox to its archive, or deleted when nothing is kept — only
//! after the broker acknowledged it, so a relay killed at any instant
//! loses nothing and re-publishes at most the one batch it had in flight
//! (same event ids: JetStream drops them inside its duplicate window,
//! inboxes drop them everywhere).
//!
//! Completeness: the relay never keeps a cursor. Each batch is the
//! unpublished rows it can see, in id order, so a row whose transaction
//! commits after a later id's is simply found by a later batch — never
//! skipped. Per-key order: a key's rows are published in the order they
//! became visible (commit order) and, among rows visible together, in id
//! order; writers that serialise a key's writes (a lock on the aggregate's
//! row, the usual case) get exactly their commit order. A key lives in one
//! slot and one relay at a time owns a slot ([`super::leases`]).
//!
//! The loop wakes on LISTEN/NOTIFY (enqueues notify at commit), falls back
//! to polling every `poll_interval`, and keeps one batch in flight: memory
//! is bounded by `batch_size` rows and `max_batch_bytes`. On PostgreSQL a
//! batch's mark (its move to the archive) runs alongside the next batch's
//! claim, which leaves its rows out; the next batch is published only once
//! the mark is done, so a crash still re-publishes at most one batch. A
//! broker that refuses or times out makes the relay back off exponentially
//! with jitter. The broker's answer is taken per row
//! ([`Publisher::publish_each`]): the rows it acknowledged are marked even
//! when others of the batch failed or timed out, so a failure re-sends only
//! what it does not have. A row the broker rejects for
//! itself (too large, refused) counts an attempt and is parked with its
//! error after `max_attempts`, and the relay goes on with other keys: the
//! parked row's key stays blocked (its later rows wait) until an operator
//! requeues or discards it ([`super::parked`]). Database errors
//! (a restart, a killed connection) are retried the same way; the pool
//! reconnects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use keel_core::{Publisher, Sent};
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until};

use super::error::{OutboxError, Result};
use super::leases::SlotLeases;
use super::postgres::PgRelayStore;
use super::store::{Claimed, ClaimedBatch, Limit, RelayStore};
use super::tables::OutboxTables;

/// How a relay runs. Every field has a default ([`RelayConfig::default`]);
/// [`RelayConfig::validate`] refuses combinations that break a guarantee.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// This relay's name among the outbox's relays (default: host name,
    /// process id and a random suffix). Two live relays must not share it.
    pub relay_id: String,
    /// Rows per batch: the most the relay has in flight, and the most a
    /// crash can re-publish. Default 500.
    pub batch_size: usize,
    /// Bytes of payload and headers per batch: a batch stops short of
    /// `batch_size` rows where the next row would pass this (a row larger
    /// than it alone goes in a batch of its own). With `batch_size` it
    /// bounds the relay's memory. Default 16 MiB.
    pub max_batch_bytes: usize,
    /// Slots the outbox's keys are spread over; relays split the slots.
    /// Every relay of an outbox must use the same number. Default 16.
    pub slots: u32,
    /// How often a relay renews its leases and sees who else is alive.
    /// Default 1 s.
    pub heartbeat: Duration,
    /// How long a silent relay keeps its slots: a killed relay's work is
    /// taken over after about this long. Default 10 s.
    pub session_timeout: Duration,
    /// How long one batch may wait for the broker's acknowledgements.
    /// Default 5 s. Give the publisher an acknowledgement timeout no
    /// longer than this (Kafka: `delivery.timeout.ms`, which `keel relay`
    /// sets to it): a message the client still retries after the relay
    /// gave up on its batch could land after another relay, which took the
    /// slot over, published the key's later rows.
    pub publish_timeout: Duration,
    /// Polling interval when no notification arrives (notifications are
    /// lost while the listening connection is down). Default 1 s.
    pub poll_interval: Duration,
    /// Wake on LISTEN/NOTIFY. Default `true`; without it the relay polls.
    pub listen: bool,
    /// Refusals of a row by the broker before it is parked. Default 5.
    pub max_attempts: u32,
    /// First back-off after a failed batch (doubles up to `backoff_max`,
    /// with jitter). Default 100 ms.
    pub backoff_min: Duration,
    /// Longest back-off. Default 30 s.
    pub backoff_max: Duration,
    /// How long published rows are kept in the outbox's archive
    /// (`<outbox>_archive`, for replay from the outbox). Default 7 days.
    /// It applies to the whole archive, whichever relay purges: give every
    /// relay of an outbox the same. Zero (PostgreSQL) deletes published
    /// rows at once instead of archiving them (no archive row to write: the
    /// relay drains about half again as fast), for services that replay
    /// from the broker's own retention; the SQLite flavour marks them and
    /// purges them at the next round.
    pub retention: Duration,
    /// How often published rows past the retention are purged. Default 60 s.
    pub purge_interval: Duration,
    /// Rows deleted per purge statement (small, to keep locks short).
    /// Default 1,000.
    pub purge_batch: usize,
    /// How often backlog figures are refreshed. Default 5 s.
    pub stats_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            relay_id: default_relay_id(),
            batch_size: 500,
            max_batch_bytes: 16 << 20,
            slots: 16,
            heartbeat: Duration::from_secs(1),
            session_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            listen: true,
            max_attempts: 5,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            retention: Duration::from_secs(7 * 24 * 3600),
            purge_interval: Duration::from_secs(60),
            purge_batch: 1000,
            stats_interval: Duration::from_secs(5),
        }
    }
}

fn default_relay_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".into());
    let suffix: u32 = rand::rng().random();
    format!("{host}-{}-{suffix:08x}", std::process::id())
}

impl RelayConfig {
    /// Refuses settings that are out of range or that would let two relays
    /// publish one key at once.
    pub fn validate(&self) -> Result<()> {
        let fail = |setting: &str, reason: String| Err(OutboxError::config(setting, reason));
        if self.relay_id.is_empty() || self.relay_id.len() > 200 {
            return fail("relay.relay_id", "must be 1 to 200 characters".into());
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return fail(
                "relay.batch_size",
                format!("{} is outside 1..=10000", self.batch_size),
            );
        }
        if !(1024..=1 << 30).contains(&self.max_batch_bytes) {
            return fail(
                "relay.max_batch_bytes",
                format!("{} is outside 1 KiB..=1 GiB", self.max_batch_bytes),
            );
        }
        if !(1..=4096).contains(&self.slots) {
            return fail("relay.slots", format!("{} is outside 1..=4096", self.slots));
        }
        const HOUR: Duration = Duration::from_secs(3600);
        for (setting, value) in [
            ("relay.heartbeat", self.heartbeat),
            ("relay.session_timeout", self.session_timeout),
            ("relay.publish_timeout", self.publish_timeout),
            ("relay.poll_interval", self.poll_interval),
            ("relay.backoff_max", self.backoff_max),
            ("relay.purge_interval", self.purge_interval),
            ("relay.stats_interval", self.stats_interval),
        ] {
            if value > HOUR {
                return fail(setting, format!("{value:?} is more than an hour"));
            }
        }
        if self.retention > Duration::from_secs(10 * 365 * 24 * 3600) {
            return fail("relay.retention", "more than ten years".into());
        }
        if self.max_attempts > 1000 {
            return fail(
                "relay.max_attempts",
                format!("{} is more than 1000", self.max_attempts),
            );
        }
        if self.heartbeat.is_zero() || self.heartbeat * 3 > self.session_timeout {
            return fail(
                "relay.heartbeat",
                format!(
                    "{:?} must be non-zero and at most a third of session_timeout ({:?})",
                    self.heartbeat, self.session_timeout
                ),
            );
        }
        // A batch must end before the leases it runs under stop being
        // trusted (60 % of the session timeout, less one heartbeat).
        if self.publish_timeout.is_zero()
            || self.publish_timeout + self.heartbeat > self.session_timeout.mul_f64(0.6)
        {
            return fail(
                "relay.publish_timeout",
                format!(
                    "{:?} plus heartbeat {:?} must stay under 60 % of session_timeout ({:?})",
                    self.publish_timeout, self.heartbeat, self.session_timeout
                ),
            );
        }
        if self.poll_interval.is_zero() {
            return fail("relay.poll_interval", "must be non-zero".into());
        }
        if self.max_attempts == 0 {
            return fail("relay.max_attempts", "must be at least 1".into());
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return fail(
                "relay.backoff_min",
                format!(
                    "{:?} must be non-zero and at most backoff_max ({:?})",
                    self.backoff_min, self.backoff_max
                ),
            );
        }
        if self.purge_batch == 0 || self.purge_interval.is_zero() || self.stats_interval.is_zero() {
            return fail(
                "relay.purge_batch",
                "purge_batch, purge_interval and stats_interval must be non-zero".into(),
            );
        }
        Ok(())
    }
}

/// What a relay has done and what is waiting, for dashboards and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Unpublished, unparked rows (all slots), at the last refresh.
    pub backlog: u64,
    /// Age of the oldest of them.
    pub oldest_unpublished: Option<Duration>,
    /// Parked rows (all slots), at the last refresh.
    pub parked: u64,
    /// Rows this relay published since it started.
    pub published: u64,
    /// Batches this relay claimed, sent and settled since it started (one
    /// whose database statements failed is counted in `failed_batches`).
    pub batches: u64,
    /// Rows the broker refused (each attempt counts).
    pub failures: u64,
    /// Batches that failed as a whole (broker or database unavailable).
    pub failed_batches: u64,
    /// Rows this relay parked.
    pub parked_by_me: u64,
    /// Slots this relay owns now.
    pub slots: Vec<u32>,
}

/// Publishes an outbox's committed rows through a [`Publisher`].
pub struct OutboxRelay {
    store: Box<dyn RelayStore>,
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
    stats: watch::Sender<RelayStats>,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("outbox", &self.store.label())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl OutboxRelay {
    /// A relay for the PostgreSQL outbox in `tables`; fails on an invalid
    /// `config`.
    pub fn new(
        pool: PgPool,
        tables: OutboxTables,
        publisher: Arc<dyn Publisher>,
        config: RelayConfig,
    ) -> Result<Self> {
        config.validate()?;
        let leases = SlotLeases::new(
            tables.clone(),
            config.relay_id.clone(),
            config.slots,
            config.session_timeout,
        );
        let store = PgRelayStore::new(pool, tables, leases, !config.retention.is_zero());
        Ok(Self::with_store(Box::new(store), publisher, config))
    }

    pub(crate) fn with_store(
        store: Box<dyn RelayStore>,
        publisher: Arc<dyn Publisher>,
        config: RelayConfig,
    ) -> Self {
        describe_metrics();
        OutboxRelay {
            store,
            publisher,
            config,
            stats: watch::Sender::new(RelayStats::default()),
        }
    }

    /// Live figures of this relay, updated while it runs.
    pub fn stats(&self) -> watch::Receiver<RelayStats> {
        self.stats.subscribe()
    }

    /// Runs until `shutdown` resolves, then finishes the batch in flight,
    /// releases its slots and returns. Fails only on a configuration error
    /// found at start (another relay with a different slot count); broker
    /// and database failures are retried.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let config = self.config.clone();
        let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
        loop {
            match self.store.prepare().await {
                Ok(()) => break,
                Err(e) if e.is_retriable() => {
                    tracing::warn!(error = %e, "relay cannot prepare its slots yet; retrying");
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(e) => return Err(e),
            }
        }
        backoff.reset();

        let wake = Arc::new(Notify::new());
        let listener = if config.listen {
            self.store.listen(wake.clone()).map(AbortOnDrop)
        } else {
            None
        };
        let label = self.store.label();
        tracing::info!(relay = %config.relay_id, outbox = %label, "relay started");

        tokio::pin!(shutdown);
        let now = Instant::now();
        let (mut next_heartbeat, mut next_stats) = (now, now);
        let mut next_purge = now + config.purge_interval;
        let mut blocked_until = now;
        let mut topics = TopicBackoff::new(config.backoff_min, config.backoff_max);
        // When the outbox was last vacuumed (and analysed: once at start,
        // for the claim's plan over a backlog), and this relay's published
        // count then.
        let mut vacuuming = self.vacuum(true);
        let (mut vacuumed, mut analysed) = ((now, 0u64), now);
        // The last batch's rows, published, their mark left to the next
        // batch (see `relay_batch`).
        let mut unmarked: Vec<i64> = Vec::new();
        loop {
            let now = Instant::now();
            if !unmarked.is_empty() && now >= next_heartbeat.min(next_stats).min(next_purge) {
                // A heartbeat may give slots away (the next owner must not
                // find their published rows unmarked), and the statistics
                // and purge delay the next claim: mark the last batch first.
                self.mark_left(&mut unmarked, &mut backoff, &mut blocked_until)
                    .await;
            }
            if now >= next_heartbeat {
                if let Err(e) = self.store.heartbeat().await {
                    if !e.is_retriable() && matches!(e, OutboxError::Config { .. }) {
                        tracing::error!(relay = %config.relay_id, error = %e, "relay stops");
                        return Err(e);
                    }
                    tracing::warn!(relay = %config.relay_id, error = %e, "relay heartbeat failed");
                    self.store.lapse_if_expired();
                }
                next_heartbeat = Instant::now() + config.heartbeat;
                let slots = self.store.publishable();
                if !slots.is_empty() && self.store.remaining() < config.publish_timeout {
                    // Held, yet no batch may start: the heartbeat took
                    // longer than the leases' margin over a publish.
                    tracing::warn!(
                        relay = %config.relay_id,
                        trusted_for = ?self.store.remaining(),
                        publish_timeout = ?config.publish_timeout,
                        "relay heartbeat too slow: its leases are trusted for less than a publish, \
                         so nothing is published; check the database's latency, or lower \
                         publish_timeout / raise session_timeout"
                    );
                }
                self.stats.send_modify(|s| s.slots = slots);
            }
            if now >= next_stats {
                self.refresh_stats().await;
                next_stats = Instant::now() + config.stats_interval;
            }
            if now >= next_purge {
                self.purge().await;
                next_purge = Instant::now() + config.purge_interval;
            }

            let mut more = false;
            // A batch starts only while the leases stay trusted for a whole
            // publish timeout: a batch never outlives its slots.
            let slots = self.store.publishable();
            if !slots.is_empty()
                && self.store.remaining() >= config.publish_timeout
                && Instant::now() >= blocked_until
            {
                match self.relay_batch(&slots, &mut topics, &mut unmarked).await {
                    Ok(full) => {
                        backoff.reset();
                        more = full;
                    }
                    Err(e) => blocked_until = self.batch_failed(&mut backoff, &e),
                }
            }
            // Marking leaves dead index entries that every claim walks
            // until a VACUUM removes them: vacuum the (small) outbox as
            // rows go out.
            let published = self.stats.borrow().published;
            if published - vacuumed.1 >= VACUUM_AFTER_ROWS
                && vacuumed.0.elapsed() >= VACUUM_SPACING
                && vacuuming.as_ref().is_none_or(|v| v.0.is_finished())
            {
                let analyze = analysed.elapsed() >= ANALYZE_SPACING;
                vacuuming = self.vacuum(analyze);
                vacuumed = (Instant::now(), published);
                if analyze {
                    analysed = Instant::now();
                }
            }
            if more {
                // A full batch: there is probably more; go on unless asked
                // to stop.
                if futures::poll!(&mut shutdown).is_ready() {
                    break;
                }
                continue;
            }
            if !unmarked.is_empty() {
                // Rows announced meanwhile: claim them while the last
                // batch is marked. Otherwise mark it now, before waiting.
                if wake.notified().now_or_never().is_some() {
                    continue;
                }
                self.mark_left(&mut unmarked, &mut backoff, &mut blocked_until)
                    .await;
            }
            // Backing off: notifications still wake the loop (for
            // heartbeats) but the next poll waits for the back-off.
            let poll_at = (Instant::now() + config.poll_interval).max(blocked_until);
            let wait = next_heartbeat.min(next_stats).min(next_purge).min(poll_at);
            tokio::select! {
                _ = &mut shutdown => break,
                _ = wake.notified() => {}
                _ = sleep_until(wait) => {}
            }
        }
        drop(listener);
        self.mark_left(&mut unmarked, &mut backoff, &mut blocked_until)
            .await;
        if let Err(e) = self.store.leave().await {
            tracing::warn!(relay = %config.relay_id, error = %e, "relay could not release its slots; they expire on their own");
        }
        tracing::info!(relay = %config.relay_id, "relay stopped");
        Ok(())
    }

    /// Claims, publishes and marks one batch of `slots`' rows, skipping
    /// topics that are backing off. `Ok(true)` when more rows are probably
    /// waiting (a full batch, refused rows to try again, or rows the
    /// publisher did not get to send in time while nothing failed).
    ///
    /// A row the broker refuses for itself counts an attempt; the rest of
    /// the batch goes out (the rows sent already are published; those the
    /// publisher did not send go in a second round) —
    /// except later rows of the refused row's key, which wait behind it to
    /// keep the key's order. A
    /// topic that is unavailable (missing, forbidden, timing out) backs off
    /// on its own; other topics keep flowing.
    ///
    /// `unmarked` holds the previous batch's published rows when their mark
    /// was left to this one (see [`RelayStore::pipelines`]): they are
    /// marked while this batch is claimed (without them), and before it is
    /// published, so a crash still re-publishes at most one batch. This
    /// batch's rows are left there in turn when all of them went out.
    async fn relay_batch(
        &self,
        slots: &[u32],
        topics: &mut TopicBackoff,
        unmarked: &mut Vec<i64>,
    ) -> Result<bool> {
        let started = Instant::now();
        let skip = topics.blocked();
        let limit = Limit {
            rows: self.config.batch_size,
            bytes: self.config.max_batch_bytes,
        };
        let marking = std::mem::take(unmarked);
        let (claimed, marked) = tokio::join!(
            self.store.claim(slots, limit, &skip, &marking),
            self.mark(&marking)
        );
        // A failed mark leaves its rows unpublished in the outbox: a later
        // claim takes them again (published twice, at least once).
        marked?;
        let ClaimedBatch {
            rows: claimed,
            more: full,
        } = claimed?;
        if claimed.is_empty() {
            return Ok(false);
        }
        let claimed_after = started.elapsed();
        let mut total = Outcome::default();
        let mut pending: Vec<&Claimed> = claimed.iter().collect();
        // Each refusal takes at least its row out of the next round, so
        // this ends; the bound keeps one batch from living too long.
        for _ in 0..8 {
            if self.store.remaining() < self.config.publish_timeout {
                break;
            }
            let outcome = publish(
                self.publisher.as_ref(),
                &pending,
                self.config.publish_timeout,
            )
            .await;
            let refused_now = !outcome.refused.is_empty();
            total.published.extend(outcome.published);
            total.refused.extend(outcome.refused);
            total.unavailable.extend(outcome.unavailable);
            if !refused_now {
                break;
            }
            let settled = total.settled();
            let waiting_keys: HashSet<(&str, &[u8])> = claimed
                .iter()
                .filter(|row| total.refused.iter().any(|(id, _)| *id == row.id))
                .map(|row| (row.topic.as_str(), row.key()))
                .collect();
            pending.retain(|row| {
                !settled.contains(&row.id)
                    && !total
                        .unavailable
                        .iter()
                        .any(|(topic, _)| *topic == row.topic)
                    && !waiting_keys.contains(&(row.topic.as_str(), row.key()))
            });
            if pending.is_empty() {
                break;
            }
        }
        let published_after = started.elapsed();

        // Marked by the next batch, alongside its claim, when nothing in
        // this one needs the database first (a refusal must be counted
        // before the next claim sees the row).
        let mark_later =
            self.store.pipelines() && total.refused.is_empty() && total.unavailable.is_empty();
        if mark_later {
            *unmarked = total.published.clone();
        } else {
            self.mark(&total.published).await?;
        }
        let mut parked = 0u64;
        for (id, reason) in &total.refused {
            if self
                .store
                .refuse(*id, reason, self.config.max_attempts)
                .await?
            {
                parked += 1;
                let key = claimed
                    .iter()
                    .find(|row| row.id == *id)
                    .map(|row| String::from_utf8_lossy(row.key()).into_owned());
                tracing::error!(
                    row = id, key = ?key, error = %reason,
                    "outbox row parked after {} attempts: it cannot be published; later rows of \
                     its key wait until it is requeued or discarded (keel outbox parked|requeue|discard)",
                    self.config.max_attempts
                );
            } else {
                tracing::warn!(row = id, error = %reason, "an outbox row cannot be published; it goes again");
            }
        }
        for (topic, e) in &total.unavailable {
            let pause = topics.failed(topic);
            tracing::warn!(topic = %topic, error = %e, retry_in = ?pause, "cannot publish to this topic now; its rows wait");
        }
        if !topics.is_empty() {
            let published: HashSet<i64> = total.published.iter().copied().collect();
            // A topic some of whose rows went out while others found it
            // unavailable (a stream at its limits) keeps its back-off.
            let recovered: HashSet<&str> = claimed
                .iter()
                .filter(|row| published.contains(&row.id))
                .map(|row| row.topic.as_str())
                .filter(|topic| !total.unavailable.iter().any(|(t, _)| t == topic))
                .collect();
            for topic in recovered {
                topics.succeeded(topic);
            }
        }
        let (done, failed) = (total.published.len() as u64, total.refused.len() as u64);
        let unavailable = total.unavailable.len() as u64;
        // Rows neither published nor refused on a topic that answered:
        // the publisher ran out of time (a long run of one key on
        // JetStream goes a round trip per row), so they go next, whatever
        // another topic's state (its rows wait out its back-off).
        let unsent = total.left_unsent(&claimed);
        self.stats.send_modify(|s| {
            s.batches += 1;
            s.failures += failed;
            s.parked_by_me += parked;
            s.failed_batches += unavailable;
        });
        metrics::counter!("keel_outbox_publish_failures_total").increment(failed);
        metrics::counter!("keel_outbox_parked_total").increment(parked);
        metrics::counter!("keel_outbox_failed_batches_total").increment(unavailable);
        metrics::histogram!("keel_outbox_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            rows = claimed.len(),
            published = done,
            refused = failed,
            claim = ?claimed_after,
            publish = ?(published_after - claimed_after),
            mark = ?(started.elapsed() - published_after),
            mark_later,
            "relay batch"
        );
        Ok(full || failed > 0 || unsent)
    }

    /// Counts and logs a failed batch (or a failed mark); returns until when
    /// the relay backs off.
    fn batch_failed(&self, backoff: &mut Backoff, e: &OutboxError) -> Instant {
        let pause = backoff.next();
        tracing::warn!(
            relay = %self.config.relay_id, error = %e, retry_in = ?pause,
            "relay batch failed; backing off"
        );
        self.stats.send_modify(|s| s.failed_batches += 1);
        metrics::counter!("keel_outbox_failed_batches_total").increment(1);
        Instant::now() + pause
    }

    /// Marks the rows the last batch left `unmarked` (see `relay_batch`); a
    /// failure counts as a failed batch and backs off (the rows stay in the
    /// outbox and go again, at least once).
    async fn mark_left(
        &self,
        unmarked: &mut Vec<i64>,
        backoff: &mut Backoff,
        blocked_until: &mut Instant,
    ) {
        if let Err(e) = self.mark(&std::mem::take(unmarked)).await {
            *blocked_until = self.batch_failed(backoff, &e);
        }
    }

    /// Marks `ids` published (the broker acknowledged them) and counts them.
    async fn mark(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.store.mark(ids).await?;
        let done = ids.len() as u64;
        self.stats.send_modify(|s| s.published += done);
        metrics::counter!("keel_outbox_published_total").increment(done);
        Ok(())
    }

    /// Starts a VACUUM of the outbox in the background, where the store
    /// has one; dropping the handle stops it.
    fn vacuum(&self, analyze: bool) -> Option<AbortOnDrop> {
        let vacuum = self.store.vacuum(analyze)?;
        Some(AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = vacuum.await {
                tracing::debug!(error = %e, "relay cannot vacuum the outbox");
            }
        })))
    }

    async fn refresh_stats(&self) {
        let figures = match self.store.backlog().await {
            Ok(figures) => figures,
            Err(e) => {
                tracing::debug!(error = %e, "relay cannot read the backlog");
                return;
            }
        };
        metrics::gauge!("keel_outbox_backlog").set(figures.backlog as f64);
        metrics::gauge!("keel_outbox_parked").set(figures.parked as f64);
        metrics::gauge!("keel_outbox_oldest_unpublished_seconds")
            .set(figures.oldest.map_or(0.0, |d| d.as_secs_f64()));
        self.stats.send_modify(|s| {
            s.backlog = figures.backlog;
            s.parked = figures.parked;
            s.oldest_unpublished = figures.oldest;
        });
    }

    /// Deletes published rows past the retention, a small batch at a time.
    async fn purge(&self) {
        let batch = self.config.purge_batch;
        let mut total = 0u64;
        // Bounded per round so a huge backlog of old rows never starves
        // publishing.
        for _ in 0..100 {
            match self.store.purge(self.config.retention, batch).await {
                Ok(done) => {
                    total += done;
                    if done < batch as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay cannot purge published rows");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(
                rows = total,
                "purged published outbox rows past the retention"
            );
        }
    }
}

/// Rows published between two VACUUMs of the outbox, at least.
const VACUUM_AFTER_ROWS: u64 = 5_000;
/// Time between two VACUUMs of the outbox, at least.
const VACUUM_SPACING: Duration = Duration::from_secs(1);
/// Time between two of them that also ANALYZE it, at least.
const ANALYZE_SPACING: Duration = Duration::from_secs(30);

/// HELP texts for the relay's metrics (for the Prometheus exporter).
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("keel_outbox_backlog", "Unpublished, unparked outbox rows");
    describe_gauge!(
        "keel_outbox_parked",
        "Outbox rows parked after max_attempts refusals"
    );
    describe_gauge!(
        "keel_outbox_oldest_unpublished_seconds",
        "Age of the oldest unpublished, unparked outbox row"
    );
    describe_counter!(
        "keel_outbox_published_total",
        "Outbox rows the broker acknowledged"
    );
    describe_counter!(
        "keel_outbox_publish_failures_total",
        "Attempts to publish a row that cannot be published as it is"
    );
    describe_counter!("keel_outbox_parked_total", "Outbox rows this relay parked");
    describe_counter!(
        "keel_outbox_failed_batches_total",
        "Batches (or topics of a batch) the broker or database was unavailable for"
    );
    describe_histogram!(
        "keel_outbox_batch_seconds",
        metrics::Unit::Seconds,
        "Time to claim, publish and mark one batch"
    );
    // Every counter is exported from the start, at 0: `rate()` and alerts
    // on a series' absence then work before the first row is published.
    for counter in [
        "keel_outbox_published_total",
        "keel_outbox_publish_failures_total",
        "keel_outbox_parked_total",
        "keel_outbox_failed_batches_total",
    ] {
        metrics::counter!(counter).increment(0);
    }
}

/// What became of one batch at the broker.
#[derive(Default)]
struct Outcome {
    /// Rows the broker acknowledged.
    published: Vec<i64>,
    /// Rows that cannot be published as they are, with the reason.
    refused: Vec<(i64, String)>,
    /// Topics the broker is unavailable for now (down, timing out, the
    /// topic missing or forbidden), with the error.
    unavailable: Vec<(String, OutboxError)>,
}

impl Outcome {
    /// The rows published or refused.
    fn settled(&self) -> HashSet<i64> {
        self.published
            .iter()
            .copied()
            .chain(self.refused.iter().map(|(id, _)| *id))
            .collect()
    }

    /// Whether some of `rows` were neither published nor refused on a
    /// topic that answered (not one found unavailable).
    fn left_unsent(&self, rows: &[Claimed]) -> bool {
        let settled = self.settled();
        rows.iter().any(|row| {
            !settled.contains(&row.id) && !self.unavailable.iter().any(|(t, _)| *t == row.topic)
        })
    }
}

/// Publishes `rows` — one `publish_each` per topic, all at once, each in
/// id order — within `deadline`, and sorts the rows by outcome: a row the
/// broker acknowledged counts as published even where another row of the
/// batch failed, so a retry re-sends only what the broker does not have.
async fn publish(publisher: &dyn Publisher, rows: &[&Claimed], deadline: Duration) -> Outcome {
    let mut by_topic: BTreeMap<&str, Vec<&Claimed>> = BTreeMap::new();
    for row in rows {
        by_topic.entry(row.topic.as_str()).or_default().push(row);
    }
    let sends = by_topic.iter().map(|(topic, rows)| async move {
        // Rows whose columns do not make an event are refused up front,
        // and later rows of their keys wait behind them (sent neither now
        // nor refused: they stay in line); the rest go out.
        let mut events = Vec::with_capacity(rows.len());
        let mut sent_rows = Vec::with_capacity(rows.len());
        let mut broken = Vec::new();
        let mut broken_keys: HashSet<&[u8]> = HashSet::new();
        for row in rows {
            match &row.event {
                Ok(_) if broken_keys.contains(row.key()) => {}
                Ok(event) => {
                    events.push(event.clone());
                    sent_rows.push(*row);
                }
                Err(reason) => {
                    broken.push((row.id, reason.clone()));
                    broken_keys.insert(row.key());
                }
            }
        }
        let sent = if events.is_empty() {
            Ok(Vec::new())
        } else {
            // The publisher's own bound a little inside the relay's, so
            // what the broker acknowledged comes back before the deadline
            // (the outer timeout remains for a publisher that ignores it).
            let within = deadline.saturating_sub((deadline / 10).min(Duration::from_millis(100)));
            tokio::time::timeout(deadline, publisher.publish_each(topic, events, within)).await
        };
        (*topic, sent_rows, broken, sent)
    });
    let mut outcome = Outcome::default();
    for (topic, rows, broken, sent) in futures::future::join_all(sends).await {
        outcome.refused.extend(broken);
        let Ok(sent) = sent else {
            outcome.unavailable.push((
                topic.to_owned(),
                OutboxError::Event(keel_core::Error::Timeout {
                    operation: format!("publishing {} outbox rows to `{topic}`", rows.len()),
                    after: deadline,
                }),
            ));
            continue;
        };
        settle_topic(topic, &rows, sent, &mut outcome);
    }
    outcome
}

/// Sorts one topic's rows by what `publish_each` reported for them.
///
/// After a row of a key failed, the key's later rows wait behind it, even
/// one the broker acknowledged (its earlier row's acknowledgement failed):
/// it goes again after that row, so the key's order holds as the last copy
/// of each event shows it.
fn settle_topic(topic: &str, rows: &[&Claimed], sent: Vec<Sent>, outcome: &mut Outcome) {
    let mut held: HashSet<&[u8]> = HashSet::new();
    let mut unavailable = None;
    let mut refused = Vec::new();
    // A topic name the broker does not accept: nothing under it can ever
    // be published, so every row of it is refused.
    let mut topic_refused = None;
    if sent.len() != rows.len() {
        // A publisher that broke `publish_each`'s contract: nothing of it
        // is trusted; the topic backs off and its rows go again.
        outcome.unavailable.push((
            topic.to_owned(),
            OutboxError::Event(keel_core::Error::Publish {
                topic: topic.to_owned(),
                event_id: "batch".into(),
                reason: format!(
                    "the publisher reported {} outcomes for {} events",
                    sent.len(),
                    rows.len()
                ),
                retriable: true,
                source: None,
            }),
        ));
        return;
    }
    for (row, sent) in rows.iter().zip(sent) {
        match sent {
            Sent::Stored(_) if !held.contains(row.key()) => outcome.published.push(row.id),
            Sent::Stored(_) => {}
            // Not sent: the key's later rows, should any be stored, wait.
            Sent::NotSent => {
                held.insert(row.key());
            }
            Sent::Failed(e) => {
                held.insert(row.key());
                match e {
                    e if e.is_retriable() => {
                        unavailable.get_or_insert(e);
                    }
                    // The event itself cannot be published (too large, a
                    // bad header): counted against its row.
                    keel_core::Error::Publish { .. } | keel_core::Error::MalformedEvent { .. } => {
                        refused.push((row.id, e.to_string()))
                    }
                    keel_core::Error::Config { .. } => {
                        topic_refused.get_or_insert(e.to_string());
                    }
                    // The topic is missing or forbidden: no row's fault;
                    // its rows wait.
                    e => {
                        unavailable.get_or_insert(e);
                    }
                }
            }
        }
    }
    if let Some(reason) = topic_refused {
        let published: HashSet<i64> = outcome.published.iter().copied().collect();
        refused = rows
            .iter()
            .filter(|row| !published.contains(&row.id))
            .map(|row| (row.id, reason.clone()))
            .collect();
    }
    outcome.refused.extend(refused);
    if let Some(e) = unavailable {
        outcome
            .unavailable
            .push((topic.to_owned(), OutboxError::Event(e)));
    }
}

/// Back-off per topic: a topic the broker is unavailable for waits on its
/// own schedule while the other topics' rows keep flowing.
struct TopicBackoff {
    min: Duration,
    max: Duration,
    topics: HashMap<String, (Backoff, Instant)>,
}

impl TopicBackoff {
    fn new(min: Duration, max: Duration) -> Self {
        TopicBackoff {
            min,
            max,
            topics: HashMap::new(),
        }
    }

    /// Topics whose rows are not to be claimed now.
    fn blocked(&self) -> Vec<String> {
        let now = Instant::now();
        self.topics
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    /// `topic` failed: returns how long it now waits.
    fn failed(&mut self, topic: &str) -> Duration {
        let (min, max) = (self.min, self.max);
        let entry = self
            .topics
            .entry(topic.to_owned())
            .or_insert_with(|| (Backoff::new(min, max), Instant::now()));
        let pause = entry.0.next();
        entry.1 = Instant::now() + pause;
        pause
    }

    /// No topic is backing off (the usual case: nothing to clear).
    fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// `topic` took an event: its back-off starts over.
    fn succeeded(&mut self, topic: &str) {
        self.topics.remove(topic);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Exponential back-off with full jitter in its upper half.
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    fn next(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::rng().random_range(0.5..=1.0);
        base.mul_f64(jitter)
    }

    fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unsafe_timings_are_refused() {
        RelayConfig::default().validate().unwrap();
        let too_slow = RelayConfig {
            publish_timeout: Duration::from_secs(6),
            ..RelayConfig::default()
        };
        let e = too_slow.validate().unwrap_err().to_string();
        assert!(e.contains("relay.publish_timeout"), "{e}");
        let no_batch = RelayConfig {
            batch_size: 0,
            ..RelayConfig::default()
        };
        assert!(
            no_batch
                .validate()
                .unwrap_err()
                .to_string()
                .contains("relay.batch_size")
        );
    }

    fn row(id: i64, key: &str) -> Claimed {
        Claimed {
            id,
            topic: "orders".into(),
            event: Ok(keel_core::Envelope::new("t", key, "p")),
            broken_key: Vec::new(),
        }
    }

    fn stored() -> Sent {
        Sent::Stored(keel_core::Receipt {
            topic: "orders".into(),
            partition: 0,
            position: 0,
            duplicate: false,
        })
    }

    fn failed(retriable: bool) -> Sent {
        Sent::Failed(keel_core::Error::Publish {
            topic: "orders".into(),
            event_id: "e".into(),
            reason: "too large".into(),
            retriable,
            source: None,
        })
    }

    #[test]
    fn acknowledged_rows_count_even_when_others_of_the_batch_fail() {
        let rows = [
            row(1, "a"),
            row(2, "k"),
            row(3, "b"),
            row(4, "k"),
            row(5, "c"),
        ];
        let rows: Vec<&Claimed> = rows.iter().collect();
        // Row 2 refused; row 4 (its key, acknowledged) waits behind it;
        // rows 1 and 3 are published; row 5 was never sent.
        let mut outcome = Outcome::default();
        let sent = vec![stored(), failed(false), stored(), stored(), Sent::NotSent];
        settle_topic("orders", &rows, sent, &mut outcome);
        assert_eq!(outcome.published, [1, 3]);
        assert_eq!(
            outcome
                .refused
                .iter()
                .map(|(id, _)| *id)
                .collect::<Vec<_>>(),
            [2]
        );
        assert!(outcome.unavailable.is_empty());

        // A retriable failure makes the topic unavailable; what the broker
        // acknowledged still counts.
        let mut outcome = Outcome::default();
        let sent = vec![stored(), failed(true), stored(), stored(), stored()];
        settle_topic("orders", &rows, sent, &mut outcome);
        assert_eq!(outcome.published, [1, 3, 5]);
        assert!(outcome.refused.is_empty());
        assert_eq!(outcome.unavailable.len(), 1);

        // A topic name the broker never accepts refuses every row not stored.
        let mut outcome = Outcome::default();
        let sent = vec![
            Sent::Failed(keel_core::Error::config("topic", "bad name")),
            Sent::NotSent,
            Sent::NotSent,
            Sent::NotSent,
            Sent::NotSent,
        ];
        settle_topic("orders", &rows, sent, &mut outcome);
        assert!(outcome.published.is_empty());
        assert_eq!(outcome.refused.len(), 5);

        // A key's row stored after one of its rows was not sent waits too.
        let mut outcome = Outcome::default();
        let sent = vec![stored(), Sent::NotSent, stored(), stored(), stored()];
        settle_topic("orders", &rows, sent, &mut outcome);
        assert_eq!(outcome.published, [1, 3, 5]);

        // Fewer outcomes than rows: nothing is trusted, the topic waits.
        let mut outcome = Outcome::default();
        settle_topic("orders", &rows, vec![stored(), stored()], &mut outcome);
        assert!(outcome.published.is_empty() && outcome.refused.is_empty());
        assert_eq!(outcome.unavailable.len(), 1);
    }

    #[test]
    fn rows_left_unsent_on_a_topic_that_answered_go_next_whatever_other_topics_do() {
        let mut other = row(3, "c");
        other.topic = "payments".into();
        let rows = [row(1, "a"), row(2, "b"), other];
        let mut outcome = Outcome {
            published: vec![1, 3],
            ..Outcome::default()
        };
        assert!(outcome.left_unsent(&rows), "row 2 was not sent");
        outcome.refused.push((2, "too large".into()));
        assert!(!outcome.left_unsent(&rows), "every row settled");
        // Row 2 unsent while another topic is unavailable: it still goes
        // next; rows of the unavailable topic wait for its back-off.
        outcome.refused.clear();
        outcome.published = vec![1];
        outcome.unavailable.push((
            "payments".into(),
            OutboxError::Event(keel_core::Error::config("x", "down")),
        ));
        assert!(outcome.left_unsent(&rows));
        outcome.published = vec![1, 2];
        assert!(
            !outcome.left_unsent(&rows),
            "only the unavailable topic's row is left"
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            b.next();
        }
        let capped = b.next();
        assert!(capped >= Duration::from_millis(500) && capped <= Duration::from_secs(1));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
