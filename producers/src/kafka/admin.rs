//! `KafkaAdmin`: idempotent topic creation and description.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::transport::{TopicAdmin, TopicSpec};
use keel_core::{Error, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use super::config::KafkaClientConfig;

/// How long admin requests may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates and describes topics.
pub struct KafkaAdmin {
    // Shared with blocking metadata calls on the blocking pool.
    admin: Arc<AdminClient<DefaultClientContext>>,
    replication_factor: i32,
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
        let admin = config.client_config().create().map_err(|e| {
            Error::config(
                "kafka",
                format!("librdkafka refused the admin configuration: {e}"),
            )
        })?;
        Ok(KafkaAdmin {
            admin: Arc::new(admin),
            replication_factor,
        })
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
        .map_err(|e| topic_error(topic, format!("cannot fetch metadata: {e}"), true))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as u32)
            .filter(|n| *n > 0))
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

#[async_trait]
impl TopicAdmin for KafkaAdmin {
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<()> {
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
        let new = NewTopic::new(
            &spec.name,
            partitions,
            TopicReplication::Fixed(self.replication_factor),
        );
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .create_topics(&[new], &options)
            .await
            .map_err(|e| topic_error(&spec.name, format!("create request failed: {e}"), true))?;
        match results.into_iter().next() {
            Some(Ok(_)) => {}
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {}
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
