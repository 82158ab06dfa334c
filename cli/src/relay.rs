//! `keel relay`: publishes a PostgreSQL outbox's committed events to the
//! broker, until Ctrl-C or SIGTERM. Run several for scale-out and fail-over:
//! they split the outbox's keys between them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use keel_core::KeelConfig;
use keel_core::config::redact;
use keel_producers::outbox::error::OutboxError;
use keel_producers::outbox::{OutboxRelay, OutboxTables, RelayConfig};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

/// Where an outbox lives: its database and table names.
#[derive(Debug, Args)]
pub(crate) struct OutboxDb {
    /// The outbox's database, postgres://… (default: the `database`
    /// setting); `keel outbox` also takes a SQLite outbox, sqlite://<file>.
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// Schema of the outbox tables.
    #[arg(long, default_value = "keel")]
    schema: String,
    /// Outbox table.
    #[arg(long, default_value = "outbox")]
    table: String,
    /// Inbox table (created by the migrations alongside the outbox).
    #[arg(long, default_value = "inbox")]
    inbox_table: String,
}

impl OutboxDb {
    /// The database URL (flag, else config) and the table names, checked;
    /// `command` names who needs them in the error.
    pub(crate) fn resolve(
        &self,
        config: &KeelConfig,
        command: &str,
    ) -> anyhow::Result<(String, OutboxTables)> {
        self.resolve_for(config, command, false)
    }

    /// As [`resolve`](Self::resolve); with `sqlite`, a SQLite outbox
    /// (`sqlite://…`, the embedded flavour) is taken too.
    pub(crate) fn resolve_for(
        &self,
        config: &KeelConfig,
        command: &str,
        sqlite: bool,
    ) -> anyhow::Result<(String, OutboxTables)> {
        let database = self
            .database
            .clone()
            .or_else(|| config.database.clone())
            .with_context(|| format!("`{command}` needs the outbox's database: --database postgres://… (or `database` in keel.toml)"))?;
        let postgres = database.starts_with("postgres://") || database.starts_with("postgresql://");
        if sqlite && !postgres && !database.starts_with("sqlite:") {
            bail!(
                "--database {}: `{command}` takes a PostgreSQL outbox (postgres://…) or a SQLite \
                 one (sqlite://<file>)",
                redact(&database)
            );
        }
        if !sqlite && !postgres {
            let sqlite_note = if database.starts_with("sqlite:") {
                "; a SQLite outbox is relayed by its own process (OutboxRelay::sqlite)"
            } else {
                ""
            };
            bail!(
                "--database {}: `{command}` runs on a PostgreSQL outbox (postgres://…){sqlite_note}",
                redact(&database)
            );
        }
        let tables = OutboxTables::new(&self.schema, &self.table, &self.inbox_table)?;
        Ok((database, tables))
    }
}

/// A pool on `database`. One direct connection first: its error says why
/// (refused, unknown database, authentication), where a pool would only
/// time out.
pub(crate) async fn connect(database: &str) -> anyhow::Result<(PgPool, PgConnectOptions)> {
    let options: PgConnectOptions = database
        .parse()
        .with_context(|| format!("--database {} is not a PostgreSQL URL", redact(database)))?;
    {
        use sqlx::Connection;
        sqlx::postgres::PgConnection::connect_with(&options)
            .await
            // Its text, not its chain: sqlx repeats the cause in both.
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot connect to the outbox database {}: {e}",
                    redact(database)
                )
            })?
            .close()
            .await
            .ok();
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.clone())
        .await
        .with_context(|| format!("cannot connect to the outbox database {}", redact(database)))?;
    Ok((pool, options))
}

#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    #[command(flatten)]
    db: OutboxDb,
    /// This relay's name among the outbox's relays (default: host, pid and
    /// a random suffix).
    #[arg(long)]
    relay_id: Option<String>,
    /// Rows per batch: the most in flight, and the most a crash re-publishes.
    #[arg(long, default_value_t = RelayConfig::default().batch_size)]
    batch_size: usize,
    /// Most bytes of payload and headers per batch (with --batch-size, the
    /// relay's memory bound; a larger row goes alone), 1 KiB to 1 GiB.
    #[arg(long, default_value_t = RelayConfig::default().max_batch_bytes)]
    max_batch_bytes: usize,
    /// Slots the keys are spread over; every relay of an outbox must agree.
    #[arg(long, default_value_t = RelayConfig::default().slots)]
    slots: u32,
    /// Broker refusals of a row before it is parked.
    #[arg(long, default_value_t = RelayConfig::default().max_attempts)]
    max_attempts: u32,
    /// Seconds a silent relay keeps its slots (fail-over time), 1 to 3600.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    session_timeout_secs: u64,
    /// Hours published rows are kept in the archive before they are purged
    /// (at most ten years; give every relay of an outbox the same); 0
    /// deletes them at once (fewer database writes per event; replay then
    /// comes from the broker's own retention).
    #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u64).range(0..=87_600))]
    retention_hours: u64,
    /// Serve Prometheus metrics (backlog, oldest unpublished age, publish
    /// rate, failures) on this address at /metrics (`host:port`, e.g.
    /// `0.0.0.0:9464` or `localhost:9464`).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
    /// Do not create or migrate the outbox tables (they must exist).
    #[arg(long)]
    no_migrate: bool,
}

