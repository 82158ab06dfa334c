//! The outbox on SQLite, for the embedded default (`keel demo`, one
//! process, one file): the same API as on PostgreSQL — [`SqliteOutbox`]
//! enqueues in the caller's transaction, [`OutboxRelay::sqlite`] publishes,
//! [`SqliteInbox`] applies an effect once — with one relay at a time and
//! polling instead of LISTEN/NOTIFY.
//!
//! SQLite has one writer at a time: a write transaction holds the lock
//! from its first write to its commit, so ids are allocated in commit
//! order and no row can become visible behind the relay. The relay takes
//! the outbox's single lease (the whole outbox is one slot), so a second
//! relay on the same file waits as a standby instead of publishing too.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use keel_core::{Envelope, EventId, Key, Publisher};
use keel_schemas::AvroCodec;
use keel_schemas::events::Event;
use sqlx::{Row, SqliteConnection, SqlitePool};
use tokio::time::Instant;

use super::enqueue::{Row as OutboxRow, encode};
use super::error::{OutboxError, Result};
use super::parked::{ParkedFilter, ParkedRow};
use super::relay::{OutboxRelay, RelayConfig};
use super::store::{Backlog, Budget, ClaimedBatch, ClaimedRow, Limit, RelayStore};
use super::tables::OutboxTables;

/// The tables, created when missing (SQLite's DDL is idempotent with
/// `IF NOT EXISTS`; the schema name does not apply to SQLite). Keel keeps
/// out of the file's own sqlx migration table, which belongs to the
/// application.
pub async fn migrate_sqlite(tables: &OutboxTables, pool: &SqlitePool) -> Result<()> {
    let (outbox, inbox, lease) = names(tables);
    let statements = [
        format!(
            "CREATE TABLE IF NOT EXISTS {outbox} (
                id              INTEGER PRIMARY KEY AUTOINCREMENT,
                topic           TEXT    NOT NULL,
                event_id        TEXT    NOT NULL UNIQUE,
                event_type      TEXT    NOT NULL,
                event_key       BLOB    NOT NULL,
                occurred_at_ms  INTEGER NOT NULL,
                source          TEXT,
                correlation_id  TEXT,
                causation_id    TEXT,
                traceparent     TEXT,
                tracestate      TEXT,
                headers         TEXT    NOT NULL DEFAULT '{{}}',
                payload         BLOB    NOT NULL,
                enqueued_at_ms  INTEGER NOT NULL,
                published_at_ms INTEGER,
                attempts        INTEGER NOT NULL DEFAULT 0,
                last_error      TEXT,
                parked_at_ms    INTEGER
            )"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS {} ON {outbox} (id) \
             WHERE published_at_ms IS NULL AND parked_at_ms IS NULL",
            quote(&format!("{}_pending", tables.outbox_name()))
        ),
        // Parked rows block their keys: every claim reads them.
        format!(
            "CREATE INDEX IF NOT EXISTS {} ON {outbox} (id) \
             WHERE published_at_ms IS NULL AND parked_at_ms IS NOT NULL",
            quote(&format!("{}_parked", tables.outbox_name()))
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {inbox} (
                consumer_group  TEXT    NOT NULL,
                event_id        TEXT    NOT NULL,
                topic           TEXT,
                processed_at_ms INTEGER NOT NULL,
                PRIMARY KEY (consumer_group, event_id)
            )"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {lease} (
                id            INTEGER PRIMARY KEY CHECK (id = 1),
                owner         TEXT,
                expires_at_ms INTEGER NOT NULL DEFAULT 0
            )"
        ),
        format!("INSERT OR IGNORE INTO {lease} (id) VALUES (1)"),
    ];
    for statement in statements {
        sqlx::query(&statement).execute(pool).await?;
    }
    Ok(())
}

/// `"outbox"`, `"inbox"`, `"outbox_relay"`, quoted.
fn names(tables: &OutboxTables) -> (String, String, String) {
    (
        quote(tables.outbox_name()),
        quote(tables.inbox_name()),
        quote(&format!("{}_relay", tables.outbox_name())),
    )
}

fn quote(identifier: &str) -> String {
    format!("\"{identifier}\"")
}

