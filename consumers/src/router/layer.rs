//! Middleware: a [`Layer`] wraps the rest of the handling chain ([`Next`])
//! and may act before it, after it, or instead of it, and turn its
//! [`Verdict`] into another.
//!
//! The router settles each delivery from the chain's final verdict:
//! [`Handled`](Verdict::Handled) and [`Skipped`](Verdict::Skipped) ack it,
//! [`DeadLettered`](Verdict::DeadLettered) terminates it; [`Retry`](Verdict::Retry)
//! and [`Backoff`](Verdict::Backoff) nack it for re-delivery (later events
//! of its key wait, other keys flow);
//! [`DeadLetter`](Verdict::DeadLetter) left over — no dead-letter layer took
//! it — is retried at the slowest pace, never dropped.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use keel_core::Error;

use super::context::Context;
use super::handler::{Endpoint, Route};

/// Why an event goes to dead letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The bytes are not a decodable event (not a Keel record, bad framing,
    /// unknown schema id, Avro that does not match): retrying cannot help.
    Poison,
    /// No handler is registered for the event type (and the router's policy
    /// dead-letters those).
    UnknownType,
    /// The handler failed with a non-retriable error.
    Fatal,
    /// The handler kept failing until the retry budget was spent.
    Exhausted,
}

impl DeadLetterReason {
    /// The reason as written into the dead-letter record's headers.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Poison => "poison",
            DeadLetterReason::UnknownType => "unknown-type",
            DeadLetterReason::Fatal => "fatal",
            DeadLetterReason::Exhausted => "retries-exhausted",
        }
    }

    /// Whether a handler ran and failed (as opposed to the event never
    /// reaching one).
    pub fn is_handler_failure(self) -> bool {
        matches!(self, DeadLetterReason::Fatal | DeadLetterReason::Exhausted)
    }

    /// Parses [`as_str`](Self::as_str)'s text back.
    pub fn parse(text: &str) -> Option<DeadLetterReason> {
        [
            DeadLetterReason::Poison,
            DeadLetterReason::UnknownType,
            DeadLetterReason::Fatal,
            DeadLetterReason::Exhausted,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of one delivery.
#[derive(Debug)]
pub enum Verdict {
    /// The handler succeeded: ack.
    Handled,
    /// Deliberately not handled (already applied per the inbox, an event
    /// type nobody handles): ack.
    Skipped {
        /// Why, for logs and metrics (`duplicate`, `unknown-type`).
        reason: &'static str,
    },
    /// Failed, and may succeed later: re-deliver after `delay` (`None`: the
    /// router's default backoff; the retry layer sets it).
    Retry {
        /// What failed.
        error: Error,
        /// When to try again.
        delay: Option<Duration>,
    },
    /// Something the handling depends on is unavailable (the schema
    /// registry, the database, the dead-letter topic) or misconfigured: not
    /// the event's fault, so re-deliver after `delay` (`None`: the retry
    /// layer's backoff) without spending its retry budget.
    Backoff {
        /// What is unavailable.
        error: Error,
        /// When to try again.
        delay: Option<Duration>,
    },
    /// Cannot be handled: send it to dead letters.
    DeadLetter {
        /// What failed.
        error: Error,
        /// Why it is dead.
        reason: DeadLetterReason,
    },
    /// Stored in a dead-letter topic: terminate (given up for good).
    DeadLettered {
        /// The dead-letter topic.
        topic: String,
        /// Why it is dead.
        reason: DeadLetterReason,
    },
}

impl Verdict {
    /// A handler's result as a verdict: `Ok` is handled, a retriable error
    /// is retried, a configuration error (e.g. a handler asking for the
    /// inbox's transaction where no inbox layer runs) backs off until it is
    /// fixed, any other error is dead-lettered.
    pub fn from_result(result: keel_core::Result<()>) -> Verdict {
        match result {
            Ok(()) => Verdict::Handled,
            Err(error @ Error::Config { .. }) => Verdict::Backoff { error, delay: None },
            Err(error) if error.is_retriable() => Verdict::Retry { error, delay: None },
            Err(error) => Verdict::DeadLetter {
                error,
                reason: DeadLetterReason::Fatal,
            },
        }
    }

    /// A short name for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Handled => "handled",
            Verdict::Skipped { .. } => "skipped",
            Verdict::Retry { .. } => "retry",
            Verdict::Backoff { .. } => "backoff",
            Verdict::DeadLetter { .. } => "dead-letter",
            Verdict::DeadLettered { .. } => "dead-lettered",
        }
    }
}

