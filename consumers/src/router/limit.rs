//! Concurrency and rate limits for a router's handlings (e.g. to protect a
//! database or a partner API). A handling waiting for a limit keeps its
//! delivery outstanding, so the transport's in-flight limit turns the wait
//! into back-pressure on fetching instead of memory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::Error;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::context::Context;
use super::layer::{Layer, Next, Verdict};

/// At most `n` handlings at once past this layer.
#[derive(Clone, Debug)]
pub struct ConcurrencyLimit {
    permits: Arc<Semaphore>,
}

impl ConcurrencyLimit {
    /// Lets `n` (1 to [`MAX_CONCURRENCY`](crate::serve::MAX_CONCURRENCY))
    /// handlings run at once.
    pub fn new(n: usize) -> keel_core::Result<Self> {
        crate::serve::check_concurrency("concurrency_limit", n)?;
        Ok(ConcurrencyLimit {
            permits: Arc::new(Semaphore::new(n)),
        })
    }
}

#[async_trait]
impl Layer for ConcurrencyLimit {
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        let Ok(_permit) = self.permits.acquire().await else {
            return Verdict::Backoff {
                error: Error::closed("concurrency limit"),
                delay: None,
            };
        };
        next.run(ctx).await
    }
}

/// At most `rate` handlings per second on average, with bursts of up to
/// `burst` (a generic cell rate algorithm: each handling that passes moves
/// the theoretical arrival time on by `1/rate`; a handling passes when that
/// time is at most `burst - 1` intervals ahead of now, and otherwise waits
/// until it is).
///
/// A handling takes its slot only when it passes, so one that gives up
/// waiting (a timeout, a shutdown) leaves nothing booked behind it.
///
/// A dozen lines of arithmetic under a mutex; a rate-limiting crate would
/// bring its own clock and atomics for no gain at a router's rates.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    burst: u32,
    /// The theoretical arrival time of the next handling.
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    /// `rate` handlings per second (from one a day to 1,000,000 a
    /// second), bursts of `burst` (at least 1).
    pub fn per_second(rate: f64, burst: u32) -> keel_core::Result<Self> {
        const ONE_A_DAY: f64 = 1.0 / 86_400.0;
        if !(ONE_A_DAY..=1_000_000.0).contains(&rate) {
            return Err(Error::config(
                "rate_limit",
                format!("{rate} per second is not between one a day ({ONE_A_DAY:.2e}) and 1000000"),
            ));
        }
        if burst == 0 {
            return Err(Error::config("rate_limit.burst", "must be at least 1"));
        }
        Ok(RateLimit {
            interval: Duration::from_secs_f64(1.0 / rate),
            burst,
            next: Mutex::new(None),
        })
    }

    /// Takes a slot now if one is free; otherwise says when to ask again.
    fn try_take(&self) -> Result<(), Instant> {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        // Slots left unused in the past do not pile up beyond the burst.
        let arrival = next.map_or(now, |n| n.max(now));
        let free_at = self
            .interval
            .checked_mul(self.burst - 1)
            .and_then(|ahead| arrival.checked_sub(ahead))
            .unwrap_or(now);
        if free_at > now {
            return Err(free_at);
        }
        *next = Some(arrival + self.interval);
        Ok(())
    }
}

#[async_trait]
impl Layer for RateLimit {
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        while let Err(at) = self.try_take() {
            tokio::time::sleep_until(at).await;
        }
        next.run(ctx).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use keel_core::Envelope;

    use super::*;
    use crate::router::testing::run_layer_async;

    #[tokio::test(start_paused = true)]
    async fn the_rate_holds_after_a_burst() {
        let limit = Arc::new(RateLimit::per_second(10.0, 3).unwrap());
        let start = Instant::now();
        let mut done = Vec::new();
        for _ in 0..7 {
            let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 1);
            run_layer_async(&*limit, ctx, || async { Verdict::Handled }).await;
            done.push(start.elapsed().as_millis());
        }
        // Three at once (the burst), then one every 100 ms.
        assert_eq!(done, vec![0, 0, 0, 100, 200, 300, 400]);
        assert!(RateLimit::per_second(0.0, 1).is_err());
        assert!(RateLimit::per_second(f64::NAN, 1).is_err());
        assert!(RateLimit::per_second(1e-300, 1).is_err());
        assert!(
            RateLimit::per_second(1.0, u32::MAX)
                .unwrap()
                .try_take()
                .is_ok()
        );
        assert!(RateLimit::per_second(1.0, 0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_handling_that_gives_up_waiting_leaves_no_slot_booked() {
        let limit = RateLimit::per_second(10.0, 1).unwrap();
        let ctx = || Context::for_test("t", Envelope::new("e", "k", ""), 1);
        run_layer_async(&limit, ctx(), || async { Verdict::Handled }).await;
        // Fifty handlings time out waiting (as under a Timeout layer).
        for _ in 0..50 {
            let waiting = run_layer_async(&limit, ctx(), || async { Verdict::Handled });
            assert!(
                tokio::time::timeout(Duration::from_millis(1), waiting)
                    .await
                    .is_err()
            );
        }
        // The next one waits for the one interval after the first, not for
        // fifty abandoned ones.
        let start = Instant::now();
        run_layer_async(&limit, ctx(), || async { Verdict::Handled }).await;
        assert!(
            start.elapsed() <= Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn no_more_than_n_run_at_once() {
        let limit = Arc::new(ConcurrencyLimit::new(2).unwrap());
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (limit, running, peak) = (limit.clone(), running.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 1);
                run_layer_async(&*limit, ctx, move || {
                    let (running, peak) = (running.clone(), peak.clone());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        Verdict::Handled
                    }
                })
                .await
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Verdict::Handled));
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert!(ConcurrencyLimit::new(0).is_err());
        // More than tokio's semaphore takes: refused, not a panic.
        assert!(ConcurrencyLimit::new(usize::MAX).is_err());
    }
}
