//! Parked rows: outbox rows the broker refused `max_attempts` times (too
//! large, a topic name it does not accept, headers edited into something
//! that is not an event). The relay skips them and holds back the later
//! rows of their keys (a key's events go out in commit order or not at
//! all); an operator lists them, fixes the cause and puts them back in
//! line, or discards those that can never go out, which lets their keys
//! go on (`keel outbox parked`, `keel outbox requeue`, `keel outbox
//! discard`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::error::Result;
use super::postgres::readable_time;
use super::tables::OutboxTables;

/// Which parked rows an operation applies to: all of them, or those
/// matching every given field.
#[derive(Clone, Debug, Default)]
pub struct ParkedFilter {
    /// Only rows of this topic.
    pub topic: Option<String>,
    /// Only these rows (outbox ids); empty means any.
    pub ids: Vec<i64>,
}

impl ParkedFilter {
    /// The rows of `topic`, or all of them.
    pub fn topic(topic: Option<&str>) -> Self {
        ParkedFilter {
            topic: topic.map(str::to_owned),
            ids: Vec::new(),
        }
    }
}

/// A parked row as an operator sees it (the payload stays in the table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParkedRow {
    /// The row's id in the outbox.
    pub id: i64,
    /// The topic it was to be published to.
    pub topic: String,
    /// The event's id.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// The event's key (lossily decoded as UTF-8).
    pub key: String,
    /// The payload's size in bytes.
    pub payload_bytes: i64,
    /// Refusals counted against it.
    pub attempts: i32,
    /// The last refusal's error.
    pub last_error: Option<String>,
    /// When it was enqueued (`None` for a stored time no date can hold,
    /// such as a hand-edited `infinity`).
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When it was parked (`None` as for `enqueued_at`).
    pub parked_at: Option<DateTime<Utc>>,
}

/// The parked rows matching `filter`, oldest first, at most `limit`.
pub async fn list(
    pool: &PgPool,
    tables: &OutboxTables,
    filter: &ParkedFilter,
    limit: u32,
) -> Result<Vec<ParkedRow>> {
    let outbox = tables.outbox();
    let (enqueued_at, parked_at) = (readable_time("enqueued_at"), readable_time("parked_at"));
    let rows = sqlx::query(&format!(
        "SELECT id, topic, event_id, event_type, event_key, octet_length(payload)::int8 AS size, \
         attempts, last_error, {enqueued_at}, {parked_at} FROM {outbox} \
         WHERE published_at IS NULL AND parked_at IS NOT NULL \
         AND ($1::text IS NULL OR topic = $1) \
         AND (cardinality($2::int8[]) = 0 OR id = ANY($2)) \
         ORDER BY id LIMIT $3"
    ))
    .bind(filter.topic.as_deref())
    .bind(&filter.ids)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    rows.iter().map(parked_row).collect()
}

/// Puts the parked rows matching `filter` back in line (attempts reset,
/// the last error kept until the next attempt) and wakes the relays;
/// returns how many. For after the cause was fixed (a topic created, a
/// limit raised): the row goes out first, then its key's later rows,
/// which waited behind it.
pub async fn requeue(pool: &PgPool, tables: &OutboxTables, filter: &ParkedFilter) -> Result<u64> {
    let outbox = tables.outbox();
    let done = sqlx::query(&format!(
        "UPDATE {outbox} SET parked_at = NULL, attempts = 0 \
         WHERE parked_at IS NOT NULL AND published_at IS NULL \
         AND ($1::text IS NULL OR topic = $1) \
         AND (cardinality($2::int8[]) = 0 OR id = ANY($2))"
    ))
    .bind(filter.topic.as_deref())
    .bind(&filter.ids)
    .execute(pool)
    .await?;
    if done.rows_affected() > 0 {
        wake(pool, tables).await?;
    }
    Ok(done.rows_affected())
}

