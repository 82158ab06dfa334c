//! Configuration: a `keel.toml` file, overridden by `KEEL_*` environment
//! variables, overridden by command-line flags.
//!
//! Every struct denies unknown fields (a typo is an error, not a silently
//! ignored setting), every field has a documented default, and
//! [`KeelConfig::validate`] refuses invalid values and combinations with a
//! message naming the setting. Nested settings map to environment variables
//! with `__`: `consumer.max_in_flight` is `KEEL_CONSUMER__MAX_IN_FLIGHT`.
//! Variables under `KEEL_TEST_` belong to the test harness and are ignored.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where events travel: one URL form for every broker.
///
/// `Display` writes the URL back exactly (credentials included, so it can
/// be saved); `Debug` and [`BrokerUrl::redacted`] hide passwords.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BrokerUrl {
    /// `kafka://host:port[,host:port…]` — bootstrap servers (port defaults to 9092).
    Kafka {
        /// `host:port` bootstrap servers.
        bootstrap: Vec<String>,
    },
    /// `nats://[user:pass@]host:port[,host:port…]` (port defaults to 4222).
    Nats {
        /// Server URLs as `nats://host:port`.
        servers: Vec<String>,
    },
    /// `memory://[name]` — the in-process transport (tests, the demo).
    Memory {
        /// Instances with the same name in one process share a broker.
        name: String,
    },
}

impl BrokerUrl {
    /// The URL scheme (`kafka`, `nats`, `memory`).
    pub fn scheme(&self) -> &'static str {
        match self {
            BrokerUrl::Kafka { .. } => "kafka",
            BrokerUrl::Nats { .. } => "nats",
            BrokerUrl::Memory { .. } => "memory",
        }
    }
}

impl BrokerUrl {
    /// The URL with any password replaced by `***`, for logs and messages.
    pub fn redacted(&self) -> String {
        redact(&self.to_string())
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({})", self.redacted())
    }
}

impl Default for BrokerUrl {
    fn default() -> Self {
        BrokerUrl::Memory {
            name: String::new(),
        }
    }
}

impl FromStr for BrokerUrl {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        // Never a password in a message: the URL and its entries redacted.
        let bad = |reason: String| Error::config("broker", format!("`{}`: {reason}", redact(s)));
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            bad("expected a URL like kafka://host:9092, nats://host:4222 or memory://".into())
        })?;
        match scheme {
            "kafka" => {
                let bootstrap = host_list(rest, 9092, false).map_err(bad)?;
                Ok(BrokerUrl::Kafka { bootstrap })
            }
            "nats" => {
                let servers = host_list(rest, 4222, true)
                    .map_err(bad)?
                    .into_iter()
                    .map(|h| format!("nats://{h}"))
                    .collect();
                Ok(BrokerUrl::Nats { servers })
            }
            "memory" => {
                if !rest
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(bad(
                        "a memory broker name may only use letters, digits, `-` and `_`".into(),
                    ));
                }
                Ok(BrokerUrl::Memory {
                    name: rest.to_owned(),
                })
            }
            other => Err(bad(format!(
                "unknown scheme `{other}`; use kafka://, nats:// or memory://"
            ))),
        }
    }
}

fn host_list(rest: &str, default_port: u16, allow_userinfo: bool) -> Result<Vec<String>, String> {
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err("no host given".into());
    }
    rest.split(',')
        .map(|raw| {
            let entry = redact(raw);
            let (userinfo, hostport) = match raw.rsplit_once('@') {
                Some((u, h)) if allow_userinfo => (Some(u), h),
                Some(_) => {
                    return Err(format!(
                        "`{entry}`: credentials do not belong in the URL here"
                    ));
                }
                None => (None, raw),
            };
            if hostport.contains(['/', '?', '#', ' ']) {
                return Err(format!(
                    "`{entry}`: expected host:port, without a path or query"
                ));
            }
            let (host, port) = match hostport.rsplit_once(':') {
                // An IPv6 literal without a port: `[::1]`.
                Some((h, p)) if !p.ends_with(']') => {
                    let port: u16 = p.parse().map_err(|_| {
                        format!("`{entry}`: port `{p}` is not a number from 0 to 65535")
                    })?;
                    (h, port)
                }
                _ => (hostport, default_port),
            };
            if host.is_empty() {
                return Err(format!("`{entry}`: host is empty"));
            }
            Ok(match userinfo {
                Some(u) => format!("{u}@{host}:{port}"),
                None => format!("{host}:{port}"),
            })
        })
        .collect()
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerUrl::Kafka { bootstrap } => write!(f, "kafka://{}", bootstrap.join(",")),
            BrokerUrl::Nats { servers } => {
                let hosts: Vec<&str> = servers
                    .iter()
                    .map(|s| s.trim_start_matches("nats://"))
                    .collect();
                write!(f, "nats://{}", hosts.join(","))
            }
            BrokerUrl::Memory { name } => write!(f, "memory://{name}"),
        }
    }
}

