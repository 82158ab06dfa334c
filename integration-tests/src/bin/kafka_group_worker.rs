//! A consumer-group member as its own OS process, for the fault-injection
//! tests: it handles `key:seq` events from a topic and appends one line per
//! handled event — `<unix nanos> <worker> <key> <seq> <partition> <offset>`
//! — to its output file *before* acking, so a SIGKILL never loses a handled
//! event from the record (the kernel holds each completed write), and its
//! assignment changes to `<out-file>.assignments`.
//!
//! Usage: `kafka_group_worker <bootstrap> <topic> <group> <worker-name> <out-file> [window]`

use std::io::Write;
use std::sync::{Arc, Mutex};

use keel_consumers::kafka::{KafkaConsumerConfig, KafkaGroupConsumer};
use keel_consumers::{ServeOptions, serve};
use keel_core::{DeliveryInfo, Envelope, Error, Subscriber, Subscription, handler_fn};
use keel_integration_tests::faults::{record_assignments, unix_nanos};
use keel_producers::kafka::KafkaClientConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, bootstrap, topic, group, name, out, rest @ ..] = args.as_slice() else {
        anyhow::bail!(
            "usage: kafka_group_worker <bootstrap> <topic> <group> <worker-name> <out-file> [window]"
        );
    };
    let window: u32 = rest.first().map(|w| w.parse()).transpose()?.unwrap_or(200);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_thread_names(true)
        .init();
    tracing::info!(worker = %args[4], "starting");
    let file = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)?,
    ));
    let consumer = KafkaGroupConsumer::new(KafkaConsumerConfig {
        client: KafkaClientConfig::new([bootstrap.clone()]),
        partition_window: window,
        commit_interval_ms: 100,
        drain_timeout_ms: 5_000,
        session_timeout_ms: 10_000,
        ..KafkaConsumerConfig::default()
    })?;
    let deliveries = consumer
        .subscribe(Subscription::new(topic.clone(), group.clone()).max_in_flight(64))
        .await?;
    // Every assignment change, as `<unix nanos> <partitions, comma-separated>`
    // lines in `<out-file>.assignments`: the test checks duplicates against
    // the owners the broker gave each partition.
    record_assignments(
        &deliveries,
        std::path::Path::new(&format!("{out}.assignments")),
        name,
    )?;
    let name = name.clone();
    let handler = handler_fn(move |event: Envelope, info: DeliveryInfo| {
        let (file, name) = (file.clone(), name.clone());
        async move {
            let text = String::from_utf8_lossy(event.payload()).into_owned();
            let (key, seq) = text
                .rsplit_once(':')
                .ok_or_else(|| Error::fatal(format!("payload `{text}` is not key:seq")))?;
            let line = format!(
                "{} {name} {key} {seq} {} {}\n",
                unix_nanos(),
                info.coordinates.partition,
                info.coordinates.position
            );
            let mut f = file
                .lock()
                .map_err(|_| Error::fatal("output file lock poisoned"))?;
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
