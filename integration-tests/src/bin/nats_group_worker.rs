//! A JetStream consumer-group member as its own OS process, for the
//! fault-injection tests: it handles `key:seq` events and appends one line
//! per handled event — `<end nanos> <worker> <key> <seq> <partition>
//! <stream sequence> <start nanos>` — to its output file *before* acking,
//! so a SIGKILL never loses a handled event from the record, and its
//! assignment changes to `<out-file>.assignments`. The start and end times
//! let the test check that no two members handled a partition at once.
//!
//! Usage: `nats_group_worker <nats-url> <topic> <group> <worker-name> <out-file> [window]`

use std::io::Write;
use std::sync::{Arc, Mutex};

use keel_consumers::nats::JetStreamGroupConsumer;
use keel_consumers::{ServeOptions, serve};
use keel_core::{DeliveryInfo, Envelope, Error, Subscriber, Subscription, handler_fn};
use keel_integration_tests::faults::{record_assignments, unix_nanos};
use keel_integration_tests::nats_consumer_config;
use keel_producers::nats::NatsClientConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, topic, group, name, out, rest @ ..] = args.as_slice() else {
        anyhow::bail!(
            "usage: nats_group_worker <nats-url> <topic> <group> <worker-name> <out-file> [window]"
        );
    };
    let window: u32 = rest.first().map(|w| w.parse()).transpose()?.unwrap_or(200);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    tracing::info!(worker = %name, "starting");
    let file = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)?,
    ));
    let mut config = nats_consumer_config(NatsClientConfig::new(url.clone()));
    config.partition_window = window;
    let consumer = JetStreamGroupConsumer::connect(config).await?;
    let deliveries = consumer
        .subscribe(Subscription::new(topic.clone(), group.clone()).max_in_flight(64))
        .await?;
    record_assignments(
        &deliveries,
        std::path::Path::new(&format!("{out}.assignments")),
        name,
    )?;
    let name = name.clone();
    let handler = handler_fn(move |event: Envelope, info: DeliveryInfo| {
        let (file, name) = (file.clone(), name.clone());
        async move {
            let started = unix_nanos();
            let text = String::from_utf8_lossy(event.payload()).into_owned();
            let (key, seq) = text
                .rsplit_once(':')
                .ok_or_else(|| Error::fatal(format!("payload `{text}` is not key:seq")))?;
            let mut f = file
                .lock()
                .map_err(|_| Error::fatal("output file lock poisoned"))?;
            let line = format!(
                "{} {name} {key} {seq} {} {} {started}\n",
                unix_nanos(),
                info.coordinates.partition,
                info.coordinates.position
            );
            f.write_all(line.as_bytes()).map_err(Error::retriable)?;
            Ok(())
        }
    });
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(
        deliveries,
        Arc::new(handler),
        ServeOptions::default(),
        shutdown,
    )
    .await?;
    Ok(())
}
