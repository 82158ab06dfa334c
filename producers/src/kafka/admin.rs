//! `KafkaAdmin`: idempotent topic creation, topic and group description,
//! consumer lag, and resetting a stopped group's positions.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::transport::{TopicAdmin, TopicSpec};
use keel_core::{Error, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use super::config::KafkaClientConfig;

/// How long admin requests may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates and describes topics.
pub struct KafkaAdmin {
    // Shared with blocking metadata calls on the blocking pool.
    admin: Arc<AdminClient<DefaultClientContext>>,
    client: KafkaClientConfig,
    replication_factor: i32,
}

/// Settings of a topic beyond its partition count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicSettings {
    /// How long events are kept (`retention.ms`; -1 forever). Broker
    /// default when `None`.
    pub retention_ms: Option<i64>,
    /// `delete` (default) or `compact` (`cleanup.policy`).
    pub cleanup_policy: Option<CleanupPolicy>,
}

/// Kafka's `cleanup.policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CleanupPolicy {
    /// Old segments are deleted after the retention.
    Delete,
    /// Only the latest event per key is kept.
    Compact,
}

impl CleanupPolicy {
    fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
        }
    }
}

/// A topic's partitions as the broker describes them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TopicDescription {
    /// Topic name.
    pub name: String,
    /// Its partitions, by id.
    pub partitions: Vec<PartitionDescription>,
}

/// One partition of a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionDescription {
    /// Partition id.
    pub partition: i32,
    /// Broker id of the leader.
    pub leader: i32,
    /// Broker ids holding replicas.
    pub replicas: Vec<i32>,
    /// Oldest offset still stored.
    pub earliest: i64,
    /// One past the newest offset (the high watermark).
    pub latest: i64,
}

/// A consumer group as listed by the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupSummary {
    /// Group id.
    pub name: String,
    /// Broker-reported state (`Stable`, `Empty`, …).
    pub state: String,
    /// Current members.
    pub members: usize,
}

/// How far a group is behind on one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    /// Partition id.
    pub partition: i32,
    /// The group's committed offset, if it committed one.
    pub committed: Option<i64>,
    /// The partition's high watermark.
    pub end: i64,
    /// Events not yet handled: `end - committed` (from the earliest stored
    /// offset when nothing is committed).
    pub lag: i64,
}

/// Where [`KafkaAdmin::reset_group`] moves a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetTo {
    /// The oldest event still stored.
    Earliest,
    /// The end: only new events.
    Latest,
    /// The first event at or after this time (ms since the Unix epoch);
    /// the end where there is none.
    Timestamp(i64),
    /// This offset on every partition (clamped to what is stored).
    Offset(i64),
    /// These offsets for these partitions (clamped to what is stored);
    /// partitions not named keep their position.
    Offsets(Vec<(i32, i64)>),
}

impl std::fmt::Debug for KafkaAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaAdmin")
            .field("replication_factor", &self.replication_factor)
            .finish_non_exhaustive()
    }
}

impl KafkaAdmin {
    /// An admin client. `replication_factor` applies to topics it creates
    /// (-1: the broker's `default.replication.factor`).
    pub fn new(config: &KafkaClientConfig, replication_factor: i32) -> Result<Self> {
        config.validate()?;
        if replication_factor == 0 || replication_factor < -1 {
            return Err(Error::config(
                "kafka.replication_factor",
                format!("must be -1 (broker default) or at least 1, got {replication_factor}"),
            ));
        }
        let admin = admin_config(config).create().map_err(|e| {
            Error::config(
                "kafka",
                format!("librdkafka refused the admin configuration: {e}"),
            )
        })?;
        Ok(KafkaAdmin {
            admin: Arc::new(admin),
            client: config.clone(),
            replication_factor,
        })
    }

    /// Creates the topic with `settings` if it does not exist (otherwise as
    /// [`TopicAdmin::ensure_topic`], and an existing topic whose reported
    /// settings differ from those given is refused, naming each: they are
    /// not changed).
    pub async fn ensure_topic_with(
        &self,
        spec: &TopicSpec,
        settings: &TopicSettings,
    ) -> Result<()> {
        self.create(spec, settings).await
    }

