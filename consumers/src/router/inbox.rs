//! Inbox de-duplication: the handler's database effect happens once per
//! event and consumer group, however often the event is delivered.
//!
//! Before the handler runs, the layer opens a transaction and records
//! `(group, event id)` in the inbox table (the outbox issue's
//! [`Inbox`]). If the event is already recorded, the handler is skipped and
//! the delivery acked. Otherwise the handler applies its effect — and
//! enqueues follow-up events into the outbox — on that transaction
//! ([`EventContext::transaction`](super::EventContext::transaction),
//! [`EventContext::enqueue`](super::EventContext::enqueue)), and the layer
//! commits it only when the handler succeeded: effect, inbox record and
//! follow-ups commit together or not at all. A failed commit is retried.
//!
//! Dead-lettered events are not recorded, so a redrive after a fix is
//! handled (once).
//!
//! Records are kept for a retention (7 days by default, Kafka's default
//! topic retention) and purged by the layer once a minute from the router's
//! start for as long as the layer exists (the router holds it while it
//! runs), a small batch per statement; several processes purging one inbox
//! only share the work.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::Error;
use keel_producers::outbox::{Inbox, Outbox, OutboxTables};
use sqlx::PgPool;

use super::context::{Context, outbox_error};
use super::layer::{Layer, Next, Verdict};

/// How long inbox records are kept by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How often records past the retention are purged by default.
pub const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Rows deleted per purge statement (small, to keep locks short).
const PURGE_BATCH: usize = 1000;

/// The longest retention taken (about 100 years; `None` keeps records).
const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The inbox layer.
#[derive(Clone, Debug)]
pub struct Inboxed {
    shared: Arc<Shared>,
    outbox: Option<Arc<Outbox>>,
    retention: Option<Duration>,
    purge_interval: Duration,
}

/// What the layer and its purge task share; the task stops once every
/// clone of the layer is gone.
#[derive(Debug)]
struct Shared {
    pool: PgPool,
    inbox: Inbox,
    /// Whether a purge task runs (one per layer, however often it starts).
    purging: std::sync::atomic::AtomicBool,
}

impl Inboxed {
    /// De-duplicates through the inbox table of `tables` on `pool` (migrate
    /// it first: [`OutboxTables::migrate`]).
    pub fn new(pool: PgPool, tables: &OutboxTables) -> Self {
        Inboxed {
            shared: Arc::new(Shared {
                pool,
                inbox: Inbox::new(tables),
                purging: Default::default(),
            }),
            outbox: None,
            retention: Some(DEFAULT_RETENTION),
            purge_interval: DEFAULT_PURGE_INTERVAL,
        }
    }

    /// Lets handlers enqueue follow-up events into `outbox` in the same
    /// transaction.
    pub fn with_outbox(mut self, outbox: Arc<Outbox>) -> Self {
        self.outbox = Some(outbox);
        self
    }

    /// Keeps records for `retention` (default [`DEFAULT_RETENTION`]), or
    /// for ever with `None` (purge them yourself: [`Inbox::purge`]). An
    /// event delivered again after its record was purged is applied again:
    /// keep records longer than the topic keeps events (its retention), or
    /// at least than any redelivery or redrive can take. Zero is refused
    /// when the router starts.
    pub fn retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self.own_purge();
        self
    }

    /// Gives this layer a purge of its own: a clone set up differently
    /// must not share the purge its original may already run.
    fn own_purge(&mut self) {
        self.shared = Arc::new(Shared {
            pool: self.shared.pool.clone(),
            inbox: self.shared.inbox.clone(),
            purging: Default::default(),
        });
    }

    /// How often records past the retention are purged (default
    /// [`DEFAULT_PURGE_INTERVAL`]; zero is refused when the router starts).
    pub fn purge_interval(mut self, every: Duration) -> Self {
        self.purge_interval = every;
        self.own_purge();
        self
    }

    /// Checks the purge settings.
    fn validate(&self) -> keel_core::Result<()> {
        if self.retention.is_some_and(|r| r.is_zero()) {
            return Err(Error::config(
                "inbox.retention",
                "must not be zero: a redelivered event would be applied again; \
                 give a duration (longer than the topic's retention) or None to keep records",
            ));
        }
        if self.retention.is_some_and(|r| r > MAX_RETENTION) {
            return Err(Error::config(
                "inbox.retention",
                "must be at most 100 years; None keeps records for ever",
            ));
        }
        if self.purge_interval.is_zero() {
            return Err(Error::config(
                "inbox.purge_interval",
                "must not be zero (the purge would run without a pause)",
            ));
        }
        Ok(())
    }
}

/// Marks the purge as no longer running when its task ends, also when
/// the task is dropped with its runtime: a later start runs it again.
struct Purging(Weak<Shared>);

impl Drop for Purging {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared
                .purging
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Purges `shared`'s inbox every `every` (the first at once) until the
/// layer is gone, a batch per statement (the layer looked for between
/// them, so a long first purge stops with it too).
async fn purge_loop(shared: Weak<Shared>, retention: Duration, every: Duration) {
    let _running = Purging(shared.clone());
    loop {
        let mut purged = 0;
        loop {
            let Some(layer) = shared.upgrade() else {
                return;
            };
            match layer
                .inbox
                .purge_batch(&layer.pool, retention, PURGE_BATCH)
                .await
            {
                Ok(done) => {
                    purged += done;
                    if done < PURGE_BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot purge the inbox; trying again at the next round");
                    break;
                }
            }
        }
        if purged > 0 {
            tracing::debug!(purged, "purged inbox records past their retention");
        }
        tokio::time::sleep(every).await;
    }
}

#[async_trait]
impl Layer for Inboxed {
    async fn start(&self, _topics: &[String]) -> keel_core::Result<()> {
        self.validate()?;
        if let Some(retention) = self.retention
            && !self
                .shared
                .purging
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tokio::spawn(purge_loop(
                Arc::downgrade(&self.shared),
                retention,
                self.purge_interval,
            ));
        }
        Ok(())
    }

    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        let Some(id) = ctx.event().map(keel_core::Envelope::id) else {
            // Not an event: nothing to record (it is poison, on its way to
            // dead letters).
            return next.run(ctx).await;
        };
        let group = ctx.info().group.clone();
        let tx = match self.shared.inbox.begin(&self.shared.pool, &group, id).await {
            Ok(Some(tx)) => tx,
            Ok(None) => {
                return Verdict::Skipped {
                    reason: "duplicate",
                };
            }
            // The database is unavailable: not the event's fault.
            Err(e) => {
                return Verdict::Backoff {
                    error: outbox_error(e),
                    delay: None,
                };
            }
        };
        ctx.begin(tx, self.outbox.clone());
        let verdict = next.run(ctx).await;
        let tx = ctx.take_transaction();
        match (verdict, tx) {
            (Verdict::Handled, Some(tx)) => match tx.commit().await {
                Ok(()) => Verdict::Handled,
                // The outcome of a commit whose answer was lost is unknown:
                // a retry finds the inbox record if it did commit.
                Err(e) => Verdict::Retry {
                    error: Error::retriable(format!(
                        "cannot commit the handler's transaction: {e}"
                    )),
                    delay: None,
                },
            },
            (Verdict::Handled, None) => Verdict::Retry {
                error: Error::retriable(
                    "the handler's transaction was gone before it could be committed",
                ),
                delay: None,
            },
            // Anything else rolls back (the transaction is dropped).
            (other, _) => other,
        }
    }
}
