//! The handler router: what a service author writes to consume events.
//!
//! Register a typed handler per event type and topic for one consumer
//! group, stack middleware layers, and run:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use keel_consumers::router::{Router, from_fn, Inboxed, RetryPolicy};
//! # use keel_schemas::events::OrderPlaced;
//! # async fn f(transport: Arc<dyn keel_core::Transport>, codec: Arc<keel_schemas::AvroCodec>) -> keel_core::Result<()> {
//! let report = Router::new("billing", codec)
//!     .standard_layers(transport.clone(), RetryPolicy::default())?
//!     .route("orders", from_fn(|order: OrderPlaced, _envelope| async move {
//!         println!("bill {}", order.order_id);
//!         Ok(())
//!     }))
//!     .run(transport, async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Each delivery becomes a [`Context`] that passes through the layers in
//! the order they were added (the first added is outermost) to the end of
//! the chain, which decodes the payload through the registry codec — with
//! schema evolution: the writer's schema is resolved against the handler's
//! type — and calls the handler registered for the event type. Records that
//! are not Keel events, and payloads that never decode, are poison and go
//! straight to dead letters ([`poison`]), as do payloads over
//! [`RouterOptions::max_payload_bytes`]. Event types without a handler
//! are skipped and counted, or dead-lettered ([`UnknownTypes`]).
//!
//! The final [`Verdict`] settles the delivery: handled and skipped events
//! are acked, dead-lettered ones terminated (given up for good: `+TERM` on
//! JetStream, committed past on Kafka); a retry nacks with its delay — the
//! transport holds the rest of that key back and keeps other keys, also in
//! the same partition, flowing. A panicking handler (or layer) is a retriable failure.
//! A dead letter no layer took (no dead-letter layer) is re-delivered after
//! [`RouterOptions::undeliverable_delay`], never dropped.
//!
//! Layers, each in its own module: [`Tracing`] (continues the producer's
//! trace), [`Metrics`], [`DeadLetters`], [`Retry`] (backoff, jitter,
//! budget), [`Timeout`], [`ConcurrencyLimit`] and [`RateLimit`], and
//! [`Inboxed`] (exactly-once database effects, with follow-up events into
//! the outbox in the same transaction). The recommended order is the one
//! above, which [`Router::standard_layers`] sets up for the first four.
//!
//! Several topics run in one router, each its own group member, sharing
//! one concurrency limit. `run` returns after `shutdown` resolves: no new
//! delivery is taken, running handlings finish and settle, every member
//! commits and leaves its group.

mod context;
pub mod dead_letter;
mod handler;
pub mod inbox;
mod layer;
pub mod limit;
pub mod metrics;
pub mod poison;
pub mod retry;
#[cfg(test)]
pub(crate) mod testing;
pub mod timeout;
pub mod trace;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_core::{Error, Result, Settler, StartFrom, Subscriber, Subscription, Transport};
use keel_schemas::AvroCodec;
use keel_schemas::events::Event;
use tokio::sync::{Semaphore, watch};

pub use context::{Context, EventContext, Incoming};
pub use dead_letter::DeadLetters;
pub use handler::{EventHandler, FnHandler, UnknownTypes, from_fn};
pub use inbox::Inboxed;
pub use layer::{DeadLetterReason, Layer, Next, Verdict};
pub use limit::{ConcurrencyLimit, RateLimit};
pub use metrics::Metrics;
pub use retry::{Retry, RetryPolicy};
pub use timeout::Timeout;
pub use trace::Tracing;

use crate::pump::{Item, pump};
use handler::{Endpoint, Route, Typed};