    /// Names of the topics, sorted, without Kafka's internal ones (`__…`).
    pub async fn list_topics(&self) -> Result<Vec<String>> {
        let admin = self.admin.clone();
        let metadata =
            tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, ADMIN_TIMEOUT))
                .await
                .map_err(|e| Error::closed(format!("kafka metadata task: {e}")))?
                .map_err(|e| self.unreachable(format!("cannot list topics: {e}")))?;
        let mut names: Vec<String> = metadata
            .topics()
            .iter()
            .filter_map(|t| topic_name(t).map(str::to_owned))
            .filter(|n| !n.starts_with("__"))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The topic's partitions with leaders, replicas and stored offsets, or
    /// `None` if it does not exist.
    pub async fn describe_topic(&self, topic: &str) -> Result<Option<TopicDescription>> {
        let admin = self.admin.clone();
        let name = topic.to_owned();
        let result = tokio::task::spawn_blocking(move || {
            let client = admin.inner();
            let metadata = client.fetch_metadata(Some(&name), ADMIN_TIMEOUT)?;
            let Some(t) = metadata.topics().iter().find(|t| {
                topic_name(t) == Some(name.as_str())
                    && t.error().is_none()
                    && !t.partitions().is_empty()
            }) else {
                return Ok(None);
            };
            let mut partitions = Vec::new();
            for p in t.partitions() {
                let (earliest, latest) = client.fetch_watermarks(&name, p.id(), ADMIN_TIMEOUT)?;
                partitions.push(PartitionDescription {
                    partition: p.id(),
                    leader: p.leader(),
                    replicas: p.replicas().to_vec(),
                    earliest,
                    latest,
                });
            }
            partitions.sort_by_key(|p| p.partition);
            Ok(Some(TopicDescription { name, partitions }))
        })
        .await
        .map_err(|e| Error::closed(format!("kafka metadata task: {e}")))?;
        result.map_err(|e: rdkafka::error::KafkaError| {
            topic_error(
                topic,
                format!("cannot describe it on {}: {e}", self.brokers()),
                true,
            )
        })
    }

    /// The consumer groups the broker knows, sorted by name.
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>> {
        let mut groups = self.groups(None).await?;
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(groups)
    }

    /// Deletes `group` and its committed offsets (refused by the broker
    /// while it has members). For throw-away groups such as `keel tail`'s.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .delete_groups(&[group], &options)
            .await
            .map_err(|e| group_error(group, "", format!("cannot delete it: {e}")))?;
        for result in results {
            if let Err((_, code)) = result {
                return Err(group_error(group, "", format!("cannot delete it: {code}")));
            }
        }
        Ok(())
    }

    /// The broker's groups, or only `name` (described alone).
    async fn groups(&self, name: Option<&str>) -> Result<Vec<GroupSummary>> {
        let admin = self.admin.clone();
        let name = name.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_group_list(name.as_deref(), ADMIN_TIMEOUT)
                .map(|list| {
                    list.groups()
                        .iter()
                        .map(|g| GroupSummary {
                            name: g.name().to_owned(),
                            state: g.state().to_owned(),
                            members: g.members().len(),
                        })
                        .collect::<Vec<_>>()
                })
        })
        .await
        .map_err(|e| Error::closed(format!("kafka group list task: {e}")))?
        .map_err(|e| self.unreachable(format!("cannot list consumer groups: {e}")))
    }

    /// Per partition of `topic`: `group`'s committed offset, the high
    /// watermark and the difference.
    pub async fn lag(&self, group: &str, topic: &str) -> Result<Vec<PartitionLag>> {
        let (consumer, partitions) = self.group_client(group, topic).await?;
        let topic_name = topic.to_owned();
        let result = tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition(&topic_name, *p);
            }
            let committed = consumer.committed_offsets(tpl, ADMIN_TIMEOUT)?;
            let mut out = Vec::new();
            for p in partitions {
                let (earliest, end) = consumer.fetch_watermarks(&topic_name, p, ADMIN_TIMEOUT)?;
                let committed =
                    committed
                        .find_partition(&topic_name, p)
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) if o >= 0 => Some(o),
                            _ => None,
                        });
                let from = committed.unwrap_or(earliest).max(earliest);
                out.push(PartitionLag {
                    partition: p,
                    committed,
                    end,
                    lag: end.saturating_sub(from).max(0),
                });
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::closed(format!("kafka lag task: {e}")))?;
        result.map_err(|e: rdkafka::error::KafkaError| {
            group_error(group, topic, format!("cannot read its lag: {e}"))
        })
    }

    /// Moves a stopped group's committed positions on `topic` and returns
    /// them per partition. Refused while the group has members: their
    /// commits would overwrite the reset.
    pub async fn reset_group(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<(i32, i64)>> {
        if let Some(g) = self
            .groups(Some(group))
            .await?
            .into_iter()
            .find(|g| g.name == group)
            && g.members > 0
        {
            return Err(group_error(
                group,
                topic,
                format!(
                    "it has {} active member(s) (state {}); stop them first, then reset",
                    g.members, g.state
                ),
            ));
        }
        if let ResetTo::Timestamp(ms) = to
            && ms < 0
        {
            return Err(group_error(
                group,
                topic,
                format!("{ms} ms is before 1970; give a time after the Unix epoch"),
            ));
        }
        // Offsets start at 0: a negative one is a mistake (Kafka's tools
        // read -1 as the end), not a request for the earliest.
        let negative = match &to {
            ResetTo::Offset(o) => Some(*o).filter(|o| *o < 0),
            ResetTo::Offsets(wanted) => wanted.iter().map(|(_, o)| *o).find(|o| *o < 0),
            _ => None,
        };
        if let Some(o) = negative {
            return Err(group_error(
                group,
                topic,
                format!(
                    "offset {o} is negative; offsets start at 0 (for the end of the topic reset to latest)"
                ),
            ));
        }
        if let ResetTo::Offsets(wanted) = &to {
            let mut named = std::collections::HashSet::new();
            if let Some((p, _)) = wanted.iter().find(|(p, _)| !named.insert(*p)) {
                return Err(group_error(
                    group,
                    topic,
                    format!("partition {p} is named twice"),
                ));
            }
        }
        let (consumer, mut partitions) = self.group_client(group, topic).await?;
        if let ResetTo::Offsets(wanted) = &to {
            if let Some((p, _)) = wanted.iter().find(|(p, _)| !partitions.contains(p)) {
                return Err(group_error(
                    group,
                    topic,
                    format!(
                        "partition {p} does not exist (the topic has {})",
                        partitions.len()
                    ),
                ));
            }
            partitions.retain(|p| wanted.iter().any(|(w, _)| w == p));
        }
        let topic_name = topic.to_owned();
        let reader_config = self.client.client_config();
        let result = tokio::task::spawn_blocking(move || {
            let mut positions = Vec::new();
            let mut by_time = TopicPartitionList::new();
            let mut watermarks = Vec::new();
            for &p in &partitions {
                let (earliest, latest) =
                    consumer.fetch_watermarks(&topic_name, p, ADMIN_TIMEOUT)?;
                watermarks.push((p, earliest, latest));
                match &to {
                    ResetTo::Earliest => positions.push((p, earliest)),
                    ResetTo::Latest => positions.push((p, latest)),
                    ResetTo::Offset(o) => positions.push((p, (*o).max(earliest).min(latest))),
                    ResetTo::Offsets(wanted) => {
                        for (_, o) in wanted.iter().filter(|(w, _)| *w == p) {
                            positions.push((p, (*o).max(earliest).min(latest)));
                        }
                    }
                    ResetTo::Timestamp(ms) => {
                        by_time.add_partition_offset(&topic_name, p, Offset::Offset(*ms))?;
                        positions.push((p, latest));
                    }
                }
            }
            if let ResetTo::Timestamp(ms) = to {
                let found = consumer.offsets_for_times(by_time, ADMIN_TIMEOUT)?;
                for e in found.elements() {
                    e.error()?;
                }
                let mut answers = Vec::new();
                for &(p, earliest, latest) in &watermarks {
                    // No event at or after the time: the end (kept).
                    if let Some(Offset::Offset(o)) =
                        found.find_partition(&topic_name, p).map(|e| e.offset())
                        && o >= 0
                    {
                        answers.push((p, o, earliest, latest));
                    }
                }
                correct_time_offsets(&reader_config, &topic_name, ms, &mut answers)?;
                for (p, position) in &mut positions {
                    if let Some(&(_, o, _, _)) = answers.iter().find(|a| a.0 == *p) {
                        *position = o;
                    }
                }
            }
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &positions {
                tpl.add_partition_offset(&topic_name, *p, Offset::Offset(*o))?;
            }
            consumer.commit(&tpl, CommitMode::Sync)?;
            Ok(positions)
        })
        .await
        .map_err(|e| Error::closed(format!("kafka reset task: {e}")))?;
        result.map_err(|e: rdkafka::error::KafkaError| {
            group_error(group, topic, format!("cannot reset it: {e}"))
        })
    }

    /// A consumer bound to `group` (never subscribing) and the partitions
    /// of `topic`.
    async fn group_client(&self, group: &str, topic: &str) -> Result<(BaseConsumer, Vec<i32>)> {
        let Some(n) = self.partitions(topic).await? else {
            return Err(topic_error(topic, "no such topic".into(), false));
        };
        let mut config = self.client.client_config();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        let consumer: BaseConsumer = config.create().map_err(|e| {
            Error::config(
                "kafka",
                format!("librdkafka refused the configuration: {e}"),
            )
        })?;
        let count = i32::try_from(n).unwrap_or(i32::MAX);
        Ok((consumer, (0..count).collect()))
    }

    /// The bootstrap brokers, for errors.
    fn brokers(&self) -> String {
        format!("the Kafka broker(s) at {}", self.client.bootstrap.join(","))
    }

    /// A request about no one topic failed: the broker is what to check.
    fn unreachable(&self, reason: String) -> Error {
        // A TLS client at a plaintext listener (or the other way round)
        // looks to librdkafka like a transport failure.
        let tls = match self.client.security.tls {
            true => "; TLS is on (kafka.tls): does the broker take TLS on that port?",
            false => "; TLS is off: does the broker require it (kafka.tls)?",
        };
        Error::Connect {
            broker: self.brokers(),
            reason: format!("{reason} (is it running and reachable from here{tls})"),
        }
    }

    /// The partition count of `topic`, or `None` if it does not exist.
    pub async fn partitions(&self, topic: &str) -> Result<Option<u32>> {
        let admin = self.admin.clone();
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            admin.inner().fetch_metadata(Some(&name), ADMIN_TIMEOUT)
        })
        .await
        .map_err(|e| Error::closed(format!("kafka metadata task: {e}")))?
        .map_err(|e| {
            topic_error(
                topic,
                format!("cannot fetch metadata from {}: {e}", self.brokers()),
                true,
            )
        })?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| topic_name(t) == Some(topic) && t.error().is_none())
            .map(|t| t.partitions().len() as u32)
            .filter(|n| *n > 0))
    }
}

