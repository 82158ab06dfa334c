//! One service of the orders → billing → shipping chain as its own OS
//! process, for the SIGKILL test: the router of `role` until Ctrl-C.
//!
//! Usage: `router_chain_worker <billing|shipping> <group> <kafka|nats> <database-url> <registry-url> <orders> <payments> <shipments>`

use std::sync::Arc;

use keel_core::Transport;
use keel_integration_tests::chain::{Topics, codec, router};
use keel_integration_tests::faults::init_worker_tracing;
use keel_integration_tests::{kafka_transport, nats_transport};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [
        _,
        role,
        group,
        broker,
        database,
        registry,
        orders,
        payments,
        shipments,
    ] = args.as_slice()
    else {
        anyhow::bail!(
            "usage: router_chain_worker <billing|shipping> <group> <kafka|nats> <database-url> <registry-url> <orders> <payments> <shipments>"
        );
    };
    init_worker_tracing();
    let transport: Arc<dyn Transport> = match broker.as_str() {
        "kafka" => Arc::new(kafka_transport().await),
        _ => Arc::new(nats_transport().await),
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(database)
        .await?;
    let topics = Topics {
        orders: orders.clone(),
        payments: payments.clone(),
        shipments: shipments.clone(),
    };
    let router = router(
        role,
        group,
        transport.clone(),
        pool,
        codec(registry),
        &topics,
    )?;
    tracing::info!(%role, "chain worker starting");
    router
        .run(transport, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
