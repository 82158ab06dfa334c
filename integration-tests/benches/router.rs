//! Router overhead: the same group consumer, the same records, handled by
//! a raw `Handler` through `serve()` (the envelope as delivered, ack on
//! return) and by the `Router` with its standard stack (tracing, metrics,
//! dead letters, retry) decoding every payload into `OrderPlaced` through
//! the registry codec and dispatching it to a typed handler. Both handlers
//! only look at what they get. A fresh group per round, timed from the
//! first handled event to the last; one warm-up round each, then
//! alternating rounds. Each round's CPU per event (this process) is
//! reported too.
//!
//! Run: `KEEL_TEST_KAFKA=127.0.0.1:9092 cargo bench -p keel-integration-tests --bench router`
//! (`KEEL_BENCH_BROKER=nats` with `KEEL_TEST_NATS` for JetStream).
//! Optional: `-- <events>` (default 100,000).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use keel_consumers::router::{DeadLetters, EventContext, EventHandler, RetryPolicy, Router};
use keel_consumers::{ServeOptions, serve};
use keel_core::{Envelope, Subscriber, Subscription, Transport, handler_fn};
use keel_integration_tests::{bench, kafka_transport, nats_transport, outbox::new_topic};
use keel_schemas::events::{Event, OrderPlaced};
use keel_schemas::{AvroCodec, CodecOptions, LocalRegistry};
use tokio::sync::Notify;

const ROUNDS: usize = 5;
const PARTITIONS: u32 = 6;

fn main() -> anyhow::Result<()> {
    bench::main(|events, _| run(events))
}

/// Counts handled events and wakes the round when all are in.
struct Progress {
    handled: AtomicU64,
    target: u64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    done: Notify,
}

impl Progress {
    fn new(target: usize) -> Arc<Progress> {
        Arc::new(Progress {
            handled: AtomicU64::new(0),
            target: target as u64,
            first: Mutex::new(None),
            last: Mutex::new(None),
            done: Notify::new(),
        })
    }

    fn one(&self) {
        let n = self.handled.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            *self.first.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        if n + 1 == self.target {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            self.done.notify_one();
        }
    }

    /// Events per second from the first handled to the last.
    fn rate(&self) -> f64 {
        let first = *self.first.lock().unwrap_or_else(|p| p.into_inner());
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        match (first, last) {
            (Some(first), Some(last)) => self.target as f64 / (last - first).as_secs_f64(),
            _ => 0.0,
        }
    }
}

struct Typed(Arc<Progress>);

#[async_trait]
impl EventHandler<OrderPlaced> for Typed {
    async fn handle(&self, order: OrderPlaced, _ctx: EventContext<'_>) -> keel_core::Result<()> {
        std::hint::black_box(order.total);
        self.0.one();
        Ok(())
    }
}