/// A topic's name from the broker's metadata; `None`, with a warning, for
/// one that is not UTF-8 (rdkafka panics on those, and a broker that does
/// not check names can hold one).
pub(crate) fn topic_name(t: &rdkafka::metadata::MetadataTopic) -> Option<&str> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.name()))
        .inspect_err(|_| {
            tracing::warn!("the broker lists a topic whose name is not UTF-8; skipped")
        })
        .ok()
}

fn group_error(group: &str, topic: &str, reason: String) -> Error {
    Error::Topic {
        topic: topic.to_owned(),
        reason: format!("consumer group `{group}`: {reason}"),
        retriable: false,
        source: None,
    }
}

fn topic_error(topic: &str, reason: String, retriable: bool) -> Error {
    Error::Topic {
        topic: topic.to_owned(),
        reason,
        retriable,
        source: None,
    }
}

/// The admin client's settings: `config`'s, and never asking the broker
/// to create a topic it looks up (librdkafka lets producer-type clients,
/// which the admin client is, do that by default: `topics describe` of a
/// misspelt name would create it on a broker with auto-creation on).
fn admin_config(config: &KafkaClientConfig) -> rdkafka::ClientConfig {
    let mut client = config.client_config();
    client.set("allow.auto.create.topics", "false");
    client
}

