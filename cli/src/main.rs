//! `keel`: Keel's operator command line.
//!
//! | module | subcommand |
//! |---|---|
//! | `demo` | `keel demo`: the whole backbone in one process, printing what it proved |
//! | `registry` | `keel registry serve`: the Confluent-compatible schema registry |
//! | `schema` | `keel schema register|check|get|list|diff` against any registry |
//! | `relay` | `keel relay`: publishes a PostgreSQL outbox's events to the broker |
//! | `outbox` | `keel outbox parked|requeue|discard`: rows the broker refused, listed, put back in line or dropped |
//! | `broker` | `keel topics`, `keel lag`, `keel group list|reset`, `keel publish`, `keel tail` on Kafka or NATS |
//! | `dlq` | `keel dlq list|redrive`: a topic's dead letters, decoded; back to their topic |
//!
//! Settings come from `keel.toml` (or `--config`), then `KEEL_*` environment
//! variables, then flags. Subcommands arrive with the capability that needs
//! them; there are no placeholders.

#![forbid(unsafe_code)]

/// `println!` for command output. A closed pipe (`keel … | head`) or
/// another write error stops the output, never the command: a command that
/// changes something (registers schemas, checks them for a CI gate,
/// publishes) runs to its end and its own outcome decides the exit status;
/// a write error other than a closed pipe then fails it (see [`output`]).
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

/// `eprintln!` for messages to the user. A closed standard error
/// (`keel … 2>&1 | head`) loses the message, never the command (`eprintln!`
/// panics there).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Standard output as `say!` writes it.
mod output {
    use std::io::Write as _;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set at the first failed write: later lines are dropped.
    static STOPPED: AtomicBool = AtomicBool::new(false);
    /// The first write error other than a closed pipe.
    static FAILED: Mutex<Option<String>> = Mutex::new(None);

