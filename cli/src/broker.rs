//! Broker operations on Kafka and NATS JetStream: `keel topics`, `keel lag`,
//! `keel group list|reset`, `keel publish` (JSON in, Avro through the
//! registry on the wire) and `keel tail` (decoded events out as JSON
//! lines). The broker comes from `--broker kafka://…` or `nats://…`.

use std::collections::HashSet;
use std::io::BufRead;
use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use keel_consumers::kafka::{KafkaConsumerConfig, KafkaGroupConsumer};
use keel_consumers::nats::{JetStreamConsumerConfig, JetStreamGroupConsumer};
use keel_consumers::router::dead_letter;
use keel_core::{
    BrokerUrl, Envelope, Error, KeelConfig, Publisher, Sent, StartFrom, Subscriber, Subscription,
    TopicSpec,
};
use keel_producers::kafka::{
    CleanupPolicy, KafkaAdmin, KafkaClientConfig, KafkaPublisher, KafkaPublisherConfig, ResetTo,
    TopicSettings,
};
use keel_producers::nats::{
    JetStreamAdmin, JetStreamPublisher, JetStreamPublisherConfig, NatsClientConfig, StreamSettings,
};
use keel_schemas::{AvroCodec, CodecOptions, RegistryClient, SchemaError, SubjectNameStrategy};
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub(crate) enum TopicsCommand {
    /// List topics (Kafka's internal `__…` topics left out).
    #[command(after_help = "Example:\n  keel --broker kafka://127.0.0.1:9092 topics list")]
    List,
    /// Create a topic; succeeds when it exists with the same partition count
    /// and the settings given (those left out are not compared), and is
    /// refused, naming each difference, when they differ: nothing is changed.
    #[command(after_help = "Example:\n  \
        keel --broker kafka://127.0.0.1:9092 topics create orders --partitions 12 --retention-ms 604800000")]
    Create(CreateArgs),
    /// Partitions with leader, replicas and stored offsets, as JSON.
    #[command(
        after_help = "Example:\n  keel --broker kafka://127.0.0.1:9092 topics describe orders"
    )]
    Describe {
        /// Topic name.
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        topic: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// Topic name.
    #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
    topic: String,
    /// Partitions, 1 to 10,000 (default: the `topics.partitions` setting).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(keel_core::config::MAX_PARTITIONS)))]
    partitions: Option<u32>,
    /// Replication factor, 1 or more (-1: the broker's default).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true, value_parser = replication_factor)]
    replication_factor: i32,
    /// How long events are kept, in ms, 1 or more (-1: forever).
    #[arg(long, allow_negative_numbers = true, value_parser = retention_ms)]
    retention_ms: Option<i64>,
    /// Keep only the latest event per key (`cleanup.policy=compact`).
    #[arg(long)]
    compact: bool,
}

/// `--replication-factor`, read alike for both brokers: -1 or at least 1
/// (Kafka refuses 0; a NATS stream needs at least one replica).
fn replication_factor(text: &str) -> Result<i32, String> {
    match text.parse::<i32>() {
        Ok(n) if n == -1 || n >= 1 => Ok(n),
        _ => Err(format!(
            "`{text}` is not a replication factor: give 1 or more, or -1 for the broker's default"
        )),
    }
}

/// `--retention-ms`, read alike for both brokers: -1 or at least 1. Zero
/// is refused: Kafka would delete events at once where NATS would keep
/// them for ever.
fn retention_ms(text: &str) -> Result<i64, String> {
    match text.parse::<i64>() {
        Ok(n) if n == -1 || n >= 1 => Ok(n),
        Ok(0) => Err(
            "0 is refused: Kafka would delete events at once, NATS would keep them for ever; give a number of ms, or -1 to keep events for ever"
                .to_owned(),
        ),
        _ => Err(format!(
            "`{text}` is not a retention: give a number of ms (1 or more), or -1 to keep events for ever"
        )),
    }
}

#[derive(Debug, Args)]
pub(crate) struct LagArgs {
    /// Consumer group.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    group: String,
    /// Topic.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    topic: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum GroupCommand {
    /// List consumer groups with their state and member count.
    #[command(after_help = "Example:\n  keel --broker kafka://127.0.0.1:9092 group list")]
    List,
    /// Move a stopped group's committed positions on a topic (refused while
    /// the group has members).
    #[command(after_help = "Examples:\n  \
        keel group reset --group billing --topic orders --to-earliest\n  \
        keel group reset --group billing --topic orders --to-datetime 2026-11-27T12:00:00Z")]
    Reset(ResetArgs),
}

