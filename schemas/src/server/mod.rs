//! Keel's schema registry server: Confluent's REST API for Avro schemas on
//! PostgreSQL or SQLite.
//!
//! | module | what it holds |
//! |---|---|
//! | `api` | the routes and handlers |
//! | [`store`] | the tables, on PostgreSQL or SQLite |
//! | [`error`] | Confluent's error bodies and codes |
//!
//! Start one with [`serve`], giving it a bound listener and a shutdown
//! future; it answers until the future resolves, then finishes in-flight
//! requests.

mod api;
pub mod error;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use error::ApiError;
pub use store::{Store, StoreError};

/// Registry server settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Largest request body accepted, in bytes. Default 2 MiB (Kafka's
    /// default message size is 1 MB; schemas are far smaller).
    pub body_limit: usize,
    /// `user:password` for HTTP basic auth; `None` (default) accepts anyone.
    pub basic_auth: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            body_limit: 2 * 1024 * 1024,
            basic_auth: None,
        }
    }
}

/// Serves the registry on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = Arc::new(api::AppState {
        store,
        body_limit: options.body_limit,
        basic_auth: options.basic_auth.as_deref().map(api::basic_auth_header),
    });
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
