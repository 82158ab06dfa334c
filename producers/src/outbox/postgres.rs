//! The relay's PostgreSQL side: claiming in id order by slot, moving
//! published rows to the archive (or deleting them, with no retention),
//! parking, purging, vacuuming, backlog figures, slot leases
//! ([`super::leases`]) and the LISTEN/NOTIFY wake-up.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tokio::sync::Notify;

use super::error::Result;
use super::leases::SlotLeases;
use super::store::{Backlog, Budget, ClaimedBatch, ClaimedRow, Limit, RelayStore};
use super::tables::OutboxTables;

pub(crate) struct PgRelayStore {
    pool: PgPool,
    tables: OutboxTables,
    leases: SlotLeases,
    claim: String,
    mark: String,
    refuse: String,
    purge: String,
    sweep: String,
    backlog: String,
    /// This relay's role owns the outbox, so it may VACUUM it.
    vacuums: bool,
    /// When the sweep of rows marked in place runs next. Such rows come
    /// only from relays of the version before the archive, and without an
    /// index on published rows the sweep reads the whole outbox: once it
    /// finds none, it runs again only after `SWEEP_SPACING`.
    next_sweep: std::sync::Mutex<tokio::time::Instant>,
}

impl PgRelayStore {
    /// `keep`: published rows move to the archive (kept for a
    /// retention); without it they are deleted at once.
    pub(crate) fn new(pool: PgPool, tables: OutboxTables, leases: SlotLeases, keep: bool) -> Self {
        let outbox = tables.outbox();
        let archive = tables.archive();
        // The rows a mark takes out of the outbox.
        let marked = format!("id = ANY($1) AND published_at IS NULL AND {NO_FLUSH_WAIT}");
        // A row whose time cannot be read is refused and parked, not a
        // relay that crashes on every claim.
        let occurred_at = readable_time("occurred_at");
        // A key with a parked row is blocked: its later rows wait until an
        // operator requeues or discards the parked one, so a key's events
        // go out in commit order whatever happens (the parked rows, few,
        // are read once per claim through their partial index). Its
        // earlier rows still go (held back with it while it was retried).
        PgRelayStore {
            claim: format!(
                "SELECT id, topic, event_id, event_type, event_key, {occurred_at}, source, \
                 correlation_id, causation_id, traceparent, tracestate, headers::text AS headers, \
                 payload FROM {outbox} o \
                 WHERE published_at IS NULL AND parked_at IS NULL AND key_hash % $1 = ANY($2) \
                 AND topic <> ALL($4) AND id <> ALL($5) \
                 AND NOT EXISTS (SELECT 1 FROM {outbox} p \
                   WHERE p.published_at IS NULL AND p.parked_at IS NOT NULL \
                   AND p.topic = o.topic AND p.event_key = o.event_key AND p.id < o.id) \
                 ORDER BY id LIMIT $3"
            ),
            // Published: out of the outbox, into the archive — or gone,
            // with no retention (half the writes: no archive row, no
            // archive index entry).
            mark: if keep {
                move_to_archive(&tables, &marked, "clock_timestamp()")
            } else {
                format!("DELETE FROM {outbox} WHERE {marked}")
            },
            refuse: format!(
                "UPDATE {outbox} SET attempts = attempts + 1, last_error = $2, \
                 parked_at = CASE WHEN attempts + 1 >= $3 THEN clock_timestamp() END \
                 WHERE id = $1 RETURNING parked_at IS NOT NULL"
            ),
            purge: format!(
                "DELETE FROM {archive} WHERE id IN (SELECT id FROM {archive} \
                 WHERE published_at < clock_timestamp() - $1 * interval '1 millisecond' LIMIT $2)"
            ),
            // Rows a relay of the version before the archive marked in
            // place (it ran on after the upgrade) move to the archive too.
            sweep: move_to_archive(
                &tables,
                &format!("id IN (SELECT id FROM {outbox} WHERE published_at IS NOT NULL LIMIT $1)"),
                "published_at",
            ),
            // Each figure through its partial index, never a scan of the
            // published rows kept for the retention.
            backlog: format!(
                "SELECT (SELECT count(*) FROM {outbox} \
                   WHERE published_at IS NULL AND parked_at IS NULL) AS backlog, \
                 (SELECT count(*) FROM {outbox} \
                   WHERE published_at IS NULL AND parked_at IS NOT NULL) AS parked, \
                 (SELECT extract(epoch FROM clock_timestamp() - enqueued_at)::float8 FROM {outbox} \
                   WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT 1) AS oldest"
            ),
            vacuums: false,
            next_sweep: std::sync::Mutex::new(tokio::time::Instant::now()),
            pool,
            tables,
            leases,
        }
    }
}

