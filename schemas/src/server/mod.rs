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
//! requests. With [`ServerOptions::tls`] it speaks HTTPS only.

mod api;
pub mod error;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// Serve HTTPS with this certificate and key; `None` (default): HTTP.
    pub tls: Option<ServerTls>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            body_limit: 2 * 1024 * 1024,
            basic_auth: None,
            tls: None,
        }
    }
}

impl ServerOptions {
    /// Refuses a zero body limit (every request with a body would be
    /// refused) and basic-auth credentials without a colon, a user or a
    /// password (an empty password is one anyone can guess). A password
    /// may hold colons: the user ends at the first.
    pub fn validate(&self) -> crate::error::Result<()> {
        let refuse = |what: &str| Err(crate::error::SchemaError::ServerSettings(what.to_owned()));
        if self.body_limit == 0 {
            return refuse(
                "body_limit (keel's --body-limit) is 0, which refuses every request with a body; give the largest request body to accept, in bytes (default 2 MiB)",
            );
        }
        if let Some(credentials) = &self.basic_auth {
            match credentials.split_once(':') {
                None => {
                    return refuse(
                        "basic_auth (keel's --basic-auth or KEEL_REGISTRY_BASIC_AUTH) must be `user:password` (the colon is missing)",
                    );
                }
                Some(("", _)) => {
                    return refuse(
                        "basic_auth (keel's --basic-auth or KEEL_REGISTRY_BASIC_AUTH) has an empty user",
                    );
                }
                Some((_, "")) => {
                    return refuse(
                        "basic_auth (keel's --basic-auth or KEEL_REGISTRY_BASIC_AUTH) has an empty password, which anyone can guess; give a password",
                    );
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// The registry's TLS identity, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// The certificate chain, leaf first.
    pub certificate_chain: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
}

impl ServerTls {
    /// Loads the certificate and key as [`serve`] will: a pair that
    /// cannot serve is refused before anything is opened or announced.
    pub async fn check(&self) -> std::io::Result<()> {
        self.load().await.map(drop)
    }

    async fn load(&self) -> std::io::Result<axum_server::tls_rustls::RustlsConfig> {
        axum_server::tls_rustls::RustlsConfig::from_pem_chain_file(
            &self.certificate_chain,
            &self.private_key,
        )
        .await
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot load the registry's TLS certificate {} and key {}: {e}",
                    self.certificate_chain.display(),
                    self.private_key.display()
                ),
            )
        })
    }
}

/// How long requests in flight get to finish over HTTPS once shutdown is
/// asked for (plain HTTP waits for them without a limit, as axum does).
const TLS_DRAIN: Duration = Duration::from_secs(30);

/// Serves the registry on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    options
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let state = Arc::new(api::AppState {
        store,
        body_limit: options.body_limit,
        basic_auth: options.basic_auth.as_deref().map(api::basic_auth_header),
    });
    let router = api::router(state);
    let Some(tls) = options.tls else {
        return axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await;
    };
    let config = tls.load().await?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(TLS_DRAIN));
    });
    axum_server::from_tcp_rustls(listener.into_std()?, config)?
        .handle(handle)
        .serve(router.into_make_service())
        .await
}

#[cfg(test)]
mod tests {
    use super::ServerOptions;

    #[test]
    fn settings_are_checked_and_a_password_may_hold_colons() {
        let with = |body_limit: usize, auth: Option<&str>| ServerOptions {
            body_limit,
            basic_auth: auth.map(str::to_owned),
            tls: None,
        };
        assert!(with(1, Some("user:pa:ss")).validate().is_ok());
        assert!(with(1, None).validate().is_ok());
        for (options, says) in [
            (with(0, None), "body_limit"),
            (with(1, Some("user")), "colon is missing"),
            (with(1, Some(":secret")), "empty user"),
            (with(1, Some("user:")), "empty password"),
        ] {
            let refused = options.validate().unwrap_err().to_string();
            assert!(refused.contains(says), "{refused}");
        }
    }
}