/// Warns when the outbox is a file not in WAL mode. With a rollback journal
/// readers and writers shut each other out, so the service's transactions
/// hold up the relay's claims as well as its heartbeats and marks, on
/// SQLite's busy handler, which is not fair: a relay kept waiting past its
/// session timeout hands its lease to a standby. In WAL mode only writes
/// wait for each other. A diagnosis only: a failure to read the mode is
/// logged, never an error (the relay retries database failures as it runs).
async fn warn_unless_wal(pool: &SqlitePool, relay_id: &str) {
    match journal_mode_to_warn_of(pool).await {
        Ok(Some((mode, file))) => tracing::warn!(
            relay = %relay_id,
            journal_mode = %mode,
            file = %file,
            "the SQLite outbox is not in WAL mode: the service's transactions hold up the \
             relay's claims, heartbeats and marks, and a relay kept waiting past its session \
             timeout loses its lease; open the pool with \
             SqliteConnectOptions::journal_mode(SqliteJournalMode::Wal) (the mode stays with \
             the file)"
        ),
        Ok(None) => {}
        Err(e) => {
            tracing::debug!(relay = %relay_id, error = %e, "cannot read the SQLite journal mode");
        }
    }
}

/// The journal mode and file of an outbox file not in WAL mode; `None` for
/// WAL and for an in-memory or temporary database (no file, nobody else to
/// wait for).
async fn journal_mode_to_warn_of(
    pool: &SqlitePool,
) -> std::result::Result<Option<(String, String)>, sqlx::Error> {
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(pool)
        .await?;
    let file: Option<String> =
        sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_optional(pool)
            .await?;
    let file = file.unwrap_or_default();
    Ok((!file.is_empty() && !mode.eq_ignore_ascii_case("wal")).then_some((mode, file)))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Writes events into a SQLite outbox in the caller's transaction
/// ([`Outbox`](super::Outbox)'s twin).
#[derive(Clone, Debug)]
pub struct SqliteOutbox {
    codec: Arc<AvroCodec>,
    insert: Arc<str>,
    tables: OutboxTables,
    /// SQLite's message for a second row with an event id.
    duplicate: Arc<str>,
}

impl SqliteOutbox {
    /// An outbox in `tables` (created by [`migrate_sqlite`]) encoding typed
    /// events with `codec`.
    pub fn new(tables: &OutboxTables, codec: Arc<AvroCodec>) -> Self {
        let (outbox, _, _) = names(tables);
        SqliteOutbox {
            codec,
            insert: format!(
                "INSERT INTO {outbox} (topic, event_id, event_type, event_key, occurred_at_ms, \
                 source, correlation_id, causation_id, traceparent, tracestate, headers, payload, \
                 enqueued_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            )
            .into(),
            tables: tables.clone(),
            duplicate: format!(
                "UNIQUE constraint failed: {}.event_id",
                tables.outbox_name()
            )
            .into(),
        }
    }

    /// Puts parked rows back in line (attempts reset, error kept until the
    /// next attempt), all of them or those of `topic`; returns how many
    /// ([`Outbox::requeue_parked`](super::Outbox::requeue_parked)'s twin;
    /// [`requeue_parked`] also picks them by id).
    pub async fn requeue_parked(&self, pool: &SqlitePool, topic: Option<&str>) -> Result<u64> {
        requeue_parked(pool, &self.tables, &ParkedFilter::topic(topic)).await
    }

    /// Deletes parked rows — all of them or those of `topic` — that will
    /// never be published, so their keys' later rows go on; returns them
    /// (payloads aside) ([`Outbox::discard_parked`](super::Outbox::discard_parked)'s
    /// twin).
    pub async fn discard_parked(
        &self,
        pool: &SqlitePool,
        topic: Option<&str>,
    ) -> Result<Vec<ParkedRow>> {
        discard_parked(pool, &self.tables, &ParkedFilter::topic(topic)).await
    }

    /// The codec typed events are encoded with.
    pub fn codec(&self) -> &Arc<AvroCodec> {
        &self.codec
    }

    /// Encodes `event` for `topic` into a new envelope keyed by `key`.
    pub async fn envelope<T: Event + 'static>(
        &self,
        topic: &str,
        key: impl Into<Key>,
        event: &T,
    ) -> Result<Envelope> {
        encode(&self.codec, topic, key.into(), event).await
    }

    /// Encodes `event` and enqueues it in `tx`; returns its event id.
    pub async fn enqueue_event<T: Event + 'static>(
        &self,
        tx: &mut SqliteConnection,
        topic: &str,
        key: impl Into<Key>,
        event: &T,
    ) -> Result<EventId> {
        let envelope = self.envelope(topic, key, event).await?;
        self.enqueue(tx, topic, &envelope).await?;
        Ok(envelope.id())
    }

    /// Enqueues an already encoded event in `tx`.
    pub async fn enqueue(
        &self,
        tx: &mut SqliteConnection,
        topic: &str,
        event: &Envelope,
    ) -> Result<()> {
        let row = OutboxRow::new(topic, event)?;
        let done = sqlx::query(&self.insert)
            .bind(row.topic)
            .bind(event.id().to_string())
            .bind(row.event_type)
            .bind(row.key)
            .bind(row.occurred_at.timestamp_millis())
            .bind(row.source)
            .bind(row.correlation_id)
            .bind(row.causation_id)
            .bind(row.traceparent)
            .bind(row.tracestate)
            .bind(row.headers)
            .bind(row.payload)
            .bind(now_ms())
            .execute(tx)
            .await;
        match done {
            // Only the event id's own constraint: a unique index the
            // application added is its own error.
            Err(sqlx::Error::Database(db))
                if db.is_unique_violation() && db.message() == &*self.duplicate =>
            {
                Err(OutboxError::DuplicateEvent(event.id()))
            }
            other => other.map(|_| ()).map_err(OutboxError::from),
        }
    }

    /// Enqueues several events (any topics) in order.
    pub async fn enqueue_batch(
        &self,
        tx: &mut SqliteConnection,
        events: &[(&str, &Envelope)],
    ) -> Result<()> {
        for (topic, event) in events {
            self.enqueue(tx, topic, event).await?;
        }
        Ok(())
    }
}

