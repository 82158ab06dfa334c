//! `keel registry serve`: Keel's Confluent-compatible schema registry.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use keel_core::KeelConfig;
use keel_core::config::redact;
use keel_schemas::server::{ServerOptions, ServerTls, Store, serve};

/// Default store when neither `--database` nor `database` is set: a SQLite
/// file in the working directory (created when missing).
const DEFAULT_DATABASE: &str = "sqlite://keel-registry.db";

#[derive(Debug, Subcommand)]
pub(crate) enum RegistryCommand {
    /// Serve Confluent's Schema Registry REST API (Avro) on PostgreSQL or
    /// SQLite, until Ctrl-C or SIGTERM.
    #[command(after_help = "Examples:\n  \
        keel registry serve\n  \
        keel registry serve --listen 0.0.0.0:8081 --database postgres://keel@db/registry\n  \
        KEEL_REGISTRY_BASIC_AUTH=keel:s3cret keel registry serve --database sqlite://registry.db")]
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Where schemas are stored: postgres://… or sqlite://path (default:
    /// the `database` setting, else sqlite://keel-registry.db).
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// Require HTTP basic auth with these credentials (`user:password`).
    #[arg(
        long,
        env = "KEEL_REGISTRY_BASIC_AUTH",
        value_name = "USER:PASSWORD",
        hide_env_values = true
    )]
    basic_auth: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = ServerOptions::default().body_limit)]
    body_limit: usize,
    /// Serve HTTPS with this PEM certificate chain (leaf first); needs
    /// --tls-key.
    #[arg(
        long,
        env = "KEEL_REGISTRY_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        long,
        env = "KEEL_REGISTRY_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
}

pub(crate) async fn run(config: &KeelConfig, command: RegistryCommand) -> anyhow::Result<()> {
    match command {
        RegistryCommand::Serve(args) => serve_registry(config, args).await,
    }
}

async fn serve_registry(config: &KeelConfig, args: ServeArgs) -> anyhow::Result<()> {
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(certificate_chain), Some(private_key)) => Some(ServerTls {
            certificate_chain,
            private_key,
        }),
        _ => None,
    };
    let options = ServerOptions {
        body_limit: args.body_limit,
        basic_auth: args.basic_auth,
        tls,
    };
    // Refused before anything is opened or announced.
    options.validate()?;
    if let Some(tls) = &options.tls {
        for (flag, path) in [
            ("--tls-cert", &tls.certificate_chain),
            ("--tls-key", &tls.private_key),
        ] {
            std::fs::File::open(path)
                .with_context(|| format!("cannot read {flag} {}", path.display()))?;
        }
        tls.check().await?;
    }
    // The address before the database: a port in use leaves no database
    // file behind.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let database = args
        .database
        .or_else(|| config.database.clone())
        .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
    let store = Store::connect(&database)
        .await
        .with_context(|| format!("cannot open the registry's database {}", redact(&database)))?;
    note!(
        "keel registry: serving {}://{} on {}{}",
        if options.tls.is_some() {
            "https"
        } else {
            "http"
        },
        listener.local_addr()?,
        redact(&database),
        if options.basic_auth.is_some() {
            " (basic auth)"
        } else {
            ""
        }
    );
    serve(listener, store.clone(), options, shutdown_signal()).await?;
    store.close().await;
    note!("keel registry: stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