/// How a router consumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterOptions {
    /// Most handlings running at once, across all topics. Default 64, at
    /// most [`MAX_CONCURRENCY`](crate::serve::MAX_CONCURRENCY).
    pub concurrency: usize,
    /// Most deliveries outstanding per topic (the transport's in-flight
    /// limit: bounds memory and what a crash re-delivers). Default 256.
    pub max_in_flight: usize,
    /// Where a group without committed positions starts. Default: earliest.
    pub start: StartFrom,
    /// Re-delivery delay of a failure no retry layer gave a delay.
    /// Default 1 s.
    pub retry_delay: Duration,
    /// Re-delivery delay of a dead letter no layer could store (no
    /// dead-letter layer). Default 60 s.
    pub undeliverable_delay: Duration,
    /// Largest payload a handler is given, in bytes. A larger one is poison:
    /// dead-lettered as it is, without being decoded. Default 8 MiB, well
    /// above Kafka's and NATS's default message limits (1 MiB), so only
    /// topics raised past it meet it; the dead-letter topic must take
    /// records that large too.
    pub max_payload_bytes: usize,
}

/// [`RouterOptions::max_payload_bytes`]'s default.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 8 << 20;

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            concurrency: 64,
            max_in_flight: keel_core::Subscription::DEFAULT_MAX_IN_FLIGHT,
            start: StartFrom::Earliest,
            retry_delay: Duration::from_secs(1),
            undeliverable_delay: Duration::from_secs(60),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

/// What one [`Router::run`] did, counted from final verdicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterReport {
    /// Handled (handler returned `Ok`, transaction committed).
    pub handled: u64,
    /// Skipped as duplicates (inbox).
    pub duplicates: u64,
    /// Skipped otherwise (event types without a handler).
    pub skipped: u64,
    /// Failed attempts nacked for re-delivery.
    pub retried: u64,
    /// Stored in a dead-letter topic.
    pub dead_lettered: u64,
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    duplicates: AtomicU64,
    skipped: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
}

/// Typed handlers for one consumer group, with middleware.
pub struct Router {
    group: String,
    codec: Arc<AvroCodec>,
    routes: BTreeMap<String, HashMap<&'static str, Arc<dyn Route>>>,
    conflicts: Vec<String>,
    layers: Vec<Arc<dyn Layer>>,
    unknown: UnknownTypes,
    options: RouterOptions,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("group", &self.group)
            .field(
                "routes",
                &self
                    .routes
                    .iter()
                    .map(|(t, r)| (t, r.keys().collect::<Vec<_>>()))
                    .collect::<Vec<_>>(),
            )
            .field("layers", &self.layers.len())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router for consumer group `group`, decoding with `codec`.
    pub fn new(group: impl Into<String>, codec: Arc<AvroCodec>) -> Self {
        Router {
            group: group.into(),
            codec,
            routes: BTreeMap::new(),
            conflicts: Vec::new(),
            layers: Vec::new(),
            unknown: UnknownTypes::default(),
            options: RouterOptions::default(),
        }
    }

    /// Handles events of type `T` on `topic` with `handler`. One handler
    /// per type and topic (a second is refused when the router starts).
    pub fn route<T, H>(mut self, topic: impl Into<String>, handler: H) -> Self
    where
        T: Event + Send + 'static,
        H: EventHandler<T>,
    {
        let topic = topic.into();
        let routes = self.routes.entry(topic.clone()).or_default();
        if routes
            .insert(T::FULL_NAME, Arc::new(Typed::<T, H>::new(handler)))
            .is_some()
        {
            self.conflicts
                .push(format!("`{}` on topic `{topic}`", T::FULL_NAME));
        }
        self
    }

    /// Adds a layer inside the ones added before it.
    pub fn layer(mut self, layer: impl Layer) -> Self {
        self.layers.push(Arc::new(layer));
        self
    }

    /// Adds [`Tracing`], [`Metrics`], [`DeadLetters`] on `transport` and
    /// [`Retry`] with `retry`, in that order.
    pub fn standard_layers(
        self,
        transport: Arc<dyn Transport>,
        retry: RetryPolicy,
    ) -> Result<Self> {
        let retry = Retry::new(retry)?;
        Ok(self
            .layer(Tracing)
            .layer(Metrics::default())
            .layer(DeadLetters::new(transport))
            .layer(retry))
    }