/// The filter's conditions on a parked row, for SQLite: `?1` the topic
/// (or NULL), `?2` the ids as a JSON array (empty: any).
const PARKED_PICKED: &str = "published_at_ms IS NULL AND parked_at_ms IS NOT NULL \
     AND (?1 IS NULL OR topic = ?1) \
     AND (json_array_length(?2) = 0 OR id IN (SELECT value FROM json_each(?2)))";

/// A parked row's columns as [`ParkedRow`] reads them; a time that is not
/// an integer (a hand edit) reads as none.
const PARKED_COLUMNS: &str = "id, topic, event_id, event_type, event_key, \
     length(payload) AS size, attempts, last_error, \
     CASE WHEN typeof(enqueued_at_ms) = 'integer' THEN enqueued_at_ms END AS enqueued_at_ms, \
     CASE WHEN typeof(parked_at_ms) = 'integer' THEN parked_at_ms END AS parked_at_ms";

/// The parked rows of a SQLite outbox matching `filter`, oldest first, at
/// most `limit` ([`super::parked::list`]'s twin).
pub async fn list_parked(
    pool: &SqlitePool,
    tables: &OutboxTables,
    filter: &ParkedFilter,
    limit: u32,
) -> Result<Vec<ParkedRow>> {
    select_parked(pool, tables, filter, i64::from(limit)).await
}

/// [`list_parked`] with `limit` -1 for no limit.
async fn select_parked(
    pool: &SqlitePool,
    tables: &OutboxTables,
    filter: &ParkedFilter,
    limit: i64,
) -> Result<Vec<ParkedRow>> {
    let (outbox, _, _) = names(tables);
    let sql =
        format!("SELECT {PARKED_COLUMNS} FROM {outbox} WHERE {PARKED_PICKED} ORDER BY id LIMIT ?3");
    let rows = picked(&sql, filter).bind(limit).fetch_all(pool).await?;
    rows.iter().map(parked_row).collect()
}

/// Puts a SQLite outbox's parked rows matching `filter` back in line
/// (attempts reset); returns how many. The relay takes them at its next
/// poll ([`super::parked::requeue`]'s twin).
pub async fn requeue_parked(
    pool: &SqlitePool,
    tables: &OutboxTables,
    filter: &ParkedFilter,
) -> Result<u64> {
    let (outbox, _, _) = names(tables);
    let sql =
        format!("UPDATE {outbox} SET parked_at_ms = NULL, attempts = 0 WHERE {PARKED_PICKED}");
    Ok(picked(&sql, filter).execute(pool).await?.rows_affected())
}

/// Deletes a SQLite outbox's parked rows matching `filter`; returns them
/// as they were (payloads aside), oldest first
/// ([`super::parked::discard`]'s twin).
pub async fn discard_parked(
    pool: &SqlitePool,
    tables: &OutboxTables,
    filter: &ParkedFilter,
) -> Result<Vec<ParkedRow>> {
    discard_rows(pool, tables, filter, None, |_| Ok(())).await
}

/// [`discard_parked`] for at most `limit` rows, the oldest first, kept
/// parked unless `record` takes them ([`super::parked::discard_some`]'s
/// twin, except that the rows are handed to `record` before the delete
/// rather than inside its transaction: one requeued in between is
/// recorded but kept, and left out of what is returned).
pub async fn discard_parked_some(
    pool: &SqlitePool,
    tables: &OutboxTables,
    filter: &ParkedFilter,
    limit: u32,
    record: impl FnOnce(&[ParkedRow]) -> std::io::Result<()>,
) -> Result<Vec<ParkedRow>> {
    discard_rows(pool, tables, filter, Some(limit), record).await
}