#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("target")
        .required(true)
        .args(["to_earliest", "to_latest", "to_datetime", "to_offset"])
))]
pub(crate) struct ResetArgs {
    /// Consumer group.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    group: String,
    /// Topic.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    topic: String,
    /// To the oldest stored event.
    #[arg(long)]
    to_earliest: bool,
    /// To the end (skip everything stored).
    #[arg(long)]
    to_latest: bool,
    /// To the first event at or after this time (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    to_datetime: Option<String>,
    /// To this offset on every partition, or per partition as
    /// `PARTITION=OFFSET,…` (clamped to what is stored).
    #[arg(long, value_name = "OFFSET|P=OFFSET,…")]
    to_offset: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// Topic to publish to.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    topic: String,
    /// JSON lines to read (default: standard input). Each line is one event
    /// in the schema's JSON shape.
    #[arg(long, value_name = "FILE")]
    file: Option<std::path::PathBuf>,
    /// Subject of the schema (default: `<topic>-value`, the topic-name
    /// strategy). Its latest version encodes the events.
    #[arg(long)]
    subject: Option<String>,
    /// Field of each event whose value is the key.
    #[arg(long, conflicts_with = "key")]
    key_field: Option<String>,
    /// The same key for every event.
    #[arg(long)]
    key: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// Topic to read.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    topic: String,
    /// Consumer group (default: a new `keel-tail-<id>` group each run, so
    /// no other reader's position moves).
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    group: Option<String>,
    /// Where a group without committed positions starts.
    #[arg(long, value_enum, default_value_t = From::Latest)]
    from: From,
    /// Start at the first event stored at or after this time (RFC 3339),
    /// instead of `--from`.
    #[arg(long, value_name = "RFC3339", conflicts_with = "from")]
    since: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<usize>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum From {
    /// The oldest stored event.
    Earliest,
    /// Only events published once the tail holds their partition (it lists
    /// those it holds on standard error: `keel tail: reading …`); as with
    /// Kafka's own console consumer, what is published while it joins is
    /// not shown.
    Latest,
}

/// The configured broker's client settings.
pub(crate) enum Broker {
    Kafka(KafkaClientConfig),
    Nats(NatsClientConfig),
}

/// Members whose heartbeat is older than this count as gone (the NATS
/// consumer's default session timeout).
const NATS_LIVENESS: std::time::Duration = std::time::Duration::from_secs(10);

/// A publisher on the configured broker whose own acknowledgement timeout
/// (librdkafka's `delivery.timeout.ms`, the NATS PubAck wait) is
/// `ack_timeout`, so nothing it sends outlives a caller that gave up.
pub(crate) async fn publisher(
    config: &KeelConfig,
    command: &str,
    ack_timeout: std::time::Duration,
) -> anyhow::Result<std::sync::Arc<dyn Publisher>> {
    Ok(match broker(config, command)? {
        Broker::Kafka(client) => std::sync::Arc::new(KafkaPublisher::new(KafkaPublisherConfig {
            client,
            ack_timeout_ms: u64::try_from(ack_timeout.as_millis()).unwrap_or(u64::MAX),
            ..KafkaPublisherConfig::default()
        })?),
        Broker::Nats(client) => std::sync::Arc::new(
            JetStreamPublisher::connect(JetStreamPublisherConfig {
                ack_timeout,
                ..JetStreamPublisherConfig::new(client)
            })
            .await?,
        ),
    })
}

pub(crate) fn broker(config: &KeelConfig, command: &str) -> anyhow::Result<Broker> {
    match &config.broker {
        BrokerUrl::Kafka { bootstrap } => {
            let client = KafkaClientConfig {
                security: config.kafka.clone(),
                ..KafkaClientConfig::new(bootstrap.clone())
            };
            say_if_kafka_is_silent(&client);
            Ok(Broker::Kafka(client))
        }
        BrokerUrl::Nats { servers } => Ok(Broker::Nats(NatsClientConfig {
            auth: config.nats.clone(),
            ..NatsClientConfig::new(servers.join(","))
        })),
        other => bail!(
            "`keel {command}` needs a broker: --broker kafka://host:9092 or nats://host:4222 (or `broker` in keel.toml); \
             the configured broker is {other}"
        ),
    }
}

/// How long a Kafka broker may keep silent before the command says it is
/// still waiting.
const KAFKA_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// librdkafka waits for an unreachable broker as long as each request's
/// timeout (30 s by default) without a word: once per process, a thread of
/// its own asks the broker and, with no answer within [`KAFKA_PATIENCE`],
/// says so on stderr while the command goes on waiting. (A plain thread:
/// it never holds the process's exit, as a blocking task of the runtime
/// would.)
fn say_if_kafka_is_silent(client: &KafkaClientConfig) {
    static ASKED: std::sync::Once = std::sync::Once::new();
    ASKED.call_once(|| {
        let client = client.clone();
        let _ = std::thread::Builder::new()
            .name("keel-kafka-patience".into())
            .spawn(move || {
                if !client.answers_within(KAFKA_PATIENCE) {
                    note!(
                        "keel: no answer from Kafka at {} after {} s; still trying: is the \
                         broker up, the address right, and does it need TLS or SASL?",
                        keel_core::config::redact(&client.bootstrap.join(",")),
                        KAFKA_PATIENCE.as_secs()
                    );
                }
            });
    });
}

pub(crate) async fn topics(config: &KeelConfig, command: TopicsCommand) -> anyhow::Result<()> {
    let client = match broker(config, "topics")? {
        Broker::Kafka(client) => client,
        Broker::Nats(client) => return nats_topics(config, &client, command).await,
    };
    match command {
        TopicsCommand::List => {
            for topic in KafkaAdmin::new(&client, -1)?.list_topics().await? {
                say!("{topic}");
            }
        }
        TopicsCommand::Create(args) => {
            let admin = KafkaAdmin::new(&client, args.replication_factor)?;
            let spec = TopicSpec {
                name: args.topic.clone(),
                partitions: args.partitions.unwrap_or(config.topics.partitions),
            };
            let settings = TopicSettings {
                retention_ms: args.retention_ms,
                cleanup_policy: args.compact.then_some(CleanupPolicy::Compact),
            };
            admin.ensure_topic_with(&spec, &settings).await?;
            say!(
                "topic {} ready with {} partitions",
                spec.name,
                spec.partitions
            );
        }
        TopicsCommand::Describe { topic } => {
            match KafkaAdmin::new(&client, -1)?.describe_topic(&topic).await? {
                Some(description) => say!("{}", serde_json::to_string_pretty(&description)?),
                None => bail!("topic `{topic}` does not exist"),
            }
        }
    }
    Ok(())
}

async fn nats_topics(
    config: &KeelConfig,
    client: &NatsClientConfig,
    command: TopicsCommand,
) -> anyhow::Result<()> {
    let admin = JetStreamAdmin::connect(client).await?;
    match command {
        TopicsCommand::List => {
            for topic in admin.list_topics().await? {
                say!("{topic}");
            }
        }
        TopicsCommand::Create(args) => {
            if args.compact {
                bail!(
                    "--compact: JetStream streams have no per-key compaction; leave it out on NATS"
                );
            }
            let spec = TopicSpec {
                name: args.topic.clone(),
                partitions: args.partitions.unwrap_or(config.topics.partitions),
            };
            // Without --retention-ms, an existing stream keeps its own (as
            // on Kafka): its retention is compared only when one is given.
            let existing = match args.retention_ms {
                Some(_) => None,
                None => match admin.describe_topic(&spec.name).await {
                    Ok(described) => Some(described.settings),
                    // Not there (or a name the create below refuses).
                    Err(e) if !e.is_retriable() => None,
                    Err(e) => return Err(e.into()),
                },
            };
            let max_age = match (args.retention_ms, &existing) {
                (None, Some(existing)) => existing.max_age,
                (None | Some(-1), _) => None,
                (Some(ms), _) if ms > 0 => {
                    let age = std::time::Duration::from_millis(ms as u64);
                    if age > keel_producers::nats::admin::MAX_NATS_DURATION {
                        bail!(
                            "--retention-ms {ms}: longer than NATS can hold (at most {} ms); give -1 to keep events for ever",
                            keel_producers::nats::admin::MAX_NATS_DURATION.as_millis()
                        );
                    }
                    Some(age)
                }
                (Some(ms), _) => {
                    bail!("--retention-ms {ms}: give a positive number of ms, or -1 for forever")
                }
            };
            // The publish de-duplication window, as nats-server sets it:
            // 2 minutes, or the retention when shorter.
            let default_window = StreamSettings::default().duplicate_window;
            let duplicate_window = match (&existing, max_age) {
                (Some(existing), _) => existing.duplicate_window,
                (None, Some(age)) => default_window.min(age),
                (None, None) => default_window,
            };
            let settings = StreamSettings {
                max_age,
                duplicate_window,
                replicas: if args.replication_factor < 1 {
                    1
                } else {
                    args.replication_factor as usize
                },
                ..StreamSettings::default()
            };
            admin.ensure_stream(&spec, &settings).await?;
            say!(
                "topic {} ready with {} partitions",
                spec.name,
                spec.partitions
            );
        }
        TopicsCommand::Describe { topic } => {
            let d = admin.describe_topic(&topic).await?;
            let s = &d.settings;
            say!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "name": d.name,
                    "partitions": d.partitions,
                    "messages_per_partition": d.messages_per_partition,
                    "first_sequence": d.first_sequence,
                    "last_sequence": d.last_sequence,
                    "bytes": d.bytes,
                    "max_age_ms": s.max_age.map(|a| a.as_millis() as u64),
                    "max_bytes": s.max_bytes,
                    "max_messages": s.max_messages,
                    "max_message_size": s.max_message_size,
                    "duplicate_window_ms": s.duplicate_window.as_millis() as u64,
                    "replicas": s.replicas,
                }))?
            );
        }
    }
    Ok(())
}