impl TryFrom<String> for BrokerUrl {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<BrokerUrl> for String {
    fn from(url: BrokerUrl) -> String {
        url.to_string()
    }
}

/// Everything Keel's binary and services read at start-up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeelConfig {
    /// Broker URL (`kafka://…`, `nats://…`, `memory://`). Default `memory://`.
    pub broker: BrokerUrl,
    /// Schema registry URL (`http://host:8081`). Default: none.
    pub registry: Option<String>,
    /// Database for outbox, inbox and registry (`postgres://…` or
    /// `sqlite://path`). Default: none.
    pub database: Option<String>,
    /// Name of the producing service, stamped on every event. Default `keel`.
    pub service: String,
    /// Defaults for topics Keel creates.
    pub topics: TopicDefaults,
    /// Consumer settings.
    pub consumer: ConsumerConfig,
    /// Publisher settings.
    pub publisher: PublisherConfig,
    /// How to authenticate to NATS (when `broker` is `nats://…`).
    pub nats: NatsAuth,
    /// TLS and SASL towards Kafka (when `broker` is `kafka://…`).
    pub kafka: KafkaSecurity,
}

/// NATS credentials and TLS (`[nats]` in `keel.toml`, `KEEL_NATS__TOKEN`,
/// …). At most one way of authenticating; TLS combines with any of them.
/// A `user:password@` or `token@` in the URL works too.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsAuth {
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<String>,
    /// Authentication token.
    pub token: Option<String>,
    /// NKey seed (`SU…`).
    pub nkey_seed: Option<String>,
    /// A `.creds` file (JWT + NKey seed), as `nsc` writes them.
    pub creds_file: Option<std::path::PathBuf>,
    /// TLS.
    pub tls: NatsTls,
}

/// TLS towards NATS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTls {
    /// Require TLS even when the URL says `nats://`.
    pub required: bool,
    /// PEM file with the CA certificates that sign the server's certificate
    /// (default: the platform's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate for mutual TLS (needs `key_file`).
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
}

/// `"(redacted)"` for a secret that is set: Debug output never shows one.
fn redacted(secret: &Option<String>) -> Option<&'static str> {
    secret.as_ref().map(|_| "(redacted)")
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &redacted(&self.password))
            .field("token", &redacted(&self.token))
            .field("nkey_seed", &redacted(&self.nkey_seed))
            .field("creds_file", &self.creds_file)
            .field("tls", &self.tls)
            .finish()
    }
}

impl NatsAuth {
    /// Refuses contradictory or incomplete settings, naming them.
    pub fn validate(&self) -> Result<()> {
        let methods = [
            ("nats.user", self.user.is_some()),
            ("nats.token", self.token.is_some()),
            ("nats.nkey_seed", self.nkey_seed.is_some()),
            ("nats.creds_file", self.creds_file.is_some()),
        ];
        let set: Vec<&str> = methods.iter().filter(|m| m.1).map(|m| m.0).collect();
        if set.len() > 1 {
            return Err(Error::config(
                set[1],
                format!(
                    "only one way of authenticating may be set, found {}",
                    set.join(" and ")
                ),
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(Error::config(
                "nats.password",
                "`user` and `password` go together; set both or neither",
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(Error::config(
                "nats.tls.key_file",
                "a client certificate needs its key: set both `cert_file` and `key_file`",
            ));
        }
        Ok(())
    }
}

/// How Kafka clients talk to the brokers: TLS and SASL (`[kafka]` in
/// `keel.toml`, `KEEL_KAFKA__SASL_PASSWORD`, …).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSecurity {
    /// Use TLS. Default false (librdkafka's `security.protocol=plaintext`).
    pub tls: bool,
    /// PEM file of CA certificates to trust (`ssl.ca.location`).
    pub ca_location: Option<String>,
    /// Client certificate PEM file for mutual TLS (`ssl.certificate.location`).
    pub certificate_location: Option<String>,
    /// Client key PEM file (`ssl.key.location`).
    pub key_location: Option<String>,
    /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub sasl_username: Option<String>,
    /// SASL password.
    pub sasl_password: Option<String>,
}

impl std::fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSecurity")
            .field("tls", &self.tls)
            .field("ca_location", &self.ca_location)
            .field("certificate_location", &self.certificate_location)
            .field("key_location", &self.key_location)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &redacted(&self.sasl_password))
            .finish()
    }
}

