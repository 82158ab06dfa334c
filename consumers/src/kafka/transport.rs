//! `KafkaTransport`: publisher, group consumer and admin behind Keel's
//! [`Transport`] trait — what the conformance suite and `keel` use.

use std::time::Duration;

use async_trait::async_trait;
use keel_core::transport::{
    Capabilities, Publisher, Receipt, Sent, Subscriber, Subscription, TopicAdmin, TopicSpec,
    Transport,
};
use keel_core::{Deliveries, Envelope, RawRecord, Result};
use keel_producers::kafka::{KafkaAdmin, KafkaPublisher, KafkaPublisherConfig};

use super::group::{KafkaConsumerConfig, KafkaGroupConsumer};

/// Kafka as a Keel transport.
#[derive(Debug)]
pub struct KafkaTransport {
    publisher: KafkaPublisher,
    consumer: KafkaGroupConsumer,
    admin: KafkaAdmin,
}

impl KafkaTransport {
    /// A transport from publisher and consumer settings; topics it creates
    /// get `replication_factor` replicas (-1: the broker's default).
    pub fn new(
        publisher: KafkaPublisherConfig,
        consumer: KafkaConsumerConfig,
        replication_factor: i32,
    ) -> Result<Self> {
        let admin = KafkaAdmin::new(&publisher.client, replication_factor)?;
        Ok(KafkaTransport {
            publisher: KafkaPublisher::new(publisher)?,
            consumer: KafkaGroupConsumer::new(consumer)?,
            admin,
        })
    }
}

#[async_trait]
impl Publisher for KafkaTransport {
    async fn publish(&self, topic: &str, event: Envelope) -> Result<Receipt> {
        self.publisher.publish(topic, event).await
    }

    async fn publish_batch(&self, topic: &str, events: Vec<Envelope>) -> Result<Vec<Receipt>> {
        self.publisher.publish_batch(topic, events).await
    }

    async fn publish_each(
        &self,
        topic: &str,
        events: Vec<Envelope>,
        within: std::time::Duration,
    ) -> Vec<Sent> {
        self.publisher.publish_each(topic, events, within).await
    }

    async fn publish_record(&self, topic: &str, record: RawRecord) -> Result<Receipt> {
        self.publisher.publish_record(topic, record).await
    }
}

#[async_trait]
impl Subscriber for KafkaTransport {
    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries> {
        self.consumer.subscribe(subscription).await
    }
}

#[async_trait]
impl TopicAdmin for KafkaTransport {
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<()> {
        self.admin.ensure_topic(spec).await
    }
}

impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            consumer_groups: true,
            per_key_order: true,
            replay_from_start: true,
            redelivery_after_nack: true,
            // Kafka's idempotent producer removes retry duplicates, not a
            // second publish of the same event id.
            publish_dedup: false,
            rebalance_timeout: Duration::from_secs(60),
        }
    }
}