pub(crate) async fn lag(config: &KeelConfig, args: LagArgs) -> anyhow::Result<()> {
    let client = match broker(config, "lag")? {
        Broker::Kafka(client) => client,
        Broker::Nats(client) => {
            let lags = JetStreamAdmin::connect(&client)
                .await?
                .lag(&args.group, &args.topic)
                .await?;
            say!(
                "{:>9}  {:>12}  {:>12}  {:>12}  {:>10}",
                "partition",
                "position",
                "pending",
                "unacked",
                "lag"
            );
            for p in &lags {
                let position = match (p.position, p.starts_at) {
                    (Some(sequence), _) => sequence.to_string(),
                    (None, Some(_)) => "by time".to_owned(),
                    (None, None) => "-".to_owned(),
                };
                say!(
                    "{:>9}  {position:>12}  {:>12}  {:>12}  {:>10}",
                    p.partition,
                    p.pending,
                    p.ack_pending,
                    p.lag()
                );
            }
            let total = lags.iter().fold(0u64, |sum, p| sum.saturating_add(p.lag()));
            say!(
                "group {} on {}: {total} events behind",
                args.group,
                args.topic
            );
            let by_time: Vec<(u32, String)> = lags
                .iter()
                .filter(|p| p.position.is_none())
                .filter_map(|p| p.starts_at.map(|at| (p.partition, at.to_rfc3339())))
                .collect();
            if let Some((_, first)) = by_time.first() {
                let partitions: Vec<u32> = by_time.iter().map(|(p, _)| *p).collect();
                let mut times: Vec<&str> = by_time.iter().map(|(_, t)| t.as_str()).collect();
                times.dedup();
                let when = if times.len() == 1 {
                    first.clone()
                } else {
                    times.join(" / ")
                };
                say!(
                    "group {} was reset to {when} and has not read from there yet on partitions \
                     {partitions:?}: each starts with its first event at or after that time (the \
                     sequence shows once read)",
                    args.group
                );
            } else if lags.iter().all(|p| p.position.is_none()) {
                say!(
                    "group {} has committed nothing on {} (a misspelt name, or a group that has \
                     not run on it yet)",
                    args.group,
                    args.topic
                );
            }
            return Ok(());
        }
    };
    let lags = KafkaAdmin::new(&client, -1)?
        .lag(&args.group, &args.topic)
        .await?;
    say!(
        "{:>9}  {:>12}  {:>12}  {:>10}",
        "partition",
        "committed",
        "end",
        "lag"
    );
    for p in &lags {
        let committed = p.committed.map_or("-".to_owned(), |c| c.to_string());
        say!(
            "{:>9}  {committed:>12}  {:>12}  {:>10}",
            p.partition,
            p.end,
            p.lag
        );
    }
    let total = lags.iter().fold(0i64, |sum, p| sum.saturating_add(p.lag));
    say!(
        "group {} on {}: {total} events behind",
        args.group,
        args.topic
    );
    if lags.iter().all(|p| p.committed.is_none()) {
        say!(
            "group {} has committed nothing on {} (a misspelt name, or a group that has \
             not committed yet): the lag counts from each partition's earliest event",
            args.group,
            args.topic
        );
    }
    Ok(())
}

