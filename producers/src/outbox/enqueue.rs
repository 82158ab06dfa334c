//! [`Outbox`]: enqueue events inside the caller's own database transaction.
//!
//! The row is an ordinary insert into the outbox table, so it becomes
//! visible — and publishable — exactly when the caller's transaction
//! commits, and never if it rolls back. The same statement signals the relay
//! through `pg_notify`, which PostgreSQL delivers only at commit (and once
//! per transaction, however many events it enqueued).

use std::collections::BTreeMap;
use std::sync::Arc;

use keel_core::partition::murmur2;
use keel_core::{Envelope, EventId, Key};
use keel_schemas::AvroCodec;
use keel_schemas::events::Event;
use sqlx::PgConnection;
use uuid::Uuid;

use super::error::{OutboxError, Result};
use super::tables::OutboxTables;

const COLUMNS: &str = "topic, event_id, event_type, event_key, key_hash, occurred_at, source, \
     correlation_id, causation_id, traceparent, tracestate, headers, payload";

/// Writes events into the outbox table in the caller's transaction.
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool, outbox: keel_producers::outbox::Outbox,
/// #            order: keel_schemas::events::OrderPlaced) -> anyhow::Result<()> {
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind(order.order_id).execute(&mut *tx).await?;
/// outbox.enqueue_event(&mut tx, "orders", order.order_id.to_string(), &order).await?;
/// tx.commit().await?; // the event is published after this, never without it
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Outbox {
    tables: OutboxTables,
    codec: Arc<AvroCodec>,
    insert_one: Arc<str>,
    /// A batch of at most [`KEY_LOCKS_MAX`] keys: per-key locks.
    insert_keys: Arc<str>,
    /// A larger batch: bucket locks.
    insert_buckets: Arc<str>,
    /// First key of the per-key advisory locks: this outbox's own.
    lock_class: i32,
}

/// Buckets of the coarse advisory locks: a batch of many keys locks the
/// buckets of its keys, so it stays well inside PostgreSQL's lock table
/// (`max_locks_per_transaction` × connections) however large it is.
const KEY_LOCK_BUCKETS: i32 = 1024;

/// Batches with at most this many distinct keys lock each key itself (two
/// locks per key, see [`Outbox::new`]); larger ones lock buckets.
const KEY_LOCKS_MAX: usize = 256;