    /// What to do with event types no handler is registered for.
    pub fn unknown_types(mut self, policy: UnknownTypes) -> Self {
        self.unknown = policy;
        self
    }

    /// Sets the consumption options.
    pub fn options(mut self, options: RouterOptions) -> Self {
        self.options = options;
        self
    }

    /// The topics the router consumes.
    pub fn topics(&self) -> Vec<String> {
        self.routes.keys().cloned().collect()
    }

    fn validate(&self) -> Result<()> {
        if self.group.is_empty() {
            return Err(Error::config("router.group", "must not be empty"));
        }
        if self.routes.is_empty() {
            return Err(Error::config(
                "router.routes",
                "no handler is registered; add one with Router::route",
            ));
        }
        if let Some(conflict) = self.conflicts.first() {
            return Err(Error::config(
                "router.routes",
                format!("two handlers for {conflict}; register one per event type and topic"),
            ));
        }
        crate::serve::check_concurrency("router.options.concurrency", self.options.concurrency)?;
        if self.options.max_in_flight == 0 || self.options.max_payload_bytes == 0 {
            return Err(Error::config(
                "router.options",
                "max_in_flight and max_payload_bytes must be at least 1",
            ));
        }
        Ok(())
    }

    /// Joins the group on every routed topic of `subscriber` and handles
    /// events until `shutdown` resolves (or a subscription fails for good),
    /// then drains and leaves.
    pub async fn run<S>(
        self,
        subscriber: Arc<S>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RouterReport>
    where
        S: Subscriber + ?Sized,
    {
        self.validate()?;
        let topics = self.topics();
        for layer in &self.layers {
            layer.start(&topics).await?;
        }
        let Router {
            group,
            codec,
            routes,
            layers,
            unknown,
            options,
            ..
        } = self;
        let chain = Arc::new(Chain {
            layers,
            endpoint: Endpoint::Routes {
                codec,
                unknown,
                max_payload: options.max_payload_bytes,
            },
            routes,
            options: options.clone(),
            counters: Counters::default(),
        });
        let mut members = Vec::with_capacity(topics.len());
        for topic in &topics {
            let subscription = Subscription::new(topic, &group)
                .start_from(options.start)
                .max_in_flight(options.max_in_flight);
            match subscriber.subscribe(subscription).await {
                Ok(member) => members.push(member),
                Err(e) => {
                    // Leave the groups already joined before failing.
                    for member in members {
                        let _ = member.leave().await;
                    }
                    return Err(e);
                }
            }
        }
        let permits = Arc::new(Semaphore::new(options.concurrency));
        let (stop, stopped) = watch::channel(false);
        let pumps = members.into_iter().map(|member| {
            let (chain, stop) = (chain.clone(), stop.clone());
            let mut stopped = stopped.clone();
            let until = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let work = move |item| {
                let chain = chain.clone();
                async move { chain.handle(item).await }
            };
            let pump = pump(member, permits.clone(), until, work);
            async move {
                let result = pump.await;
                if result.is_err() {
                    // One topic failing for good stops the others.
                    stop.send_replace(true);
                }
                result
            }
        });
        let all = futures::future::join_all(pumps);
        tokio::pin!(all, shutdown);
        let results = tokio::select! {
            results = &mut all => results,
            () = &mut shutdown => {
                stop.send_replace(true);
                all.await
            }
        };
        results.into_iter().collect::<Result<Vec<()>>>()?;
        let c = &chain.counters;
        Ok(RouterReport {
            handled: c.handled.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
        })
    }
}

/// Everything a handling needs, shared by all tasks of a run.
struct Chain {
    layers: Vec<Arc<dyn Layer>>,
    endpoint: Endpoint,
    routes: BTreeMap<String, HashMap<&'static str, Arc<dyn Route>>>,
    options: RouterOptions,
    counters: Counters,
}

impl Chain {
    async fn handle(&self, item: Item) {
        let (incoming, info, settler) = match item {
            Item::Event(delivery) => {
                let (event, info, settler) = delivery.into_parts();
                (Incoming::Event(event), info, settler)
            }
            Item::Undecodable(record) => {
                let (record, info, reason, settler) = record.into_parts();
                (Incoming::Undecodable { record, reason }, info, settler)
            }
        };
        let route = match &incoming {
            Incoming::Event(event) => self
                .routes
                .get(&info.coordinates.topic)
                .and_then(|types| types.get(event.event_type()))
                .map(|route| &**route),
            Incoming::Undecodable { .. } => None,
        };
        let mut ctx = Context::new(incoming, info, route.map(|r| r.event_type()));
        let next = Next {
            layers: &self.layers,
            endpoint: &self.endpoint,
            route,
        };
        // A panic anywhere in the chain comes back as a verdict
        // (`Next::run` catches it at the layer or dispatch it happened in).
        let verdict = next.run(&mut ctx).await;
        self.settle(&ctx, verdict, &settler);
    }

