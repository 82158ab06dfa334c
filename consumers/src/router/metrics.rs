//! Metrics of every handling, through the `metrics` facade (export them
//! with any recorder, e.g. `metrics-exporter-prometheus` as `keel relay`
//! does):
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `keel_router_events_total` | counter | `topic`, `group`, `event_type`, `verdict` (`handled`, `skipped`, `retry`, `backoff`, `dead-letter`, `dead-lettered`) |
//! | `keel_router_handled_total` | counter | `topic`, `group`, `event_type` |
//! | `keel_router_failed_total` | counter | same: attempts that failed (retried or dead) |
//! | `keel_router_retried_total` | counter | same: failed attempts that will be retried (also when a dependency was down) |
//! | `keel_router_dead_lettered_total` | counter | same, plus `reason` |
//! | `keel_router_handler_seconds` | histogram | `topic`, `group`, `event_type` |
//!
//! `event_type` is the registered type of the handler that ran, or
//! `unrouted` — never a value read off the wire, so the label set stays
//! bounded whatever arrives.

use std::sync::Once;
use std::time::Instant;

use async_trait::async_trait;
use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

use super::context::Context;
use super::layer::{Layer, Next, Verdict};

/// The metrics layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Metrics;

fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        describe_counter!(
            "keel_router_events_total",
            "Deliveries through the router, by final verdict"
        );
        describe_counter!(
            "keel_router_handled_total",
            "Events whose handler succeeded"
        );
        describe_counter!(
            "keel_router_failed_total",
            "Handling attempts that failed (retried or dead-lettered)"
        );
        describe_counter!(
            "keel_router_retried_total",
            "Failed attempts that will be retried"
        );
        describe_counter!(
            "keel_router_dead_lettered_total",
            "Events sent to a dead-letter topic"
        );
        describe_histogram!(
            "keel_router_handler_seconds",
            Unit::Seconds,
            "Time from the start of a handling to its verdict"
        );
    });
}

#[async_trait]
impl Layer for Metrics {
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        describe();
        let started = Instant::now();
        let verdict = next.run(ctx).await;
        let elapsed = started.elapsed();
        let labels = [
            ("topic", ctx.info().coordinates.topic.clone()),
            ("group", ctx.info().group.clone()),
            (
                "event_type",
                ctx.routed_type().unwrap_or("unrouted").to_owned(),
            ),
        ];
        histogram!("keel_router_handler_seconds", &labels).record(elapsed.as_secs_f64());
        let mut with_verdict = labels.to_vec();
        with_verdict.push(("verdict", verdict.name().to_owned()));
        counter!("keel_router_events_total", &with_verdict).increment(1);
        match &verdict {
            Verdict::Handled => counter!("keel_router_handled_total", &labels).increment(1),
            Verdict::Retry { .. } => {
                counter!("keel_router_failed_total", &labels).increment(1);
                counter!("keel_router_retried_total", &labels).increment(1);
            }
            Verdict::Backoff { .. } => {
                counter!("keel_router_retried_total", &labels).increment(1);
            }
            Verdict::DeadLetter { reason, .. } => {
                if reason.is_handler_failure() {
                    counter!("keel_router_failed_total", &labels).increment(1);
                }
            }
            Verdict::DeadLettered { reason, .. } => {
                if reason.is_handler_failure() {
                    counter!("keel_router_failed_total", &labels).increment(1);
                }
                let mut with_reason = labels.to_vec();
                with_reason.push(("reason", reason.as_str().to_owned()));
                counter!("keel_router_dead_lettered_total", &with_reason).increment(1);
            }
            Verdict::Skipped { .. } => {}
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{Envelope, Error};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;
    use crate::router::testing::run_layer;

    #[tokio::test]
    async fn verdicts_are_counted_by_kind() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);
        for v in [
            || Verdict::Handled,
            || Verdict::Handled,
            || Verdict::Retry {
                error: Error::retriable("x"),
                delay: None,
            },
            || Verdict::DeadLettered {
                topic: "t.dlq".into(),
                reason: super::super::layer::DeadLetterReason::Exhausted,
            },
        ] {
            let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 1);
            run_layer(&Metrics, ctx, v).await;
        }
        let counts: std::collections::HashMap<String, u64> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| match value {
                DebugValue::Counter(n) => {
                    let labels: Vec<String> = key
                        .key()
                        .labels()
                        .filter(|l| l.key() == "verdict" || l.key() == "reason")
                        .map(|l| l.value().to_owned())
                        .collect();
                    Some((format!("{}{labels:?}", key.key().name()), n))
                }
                _ => None,
            })
            .collect();
        assert_eq!(counts["keel_router_handled_total[]"], 2);
        assert_eq!(counts["keel_router_retried_total[]"], 1);
        assert_eq!(counts["keel_router_failed_total[]"], 2);
        assert_eq!(
            counts["keel_router_dead_lettered_total[\"retries-exhausted\"]"],
            1
        );
        assert_eq!(counts["keel_router_events_total[\"handled\"]"], 2);
    }
}
