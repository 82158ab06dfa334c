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

use std::cell::Cell;
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

    /// `true` when every Avro `decimal` in this type's schema is held by a
    /// [`Money`] field. The codec then has each amount write (and read) its
    /// unscaled two's-complement bytes directly instead of going through
    /// decimal text that the Avro library parses and formats; the bytes on
    /// the wire are the same either way (see `BENCHMARKS.md`). Leave
    /// it `false` (the default) for a type holding decimals as other types
    /// (text, `rust_decimal`, floats): the promise is not checked, and a
    /// `decimal(…, 2)` field of another Rust type under `true` would be
    /// written and read as the raw bytes — silently wrong data.
    const MONEY_DECIMALS: bool = false;
}

/// A money amount in minor units (cents), Avro `decimal(12, 2)` on the wire.
/// Serialized as its decimal text (`"12.50"`: JSON, and Avro serializers
/// scale it); inside Keel's codec, for [`Event::MONEY_DECIMALS`] types, as
/// the decimal's bytes themselves.
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

impl std::str::FromStr for Money {
    type Err = String;

    /// Parses `12.5`, `-0.05`, `7`: at most two decimal places.
    fn from_str(s: &str) -> Result<Money, String> {
        let bad = || format!("`{s}` is not an amount with at most two decimal places");
        let (negative, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (units, cents) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = units
            .bytes()
            .chain(cents.bytes())
            .all(|b| b.is_ascii_digit());
        if units.is_empty() || cents.len() > 2 || !all_digits {
            return Err(bad());
        }
        let units: i64 = units.parse().map_err(|_| bad())?;
        let cents: i64 = format!("{cents:0<2}").parse().map_err(|_| bad())?;
        let value = units
            .checked_mul(100)
            .and_then(|u| u.checked_add(cents))
            .ok_or_else(bad)?;
        Ok(Money(if negative { -value } else { value }))
    }
}

thread_local! {
    /// Set while the codec encodes an [`Event::MONEY_DECIMALS`] type with a
    /// writer schema whose decimals are plain `bytes` (see [`MoneyAsBytes`]).
    static MONEY_AS_BYTES: Cell<bool> = const { Cell::new(false) };
}

/// While alive, [`Money`] serializes as (and deserializes from) the Avro
/// `decimal(12, 2)` bytes themselves on this thread. Only the codec uses
/// it, around one encode or decode with a schema in which those decimals
/// are plain `bytes`.
pub(crate) struct MoneyAsBytes {
    before: bool,
    /// Not `Send`: the flag is this thread's, so the guard must never be
    /// held across an `.await` that could move the task.
    _thread: std::marker::PhantomData<*const ()>,
}

impl MoneyAsBytes {
    pub(crate) fn enter() -> MoneyAsBytes {
        MoneyAsBytes {
            before: MONEY_AS_BYTES.replace(true),
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for MoneyAsBytes {
    fn drop(&mut self) {
        MONEY_AS_BYTES.set(self.before);
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if MONEY_AS_BYTES.get() {
            let (bytes, start) = self.decimal_bytes();
            return s.serialize_bytes(&bytes[start..]);
        }
        // The decimal's text: serde_avro_fast scales it to the schema's
        // `decimal(12, 2)` and writes the two's complement bytes. Formatted
        // on the stack: this runs for every amount of every event.
        let mut buf = [0u8; 24];
        s.serialize_str(self.format_into(&mut buf))
    }
}

impl Money {
    /// The amount in Avro `decimal(…, 2)` bytes (big-endian two's
    /// complement of the cents, any length); `None` when it does not fit an
    /// `i64`. No bytes is zero, as serde_avro_fast reads it.
    fn from_decimal_bytes(bytes: &[u8]) -> Option<Money> {
        let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
        let fill = if negative { 0xFF } else { 0x00 };
        // Sign-extension bytes beyond an i64 carry nothing.
        let mut rest = bytes;
        while rest.len() > 8 && rest[0] == fill {
            rest = &rest[1..];
        }
        if rest.len() > 8 || (bytes.len() > rest.len() && (rest[0] & 0x80 != 0) != negative) {
            return None;
        }
        let mut buf = [fill; 8];
        buf[8 - rest.len()..].copy_from_slice(rest);
        Some(Money(i64::from_be_bytes(buf)))
    }

    /// Avro's `decimal(12, 2)` bytes: the unscaled amount (the cents) as
    /// big-endian two's complement, in the fewest bytes that keep the sign
    /// (at least one) — what serde_avro_fast writes for the same amount as
    /// text. Returns the buffer and where the bytes start in it.
    fn decimal_bytes(self) -> ([u8; 8], usize) {
        // Bits that carry the value, plus one for the sign.
        let redundant = if self.0 < 0 {
            self.0.leading_ones()
        } else {
            self.0.leading_zeros()
        };
        let needed = (64 - redundant + 1).div_ceil(8).clamp(1, 8) as usize;
        (self.0.to_be_bytes(), 8 - needed)
    }

    /// Writes `-123.45` into `buf` (an i64 needs at most 21 bytes) and
    /// returns it.
    fn format_into<'b>(&self, buf: &'b mut [u8; 24]) -> &'b str {
        let mut n = self.0.unsigned_abs();
        let mut i = buf.len();
        let mut place = 0;
        loop {
            if place == 2 {
                i -= 1;
                buf[i] = b'.';
            }
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            place += 1;
            if n == 0 && place > 2 {
                break;
            }
        }
        if self.0 < 0 {
            i -= 1;
            buf[i] = b'-';
        }
        // Only ASCII digits, '.' and '-' were written.
        std::str::from_utf8(&buf[i..]).unwrap_or("0.00")
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Money, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal amount with at most two decimal places")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Money, E> {
                s.parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Money, E> {
                v.checked_mul(100)
                    .map(Money)
                    .ok_or_else(|| E::custom(format!("{v} is out of range")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Money, E> {
                i64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is out of range")))
                    .and_then(|v| self.visit_i64(v))
            }
            /// The decimal's own bytes (only asked for by the codec, see
            /// [`MoneyAsBytes`]): the unscaled amount in big-endian two's
            /// complement; scale 2 is guaranteed by the codec.
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Money, E> {
                Money::from_decimal_bytes(v).ok_or_else(|| {
                    E::custom(format!(
                        "a decimal of {} bytes is out of range for an amount in cents",
                        v.len()
                    ))
                })
            }
        }
        if MONEY_AS_BYTES.get() {
            d.deserialize_bytes(Visitor)
        } else {
            d.deserialize_str(Visitor)
        }
    }
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
    const MONEY_DECIMALS: bool = true;
}
impl Event for OrderPlacedV1 {
    const FULL_NAME: &'static str = "shop.orders.OrderPlaced";
    const MONEY_DECIMALS: bool = true;
}
impl Event for OrderCancelled {
    const FULL_NAME: &'static str = "shop.orders.OrderCancelled";
    const MONEY_DECIMALS: bool = true;
}
impl Event for PaymentCaptured {
    const FULL_NAME: &'static str = "shop.payments.PaymentCaptured";
    const MONEY_DECIMALS: bool = true;
}
impl Event for PaymentFailed {
    const FULL_NAME: &'static str = "shop.payments.PaymentFailed";
    const MONEY_DECIMALS: bool = true;
}
impl Event for ShipmentDispatched {
    const FULL_NAME: &'static str = "shop.shipping.ShipmentDispatched";
    const MONEY_DECIMALS: bool = true;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_parses_and_prints_two_decimal_places() {
        for (text, cents, printed) in [
            ("12.5", 1250, "12.50"),
            ("12.05", 1205, "12.05"),
            ("-0.05", -5, "-0.05"),
            ("7", 700, "7.00"),
            ("0.00", 0, "0.00"),
        ] {
            let m: Money = text.parse().unwrap();
            assert_eq!(m, Money(cents), "{text}");
            assert_eq!(m.to_string(), printed);
        }
        for bad in [
            "",
            ".5",
            "1.234",
            "1e3",
            "abc",
            "--1",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<Money>().is_err(), "{bad}");
        }
    }
}