const SASL_MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

impl KafkaSecurity {
    /// Refuses incomplete or contradictory settings, naming them: nothing
    /// set here is silently ignored.
    pub fn validate(&self) -> Result<()> {
        if let Some(m) = &self.sasl_mechanism {
            if !SASL_MECHANISMS.contains(&m.as_str()) {
                return Err(Error::config(
                    "kafka.sasl_mechanism",
                    format!("`{m}` is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
                ));
            }
            for (name, value) in [
                ("kafka.sasl_username", &self.sasl_username),
                ("kafka.sasl_password", &self.sasl_password),
            ] {
                if value.is_none() {
                    return Err(Error::config(
                        name,
                        "SASL needs both sasl_username and sasl_password",
                    ));
                }
            }
        } else if self.sasl_username.is_some() || self.sasl_password.is_some() {
            return Err(Error::config(
                "kafka.sasl_mechanism",
                "a SASL user or password is set without a mechanism: set sasl_mechanism \
                 (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
            ));
        }
        match (&self.certificate_location, &self.key_location) {
            (Some(_), None) => {
                return Err(Error::config(
                    "kafka.key_location",
                    "mutual TLS needs both certificate_location and key_location",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "kafka.certificate_location",
                    "mutual TLS needs both certificate_location and key_location",
                ));
            }
            _ => {}
        }
        let tls_files = [
            ("kafka.ca_location", &self.ca_location),
            ("kafka.certificate_location", &self.certificate_location),
        ];
        for (name, value) in tls_files {
            if value.is_some() && !self.tls {
                return Err(Error::config(
                    name,
                    "a TLS file is set but tls = false: set tls = true (or remove it)",
                ));
            }
        }
        Ok(())
    }
}

impl Default for KeelConfig {
    fn default() -> Self {
        KeelConfig {
            broker: BrokerUrl::default(),
            registry: None,
            database: None,
            service: "keel".into(),
            topics: TopicDefaults::default(),
            consumer: ConsumerConfig::default(),
            publisher: PublisherConfig::default(),
            nats: NatsAuth::default(),
            kafka: KafkaSecurity::default(),
        }
    }
}

/// Defaults for topics Keel creates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicDefaults {
    /// Partitions per topic. Default 6. Fixed once a topic exists: keys map
    /// to partitions by `murmur2(key) % partitions`.
    pub partitions: u32,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        TopicDefaults { partitions: 6 }
    }
}

/// Consumer settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Consumer group name. Default: the service name.
    pub group: Option<String>,
    /// Most deliveries outstanding per member. Default 256.
    pub max_in_flight: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            group: None,
            max_in_flight: crate::transport::Subscription::DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// Publisher settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublisherConfig {
    /// How long to wait for the broker's acknowledgement, in milliseconds.
    /// Default 30000 (librdkafka's `delivery.timeout.ms` default is 300000;
    /// Keel fails sooner so callers see a stuck broker).
    pub ack_timeout_ms: u64,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            ack_timeout_ms: 30_000,
        }
    }
}

impl PublisherConfig {
    /// The acknowledgement timeout.
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
}

/// Longest acknowledgement wait a configuration may ask for: a day, in
/// milliseconds (a broker that has not answered by then is not going to).
pub const MAX_ACK_TIMEOUT_MS: u64 = 86_400_000;

/// Upper bound on partitions, to catch typos like `600000`.
pub const MAX_PARTITIONS: u32 = 10_000;

/// `KEEL_*` variables that are not settings: the `keel` binary reads them
/// as its own flags (`--config`, `--registry-auth`, `registry serve
/// --basic-auth`, …), so the settings loader leaves them alone instead of
/// refusing them as unknown settings.
const FLAG_VARIABLES: &[&str] = &[
    "config",
    "log",
    "registry_auth",
    "registry_ca",
    "registry_basic_auth",
    "registry_tls_cert",
    "registry_tls_key",
];

