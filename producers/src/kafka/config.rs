//! Kafka client settings, typed and validated once, then translated into
//! librdkafka's key/value configuration — with a raw pass-through map for
//! options Keel does not model.

use std::collections::BTreeMap;
use std::time::Duration;

pub use keel_core::config::KafkaSecurity;
use keel_core::{Error, Result};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// Settings every Kafka client shares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaClientConfig {
    /// Bootstrap servers, `host:port`.
    pub bootstrap: Vec<String>,
    /// `client.id` reported to brokers. Default `keel`.
    pub client_id: String,
    /// TLS and SASL.
    pub security: KafkaSecurity,
    /// Raw librdkafka settings applied last (for anything Keel does not
    /// model). Settings that would break Keel's guarantees are refused by
    /// the publisher's validation.
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for KafkaClientConfig {
    fn default() -> Self {
        KafkaClientConfig {
            bootstrap: vec!["127.0.0.1:9092".into()],
            client_id: "keel".into(),
            security: KafkaSecurity::default(),
            librdkafka: BTreeMap::new(),
        }
    }
}

impl KafkaClientConfig {
    /// Settings for `bootstrap` servers, defaults otherwise.
    pub fn new(bootstrap: impl IntoIterator<Item = impl Into<String>>) -> Self {
        KafkaClientConfig {
            bootstrap: bootstrap.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Whether a broker answers within `timeout`: the cluster's id (known
    /// from the first connection's metadata), else its metadata. Blocks:
    /// call it off the async threads. `true` when librdkafka refuses the
    /// settings themselves (using them fails with its own message).
    pub fn answers_within(&self, timeout: Duration) -> bool {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let started = std::time::Instant::now();
        let Ok(client) = self.client_config().create::<BaseConsumer>() else {
            return true;
        };
        client.client().fetch_cluster_id(timeout).is_some()
            || client
                .fetch_metadata(None, timeout.saturating_sub(started.elapsed()))
                .is_ok()
    }

    /// Refuses invalid settings, naming them.
    pub fn validate(&self) -> Result<()> {
        if self.bootstrap.is_empty() || self.bootstrap.iter().any(|b| b.trim().is_empty()) {
            return Err(Error::config(
                "kafka.bootstrap",
                "needs at least one host:port",
            ));
        }
        self.security.validate()?;
        Ok(())
    }

    /// The librdkafka configuration for these settings.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap.join(","));
        c.set("client.id", &self.client_id);
        let s = &self.security;
        let protocol = match (s.tls, s.sasl_mechanism.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        c.set("security.protocol", protocol);
        let optional = [
            ("ssl.ca.location", &s.ca_location),
            ("ssl.certificate.location", &s.certificate_location),
            ("ssl.key.location", &s.key_location),
            ("sasl.mechanism", &s.sasl_mechanism),
            ("sasl.username", &s.sasl_username),
            ("sasl.password", &s.sasl_password),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                c.set(key, v);
            }
        }
        for (k, v) in &self.librdkafka {
            c.set(k, v);
        }
        c
    }
}

/// Compression of produced batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression (librdkafka's default).
    #[default]
    None,
    /// LZ4: cheap, good for throughput.
    Lz4,
    /// Zstandard: smaller, more CPU.
    Zstd,
}

/// Publisher settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaPublisherConfig {
    /// Connection settings.
    pub client: KafkaClientConfig,
    /// Batch compression. Default none.
    pub compression: Compression,
    /// How long to wait to fill a batch (`linger.ms`). Default 5 ms
    /// (librdkafka's default).
    pub linger_ms: u64,
    /// Largest batch in bytes (`batch.size`). Default 1,000,000 (librdkafka's).
    pub batch_size: u64,
    /// How long a publish may wait for the broker's acknowledgement,
    /// retries included (`delivery.timeout.ms`). Default 30 s.
    pub ack_timeout_ms: u64,
}

impl Default for KafkaPublisherConfig {
    fn default() -> Self {
        KafkaPublisherConfig {
            client: KafkaClientConfig::default(),
            compression: Compression::None,
            linger_ms: 5,
            batch_size: 1_000_000,
            ack_timeout_ms: 30_000,
        }
    }
}