async fn discard_rows(
    pool: &SqlitePool,
    tables: &OutboxTables,
    filter: &ParkedFilter,
    limit: Option<u32>,
    record: impl FnOnce(&[ParkedRow]) -> std::io::Result<()>,
) -> Result<Vec<ParkedRow>> {
    // Read, recorded, then deleted — not deleted in a transaction held
    // open while `record` writes (as on PostgreSQL): SQLite locks the whole
    // file for a write, so a slow reader of the output would stop the
    // application's enqueues.
    let mut chosen = select_parked(pool, tables, filter, limit.map_or(-1, i64::from)).await?;
    if let Err(source) = record(&chosen) {
        return Err(super::OutboxError::NotRecorded {
            rows: chosen.len(),
            source,
        });
    }
    if chosen.is_empty() {
        return Ok(chosen);
    }
    // The conditions again: a row requeued meanwhile is kept (and left out
    // of what is returned).
    let (outbox, _, _) = names(tables);
    let ids: Vec<i64> = chosen.iter().map(|row| row.id).collect();
    let delete = format!(
        "DELETE FROM {outbox} WHERE {PARKED_PICKED} \
         AND id IN (SELECT value FROM json_each(?3)) RETURNING id"
    );
    let deleted: std::collections::HashSet<i64> = picked(&delete, filter)
        .bind(serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into()))
        .fetch_all(pool)
        .await?
        .iter()
        .map(|row| row.try_get::<i64, _>("id"))
        .collect::<std::result::Result<_, _>>()?;
    chosen.retain(|row| deleted.contains(&row.id));
    Ok(chosen)
}

/// `sql` (a statement over [`PARKED_PICKED`]) with the filter's values
/// bound as `?1` and `?2`.
fn picked<'q>(
    sql: &'q str,
    filter: &'q ParkedFilter,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    let ids = serde_json::to_string(&filter.ids).unwrap_or_else(|_| "[]".into());
    sqlx::query(sql).bind(filter.topic.as_deref()).bind(ids)
}

/// A parked row as read from SQLite. An event id that is not a UUID (a
/// row edited by hand) reads as the nil UUID; its row id still names it.
fn parked_row(row: &sqlx::sqlite::SqliteRow) -> Result<ParkedRow> {
    let key: Vec<u8> = row.try_get("event_key")?;
    let event_id: String = row.try_get("event_id")?;
    let time = |column: &str| -> Result<_> {
        let ms: Option<i64> = row.try_get(column)?;
        Ok(ms.and_then(chrono::DateTime::from_timestamp_millis))
    };
    Ok(ParkedRow {
        id: row.try_get("id")?,
        topic: row.try_get("topic")?,
        event_id: uuid::Uuid::parse_str(&event_id).unwrap_or_default(),
        event_type: row.try_get("event_type")?,
        key: String::from_utf8_lossy(&key).into_owned(),
        payload_bytes: row.try_get("size")?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        enqueued_at: time("enqueued_at_ms")?,
        parked_at: time("parked_at_ms")?,
    })
}

/// Records processed events per consumer group in SQLite
/// ([`Inbox`](super::Inbox)'s twin).
#[derive(Clone, Debug)]
pub struct SqliteInbox {
    insert: String,
    purge: String,
}

impl SqliteInbox {
    /// The inbox table of `tables` (created by [`migrate_sqlite`]).
    pub fn new(tables: &OutboxTables) -> Self {
        let (_, inbox, _) = names(tables);
        SqliteInbox {
            insert: format!(
                "INSERT OR IGNORE INTO {inbox} (consumer_group, event_id, topic, processed_at_ms) \
                 VALUES (?, ?, ?, ?)"
            ),
            purge: format!(
                "DELETE FROM {inbox} WHERE rowid IN (SELECT rowid FROM {inbox} \
                 WHERE processed_at_ms < ? LIMIT ?)"
            ),
        }
    }

