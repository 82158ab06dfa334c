//! [`Inbox`]: applies a redelivered event's database effect once.
//!
//! The handler records `(consumer group, event id)` in the same transaction
//! as its effect. A redelivery (a crash before the ack, a rebalance, a
//! duplicate publish) finds the record and skips the effect; two deliveries
//! racing each other are serialised by the primary key — the second waits
//! for the first transaction and then sees its record, or takes over if it
//! rolled back.

use std::time::Duration;

use keel_core::EventId;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::error::Result;
use super::tables::OutboxTables;

/// Records processed events per consumer group.
#[derive(Clone, Debug)]
pub struct Inbox {
    insert: String,
    purge: String,
}

impl Inbox {
    /// The inbox table of `tables` (created by [`OutboxTables::migrate`]).
    pub fn new(tables: &OutboxTables) -> Self {
        let inbox = tables.inbox();
        Inbox {
            insert: format!(
                "INSERT INTO {inbox} (consumer_group, event_id, topic) VALUES ($1, $2, $3) \
                 ON CONFLICT (consumer_group, event_id) DO NOTHING"
            ),
            purge: format!(
                "DELETE FROM {inbox} WHERE ctid IN (SELECT ctid FROM {inbox} \
                 WHERE processed_at < clock_timestamp() - $1 * interval '1 millisecond' LIMIT $2)"
            ),
        }
    }

    /// Records `event` for `group` in `tx`. `true`: first time — apply the
    /// effect in the same transaction and commit. `false`: already applied
    /// (by a committed transaction) — skip the effect and ack.
    pub async fn record(
        &self,
        tx: &mut PgConnection,
        group: &str,
        event: EventId,
        topic: Option<&str>,
    ) -> Result<bool> {
        let done = sqlx::query(&self.insert)
            .bind(group)
            .bind(event.as_uuid())
            .bind(topic)
            .execute(tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Begins a transaction with `event` recorded for `group`, or returns
    /// `None` when the event was already applied. Apply the effect on the
    /// returned transaction and commit it.
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool, inbox: keel_producers::outbox::Inbox, id: keel_core::EventId) -> anyhow::Result<()> {
    /// if let Some(mut tx) = inbox.begin(&pool, "billing", id).await? {
    ///     sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1").execute(&mut *tx).await?;
    ///     tx.commit().await?;
    /// }
    /// // ack the delivery either way
    /// # Ok(()) }
    /// ```
    pub async fn begin(
        &self,
        pool: &PgPool,
        group: &str,
        event: EventId,
    ) -> Result<Option<Transaction<'static, Postgres>>> {
        let mut tx = pool.begin().await?;
        if self.record(&mut tx, group, event, None).await? {
            Ok(Some(tx))
        } else {
            tx.rollback().await?;
            Ok(None)
        }
    }

    /// Deletes records older than `retention`, `batch` rows per statement;
    /// returns how many. Keep records longer than any redelivery can take
    /// (the broker's retention of the topic is the safe bound).
    pub async fn purge(&self, pool: &PgPool, retention: Duration, batch: usize) -> Result<u64> {
        let mut total = 0;
        loop {
            let done = self.purge_batch(pool, retention, batch).await?;
            total += done;
            if done < batch.max(1) as u64 {
                return Ok(total);
            }
        }
    }

    /// Deletes at most `batch` records older than `retention` (one
    /// statement); returns how many.
    pub async fn purge_batch(
        &self,
        pool: &PgPool,
        retention: Duration,
        batch: usize,
    ) -> Result<u64> {
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        Ok(sqlx::query(&self.purge)
            .bind(retention_ms)
            .bind(batch.max(1) as i64)
            .execute(pool)
            .await?
            .rows_affected())
    }
}