impl Outbox {
    /// An outbox in `tables` (created by [`OutboxTables::migrate`]) that
    /// encodes typed events with `codec`.
    pub fn new(tables: OutboxTables, codec: Arc<AvroCodec>) -> Self {
        let outbox = tables.outbox();
        // Same-key enqueues take transaction-scoped advisory locks before
        // the row gets its id: a second transaction enqueuing the key waits
        // until the first commits or rolls back, so a key's ids are
        // allocated in commit order and the relay's id order is the key's
        // commit order even without the application's own lock.
        //
        // Two granularities, so that unrelated keys do not wait for each
        // other and a large batch still takes a bounded number of locks:
        // - a transaction enqueuing few keys takes its keys' buckets in
        //   share mode, then each key's own lock (exclusive, in the bigint
        //   key space: `lock_class << 32 | key_hash`);
        // - a batch of more than `KEY_LOCKS_MAX` keys takes its keys'
        //   buckets exclusively (at most `KEY_LOCK_BUCKETS` locks).
        // Two few-key transactions meet on a key's lock only; a large batch
        // meets every other transaction on the bucket. (With buckets alone,
        // two concurrent 100-key transactions almost always shared a bucket
        // of 1,024 and ran one after the other.) Every transaction takes
        // buckets before keys, each in ascending order, so the locks of one
        // statement cannot deadlock with another's.
        let insert_one = format!(
            "WITH enqueued AS (INSERT INTO {outbox} ({COLUMNS}) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13 \
             FROM (SELECT pg_advisory_xact_lock_shared($15, $5 % {KEY_LOCK_BUCKETS}), \
                          pg_advisory_xact_lock($16)) AS key_lock \
             RETURNING 1) \
             SELECT pg_notify($14, '') FROM enqueued"
        );
        // Rows are inserted (and get their ids) in the batch's order; a
        // data-modifying CTE runs to completion whatever the outer query
        // reads, so LIMIT 1 notifies once and still inserts every row.
        // $16: the distinct buckets, ascending; $17: the distinct per-key
        // lock keys, ascending (empty for a bucket-locked batch). Each
        // lock count is used by what follows it (always true conditions):
        // the key locks are taken only after the bucket locks, and the
        // planner cannot drop either set as unused (it does drop a
        // `UNION ALL` of the two whose count nothing reads).
        let insert_many = |bucket_lock: &str| {
            format!(
                "WITH enqueued AS (INSERT INTO {outbox} ({COLUMNS}) \
                 SELECT t, e, y, k, h, o, s, c, a, tp, ts, hd::jsonb, p \
                 FROM (SELECT count(*) FROM (SELECT {bucket_lock}($15, b) \
                       FROM UNNEST($16::int4[]) AS b) AS bl) AS buckets_locked(buckets) \
                 CROSS JOIN LATERAL (SELECT count(*) FROM (SELECT pg_advisory_xact_lock(l) \
                       FROM UNNEST($17::int8[]) AS l WHERE buckets_locked.buckets >= 0) AS kl) AS keys_locked(keys) \
                 CROSS JOIN UNNEST(\
                 $1::text[], $2::uuid[], $3::text[], $4::bytea[], $5::int4[], $6::timestamptz[], \
                 $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bytea[]) \
                 WITH ORDINALITY AS u(t, e, y, k, h, o, s, c, a, tp, ts, hd, p, n) \
                 WHERE keys_locked.keys >= 0 ORDER BY n RETURNING 1) \
                 SELECT pg_notify($14, '') FROM enqueued LIMIT 1"
            )
        };
        let lock_class = murmur2(tables.channel().as_bytes());
        Outbox {
            tables,
            codec,
            insert_one: insert_one.into(),
            insert_keys: insert_many("pg_advisory_xact_lock_shared").into(),
            insert_buckets: insert_many("pg_advisory_xact_lock").into(),
            lock_class,
        }
    }

    /// Puts parked rows back in line (attempts reset, error kept until the
    /// next attempt), all of them or those of `topic`; returns how many.
    /// For after the cause was fixed (a topic created, a limit raised).
    /// [`super::parked`] also lists them and picks them by id.
    pub async fn requeue_parked(&self, pool: &sqlx::PgPool, topic: Option<&str>) -> Result<u64> {
        let filter = super::parked::ParkedFilter::topic(topic);
        super::parked::requeue(pool, &self.tables, &filter).await
    }

    /// Deletes parked rows — all of them or those of `topic` — that will
    /// never be published, so their keys' later rows go on; returns them
    /// (payloads aside). [`super::parked::discard`] also picks them by id.
    pub async fn discard_parked(
        &self,
        pool: &sqlx::PgPool,
        topic: Option<&str>,
    ) -> Result<Vec<super::parked::ParkedRow>> {
        let filter = super::parked::ParkedFilter::topic(topic);
        super::parked::discard(pool, &self.tables, &filter).await
    }

    /// The codec typed events are encoded with.
    pub fn codec(&self) -> &Arc<AvroCodec> {
        &self.codec
    }

    /// The tables this outbox writes.
    pub fn tables(&self) -> &OutboxTables {
        &self.tables
    }