    /// Writes `line` and a line break, unless output has stopped.
    pub(crate) fn line(line: std::fmt::Arguments<'_>) {
        if STOPPED.load(Ordering::Relaxed) {
            return;
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}") {
            STOPPED.store(true, Ordering::Relaxed);
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                let mut failed = FAILED.lock().unwrap_or_else(|p| p.into_inner());
                failed.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Whether output has stopped (a closed pipe, a failed write): a
    /// command that only prints can end.
    pub(crate) fn stopped() -> bool {
        STOPPED.load(Ordering::Relaxed)
    }

    /// Why standard output failed, when it did for a reason other than a
    /// closed pipe (a full disk, say): the command's output is incomplete.
    pub(crate) fn failure() -> Option<String> {
        FAILED.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

mod broker;
mod demo;
mod dlq;
mod outbox;
mod registry;
mod relay;
mod schema;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keel_core::KeelConfig;
use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// Keel: typed, schema-registered events over Kafka or NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "keel", version)]
struct Cli {
    /// Config file (TOML). Default: ./keel.toml when it exists.
    #[arg(long, global = true, env = "KEEL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Broker URL: kafka://host:9092[,host:9092], nats://host:4222 or memory://
    #[arg(long, global = true, value_name = "URL")]
    broker: Option<String>,

    /// Schema registry URL (default: the `registry` setting, else
    /// http://127.0.0.1:8081).
    #[arg(long, global = true, value_name = "URL")]
    registry: Option<String>,

    /// Basic-auth credentials for the schema registry (`user:password`).
    #[arg(
        long,
        global = true,
        env = "KEEL_REGISTRY_AUTH",
        value_name = "USER:PASSWORD",
        hide_env_values = true
    )]
    registry_auth: Option<String>,

    /// CA certificates (PEM, one or more) to trust for an https:// schema
    /// registry, besides the public roots Keel is built with.
    #[arg(long, global = true, env = "KEEL_REGISTRY_CA", value_name = "FILE")]
    registry_ca: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run events end to end in one process and print what was proved:
    /// every event handled, per-key order held, a member leaving mid-run
    /// handing its partitions over.
    #[command(
        after_help = "Examples:\n  keel demo\n  keel demo --events 50000 --keys 500 --members 4"
    )]
    Demo(demo::DemoArgs),
    /// Run Keel's schema registry.
    #[command(
        subcommand,
        after_help = "Example:\n  keel registry serve --listen 127.0.0.1:8081"
    )]
    Registry(registry::RegistryCommand),
    /// Register, check, inspect and compare schemas in a registry.
    #[command(
        subcommand,
        after_help = "Examples:\n  keel schema register schemas/avro\n  keel schema list"
    )]
    Schema(schema::SchemaCommand),
    /// List, create and describe topics.
    #[command(
        subcommand,
        after_help = "Examples:\n  keel --broker kafka://127.0.0.1:9092 topics create orders --partitions 12\n  \
            keel --broker nats://127.0.0.1:4222 topics list"
    )]
    Topics(broker::TopicsCommand),
    /// How far a consumer group is behind, per partition.
    #[command(
        after_help = "Example:\n  keel --broker kafka://127.0.0.1:9092 lag --group billing --topic orders"
    )]
    Lag(broker::LagArgs),
    /// List consumer groups; reset a stopped group's positions.
    #[command(
        subcommand,
        after_help = "Examples:\n  keel --broker kafka://127.0.0.1:9092 group list\n  \
            keel --broker kafka://127.0.0.1:9092 group reset --group billing --topic orders --to-earliest"
    )]
    Group(broker::GroupCommand),
    /// Publish JSON lines as Avro events, encoded with the subject's latest
    /// schema from the registry; prints partition and offset of each.
    #[command(after_help = "Examples:\n  \
        keel --broker kafka://127.0.0.1:9092 publish --topic orders --subject shop.orders.OrderPlaced \\\n    \
        --file orders.jsonl --key-field order_id\n  \
        echo '{\"order_id\":\"0193a5b2-7c1d-7e2f-8a3b-4c5d6e7f8091\", …}' | keel publish --topic orders --key-field order_id")]
    Publish(broker::PublishArgs),
    /// Print events as JSON lines: decoded payload, headers, partition and
    /// offset.
    #[command(after_help = "Examples:\n  \
        keel --broker kafka://127.0.0.1:9092 tail --topic orders --from earliest --count 10")]
    Tail(broker::TailArgs),
    /// Publish the committed events of a PostgreSQL outbox to the broker
    /// (at least once, keys in commit order); run several to share the work.
    #[command(after_help = "Examples:\n  \
        keel --broker kafka://127.0.0.1:9092 relay --database postgres://app@db/orders\n  \
        keel --broker nats://127.0.0.1:4222 relay --database postgres://app@db/orders --schema orders --metrics-listen 0.0.0.0:9464")]
    Relay(relay::RelayArgs),
    /// The outbox's parked rows (refused by the broker `max_attempts`
    /// times): list them with their errors, put them back in line.
    #[command(
        subcommand,
        after_help = "Examples:\n  keel outbox parked --database postgres://app@db/orders\n  \
            keel outbox requeue --database postgres://app@db/orders --topic orders"
    )]
    Outbox(outbox::OutboxCommand),
    /// Dead letters: list them decoded with their errors, or redrive them to
    /// the topic they came from.
    #[command(
        subcommand,
        after_help = "Examples:\n  keel --broker kafka://127.0.0.1:9092 dlq list --topic orders\n  \
            keel --broker kafka://127.0.0.1:9092 dlq redrive --topic orders --type shop.orders.OrderPlaced"
    )]
    Dlq(dlq::DlqCommand),
}

/// Flags that override config settings; unset flags are skipped.
#[derive(Debug, Default, Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    registry: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topics: Option<TopicOverrides>,
}

