//! The orders → billing → shipping chain of the router's exactly-once test:
//! two services whose handlers apply a database effect and enqueue the
//! next event into their outbox, in the transaction the inbox opened.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_consumers::router::{EventContext, EventHandler, Inboxed, RetryPolicy, Router, Timeout};
use keel_core::{Error, Result, Transport};
use keel_producers::outbox::{Outbox, OutboxTables};
use keel_schemas::events::{OrderPlaced, PaymentCaptured, ShipmentDispatched, Timestamp};
use keel_schemas::{AvroCodec, CodecOptions, RegistryClient};
use sqlx::PgPool;

/// The effect tables of both services.
pub const SCHEMA: &str = "CREATE TABLE charges (order_id UUID NOT NULL, event_id UUID NOT NULL);
     CREATE TABLE dispatches (order_id UUID NOT NULL, event_id UUID NOT NULL);";

/// The three topics.
#[derive(Clone, Debug)]
pub struct Topics {
    /// `OrderPlaced`, written by the test through the outbox.
    pub orders: String,
    /// `PaymentCaptured`, from billing.
    pub payments: String,
    /// `ShipmentDispatched`, from shipping.
    pub shipments: String,
}

fn now() -> Timestamp {
    Timestamp(chrono::Utc::now())
}

fn db(e: sqlx::Error) -> Error {
    Error::retriable(e)
}

/// Charges an order and announces the payment.
struct Billing {
    payments: String,
}

#[async_trait]
impl EventHandler<OrderPlaced> for Billing {
    async fn handle(&self, order: OrderPlaced, mut ctx: EventContext<'_>) -> Result<()> {
        let event_id = *ctx.envelope().id().as_uuid();
        sqlx::query("INSERT INTO charges (order_id, event_id) VALUES ($1, $2)")
            .bind(order.order_id)
            .bind(event_id)
            .execute(ctx.transaction()?)
            .await
            .map_err(db)?;
        let key = ctx.envelope().key().clone();
        let payment = PaymentCaptured {
            payment_id: uuid::Uuid::now_v7(),
            order_id: order.order_id,
            amount: order.total,
            currency: order.currency,
            captured_at: now(),
            provider: "test-psp".into(),
            provider_reference: format!("ref-{}", order.order_id),
        };
        ctx.enqueue(&self.payments, key, &payment).await?;
        Ok(())
    }
}

/// Dispatches a paid order.
struct Shipping {
    shipments: String,
}

#[async_trait]
impl EventHandler<PaymentCaptured> for Shipping {
    async fn handle(&self, payment: PaymentCaptured, mut ctx: EventContext<'_>) -> Result<()> {
        let event_id = *ctx.envelope().id().as_uuid();
        sqlx::query("INSERT INTO dispatches (order_id, event_id) VALUES ($1, $2)")
            .bind(payment.order_id)
            .bind(event_id)
            .execute(ctx.transaction()?)
            .await
            .map_err(db)?;
        let key = ctx.envelope().key().clone();
        let shipment = ShipmentDispatched {
            shipment_id: uuid::Uuid::now_v7(),
            order_id: payment.order_id,
            dispatched_at: now(),
            carrier: "test-carrier".into(),
            tracking_number: format!("track-{}", payment.order_id),
            address: keel_schemas::testdata::order_placed().shipping_address,
        };
        ctx.enqueue(&self.shipments, key, &shipment).await?;
        Ok(())
    }
}

/// A codec on the shared registry at `url`, registering schemas on first use.
pub fn codec(registry: &str) -> Arc<AvroCodec> {
    let client = RegistryClient::new(registry, keel_schemas::ClientOptions::default())
        .unwrap_or_else(|e| panic!("registry client for {registry}: {e}"));
    Arc::new(AvroCodec::new(
        Arc::new(client),
        CodecOptions {
            auto_register: true,
            ..CodecOptions::default()
        },
    ))
}

/// The router of `role` (`billing` or `shipping`) as consumer group
/// `group`: standard layers, a handler timeout, the inbox with the outbox
/// for follow-ups.
pub fn router(
    role: &str,
    group: &str,
    transport: Arc<dyn Transport>,
    pool: PgPool,
    codec: Arc<AvroCodec>,
    topics: &Topics,
) -> Result<Router> {
    let tables = OutboxTables::default();
    let outbox = Arc::new(Outbox::new(tables.clone(), codec.clone()));
    let base = Router::new(group, codec)
        .standard_layers(transport, RetryPolicy::default())?
        .layer(Timeout::new(Duration::from_secs(10))?)
        .layer(Inboxed::new(pool, &tables).with_outbox(outbox));
    match role {
        "billing" => Ok(base.route(
            topics.orders.clone(),
            Billing {
                payments: topics.payments.clone(),
            },
        )),
        "shipping" => Ok(base.route(
            topics.payments.clone(),
            Shipping {
                shipments: topics.shipments.clone(),
            },
        )),
        other => Err(Error::config(
            "role",
            format!("`{other}` is not billing or shipping"),
        )),
    }
}
