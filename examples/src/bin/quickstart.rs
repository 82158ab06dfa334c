//! Quickstart: publish a few events and handle them in a consumer group,
//! the way a service using Keel would — here on the in-memory transport.
//!
//! Run: `cargo run -p keel-examples --bin quickstart`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keel_consumers::{ServeOptions, serve};
use keel_core::{
    DeliveryInfo, Envelope, MemoryTransport, Publisher, Subscriber, Subscription, TopicAdmin,
    TopicSpec, handler_fn,
};
use tokio::sync::Notify;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let transport = MemoryTransport::new();
    transport
        .ensure_topic(&TopicSpec {
            name: "orders".into(),
            partitions: 3,
        })
        .await?;

    // The orders service publishes; each call returns once the broker stored it.
    for order in ["o-1", "o-2", "o-3"] {
        let event = Envelope::new(
            "shop.orders.OrderPlaced",
            order,
            format!("order {order} placed"),
        )
        .with_source("orders");
        let receipt = transport.publish("orders", event).await?;
        println!(
            "published {order} to partition {} at {}",
            receipt.partition, receipt.position
        );
    }

    // The billing service handles them as consumer group `billing`.
    let handled = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let handler = handler_fn({
        let (handled, all_done) = (handled.clone(), all_done.clone());
        move |event: Envelope, info: DeliveryInfo| {
            let (handled, all_done) = (handled.clone(), all_done.clone());
            async move {
                println!(
                    "billing handled {} for {} ({})",
                    event.event_type(),
                    event.key(),
                    info.coordinates
                );
                if handled.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                    all_done.notify_one();
                }
                Ok(())
            }
        }
    });
    let member = transport
        .subscribe(Subscription::new("orders", "billing"))
        .await?;
    let report = serve(
        member,
        Arc::new(handler),
        ServeOptions::default(),
        all_done.notified(),
    )
    .await?;
    println!("billing handled {} events", report.handled);
    Ok(())
}
