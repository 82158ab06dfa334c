//! The example domain's events as Rust types.
//!
//! Why derive rather than generate: the `.avsc` files under `schemas/avro/`
//! are the contract other teams read and register, and the Rust types are
//! written by hand with `#[derive(AvroSchema)]` so they stay ordinary,
//! documented structs (newtypes for money and timestamps, real enums) that
//! serde serializes directly. A build-time generator would have to own both
//! and makes the types awkward to extend. The cost — two descriptions of one
//! schema — is paid by the test `every_type_matches_its_avsc`, which compares
//! each derived schema with its file (names, namespaces, docs, logical types,
//! defaults) and fails on any drift.

use std::collections::HashMap;
use std::fmt;

use apache_avro::AvroSchema;
use apache_avro::schema::derive::AvroSchemaComponent;
use apache_avro::schema::{DecimalSchema, Name, Schema};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// An Avro event type: a Rust type with its schema's full name.
pub trait Event: Serialize + for<'de> Deserialize<'de> + AvroSchema {
    /// Avro full name, also the event type header (`shop.orders.OrderPlaced`).
    const FULL_NAME: &'static str;
}

/// A money amount in minor units (cents), Avro `decimal(12, 2)` on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(pub i64);

impl Money {
    /// Precision of the Avro decimal: up to 9,999,999,999.99.
    pub const PRECISION: usize = 12;
    /// Scale of the Avro decimal: two decimal places.
    pub const SCALE: usize = 2;

    /// An amount from whole units and cents (`Money::new(12, 50)` is 12.50).
    pub fn new(units: i64, cents: i64) -> Money {
        Money(units * 100 + cents)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Avro decimals are big-endian two's complement of the unscaled
        // value. Eight bytes always: apache-avro refuses a decimal whose byte
        // length could not hold the declared precision.
        s.serialize_bytes(&self.0.to_be_bytes())
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Money, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an Avro decimal (big-endian two's complement bytes)")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Money, E> {
                decimal_to_i64(bytes).map(Money).ok_or_else(|| {
                    E::custom(format!(
                        "decimal of {} bytes does not fit a money amount",
                        bytes.len()
                    ))
                })
            }
            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Money, E> {
                self.visit_bytes(&bytes)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Money, A::Error> {
                let mut bytes = Vec::with_capacity(8);
                while let Some(b) = seq.next_element::<u8>()? {
                    if bytes.len() == 16 {
                        return Err(serde::de::Error::custom("decimal longer than 16 bytes"));
                    }
                    bytes.push(b);
                }
                self.visit_bytes(&bytes)
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

/// Sign-extends a big-endian two's complement integer of any length into an
/// `i64`, or `None` when it does not fit.
fn decimal_to_i64(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return Some(0);
    }
    let negative = bytes[0] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0x00 };
    let (extra, tail) = bytes.split_at(bytes.len().saturating_sub(8));
    if extra.iter().any(|&b| b != fill) {
        return None;
    }
    let mut buf = [fill; 8];
    buf[8 - tail.len()..].copy_from_slice(tail);
    let value = i64::from_be_bytes(buf);
    // A sign bit lost in the cut means the value did not fit.
    ((value < 0) == negative || extra.is_empty()).then_some(value)
}

impl AvroSchemaComponent for Money {
    fn get_schema_in_ctxt(_: &mut HashMap<Name, Schema>, _: &Option<String>) -> Schema {
        Schema::Decimal(DecimalSchema {
            precision: Money::PRECISION,
            scale: Money::SCALE,
            inner: Box::new(Schema::Bytes),
        })
    }
}

/// A point in time, Avro `timestamp-millis` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub fn millis(&self) -> i64 {
        self.0.timestamp_millis()
    }

    /// From milliseconds since the Unix epoch; `None` out of chrono's range.
    pub fn from_millis(ms: i64) -> Option<Timestamp> {
        DateTime::from_timestamp_millis(ms).map(Timestamp)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.millis())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let ms = i64::deserialize(d)?;
        Timestamp::from_millis(ms)
            .ok_or_else(|| serde::de::Error::custom(format!("timestamp {ms} ms is out of range")))
    }
}

impl AvroSchemaComponent for Timestamp {
    fn get_schema_in_ctxt(_: &mut HashMap<Name, Schema>, _: &Option<String>) -> Schema {
        Schema::TimestampMillis
    }
}

/// A postal address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "shop.common")]
pub struct Address {
    /// Street and number.
    pub line1: String,
    /// Apartment, floor or c/o, if any.
    #[avro(default = "null")]
    pub line2: Option<String>,
    /// City or town.
    pub city: String,
    /// Postal code as printed on mail.
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 country code.
    pub country: String,
}

/// Where an order was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "shop.orders")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SalesChannel {
    /// The web shop.
    #[avro(rename = "WEB")]
    Web,
    /// The mobile app.
    #[avro(rename = "MOBILE")]
    Mobile,
    /// A physical store.
    #[avro(rename = "STORE")]
    Store,
}

/// One product line of an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "shop.orders")]
pub struct OrderLine {
    /// Stock keeping unit.
    pub sku: String,
    /// Units ordered.
    pub quantity: i32,
    /// Price of one unit.
    pub unit_price: Money,
}

/// A customer placed an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "shop.orders")]
pub struct OrderPlaced {
    /// The order's id.
    pub order_id: Uuid,
    /// The customer who placed it.
    pub customer_id: String,
    /// When the order was placed.
    pub placed_at: Timestamp,
    /// Where it was placed.
    pub channel: SalesChannel,
    /// ISO 4217 currency code of every amount.
    pub currency: String,
    /// What was ordered.
    pub lines: Vec<OrderLine>,
    /// Sum of the lines.
    pub subtotal: Money,
    /// Shipping charged.
    pub shipping_fee: Money,
    /// Amount to pay.
    pub total: Money,
    /// Where to ship.
    pub shipping_address: Address,
    /// Coupon applied, if any.
    #[avro(default = "null")]
    pub coupon_code: Option<String>,
    /// Wrap the order as a gift (added in version 2).
    #[avro(default = "false")]
    #[serde(default)]
    pub gift_wrap: bool,
}

