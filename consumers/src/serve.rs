//! Drive one group member's deliveries through a handler.
//!
//! Delivery guarantee: at-least-once. Each delivery runs in its own task
//! (at most [`ServeOptions::concurrency`] at once; the transport already
//! keeps one event per key outstanding, so parallel tasks never break
//! per-key order). `Ok` acks; an error or a panic nacks with exponential
//! backoff; a record that is not a Keel event is logged and skipped (the
//! [`Router`](crate::router::Router) dead-letters it instead). On shutdown no new
//! delivery is taken, running handlers finish and settle, then the member
//! leaves the group gracefully.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use keel_core::{Deliveries, Error, Handler, Result};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::pump::{Item, panic_message, pump};

/// Upper limit of [`ServeOptions::max_retry_backoff`]: one day.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// Most handlers a concurrency setting may allow at once (tokio's semaphore
/// takes fewer than `usize::MAX >> 3` permits; a million running handlers
/// is past any sane setting already).
pub const MAX_CONCURRENCY: usize = 1_000_000;

/// Refuses a concurrency setting outside 1 to [`MAX_CONCURRENCY`], naming
/// it as `setting`.
pub(crate) fn check_concurrency(setting: &str, n: usize) -> Result<()> {
    if (1..=MAX_CONCURRENCY).contains(&n) {
        return Ok(());
    }
    Err(Error::config(
        setting,
        format!("{n} is not from 1 to {MAX_CONCURRENCY}"),
    ))
}

/// How [`serve()`] runs handlers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeOptions {
    /// Most handlers running at once. Default 64, at most
    /// [`MAX_CONCURRENCY`].
    pub concurrency: usize,
    /// Delay before re-delivering a failed event; doubles with each attempt.
    /// Default 100 ms.
    pub retry_backoff: Duration,
    /// Upper bound of the retry delay. Default 30 s.
    pub max_retry_backoff: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            concurrency: 64,
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(30),
        }
    }
}

impl ServeOptions {
    /// Refuses settings that cannot work, naming them.
    pub fn validate(&self) -> Result<()> {
        check_concurrency("concurrency", self.concurrency)?;
        if self.max_retry_backoff > MAX_RETRY_BACKOFF {
            return Err(Error::config(
                "max_retry_backoff",
                format!(
                    "{:?} is over the {MAX_RETRY_BACKOFF:?} limit",
                    self.max_retry_backoff
                ),
            ));
        }
        if self.max_retry_backoff < self.retry_backoff {
            return Err(Error::config(
                "max_retry_backoff",
                format!(
                    "{:?} is below retry_backoff ({:?})",
                    self.max_retry_backoff, self.retry_backoff
                ),
            ));
        }
        Ok(())
    }

    /// The delay before re-delivery after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.retry_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_retry_backoff)
    }
}

/// What one [`serve()`] run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeReport {
    /// Events whose handler succeeded (and were acked).
    pub handled: u64,
    /// Handler attempts that failed or panicked (and were nacked for
    /// re-delivery).
    pub failed: u64,
    /// Records that were not Keel events, logged and skipped.
    pub skipped: u64,
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
}

