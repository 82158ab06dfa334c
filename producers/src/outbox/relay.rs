//! [`OutboxRelay`]: publishes committed outbox rows to the broker.
//!
//! Delivery guarantee: at least once. A row is marked published only after
//! the broker acknowledged it, so a relay killed at any instant loses
//! nothing and re-publishes at most the one batch it had in flight (same
//! event ids: JetStream drops them inside its duplicate window, inboxes
//! drop them everywhere).
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
//! is bounded by `batch_size`. A broker that refuses or times out makes the
//! relay back off exponentially with jitter; a row the broker rejects for
//! itself (too large, refused) counts an attempt and is parked with its
//! error after `max_attempts`, and the relay goes on. Database errors
//! (a restart, a killed connection) are retried the same way; the pool
//! reconnects.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{Envelope, EventId, Key, Publisher, TraceContext};
use rand::Rng;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until};
use uuid::Uuid;

use super::error::{OutboxError, Result};
use super::leases::SlotLeases;
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
    /// Default 5 s.
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
    /// How long published rows are kept (for replay from the outbox).
    /// Default 7 days.
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
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "relay".into());
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
        if !(1..=4096).contains(&self.slots) {
            return fail("relay.slots", format!("{} is outside 1..=4096", self.slots));
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
    pool: PgPool,
    tables: OutboxTables,
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
    stats: watch::Sender<RelayStats>,
    claim: String,
    mark: String,
    fail: String,
    purge: String,
    backlog: String,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("tables", &self.tables)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One claimed row: its id and the event rebuilt from it.
struct Claimed {
    id: i64,
    topic: String,
    event: std::result::Result<Envelope, String>,
}

impl OutboxRelay {
    /// A relay for the outbox in `tables`; fails on an invalid `config`.
    pub fn new(
        pool: PgPool,
        tables: OutboxTables,
        publisher: Arc<dyn Publisher>,
        config: RelayConfig,
    ) -> Result<Self> {
        config.validate()?;
        let outbox = tables.outbox();
        Ok(OutboxRelay {
            claim: format!(
                "SELECT id, topic, event_id, event_type, event_key, occurred_at, source, \
                 correlation_id, causation_id, traceparent, tracestate, headers::text AS headers, \
                 payload FROM {outbox} \
                 WHERE published_at IS NULL AND parked_at IS NULL AND key_hash % $1 = ANY($2) \
                 ORDER BY id LIMIT $3"
            ),
            mark: format!(
                "UPDATE {outbox} SET published_at = clock_timestamp() \
                 WHERE id = ANY($1) AND published_at IS NULL"
            ),
            fail: format!(
                "UPDATE {outbox} SET attempts = attempts + 1, last_error = $2, \
                 parked_at = CASE WHEN attempts + 1 >= $3 THEN clock_timestamp() END \
                 WHERE id = $1 RETURNING parked_at IS NOT NULL"
            ),
            purge: format!(
                "DELETE FROM {outbox} WHERE id IN (SELECT id FROM {outbox} \
                 WHERE published_at < clock_timestamp() - $1 * interval '1 millisecond' \
                 ORDER BY published_at LIMIT $2)"
            ),
            backlog: format!(
                "SELECT count(*) FILTER (WHERE parked_at IS NULL) AS backlog, \
                 count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked, \
                 extract(epoch FROM clock_timestamp() - min(enqueued_at) \
                   FILTER (WHERE parked_at IS NULL))::float8 AS oldest \
                 FROM {outbox} WHERE published_at IS NULL"
            ),
            pool,
            tables,
            publisher,
            config,
            stats: watch::Sender::new(RelayStats::default()),
        })
    }

    /// Live figures of this relay, updated while it runs.
    pub fn stats(&self) -> watch::Receiver<RelayStats> {
        self.stats.subscribe()
    }

    /// Runs until `shutdown` resolves, then finishes the batch in flight,
    /// releases its slots and returns. Fails only on a configuration error
    /// found at start (another relay with a different slot count); broker
    /// and database failures are retried.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let config = &self.config;
        let mut leases = SlotLeases::new(
            self.tables.clone(),
            config.relay_id.clone(),
            config.slots,
            config.session_timeout,
        );
        let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
        loop {
            match leases.prepare(&self.pool).await {
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
        let listener = config.listen.then(|| {
            let task = tokio::spawn(listen(
                self.pool.clone(),
                self.tables.channel(),
                wake.clone(),
            ));
            AbortOnDrop(task)
        });
        tracing::info!(relay = %config.relay_id, outbox = %self.tables.channel(), "relay started");

        tokio::pin!(shutdown);
        let now = Instant::now();
        let (mut next_heartbeat, mut next_stats) = (now, now);
        let mut next_purge = now + config.purge_interval;
        let mut blocked_until = now;
        loop {
            let now = Instant::now();
            if now >= next_heartbeat {
                if let Err(e) = leases.heartbeat(&self.pool).await {
                    tracing::warn!(relay = %config.relay_id, error = %e, "relay heartbeat failed");
                    leases.lapse_if_expired();
                }
                next_heartbeat = Instant::now() + config.heartbeat;
                self.stats.send_modify(|s| s.slots = leases.publishable());
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
            let slots = leases.publishable();
            if !slots.is_empty() && Instant::now() >= blocked_until {
                match self
                    .relay_batch(&slots, leases.slots(), leases.remaining())
                    .await
                {
                    Ok(full) => {
                        backoff.reset();
                        more = full;
                    }
                    Err(e) => {
                        let pause = backoff.next();
                        tracing::warn!(
                            relay = %config.relay_id, error = %e, retry_in = ?pause,
                            "relay batch failed; backing off"
                        );
                        self.stats.send_modify(|s| s.failed_batches += 1);
                        metrics::counter!("keel_outbox_failed_batches_total").increment(1);
                        blocked_until = Instant::now() + pause;
                    }
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
        if let Err(e) = leases.leave(&self.pool).await {
            tracing::warn!(relay = %config.relay_id, error = %e, "relay could not release its slots; they expire on their own");
        }
        tracing::info!(relay = %config.relay_id, "relay stopped");
        Ok(())
    }

    /// Claims, publishes and marks one batch of `slots`' rows. `Ok(true)`
    /// when the batch was full (more are probably waiting).
    async fn relay_batch(&self, slots: &[u32], slot_count: u32, trusted: Duration) -> Result<bool> {
        let started = Instant::now();
        let slot_list: Vec<i32> = slots.iter().map(|&s| s as i32).collect();
        let rows = sqlx::query(&self.claim)
            .bind(slot_count as i32)
            .bind(&slot_list)
            .bind(self.config.batch_size as i64)
            .fetch_all(&self.pool)
            .await?;
        if rows.is_empty() {
            return Ok(false);
        }
        let full = rows.len() == self.config.batch_size;
        let claimed: Vec<Claimed> = rows.iter().map(claimed).collect::<Result<_>>()?;

        // One publish_batch per topic, all at once; each keeps its
        // events' (id) order.
        let mut by_topic: BTreeMap<&str, Vec<&Claimed>> = BTreeMap::new();
        for row in &claimed {
            by_topic.entry(row.topic.as_str()).or_default().push(row);
        }
        let deadline = self.config.publish_timeout.min(trusted);
        let mut published: Vec<i64> = Vec::with_capacity(claimed.len());
        let mut refused: Vec<(i64, String)> = Vec::new();
        let mut unavailable: Option<OutboxError> = None;
        let sends = by_topic.iter().map(|(topic, rows)| async move {
            // Rows whose columns do not make an event are refused up
            // front; the rest go out.
            let mut events = Vec::with_capacity(rows.len());
            let mut ids = Vec::with_capacity(rows.len());
            let mut broken = Vec::new();
            for row in rows {
                match &row.event {
                    Ok(event) => {
                        events.push(event.clone());
                        ids.push((row.id, event.id()));
                    }
                    Err(reason) => broken.push((row.id, reason.clone())),
                }
            }
            let outcome = if events.is_empty() {
                Ok(Ok(Vec::new()))
            } else {
                tokio::time::timeout(deadline, self.publisher.publish_batch(topic, events)).await
            };
            (*topic, ids, broken, outcome)
        });
        for (topic, ids, broken, outcome) in futures::future::join_all(sends).await {
            refused.extend(broken);
            match outcome {
                Ok(Ok(_)) => published.extend(ids.iter().map(|(id, _)| *id)),
                Ok(Err(e)) if e.is_retriable() => unavailable = Some(OutboxError::Event(e)),
                Ok(Err(e)) => {
                    // The broker refused an event for itself: count it
                    // against that row (or every row of the topic when the
                    // error names none); the others go again.
                    let culprit = match &e {
                        keel_core::Error::Publish { event_id, .. } => ids
                            .iter()
                            .find(|(_, id)| id.to_string() == *event_id)
                            .map(|(row, _)| *row),
                        _ => None,
                    };
                    let reason = e.to_string();
                    match culprit {
                        Some(row) => refused.push((row, reason)),
                        None => refused.extend(ids.iter().map(|(row, _)| (*row, reason.clone()))),
                    }
                }
                Err(_) => {
                    unavailable = Some(OutboxError::Event(keel_core::Error::Timeout {
                        operation: format!("publishing {} outbox rows to `{topic}`", ids.len()),
                        after: deadline,
                    }))
                }
            }
        }

        if !published.is_empty() {
            sqlx::query(&self.mark)
                .bind(&published)
                .execute(&self.pool)
                .await?;
        }
        let mut parked = 0u64;
        for (id, reason) in &refused {
            let now_parked: bool = sqlx::query_scalar(&self.fail)
                .bind(id)
                .bind(reason)
                .bind(self.config.max_attempts as i32)
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or(false);
            if now_parked {
                parked += 1;
                tracing::error!(row = id, error = %reason, "outbox row parked: the broker refused it {} times", self.config.max_attempts);
            } else {
                tracing::warn!(row = id, error = %reason, "the broker refused an outbox row; it goes again");
            }
        }
        let (done, failed) = (published.len() as u64, refused.len() as u64);
        self.stats.send_modify(|s| {
            s.published += done;
            s.failures += failed;
            s.parked_by_me += parked;
        });
        metrics::counter!("keel_outbox_published_total").increment(done);
        metrics::counter!("keel_outbox_publish_failures_total").increment(failed);
        metrics::counter!("keel_outbox_parked_total").increment(parked);
        metrics::histogram!("keel_outbox_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(rows = claimed.len(), published = done, refused = failed, elapsed = ?started.elapsed(), "relay batch");
        match unavailable {
            Some(e) => Err(e),
            // Refused rows are retried at once; parked ones are skipped.
            None => Ok(full || !refused.is_empty()),
        }
    }

    async fn refresh_stats(&self) {
        let row = match sqlx::query(&self.backlog).fetch_one(&self.pool).await {
            Ok(row) => row,
            Err(e) => {
                tracing::debug!(error = %e, "relay cannot read the backlog");
                return;
            }
        };
        let backlog: i64 = row.try_get("backlog").unwrap_or_default();
        let parked: i64 = row.try_get("parked").unwrap_or_default();
        let oldest: Option<f64> = row.try_get("oldest").unwrap_or_default();
        let oldest = oldest.map(|s| Duration::from_secs_f64(s.max(0.0)));
        metrics::gauge!("keel_outbox_backlog").set(backlog as f64);
        metrics::gauge!("keel_outbox_parked").set(parked as f64);
        metrics::gauge!("keel_outbox_oldest_unpublished_seconds")
            .set(oldest.map_or(0.0, |d| d.as_secs_f64()));
        self.stats.send_modify(|s| {
            s.backlog = backlog.max(0) as u64;
            s.parked = parked.max(0) as u64;
            s.oldest_unpublished = oldest;
        });
    }

    /// Deletes published rows past the retention, a small batch at a time.
    async fn purge(&self) {
        let retention_ms = i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
        let mut total = 0u64;
        // Bounded per round so a huge backlog of old rows never starves
        // publishing.
        for _ in 0..100 {
            match sqlx::query(&self.purge)
                .bind(retention_ms)
                .bind(self.config.purge_batch as i64)
                .execute(&self.pool)
                .await
            {
                Ok(done) => {
                    total += done.rows_affected();
                    if done.rows_affected() < self.config.purge_batch as u64 {
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

/// Rebuilds the event of one claimed row. A row whose columns do not make
/// an event (edited by hand) is kept as a refusal, not an error.
fn claimed(row: &sqlx::postgres::PgRow) -> Result<Claimed> {
    let id: i64 = row.try_get("id")?;
    let topic: String = row.try_get("topic")?;
    let event_id: Uuid = row.try_get("event_id")?;
    let key: Vec<u8> = row.try_get("event_key")?;
    let payload: Vec<u8> = row.try_get("payload")?;
    let headers: String = row.try_get("headers")?;
    let mut event = Envelope::new(
        row.try_get::<String, _>("event_type")?,
        Key::from_bytes(key),
        payload,
    )
    .with_id(EventId::from_uuid(event_id))
    .with_occurred_at(row.try_get("occurred_at")?)
    .with_trace(TraceContext {
        traceparent: row.try_get("traceparent")?,
        tracestate: row.try_get("tracestate")?,
    });
    if let Some(source) = row.try_get::<Option<String>, _>("source")? {
        event = event.with_source(source);
    }
    if let Some(id) = row.try_get::<Option<String>, _>("correlation_id")? {
        event = event.with_correlation_id(id);
    }
    if let Some(id) = row.try_get::<Option<String>, _>("causation_id")? {
        event = event.with_causation_id(id);
    }
    let event = match serde_json::from_str::<BTreeMap<String, String>>(&headers) {
        Ok(map) => Ok(map
            .into_iter()
            .fold(event, |event, (name, value)| event.with_header(name, value))),
        Err(e) => Err(format!(
            "outbox row {id}: headers are not a JSON object of strings: {e}"
        )),
    };
    Ok(Claimed { id, topic, event })
}

/// Wakes the relay on every notification of `channel`; (re)connects with a
/// pause on failure and wakes once after each (re)connect, since
/// notifications sent meanwhile are lost.
async fn listen(pool: PgPool, channel: String, wake: Arc<Notify>) {
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener.listen(&channel).await {
                Ok(()) => {
                    wake.notify_one();
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(_)) => wake.notify_one(),
                            // Lost and re-connected: catch up.
                            Ok(None) => wake.notify_one(),
                            Err(e) => {
                                tracing::warn!(error = %e, "relay notification listener failed");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "relay cannot LISTEN"),
            },
            Err(e) => tracing::debug!(error = %e, "relay notification listener cannot connect"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
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
