//! Typed, validated NATS client settings → `async_nats::ConnectOptions`.
//!
//! At most one way of authenticating may be set (user/password, token,
//! nkey seed or a `.creds` file, from [`NatsAuth`], which `keel.toml`'s
//! `[nats]` table fills); TLS (CA, client certificate) combines with any of
//! them. Defaults mirror async-nats' own.

use std::time::Duration;

use keel_core::config::NatsAuth;
use keel_core::{Error, Result};
use serde::Deserialize;

/// Default timeout of JetStream API requests and publish acknowledgements
/// (async-nats' own default for acks is 5 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach and authenticate to NATS.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsClientConfig {
    /// Server URLs, comma separated: `nats://host:4222,nats://other:4222`
    /// (`tls://` forces TLS).
    pub servers: String,
    /// Connection name shown by `nats server report connections`.
    pub name: Option<String>,
    /// Credentials and TLS.
    pub auth: NatsAuth,
    /// Timeout of JetStream API requests and of each publish
    /// acknowledgement, in milliseconds (default 5000).
    pub request_timeout_ms: u64,
}

impl Default for NatsClientConfig {
    fn default() -> Self {
        NatsClientConfig {
            servers: "nats://127.0.0.1:4222".into(),
            name: None,
            auth: NatsAuth::default(),
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT.as_millis() as u64,
        }
    }
}

impl NatsClientConfig {
    /// Settings for `servers` with everything else defaulted.
    pub fn new(servers: impl Into<String>) -> Self {
        NatsClientConfig {
            servers: servers.into(),
            ..NatsClientConfig::default()
        }
    }

    /// The request/ack timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Refuses contradictory or incomplete settings, naming them.
    pub fn validate(&self) -> Result<()> {
        if self.servers.split(',').all(|s| s.trim().is_empty()) {
            return Err(Error::config(
                "nats.servers",
                "no server given; expected e.g. nats://127.0.0.1:4222",
            ));
        }
        self.auth.validate()?;
        if self.request_timeout_ms == 0 {
            return Err(Error::config(
                "nats.request_timeout_ms",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Connects, authenticating as configured.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        self.validate()?;
        let mut options = async_nats::ConnectOptions::new()
            .request_timeout(Some(self.request_timeout()))
            .connection_timeout(self.request_timeout());
        if let Some(name) = &self.name {
            options = options.name(name);
        }
        let auth = &self.auth;
        if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &auth.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &auth.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(path) = &auth.creds_file {
            options = options.credentials_file(path).await.map_err(|e| {
                Error::config(
                    "nats.creds_file",
                    format!("cannot read `{}`: {e}", path.display()),
                )
            })?;
        }
        if auth.tls.required {
            options = options.require_tls(true);
        }
        if let Some(ca) = &auth.tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&auth.tls.cert_file, &auth.tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let servers: Vec<&str> = self
            .servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let addrs: Vec<async_nats::ServerAddr> = servers
            .iter()
            .map(|s| {
                s.parse().map_err(|e| {
                    Error::config("nats.servers", format!("`{s}` is not a server URL: {e}"))
                })
            })
            .collect::<Result<_>>()?;
        let broker = format!("NATS at {}", keel_core::config::redact(&self.servers));
        options.connect(addrs).await.map_err(|e| {
            use async_nats::ConnectErrorKind as Kind;
            match e.kind() {
                // Refused credentials or TLS: trying again will not help
                // (and a relay must not wait for ever on a wrong password).
                Kind::Authentication | Kind::AuthorizationViolation | Kind::Tls => Error::config(
                    "nats (credentials or TLS)",
                    format!("cannot connect to {broker}: {e}; check the [nats] settings"),
                ),
                _ => Error::Connect {
                    broker,
                    reason: e.to_string(),
                },
            }
        })
    }

    /// A JetStream context with this configuration's timeout.
    pub async fn jetstream(&self) -> Result<async_nats::jetstream::Context> {
        let client = self.connect().await?;
        Ok(async_nats::jetstream::ContextBuilder::new()
            .timeout(self.request_timeout())
            .build(client))
    }
}

/// Checks a topic or group name against what NATS accepts in stream,
/// consumer and subject tokens.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::config(
            what,
            format!(
                "`{name}` cannot be used on NATS: use 1–200 of A–Z, a–z, 0–9, `_` and `-` (no `.`, `*`, `>` or spaces)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_way_of_authenticating() {
        let mut c = NatsClientConfig::new("nats://a:4222");
        c.validate().unwrap_or_else(|e| panic!("{e}"));
        c.auth.token = Some("t".into());
        c.auth.nkey_seed = Some("SU".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("nats.token and nats.nkey_seed"), "{e}");
        let mut c = NatsClientConfig::new("nats://a:4222");
        c.auth.user = Some("u".into());
        assert!(c.validate().unwrap_err().to_string().contains("password"));
        let mut c = NatsClientConfig::new(" , ");
        assert!(c.validate().is_err());
        c.servers = "nats://a".into();
        c.auth.tls.cert_file = Some("c.pem".into());
        assert!(c.validate().unwrap_err().to_string().contains("key_file"));
    }

    #[test]
    fn names_nats_cannot_take_are_refused() {
        for ok in ["orders", "orders_v2", "billing-svc"] {
            assert!(validate_name("topic", ok).is_ok(), "{ok}");
        }
        for bad in ["", "a.b", "a*", "a>", "a b"] {
            assert!(validate_name("topic", bad).is_err(), "{bad:?}");
        }
    }
}
