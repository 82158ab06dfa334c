//! `NatsTransport`: publisher, group consumer and admin behind Keel's
//! [`Transport`] trait — what the conformance suite and `keel` use.

use std::time::Duration;

use async_trait::async_trait;
use keel_core::transport::{
    Capabilities, Publisher, Receipt, Sent, Subscriber, Subscription, TopicAdmin, TopicSpec,
    Transport,
};
use keel_core::{Deliveries, Envelope, RawRecord, Result};
use keel_producers::nats::{
    JetStreamAdmin, JetStreamPublisher, JetStreamPublisherConfig, StreamSettings,
};

use super::group::{JetStreamConsumerConfig, JetStreamGroupConsumer};

/// NATS JetStream as a Keel transport.
#[derive(Debug)]
pub struct NatsTransport {
    publisher: JetStreamPublisher,
    consumer: JetStreamGroupConsumer,
    admin: JetStreamAdmin,
    settings: StreamSettings,
}

impl NatsTransport {
    /// Connects once and shares the connection; topics it creates get
    /// `settings`.
    pub async fn connect(
        publisher: JetStreamPublisherConfig,
        consumer: JetStreamConsumerConfig,
        settings: StreamSettings,
    ) -> Result<Self> {
        publisher.validate()?;
        consumer.validate()?;
        settings.validate()?;
        let js = publisher.client.jetstream().await?;
        Ok(NatsTransport {
            admin: JetStreamAdmin::new(js.clone()),
            consumer: JetStreamGroupConsumer::with_context(js.clone(), consumer),
            publisher: JetStreamPublisher::with_context(js, publisher),
            settings,
        })
    }

    /// The publisher (for `publish_expecting`).
    pub fn publisher(&self) -> &JetStreamPublisher {
        &self.publisher
    }

    /// The admin.
    pub fn admin(&self) -> &JetStreamAdmin {
        &self.admin
    }
}

#[async_trait]
impl Publisher for NatsTransport {
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
impl Subscriber for NatsTransport {
    async fn subscribe(&self, subscription: Subscription) -> Result<Deliveries> {
        self.consumer.subscribe(subscription).await
    }
}

#[async_trait]
impl TopicAdmin for NatsTransport {
    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<()> {
        self.admin.ensure_stream(spec, &self.settings).await
    }
}

impl Transport for NatsTransport {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            consumer_groups: true,
            per_key_order: true,
            replay_from_start: true,
            redelivery_after_nack: true,
            // Nats-Msg-Id = event id inside the stream's duplicate window.
            publish_dedup: true,
            rebalance_timeout: Duration::from_secs(60),
        }
    }
}
