//! Tracing that continues the producer's trace.
//!
//! Each handling runs in a `handle` span whose fields carry the W3C trace
//! id of the producer's `traceparent`, a fresh span id for this handling
//! and the producer's span id as its parent, so logs of every service a
//! flow touched share one `trace_id`. Follow-up events enqueued by the
//! handler carry `traceparent` = this handling's span, so the chain goes on
//! (an event without a valid `traceparent` starts a new trace here).
//!
//! The ids are kept as span fields; a subscriber that exports to a tracing
//! backend reads them from there (the W3C format is four hex fields, not
//! worth an OpenTelemetry dependency in every consumer).

use async_trait::async_trait;
use rand::Rng;
use tracing::Instrument;

use super::context::Context;
use super::layer::{Layer, Next, Verdict};

/// A W3C `traceparent`, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id (never all zero).
    pub trace_id: u128,
    /// 8-byte id of the parent span (never zero).
    pub span_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; `None` for anything else or
    /// for the all-zero ids the standard calls invalid. Later versions'
    /// headers are read by their first four fields, as the standard asks.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !hex(version, 2)
            || version == "ff"
            || !hex(trace, 32)
            || !hex(span, 16)
            || !hex(flags, 2)
        {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let parent = TraceParent {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            span_id: u64::from_str_radix(span, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (parent.trace_id != 0 && parent.span_id != 0).then_some(parent)
    }

    /// A child of this span (same trace and flags, a fresh span id).
    pub fn child(&self) -> TraceParent {
        TraceParent {
            span_id: fresh_span_id(),
            ..*self
        }
    }

    /// The root of a new trace, sampled.
    pub fn root() -> TraceParent {
        let mut rng = rand::rng();
        TraceParent {
            trace_id: nonzero(|| rng.random()),
            span_id: nonzero(|| rng.random()),
            flags: 1,
        }
    }
}

fn fresh_span_id() -> u64 {
    let mut rng = rand::rng();
    nonzero(|| rng.random())
}

/// A random id that is not zero (the standard's invalid value): drawn
/// again in the 1-in-2^64 case rather than through a range, whose
/// uniform sampling costs a 128-bit (for trace ids, 256-bit) multiply.
fn nonzero<T: Default + PartialEq>(mut draw: impl FnMut() -> T) -> T {
    loop {
        let id = draw();
        if id != T::default() {
            return id;
        }
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// The tracing layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tracing;

#[async_trait]
impl Layer for Tracing {
    async fn call(&self, ctx: &mut Context, next: Next<'_>) -> Verdict {
        let parent = ctx
            .event()
            .and_then(|e| e.trace().traceparent.as_deref())
            .and_then(TraceParent::parse);
        let this = parent.map_or_else(TraceParent::root, |p| p.child());
        ctx.set_span(this);
        let info = ctx.info();
        let span = tracing::info_span!(
            "handle",
            trace_id = %format_args!("{:032x}", this.trace_id),
            span_id = %format_args!("{:016x}", this.span_id),
            parent_span_id = parent.map(|p| tracing::field::display(format!("{:016x}", p.span_id))),
            event_id = ctx.event().map(|e| tracing::field::display(e.id())),
            event_type = ctx.event().map(keel_core::Envelope::event_type),
            topic = %info.coordinates.topic,
            partition = info.coordinates.partition,
            position = info.coordinates.position,
            group = %info.group,
            attempt = info.attempt,
            verdict = tracing::field::Empty,
        );
        let verdict = if span.is_disabled() {
            // No subscriber records the span: not entered and left at every
            // poll of the rest of the chain (its ids still go into
            // follow-up events through the context).
            next.run(ctx).await
        } else {
            let verdict = next.run(ctx).instrument(span.clone()).await;
            span.record("verdict", verdict.name());
            verdict
        };
        match &verdict {
            Verdict::Retry { error, delay } => {
                span.in_scope(|| tracing::warn!(%error, ?delay, "handling failed; will retry"));
            }
            Verdict::Backoff { error, delay } => {
                span.in_scope(
                    || tracing::warn!(%error, ?delay, "cannot handle it now; backing off"),
                );
            }
            Verdict::DeadLetter { error, reason } => {
                span.in_scope(|| tracing::error!(%error, %reason, "handling failed for good"));
            }
            Verdict::DeadLettered { topic, reason } => {
                span.in_scope(
                    || tracing::warn!(dead_letter_topic = %topic, %reason, "dead-lettered"),
                );
            }
            Verdict::Handled | Verdict::Skipped { .. } => {}
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{Envelope, TraceContext};

    use super::*;
    use crate::router::testing::run_layer_with;

    const PRODUCER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn traceparents_parse_strictly() {
        let p = TraceParent::parse(PRODUCER).unwrap();
        assert_eq!(p.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(p.span_id, 0xb7ad6b7169203331);
        assert_eq!(p.flags, 1);
        assert_eq!(p.to_string(), PRODUCER);
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version may append fields.
        assert!(
            TraceParent::parse("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-xyz")
                .is_some()
        );
    }

    #[tokio::test]
    async fn the_handling_continues_the_producers_trace() {
        let event = Envelope::new("e", "k", "").with_trace(TraceContext {
            traceparent: Some(PRODUCER.into()),
            tracestate: Some("vendor=1".into()),
        });
        let ctx = Context::for_test("t", event, 1);
        let (verdict, ctx) = run_layer_with(&Tracing, ctx, || Verdict::Handled).await;
        assert!(matches!(verdict, Verdict::Handled));
        let child = TraceParent::parse(ctx.trace().traceparent.as_deref().unwrap()).unwrap();
        assert_eq!(child.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_ne!(child.span_id, 0xb7ad6b7169203331);
        assert_eq!(ctx.trace().tracestate.as_deref(), Some("vendor=1"));

        // No (or a broken) traceparent: a new trace starts here, without
        // the producer's vendor state.
        let ctx = Context::for_test("t", Envelope::new("e", "k", ""), 1);
        let (_, ctx) = run_layer_with(&Tracing, ctx, || Verdict::Handled).await;
        assert!(TraceParent::parse(ctx.trace().traceparent.as_deref().unwrap()).is_some());
        let broken = Envelope::new("e", "k", "").with_trace(TraceContext {
            traceparent: Some(PRODUCER.to_uppercase()),
            tracestate: Some("vendor=1".into()),
        });
        let ctx = Context::for_test("t", broken, 1);
        let (_, ctx) = run_layer_with(&Tracing, ctx, || Verdict::Handled).await;
        let restarted = TraceParent::parse(ctx.trace().traceparent.as_deref().unwrap()).unwrap();
        assert_ne!(restarted.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(ctx.trace().tracestate, None);
    }
}
