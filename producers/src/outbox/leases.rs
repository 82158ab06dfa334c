//! How several relays share one outbox: slots and leases in PostgreSQL.
//!
//! Every row belongs to slot `key_hash % slots`, so all events of a key are
//! in one slot. A relay publishes a slot's rows only while it holds the
//! slot's lease:
//! - each relay upserts a heartbeat row every `heartbeat`; the relays seen
//!   within `session_timeout`, sorted by id, split the slots round-robin;
//! - a lease is taken with one conditional `UPDATE`: only when it is free,
//!   already this process's (its owner is the relay id and a per-process
//!   token, so a restart under the same id waits for the old leases), or
//!   expired (expiry by the database's clock, so relays'
//!   clocks never matter); the relay renews it with the same statement each
//!   heartbeat, for `session_timeout`;
//! - the relay trusts a lease for 60 % of `session_timeout` after it *sent*
//!   the renewal, by its own monotonic clock: it stops publishing a slot
//!   before anyone else may take it, so one key is published by one relay
//!   at a time;
//! - slots a relay no longer should own are released between batches (no
//!   batch is in flight then), and a killed relay's slots are free when its
//!   leases expire, `session_timeout` after its last renewal.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;

use super::error::{OutboxError, Result};
use super::tables::OutboxTables;

/// The leases this relay holds and until when it may trust them.
#[derive(Debug)]
pub(crate) struct SlotLeases {
    tables: OutboxTables,
    relay_id: String,
    slots: u32,
    session_timeout: Duration,
    owned: BTreeSet<u32>,
    /// Until when `owned` may be published (monotonic clock).
    valid_until: Option<Instant>,
    /// This process's token in the relays table.
    token: String,
    /// What a lease's `owner` holds while this process has it: the relay
    /// id and the token, so a second process given the same id (a restart,
    /// a duplicate) never takes over leases the first still holds — even
    /// once it holds the id's relays row — but waits for them to expire.
    holder: String,
    /// Whether the last heartbeat found the id held by another process.
    id_in_use: bool,
}

/// The fraction of the session timeout a relay trusts its leases for.
const VALIDITY: f64 = 0.6;

impl SlotLeases {
    pub(crate) fn new(
        tables: OutboxTables,
        relay_id: String,
        slots: u32,
        session_timeout: Duration,
    ) -> Self {
        let token = format!("{:016x}", rand::random::<u64>());
        SlotLeases {
            holder: format!("{relay_id}#{token}"),
            tables,
            relay_id,
            slots,
            session_timeout,
            owned: BTreeSet::new(),
            valid_until: None,
            token,
            id_in_use: false,
        }
    }