/// `retention.ms` as Kafka's brokers validate it: -1 (forever) or more.
fn check_retention(topic: &str, retention_ms: Option<i64>) -> Result<()> {
    match retention_ms {
        Some(ms) if ms < -1 => Err(topic_error(
            topic,
            format!("retention.ms {ms}: give a number of ms, or -1 to keep events forever"),
            false,
        )),
        _ => Ok(()),
    }
}

/// Kafka's own rule for topic names (as its brokers enforce it; some
/// Kafka-compatible brokers do not): 1 to 249 of `a-z A-Z 0-9 . _ -`, and
/// not `.` or `..`.
fn check_topic_name(name: &str) -> Result<()> {
    let refuse = |why: &str| {
        Err(topic_error(
            name,
            format!("not a valid Kafka topic name: {why}"),
            false,
        ))
    };
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > 249 {
        return refuse("it is longer than 249 characters");
    }
    if name == "." || name == ".." {
        return refuse("`.` and `..` are reserved");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return refuse(&format!(
            "{c:?} is not allowed (only a-z, A-Z, 0-9, `.`, `_` and `-`)"
        ));
    }
    Ok(())
}

#[async_trait]
impl TopicAdmin for KafkaAdmin {
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<()> {
        self.create(spec, &TopicSettings::default()).await
    }
}