impl KeelConfig {
    /// Loads defaults ← `file` (when given; it must exist) ← `KEEL_*`
    /// environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<KeelConfig> {
        Self::from_figment(Self::layers(file)?)
    }

    /// Like [`KeelConfig::load`], with `overrides` on top (e.g. command-line
    /// flags: a struct whose unset fields are skipped when serialized).
    pub fn load_with(file: Option<&Path>, overrides: &impl Serialize) -> Result<KeelConfig> {
        Self::from_figment(Self::layers(file)?.merge(Serialized::defaults(overrides)))
    }

    fn layers(file: Option<&Path>) -> Result<Figment> {
        let mut figment = Figment::from(Serialized::defaults(KeelConfig::default()));
        if let Some(path) = file {
            if path.is_dir() {
                return Err(Error::config(
                    "config",
                    format!(
                        "config file `{}` is a directory; give the TOML file itself (e.g. `{}`)",
                        path.display(),
                        path.join("keel.toml").display()
                    ),
                ));
            }
            // Not `is_file`: `/dev/null` or a pipe is a config to read
            // (empty, or what another program writes), not a missing file.
            if !path.exists() {
                return Err(Error::config(
                    "config",
                    format!("config file `{}` does not exist", path.display()),
                ));
            }
            figment = figment.merge(ConfigFile::read(path)?);
        }
        figment = figment.merge(
            Env::prefixed("KEEL_")
                .split("__")
                .ignore(FLAG_VARIABLES)
                .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("test_")),
        );
        Ok(figment)
    }

    /// Parses a TOML document (defaults for missing fields), then validates.
    pub fn from_toml(toml: &str) -> Result<KeelConfig> {
        Self::from_figment(
            Figment::from(Serialized::defaults(KeelConfig::default())).merge(Toml::string(toml)),
        )
    }

    fn from_figment(figment: Figment) -> Result<KeelConfig> {
        let config: KeelConfig = figment.extract().map_err(figment_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses invalid values and combinations, naming the setting.
    pub fn validate(&self) -> Result<()> {
        self.nats.validate()?;
        self.kafka.validate()?;
        let partitions = self.topics.partitions;
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(Error::config(
                "topics.partitions",
                format!("must be between 1 and {MAX_PARTITIONS}, got {partitions}"),
            ));
        }
        if self.consumer.max_in_flight == 0 {
            return Err(Error::config(
                "consumer.max_in_flight",
                "must be at least 1 (it bounds the deliveries a member holds at once)",
            ));
        }
        if !(1..=MAX_ACK_TIMEOUT_MS).contains(&self.publisher.ack_timeout_ms) {
            return Err(Error::config(
                "publisher.ack_timeout_ms",
                format!("must be from 1 to {MAX_ACK_TIMEOUT_MS} (a day)"),
            ));
        }
        if self.service.is_empty() || !self.service.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::config(
                "service",
                format!(
                    "`{}` must be non-empty visible ASCII (it travels in a header)",
                    self.service
                ),
            ));
        }
        if let Some(group) = &self.consumer.group
            && group.is_empty()
        {
            return Err(Error::config("consumer.group", "must not be empty"));
        }
        if let Some(db) = &self.database {
            let ok = ["postgres://", "postgresql://", "sqlite://", "sqlite:"]
                .iter()
                .any(|p| db.starts_with(p));
            if !ok {
                return Err(Error::config(
                    "database",
                    format!("`{}` is not a postgres://… or sqlite://… URL", redact(db)),
                ));
            }
        }
        if let Some(registry) = &self.registry {
            let shown = redact(registry);
            let parsed = url::Url::parse(registry)
                .map_err(|e| Error::config("registry", format!("`{shown}` is not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(Error::config(
                    "registry",
                    format!("`{shown}` must be an http:// or https:// URL"),
                ));
            }
        }
        Ok(())
    }

    /// The consumer group: `consumer.group`, or the service name.
    pub fn group(&self) -> &str {
        self.consumer.group.as_deref().unwrap_or(&self.service)
    }
}

