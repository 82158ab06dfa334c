//! The example domain's `.avsc` files, embedded so every binary carries the
//! schemas it was built with. `schemas/avro/` is the source of truth.

/// `(file name, schema JSON)` of every example-domain schema, dependencies
/// (named types referenced by others) first.
pub const AVSC: &[(&str, &str)] = &[
    (
        "shop.common.Address.avsc",
        include_str!("../avro/shop.common.Address.avsc"),
    ),
    (
        "shop.orders.OrderPlaced.v1.avsc",
        include_str!("../avro/shop.orders.OrderPlaced.v1.avsc"),
    ),
    (
        "shop.orders.OrderPlaced.avsc",
        include_str!("../avro/shop.orders.OrderPlaced.avsc"),
    ),
    (
        "shop.orders.OrderCancelled.avsc",
        include_str!("../avro/shop.orders.OrderCancelled.avsc"),
    ),
    (
        "shop.payments.PaymentCaptured.avsc",
        include_str!("../avro/shop.payments.PaymentCaptured.avsc"),
    ),
    (
        "shop.payments.PaymentFailed.avsc",
        include_str!("../avro/shop.payments.PaymentFailed.avsc"),
    ),
    (
        "shop.shipping.ShipmentDispatched.avsc",
        include_str!("../avro/shop.shipping.ShipmentDispatched.avsc"),
    ),
];

/// The embedded schema JSON of `file`.
pub fn avsc(file: &str) -> Option<&'static str> {
    AVSC.iter()
        .find(|(name, _)| *name == file)
        .map(|(_, json)| *json)
}
