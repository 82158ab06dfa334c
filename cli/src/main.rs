//! `keel`: Keel's operator command line.
//!
//! | module | subcommand |
//! |---|---|
//! | `demo` | `keel demo`: the whole backbone in one process, printing what it proved |
//!
//! Settings come from `keel.toml` (or `--config`), then `KEEL_*` environment
//! variables, then flags. Subcommands arrive with the capability that needs
//! them; there are no placeholders.

#![forbid(unsafe_code)]

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel_core::KeelConfig;
use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// Keel: typed, schema-registered events over Kafka or NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "keel", version, propagate_version = true)]
struct Cli {
    /// Config file (TOML). Default: ./keel.toml when it exists.
    #[arg(long, global = true, env = "KEEL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Broker URL: kafka://host:9092[,host:9092], nats://host:4222 or memory://
    #[arg(long, global = true, value_name = "URL")]
    broker: Option<String>,

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
}

/// Flags that override config settings; unset flags are skipped.
#[derive(Debug, Default, Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<String>,
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
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut overrides = Overrides {
        broker: cli.broker,
        ..Overrides::default()
    };
    match cli.command {
        Command::Demo(args) => {
            overrides.topics = args
                .partitions
                .map(|partitions| TopicOverrides { partitions });
            let config = load_config(cli.config, &overrides)?;
            demo::run(&config, &args).await
        }
    }
}

fn load_config(file: Option<PathBuf>, overrides: &Overrides) -> anyhow::Result<KeelConfig> {
    let default = PathBuf::from("keel.toml");
    let file = file.or_else(|| default.is_file().then_some(default));
    Ok(KeelConfig::load_with(file.as_deref(), overrides)?)
}

fn init_tracing() {
    let filter = match EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(e) => {
            if std::env::var_os("RUST_LOG").is_some() {
                eprintln!("warning: ignoring RUST_LOG ({e}); logging warnings only");
            }
            EnvFilter::new("warn")
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