#[derive(Debug, Serialize)]
struct TopicOverrides {
    partitions: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            note!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    let mut code = ExitCode::SUCCESS;
    if let Err(e) = outcome {
        note!("error: {}", report(&e));
        code = ExitCode::FAILURE;
    }
    if let Some(e) = output::failure() {
        note!("error: cannot write to standard output ({e}): the output above is incomplete");
        code = ExitCode::FAILURE;
    }
    code
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut overrides = Overrides {
        broker: cli.broker,
        registry: cli.registry,
        ..Overrides::default()
    };
    match cli.command {
        Command::Demo(args) => {
            overrides.topics = args
                .partitions
                .map(|partitions| TopicOverrides { partitions });
            let config = load_config(cli.config, &overrides)?;
            // Interrupted, the run is dropped here and its tasks with the
            // runtime, which removes the demo's outbox file.
            tokio::select! {
                outcome = demo::run(&config, &args) => outcome,
                () = registry::shutdown_signal() => {
                    anyhow::bail!("interrupted: the demo stopped before its checks ran")
                }
            }
        }
        Command::Registry(command) => {
            let config = load_config(cli.config, &overrides)?;
            registry::run(&config, command).await
        }
        Command::Schema(command) => {
            let config = load_config(cli.config, &overrides)?;
            schema::run(
                &registry_client(&config, cli.registry_auth, cli.registry_ca.as_deref())?,
                command,
            )
            .await
        }
        Command::Topics(command) => {
            broker::topics(&load_config(cli.config, &overrides)?, command).await
        }
        Command::Lag(args) => broker::lag(&load_config(cli.config, &overrides)?, args).await,
        Command::Group(command) => {
            broker::group(&load_config(cli.config, &overrides)?, command).await
        }
        Command::Publish(args) => {
            let config = load_config(cli.config, &overrides)?;
            let registry = registry_client(&config, cli.registry_auth, cli.registry_ca.as_deref())?;
            broker::publish(&config, registry, args).await
        }
        Command::Tail(args) => {
            let config = load_config(cli.config, &overrides)?;
            let registry = registry_client(&config, cli.registry_auth, cli.registry_ca.as_deref())?;
            broker::tail(&config, registry, args).await
        }
        Command::Relay(args) => relay::run(&load_config(cli.config, &overrides)?, args).await,
        Command::Outbox(command) => {
            outbox::run(&load_config(cli.config, &overrides)?, command).await
        }
        Command::Dlq(command) => {
            let config = load_config(cli.config, &overrides)?;
            let registry = registry_client(&config, cli.registry_auth, cli.registry_ca.as_deref())?;
            dlq::run(&config, registry, command).await
        }
    }
}

fn registry_client(
    config: &KeelConfig,
    basic_auth: Option<String>,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<keel_schemas::RegistryClient> {
    let url = config.registry.as_deref().unwrap_or(DEFAULT_REGISTRY);
    if basic_auth.as_deref().is_some_and(|c| !c.contains(':')) {
        anyhow::bail!(
            "--registry-auth (or KEEL_REGISTRY_AUTH): give it as user:password (the colon is missing)"
        );
    }
    let ca_certificate_pem = ca
        .map(|path| {
            std::fs::read(path).with_context(|| {
                format!(
                    "cannot read the registry CA certificate {} (--registry-ca)",
                    path.display()
                )
            })
        })
        .transpose()?;
    Ok(keel_schemas::RegistryClient::new(
        url,
        keel_schemas::ClientOptions {
            basic_auth,
            ca_certificate_pem,
            ..keel_schemas::ClientOptions::default()
        },
    )?)
}

/// Where `keel schema`, `publish` and `tail` look when no registry is
/// configured.
const DEFAULT_REGISTRY: &str = "http://127.0.0.1:8081";

fn load_config(file: Option<PathBuf>, overrides: &Overrides) -> anyhow::Result<KeelConfig> {
    let default = PathBuf::from("keel.toml");
    let file = file.or_else(|| default.is_file().then_some(default));
    Ok(KeelConfig::load_with(file.as_deref(), overrides)?)
}

/// `e` and its causes, each said once: errors that already put their
/// source into their own text (`"cannot publish: broker down"` over
/// `"broker down"`) would otherwise repeat it, as `{e:#}` does.
fn report(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn init_tracing() {
    let filter = match EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(e) => {
            if std::env::var_os("RUST_LOG").is_some() {
                note!("warning: ignoring RUST_LOG ({e}); logging warnings only");
            }
            EnvFilter::new("warn")
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::{Cli, report};

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let inner = std::io::Error::other("connection refused");
        let repeated = anyhow::Error::new(inner)
            .context("cannot reach the broker: connection refused")
            .context("keel publish failed");
        assert_eq!(
            report(&repeated),
            "keel publish failed: cannot reach the broker: connection refused"
        );
        let distinct = anyhow::Error::new(std::io::Error::other("connection refused"))
            .context("cannot reach the broker");
        assert_eq!(
            report(&distinct),
            "cannot reach the broker: connection refused"
        );
    }
}