    fn settle(&self, ctx: &Context, verdict: Verdict, settler: &Settler) {
        let c = &self.counters;
        match verdict {
            Verdict::Handled => {
                settler.ack();
                c.handled.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Skipped { reason } => {
                settler.ack();
                if reason == "duplicate" {
                    c.duplicates.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Verdict::DeadLettered { .. } => {
                // Handed over to dead letters: given up here for good
                // (JetStream terminates it; Kafka commits past it).
                settler.term();
                c.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Retry { error, delay } => {
                let delay = delay.unwrap_or(self.options.retry_delay);
                tracing::debug!(at = %ctx.info().coordinates, %error, ?delay, "re-delivering");
                settler.nack_with_delay(delay);
                c.retried.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Backoff { error, delay } => {
                // Not the event's fault: the re-delivery keeps its attempt
                // number, so an outage spends none of the retry budget.
                let delay = delay.unwrap_or(self.options.retry_delay);
                tracing::debug!(at = %ctx.info().coordinates, %error, ?delay, "backing off");
                settler.backoff(delay);
                c.retried.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::DeadLetter { error, reason } => {
                let delay = self.options.undeliverable_delay;
                tracing::error!(
                    at = %ctx.info().coordinates,
                    %error,
                    %reason,
                    ?delay,
                    "the event belongs in dead letters, but no dead-letter layer took it; re-delivering slowly rather than dropping it"
                );
                settler.nack_with_delay(delay);
                c.retried.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{Envelope, MemoryTransport};
    use keel_schemas::events::OrderPlaced;
    use keel_schemas::{CodecOptions, LocalRegistry};

    use super::*;

    #[tokio::test]
    async fn options_that_cannot_work_are_refused_at_start_naming_them() {
        let codec = Arc::new(AvroCodec::new(
            Arc::new(LocalRegistry::new()),
            CodecOptions::default(),
        ));
        for (options, named) in [
            (
                RouterOptions {
                    concurrency: 0,
                    ..RouterOptions::default()
                },
                "`router.options.concurrency`",
            ),
            (
                RouterOptions {
                    max_payload_bytes: 0,
                    ..RouterOptions::default()
                },
                "`router.options`",
            ),
            // More than tokio's semaphore takes: refused, not a panic.
            (
                RouterOptions {
                    concurrency: usize::MAX,
                    ..RouterOptions::default()
                },
                "`router.options.concurrency`",
            ),
        ] {
            let err = Router::new("g", codec.clone())
                .options(options)
                .route(
                    "orders",
                    from_fn(|_: OrderPlaced, _: Envelope| async { Ok(()) }),
                )
                .run(Arc::new(MemoryTransport::new()), async {})
                .await
                .unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
        }
    }
}
