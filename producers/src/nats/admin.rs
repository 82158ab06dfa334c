//! `JetStreamAdmin`: one stream per Keel topic, provisioned idempotently and
//! validated; group lag and position resets.
//!
//! A topic `orders` with 6 partitions is the stream `orders` with the
//! subjects `orders.0` … `orders.5`, file storage, limits retention. An
//! existing stream is never changed silently: every requested setting is
//! compared and a mismatch is an error naming each difference.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use futures::TryStreamExt;
use keel_core::transport::TopicSpec;
use keel_core::{Error, Result};

use super::config::{NatsClientConfig, validate_name};
use super::groups::{self, GroupKey, LeaseRecord, MemberRecord};
use crate::kafka::ResetTo;

/// Default duplicate window (the server's own default).
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Stream limits of a topic. `None` means unlimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSettings {
    /// Oldest event kept.
    pub max_age: Option<Duration>,
    /// Most bytes kept.
    pub max_bytes: Option<i64>,
    /// Most events kept.
    pub max_messages: Option<i64>,
    /// How long an event id is remembered for publish de-duplication.
    pub duplicate_window: Duration,
    /// Largest event accepted, in bytes.
    pub max_message_size: Option<i32>,
    /// Replicas (1 on a single server, 3 or 5 in a cluster).
    pub replicas: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            max_age: None,
            max_bytes: None,
            max_messages: None,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            max_message_size: None,
            replicas: 1,
        }
    }
}

/// The key of the coordination bucket written to read the server's clock
/// (`=` is in no topic or group name, so it is no group's key).
const CLOCK_KEY: &str = "=clock";

/// The server's time now, read off a write to the coordination bucket.
/// Heartbeats carry the server's time, so liveness is judged against it:
/// this host's clock may be ahead of the server's (live members would look
/// dead, and a reset would take their partitions) or behind it. (So
/// listing groups needs the right to write that key, as members and
/// resets write the bucket anyway.)
async fn server_now(
    store: &kv::Store,
) -> std::result::Result<chrono::DateTime<chrono::Utc>, String> {
    let what = |e: &dyn std::fmt::Display| {
        format!("cannot read the server's clock off {}: {e}", groups::BUCKET)
    };
    let revision = store
        .put(CLOCK_KEY, Vec::new().into())
        .await
        .map_err(|e| what(&e))?;
    match store.entry_for_revision(CLOCK_KEY, revision).await {
        Ok(Some(entry)) => Ok(entry.created),
        Ok(None) => Err(what(&"the key just written is gone")),
        Err(e) => Err(what(&e)),
    }
}

/// The longest duration the NATS server takes: it counts in signed 64-bit
/// nanoseconds.
pub const MAX_NATS_DURATION: Duration = Duration::from_nanos(i64::MAX as u64);

impl StreamSettings {
    /// Refuses settings the server would adjust or reject.
    pub fn validate(&self) -> Result<()> {
        if self.duplicate_window.is_zero() {
            return Err(Error::config(
                "duplicate_window",
                "must be positive: it is what makes publishing the same event id twice store it once",
            ));
        }
        if let Some(age) = self.max_age
            && self.duplicate_window > age
        {
            return Err(Error::config(
                "duplicate_window",
                format!("{:?} is longer than max_age {age:?}", self.duplicate_window),
            ));
        }
        // The server takes durations as signed 64-bit nanoseconds (about
        // 292 years); a longer one would be sent wrapped around, as some
        // other, shorter time.
        for (name, v) in [
            ("duplicate_window", Some(self.duplicate_window)),
            ("max_age", self.max_age),
        ] {
            if let Some(v) = v
                && v > MAX_NATS_DURATION
            {
                return Err(Error::config(
                    name,
                    format!("{v:?} is longer than NATS can hold ({MAX_NATS_DURATION:?})"),
                ));
            }
        }
        if self.replicas == 0 || self.replicas > 5 {
            return Err(Error::config("replicas", "must be 1 to 5"));
        }
        for (name, v) in [
            ("max_bytes", self.max_bytes),
            ("max_messages", self.max_messages),
            ("max_message_size", self.max_message_size.map(i64::from)),
        ] {
            if v.is_some_and(|v| v <= 0) {
                return Err(Error::config(
                    name,
                    "must be positive (leave it unset for no limit)",
                ));
            }
        }
        Ok(())
    }
}