    /// Creates the slots' lease rows; refuses when live relays split the
    /// outbox into another number of slots (the key → relay mapping would
    /// differ and two relays could publish one key).
    pub(crate) async fn prepare(&self, pool: &PgPool) -> Result<()> {
        let leases = self.tables.leases();
        let mut tx = pool.begin().await?;
        sqlx::query(&format!("LOCK TABLE {leases} IN EXCLUSIVE MODE"))
            .execute(&mut *tx)
            .await?;
        let relays = self.tables.relays();
        let session_ms = i64::try_from(self.session_timeout.as_millis()).unwrap_or(i64::MAX);
        let existing: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {leases}"))
            .fetch_one(&mut *tx)
            .await?;
        // Another live process: any fresh heartbeat but this process's own
        // (a process under this relay id with another token counts: a
        // restart while the old one still runs), and any lease someone
        // still trusts (its holder's heartbeat may be stale while it
        // publishes on: trust is counted from the lease's renewal).
        let held: i64 = sqlx::query_scalar(&format!(
            "SELECT (SELECT count(*) FROM {relays} \
             WHERE heartbeat_at > clock_timestamp() - $1 * interval '1 millisecond' \
             AND (relay_id <> $2 OR token IS DISTINCT FROM $3)) \
             + (SELECT count(*) FROM {leases} \
             WHERE owner IS NOT NULL AND expires_at > clock_timestamp())"
        ))
        .bind(session_ms)
        .bind(&self.relay_id)
        .bind(&self.token)
        .fetch_one(&mut *tx)
        .await?;
        if existing != i64::from(self.slots) {
            if held > 0 {
                return Err(OutboxError::config("relay.slots", self.mismatch(existing)));
            }
            sqlx::query(&format!("DELETE FROM {leases}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "INSERT INTO {leases} (slot) SELECT generate_series(0, $1 - 1)"
            ))
            .bind(i32::try_from(self.slots).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The slots this relay may publish now (empty once the leases are no
    /// longer trusted).
    pub(crate) fn publishable(&self) -> Vec<u32> {
        match self.valid_until {
            Some(until) if Instant::now() < until => self.owned.iter().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// How long the leases stay trusted from now.
    pub(crate) fn remaining(&self) -> Duration {
        self.valid_until
            .map(|until| until.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// The number of slots rows are spread over.
    pub(crate) fn slots(&self) -> u32 {
        self.slots
    }

    /// One heartbeat: records this relay as alive, releases the slots it
    /// should no longer own and takes or renews the ones it should. Call it
    /// only between batches.
    pub(crate) async fn heartbeat(&mut self, pool: &PgPool) -> Result<()> {
        let relays = self.tables.relays();
        let leases = self.tables.leases();
        let session_ms = i64::try_from(self.session_timeout.as_millis()).unwrap_or(i64::MAX);
        // Separate statements, no transaction: each UPDATE locks its lease
        // rows in slot order, so relays releasing and taking crossing slots
        // at once cannot deadlock.
        let existing: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {leases}"))
            .fetch_one(pool)
            .await?;
        if existing != i64::from(self.slots) {
            // Another relay re-split the outbox: stop before publishing
            // under a different key → slot mapping.
            self.owned.clear();
            self.valid_until = None;
            return Err(OutboxError::config("relay.slots", self.mismatch(existing)));
        }
        // The row is ours when it carries our token, or when whoever had
        // the id went silent for a whole session (a restart under the same
        // id). Another live process with this id keeps it: this one waits
        // and publishes nothing, rather than sharing its leases.
        let beat = sqlx::query(&format!(
            "INSERT INTO {relays} (relay_id, heartbeat_at, token) \
             VALUES ($1, clock_timestamp(), $2) \
             ON CONFLICT (relay_id) DO UPDATE \
             SET heartbeat_at = excluded.heartbeat_at, token = excluded.token \
             WHERE {relays}.token = excluded.token \
             OR {relays}.heartbeat_at < clock_timestamp() - $3 * interval '1 millisecond'"
        ))
        .bind(&self.relay_id)
        .bind(&self.token)
        .bind(session_ms)
        .execute(pool)
        .await?;
        if beat.rows_affected() == 0 {
            if !self.id_in_use {
                tracing::error!(
                    relay = %self.relay_id,
                    "another live relay uses this relay id; this one waits until it is gone \
                     (give every relay its own id)"
                );
            }
            self.id_in_use = true;
            self.owned.clear();
            self.valid_until = None;
            return Ok(());
        }
        self.id_in_use = false;
        let live: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT relay_id FROM {relays} \
             WHERE heartbeat_at > clock_timestamp() - $1 * interval '1 millisecond' \
             ORDER BY relay_id"
        ))
        .bind(session_ms)
        .fetch_all(pool)
        .await?;
        let desired = desired_slots(&live, &self.relay_id, self.slots);
        let want: Vec<i32> = desired.iter().map(|&s| s as i32).collect();
        // Slots given back are no longer published from here on, before
        // the release is sent: a release that commits while this call
        // fails (a later statement's error, a lost reply) must not leave
        // this relay publishing slots another one may take at once.
        let before = self.owned.clone();
        self.owned.retain(|s| desired.contains(s));
        // Everything held beyond the desired slots goes back, including
        // leases this relay stopped trusting but still holds on record.
        sqlx::query(&format!(
            "UPDATE {leases} SET owner = NULL, expires_at = '-infinity' \
             WHERE owner = $2 AND slot <> ALL($1)"
        ))
        .bind(&want)
        .bind(&self.holder)
        .execute(pool)
        .await?;
        // Trust is counted from before the statement that sets the
        // leases' expiry (by the database's clock, after this instant).
        let sent = Instant::now();
        // Only under this relay's slot count, checked in the same
        // statement: a relay with another count that re-split the outbox
        // since the check above (possible once this one's heartbeat went
        // stale) leaves this one nothing, so the two never publish one key.
        // (The re-split holds the table's lock until it commits; this
        // statement waits for it and then sees the new rows.)
        let held: Vec<i32> = sqlx::query_scalar(&format!(
            "UPDATE {leases} SET owner = $2, \
             expires_at = clock_timestamp() + $3 * interval '1 millisecond', \
             epoch = CASE WHEN owner IS DISTINCT FROM $2 THEN epoch + 1 ELSE epoch END \
             WHERE slot = ANY($1) \
             AND (owner = $2 OR owner IS NULL OR expires_at < clock_timestamp()) \
             AND (SELECT count(*) FROM {leases}) = $4 \
             RETURNING slot"
        ))
        .bind(&want)
        .bind(&self.holder)
        .bind(session_ms)
        .bind(i64::from(self.slots))
        .fetch_all(pool)
        .await?;
        self.owned = held.into_iter().map(|s| s as u32).collect();
        self.valid_until = Some(sent + self.session_timeout.mul_f64(VALIDITY));
        // Relays gone for a long time are forgotten; housekeeping, which
        // must not undo the leases just taken when it fails.
        if let Err(e) = sqlx::query(&format!(
            "DELETE FROM {relays} \
             WHERE heartbeat_at < clock_timestamp() - $1 * 10 * interval '1 millisecond'"
        ))
        .bind(session_ms)
        .execute(pool)
        .await
        {
            tracing::debug!(error = %e, "relay cannot forget long-gone relays");
        }
        if before != self.owned {
            tracing::info!(
                relay = %self.relay_id,
                live = live.len(),
                slots = ?self.owned,
                "relay slots changed"
            );
        }
        Ok(())
    }

    fn mismatch(&self, existing: i64) -> String {
        format!(
            "running relays split this outbox into {existing} slots, this relay into {}; every \
             relay of an outbox must use the same number (or stop them all to change it: the \
             leases of a relay that stopped without releasing them run out within the session \
             timeout, {:?})",
            self.slots, self.session_timeout
        )
    }

    /// Stops trusting the leases (after a failed heartbeat that may or may
    /// not have renewed them, nothing changes in the database).
    pub(crate) fn lapse_if_expired(&mut self) {
        if self.remaining().is_zero() && !self.owned.is_empty() {
            tracing::warn!(relay = %self.relay_id, "relay leases lapsed: could not renew them in time");
            self.owned.clear();
        }
    }

    /// Releases every lease and forgets this relay (graceful shutdown).
    pub(crate) async fn leave(&mut self, pool: &PgPool) -> Result<()> {
        let leases = self.tables.leases();
        let relays = self.tables.relays();
        let mut tx = pool.begin().await?;
        // Only the process whose token holds the id releases its leases:
        // a duplicate that waited must not release the live relay's.
        let ours = sqlx::query(&format!(
            "DELETE FROM {relays} WHERE relay_id = $1 AND token = $2"
        ))
        .bind(&self.relay_id)
        .bind(&self.token)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if ours {
            sqlx::query(&format!(
                "UPDATE {leases} SET owner = NULL, expires_at = '-infinity' WHERE owner = $1"
            ))
            .bind(&self.holder)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.owned.clear();
        self.valid_until = None;
        Ok(())
    }
}

/// The slots `me` should own: the live relays, sorted, take them
/// round-robin. A relay missing from the live ones (its heartbeat raced
/// the read) counts itself in.
fn desired_slots(live: &[String], me: &str, slots: u32) -> BTreeSet<u32> {
    let mut members: Vec<&str> = live.iter().map(String::as_str).collect();
    if !members.contains(&me) {
        members.push(me);
        members.sort_unstable();
    }
    let count = members.len() as u32;
    let index = members.iter().position(|m| *m == me).unwrap_or(0) as u32;
    (0..slots).filter(|s| s % count == index).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_relays_split_every_slot_once() {
        let live: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut all = BTreeSet::new();
        for me in ["a", "b", "c"] {
            let mine = desired_slots(&live, me, 16);
            assert!(mine.len() >= 5);
            assert!(all.is_disjoint(&mine));
            all.extend(mine);
        }
        assert_eq!(all, (0..16).collect());
        assert_eq!(desired_slots(&[], "x", 4), (0..4).collect());
    }
}