impl KafkaAdmin {
    async fn create(&self, spec: &TopicSpec, settings: &TopicSettings) -> Result<()> {
        check_topic_name(&spec.name)?;
        check_retention(&spec.name, settings.retention_ms)?;
        if spec.partitions == 0 {
            return Err(topic_error(
                &spec.name,
                "a topic needs at least 1 partition".into(),
                false,
            ));
        }
        let partitions = i32::try_from(spec.partitions).map_err(|_| {
            topic_error(
                &spec.name,
                format!("{} partitions is too many", spec.partitions),
                false,
            )
        })?;
        let retention = settings.retention_ms.map(|ms| ms.to_string());
        let mut new = NewTopic::new(
            &spec.name,
            partitions,
            TopicReplication::Fixed(self.replication_factor),
        );
        if let Some(ms) = &retention {
            new = new.set("retention.ms", ms);
        }
        if let Some(policy) = settings.cleanup_policy {
            new = new.set("cleanup.policy", policy.as_str());
        }
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .create_topics(&[new], &options)
            .await
            .map_err(|e| topic_error(&spec.name, format!("create request failed: {e}"), true))?;
        let mut existed = false;
        match results.into_iter().next() {
            Some(Ok(_)) => {}
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => existed = true,
            Some(Err((_, code))) => {
                return Err(topic_error(
                    &spec.name,
                    format!("the broker refused to create it: {code}"),
                    false,
                ));
            }
            None => {
                return Err(topic_error(
                    &spec.name,
                    "the broker gave no answer".into(),
                    true,
                ));
            }
        }
        // Metadata may lag a fresh creation: wait for the topic to appear,
        // then check its partition count.
        let deadline = tokio::time::Instant::now() + ADMIN_TIMEOUT;
        loop {
            match self.partitions(&spec.name).await? {
                Some(n) if n == spec.partitions && existed => {
                    return self.check_settings(&spec.name, settings).await;
                }
                Some(n) if n == spec.partitions => return Ok(()),
                Some(n) => {
                    return Err(topic_error(
                        &spec.name,
                        format!(
                            "exists with {n} partitions, {} requested; partition counts cannot change without remapping keys",
                            spec.partitions
                        ),
                        false,
                    ));
                }
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None => {
                    return Err(topic_error(
                        &spec.name,
                        "created but never appeared in metadata".into(),
                        true,
                    ));
                }
            }
        }
    }
}