/// What `describe_topic` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamDescription {
    /// Topic (= stream) name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// Events stored per partition, by partition.
    pub messages_per_partition: Vec<u64>,
    /// First stored sequence.
    pub first_sequence: u64,
    /// Last stored sequence.
    pub last_sequence: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// The stream's limits.
    pub settings: StreamSettings,
}

/// Pending events of one partition for one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionPending {
    /// Partition.
    pub partition: u32,
    /// The next stream sequence the group will handle (its ack floor + 1),
    /// if it has a position on this partition.
    pub position: Option<u64>,
    /// Where the group starts when it was set to a time (`keel group reset
    /// --to-datetime`) and has not read from there yet: the first event at
    /// or after it (its sequence is known once delivered).
    pub starts_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Events not yet delivered to the group.
    pub pending: u64,
    /// Events delivered but not yet acknowledged.
    pub ack_pending: u64,
}

impl PartitionPending {
    /// Events not yet handled.
    pub fn lag(&self) -> u64 {
        self.pending.saturating_add(self.ack_pending)
    }
}

/// A consumer group as the coordination bucket knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSummary {
    /// Topic the group reads.
    pub topic: String,
    /// Group name.
    pub group: String,
    /// Members whose heartbeat is recent.
    pub live_members: usize,
    /// Partitions with a lease record.
    pub partitions: usize,
}

/// Manages Keel topics on JetStream.
#[derive(Clone)]
pub struct JetStreamAdmin {
    js: jetstream::Context,
}

impl std::fmt::Debug for JetStreamAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamAdmin").finish_non_exhaustive()
    }
}

pub(crate) fn topic_error(topic: &str, reason: impl Into<String>, retriable: bool) -> Error {
    Error::Topic {
        topic: topic.to_owned(),
        reason: reason.into(),
        retriable,
        source: None,
    }
}

/// An error of a group's administration (reset, lag, deletion), worded as
/// Kafka's: ``topic `t`: consumer group `g`: …``.
fn group_error(group: &str, topic: &str, reason: impl Into<String>) -> Error {
    Error::Topic {
        topic: topic.to_owned(),
        reason: format!("consumer group `{group}`: {}", reason.into()),
        retriable: false,
        source: None,
    }
}

/// Where a group's durable consumer stands, as the start of the consumer
/// that replaces it: one past its ack floor once it acked anything, else
/// where it was told to start (a fresh consumer reports an ack floor of 0
/// whatever its start).
pub fn resume_policy(info: &consumer::Info) -> consumer::DeliverPolicy {
    let floor = info.ack_floor.stream_sequence;
    match info.config.deliver_policy {
        consumer::DeliverPolicy::ByStartSequence { start_sequence } => {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start_sequence.max(floor.saturating_add(1)),
            }
        }
        _ if floor > 0 => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: floor.saturating_add(1),
        },
        // `All` or `ByStartTime` with nothing acked: the same start again.
        // (Keel never creates `New`: `Latest` is resolved to a sequence.)
        other => other,
    }
}

/// The next stream sequence a group's durable consumer stands at
/// ([`resume_policy`]); `None` for a start by time that has not delivered
/// yet.
pub fn next_sequence(info: &consumer::Info) -> Option<u64> {
    match resume_policy(info) {
        consumer::DeliverPolicy::ByStartSequence { start_sequence } => Some(start_sequence),
        consumer::DeliverPolicy::All => Some(1),
        _ => None,
    }
}