/// `text` — a URL, or a comma-separated list of URLs or hosts, parseable
/// or not — with each password replaced by `***`, for logs and messages.
/// A NATS token (`nats://token@host`, credentials without a `:`) is
/// replaced too; elsewhere a user name without a password is kept.
pub fn redact(text: &str) -> String {
    text.split(',')
        .map(|entry| {
            let (scheme, rest) = match entry.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, entry),
            };
            // The credentials end at the last `@` before any query or
            // fragment (a password may hold a `/`; a query may hold a `@`).
            let end = rest.find(['?', '#']).unwrap_or(rest.len());
            let (before, tail) = rest.split_at(end);
            let before = match before.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let userinfo = match userinfo.split_once(':') {
                        Some((user, _)) => format!("{user}:***"),
                        None if matches!(scheme, None | Some("nats" | "tls" | "ws" | "wss")) => {
                            "***".to_owned()
                        }
                        None => userinfo.to_owned(),
                    };
                    format!("{userinfo}@{host}")
                }
                None => before.to_owned(),
            };
            let scheme = scheme.map(|s| format!("{s}://")).unwrap_or_default();
            // The whole entry: a query cut by the list's `,` split goes on
            // in the next entry, which has no `?` of its own.
            redact_query(&format!("{scheme}{before}{tail}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Query parameters whose values are secrets (compared without case):
/// PostgreSQL's `password`, and the API keys and tokens a registry or proxy
/// may take in its URL.
const SECRET_PARAMS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "sslpassword",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "auth_token",
    "auth",
    "apikey",
    "api_key",
    "api-key",
    "key",
    "sig",
    "signature",
    "credential",
    "credentials",
];

/// Whether a query parameter named `name` holds a secret: it is one of
/// [`SECRET_PARAMS`], or its last `-`, `_` or `.` part is
/// (`old_password`, AWS's `X-Amz-Signature` and `X-Amz-Security-Token`).
fn secret_param(name: &str) -> bool {
    let last = name.rsplit(['-', '_', '.']).next().unwrap_or(name);
    SECRET_PARAMS
        .iter()
        .any(|secret| name.eq_ignore_ascii_case(secret) || last.eq_ignore_ascii_case(secret))
}

/// `text` with the value of every secret query parameter
/// ([`SECRET_PARAMS`], e.g. PostgreSQL's `?password=…`, a registry's
/// `?apikey=…`) replaced by `***`.
fn redact_query(tail: &str) -> String {
    let mut out = String::with_capacity(tail.len());
    let mut rest = tail;
    // A parameter starts the text (a query cut by a list's `,` split) or
    // follows `?`, `&` or `;`.
    let mut at_param = true;
    while !rest.is_empty() {
        if at_param {
            let name_end = rest.find(['=', '?', '&', ';', '#', '/', '@', ':']);
            if let Some(eq) = name_end.filter(|&i| rest[i..].starts_with('='))
                && secret_param(&rest[..eq])
            {
                out.push_str(&rest[..=eq]);
                out.push_str("***");
                let value = &rest[eq + 1..];
                rest = &value[value.find(['&', '#', ';']).unwrap_or(value.len())..];
                at_param = false;
                continue;
            }
        }
        let Some(c) = rest.chars().next() else { break };
        out.push(c);
        rest = &rest[c.len_utf8()..];
        at_param = matches!(c, '?' | '&' | ';');
    }
    out
}

/// The most a config file may hold. A `keel.toml` is a few KiB: more is
/// the wrong file (or a device such as `/dev/zero`, which never ends).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// A config file's TOML, read at most [`MAX_CONFIG_BYTES`] of it, that
/// names the file in its errors as figment's own file provider does.
struct ConfigFile {
    path: std::path::PathBuf,
    text: String,
}

impl ConfigFile {
    fn read(path: &Path) -> Result<ConfigFile> {
        use std::io::Read;
        let cannot = |why: String| {
            Error::config(
                "config",
                format!("cannot read config file `{}`: {why}", path.display()),
            )
        };
        let file = std::fs::File::open(path).map_err(|e| cannot(e.to_string()))?;
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| cannot(e.to_string()))?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(cannot(format!(
                "it holds more than {} KiB, which no keel.toml does; is it the right file?",
                MAX_CONFIG_BYTES / 1024
            )));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            cannot(format!(
                "it is not UTF-8 text (byte {})",
                e.utf8_error().valid_up_to()
            ))
        })?;
        Ok(ConfigFile {
            path: path.to_owned(),
            text,
        })
    }
}

impl figment::Provider for ConfigFile {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::from("TOML file", self.path.as_path())
    }

    fn data(&self) -> figment::Result<figment::value::Map<figment::Profile, figment::value::Dict>> {
        Toml::string(&self.text).data()
    }
}

/// The top-level settings that are tables (`[topics]`, …): their fields'
/// variables take a double underscore (`KEEL_TOPICS__PARTITIONS`).
const SECTIONS: &[&str] = &["topics", "consumer", "publisher", "nats", "kafka"];

