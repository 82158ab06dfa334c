//! A time limit per handling: a handler still running after it is
//! abandoned (its future dropped, so an open inbox transaction rolls back)
//! and the event is retried like any retriable failure.

use std::time::Duration;

use async_trait::async_trait;
use keel_core::Error;

use super::context::Context;
use super::layer::{Layer, Next, Verdict};

/// The timeout layer.
#[derive(Clone, Copy, Debug)]
pub struct Timeout {
    limit: Duration,
}

impl Timeout {
    /// Abandons handlings that take longer than `limit` (at least 1 ms).
    pub fn new(limit: Duration) -> keel_core::Result<Self> {
        if limit < Duration::from_millis(1) {
            return Err(Error::config("timeout", "must be at least 1 ms"));
        }
        Ok(Timeout { limit })
    }
}

#[async_trait]
impl Layer for Timeout {
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        match tokio::time::timeout(self.limit, next.run(ctx)).await {
            Ok(verdict) => verdict,
            Err(_) => {
                // The abandoned handling may have left its transaction in the
                // context: roll it back rather than let a later layer commit it.
                drop(ctx.take_transaction());
                Verdict::Retry {
                    error: Error::Timeout {
                        operation: format!("handling event at {}", ctx.info().coordinates),
                        after: self.limit,
                    },
                    delay: None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_core::Envelope;

    use super::*;
    use crate::router::testing::{run_layer, run_layer_async};

    #[tokio::test(start_paused = true)]
    async fn a_slow_handling_is_abandoned_and_retried() {
        let layer = Timeout::new(Duration::from_millis(50)).unwrap();
        let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 1);
        let verdict = run_layer_async(&layer, ctx, || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Verdict::Handled
        })
        .await;
        match verdict {
            Verdict::Retry { error, delay: None } => {
                assert!(error.is_retriable());
                assert!(
                    error.to_string().contains("timed out after 50ms"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
        let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 1);
        assert!(matches!(
            run_layer(&layer, ctx, || Verdict::Handled).await,
            Verdict::Handled
        ));
        assert!(Timeout::new(Duration::ZERO).is_err());
    }
}