pub(crate) async fn group(config: &KeelConfig, command: GroupCommand) -> anyhow::Result<()> {
    let broker = broker(config, "group")?;
    match command {
        GroupCommand::List => match broker {
            Broker::Kafka(client) => {
                for g in KafkaAdmin::new(&client, -1)?.list_groups().await? {
                    say!("{}\t{}\t{} members", g.name, g.state, g.members);
                }
            }
            Broker::Nats(client) => {
                let admin = JetStreamAdmin::connect(&client).await?;
                for g in admin.list_groups(NATS_LIVENESS).await? {
                    say!(
                        "{}\ttopic {}\t{} live members\t{} partitions leased",
                        g.group,
                        g.topic,
                        g.live_members,
                        g.partitions
                    );
                }
            }
        },
        GroupCommand::Reset(args) => {
            let to = if args.to_earliest {
                ResetTo::Earliest
            } else if args.to_latest {
                ResetTo::Latest
            } else if let Some(text) = &args.to_offset {
                offsets(text)?
            } else if let Some(text) = &args.to_datetime {
                ResetTo::Timestamp(rfc3339("--to-datetime", text)?.timestamp_millis())
            } else {
                bail!("say where to: --to-earliest, --to-latest, --to-datetime or --to-offset");
            };
            // Whether the group had a position before (a reset of a name
            // never used sets one up, as Kafka's own tool does: said, so a
            // misspelt name does not pass unnoticed).
            let new_group = match broker {
                Broker::Kafka(client) => {
                    let admin = KafkaAdmin::new(&client, -1)?;
                    // Best effort: a reset does not fail for the note.
                    let before = admin.lag(&args.group, &args.topic).await.ok();
                    let positions = admin.reset_group(&args.group, &args.topic, to).await?;
                    for (partition, offset) in positions {
                        say!("{}\tpartition {partition}\t-> {offset}", args.topic);
                    }
                    before.is_some_and(|before| before.iter().all(|p| p.committed.is_none()))
                }
                Broker::Nats(client) => {
                    let admin = JetStreamAdmin::connect(&client).await?;
                    let before = admin.lag(&args.group, &args.topic).await.ok();
                    let positions = admin
                        .reset_group(&args.group, &args.topic, to, NATS_LIVENESS)
                        .await?;
                    for (partition, start) in positions {
                        say!("{}\tpartition {partition}\t-> {start}", args.topic);
                    }
                    before.is_some_and(|before| {
                        before
                            .iter()
                            .all(|p| p.position.is_none() && p.starts_at.is_none())
                    })
                }
            };
            if new_group {
                note!(
                    "group `{}` had no position on `{}` before: it starts where shown when it \
                     first runs (if the name is misspelt, reset the right one; this one is \
                     left set up)",
                    args.group,
                    args.topic
                );
            }
        }
    }
    Ok(())
}