impl KafkaAdmin {
    /// Refuses an existing topic whose settings differ from those `settings`
    /// names (the create request did not change them): a retention or
    /// cleanup policy asked for and silently not had would lose events or
    /// keep them wrongly. A setting the broker does not report (a
    /// Kafka-compatible broker may list only those set at creation) is not
    /// compared, and settings that cannot be read (no DescribeConfigs
    /// permission, say) only warn: the topic exists as asked for.
    async fn check_settings(&self, topic: &str, settings: &TopicSettings) -> Result<()> {
        let wanted: Vec<(&str, String)> = [
            (
                "retention.ms",
                settings.retention_ms.map(|ms| ms.to_string()),
            ),
            (
                "cleanup.policy",
                settings.cleanup_policy.map(|p| p.as_str().to_owned()),
            ),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
        .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
        let described = self
            .admin
            .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
            .await;
        let resource = match described.map(|d| d.into_iter().next()) {
            Ok(Some(Ok(resource))) => resource,
            unread => {
                let why = match unread {
                    Err(e) => e.to_string(),
                    Ok(Some(Err(code))) => code.to_string(),
                    _ => "the broker gave no answer".to_owned(),
                };
                tracing::warn!(topic, error = %why, "the topic exists; its settings could not be read to compare them with those asked for");
                return Ok(());
            }
        };
        let differences: Vec<String> = wanted
            .iter()
            .filter_map(|(name, want)| {
                let have = resource.get(name).and_then(|e| e.value.clone())?;
                (have != *want).then(|| format!("{name} is {have}, {want} requested"))
            })
            .collect();
        if differences.is_empty() {
            return Ok(());
        }
        Err(topic_error(
            topic,
            format!(
                "exists with other settings ({}): change them with Kafka's own tools \
                 (kafka-configs --alter), or leave the flags out to use the topic as it is",
                differences.join("; ")
            ),
            false,
        ))
    }
}

/// Corrects a broker's offsets-for-times answers for `at_ms` on `topic`,
/// given as (partition, offset, low watermark, high watermark).
///
/// Kafka answers "none" (-1) for a partition with no record at or after
/// the time; some Kafka-compatible brokers (tansu 0.6) answer offset 0
/// there instead, which would re-read the whole partition. An answer at or
/// below the partition's first offset is therefore checked against the
/// record it names: Kafka never names a record older than the time, so an
/// older one means nothing is at or after it, and the answer becomes the
/// end (the high watermark). Other answers are kept, and so are answers
/// whose record cannot be read within a few seconds (with a warning).
/// `config` is a client configuration to read with (no group is joined,
/// nothing is committed).
pub fn correct_time_offsets(
    config: &rdkafka::ClientConfig,
    topic: &str,
    at_ms: i64,
    answers: &mut [(i32, i64, i64, i64)],
) -> rdkafka::error::KafkaResult<()> {
    use rdkafka::Message;
    let mut unread: Vec<usize> = (0..answers.len())
        .filter(|&i| {
            let (_, offset, low, high) = answers[i];
            offset <= low && high > low
        })
        .collect();
    if unread.is_empty() {
        return Ok(());
    }
    let mut reader = config.clone();
    // librdkafka wants a group for `assign`; it is never joined (no
    // subscribe) and nothing is committed to it.
    reader
        .set("group.id", "keel-time-check")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = reader.create()?;
    let mut named = TopicPartitionList::new();
    for &i in &unread {
        let (p, offset, low, _) = answers[i];
        named.add_partition_offset(topic, p, Offset::Offset(offset.max(low)))?;
    }
    consumer.assign(&named)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !unread.is_empty() && std::time::Instant::now() < deadline {
        let message = match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                tracing::debug!(error = %e, topic, "reading a record to check a time offset");
                continue;
            }
            None => continue,
        };
        let Some(at) = unread
            .iter()
            .position(|&i| answers[i].0 == message.partition())
        else {
            continue;
        };
        let i = unread.swap_remove(at);
        if message.timestamp().to_millis().is_some_and(|ts| ts < at_ms) {
            answers[i].1 = answers[i].3;
        }
    }
    if !unread.is_empty() {
        let partitions: Vec<i32> = unread.iter().map(|&i| answers[i].0).collect();
        tracing::warn!(
            topic,
            ?partitions,
            "cannot read the records the broker named for the start time; taking its offsets as they are"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{admin_config, check_retention, check_topic_name};
    use crate::kafka::KafkaClientConfig;

    #[test]
    fn the_admin_client_never_creates_topics_it_looks_up() {
        let mut config = KafkaClientConfig::default();
        config
            .librdkafka
            .insert("allow.auto.create.topics".into(), "true".into());
        assert_eq!(
            admin_config(&config).get("allow.auto.create.topics"),
            Some("false")
        );
    }

    #[test]
    fn retention_is_minus_one_or_more() {
        for good in [None, Some(-1), Some(0), Some(604_800_000)] {
            assert!(check_retention("t", good).is_ok(), "{good:?}");
        }
        let e = check_retention("t", Some(-5)).unwrap_err().to_string();
        assert!(e.contains("retention.ms -5") && e.contains("-1"), "{e}");
    }

    #[test]
    fn topic_names_follow_kafkas_rule() {
        for good in ["orders", "shop.orders-v2_x", &"a".repeat(249)] {
            assert!(check_topic_name(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("bad name", "' '"),
            ("ordres/x", "'/'"),
            ("..", "reserved"),
            (&"a".repeat(250), "249"),
        ] {
            let e = check_topic_name(bad).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains("Kafka topic name"),
                "{bad}: {e}"
            );
        }
    }
}