/// A customer placed an order (first version).
///
/// Kept to prove evolution both ways: version-1 bytes decode into
/// [`OrderPlaced`] (`gift_wrap` takes its default) and version-2 bytes
/// decode into this type (the new field is skipped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(
    namespace = "shop.orders",
    name = "OrderPlaced",
    doc = "A customer placed an order (first version)."
)]
pub struct OrderPlacedV1 {
    /// The order's id.
    pub order_id: Uuid,
    /// The customer who placed it.
    pub customer_id: String,
    /// When the order was placed.
    pub placed_at: Timestamp,
    /// Where it was placed.
    pub channel: SalesChannel,
    /// ISO 4217 currency code of every amount.
    pub currency: String,
    /// What was ordered.
    pub lines: Vec<OrderLine>,
    /// Sum of the lines.
    pub subtotal: Money,
    /// Shipping charged.
    pub shipping_fee: Money,
    /// Amount to pay.
    pub total: Money,
    /// Where to ship.
    pub shipping_address: Address,
    /// Coupon applied, if any.
    #[avro(default = "null")]
    pub coupon_code: Option<String>,
}

/// Why an order was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "shop.orders")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CancelReason {
    /// The customer asked.
    #[avro(rename = "CUSTOMER_REQUEST")]
    CustomerRequest,
    /// Payment could not be taken.
    #[avro(rename = "PAYMENT_FAILED")]
    PaymentFailed,
    /// Not enough stock.
    #[avro(rename = "OUT_OF_STOCK")]
    OutOfStock,
    /// Fraud checks flagged it.
    #[avro(rename = "FRAUD_SUSPECTED")]
    FraudSuspected,
}

/// An order was cancelled before it shipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "shop.orders")]
pub struct OrderCancelled {
    /// The order's id.
    pub order_id: Uuid,
    /// When it was cancelled.
    pub cancelled_at: Timestamp,
    /// Why it was cancelled.
    pub reason: CancelReason,
    /// Free-text note from support, if any.
    #[avro(default = "null")]
    pub note: Option<String>,
}

/// The payment for an order was captured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "shop.payments")]
pub struct PaymentCaptured {
    /// The payment's id.
    pub payment_id: Uuid,
    /// The order paid for.
    pub order_id: Uuid,
    /// Amount captured.
    pub amount: Money,
    /// ISO 4217 currency code.
    pub currency: String,
    /// When the provider captured it.
    pub captured_at: Timestamp,
    /// Payment provider.
    pub provider: String,
    /// The provider's id for the capture.
    pub provider_reference: String,
}

/// A payment attempt for an order failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "shop.payments")]
pub struct PaymentFailed {
    /// The payment's id.
    pub payment_id: Uuid,
    /// The order to be paid.
    pub order_id: Uuid,
    /// Amount attempted.
    pub amount: Money,
    /// ISO 4217 currency code.
    pub currency: String,
    /// When the attempt failed.
    pub failed_at: Timestamp,
    /// The provider's decline code.
    pub reason_code: String,
    /// Whether trying again may succeed.
    pub retriable: bool,
}

/// A shipment left the warehouse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "shop.shipping")]
pub struct ShipmentDispatched {
    /// The shipment's id.
    pub shipment_id: Uuid,
    /// The order shipped.
    pub order_id: Uuid,
    /// When it left.
    pub dispatched_at: Timestamp,
    /// Carrier name.
    pub carrier: String,
    /// The carrier's tracking number.
    pub tracking_number: String,
    /// Where it goes.
    pub address: Address,
}

impl Event for OrderPlaced {
    const FULL_NAME: &'static str = "shop.orders.OrderPlaced";
}
impl Event for OrderPlacedV1 {
    const FULL_NAME: &'static str = "shop.orders.OrderPlaced";
}
impl Event for OrderCancelled {
    const FULL_NAME: &'static str = "shop.orders.OrderCancelled";
}
impl Event for PaymentCaptured {
    const FULL_NAME: &'static str = "shop.payments.PaymentCaptured";
}
impl Event for PaymentFailed {
    const FULL_NAME: &'static str = "shop.payments.PaymentFailed";
}
impl Event for ShipmentDispatched {
    const FULL_NAME: &'static str = "shop.shipping.ShipmentDispatched";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_round_trips_any_decimal_width() {
        for v in [
            0,
            1,
            -1,
            127,
            128,
            -129,
            1_234_567_890_123,
            i64::MAX,
            i64::MIN,
        ] {
            assert_eq!(decimal_to_i64(&v.to_be_bytes()), Some(v));
        }
        // Java writers use the shortest form.
        assert_eq!(decimal_to_i64(&[0x01, 0xf4]), Some(500));
        assert_eq!(decimal_to_i64(&[0xff, 0x0c]), Some(-244));
        assert_eq!(decimal_to_i64(&[]), Some(0));
        // Sign-extended longer forms fit; real overflow does not.
        assert_eq!(decimal_to_i64(&[0xff; 12]), Some(-1));
        assert_eq!(
            decimal_to_i64(&[0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]),
            None
        );
        assert_eq!(decimal_to_i64(&[0x00, 0x80, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(Money::new(12, 5).to_string(), "12.05");
        assert_eq!(Money(-5).to_string(), "-0.05");
    }
}