/// A middleware layer. Call `next.run(ctx)` to run the rest of the chain
/// (or don't, to answer instead of it).
///
/// ```
/// use async_trait::async_trait;
/// use keel_consumers::router::{Context, Layer, Next, Verdict};
///
/// /// Logs every event that was skipped.
/// struct LogSkips;
///
/// #[async_trait]
/// impl Layer for LogSkips {
///     async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
///         let verdict = next.run(ctx).await;
///         if let Verdict::Skipped { reason } = &verdict {
///             tracing::info!(at = %ctx.info().coordinates, reason, "skipped");
///         }
///         verdict
///     }
/// }
/// ```
#[async_trait]
pub trait Layer: Send + Sync + 'static {
    /// Handles `ctx`, usually by running `next` around some work of its own.
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict;

    /// Called once when the router starts, with the topics it consumes
    /// (e.g. to create dead-letter topics). An error stops the start.
    async fn start(&self, _topics: &[String]) -> keel_core::Result<()> {
        Ok(())
    }
}

/// A shared layer (e.g. one whose state the caller also reads).
#[async_trait]
impl<L: Layer + ?Sized> Layer for Arc<L> {
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        (**self).call(ctx, next).await
    }

    async fn start(&self, topics: &[String]) -> keel_core::Result<()> {
        (**self).start(topics).await
    }
}

/// The rest of the chain after a layer.
#[derive(Clone, Copy)]
pub struct Next<'a> {
    pub(crate) layers: &'a [Arc<dyn Layer>],
    pub(crate) endpoint: &'a Endpoint,
    /// The handler registered for the event's type, if any.
    pub(crate) route: Option<&'a dyn Route>,
}

impl Next<'_> {
    /// Runs the remaining layers and then the handler. A layer that panics
    /// fails the attempt as a panicking handler does: the layers around it
    /// see a [`Verdict::Retry`], so where it runs inside the retry and
    /// dead-letter layers (as a layer added after `standard_layers` does)
    /// the retry budget and dead letters apply — a layer's bug dead-letters
    /// the events it meets (to be redriven once fixed) rather than stalling
    /// their keys for good. A panic in the dispatch or the handler itself
    /// is caught here too, as the handler's.
    pub async fn run(self, ctx: &mut Context) -> Verdict {
        match self.layers.split_first() {
            // Through the `dyn Layer` itself: calling on the `Arc` would
            // go through `Layer for Arc<L>` and box every layer's future
            // twice.
            Some((layer, rest)) => {
                let call = (**layer).call(
                    ctx,
                    Next {
                        layers: rest,
                        ..self
                    },
                );
                AssertUnwindSafe(call)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| panicked("a middleware layer", panic.as_ref()))
            }
            None => AssertUnwindSafe(self.endpoint.call(ctx, self.route))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| panicked("handler", panic.as_ref())),
        }
    }
}

/// The verdict for a panic in `what`: a failed attempt.
fn panicked(what: &str, panic: &(dyn std::any::Any + Send)) -> Verdict {
    Verdict::Retry {
        error: Error::retriable(format!(
            "{what} panicked: {}",
            crate::pump::panic_text(panic)
        )),
        delay: None,
    }
}

impl fmt::Debug for Next<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Next")
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}
