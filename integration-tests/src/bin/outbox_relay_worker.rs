//! An outbox relay as its own OS process, for the SIGKILL tests: the
//! library's `OutboxRelay` with test-speed timings
//! ([`relay_config`](keel_integration_tests::outbox::relay_config)) on the
//! default tables, until Ctrl-C. Prints `failed publishes <n>` to standard
//! output whenever its count of failed batches and refused rows changes.
//!
//! Usage: `outbox_relay_worker <database-url> <kafka://host:port | nats://host:port> <relay-id> <batch-size>`

use std::sync::Arc;

use keel_core::Publisher;
use keel_integration_tests::faults::init_worker_tracing;
use keel_integration_tests::outbox::relay_config;
use keel_producers::kafka::{KafkaClientConfig, KafkaPublisher, KafkaPublisherConfig};
use keel_producers::nats::{JetStreamPublisher, JetStreamPublisherConfig, NatsClientConfig};
use keel_producers::outbox::{OutboxRelay, OutboxTables};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, database, broker, relay_id, batch] = args.as_slice() else {
        anyhow::bail!(
            "usage: outbox_relay_worker <database-url> <kafka://… | nats://…> <relay-id> <batch-size>"
        );
    };
    init_worker_tracing();
    let config = relay_config(relay_id, batch.parse()?);
    // Nothing the publisher sends may outlive a batch the relay gave up on.
    let publisher: Arc<dyn Publisher> = if let Some(bootstrap) = broker.strip_prefix("kafka://") {
        Arc::new(KafkaPublisher::new(KafkaPublisherConfig {
            client: KafkaClientConfig::new([bootstrap.to_owned()]),
            ack_timeout_ms: config.publish_timeout.as_millis() as u64,
            ..KafkaPublisherConfig::default()
        })?)
    } else {
        Arc::new(
            JetStreamPublisher::connect(JetStreamPublisherConfig {
                ack_timeout: config.publish_timeout,
                ..JetStreamPublisherConfig::new(NatsClientConfig::new(broker.clone()))
            })
            .await?,
        )
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(database)
        .await?;
    let relay = OutboxRelay::new(pool, OutboxTables::default(), publisher, config)?;
    // Each failed publish may re-send a batch: the tests bound duplicates
    // by these, so every change goes out at once (a killed process has
    // printed what it had).
    let mut stats = relay.stats();
    tokio::spawn(async move {
        let mut last = 0;
        while stats.changed().await.is_ok() {
            let failed = {
                let s = stats.borrow_and_update();
                s.failed_batches + s.failures
            };
            if failed != last {
                println!("failed publishes {failed}");
                last = failed;
            }
        }
    });
    tracing::info!(relay = %relay_id, "relay worker starting");
    relay
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