    /// Records `event` for `group` in `tx`: `true` the first time (apply
    /// the effect in `tx` and commit), `false` when already applied.
    pub async fn record(
        &self,
        tx: &mut SqliteConnection,
        group: &str,
        event: EventId,
        topic: Option<&str>,
    ) -> Result<bool> {
        let done = sqlx::query(&self.insert)
            .bind(group)
            .bind(event.to_string())
            .bind(topic)
            .bind(now_ms())
            .execute(tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Begins a transaction with `event` recorded for `group`, or returns
    /// `None` when the event was already applied
    /// ([`Inbox::begin`](super::Inbox::begin)'s twin). Apply the effect on
    /// the returned transaction and commit it. The transaction is
    /// `BEGIN IMMEDIATE`: it holds SQLite's write lock from the start, so
    /// an effect that reads before it writes cannot fail with
    /// `SQLITE_BUSY_SNAPSHOT` because the relay committed meanwhile
    /// (waiting for the lock instead, up to the connection's busy timeout).
    pub async fn begin(
        &self,
        pool: &SqlitePool,
        group: &str,
        event: EventId,
    ) -> Result<Option<sqlx::Transaction<'static, sqlx::Sqlite>>> {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        if self.record(&mut tx, group, event, None).await? {
            Ok(Some(tx))
        } else {
            tx.rollback().await?;
            Ok(None)
        }
    }

    /// Deletes records older than `retention`, `batch` rows per statement.
    pub async fn purge(&self, pool: &SqlitePool, retention: Duration, batch: usize) -> Result<u64> {
        let cutoff =
            now_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX / 2));
        let mut total = 0;
        loop {
            let done = sqlx::query(&self.purge)
                .bind(cutoff)
                .bind(batch.max(1) as i64)
                .execute(pool)
                .await?
                .rows_affected();
            total += done;
            if done < batch.max(1) as u64 {
                return Ok(total);
            }
        }
    }
}

impl OutboxRelay {
    /// A relay for the SQLite outbox in `tables` (the embedded default).
    /// The whole outbox is one slot under one lease; `slots` and `listen`
    /// do not apply.
    pub fn sqlite(
        pool: SqlitePool,
        tables: &OutboxTables,
        publisher: Arc<dyn Publisher>,
        config: RelayConfig,
    ) -> Result<Self> {
        config.validate()?;
        let store = SqliteRelayStore::new(pool, tables, &config);
        Ok(Self::with_store(Box::new(store), publisher, config))
    }
}

struct SqliteRelayStore {
    pool: SqlitePool,
    label: String,
    relay_id: String,
    /// What the lease's `owner` holds while this process has it: the
    /// relay id and a random token, so a second process given the same
    /// relay id waits for the lease to expire instead of sharing it.
    holder: String,
    session_timeout: Duration,
    valid_until: Option<Instant>,
    claim: String,
    mark: String,
    refuse: String,
    purge: String,
    backlog: String,
    take_lease: String,
    release: String,
}

impl SqliteRelayStore {
    fn new(pool: SqlitePool, tables: &OutboxTables, config: &RelayConfig) -> Self {
        let (outbox, _, lease) = names(tables);
        SqliteRelayStore {
            pool,
            label: format!("sqlite:{}", tables.outbox_name()),
            relay_id: config.relay_id.clone(),
            holder: format!("{}#{:016x}", config.relay_id, rand::random::<u64>()),
            session_timeout: config.session_timeout,
            valid_until: None,
            claim: format!(
                // A time that is not an integer (SQLite keeps whatever a
                // hand edit writes) reads as none: the row is refused and
                // parked, not a claim failing on every poll.
                "SELECT id, topic, event_id, event_type, event_key, \
                 CASE WHEN typeof(occurred_at_ms) = 'integer' THEN occurred_at_ms END \
                 AS occurred_at_ms, source, \
                 correlation_id, causation_id, traceparent, tracestate, headers, payload \
                 FROM {outbox} o WHERE published_at_ms IS NULL AND parked_at_ms IS NULL \
                 AND topic NOT IN (SELECT value FROM json_each(?)) \
                 AND NOT EXISTS (SELECT 1 FROM {outbox} p \
                   WHERE p.published_at_ms IS NULL AND p.parked_at_ms IS NOT NULL \
                   AND p.topic = o.topic AND p.event_key = o.event_key AND p.id < o.id) \
                 ORDER BY id LIMIT ?"
            ),
            mark: format!(
                "UPDATE {outbox} SET published_at_ms = ? \
                 WHERE id IN (SELECT value FROM json_each(?)) AND published_at_ms IS NULL"
            ),
            refuse: format!(
                "UPDATE {outbox} SET attempts = attempts + 1, last_error = ?, \
                 parked_at_ms = CASE WHEN attempts + 1 >= ? THEN ? END \
                 WHERE id = ? RETURNING parked_at_ms IS NOT NULL"
            ),
            purge: format!(
                "DELETE FROM {outbox} WHERE id IN (SELECT id FROM {outbox} \
                 WHERE published_at_ms < ? ORDER BY id LIMIT ?)"
            ),
            backlog: format!(
                "SELECT coalesce(sum(parked_at_ms IS NULL), 0) AS backlog, \
                 coalesce(sum(parked_at_ms IS NOT NULL), 0) AS parked, \
                 min(CASE WHEN parked_at_ms IS NULL THEN enqueued_at_ms END) AS oldest \
                 FROM {outbox} WHERE published_at_ms IS NULL"
            ),
            take_lease: format!(
                "UPDATE {lease} SET owner = ?1, expires_at_ms = ?2 \
                 WHERE id = 1 AND (owner IS NULL OR owner = ?1 OR expires_at_ms < ?3)"
            ),
            release: format!(
                "UPDATE {lease} SET owner = NULL, expires_at_ms = 0 WHERE id = 1 AND owner = ?"
            ),
        }
    }
}