fn figment_error(err: figment::Error) -> Error {
    use figment::error::Kind;
    // Report the first error: one fix at a time reads better than a pile.
    let err = err
        .into_iter()
        .next()
        .unwrap_or_else(|| figment::Error::from("unknown error".to_string()));
    let mut path = err.path.clone();
    let reason = match &err.kind {
        Kind::UnknownField(field, expected) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            let from_env = err
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            // `KEEL_TOPICS_PARTITIONS` reads as a top-level `topics_partitions`.
            let nested = field
                .match_indices('_')
                .map(|(i, _)| (&field[..i], &field[i + 1..]))
                .find(|(section, _)| SECTIONS.contains(section))
                .filter(|_| from_env && path.len() == 1);
            match nested {
                Some((section, rest)) => format!(
                    "unknown setting; a nested setting takes a double underscore: \
                     KEEL_{}__{} for `{section}.{rest}`",
                    section.to_ascii_uppercase(),
                    rest.to_ascii_uppercase()
                ),
                None => format!("unknown setting; expected one of: {}", expected.join(", ")),
            }
        }
        Kind::Message(msg) => {
            // Our own validation errors (from `try_from`) already say
            // "invalid setting `broker`: …"; keep only the reason.
            msg.split_once("`: ")
                .filter(|_| msg.starts_with("invalid setting `"))
                .map(|(_, r)| r.to_owned())
                .unwrap_or_else(|| msg.clone())
        }
        other => other.to_string(),
    };
    let from = err
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            // Overrides are serialized from code: the command-line flags.
            Some(figment::Source::Code(_)) => " (from the command line)".to_owned(),
            Some(source) => format!(" (from {} {source})", m.name),
            None => format!(" (from {})", m.name),
        })
        .unwrap_or_default();
    let setting = if path.is_empty() {
        "config".to_owned()
    } else {
        path.join(".")
    };
    Error::config(setting, format!("{reason}{from}"))
}

#[cfg(test)]
mod tests {
    use figment::Jail;

    use super::*;

    #[test]
    fn broker_urls_parse_and_print_back() {
        let cases = [
            ("kafka://127.0.0.1:9092", "kafka://127.0.0.1:9092"),
            ("kafka://a:1,b", "kafka://a:1,b:9092"),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("nats://u:p@host", "nats://u:p@host:4222"),
            ("memory://", "memory://"),
            ("memory://demo", "memory://demo"),
        ];
        for (input, printed) in cases {
            let url: BrokerUrl = input.parse().unwrap();
            assert_eq!(url.to_string(), printed);
            assert_eq!(printed.parse::<BrokerUrl>().unwrap(), url);
        }
        assert_eq!(
            "kafka://a:1,b".parse::<BrokerUrl>().unwrap(),
            BrokerUrl::Kafka {
                bootstrap: vec!["a:1".into(), "b:9092".into()]
            }
        );
    }

    #[test]
    fn passwords_stay_out_of_debug_and_messages() {
        let url: BrokerUrl = "nats://app:s3cret@a:4222,b".parse().unwrap();
        assert_eq!(url.redacted(), "nats://app:***@a:4222,b:4222");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert!(url.to_string().contains("s3cret"), "Display round-trips");
        let token: BrokerUrl = "nats://tok@a".parse().unwrap();
        assert_eq!(token.redacted(), "nats://***@a:4222");
    }