pub(crate) async fn publish(
    config: &KeelConfig,
    registry: RegistryClient,
    args: PublishArgs,
) -> anyhow::Result<()> {
    // A broker is configured: checked before the input is read.
    broker(config, "publish")?;
    let registry = Arc::new(registry);
    let subject = args
        .subject
        .clone()
        .unwrap_or_else(|| SubjectNameStrategy::TopicName.subject(&args.topic, ""));
    let latest = match registry.version(&subject, "latest").await {
        Ok(latest) => latest,
        Err(SchemaError::Registry { status: 404, .. }) if args.subject.is_none() => bail!(
            "no schema under subject `{subject}` (the topic-name default for topic `{topic}`): \
             register one there (`keel schema register DIR --strategy topic-name --topic {topic}`, \
             DIR holding that record alone and the types it uses) \
             or name the subject with --subject (`keel schema register DIR` registers each \
             record under its full name, e.g. --subject shop.orders.OrderPlaced)",
            topic = args.topic
        ),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("no schema to encode with under subject `{subject}`"));
        }
    };
    let event_type = full_name(&latest.schema)
        .with_context(|| format!("the latest schema of `{subject}` is not a named record"))?;
    let codec = AvroCodec::new(
        registry.clone(),
        CodecOptions {
            strategy: SubjectNameStrategy::TopicName,
            auto_register: false,
        },
    );

    // Everything is read and encoded before anything is published: a bad
    // line fails the command with nothing sent.
    let lines: Vec<String> = match &args.file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .lines()
            .map(str::to_owned)
            .collect(),
        None => std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<_, _>>()
            .context("cannot read standard input")?,
    };
    let mut events = Vec::new();
    // The input line of each event, for what a failure names.
    let mut line_of = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        // A byte-order mark that editors on Windows put before the text.
        let line = match n {
            0 => line.strip_prefix('\u{feff}').unwrap_or(line),
            _ => line,
        };
        if line.trim().is_empty() {
            continue;
        }
        let at = n + 1;
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("line {at}: not JSON"))?;
        let key = match (&args.key, &args.key_field) {
            (Some(key), _) => key.clone(),
            (None, Some(field)) => match value.get(field) {
                Some(Value::String(s)) => s.clone(),
                Some(other) if !other.is_null() => other.to_string(),
                _ => bail!("line {at}: no field `{field}` to take the key from"),
            },
            (None, None) => bail!("say which key to publish under: --key-field FIELD or --key KEY"),
        };
        let payload = codec
            .encode_json(latest.id, &value)
            .await
            .with_context(|| format!("line {at} (subject `{subject}` v{})", latest.version))?;
        events.push(
            Envelope::new(event_type.clone(), key, payload).with_source(config.service.clone()),
        );
        line_of.push(at);
    }
    if events.is_empty() {
        bail!("no events to publish: the input is empty");
    }
    let ack_timeout = config.publisher.ack_timeout();
    let publisher = publisher(config, "publish", ack_timeout).await?;
    let ids: Vec<String> = events.iter().map(|e| e.id().to_string()).collect();
    let keys: Vec<keel_core::Key> = events.iter().map(|e| e.key().clone()).collect();
    // Each event's own outcome: when one fails, the receipts of those
    // stored are still printed, and the error names the lines to send
    // again. Each event's acknowledgement has its own timeout; this bound
    // is only for a broker that stops answering, and grows with the input
    // (on NATS a key's events go one round trip at a time).
    let events_count = u32::try_from(events.len()).unwrap_or(u32::MAX);
    let within = ack_timeout
        .saturating_mul(events_count.saturating_add(2))
        .min(PUBLISH_BOUND);
    let outcomes = publisher.publish_each(&args.topic, events, within).await;
    let mut stored = 0;
    let mut failed = Vec::new();
    let mut not_sent = Vec::new();
    // A topic-wide failure (missing, not ours to write): said once.
    let mut topic_failure = None;
    // Keys with an event not published: a later one of theirs that was
    // stored anyway (Kafka pipelines sends) is out of its key's order.
    let mut broken: HashSet<&keel_core::Key> = HashSet::new();
    let mut out_of_order = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let (id, at, key) = (&ids[i], line_of[i], &keys[i]);
        match outcome {
            Sent::Stored(receipt) => {
                say!(
                    "{}",
                    json!({"topic": &*receipt.topic, "partition": receipt.partition, "offset": receipt.position, "id": id})
                );
                stored += 1;
                if broken.contains(key) {
                    out_of_order.push(at);
                }
                continue;
            }
            Sent::Failed(e @ Error::Topic { .. }) => {
                topic_failure.get_or_insert(e);
                failed.push(None);
            }
            Sent::Failed(e) => failed.push(Some(format!("line {at} (event {id}): {e}"))),
            Sent::NotSent => not_sent.push(at),
        }
        broken.insert(key);
    }
    if failed.is_empty() && not_sent.is_empty() {
        return Ok(());
    }
    let mut why: Vec<String> = topic_failure.iter().map(ToString::to_string).collect();
    let reasons: Vec<&String> = failed.iter().flatten().collect();
    why.extend(reasons.iter().take(3).map(|r| (*r).clone()));
    if reasons.len() > 3 {
        why.push(format!("and {} more failed", reasons.len() - 3));
    }
    if !not_sent.is_empty() {
        why.push(format!("not sent: {}", line_list(&not_sent)));
    }
    if !out_of_order.is_empty() {
        why.push(format!(
            "stored after an earlier event of their key failed, so out of the key's order: {} \
             (send them again after it to restore the order; consumers then see them twice)",
            line_list(&out_of_order)
        ));
    }
    let receipts = match stored {
        0 => "none stored".to_owned(),
        n => format!("{n} stored: their receipts are on standard output"),
    };
    bail!(
        "{} event(s) not published ({receipts}): {}. Publish those lines again once the cause \
         is fixed (an event whose acknowledgement timed out may be stored already: a consumer \
         sees it twice, under two event ids)",
        failed.len() + not_sent.len(),
        why.join("; ")
    )
}