/// Runs `handler` on every delivery of `deliveries` until `shutdown`
/// resolves or the stream ends, then drains and leaves the group.
///
/// Returns an error when the subscription fails for good (a fatal error
/// from the stream); retriable stream errors are logged and consumption
/// goes on.
pub async fn serve<H: Handler + ?Sized>(
    deliveries: Deliveries,
    handler: Arc<H>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<ServeReport> {
    options.validate()?;
    let permits = Arc::new(Semaphore::new(options.concurrency));
    let counters = Arc::new(Counters::default());
    let options = Arc::new(options);
    let work = |item: Item| {
        let (handler, counters, options) = (handler.clone(), counters.clone(), options.clone());
        async move {
            let delivery = match item {
                Item::Event(delivery) => delivery,
                Item::Undecodable(poison) => {
                    // Without a router there is no dead-letter topic: a
                    // record that is not a Keel event is logged with its
                    // coordinates and skipped, so it cannot stop the
                    // partition.
                    tracing::error!(
                        at = %poison.info().coordinates,
                        reason = poison.reason(),
                        "skipping a record that is not a Keel event"
                    );
                    counters.skipped.fetch_add(1, Ordering::Relaxed);
                    poison.ack();
                    return;
                }
            };
            let event = delivery.envelope();
            let info = delivery.info();
            let span = tracing::info_span!(
                "handle",
                event_id = %event.id(),
                event_type = event.event_type(),
                topic = %info.coordinates.topic,
                partition = info.coordinates.partition,
                position = info.coordinates.position,
                attempt = info.attempt,
            );
            async move {
                let outcome =
                    AssertUnwindSafe(handler.handle(delivery.envelope(), delivery.info()))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|panic| {
                            Err(Error::retriable(panic_message(panic.as_ref())))
                        });
                match outcome {
                    Ok(()) => {
                        delivery.ack();
                        counters.handled.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        let delay = options.backoff(delivery.info().attempt);
                        if e.is_retriable() {
                            tracing::warn!(error = %e, ?delay, "handler failed; will retry");
                        } else {
                            // Without a router there are no dead letters: a
                            // fatal error is retried at the slowest pace
                            // rather than lost.
                            tracing::error!(error = %e, "handler failed fatally; retrying slowly");
                        }
                        delivery.nack_with_delay(if e.is_retriable() {
                            delay
                        } else {
                            options.max_retry_backoff
                        });
                    }
                }
            }
            .instrument(span)
            .await;
        }
    };
    let outcome = pump(deliveries, permits, shutdown, work).await;
    outcome?;
    Ok(ServeReport {
        handled: counters.handled.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        skipped: counters.skipped.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use keel_core::{
        DeliveryInfo, Envelope, MemoryTransport, Publisher, Subscriber, Subscription, TopicAdmin,
        TopicSpec, handler_fn,
    };
    use tokio::sync::Notify;

    use super::*;

    async fn topic_with(t: &MemoryTransport, events: &[Envelope]) {
        t.ensure_topic(&TopicSpec {
            name: "t".into(),
            partitions: 2,
        })
        .await
        .unwrap();
        t.publish_batch("t", events.to_vec()).await.unwrap();
    }

    fn fast() -> ServeOptions {
        ServeOptions {
            retry_backoff: Duration::from_millis(1),
            max_retry_backoff: Duration::from_millis(5),
            ..ServeOptions::default()
        }
    }

    #[tokio::test]
    async fn failures_are_retried_until_the_handler_succeeds() {
        let t = MemoryTransport::new();
        let events: Vec<_> = (0..20)
            .map(|i| Envelope::new("e", format!("k{}", i % 4), ""))
            .collect();
        topic_with(&t, &events).await;
        let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let seen = attempts.clone();
        let done = Arc::new(Notify::new());
        let done_tx = done.clone();
        let handled = Arc::new(AtomicU64::new(0));
        let handler = handler_fn(move |e: Envelope, info: DeliveryInfo| {
            let (seen, done_tx, handled) = (seen.clone(), done_tx.clone(), handled.clone());
            async move {
                seen.lock()
                    .unwrap()
                    .insert(e.id().to_string(), info.attempt);
                if info.attempt < 3 {
                    return Err(Error::retriable("not yet"));
                }
                if handled.fetch_add(1, Ordering::SeqCst) + 1 == 20 {
                    done_tx.notify_one();
                }
                Ok(())
            }
        });
        let member = t.subscribe(Subscription::new("t", "g")).await.unwrap();
        let report = serve(member, Arc::new(handler), fast(), done.notified())
            .await
            .unwrap();
        assert_eq!(
            report,
            ServeReport {
                handled: 20,
                failed: 40,
                skipped: 0
            }
        );
        assert!(attempts.lock().unwrap().values().all(|&a| a == 3));
        assert_eq!(
            t.committed("t", "g").unwrap().iter().flatten().sum::<u64>(),
            20
        );
    }

    #[tokio::test]
    async fn a_panicking_handler_leads_to_redelivery() {
        let t = MemoryTransport::new();
        topic_with(&t, &[Envelope::new("e", "k", "")]).await;
        let done = Arc::new(Notify::new());
        let done_tx = done.clone();
        let handler = handler_fn(move |_e: Envelope, info: DeliveryInfo| {
            let done_tx = done_tx.clone();
            async move {
                assert!(info.attempt > 1, "first attempt panics on purpose");
                done_tx.notify_one();
                Ok(())
            }
        });
        let member = t.subscribe(Subscription::new("t", "g")).await.unwrap();
        let report = serve(member, Arc::new(handler), fast(), done.notified())
            .await
            .unwrap();
        assert_eq!((report.handled, report.failed), (1, 1));
    }

    #[tokio::test]
    async fn records_that_are_not_events_are_skipped_not_fatal() {
        let t = MemoryTransport::new();
        topic_with(&t, &[]).await;
        // Same partition, before the event: the stream yields it first.
        let partition = keel_core::partition::partition_for_key(b"k", 2);
        t.publish_raw("t", partition, keel_core::RawRecord::default())
            .unwrap();
        t.publish("t", Envelope::new("e", "k", "")).await.unwrap();
        let done = Arc::new(Notify::new());
        let done_tx = done.clone();
        let handler = handler_fn(move |_e: Envelope, _info: DeliveryInfo| {
            let done_tx = done_tx.clone();
            async move {
                done_tx.notify_one();
                Ok(())
            }
        });
        let member = t.subscribe(Subscription::new("t", "g")).await.unwrap();
        let report = serve(member, Arc::new(handler), fast(), done.notified())
            .await
            .unwrap();
        assert_eq!((report.handled, report.skipped), (1, 1));
    }

    #[tokio::test]
    async fn shutdown_drains_running_handlers_before_leaving() {
        let t = MemoryTransport::new();
        topic_with(&t, &[Envelope::new("e", "k", "")]).await;
        let started = Arc::new(Notify::new());
        let started_tx = started.clone();
        let handler = handler_fn(move |_e: Envelope, _info: DeliveryInfo| {
            let started_tx = started_tx.clone();
            async move {
                started_tx.notify_one();
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(())
            }
        });
        let member = t.subscribe(Subscription::new("t", "g")).await.unwrap();
        let report = serve(member, Arc::new(handler), fast(), started.notified())
            .await
            .unwrap();
        assert_eq!(report.handled, 1, "the running handler finished and acked");
        assert_eq!(
            t.committed("t", "g").unwrap().iter().flatten().sum::<u64>(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_stuck_at_shutdown_on_the_memory_transport_is_abandoned() {
        let t = MemoryTransport::new().with_drain_timeout(Duration::from_secs(3));
        topic_with(&t, &[Envelope::new("e", "k", "")]).await;
        let started = Arc::new(Notify::new());
        let started_tx = started.clone();
        let handler = handler_fn(move |_e: Envelope, _info: DeliveryInfo| {
            let started_tx = started_tx.clone();
            async move {
                started_tx.notify_one();
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        let member = t.subscribe(Subscription::new("t", "g")).await.unwrap();
        let began = tokio::time::Instant::now();
        let stopped = tokio::time::timeout(
            Duration::from_secs(600),
            serve(member, Arc::new(handler), fast(), started.notified()),
        )
        .await;
        let report = stopped
            .expect("a stuck handler must not hold the stop past the drain timeout")
            .unwrap();
        assert!(
            began.elapsed() >= Duration::from_secs(3),
            "the stop gave up before the drain timeout"
        );
        assert_eq!(report.handled, 0);
        // Not committed: the next member gets the event again.
        assert_eq!(
            t.committed("t", "g").unwrap().iter().flatten().sum::<u64>(),
            0
        );
        let mut next = t.subscribe(Subscription::new("t", "g")).await.unwrap();
        let again =
            tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut next))
                .await
                .expect("the abandoned event is delivered again");
        assert!(matches!(again, Some(Ok(_))), "{again:?}");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_bad_options_are_named() {
        let o = ServeOptions::default();
        assert_eq!(o.backoff(1), Duration::from_millis(100));
        assert_eq!(o.backoff(3), Duration::from_millis(400));
        assert_eq!(o.backoff(1000), Duration::from_secs(30));
        let bad = ServeOptions {
            concurrency: 0,
            ..ServeOptions::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("`concurrency`")
        );
        // More than tokio's semaphore takes: refused, not a panic at start.
        let huge = ServeOptions {
            concurrency: usize::MAX,
            ..ServeOptions::default()
        };
        assert!(huge.validate().unwrap_err().to_string().contains("1000000"));
    }
}
