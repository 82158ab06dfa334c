//! Instructions per event of the router against a raw handler, on the
//! in-memory transport (no broker, no network: a count that repeats run
//! after run, which the broker benchmarks' throughput does not).
//!
//! Each run publishes `n` `OrderPlaced` events and handles them all, either
//! through `serve()` with a raw handler (`raw`) or through the `Router` with
//! its standard layers decoding every payload (`router`). Count it twice
//! with valgrind and take the difference, which leaves out start-up:
//!
//! ```text
//! cargo build --profile bench -p keel-consumers --example router_cost
//! B=$CARGO_TARGET_DIR/release/examples/router_cost
//! for m in raw router; do for n in 10000 20000; do
//!   valgrind --tool=callgrind --callgrind-out-file=cg-$m-$n.out $B $m $n
//! done; done
//! ```
//!
//! (instructions of `cg-X-20000` − `cg-X-10000`) / 10,000 is X's cost per
//! event, publishing included; router − raw is the router's extra.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use keel_consumers::router::{EventContext, EventHandler, RetryPolicy, Router};
use keel_consumers::{ServeOptions, serve};
use keel_core::memory::MemoryTransport;
use keel_core::{
    Envelope, Publisher, Subscriber, Subscription, TopicAdmin, TopicSpec, Transport, handler_fn,
};
use keel_schemas::events::{Event, OrderPlaced};
use keel_schemas::{AvroCodec, CodecOptions, LocalRegistry};
use tokio::sync::Notify;

/// Counts handled events; wakes the run at the last.
struct Count {
    handled: AtomicU64,
    target: u64,
    done: Notify,
}

impl Count {
    fn one(&self) {
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
    }
}

struct Typed(Arc<Count>);

#[async_trait]
impl EventHandler<OrderPlaced> for Typed {
    async fn handle(&self, order: OrderPlaced, _ctx: EventContext<'_>) -> keel_core::Result<()> {
        std::hint::black_box(order.total);
        self.0.one();
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    if mode != "raw" && mode != "router" {
        return Err("usage: router_cost raw|router [events]".into());
    }
    let n: u64 = match args.next() {
        Some(n) => n.parse().map_err(|e| format!("events `{n}`: {e}"))?,
        None => 20_000,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(&mode, n))
}

async fn run(mode: &str, n: u64) -> Result<(), Box<dyn std::error::Error>> {
    let transport = Arc::new(MemoryTransport::new());
    let codec = Arc::new(AvroCodec::new(
        Arc::new(LocalRegistry::new()),
        CodecOptions {
            auto_register: true,
            ..CodecOptions::default()
        },
    ));
    transport
        .ensure_topic(&TopicSpec {
            name: "orders".into(),
            partitions: 6,
        })
        .await?;
    let mut order = keel_schemas::testdata::order_placed();
    let mut batch = Vec::new();
    for i in 0..n {
        order.customer_id = format!("customer-{}", i % 1000);
        let payload = codec.encode("orders", &order).await?;
        batch.push(
            Envelope::new(
                OrderPlaced::FULL_NAME,
                format!("order-{}", i % 1000),
                payload,
            )
            .with_source("bench"),
        );
    }
    transport.publish_batch("orders", batch).await?;
    let count = Arc::new(Count {
        handled: AtomicU64::new(0),
        target: n,
        done: Notify::new(),
    });
    let done = {
        let count = count.clone();
        async move { count.done.notified().await }
    };
    if mode == "router" {
        let subscriber: Arc<dyn Subscriber> = transport.clone();
        let dead_letters: Arc<dyn Transport> = transport.clone();
        Router::new("g", codec)
            .standard_layers(dead_letters, RetryPolicy::default())?
            .route("orders", Typed(count.clone()))
            .run(subscriber, done)
            .await?;
    } else {
        let counter = count.clone();
        let handler = handler_fn(move |event: Envelope, _info| {
            let counter = counter.clone();
            async move {
                std::hint::black_box(event.payload().len());
                counter.one();
                Ok(())
            }
        });
        let member = transport
            .subscribe(Subscription::new("orders", "g"))
            .await?;
        serve(member, Arc::new(handler), ServeOptions::default(), done).await?;
    }
    println!(
        "{mode}: {} events handled",
        count.handled.load(Ordering::Relaxed)
    );
    Ok(())
}