/// The longest `keel publish` waits for its acknowledgements in all (each
/// also has its own timeout): a week.
const PUBLISH_BOUND: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// `lines 3, 4, 7` (the first ten, then how many more).
fn line_list(lines: &[usize]) -> String {
    let shown: Vec<String> = lines.iter().take(10).map(ToString::to_string).collect();
    let more = match lines.len() {
        n if n > 10 => format!(" and {} more", n - 10),
        _ => String::new(),
    };
    let word = if lines.len() == 1 { "line" } else { "lines" };
    format!("{word} {}{more}", shown.join(", "))
}

/// `--to-offset`: one offset for all partitions, or `P=O,P=O`.
fn offsets(text: &str) -> anyhow::Result<ResetTo> {
    let bad = || {
        format!(
            "--to-offset `{text}`: give an offset (`100`) or partition=offset pairs (`0=100,3=250`)"
        )
    };
    if let Ok(offset) = text.trim().parse::<i64>() {
        return Ok(ResetTo::Offset(offset));
    }
    let mut pairs = Vec::new();
    for pair in text.split(',') {
        let (p, o) = pair.split_once('=').with_context(bad)?;
        let p: i32 = p.trim().parse().with_context(bad)?;
        let o: i64 = o.trim().parse().with_context(bad)?;
        pairs.push((p, o));
    }
    Ok(ResetTo::Offsets(pairs))
}

pub(crate) fn rfc3339(flag: &str, text: &str) -> anyhow::Result<DateTime<Utc>> {
    let at: DateTime<Utc> = match DateTime::parse_from_rfc3339(text) {
        Ok(at) => at.into(),
        Err(e) => {
            // chrono says only "premature end of input" for the two usual
            // slips; name them.
            let date = text.get(..10).unwrap_or(text);
            let why = if DateTime::parse_from_rfc3339(&format!("{text}Z")).is_ok() {
                "it has no time-zone offset: add `Z` for UTC, or one like `+01:00`".to_owned()
            } else if chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_err() {
                format!("`{date}` is not a date (year-month-day)")
            } else if text.len() == 10 {
                "it is a date without a time: add one, e.g. `T00:00:00Z`".to_owned()
            } else {
                e.to_string()
            };
            bail!("{flag} `{text}` is not an RFC 3339 time (e.g. 2026-11-27T12:00:00Z): {why}");
        }
    };
    if at.timestamp_millis() < 0 {
        bail!(
            "{flag} `{text}` is before 1970: event times start at the Unix epoch; give \
             1970-01-01T00:00:00Z or later"
        );
    }
    Ok(at)
}

/// `namespace.name` of a record schema's JSON text.
fn full_name(schema: &str) -> Option<String> {
    let value: Value = serde_json::from_str(schema).ok()?;
    let name = value.get("name")?.as_str()?;
    match value.get("namespace").and_then(Value::as_str) {
        Some(ns) if !name.contains('.') && !ns.is_empty() => Some(format!("{ns}.{name}")),
        _ => Some(name.to_owned()),
    }
}

/// How much of one partition is left to read to reach the end it had when
/// a read started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Nothing (more).
    Reached,
    /// Kafka: through the record at this offset, the last below the high
    /// watermark. Records are not counted: compaction leaves offsets below
    /// it without a record (never the last one, which stays in the active
    /// segment). Needs the partition read in offset order. (A partition a
    /// transactional producer wrote last ends in a marker, not a record:
    /// Keel's own writers are not transactional.)
    Offset(u64),
    /// JetStream: this many messages more (a stream's sequence numbers are
    /// shared by its partitions, so a partition's end is its count).
    Messages(u64),
}

impl End {
    fn messages(n: u64) -> End {
        if n == 0 {
            End::Reached
        } else {
            End::Messages(n)
        }
    }

    /// Whether the partition must be read in position order to tell its
    /// end.
    pub(crate) fn needs_order(&self) -> bool {
        matches!(self, End::Offset(_))
    }

    /// Takes in the record read at `position` (never the same one twice):
    /// `true` when it lies before the end, and is to be handed on.
    pub(crate) fn take(&mut self, position: u64) -> bool {
        match *self {
            End::Reached => false,
            End::Offset(last) => {
                if position >= last {
                    // Read in order: nothing before the end is still to come.
                    *self = End::Reached;
                }
                position <= last
            }
            End::Messages(n) => {
                *self = End::messages(n.saturating_sub(1));
                true
            }
        }
    }
}

/// A reader of whole topics as a consumer group of its own (by default a
/// throw-away `keel-<command>-<id>` group, removed again on NATS), for
/// `keel tail` and `keel dlq`.
pub(crate) struct Reader {
    subscriber: Box<dyn Subscriber>,
    broker: Broker,
    group: String,
    throwaway: bool,
}

impl Reader {
    /// A reader with a throw-away group.
    pub(crate) async fn new(config: &KeelConfig, command: &str) -> anyhow::Result<Reader> {
        Self::with_group(config, command, None).await
    }

