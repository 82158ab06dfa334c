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

use std::sync::{Once, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use metrics::{Counter, Histogram, Unit, counter, describe_counter, describe_histogram, histogram};

use super::context::Context;
use super::layer::{DeadLetterReason, Layer, Next, Verdict};

/// The metrics layer. It registers its handles once per topic, group and
/// event type with the recorder installed at that moment (install yours
/// before the router starts) and then only bumps them.
#[derive(Default)]
pub struct Metrics {
    /// The label sets seen so far, with their handles: a few, so scanned
    /// (comparing the static event type first) rather than hashed; a
    /// lookup allocates nothing, and the handles are used under the read
    /// lock rather than cloned out.
    sets: RwLock<Vec<LabelSet>>,
}

/// One (topic, group, event type) and its handles.
struct LabelSet {
    topic: String,
    group: String,
    event_type: &'static str,
    handles: Handles,
}

impl LabelSet {
    fn is(&self, topic: &str, group: &str, event_type: &str) -> bool {
        self.event_type == event_type && self.topic == topic && self.group == group
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

const VERDICTS: [&str; 6] = [
    "handled",
    "skipped",
    "retry",
    "backoff",
    "dead-letter",
    "dead-lettered",
];
const REASONS: [DeadLetterReason; 4] = [
    DeadLetterReason::Poison,
    DeadLetterReason::UnknownType,
    DeadLetterReason::Fatal,
    DeadLetterReason::Exhausted,
];

/// One label set's handles.
struct Handles {
    seconds: Histogram,
    handled: Counter,
    failed: Counter,
    retried: Counter,
    /// By [`VERDICTS`].
    events: [Counter; 6],
    /// By [`REASONS`].
    dead_lettered: [Counter; 4],
}

impl Handles {
    fn register(topic: &str, group: &str, event_type: &'static str) -> Handles {
        let labels = [
            ("topic", topic.to_owned()),
            ("group", group.to_owned()),
            ("event_type", event_type.to_owned()),
        ];
        let with = |name: &'static str, value: &str| {
            let mut l = labels.to_vec();
            l.push((name, value.to_owned()));
            l
        };
        Handles {
            seconds: histogram!("keel_router_handler_seconds", &labels),
            handled: counter!("keel_router_handled_total", &labels),
            failed: counter!("keel_router_failed_total", &labels),
            retried: counter!("keel_router_retried_total", &labels),
            events: VERDICTS.map(|v| counter!("keel_router_events_total", &with("verdict", v))),
            dead_lettered: REASONS.map(|r| {
                counter!(
                    "keel_router_dead_lettered_total",
                    &with("reason", r.as_str())
                )
            }),
        }
    }

    /// Counts one handling's verdict and time.
    fn record(&self, elapsed: Duration, verdict: &Verdict) {
        self.seconds.record(elapsed.as_secs_f64());
        let (index, failed) = match verdict {
            Verdict::Handled => {
                self.handled.increment(1);
                (0, false)
            }
            Verdict::Skipped { .. } => (1, false),
            Verdict::Retry { .. } => {
                self.retried.increment(1);
                (2, true)
            }
            Verdict::Backoff { .. } => {
                self.retried.increment(1);
                (3, false)
            }
            Verdict::DeadLetter { reason, .. } => (4, reason.is_handler_failure()),
            Verdict::DeadLettered { reason, .. } => {
                if let Some(i) = REASONS.iter().position(|r| r == reason) {
                    self.dead_lettered[i].increment(1);
                }
                (5, reason.is_handler_failure())
            }
        };
        self.events[index].increment(1);
        if failed {
            self.failed.increment(1);
        }
    }
}

impl Metrics {
    /// Records one handling of `event_type` on `topic` for `group`.
    fn record(
        &self,
        (topic, group, event_type): (&str, &str, &'static str),
        elapsed: Duration,
        verdict: &Verdict,
    ) {
        {
            let sets = self.sets.read().unwrap_or_else(|p| p.into_inner());
            if let Some(set) = sets.iter().find(|set| set.is(topic, group, event_type)) {
                set.handles.record(elapsed, verdict);
                return;
            }
        }
        // First use of this label set (another task may have added it
        // since the read).
        let mut sets = self.sets.write().unwrap_or_else(|p| p.into_inner());
        let at = match sets.iter().position(|set| set.is(topic, group, event_type)) {
            Some(at) => at,
            None => {
                describe();
                sets.push(LabelSet {
                    topic: topic.to_owned(),
                    group: group.to_owned(),
                    event_type,
                    handles: Handles::register(topic, group, event_type),
                });
                sets.len() - 1
            }
        };
        sets[at].handles.record(elapsed, verdict);
    }
}

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
        let started = Instant::now();
        let verdict = next.run(ctx).await;
        let info = ctx.info();
        self.record(
            (
                &info.coordinates.topic,
                &info.group,
                ctx.routed_type().unwrap_or("unrouted"),
            ),
            started.elapsed(),
            &verdict,
        );
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
        let metrics = Metrics::default();
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
            run_layer(&metrics, ctx, v).await;
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