pub(crate) async fn run(config: &KeelConfig, args: RelayArgs) -> anyhow::Result<()> {
    let (database, tables) = args.db.resolve(config, "keel relay")?;
    let session_timeout = Duration::from_secs(args.session_timeout_secs);
    // The defaults' proportions for any session: heartbeat a tenth of it,
    // a batch at most half of it less a heartbeat.
    let heartbeat = (session_timeout / 10).max(Duration::from_millis(100));
    let defaults = RelayConfig::default();
    let relay_config = RelayConfig {
        relay_id: args.relay_id.clone().unwrap_or(defaults.relay_id),
        batch_size: args.batch_size,
        max_batch_bytes: args.max_batch_bytes,
        slots: args.slots,
        max_attempts: args.max_attempts,
        session_timeout,
        heartbeat,
        publish_timeout: (session_timeout / 2).saturating_sub(heartbeat),
        retention: Duration::from_secs(args.retention_hours.saturating_mul(3600)),
        ..defaults
    };
    relay_config.validate().map_err(flag_named)?;
    // Before the database is touched: no broker to relay to, or a listen
    // address that cannot be served, is refused with nothing created.
    crate::broker::broker(config, "relay")?;
    if let Some(listen) = &args.metrics_listen {
        let addr: SocketAddr = tokio::net::lookup_host(listen.as_str())
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .with_context(|| {
                format!("--metrics-listen {listen}: not a host:port this machine can listen on")
            })?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    let (pool, options) = connect(&database).await?;
    if args.no_migrate {
        // Before the broker is waited for: a misnamed table is a mistake to
        // hear about now, not once the broker answers.
        tables.check_migrated(&pool).await?;
    } else {
        tables.migrate(&pool).await?;
    }
    // After the metrics listener: it answers while the relay waits for its
    // broker.
    let mut shutdown = std::pin::pin!(crate::registry::shutdown_signal());
    let Some(publisher) = publisher(config, &relay_config, shutdown.as_mut()).await? else {
        note!("keel relay: stopped before the broker could be reached");
        return Ok(());
    };
    let relay =
        OutboxRelay::new(pool, tables.clone(), publisher, relay_config).map_err(flag_named)?;
    note!(
        "relaying {} in database `{}` on {}:{} to {} (Ctrl-C to stop)",
        tables.channel(),
        options.get_database().unwrap_or("(default)"),
        options.get_host(),
        options.get_port(),
        config.broker.redacted()
    );
    relay.run(shutdown).await.map_err(flag_named)?;
    Ok(())
}

/// The relay's publisher. A broker that cannot be reached at start (NATS
/// connects at once; Kafka's client connects lazily and backs off in the
/// relay itself) is tried again, 100 ms doubling to 30 s, as the relay backs
/// off from a broker that goes away later; `None` if `shutdown` came first.
/// Settings the client or the server refuses (credentials, TLS) still fail
/// at once.
async fn publisher(
    config: &KeelConfig,
    relay: &RelayConfig,
    mut shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<Option<std::sync::Arc<dyn keel_core::transport::Publisher>>> {
    let mut wait = relay.backoff_min;
    loop {
        match crate::broker::publisher(config, "relay", relay.publish_timeout).await {
            Ok(publisher) => return Ok(Some(publisher)),
            Err(e)
                if e.downcast_ref::<keel_core::Error>()
                    .is_some_and(keel_core::Error::is_retriable) =>
            {
                tracing::warn!(error = %e, retry_in = ?wait, "the broker cannot be reached; trying again");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.as_mut() => return Ok(None),
                }
                wait = (wait * 2).min(relay.backoff_max);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The relay's settings by the flags that set them here (the library
/// names them as a `RelayConfig`'s fields, which `keel.toml` does not have).
fn flag_named(e: OutboxError) -> OutboxError {
    match e {
        OutboxError::Config { setting, reason } => {
            let flag = match setting.as_str() {
                "relay.relay_id" => "--relay-id",
                "relay.batch_size" => "--batch-size",
                "relay.max_batch_bytes" => "--max-batch-bytes",
                "relay.slots" => "--slots",
                "relay.max_attempts" => "--max-attempts",
                "relay.session_timeout" | "relay.heartbeat" | "relay.publish_timeout" => {
                    "--session-timeout-secs"
                }
                "relay.retention" => "--retention-hours",
                _ => return OutboxError::Config { setting, reason },
            };
            OutboxError::Config {
                setting: flag.to_owned(),
                reason,
            }
        }
        other => other,
    }
}