    /// A reader as `group`, or a throw-away group when `None`.
    pub(crate) async fn with_group(
        config: &KeelConfig,
        command: &str,
        group: Option<String>,
    ) -> anyhow::Result<Reader> {
        let broker = broker(config, command)?;
        let throwaway = group.is_none();
        let group =
            group.unwrap_or_else(|| format!("keel-{command}-{}", keel_core::EventId::new()));
        let subscriber: Box<dyn Subscriber> = match &broker {
            Broker::Kafka(client) => Box::new(KafkaGroupConsumer::new(KafkaConsumerConfig {
                client: client.clone(),
                commit_interval_ms: 1000,
                ..KafkaConsumerConfig::default()
            })?),
            Broker::Nats(client) => Box::new(
                JetStreamGroupConsumer::connect(JetStreamConsumerConfig {
                    client: client.clone(),
                    ..JetStreamConsumerConfig::default()
                })
                .await?,
            ),
        };
        Ok(Reader {
            subscriber,
            broker,
            group,
            throwaway,
        })
    }

    /// The reader's group.
    pub(crate) fn group(&self) -> &str {
        &self.group
    }

    /// Joins the reader's group.
    pub(crate) async fn subscribe(
        &self,
        subscription: Subscription,
    ) -> keel_core::Result<keel_core::Deliveries> {
        self.subscriber.subscribe(subscription).await
    }

    /// Where each partition of `topic` ends now.
    pub(crate) async fn ends_per_partition(&self, topic: &str) -> anyhow::Result<Vec<End>> {
        Ok(match &self.broker {
            Broker::Kafka(client) => {
                match KafkaAdmin::new(client, -1)?.describe_topic(topic).await? {
                    Some(d) => d
                        .partitions
                        .iter()
                        .map(|p| match p.latest.checked_sub(1).map(u64::try_from) {
                            Some(Ok(last)) if p.latest > p.earliest => End::Offset(last),
                            _ => End::Reached,
                        })
                        .collect(),
                    None => bail!("topic `{topic}` does not exist"),
                }
            }
            Broker::Nats(client) => JetStreamAdmin::connect(client)
                .await?
                .describe_topic(topic)
                .await?
                .messages_per_partition
                .into_iter()
                .map(End::messages)
                .collect(),
        })
    }

    /// Removes a throw-away group's state (NATS durable consumers, Kafka
    /// group offsets), which would otherwise pile up, one set per run.
    pub(crate) async fn clean_up(&self, topic: &str) -> anyhow::Result<()> {
        if !self.throwaway {
            return Ok(());
        }
        match &self.broker {
            Broker::Nats(client) => {
                JetStreamAdmin::connect(client)
                    .await?
                    .delete_group(&self.group, topic)
                    .await?;
            }
            // The group has left; a broker that still counts it as a
            // member keeps the (empty) group, which is only clutter.
            Broker::Kafka(client) => {
                if let Err(e) = KafkaAdmin::new(client, -1)?.delete_group(&self.group).await {
                    tracing::warn!(error = %e, "the throw-away group is left on the broker");
                }
            }
        }
        Ok(())
    }
}