#[async_trait]
impl RelayStore for SqliteRelayStore {
    fn label(&self) -> String {
        self.label.clone()
    }

    async fn prepare(&mut self) -> Result<()> {
        warn_unless_wal(&self.pool, &self.relay_id).await;
        Ok(())
    }

    async fn heartbeat(&mut self) -> Result<()> {
        let sent = Instant::now();
        let now = now_ms();
        let ttl = i64::try_from(self.session_timeout.as_millis()).unwrap_or(i64::MAX / 2);
        let taken = sqlx::query(&self.take_lease)
            .bind(&self.holder)
            .bind(now + ttl)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1;
        let was = self.valid_until.is_some();
        self.valid_until = taken.then(|| sent + self.session_timeout.mul_f64(0.6));
        if taken != was {
            tracing::info!(relay = %self.relay_id, owner = taken, "SQLite outbox relay lease changed");
        }
        Ok(())
    }

    fn lapse_if_expired(&mut self) {
        if self.remaining().is_zero() {
            self.valid_until = None;
        }
    }

    fn publishable(&self) -> Vec<u32> {
        if self.remaining().is_zero() {
            Vec::new()
        } else {
            vec![0]
        }
    }

    fn remaining(&self) -> Duration {
        self.valid_until
            .map(|until| until.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    async fn claim(
        &self,
        _slots: &[u32],
        limit: Limit,
        skip: &[String],
        _exclude: &[i64],
    ) -> Result<ClaimedBatch> {
        // (Never pipelined: nothing is excluded.)
        let skip = serde_json::to_string(skip).unwrap_or_else(|_| "[]".into());
        let mut rows = sqlx::query(&self.claim)
            .bind(skip)
            .bind(limit.rows as i64)
            .fetch(&self.pool);
        let mut batch = Budget::new(limit);
        while let Some(row) = rows.try_next().await? {
            let id: i64 = row.try_get("id")?;
            let event_id: String = row.try_get("event_id")?;
            let occurred: Option<i64> = row.try_get("occurred_at_ms")?;
            let row = ClaimedRow {
                id,
                topic: row.try_get("topic")?,
                event_id: uuid::Uuid::parse_str(&event_id).unwrap_or_default(),
                event_type: row.try_get("event_type")?,
                key: row.try_get("event_key")?,
                occurred_at: occurred.and_then(chrono::DateTime::from_timestamp_millis),
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
            let claimed = row.into_claimed();
            // An id that is not a UUID (a row edited by hand) is refused
            // like malformed headers, not published under the nil id.
            let claimed = match uuid::Uuid::parse_str(&event_id) {
                Ok(_) => claimed,
                Err(e) => claimed.broken(format!(
                    "outbox row {id}: event id `{event_id}` is not a UUID: {e}"
                )),
            };
            batch.push(claimed);
        }
        Ok(batch.finish())
    }

    async fn mark(&self, ids: &[i64]) -> Result<()> {
        let list = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
        sqlx::query(&self.mark)
            .bind(now_ms())
            .bind(list)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn refuse(&self, id: i64, reason: &str, max_attempts: u32) -> Result<bool> {
        Ok(sqlx::query_scalar(&self.refuse)
            .bind(reason)
            .bind(max_attempts as i64)
            .bind(now_ms())
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .unwrap_or(false))
    }

    async fn purge(&self, retention: Duration, batch: usize) -> Result<u64> {
        let cutoff =
            now_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX / 2));
        Ok(sqlx::query(&self.purge)
            .bind(cutoff)
            .bind(batch as i64)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn backlog(&self) -> Result<Backlog> {
        let row = sqlx::query(&self.backlog).fetch_one(&self.pool).await?;
        let backlog: i64 = row.try_get("backlog")?;
        let parked: i64 = row.try_get("parked")?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        Ok(Backlog {
            backlog: backlog.max(0) as u64,
            parked: parked.max(0) as u64,
            oldest: oldest
                .map(|at| Duration::from_millis(now_ms().saturating_sub(at).max(0) as u64)),
        })
    }

    async fn leave(&mut self) -> Result<()> {
        sqlx::query(&self.release)
            .bind(&self.holder)
            .execute(&self.pool)
            .await?;
        self.valid_until = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn outbox_with_rows() -> (SqlitePool, OutboxTables, SqliteOutbox) {
        // One connection: an in-memory database lives as long as it does.
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        let tables = OutboxTables::default();
        migrate_sqlite(&tables, &pool).await.unwrap();
        let codec = AvroCodec::new(
            Arc::new(keel_schemas::LocalRegistry::new()),
            keel_schemas::CodecOptions::default(),
        );
        let outbox = SqliteOutbox::new(&tables, Arc::new(codec));
        let mut tx = pool.begin().await.unwrap();
        for (topic, key) in [
            ("orders", "a"),
            ("orders", "b"),
            ("payments", "c"),
            ("orders", "d"),
        ] {
            let event = Envelope::new("keel.test.Parked", key, "p");
            outbox.enqueue(&mut tx, topic, &event).await.unwrap();
        }
        tx.commit().await.unwrap();
        // Rows 1 to 3 parked, as the relay parks them.
        sqlx::query(
            "UPDATE \"outbox\" SET attempts = 5, last_error = 'too large', parked_at_ms = 1 \
             WHERE id <= 3",
        )
        .execute(&pool)
        .await
        .unwrap();
        (pool, tables, outbox)
    }

    fn ids(rows: &[ParkedRow]) -> Vec<i64> {
        rows.iter().map(|r| r.id).collect()
    }

    #[tokio::test]
    async fn only_an_outbox_file_outside_wal_mode_is_warned_of() {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
        let memory = SqlitePool::connect("sqlite::memory:").await.unwrap();
        assert_eq!(journal_mode_to_warn_of(&memory).await.unwrap(), None);
        let dir = std::env::temp_dir().join(format!("keel-wal-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let open = |name: &str, mode| {
            SqliteConnectOptions::new()
                .filename(dir.join(name))
                .create_if_missing(true)
                .journal_mode(mode)
        };
        let wal = SqlitePool::connect_with(open("wal.db", SqliteJournalMode::Wal))
            .await
            .unwrap();
        assert_eq!(journal_mode_to_warn_of(&wal).await.unwrap(), None);
        for (name, mode, expected) in [
            ("delete.db", SqliteJournalMode::Delete, "delete"),
            ("memory-journal.db", SqliteJournalMode::Memory, "memory"),
        ] {
            let pool = SqlitePool::connect_with(open(name, mode)).await.unwrap();
            let (warned, file) = journal_mode_to_warn_of(&pool).await.unwrap().unwrap();
            assert_eq!(warned, expected, "{name}");
            assert!(file.ends_with(name), "{file}");
            pool.close().await;
        }
        wal.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_row_whose_time_is_not_an_integer_is_refused_not_a_failing_claim() {
        let (pool, tables, _) = outbox_with_rows().await;
        sqlx::query("UPDATE \"outbox\" SET occurred_at_ms = 'yesterday' WHERE id = 4")
            .execute(&pool)
            .await
            .unwrap();
        let store = SqliteRelayStore::new(pool, &tables, &RelayConfig::default());
        let limit = Limit {
            rows: 10,
            bytes: 1 << 20,
        };
        let batch = store.claim(&[0], limit, &[], &[]).await.unwrap();
        assert_eq!(batch.rows.len(), 1, "rows 1 to 3 are parked");
        let e = batch.rows[0].event.as_ref().err().unwrap();
        assert!(e.contains("occurred_at"), "{e}");
    }

    #[tokio::test]
    async fn a_second_process_with_the_same_relay_id_waits_for_the_lease() {
        let (pool, tables, _) = outbox_with_rows().await;
        let config = RelayConfig {
            relay_id: "same".into(),
            ..RelayConfig::default()
        };
        let mut first = SqliteRelayStore::new(pool.clone(), &tables, &config);
        let mut second = SqliteRelayStore::new(pool.clone(), &tables, &config);
        first.heartbeat().await.unwrap();
        second.heartbeat().await.unwrap();
        assert_eq!(first.publishable(), [0]);
        assert!(second.publishable().is_empty(), "one relay at a time");
        // Renewing keeps it; once released, the other takes it.
        first.heartbeat().await.unwrap();
        assert_eq!(first.publishable(), [0]);
        first.leave().await.unwrap();
        second.heartbeat().await.unwrap();
        assert_eq!(second.publishable(), [0]);
    }

    #[tokio::test]
    async fn an_inbox_transaction_applies_an_event_once() {
        let (pool, tables, _) = outbox_with_rows().await;
        let inbox = SqliteInbox::new(&tables);
        let event = EventId::new();
        // Rolled back: not recorded, so the redelivery applies it.
        let tx = inbox.begin(&pool, "billing", event).await.unwrap().unwrap();
        tx.rollback().await.unwrap();
        let tx = inbox.begin(&pool, "billing", event).await.unwrap().unwrap();
        tx.commit().await.unwrap();
        assert!(
            inbox
                .begin(&pool, "billing", event)
                .await
                .unwrap()
                .is_none()
        );
        // Another group applies it on its own.
        assert!(
            inbox
                .begin(&pool, "shipping", event)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn an_event_enqueued_twice_is_a_duplicate() {
        let (pool, _, outbox) = outbox_with_rows().await;
        let event = Envelope::new("keel.test.Parked", "k", "p");
        let mut conn = pool.acquire().await.unwrap();
        outbox.enqueue(&mut conn, "orders", &event).await.unwrap();
        let again = outbox.enqueue(&mut conn, "orders", &event).await;
        assert!(
            matches!(again, Err(OutboxError::DuplicateEvent(id)) if id == event.id()),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn parked_rows_are_listed_requeued_and_discarded_as_on_postgres() {
        let (pool, tables, outbox) = outbox_with_rows().await;
        // A hand-edited time reads as none rather than failing the list.
        sqlx::query("UPDATE \"outbox\" SET enqueued_at_ms = 'then' WHERE id = 3")
            .execute(&pool)
            .await
            .unwrap();
        let all = list_parked(&pool, &tables, &ParkedFilter::default(), 100)
            .await
            .unwrap();
        assert_eq!(ids(&all), [1, 2, 3]);
        assert!(all[2].enqueued_at.is_none() && all[2].parked_at.is_some());
        assert_eq!(all[0].key, "a");
        assert_eq!(all[0].attempts, 5);
        assert_eq!(all[0].last_error.as_deref(), Some("too large"));
        assert_eq!(all[0].payload_bytes, 1);
        let by_id = ParkedFilter {
            topic: None,
            ids: vec![2, 4],
        };
        // Row 4 is not parked: only row 2 is picked.
        assert_eq!(
            ids(&list_parked(&pool, &tables, &by_id, 100).await.unwrap()),
            [2]
        );
        assert_eq!(requeue_parked(&pool, &tables, &by_id).await.unwrap(), 1);
        let left = list_parked(&pool, &tables, &ParkedFilter::default(), 1)
            .await
            .unwrap();
        assert_eq!(ids(&left), [1], "the limit holds");
        let requeued: (i64, Option<i64>) =
            sqlx::query_as("SELECT attempts, parked_at_ms FROM \"outbox\" WHERE id = 2")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(requeued, (0, None));
        let discarded = outbox
            .discard_parked(&pool, Some("payments"))
            .await
            .unwrap();
        assert_eq!(ids(&discarded), [3]);
        assert_eq!(outbox.requeue_parked(&pool, None).await.unwrap(), 1);
        assert!(
            list_parked(&pool, &tables, &ParkedFilter::default(), 100)
                .await
                .unwrap()
                .is_empty()
        );
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM \"outbox\"")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(left, 3, "only the discarded row is gone");
    }

    #[tokio::test]
    async fn a_batch_of_discarded_rows_that_cannot_be_recorded_stays_parked() {
        let (pool, tables, _) = outbox_with_rows().await;
        let all = ParkedFilter::default();
        let failed = discard_parked_some(&pool, &tables, &all, 2, |rows| {
            assert_eq!(ids(rows), [1, 2], "handed over before they are gone");
            Err(std::io::ErrorKind::BrokenPipe.into())
        })
        .await;
        assert!(
            matches!(failed, Err(OutboxError::NotRecorded { rows: 2, .. })),
            "{failed:?}"
        );
        let parked = list_parked(&pool, &tables, &all, 100).await.unwrap();
        assert_eq!(ids(&parked), [1, 2, 3], "not deleted: nothing lost");
        let mut seen = Vec::new();
        let discarded = discard_parked_some(&pool, &tables, &all, 2, |rows| {
            seen.extend(ids(rows));
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!((ids(&discarded), seen), (vec![1, 2], vec![1, 2]));
        let parked = list_parked(&pool, &tables, &all, 100).await.unwrap();
        assert_eq!(ids(&parked), [3]);
    }
}
