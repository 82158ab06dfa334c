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

use std::sync::Arc;

use async_trait::async_trait;
use keel_core::Error;
use keel_producers::outbox::{Inbox, Outbox, OutboxTables};
use sqlx::PgPool;

use super::context::{Context, outbox_error};
use super::layer::{Layer, Next, Verdict};

/// The inbox layer.
#[derive(Clone, Debug)]
pub struct Inboxed {
    pool: PgPool,
    inbox: Inbox,
    outbox: Option<Arc<Outbox>>,
}

impl Inboxed {
    /// De-duplicates through the inbox table of `tables` on `pool` (migrate
    /// it first: [`OutboxTables::migrate`]).
    pub fn new(pool: PgPool, tables: &OutboxTables) -> Self {
        Inboxed {
            pool,
            inbox: Inbox::new(tables),
            outbox: None,
        }
    }

    /// Lets handlers enqueue follow-up events into `outbox` in the same
    /// transaction.
    pub fn with_outbox(mut self, outbox: Arc<Outbox>) -> Self {
        self.outbox = Some(outbox);
        self
    }
}

#[async_trait]
impl Layer for Inboxed {
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        let Some(id) = ctx.event().map(keel_core::Envelope::id) else {
            // Not an event: nothing to record (it is poison, on its way to
            // dead letters).
            return next.run(ctx).await;
        };
        let group = ctx.info().group.clone();
        let tx = match self.inbox.begin(&self.pool, &group, id).await {
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