pub(crate) async fn tail(
    config: &KeelConfig,
    registry: RegistryClient,
    args: TailArgs,
) -> anyhow::Result<()> {
    let codec = AvroCodec::new(Arc::new(registry), CodecOptions::default());
    let start = match (&args.since, args.from) {
        (Some(text), _) => StartFrom::Timestamp(rfc3339("--since", text)?),
        (None, From::Earliest) => StartFrom::Earliest,
        (None, From::Latest) => StartFrom::Latest,
    };
    let reader = Reader::with_group(config, "tail", args.group.clone()).await?;
    // A Kafka consumer waits for a missing topic, and for an unreachable
    // broker, without end: find out first, as NATS does.
    if let Broker::Kafka(client) = &reader.broker {
        let brokers = client.bootstrap.join(",");
        let partitions = KafkaAdmin::new(client, -1)?.partitions(&args.topic).await?;
        if partitions.is_none() {
            bail!(
                "topic `{}` does not exist on {brokers}: create it with `keel topics create {}`",
                args.topic,
                args.topic
            );
        }
    }
    // One at a time, so lines come out in each partition's order.
    let mut deliveries = reader
        .subscribe(
            Subscription::new(&args.topic, reader.group())
                .start_from(start)
                .max_in_flight(1),
        )
        .await?;
    let mut printed = 0;
    // The registry failing (unreachable, refusing): no fault of the event,
    // so not shown as undecodable (nor committed, with --group); the tail
    // stops there.
    let mut failed = None;
    // Ctrl-C or SIGTERM: either way the tail leaves its group.
    let stop = crate::registry::shutdown_signal();
    tokio::pin!(stop);
    // Says which partitions the tail holds (their start fixed) whenever that
    // changes: from then on nothing published to them is missed, which a
    // script starting a tail and then publishing can wait for.
    let mut assignment = deliveries.assignment_changes();
    assignment.mark_changed();
    let mut announced: Vec<u32> = Vec::new();
    let mut watching = true;
    while args.count.is_none_or(|n| printed < n) {
        let item = tokio::select! {
            item = deliveries.next() => item,
            changed = assignment.changed(), if watching => {
                // The member gone: its stream ends too.
                watching = changed.is_ok();
                let owned = assignment.borrow_and_update().clone();
                if watching && owned != announced && !owned.is_empty() {
                    note!("keel tail: reading `{}` partitions {owned:?}", args.topic);
                    announced = owned;
                }
                continue;
            }
            _ = &mut stop => break,
        };
        let Some(item) = item else { break };
        let line = match item {
            Ok(delivery) => {
                let e = delivery.envelope();
                let info = delivery.info();
                let event = match codec.decode_json(e.payload()).await {
                    Ok(v) => v,
                    Err(err) if !err.is_poison() => {
                        failed = Some((info.coordinates.clone(), err));
                        break; // dropped unsettled: not committed
                    }
                    Err(err) => json!({"undecodable": err.to_string()}),
                };
                let line = json!({
                    "topic": info.coordinates.topic,
                    "partition": info.coordinates.partition,
                    "offset": info.coordinates.position,
                    "key": e.key().as_str(),
                    "id": e.id().to_string(),
                    "type": e.event_type(),
                    "occurred_at": e.occurred_at().to_rfc3339(),
                    "source": e.source(),
                    "headers": keel_core::wire::group_headers(e.all_headers()),
                    "event": event,
                });
                delivery.ack();
                line
            }
            Err(Error::Undecodable(u)) => {
                let info = u.info().clone();
                let record = u.record();
                // A `keel dlq redrive` marker in a dead-letter topic: no
                // event, a note of which letter was sent back.
                let mut line = json!({
                    "topic": info.coordinates.topic,
                    "partition": info.coordinates.partition,
                    "offset": info.coordinates.position,
                });
                if dead_letter::is_redrive_marker(record) {
                    line["redrive_marker"] = json!({
                        "letter": record.header(dead_letter::headers::REDRIVEN),
                        "id": record.header(keel_core::wire::EVENT_ID),
                        "redriven_at": record.header(dead_letter::headers::REDRIVEN_AT),
                    });
                } else {
                    line["undecodable"] = json!(u.reason());
                }
                u.ack();
                line
            }
            Err(e) => return Err(e.into()),
        };
        // A closed pipe (`keel tail | head`) ends the tail cleanly.
        say!("{line}");
        if crate::output::stopped() {
            break;
        }
        printed += 1;
    }
    deliveries.leave().await?;
    reader.clean_up(&args.topic).await?;
    match failed {
        Some((at, e)) => Err(anyhow::Error::new(e).context(format!(
            "{printed} events printed, then the schema registry failed on partition {} at {}; \
             nothing from there on was committed: run the tail again once it answers",
            at.partition, at.position
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_that_are_not_rfc_3339_say_what_is_missing() {
        let e = |text: &str| rfc3339("--since", text).expect_err(text).to_string();
        assert!(e("2026-12-04 11:12:30").contains("no time-zone offset"));
        assert!(e("2026-12-04T11:12:30").contains("no time-zone offset"));
        assert!(e("2026-13-04").contains("`2026-13-04` is not a date"));
        assert!(e("2026-12-04").contains("a date without a time"));
        assert!(e("yesterday").contains("is not a date"));
        let before = e("1900-01-01T00:00:00Z");
        assert!(
            before.contains("before 1970") && !before.contains("Kafka"),
            "{before}"
        );
        assert_eq!(
            rfc3339("--since", "2026-12-04 11:12:30Z").expect("a space is RFC 3339's too"),
            rfc3339("--since", "2026-12-04T11:12:30Z").expect("valid"),
        );
    }

    #[test]
    fn a_kafka_partition_ends_at_its_last_offset_whatever_gaps_lie_below() {
        // Offsets 0..=9, of which compaction kept 2, 5 and 9.
        let mut end = End::Offset(9);
        assert!(end.needs_order());
        assert!(end.take(2) && end.take(5));
        assert_eq!(end, End::Offset(9), "gaps do not count towards the end");
        assert!(end.take(9), "the last record is handed on");
        assert_eq!(end, End::Reached);
        assert!(!end.take(10), "a record published since is past the end");
        let mut end = End::Offset(9);
        assert!(end.take(8));
        assert!(!end.take(12), "past the end (the end itself was not kept)");
        assert_eq!(end, End::Reached, "read in order: nothing more is to come");
    }

    #[test]
    fn a_jetstream_partition_ends_after_its_count() {
        let mut end = End::messages(2);
        assert!(!end.needs_order());
        assert!(end.take(40) && end.take(17));
        assert_eq!(end, End::Reached);
        assert!(!end.take(41), "past the end");
        assert_eq!(End::messages(0), End::Reached);
    }

    #[test]
    fn to_offset_takes_one_offset_or_partition_pairs() {
        assert_eq!(offsets("100").ok(), Some(ResetTo::Offset(100)));
        assert_eq!(
            offsets("0=5, 3=250").ok(),
            Some(ResetTo::Offsets(vec![(0, 5), (3, 250)]))
        );
        for bad in ["", "x", "0=", "=5", "0=5,1", "a=1"] {
            let err = offsets(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("--to-offset"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_record_schema_names_its_event_type() {
        let schema = r#"{"type":"record","name":"Greeting","namespace":"test","fields":[]}"#;
        assert_eq!(full_name(schema).as_deref(), Some("test.Greeting"));
        let dotted = r#"{"type":"record","name":"a.B","namespace":"ignored","fields":[]}"#;
        assert_eq!(full_name(dotted).as_deref(), Some("a.B"));
        assert_eq!(full_name("\"string\""), None);
    }
}