#[async_trait]
impl RelayStore for PgRelayStore {
    fn label(&self) -> String {
        self.tables.channel()
    }

    async fn prepare(&mut self) -> Result<()> {
        self.tables.check_migrated(&self.pool).await?;
        let owned: bool = sqlx::query_scalar(
            "SELECT coalesce((SELECT pg_has_role(relowner, 'USAGE') FROM pg_class \
                              WHERE oid = to_regclass($1)), false)",
        )
        .bind(self.tables.outbox())
        .fetch_one(&self.pool)
        .await?;
        // Only the table's owner may VACUUM it (others get a warning per
        // try); autovacuum, set up by the migration, remains for them.
        self.vacuums = owned;
        if !owned {
            tracing::info!(outbox = %self.tables.outbox(), "this relay's role does not own the outbox: autovacuum alone cleans it");
        }
        self.leases.prepare(&self.pool).await
    }

    async fn heartbeat(&mut self) -> Result<()> {
        self.leases.heartbeat(&self.pool).await
    }

    fn lapse_if_expired(&mut self) {
        self.leases.lapse_if_expired();
    }

    fn publishable(&self) -> Vec<u32> {
        self.leases.publishable()
    }

    fn remaining(&self) -> Duration {
        self.leases.remaining()
    }

    fn pipelines(&self) -> bool {
        true
    }

    async fn claim(
        &self,
        slots: &[u32],
        limit: Limit,
        skip: &[String],
        exclude: &[i64],
    ) -> Result<ClaimedBatch> {
        let slot_list: Vec<i32> = slots.iter().map(|&s| s as i32).collect();
        // Planned with its values each time: a cached generic plan cannot
        // estimate the slot filter, takes it to match almost nothing, and
        // over a large backlog sorts the whole outbox instead of reading
        // the first rows of the pending index (50 ms instead of 0.3 ms per
        // claim at 300,000 rows waiting).
        let mut rows = sqlx::query(&self.claim)
            .persistent(false)
            .bind(self.leases.slots() as i32)
            .bind(&slot_list)
            .bind(limit.rows as i64)
            .bind(skip)
            .bind(exclude)
            .fetch(&self.pool);
        let mut batch = Budget::new(limit);
        while let Some(row) = rows.try_next().await? {
            let row = ClaimedRow {
                id: row.try_get("id")?,
                topic: row.try_get("topic")?,
                event_id: row.try_get("event_id")?,
                event_type: row.try_get("event_type")?,
                key: row.try_get("event_key")?,
                occurred_at: row.try_get("occurred_at")?,
                source: row.try_get("source")?,
                correlation_id: row.try_get("correlation_id")?,
                causation_id: row.try_get("causation_id")?,
                traceparent: row.try_get("traceparent")?,
                tracestate: row.try_get("tracestate")?,
                headers: row.try_get("headers")?,
                payload: row.try_get("payload")?,
            };
            if !batch.admit(&row) {
                break;
            }
            batch.push(row.into_claimed());
        }
        Ok(batch.finish())
    }