/// Deletes the parked rows matching `filter` — events that will never be
/// published — and wakes the relays, whose later rows of those keys go on;
/// returns the rows as they were (payloads aside), for the operator's
/// record. One statement, so all or nothing; for more rows than fit in
/// memory at once, [`discard_some`] takes them a batch at a time.
pub async fn discard(
    pool: &PgPool,
    tables: &OutboxTables,
    filter: &ParkedFilter,
) -> Result<Vec<ParkedRow>> {
    discard_rows(pool, tables, filter, None, |_| Ok(())).await
}

/// [`discard`] for at most `limit` rows, the oldest first, handing them to
/// `record` (to write them out, say) before they are gone: the rows are
/// deleted in a transaction that commits only once `record` returned `Ok`;
/// when it fails the batch is rolled back, stays parked, and the error is
/// [`OutboxError::NotRecorded`](super::OutboxError::NotRecorded). Call it
/// again until it returns none (a batch cut short by a concurrent requeue
/// is not the end).
pub async fn discard_some(
    pool: &PgPool,
    tables: &OutboxTables,
    filter: &ParkedFilter,
    limit: u32,
    record: impl FnOnce(&[ParkedRow]) -> std::io::Result<()>,
) -> Result<Vec<ParkedRow>> {
    discard_rows(pool, tables, filter, Some(limit), record).await
}

async fn discard_rows(
    pool: &PgPool,
    tables: &OutboxTables,
    filter: &ParkedFilter,
    limit: Option<u32>,
    record: impl FnOnce(&[ParkedRow]) -> std::io::Result<()>,
) -> Result<Vec<ParkedRow>> {
    let outbox = tables.outbox();
    let (enqueued_at, parked_at) = (readable_time("enqueued_at"), readable_time("parked_at"));
    // The conditions again on the DELETE itself: a row requeued by someone
    // else between the inner read and the delete is re-checked (PostgreSQL
    // re-evaluates the outer WHERE on the row's new version) and kept.
    let picked = "parked_at IS NOT NULL AND published_at IS NULL \
         AND ($1::text IS NULL OR topic = $1) \
         AND (cardinality($2::int8[]) = 0 OR id = ANY($2))";
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(&format!(
        "DELETE FROM {outbox} WHERE {picked} AND id IN (SELECT id FROM {outbox} \
         WHERE {picked} ORDER BY id LIMIT $3) \
         RETURNING id, topic, event_id, event_type, event_key, \
         octet_length(payload)::int8 AS size, attempts, last_error, {enqueued_at}, {parked_at}"
    ))
    .bind(filter.topic.as_deref())
    .bind(&filter.ids)
    // LIMIT NULL: no limit.
    .bind(limit.map(i64::from))
    .fetch_all(&mut *tx)
    .await?;
    let mut discarded = rows.iter().map(parked_row).collect::<Result<Vec<_>>>()?;
    discarded.sort_by_key(|row| row.id);
    if let Err(source) = record(&discarded) {
        // Not recorded is the error to tell; a failed rollback leaves the
        // transaction to end with its connection, undone all the same.
        let _ = tx.rollback().await;
        return Err(super::OutboxError::NotRecorded {
            rows: discarded.len(),
            source,
        });
    }
    tx.commit().await?;
    // The rows are gone: a relay that misses the wake-up finds their keys'
    // later rows at its next poll.
    if !discarded.is_empty()
        && let Err(e) = wake(pool, tables).await
    {
        tracing::warn!(error = %e, "parked rows discarded; the relays were not woken and find their keys' later rows at their next poll");
    }
    Ok(discarded)
}

/// Wakes the relays of `tables`' outbox.
async fn wake(pool: &PgPool, tables: &OutboxTables) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(tables.channel())
        .execute(pool)
        .await?;
    Ok(())
}

fn parked_row(row: &sqlx::postgres::PgRow) -> Result<ParkedRow> {
    let key: Vec<u8> = row.try_get("event_key")?;
    Ok(ParkedRow {
        id: row.try_get("id")?,
        topic: row.try_get("topic")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        key: String::from_utf8_lossy(&key).into_owned(),
        payload_bytes: row.try_get("size")?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        enqueued_at: row.try_get("enqueued_at")?,
        parked_at: row.try_get("parked_at")?,
    })
}
