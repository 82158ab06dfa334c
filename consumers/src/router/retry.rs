//! Retries with exponential backoff, jitter and a budget.
//!
//! A retriable failure is nacked with a delay; the transport re-delivers the
//! event after it and holds the later events of the same key back until
//! then, while other keys — also in the same partition — keep flowing. Once
//! an event has failed `max_attempts` times, the failure becomes a dead
//! letter ([`DeadLetterReason::Exhausted`]). A [`Verdict::Backoff`] — a
//! dependency down, not the event's fault — never spends the budget (the
//! re-delivery keeps its attempt number); its delay grows with the outage
//! instead: the n-th backoff in a row, across all events, waits as the n-th
//! retry would, and any other verdict ends the streak.
//!
//! Attempts are counted by the transport per delivery; a crash or a
//! rebalance starts the count again for the events it re-delivers (Kafka
//! keeps no per-message count), so the budget is per owner, at most.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
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
    /// Backoffs in a row (shared by clones): the outage's length so far.
    outage: Arc<AtomicU32>,
}

impl Retry {
    /// A retry layer with `policy`; fails naming a bad setting.
    pub fn new(policy: RetryPolicy) -> keel_core::Result<Self> {
        policy.validate()?;
        Ok(Retry {
            policy,
            outage: Arc::new(AtomicU32::new(0)),
        })
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
        let verdict = next.run(ctx).await;
        if !matches!(verdict, Verdict::Backoff { .. }) && self.outage.load(Ordering::Relaxed) != 0 {
            self.outage.store(0, Ordering::Relaxed);
        }
        match verdict {
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
            // Not the event's fault: back off, budget untouched, longer the
            // longer the outage lasts. The streak counts the backoffs of
            // every event in flight, so an outage met by many at once
            // reaches the longest delay after a few rounds: what a
            // dependency that is down needs.
            Verdict::Backoff { error, delay } => {
                let streak = self.outage.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                Verdict::Backoff {
                    error,
                    delay: Some(delay.unwrap_or_else(|| self.policy.delay(streak))),
                }
            }
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
        // An unavailable dependency backs off, however many attempts, for
        // longer the longer it lasts; the first other verdict ends it.
        let backoff = || Verdict::Backoff {
            error: Error::retriable("registry down"),
            delay: None,
        };
        for want in [100, 200, 400, 800, 1000, 1000] {
            let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 30);
            match run_layer(&retry, ctx, backoff).await {
                Verdict::Backoff { delay, .. } => {
                    assert_eq!(delay, Some(Duration::from_millis(want)));
                }
                other => panic!("{other:?}"),
            }
        }
        let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 1);
        assert!(matches!(
            run_layer(&retry, ctx, || Verdict::Handled).await,
            Verdict::Handled
        ));
        let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 1);
        match run_layer(&retry, ctx, backoff).await {
            Verdict::Backoff { delay, .. } => assert_eq!(delay, Some(Duration::from_millis(100))),
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

    /// A layer with a bug.
    struct Panics;

    #[async_trait]
    impl Layer for Panics {
        async fn call(&self, _ctx: &mut Context, _next: Next<'_>) -> Verdict {
            panic!("layer bug")
        }
    }

    #[tokio::test]
    async fn a_panicking_layer_inside_spends_the_budget_like_a_failing_handler() {
        let retry = Retry::new(policy()).unwrap();
        let endpoint = crate::router::handler::Endpoint::Func(Box::new(|| {
            futures::FutureExt::boxed(async { Verdict::Handled })
        }));
        let layers: Vec<Arc<dyn Layer>> = vec![Arc::new(retry), Arc::new(Panics)];
        for (attempt, retried) in [(1, true), (3, false)] {
            let mut ctx = Context::for_test("t", Envelope::new("e", "k", ""), attempt);
            let next = Next {
                layers: &layers,
                endpoint: &endpoint,
                route: None,
            };
            match next.run(&mut ctx).await {
                Verdict::Retry { error, delay } if retried => {
                    assert!(error.to_string().contains("layer bug"), "{error}");
                    assert_eq!(delay, Some(Duration::from_millis(100)));
                }
                Verdict::DeadLetter { error, reason } if !retried => {
                    assert_eq!(reason, DeadLetterReason::Exhausted);
                    let text = error.to_string();
                    assert!(
                        text.contains("a middleware layer panicked: layer bug"),
                        "{text}"
                    );
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
    }
}
