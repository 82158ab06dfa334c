//! Retries with exponential backoff, jitter and a budget.
//!
//! A retriable failure is nacked with a delay; the transport re-delivers the
//! event after it and holds the later events of the same key back until
//! then, while other keys — also in the same partition — keep flowing. Once
//! an event has failed `max_attempts` times, the failure becomes a dead
//! letter ([`DeadLetterReason::Exhausted`]). A [`Verdict::Backoff`] — a
//! dependency down, not the event's fault — gets the same backoff but never
//! spends the budget.
//!
//! Attempts are counted by the transport per delivery; a crash or a
//! rebalance starts the count again for the events it re-delivers (Kafka
//! keeps no per-message count), so the budget is per owner, at most.

use std::time::Duration;

use async_trait::async_trait;
use keel_core::Error;
use rand::Rng;

use super::context::Context;
use super::layer::{DeadLetterReason, Layer, Next, Verdict};

/// How often and how fast to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1). Default 5.
    pub max_attempts: u32,
    /// Delay after the first failure; doubles with each further one.
    /// Default 100 ms.
    pub initial_backoff: Duration,
    /// Upper bound of the delay. Default 30 s.
    pub max_backoff: Duration,
    /// Randomise each delay within its upper half (`[d/2, d]`), so that keys
    /// failing together do not retry in lock-step. Default on.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Longest backoff accepted: one day.
    pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);

    /// Refuses settings that cannot work, naming them.
    pub fn validate(&self) -> keel_core::Result<()> {
        if self.max_attempts == 0 {
            return Err(Error::config(
                "retry.max_attempts",
                "must be at least 1 (1 means: no retries)",
            ));
        }
        if self.max_backoff > Self::MAX_BACKOFF {
            return Err(Error::config(
                "retry.max_backoff",
                format!(
                    "{:?} is over the {:?} limit",
                    self.max_backoff,
                    Self::MAX_BACKOFF
                ),
            ));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(Error::config(
                "retry.max_backoff",
                format!(
                    "{:?} is below retry.initial_backoff ({:?})",
                    self.max_backoff, self.initial_backoff
                ),
            ));
        }
        Ok(())
    }

    /// The delay after failed attempt `attempt` (1-based), before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }

    /// The delay after failed attempt `attempt`, jittered when configured.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.backoff(attempt);
        if !self.jitter || ceiling.is_zero() {
            return ceiling;
        }
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=ceiling - half)
    }
}

/// The retry layer.
#[derive(Clone, Debug)]
pub struct Retry {
    policy: RetryPolicy,
}

impl Retry {
    /// A retry layer with `policy`; fails naming a bad setting.
    pub fn new(policy: RetryPolicy) -> keel_core::Result<Self> {
        policy.validate()?;
        Ok(Retry { policy })
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

#[async_trait]
impl Layer for Retry {
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        let attempt = ctx.info().attempt;
        match next.run(ctx).await {
            Verdict::Retry { error, .. } if attempt >= self.policy.max_attempts => {
                Verdict::DeadLetter {
                    error: Error::Handler {
                        retriable: false,
                        source: format!(
                            "gave up after {attempt} attempts (retry budget {}); last error: {error}",
                            self.policy.max_attempts
                        )
                        .into(),
                    },
                    reason: DeadLetterReason::Exhausted,
                }
            }
            Verdict::Retry { error, delay } => Verdict::Retry {
                error,
                delay: Some(delay.unwrap_or_else(|| self.policy.delay(attempt))),
            },
            // Not the event's fault: back off, budget untouched.
            Verdict::Backoff { error, delay } => Verdict::Backoff {
                error,
                delay: Some(delay.unwrap_or_else(|| self.policy.delay(attempt))),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_core::Envelope;

    use super::*;
    use crate::router::testing::run_layer;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            jitter: false,
        }
    }

    fn failing() -> Verdict {
        Verdict::Retry {
            error: Error::retriable("db busy"),
            delay: None,
        }
    }

    #[tokio::test]
    async fn failures_are_delayed_exponentially_until_the_budget_then_dead() {
        let retry = Retry::new(policy()).unwrap();
        for (attempt, want) in [(1, 100), (2, 200)] {
            let ctx = Context::for_test("t", Envelope::new("e", "k", ""), attempt);
            match run_layer(&retry, ctx, failing).await {
                Verdict::Retry { delay, .. } => {
                    assert_eq!(delay, Some(Duration::from_millis(want)));
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 3);
        match run_layer(&retry, ctx, failing).await {
            Verdict::DeadLetter { error, reason } => {
                assert_eq!(reason, DeadLetterReason::Exhausted);
                let text = error.to_string();
                assert!(text.contains("gave up after 3 attempts"), "{text}");
                assert!(text.contains("db busy"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        // An unavailable dependency backs off, however many attempts.
        let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 30);
        match run_layer(&retry, ctx, || Verdict::Backoff {
            error: Error::retriable("registry down"),
            delay: None,
        })
        .await
        {
            Verdict::Backoff { delay, .. } => assert_eq!(delay, Some(Duration::from_secs(1))),
            other => panic!("{other:?}"),
        }
        // Other verdicts pass untouched.
        let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 9);
        assert!(matches!(
            run_layer(&retry, ctx, || Verdict::Handled).await,
            Verdict::Handled
        ));
    }

    #[test]
    fn jitter_stays_in_the_upper_half_and_the_cap_holds() {
        let p = RetryPolicy {
            jitter: true,
            ..policy()
        };
        for attempt in 1..10 {
            let ceiling = p.backoff(attempt);
            let d = p.delay(attempt);
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
        }
        assert_eq!(p.backoff(40), Duration::from_secs(1));
    }

    #[test]
    fn bad_policies_are_named() {
        let zero = RetryPolicy {
            max_attempts: 0,
            ..policy()
        };
        assert!(
            Retry::new(zero)
                .unwrap_err()
                .to_string()
                .contains("retry.max_attempts")
        );
        let inverted = RetryPolicy {
            max_backoff: Duration::from_millis(1),
            ..policy()
        };
        assert!(
            inverted
                .validate()
                .unwrap_err()
                .to_string()
                .contains("retry.max_backoff")
        );
    }
}