    #[test]
    fn malformed_broker_urls_name_the_setting() {
        for bad in [
            "localhost:9092",
            "kafak://h:1",
            "kafka://",
            "kafka://h:port",
            "kafka://h:99999",
            "kafka://u:p@h:1",
            "kafka://h:1/path",
            "nats://:4222",
            "memory://a b",
        ] {
            let err = bad.parse::<BrokerUrl>().unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("invalid setting `broker`"), "{bad}: {msg}");
            // As given, but for the password.
            assert!(msg.contains(&redact(bad)), "{bad}: {msg}");
        }
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = KeelConfig::from_toml("").unwrap();
        assert_eq!(c, KeelConfig::default());
        assert_eq!(c.topics.partitions, 6);
        assert_eq!(c.consumer.max_in_flight, 256);
        assert_eq!(c.group(), "keel");
        assert_eq!(c.publisher.ack_timeout(), Duration::from_secs(30));
    }

    #[test]
    fn bad_config_names_the_setting() {
        let cases = [
            ("brokr = \"kafka://h:1\"", "`brokr`", "unknown setting"),
            (
                "[consumer]\nmax_inflight = 3",
                "`consumer.max_inflight`",
                "unknown setting",
            ),
            ("broker = \"kafka:/h\"", "`broker`", "kafka:/h"),
            ("[topics]\npartitions = 0", "`topics.partitions`", "got 0"),
            ("[topics]\npartitions = -1", "`topics.partitions`", "-1"),
            (
                "[consumer]\nmax_in_flight = 0",
                "`consumer.max_in_flight`",
                "at least 1",
            ),
            ("database = \"mysql://x\"", "`database`", "postgres"),
            ("registry = \"ftp://x\"", "`registry`", "http"),
            ("service = \"\"", "`service`", "non-empty"),
            ("broker = [1]", "`broker`", "sequence"),
        ];
        for (toml, setting, reason) in cases {
            let msg = KeelConfig::from_toml(toml).unwrap_err().to_string();
            assert!(msg.contains(setting), "{toml:?} → {msg}");
            assert!(msg.contains(reason), "{toml:?} → {msg}");
        }
    }

    #[test]
    fn an_ack_timeout_over_a_day_is_refused() {
        let msg = KeelConfig::from_toml("[publisher]\nack_timeout_ms = 86400001")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("publisher.ack_timeout_ms"), "{msg}");
        KeelConfig::from_toml("[publisher]\nack_timeout_ms = 86400000").unwrap();
    }

    #[test]
    fn passwords_are_redacted_in_errors() {
        let msg = KeelConfig::from_toml("database = \"mysql://u:secret@h/db\"")
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("secret"), "{msg}");
        // Broker URLs that do not parse: the message names the fault, not
        // the password or token.
        for (bad, shown) in [
            (
                "nats://alice:s3cret@host:42x2",
                "nats://alice:***@host:42x2",
            ),
            ("nats://s3cret@host:42x2", "nats://***@host:42x2"),
            ("nats://a:4222,alice:s3cret@b:x", "alice:***@b:x"),
            ("kafka://alice:s3cret@host:9092", "alice:***@host:9092"),
            (
                "nats://alice:s3cret@host/path",
                "nats://alice:***@host/path",
            ),
        ] {
            let msg = bad.parse::<BrokerUrl>().unwrap_err().to_string();
            assert!(
                !msg.contains("s3cret") && msg.contains(shown),
                "{bad}: {msg}"
            );
        }
        // Lists, a password holding `/` and `@`, a query holding `@`, a
        // database user without a password.
        for (url, shown) in [
            (
                "nats://a:p1@h1:4222,nats://b:p2@h2:4222",
                "nats://a:***@h1:4222,nats://b:***@h2:4222",
            ),
            ("postgres://u:p/a@ss@h/db", "postgres://u:***@h/db"),
            (
                "postgres://h/db?application_name=a@b",
                "postgres://h/db?application_name=a@b",
            ),
            (
                "postgres://u:pw@h/db?sslmode=require",
                "postgres://u:***@h/db?sslmode=require",
            ),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://u@h:1/x?sslmode=require&password=s3&application_name=a",
                "postgres://u@h:1/x?sslmode=require&password=***&application_name=a",
            ),
            (
                "postgres://h/x?PASSWORD=s3#f",
                "postgres://h/x?PASSWORD=***#f",
            ),
            (
                "postgres://h/x?old_password=s3",
                "postgres://h/x?old_password=***",
            ),
            // A presigned URL's signature, credential and session token.
            (
                "https://s3.example/b?X-Amz-Credential=AK%2F1&X-Amz-Signature=ab12&X-Amz-Security-Token=t&X-Amz-Expires=60",
                "https://s3.example/b?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&X-Amz-Expires=60",
            ),
            (
                "postgres://h/x?options=a,b&password=s3",
                "postgres://h/x?options=a,b&password=***",
            ),
            (
                "http://nu:S3cretReg@127.0.0.1:1",
                "http://nu:***@127.0.0.1:1",
            ),
            // A registry's API key or token in its query.
            (
                "http://127.0.0.1:18999/?apikey=RegKey",
                "http://127.0.0.1:18999/?apikey=***",
            ),
            (
                "https://r.example/x?a=1&Token=t0k;api_key=k#frag",
                "https://r.example/x?a=1&Token=***;api_key=***#frag",
            ),
            ("http://h/?keys=1&monkey=2", "http://h/?keys=1&monkey=2"),
        ] {
            assert_eq!(redact(url), shown);
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error
    fn file_then_env_then_overrides() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "keel.toml",
                "broker = \"kafka://file:9092\"\nservice = \"orders\"\n[topics]\npartitions = 3",
            )?;
            jail.set_env("KEEL_BROKER", "nats://env:4222");
            jail.set_env("KEEL_CONSUMER__MAX_IN_FLIGHT", "7");
            jail.set_env("KEEL_TEST_KAFKA", "ignored by config");
            // The binary's own flag variables are not settings.
            jail.set_env("KEEL_REGISTRY_AUTH", "user:secret");
            jail.set_env("KEEL_REGISTRY_BASIC_AUTH", "keel:s3cret");
            jail.set_env("KEEL_REGISTRY_CA", "ca.pem");
            jail.set_env("KEEL_REGISTRY_TLS_CERT", "cert.pem");
            jail.set_env("KEEL_REGISTRY_TLS_KEY", "key.pem");
            jail.set_env("KEEL_REGISTRY", "http://env:8081");
            #[derive(Serialize)]
            struct Flags {
                topics: TopicDefaults,
            }
            let flags = Flags {
                topics: TopicDefaults { partitions: 12 },
            };
            let c = KeelConfig::load_with(Some(Path::new("keel.toml")), &flags)
                .map_err(|e| e.to_string())?;
            assert_eq!(c.broker.to_string(), "nats://env:4222");
            assert_eq!(c.registry.as_deref(), Some("http://env:8081"));
            assert_eq!(c.service, "orders");
            assert_eq!(c.consumer.max_in_flight, 7);
            assert_eq!(c.topics.partitions, 12);
            assert_eq!(c.group(), "orders");

            jail.set_env("KEEL_PARTITIONS", "4");
            let msg = KeelConfig::load(None).unwrap_err().to_string();
            assert!(
                msg.contains("`partitions`") && msg.contains("KEEL_"),
                "{msg}"
            );
            jail.clear_env();
            jail.set_env("KEEL_TOPICS_PARTITIONS", "4");
            let msg = KeelConfig::load(None).unwrap_err().to_string();
            assert!(
                msg.contains("`topics_partitions`")
                    && msg.contains("KEEL_TOPICS__PARTITIONS for `topics.partitions`"),
                "{msg}"
            );
            // A setting that is no table keeps its one name: no such hint.
            jail.clear_env();
            jail.set_env("KEEL_DATABASE_URL", "postgres://h/db");
            let msg = KeelConfig::load(None).unwrap_err().to_string();
            assert!(
                msg.contains("`database_url`") && msg.contains("expected one of: broker"),
                "{msg}"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error
    fn a_config_file_that_never_ends_or_is_no_text_is_refused() {
        let msg = KeelConfig::load(Some(Path::new("/dev/zero")))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("/dev/zero") && msg.contains("more than 1024 KiB"),
            "{msg}"
        );
        figment::Jail::expect_with(|jail| {
            let binary = jail.directory().join("keel.toml");
            std::fs::write(&binary, b"broker = \"memory://\"\n\xff\xfe").unwrap();
            let msg = KeelConfig::load(Some(&binary)).unwrap_err().to_string();
            assert!(
                msg.contains("not UTF-8") && msg.contains("byte 21"),
                "{msg}"
            );
            // A file's own mistakes still name the file.
            jail.create_file("bad.toml", "broker = 12\n")?;
            let bad = jail.directory().join("bad.toml");
            let msg = KeelConfig::load(Some(&bad)).unwrap_err().to_string();
            assert!(msg.contains("broker") && msg.contains("bad.toml"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let msg = KeelConfig::load(Some(Path::new("/nonexistent/keel.toml")))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/nonexistent/keel.toml"), "{msg}");
        let dir = std::env::temp_dir();
        let msg = KeelConfig::load(Some(&dir)).unwrap_err().to_string();
        assert!(
            msg.contains("is a directory") && msg.contains("keel.toml"),
            "{msg}"
        );
    }

    #[test]
    fn secrets_are_read_checked_and_kept_out_of_debug() {
        let c = KeelConfig::from_toml(
            "broker = \"kafka://k:9092\"\n[kafka]\ntls = true\nca_location = \"ca.pem\"\n\
             sasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"orders\"\n\
             sasl_password = \"s3cret\"\n",
        )
        .unwrap();
        assert!(c.kafka.tls);
        assert_eq!(c.kafka.sasl_mechanism.as_deref(), Some("SCRAM-SHA-512"));
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("s3cret") && debug.contains("redacted"),
            "{debug}"
        );
        let nats = KeelConfig::from_toml("[nats]\ntoken = \"t0ken\"\n").unwrap();
        let debug = format!("{nats:?}");
        assert!(
            !debug.contains("t0ken") && debug.contains("redacted"),
            "{debug}"
        );

        let msg = KeelConfig::from_toml("[kafka]\nsasl_mechanism = \"GSSAPI\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("kafka.sasl_mechanism") && msg.contains("GSSAPI"),
            "{msg}"
        );
        for (toml, setting) in [
            ("sasl_mechanism = \"PLAIN\"", "kafka.sasl_username"),
            (
                "sasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"",
                "kafka.sasl_password",
            ),
            (
                "sasl_username = \"u\"\nsasl_password = \"p\"",
                "kafka.sasl_mechanism",
            ),
            ("ca_location = \"ca.pem\"", "kafka.ca_location"),
            (
                "tls = true\ncertificate_location = \"c.pem\"",
                "kafka.key_location",
            ),
        ] {
            let msg = KeelConfig::from_toml(&format!("[kafka]\n{toml}\n"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(setting), "{toml}: {msg}");
        }
    }
}