    /// Encodes `event` for `topic` (Confluent-framed Avro through the
    /// registry) into a new envelope keyed by `key`. Add correlation,
    /// causation or trace context to it, then [`enqueue`](Self::enqueue) it.
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
        tx: &mut PgConnection,
        topic: &str,
        key: impl Into<Key>,
        event: &T,
    ) -> Result<EventId> {
        let envelope = self.envelope(topic, key, event).await?;
        let id = envelope.id();
        self.enqueue(tx, topic, &envelope).await?;
        Ok(id)
    }

    /// Enqueues an already encoded event in `tx` (pass a transaction: the
    /// event is published once it commits). Waits while another open
    /// transaction holds an enqueued event of the same key (or, for an
    /// [`enqueue_batch`](Self::enqueue_batch) of more than 256 keys, of a
    /// key in the same of 1,024 lock buckets). Transactions enqueuing
    /// several keys in separate statements can deadlock like any row locks:
    /// two taking the same keys in different orders, or one against such a
    /// large batch whatever its order (the batch locks buckets in bucket
    /// order, not key order). PostgreSQL then aborts one with a retriable
    /// error ([`OutboxError::is_retriable`](super::OutboxError::is_retriable)):
    /// run that transaction again.
    pub async fn enqueue(
        &self,
        tx: &mut PgConnection,
        topic: &str,
        event: &Envelope,
    ) -> Result<()> {
        let row = Row::new(topic, event)?;
        sqlx::query(&self.insert_one)
            .bind(row.topic)
            .bind(row.event_id)
            .bind(row.event_type)
            .bind(row.key)
            .bind(row.key_hash)
            .bind(row.occurred_at)
            .bind(row.source)
            .bind(row.correlation_id)
            .bind(row.causation_id)
            .bind(row.traceparent)
            .bind(row.tracestate)
            .bind(row.headers)
            .bind(row.payload)
            .bind(self.tables.channel())
            .bind(self.lock_class)
            .bind(key_lock(self.lock_class, row.key_hash))
            .execute(tx)
            .await
            .map_err(|e| duplicate_or(e, &self.tables, &[event]))?;
        Ok(())
    }

    /// Enqueues several events (any topics) in one statement, in order.
    pub async fn enqueue_batch(
        &self,
        tx: &mut PgConnection,
        events: &[(&str, &Envelope)],
    ) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut columns = Columns::with_capacity(events.len());
        for (topic, event) in events {
            columns.push(Row::new(topic, event)?);
        }
        let (sql, buckets, keys) = self.locks(&columns.key_hash);
        sqlx::query(sql)
            .bind(columns.topic)
            .bind(columns.event_id)
            .bind(columns.event_type)
            .bind(columns.key)
            .bind(columns.key_hash)
            .bind(columns.occurred_at)
            .bind(columns.source)
            .bind(columns.correlation_id)
            .bind(columns.causation_id)
            .bind(columns.traceparent)
            .bind(columns.tracestate)
            .bind(columns.headers)
            .bind(columns.payload)
            .bind(self.tables.channel())
            .bind(self.lock_class)
            .bind(buckets)
            .bind(keys)
            .execute(tx)
            .await
            .map_err(|e| {
                let all: Vec<&Envelope> = events.iter().map(|(_, e)| *e).collect();
                duplicate_or(e, &self.tables, &all)
            })?;
        Ok(())
    }

    /// The batch statement for these key hashes, with its bucket and
    /// per-key lock arrays (distinct, ascending).
    fn locks(&self, hashes: &[i32]) -> (&str, Vec<i32>, Vec<i64>) {
        let mut unique = hashes.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let mut buckets: Vec<i32> = unique.iter().map(|h| h % KEY_LOCK_BUCKETS).collect();
        buckets.sort_unstable();
        buckets.dedup();
        if unique.len() > KEY_LOCKS_MAX {
            return (&self.insert_buckets, buckets, Vec::new());
        }
        let keys = unique
            .iter()
            .map(|&h| key_lock(self.lock_class, h))
            .collect();
        (&self.insert_keys, buckets, keys)
    }
}

/// The per-key lock of `key_hash` (non-negative) in `lock_class`: the
/// class in the high half, so each outbox has its own keys; ascending in
/// the hash within a class.
fn key_lock(lock_class: i32, key_hash: i32) -> i64 {
    (i64::from(lock_class) << 32) | i64::from(key_hash)
}

/// One outbox row, as bound to the insert.
pub(crate) struct Row<'a> {
    pub(crate) topic: &'a str,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: &'a str,
    pub(crate) key: &'a [u8],
    pub(crate) key_hash: i32,
    pub(crate) occurred_at: chrono::DateTime<chrono::Utc>,
    pub(crate) source: Option<&'a str>,
    pub(crate) correlation_id: Option<&'a str>,
    pub(crate) causation_id: Option<&'a str>,
    pub(crate) traceparent: Option<&'a str>,
    pub(crate) tracestate: Option<&'a str>,
    pub(crate) headers: String,
    pub(crate) payload: &'a [u8],
}