/// librdkafka settings whose values Keel fixes, and why.
const GUARANTEES: [(&str, &str, &str); 3] = [
    (
        "enable.idempotence",
        "true",
        "without idempotence retries can duplicate and reorder events",
    ),
    (
        "acks",
        "all",
        "an acknowledgement must mean every in-sync replica has the event",
    ),
    (
        "partitioner",
        "murmur2_random",
        "keys must map to partitions as Kafka's Java clients map them",
    ),
];

/// A librdkafka boolean: `true`/`t`/`1` or `false`/`f`/`0`, any case (as
/// librdkafka reads them).
fn is_bool(value: &str, want: bool) -> bool {
    let spellings: [&str; 3] = if want {
        ["true", "t", "1"]
    } else {
        ["false", "f", "0"]
    };
    spellings.iter().any(|s| value.eq_ignore_ascii_case(s))
}

/// How long librdkafka keeps the events of a topic the broker does not
/// list before failing them as an unknown topic
/// (`topic.metadata.propagation.max.ms`; librdkafka's default is 30 s, so
/// a misspelt topic was reported only as a timeout, after 30 s). A broker
/// that creates topics on demand, or a topic just created elsewhere that
/// has not reached the broker asked, is listed well within it, and its
/// events go out. Overridable through `librdkafka`.
pub const UNKNOWN_TOPIC_WAIT_MS: u64 = 5_000;