    async fn mark(&self, ids: &[i64]) -> Result<()> {
        // The broker has these rows: losing the mark in a database crash
        // only re-publishes them (at least once either way), so the mark
        // need not wait for its WAL flush.
        // One statement, no transaction around it (three round trips fewer):
        // it turns the flush wait off for its own implicit transaction, see
        // `NO_FLUSH_WAIT`.
        sqlx::query(&self.mark)
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn refuse(&self, id: i64, reason: &str, max_attempts: u32) -> Result<bool> {
        Ok(sqlx::query_scalar(&self.refuse)
            .bind(id)
            .bind(reason)
            .bind(i32::try_from(max_attempts).unwrap_or(i32::MAX))
            .fetch_optional(&self.pool)
            .await?
            .unwrap_or(false))
    }

    async fn purge(&self, retention: Duration, batch: usize) -> Result<u64> {
        let next_sweep = || self.next_sweep.lock().unwrap_or_else(|p| p.into_inner());
        if tokio::time::Instant::now() >= *next_sweep() {
            let moved = sqlx::query(&self.sweep)
                .bind(batch as i64)
                .execute(&self.pool)
                .await?
                .rows_affected();
            if moved == 0 {
                *next_sweep() = tokio::time::Instant::now() + SWEEP_SPACING;
            }
        }
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        Ok(sqlx::query(&self.purge)
            .bind(retention_ms)
            .bind(batch as i64)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    fn vacuum(&self, analyze: bool) -> Option<futures::future::BoxFuture<'static, Result<()>>> {
        if !self.vacuums {
            return None;
        }
        // ANALYZE now and then: the claim's plan needs to know the outbox
        // is all pending rows (with no statistics PostgreSQL guesses a
        // handful and sorts the whole backlog instead of reading the
        // pending index's first rows). SKIP_LOCKED: another relay's run is
        // as good. TRUNCATE false: giving the emptied end of the table back
        // takes a lock that stops every enqueue meanwhile.
        let sql = format!(
            "VACUUM ({}SKIP_LOCKED, TRUNCATE false, INDEX_CLEANUP ON) {}",
            if analyze { "ANALYZE, " } else { "" },
            self.tables.outbox()
        );
        let options = self.pool.connect_options();
        // Its own connection: the pool's stay free for claims and marks,
        // and a skipped VACUUM's warning (another relay's or autovacuum's
        // run holds the table) is not logged every second.
        Some(Box::pin(vacuum_on(options, sql)))
    }

    async fn backlog(&self) -> Result<Backlog> {
        let row = sqlx::query(&self.backlog).fetch_one(&self.pool).await?;
        let backlog: i64 = row.try_get("backlog")?;
        let parked: i64 = row.try_get("parked")?;
        let oldest: Option<f64> = row.try_get("oldest")?;
        Ok(Backlog {
            backlog: backlog.max(0) as u64,
            parked: parked.max(0) as u64,
            // An infinite age (a row enqueued at `-infinity`, PostgreSQL 17+)
            // is no figure, not a panic.
            oldest: oldest.and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok()),
        })
    }

    async fn leave(&mut self) -> Result<()> {
        self.leases.leave(&self.pool).await
    }

    fn listen(&self, wake: Arc<Notify>) -> Option<tokio::task::JoinHandle<()>> {
        Some(tokio::spawn(listen(
            self.pool.clone(),
            self.tables.channel(),
            wake,
        )))
    }
}

/// Time between two sweeps for rows marked in place once one found none.
const SWEEP_SPACING: Duration = Duration::from_secs(600);

/// `column` (a timestamptz) as itself, or NULL where decoding it would
/// panic (sqlx reads a timestamptz by adding microseconds to an epoch,
/// which chrono refuses for `±infinity` and for years past its range).
/// Such times get there only by a hand edit or another writer.
pub(crate) fn readable_time(column: &str) -> String {
    format!(
        "CASE WHEN isfinite({column}) AND {column} < '200000-01-01 00:00:00+00'::timestamptz \
         THEN {column} END AS {column}"
    )
}

/// A condition that is always true and, evaluated once (an uncorrelated
/// subquery), sets `synchronous_commit` off for the rest of the statement's
/// own transaction: the mark is one statement instead of `BEGIN`,
/// `SET LOCAL`, the statement and `COMMIT`. The setting is
/// still in force when the implicit transaction commits (PostgreSQL resets
/// transaction-local settings after the commit record is written).
const NO_FLUSH_WAIT: &str = "(SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL";

/// Moves the outbox rows `which` selects into the archive, published at
/// `published_at` (an expression over the moved row).
fn move_to_archive(tables: &OutboxTables, which: &str, published_at: &str) -> String {
    const COLUMNS: &str = "id, topic, event_id, event_type, event_key, key_hash, occurred_at, \
        source, correlation_id, causation_id, traceparent, tracestate, headers, payload, \
        enqueued_at, attempts, last_error";
    format!(
        "WITH moved AS (DELETE FROM {outbox} WHERE {which} RETURNING {COLUMNS}, published_at) \
         INSERT INTO {archive} ({COLUMNS}, published_at) \
         SELECT {COLUMNS}, {published_at} FROM moved ON CONFLICT (id) DO NOTHING",
        outbox = tables.outbox(),
        archive = tables.archive(),
    )
}

/// Runs `sql` (a VACUUM) on a connection of its own, quiet about the
/// warning of a VACUUM skipped for a lock another one holds.
async fn vacuum_on(options: Arc<sqlx::postgres::PgConnectOptions>, sql: String) -> Result<()> {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect_with(&options).await?;
    conn.execute("SET client_min_messages = error").await?;
    conn.execute(sql.as_str()).await?;
    conn.close().await?;
    Ok(())
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