/// The stream configuration Keel wants for `spec`.
pub fn stream_config(spec: &TopicSpec, settings: &StreamSettings) -> stream::Config {
    stream::Config {
        name: spec.name.clone(),
        subjects: (0..spec.partitions)
            .map(|p| groups::partition_subject(&spec.name, p))
            .collect(),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age: settings.max_age.unwrap_or_default(),
        max_bytes: settings.max_bytes.unwrap_or(-1),
        max_messages: settings.max_messages.unwrap_or(-1),
        max_message_size: settings.max_message_size.unwrap_or(-1),
        duplicate_window: settings.duplicate_window,
        num_replicas: settings.replicas,
        description: Some(format!(
            "Keel topic `{}`: {} partitions",
            spec.name, spec.partitions
        )),
        ..Default::default()
    }
}

/// The partition count of a stream laid out by Keel (`<topic>.0` …
/// `<topic>.<n-1>`), or why it is not one.
pub fn partitions_of(config: &stream::Config) -> std::result::Result<u32, String> {
    let n = config.subjects.len();
    let expected: Vec<String> = (0..n as u32)
        .map(|p| groups::partition_subject(&config.name, p))
        .collect();
    let mut subjects = config.subjects.clone();
    subjects.sort_by_key(|s| {
        s.rsplit('.')
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
    if n == 0 || subjects != expected {
        return Err(format!(
            "stream `{}` is not a Keel topic: its subjects are {:?}, expected `{}.0` … `{}.<n-1>`",
            config.name, config.subjects, config.name, config.name
        ));
    }
    Ok(n as u32)
}

fn settings_of(config: &stream::Config) -> StreamSettings {
    StreamSettings {
        max_age: (!config.max_age.is_zero()).then_some(config.max_age),
        max_bytes: (config.max_bytes > 0).then_some(config.max_bytes),
        max_messages: (config.max_messages > 0).then_some(config.max_messages),
        duplicate_window: config.duplicate_window,
        max_message_size: (config.max_message_size > 0).then_some(config.max_message_size),
        replicas: config.num_replicas.max(1),
    }
}

/// Every difference between an existing stream and the wanted one.
fn differences(have: &stream::Config, want: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    match partitions_of(have) {
        Ok(n) if want.subjects.len() as u32 != n => out.push(format!(
            "it has {n} partitions, {} requested",
            want.subjects.len()
        )),
        Ok(_) => {}
        Err(e) => out.push(e),
    }
    if have.storage != want.storage {
        out.push(format!(
            "storage is {:?}, Keel needs file storage",
            have.storage
        ));
    }
    if have.retention != want.retention {
        out.push(format!(
            "retention is {:?}, Keel needs limits retention (events stay for replay)",
            have.retention
        ));
    }
    let (h, w) = (settings_of(have), settings_of(want));
    let mut diff = |name: &str, have: String, want: String| {
        if have != want {
            out.push(format!("{name} is {have}, {want} requested"));
        }
    };
    let limit = |v: Option<i64>| v.map_or("unlimited".to_owned(), |v| v.to_string());
    let millis = |d: Duration| format!("{} ms", d.as_millis());
    let age = |v: Option<Duration>| v.map_or("unlimited".to_owned(), millis);
    diff("max_age (the retention)", age(h.max_age), age(w.max_age));
    diff("max_bytes", limit(h.max_bytes), limit(w.max_bytes));
    diff("max_messages", limit(h.max_messages), limit(w.max_messages));
    diff(
        "max_message_size",
        limit(h.max_message_size.map(i64::from)),
        limit(w.max_message_size.map(i64::from)),
    );
    diff(
        "duplicate_window",
        millis(h.duplicate_window),
        millis(w.duplicate_window),
    );
    diff("replicas", h.replicas.to_string(), w.replicas.to_string());
    out
}

/// Whether a JetStream API error says the stream or consumer does not exist.
pub fn is_not_found(e: &impl std::fmt::Display) -> bool {
    let s = e.to_string().to_ascii_lowercase();
    s.contains("not found")
}

impl JetStreamAdmin {
    /// An admin on an existing JetStream context.
    pub fn new(js: jetstream::Context) -> Self {
        JetStreamAdmin { js }
    }

    /// Connects with `config`.
    pub async fn connect(config: &NatsClientConfig) -> Result<Self> {
        Ok(JetStreamAdmin::new(config.jetstream().await?))
    }

    /// The JetStream context.
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    /// Creates the stream of `spec` with `settings` if missing; succeeds if
    /// it exists exactly so and fails naming every difference otherwise.
    pub async fn ensure_stream(&self, spec: &TopicSpec, settings: &StreamSettings) -> Result<()> {
        validate_name("topic", &spec.name)?;
        if spec.partitions == 0 || spec.partitions > keel_core::config::MAX_PARTITIONS {
            // A stream lists a subject per partition: a typo like 600000
            // would build them all before the server refused.
            return Err(Error::config(
                "partitions",
                format!(
                    "a topic needs 1 to {} partitions, got {}",
                    keel_core::config::MAX_PARTITIONS,
                    spec.partitions
                ),
            ));
        }
        settings.validate()?;
        let want = stream_config(spec, settings);
        match self.js.get_stream(&spec.name).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(|e| {
                    topic_error(&spec.name, format!("cannot read the stream: {e}"), true)
                })?;
                let diffs = differences(&info.config, &want);
                if diffs.is_empty() {
                    return Ok(());
                }
                Err(topic_error(
                    &spec.name,
                    format!(
                        "the stream exists with other settings, which Keel does not change: {}. Change it deliberately (nats stream edit) or use another topic",
                        diffs.join("; ")
                    ),
                    false,
                ))
            }
            Err(e) if is_not_found(&e) => {
                match self.js.create_stream(want.clone()).await {
                    Ok(_) => Ok(()),
                    // Created by someone else meanwhile: validate theirs.
                    Err(_) if self.js.get_stream(&spec.name).await.is_ok() => {
                        Box::pin(self.ensure_stream(spec, settings)).await
                    }
                    Err(e) => Err(topic_error(
                        &spec.name,
                        format!("cannot create the stream: {e}"),
                        false,
                    )),
                }
            }
            Err(e) => Err(topic_error(
                &spec.name,
                format!("cannot look up the stream (is JetStream enabled?): {e}"),
                true,
            )),
        }
    }

    /// Deletes `topic`'s stream and every event in it, and its groups'
    /// coordination keys (irreversible; for tests and decommissioning). A
    /// missing stream is not an error.
    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        validate_name("topic", topic)?;
        match self.js.delete_stream(topic).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(topic_error(
                    topic,
                    format!("cannot delete the stream: {e}"),
                    true,
                ));
            }
        }
        // Its groups' heartbeats and leases go with it.
        self.purge_keys(&format!("{topic}."), |reason| {
            topic_error(topic, reason, true)
        })
        .await
    }

    /// The partition count of `topic`.
    pub async fn partitions(&self, topic: &str) -> Result<u32> {
        let info = self.stream_info(topic).await?;
        partitions_of(&info.config).map_err(|e| topic_error(topic, e, false))
    }

    async fn stream_info(&self, topic: &str) -> Result<stream::Info> {
        validate_name("topic", topic)?;
        let mut s = self.js.get_stream(topic).await.map_err(|e| {
            if is_not_found(&e) {
                topic_error(
                    topic,
                    "no such stream; create it first (keel topics create)",
                    false,
                )
            } else {
                topic_error(topic, format!("cannot look up the stream: {e}"), true)
            }
        })?;
        let info = s
            .info()
            .await
            .map_err(|e| topic_error(topic, format!("cannot read the stream: {e}"), true))?;
        Ok(info.clone())
    }

    /// Keel topics on the server (streams with Keel's subject layout),
    /// sorted.
    pub async fn list_topics(&self) -> Result<Vec<String>> {
        let streams: Vec<stream::Info> = self
            .js
            .streams()
            .try_collect()
            .await
            .map_err(|e| topic_error("*", format!("cannot list streams: {e}"), true))?;
        let mut names: Vec<String> = streams
            .into_iter()
            .filter(|s| partitions_of(&s.config).is_ok())
            .map(|s| s.config.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Partitions, per-partition counts, sequences and limits of `topic`.
    pub async fn describe_topic(&self, topic: &str) -> Result<StreamDescription> {
        validate_name("topic", topic)?;
        let s = self.js.get_stream(topic).await.map_err(|e| {
            topic_error(
                topic,
                format!("cannot look up the stream: {e}"),
                !is_not_found(&e),
            )
        })?;
        let info = s
            .info_with_subjects(format!("{topic}.*"))
            .await
            .map_err(|e| topic_error(topic, format!("cannot read the stream: {e}"), true))?;
        let per_subject: HashMap<String, usize> = info.try_collect().await.map_err(|e| {
            topic_error(
                topic,
                format!("cannot read per-partition counts: {e}"),
                true,
            )
        })?;
        let mut s = s;
        let info = s
            .info()
            .await
            .map_err(|e| topic_error(topic, format!("cannot read the stream: {e}"), true))?;
        let partitions = partitions_of(&info.config).map_err(|e| topic_error(topic, e, false))?;
        Ok(StreamDescription {
            name: topic.to_owned(),
            partitions,
            messages_per_partition: (0..partitions)
                .map(|p| {
                    per_subject
                        .get(&groups::partition_subject(topic, p))
                        .copied()
                        .unwrap_or(0) as u64
                })
                .collect(),
            first_sequence: info.state.first_sequence,
            last_sequence: info.state.last_sequence,
            bytes: info.state.bytes,
            settings: settings_of(&info.config),
        })
    }

    /// The coordination bucket and every key in it (`what` names the caller's
    /// subject in errors).
    async fn bucket_keys(
        &self,
        what: impl Fn(String) -> Error,
    ) -> Result<(kv::Store, Vec<String>)> {
        let store = self.groups_bucket().await?;
        let keys = store
            .keys()
            .await
            .map_err(|e| what(format!("cannot list the keys of {}: {e}", groups::BUCKET)))?
            .try_collect()
            .await
            .map_err(|e| what(format!("cannot list the keys of {}: {e}", groups::BUCKET)))?;
        Ok((store, keys))
    }

    /// Purges every key of the coordination bucket under `prefix`.
    async fn purge_keys(&self, prefix: &str, what: impl Fn(String) -> Error) -> Result<()> {
        let (store, keys) = self.bucket_keys(what).await?;
        for key in keys.iter().filter(|k| k.starts_with(prefix)) {
            let _ = store.purge(key).await;
        }
        Ok(())
    }

    /// The group coordination bucket, created when missing.
    pub async fn groups_bucket(&self) -> Result<kv::Store> {
        match self.js.get_key_value(groups::BUCKET).await {
            Ok(store) => Ok(store),
            // Created as the stream behind a KV bucket, as `create_key_value`
            // would, because that call first queries the account info,
            // whose 2.9 answer async-nats 0.51 cannot parse.
            Err(_) => {
                let created = self
                    .js
                    .create_stream(stream::Config {
                        name: format!("KV_{}", groups::BUCKET),
                        description: Some(
                            "Keel consumer groups: member heartbeats and partition leases".into(),
                        ),
                        subjects: vec![format!("$KV.{}.>", groups::BUCKET)],
                        max_messages_per_subject: 1,
                        storage: stream::StorageType::File,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: stream::DiscardPolicy::New,
                        num_replicas: 1,
                        ..Default::default()
                    })
                    .await;
                // Another member may have created it meanwhile.
                self.js.get_key_value(groups::BUCKET).await.map_err(|e| {
                    Error::retriable(std::io::Error::other(format!(
                        "cannot create the KV bucket {} (is JetStream enabled?): {}",
                        groups::BUCKET,
                        created.err().map_or(e.to_string(), |c| c.to_string())
                    )))
                })
            }
        }
    }

    /// Members of `group` on `topic` whose last heartbeat is younger than
    /// `within` (by the server's clock).
    pub async fn live_members(
        &self,
        group: &str,
        topic: &str,
        within: Duration,
    ) -> Result<Vec<MemberRecord>> {
        let (store, keys) = self
            .bucket_keys(|reason| group_error(group, topic, reason))
            .await?;
        let mut live = Vec::new();
        let now = server_now(&store)
            .await
            .map_err(|reason| group_error(group, topic, reason))?;
        for key in keys {
            if let Some(GroupKey::Member(_)) = groups::parse_key(topic, group, &key)
                && let Ok(Some(entry)) = store.entry(&key).await
                && entry.operation == kv::Operation::Put
                && (now - entry.created).to_std().unwrap_or_default() < within
                && let Ok(record) = serde_json::from_slice::<MemberRecord>(&entry.value)
            {
                live.push(record);
            }
        }
        Ok(live)
    }

    /// Every group in the coordination bucket, sorted by topic and group;
    /// members count as live when their heartbeat is younger than
    /// `liveness`.
    pub async fn list_groups(&self, liveness: Duration) -> Result<Vec<GroupSummary>> {
        let (store, keys) = self
            .bucket_keys(|reason| Error::Connect {
                broker: "NATS".into(),
                reason,
            })
            .await?;
        let mut out: std::collections::BTreeMap<(String, String), GroupSummary> =
            Default::default();
        let now = server_now(&store).await.map_err(|reason| Error::Connect {
            broker: "NATS".into(),
            reason,
        })?;
        for key in keys {
            // `<topic>.<group>.members.<id>` or `<topic>.<group>.partitions.<p>`
            let parts: Vec<&str> = key.splitn(4, '.').collect();
            let [topic, group, kind, _] = parts[..] else {
                continue;
            };
            let summary = out
                .entry((topic.to_owned(), group.to_owned()))
                .or_insert_with(|| GroupSummary {
                    topic: topic.to_owned(),
                    group: group.to_owned(),
                    live_members: 0,
                    partitions: 0,
                });
            match kind {
                "partitions" => summary.partitions += 1,
                "members" => {
                    if let Ok(Some(entry)) = store.entry(&key).await
                        && entry.operation == kv::Operation::Put
                        && (now - entry.created).to_std().unwrap_or_default() < liveness
                    {
                        summary.live_members += 1;
                    }
                }
                _ => {}
            }
        }
        Ok(out.into_values().collect())
    }

    /// Removes a stopped group from `topic`: its durable consumers and its
    /// coordination keys (for throw-away groups such as `keel tail`'s).
    pub async fn delete_group(&self, group: &str, topic: &str) -> Result<()> {
        validate_name("group", group)?;
        let partitions = self.partitions(topic).await?;
        let stream = self
            .js
            .get_stream(topic)
            .await
            .map_err(|e| topic_error(topic, format!("cannot look up the stream: {e}"), true))?;
        for p in 0..partitions {
            let name = groups::consumer_name(group, p);
            match stream.delete_consumer(&name).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(group_error(
                        group,
                        topic,
                        format!("cannot delete consumer `{name}`: {e}"),
                    ));
                }
            }
        }
        let prefix = format!("{}.", groups::group_prefix(topic, group));
        self.purge_keys(&prefix, |reason| group_error(group, topic, reason))
            .await
    }

    /// Pending events of `group` on each partition of `topic`.
    pub async fn lag(&self, group: &str, topic: &str) -> Result<Vec<PartitionPending>> {
        validate_name("group", group)?;
        let partitions = self.partitions(topic).await?;
        let description = self.describe_topic(topic).await?;
        let stream = self
            .js
            .get_stream(topic)
            .await
            .map_err(|e| topic_error(topic, format!("cannot look up the stream: {e}"), true))?;
        let mut out = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let name = groups::consumer_name(group, p);
            match stream.consumer_info(&name).await {
                Ok(info) => out.push(PartitionPending {
                    partition: p,
                    position: next_sequence(&info),
                    starts_at: match resume_policy(&info) {
                        consumer::DeliverPolicy::ByStartTime { start_time } => {
                            Some(start_time.with_timezone(&chrono::Utc))
                        }
                        _ => None,
                    },
                    pending: info.num_pending,
                    ack_pending: info.num_ack_pending as u64,
                }),
                Err(e) if is_not_found(&e) => out.push(PartitionPending {
                    partition: p,
                    position: None,
                    starts_at: None,
                    pending: description
                        .messages_per_partition
                        .get(p as usize)
                        .copied()
                        .unwrap_or(0),
                    ack_pending: 0,
                }),
                Err(e) => {
                    return Err(group_error(
                        group,
                        topic,
                        format!("cannot read consumer `{name}`: {e}"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Moves a stopped group's position on `topic`: the next member to own
    /// a partition starts there. Refused while the group has live members
    /// (heartbeats younger than `liveness`). `ResetTo::Offset` and
    /// `Offsets` name stream sequences, clamped to what is stored (one past
    /// the last at most); a time still to come starts at the end. Returns
    /// each partition's new start, in words.
    pub async fn reset_group(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
        liveness: Duration,
    ) -> Result<Vec<(u32, String)>> {
        validate_name("group", group)?;
        let live = self.live_members(group, topic, liveness).await?;
        if !live.is_empty() {
            return Err(group_error(
                group,
                topic,
                format!(
                    "it has {} live member(s) ({}); stop them first, then reset",
                    live.len(),
                    live.iter()
                        .map(|m| format!("`{}` ({})", m.member, m.whereabouts()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let info = self.stream_info(topic).await?;
        let partitions = partitions_of(&info.config).map_err(|e| topic_error(topic, e, false))?;
        // What is stored: a start past its end would skip the events
        // published next (a consumer waits for its start sequence), so
        // starts are clamped to it, as Kafka clamps offsets.
        let stored = info.state;
        let end = stored.last_sequence.saturating_add(1);
        let first = stored.first_sequence.clamp(1, end);
        let by_sequence = |seq: u64| consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq.clamp(first, end),
        };
        let chosen: Vec<(u32, consumer::DeliverPolicy)> = match &to {
            ResetTo::Earliest => (0..partitions)
                .map(|p| (p, consumer::DeliverPolicy::All))
                .collect(),
            ResetTo::Latest => (0..partitions).map(|p| (p, by_sequence(end))).collect(),
            ResetTo::Timestamp(ms) => {
                let at = chrono::DateTime::from_timestamp_millis(*ms)
                    .filter(|_| *ms >= 0)
                    .ok_or_else(|| {
                        group_error(group, topic, format!("{ms} ms is not a time after 1970"))
                    })?;
                // A time still to come is the end, as on Kafka (a start
                // time past the clock would skip what is published until
                // then).
                let policy = if at > chrono::Utc::now() {
                    by_sequence(end)
                } else {
                    consumer::DeliverPolicy::ByStartTime { start_time: at }
                };
                (0..partitions).map(|p| (p, policy)).collect()
            }
            ResetTo::Offset(seq) => {
                let seq = u64::try_from(*seq)
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| group_error(group, topic, "stream sequences start at 1"))?;
                (0..partitions).map(|p| (p, by_sequence(seq))).collect()
            }
            ResetTo::Offsets(wanted) => {
                let mut out = Vec::new();
                for &(p, seq) in wanted {
                    let p = u32::try_from(p)
                        .ok()
                        .filter(|p| *p < partitions)
                        .ok_or_else(|| {
                            group_error(
                                group,
                                topic,
                                format!(
                                    "partition {p} does not exist (the topic has {partitions})"
                                ),
                            )
                        })?;
                    if out.iter().any(|(q, _)| *q == p) {
                        return Err(group_error(
                            group,
                            topic,
                            format!("partition {p} is named twice"),
                        ));
                    }
                    let seq = u64::try_from(seq)
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| group_error(group, topic, "stream sequences start at 1"))?;
                    out.push((p, by_sequence(seq)));
                }
                out
            }
        };
        let store = self.groups_bucket().await?;
        let mut positions = Vec::new();
        for (p, policy) in chosen {
            self.recreate_consumer(group, topic, p, policy, Duration::from_secs(60), 1)
                .await?;
            let (resume, shown) = match policy {
                consumer::DeliverPolicy::ByStartSequence { start_sequence } => {
                    (Some(start_sequence), format!("sequence {start_sequence}"))
                }
                consumer::DeliverPolicy::ByStartTime { start_time } => (
                    None,
                    format!("first event at or after {}", start_time.to_rfc3339()),
                ),
                _ => (None, "the oldest stored event".to_owned()),
            };
            // The consumer now holds the position; the lease only a copy.
            let key = groups::lease_key(topic, group, p);
            let record = serde_json::to_vec(&LeaseRecord {
                owner: None,
                resume,
                handed_on: None,
            })
            .unwrap_or_default();
            store.put(&key, record.into()).await.map_err(|e| {
                group_error(group, topic, format!("cannot write lease `{key}`: {e}"))
            })?;
            positions.push((p, shown));
        }
        Ok(positions)
    }

    /// Replaces `group`'s durable consumer of partition `p` with a fresh one
    /// starting at `policy`.
    pub async fn recreate_consumer(
        &self,
        group: &str,
        topic: &str,
        p: u32,
        policy: consumer::DeliverPolicy,
        ack_wait: Duration,
        max_ack_pending: i64,
    ) -> Result<consumer::Consumer<consumer::pull::Config>> {
        let stream = self
            .js
            .get_stream(topic)
            .await
            .map_err(|e| topic_error(topic, format!("cannot look up the stream: {e}"), true))?;
        let name = groups::consumer_name(group, p);
        match stream.delete_consumer(&name).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(group_error(
                    group,
                    topic,
                    format!("cannot delete consumer `{name}`: {e}"),
                ));
            }
        }
        let created: consumer::Consumer<consumer::pull::Config> = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!("Keel group `{group}`, partition {p}")),
                filter_subject: groups::partition_subject(topic, p),
                deliver_policy: policy,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_deliver: -1,
                max_ack_pending,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                group_error(
                    group,
                    topic,
                    format!("cannot create consumer `{name}`: {e}"),
                )
            })?;
        Ok(created)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: u32) -> TopicSpec {
        TopicSpec {
            name: "orders".into(),
            partitions: n,
        }
    }

    #[test]
    fn a_matching_stream_has_no_differences_and_a_changed_one_names_each() {
        let s = StreamSettings::default();
        let want = stream_config(&spec(4), &s);
        assert!(differences(&want, &want).is_empty());
        assert_eq!(partitions_of(&want), Ok(4));
        let mut other = s.clone();
        other.max_age = Some(Duration::from_secs(3600));
        other.replicas = 3;
        let diffs = differences(&stream_config(&spec(6), &other), &want);
        assert_eq!(diffs.len(), 3, "{diffs:?}");
        assert!(diffs[0].contains("6 partitions, 4 requested"), "{diffs:?}");
    }

    #[test]
    fn foreign_streams_are_not_topics() {
        let mut c = stream_config(&spec(2), &StreamSettings::default());
        c.subjects = vec!["orders.>".into()];
        assert!(partitions_of(&c).is_err());
    }

    #[test]
    fn settings_the_server_would_change_are_refused() {
        let s = StreamSettings {
            max_age: Some(Duration::from_secs(60)),
            ..StreamSettings::default()
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("duplicate_window")
        );
        let s = StreamSettings {
            max_bytes: Some(0),
            ..StreamSettings::default()
        };
        assert!(s.validate().is_err());
        // The server counts in i64 nanoseconds: a longer retention would be
        // sent wrapped around (18,446,747,673,710 ms as about an hour).
        let s = StreamSettings {
            max_age: Some(Duration::from_millis(18_446_747_673_710)),
            ..StreamSettings::default()
        };
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("max_age") && err.contains("longer than NATS can hold"),
            "{err}"
        );
        let s = StreamSettings {
            max_age: Some(MAX_NATS_DURATION),
            ..StreamSettings::default()
        };
        assert!(s.validate().is_ok());
    }
}