impl KafkaPublisherConfig {
    /// The acknowledgement timeout.
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    /// Refuses invalid settings and raw overrides that would silently
    /// disable idempotence, weaken acknowledgements, reorder retries,
    /// stop the producer on a failed batch or move keys to other
    /// partitions, naming them.
    pub fn validate(&self) -> Result<()> {
        self.client.validate()?;
        // librdkafka's `delivery.timeout.ms`: at most i32::MAX, and no
        // shorter than `linger.ms` (it would refuse both, naming its own keys).
        if !(1..=i32::MAX as u64).contains(&self.ack_timeout_ms) {
            return Err(Error::config(
                "kafka.ack_timeout_ms",
                format!("must be from 1 to {}", i32::MAX),
            ));
        }
        if self.ack_timeout_ms < self.linger_ms {
            return Err(Error::config(
                "kafka.ack_timeout_ms",
                format!(
                    "{} is shorter than linger_ms ({}): events would time out before their batch is sent",
                    self.ack_timeout_ms, self.linger_ms
                ),
            ));
        }
        for (key, value) in &self.client.librdkafka {
            let refused = |why: &str| {
                Err(Error::config(
                    format!("kafka.librdkafka.{key}"),
                    format!("`{value}` is refused: {why}"),
                ))
            };
            match key.as_str() {
                "enable.idempotence" if !is_bool(value, true) => {
                    return refused(
                        "idempotence keeps retries from duplicating or reordering events",
                    );
                }
                "acks" | "request.required.acks" if value != "all" && value != "-1" => {
                    return refused(
                        "an acknowledgement must mean every in-sync replica has the event",
                    );
                }
                "max.in.flight.requests.per.connection" | "max.in.flight"
                    if value.parse::<u32>().map_or(true, |n| n > 5) =>
                {
                    return refused("more than 5 in-flight requests can reorder retried batches");
                }
                "retries" | "message.send.max.retries" if value == "0" => {
                    return refused("retries are what make a transient broker failure harmless");
                }
                // Left at librdkafka's default (false) rather than set:
                // naming this experimental property makes librdkafka warn.
                "enable.gapless.guarantee" if !is_bool(value, false) => {
                    return refused(
                        "Keel reports failures per event instead of stopping the producer",
                    );
                }
                "partitioner" if value != "murmur2_random" && value != "murmur2" => {
                    return refused(
                        "keys must map to partitions by murmur2 as in Kafka's Java clients",
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The librdkafka configuration of the producer.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = self.client.client_config();
        for (key, value, _) in GUARANTEES {
            c.set(key, value);
        }
        c.set(
            "compression.type",
            match self.compression {
                Compression::None => "none",
                Compression::Lz4 => "lz4",
                Compression::Zstd => "zstd",
            },
        );
        c.set("linger.ms", self.linger_ms.to_string());
        c.set("batch.size", self.batch_size.to_string());
        c.set("delivery.timeout.ms", self.ack_timeout_ms.to_string());
        c.set(
            "topic.metadata.propagation.max.ms",
            UNKNOWN_TOPIC_WAIT_MS.min(self.ack_timeout_ms).to_string(),
        );
        // Raw settings last, but never over the guarantees (validated above).
        for (k, v) in &self.client.librdkafka {
            if !GUARANTEES.iter().any(|(key, _, _)| key == k) {
                c.set(k, v);
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_librdkafka_would_refuse_are_named_as_keel_settings() {
        for (ack_timeout_ms, linger_ms, said) in [
            (0, 5, "from 1 to"),
            (u64::from(u32::MAX), 5, "from 1 to"),
            (3, 5, "shorter than linger_ms"),
        ] {
            let config = KafkaPublisherConfig {
                ack_timeout_ms,
                linger_ms,
                ..KafkaPublisherConfig::default()
            };
            let err = config.validate().unwrap_err().to_string();
            assert!(
                err.contains("kafka.ack_timeout_ms") && err.contains(said),
                "{err}"
            );
        }
        let longest = KafkaPublisherConfig {
            ack_timeout_ms: i32::MAX as u64,
            ..KafkaPublisherConfig::default()
        };
        longest.validate().unwrap();
    }

    #[test]
    fn guarantees_are_set_and_cannot_be_overridden() {
        let mut config = KafkaPublisherConfig::default();
        let c = config.client_config();
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        // Left at librdkafka's default (false): naming it only warns.
        assert_eq!(c.get("enable.gapless.guarantee"), None);
        for (key, value, setting) in [
            (
                "enable.idempotence",
                "false",
                "kafka.librdkafka.enable.idempotence",
            ),
            ("acks", "1", "kafka.librdkafka.acks"),
            (
                "max.in.flight.requests.per.connection",
                "10",
                "kafka.librdkafka.max.in.flight.requests.per.connection",
            ),
            ("retries", "0", "kafka.librdkafka.retries"),
            (
                "enable.gapless.guarantee",
                "True",
                "kafka.librdkafka.enable.gapless.guarantee",
            ),
            (
                "enable.idempotence",
                "0",
                "kafka.librdkafka.enable.idempotence",
            ),
            (
                "partitioner",
                "consistent_random",
                "kafka.librdkafka.partitioner",
            ),
        ] {
            config.client.librdkafka = [(key.to_owned(), value.to_owned())].into();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(setting), "{err}");
        }
        config.client.librdkafka = [(
            "queue.buffering.max.messages".to_owned(),
            "500000".to_owned(),
        )]
        .into();
        config.validate().unwrap();
        for (key, value) in [
            ("enable.idempotence", "TRUE"),
            ("enable.gapless.guarantee", "f"),
        ] {
            let mut accepted = KafkaPublisherConfig::default();
            accepted.client.librdkafka = [(key.to_owned(), value.to_owned())].into();
            accepted.validate().unwrap();
        }
        assert_eq!(
            config.client_config().get("queue.buffering.max.messages"),
            Some("500000")
        );
    }

    #[test]
    fn a_missing_topic_is_waited_for_5_s_or_the_ack_timeout_unless_set() {
        let wait = |config: &KafkaPublisherConfig| {
            config
                .client_config()
                .get("topic.metadata.propagation.max.ms")
                .map(str::to_owned)
        };
        let mut config = KafkaPublisherConfig::default();
        assert_eq!(wait(&config).as_deref(), Some("5000"));
        config.ack_timeout_ms = 2_000;
        assert_eq!(wait(&config).as_deref(), Some("2000"));
        config.client.librdkafka = [(
            "topic.metadata.propagation.max.ms".to_owned(),
            "30000".to_owned(),
        )]
        .into();
        assert_eq!(wait(&config).as_deref(), Some("30000"));
    }

    #[test]
    fn security_settings_translate_and_validate() {
        let mut config = KafkaClientConfig::new(["a:9092", "b:9092"]);
        config.security = KafkaSecurity {
            tls: true,
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("keel".into()),
            sasl_password: Some("s3cret".into()),
            ..KafkaSecurity::default()
        };
        config.validate().unwrap();
        let c = config.client_config();
        assert_eq!(c.get("bootstrap.servers"), Some("a:9092,b:9092"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        config.security.sasl_mechanism = Some("GSSAPI".into());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("sasl_mechanism")
        );
        config.security.sasl_mechanism = Some("PLAIN".into());
        config.security.sasl_password = None;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("sasl_username")
        );
        assert!(
            KafkaClientConfig::new(Vec::<String>::new())
                .validate()
                .is_err()
        );
    }
}
