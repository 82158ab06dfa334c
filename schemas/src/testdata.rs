//! Sample events for tests, benchmarks and the decoder fuzzer.

use uuid::Uuid;

use crate::events::{Address, Money, OrderLine, OrderPlaced, SalesChannel, Timestamp};

/// A typical `OrderPlaced`: two lines, an address, a coupon — about the
/// ten-field event the performance targets speak of.
pub fn order_placed() -> OrderPlaced {
    OrderPlaced {
        order_id: Uuid::now_v7(),
        customer_id: "customer-42".into(),
        placed_at: Timestamp::from_millis(1_764_292_000_123)
            .unwrap_or(Timestamp(chrono::DateTime::UNIX_EPOCH)),
        channel: SalesChannel::Mobile,
        currency: "EUR".into(),
        lines: vec![
            OrderLine {
                sku: "KEEL-MUG".into(),
                quantity: 2,
                unit_price: Money::new(12, 50),
            },
            OrderLine {
                sku: "KEEL-SHIRT".into(),
                quantity: 1,
                unit_price: Money::new(24, 99),
            },
        ],
        subtotal: Money::new(49, 99),
        shipping_fee: Money::new(4, 95),
        total: Money::new(54, 94),
        shipping_address: Address {
            line1: "1 Quay Street".into(),
            line2: None,
            city: "Bristol".into(),
            postal_code: "BS1 4DJ".into(),
            country: "GB".into(),
        },
        coupon_code: Some("WELCOME".into()),
        gift_wrap: true,
    }
}