async fn run(events: usize) -> anyhow::Result<()> {
    let nats = std::env::var("KEEL_BENCH_BROKER").is_ok_and(|b| b == "nats");
    let transport: Arc<dyn Transport> = if nats {
        Arc::new(nats_transport().await)
    } else {
        Arc::new(kafka_transport().await)
    };
    let codec = Arc::new(AvroCodec::new(
        Arc::new(LocalRegistry::new()),
        CodecOptions {
            auto_register: true,
            ..CodecOptions::default()
        },
    ));
    let topic = new_topic(&*transport, "bench-router", PARTITIONS).await;
    let mut order = keel_schemas::testdata::order_placed();
    let mut size = 0;
    for from in (0..events).step_by(1000) {
        let mut batch = Vec::with_capacity(1000);
        for i in from..(from + 1000).min(events) {
            order.customer_id = format!("customer-{}", i % 1000);
            let payload = codec.encode(&topic, &order).await?;
            size = payload.len();
            batch.push(
                Envelope::new(
                    OrderPlaced::FULL_NAME,
                    format!("order-{}", i % 1000),
                    payload,
                )
                .with_source("bench"),
            );
        }
        transport.publish_batch(&topic, batch).await?;
    }
    println!(
        "router overhead on {}: {events} OrderPlaced events of {size} bytes over {PARTITIONS} partitions, 1000 keys, {ROUNDS} rounds each",
        transport.name()
    );
    // The bench process's CPU per event of each round (consumer, handler
    // pool and client threads; the broker runs elsewhere): steadier than
    // throughput when a round's pull stalls for a while.
    let (raw_cpu, router_cpu) = (Mutex::new(Vec::new()), Mutex::new(Vec::new()));
    let ((raw, raw_rates), (routed, router_rates)) = bench::alternate(
        ROUNDS,
        || cpu_per_event(&raw_cpu, events, raw_round(&transport, &topic, events)),
        || {
            cpu_per_event(
                &router_cpu,
                events,
                router_round(&transport, &codec, &topic, events),
            )
        },
    )
    .await?;
    let (mut raw_cpu, mut router_cpu) = (into_inner(raw_cpu), into_inner(router_cpu));
    // The warm-up rounds' figures go.
    raw_cpu.remove(0);
    router_cpu.remove(0);
    println!("throughput  raw handler (serve)        {raw:>10.0} msg/s  rounds {raw_rates:.0?}");
    println!(
        "throughput  router + standard layers   {routed:>10.0} msg/s  rounds {router_rates:.0?}"
    );
    let (raw_us, router_us) = (bench::median(&mut raw_cpu), bench::median(&mut router_cpu));
    println!("cpu/event   raw handler                {raw_us:>10.2} us     rounds {raw_cpu:.2?}");
    println!(
        "cpu/event   router                     {router_us:>10.2} us     rounds {router_cpu:.2?}"
    );
    println!(
        "raw/router cpu per event {:.2} (as a throughput ratio router/raw would be; the router's extra {:.2} us per event)",
        raw_us / router_us,
        router_us - raw_us
    );
    println!(
        "router/raw {:.2}: {:.1} % throughput loss (target <= 10 %)",
        routed / raw,
        (1.0 - routed / raw) * 100.0
    );
    if nats {
        // A run's 100k events (and its dead-letter stream) would otherwise
        // stay in the shared server's store, run after run.
        let dead_letters = DeadLetters::new(transport.clone()).topic_for(&topic);
        for topic in [&topic, &dead_letters] {
            keel_integration_tests::delete_nats_topic(topic).await;
        }
    }
    Ok(())
}

/// Runs `round`, adding the process's CPU per event during it to `into`.
async fn cpu_per_event(
    into: &Mutex<Vec<f64>>,
    events: usize,
    round: impl Future<Output = anyhow::Result<f64>>,
) -> anyhow::Result<f64> {
    let (rate, cpu) = bench::cpu_per_event(events, round).await;
    into.lock().unwrap_or_else(|p| p.into_inner()).push(cpu);
    rate
}

fn into_inner(cpu: Mutex<Vec<f64>>) -> Vec<f64> {
    cpu.into_inner().unwrap_or_else(|p| p.into_inner())
}

async fn raw_round(
    transport: &Arc<dyn Transport>,
    topic: &str,
    events: usize,
) -> anyhow::Result<f64> {
    let progress = Progress::new(events);
    let counter = progress.clone();
    let handler = handler_fn(move |event: Envelope, _info| {
        let counter = counter.clone();
        async move {
            std::hint::black_box(event.payload().len());
            counter.one();
            Ok(())
        }
    });
    let member = transport
        .subscribe(Subscription::new(
            topic,
            keel_integration_tests::unique_name("raw"),
        ))
        .await?;
    let done = progress.clone();
    serve(
        member,
        Arc::new(handler),
        ServeOptions::default(),
        async move {
            done.done.notified().await;
        },
    )
    .await?;
    Ok(progress.rate())
}

async fn router_round(
    transport: &Arc<dyn Transport>,
    codec: &Arc<AvroCodec>,
    topic: &str,
    events: usize,
) -> anyhow::Result<f64> {
    let progress = Progress::new(events);
    let router = Router::new(keel_integration_tests::unique_name("routed"), codec.clone())
        .standard_layers(transport.clone(), RetryPolicy::default())?
        .route(topic.to_owned(), Typed(progress.clone()));
    let done = progress.clone();
    let subscriber: Arc<dyn Subscriber> = transport.clone();
    router
        .run(subscriber, async move {
            done.done.notified().await;
        })
        .await?;
    Ok(progress.rate())
}