impl<'a> Row<'a> {
    pub(crate) fn new(topic: &'a str, event: &'a Envelope) -> Result<Self> {
        // Refuse what the wire would refuse now, in the caller's
        // transaction, rather than parking the row later.
        keel_core::wire::visit_headers(event, |_, _| {})?;
        if topic.is_empty() {
            return Err(OutboxError::Event(keel_core::Error::malformed(
                "the outbox needs a topic name for every event",
            )));
        }
        // A header given more than once (an event read from a broker and
        // enqueued again) is stored as the list of its values.
        let headers = if event.has_repeated_headers() {
            serde_json::to_string(&keel_core::wire::group_headers(event.all_headers()))
        } else {
            serde_json::to_string::<BTreeMap<String, String>>(event.headers())
        };
        Ok(Row {
            topic,
            event_id: *event.id().as_uuid(),
            event_type: event.event_type(),
            key: event.key().as_bytes(),
            key_hash: key_hash(event.key()),
            occurred_at: event.occurred_at(),
            source: event.source(),
            correlation_id: event.correlation_id(),
            causation_id: event.causation_id(),
            traceparent: event.trace().traceparent.as_deref(),
            tracestate: event.trace().tracestate.as_deref(),
            headers: headers.unwrap_or_else(|_| "{}".into()),
            payload: event.payload(),
        })
    }
}

/// The rows of a batch as one array per column, for `UNNEST`.
#[derive(Default)]
struct Columns<'a> {
    topic: Vec<&'a str>,
    event_id: Vec<Uuid>,
    event_type: Vec<&'a str>,
    key: Vec<&'a [u8]>,
    key_hash: Vec<i32>,
    occurred_at: Vec<chrono::DateTime<chrono::Utc>>,
    source: Vec<Option<&'a str>>,
    correlation_id: Vec<Option<&'a str>>,
    causation_id: Vec<Option<&'a str>>,
    traceparent: Vec<Option<&'a str>>,
    tracestate: Vec<Option<&'a str>>,
    headers: Vec<String>,
    payload: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    fn with_capacity(n: usize) -> Self {
        Columns {
            topic: Vec::with_capacity(n),
            event_id: Vec::with_capacity(n),
            payload: Vec::with_capacity(n),
            ..Default::default()
        }
    }

    fn push(&mut self, row: Row<'a>) {
        self.topic.push(row.topic);
        self.event_id.push(row.event_id);
        self.event_type.push(row.event_type);
        self.key.push(row.key);
        self.key_hash.push(row.key_hash);
        self.occurred_at.push(row.occurred_at);
        self.source.push(row.source);
        self.correlation_id.push(row.correlation_id);
        self.causation_id.push(row.causation_id);
        self.traceparent.push(row.traceparent);
        self.tracestate.push(row.tracestate);
        self.headers.push(row.headers);
        self.payload.push(row.payload);
    }
}

/// `event` encoded for `topic` (Confluent-framed Avro through the codec's
/// registry) in a new envelope keyed by `key`.
pub(crate) async fn encode<T: Event + 'static>(
    codec: &AvroCodec,
    topic: &str,
    key: Key,
    event: &T,
) -> Result<Envelope> {
    let payload = codec.encode(topic, event).await?;
    Ok(Envelope::new(T::FULL_NAME, key, payload))
}

/// The key's slot hash: murmur2 made non-negative, as Kafka partitions.
pub(crate) fn key_hash(key: &Key) -> i32 {
    murmur2(key.as_bytes()) & 0x7fff_ffff
}

/// A unique violation on the event id becomes [`OutboxError::DuplicateEvent`].
fn duplicate_or(e: sqlx::Error, tables: &OutboxTables, events: &[&Envelope]) -> OutboxError {
    // Only the event id's own constraint (`<outbox>_event_id_key`, as
    // PostgreSQL names it): a unique index the application added is its
    // own error.
    if let sqlx::Error::Database(db) = &e
        && db.is_unique_violation()
        && db.constraint() == Some(format!("{}_event_id_key", tables.outbox_name()).as_str())
    {
        // PostgreSQL names the value in the detail: `Key (event_id)=(…)`.
        let detail = db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .and_then(|pg| pg.detail())
            .unwrap_or_default();
        if let Some(event) = events
            .iter()
            .find(|ev| detail.contains(&ev.id().to_string()))
            .or(events.first())
        {
            return OutboxError::DuplicateEvent(event.id());
        }
    }
    OutboxError::Database(e)
}
