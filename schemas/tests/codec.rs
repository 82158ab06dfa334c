//! The codec end to end on the in-memory registry: every event type round
//! trips, schemas evolve both ways, steady state makes no registry calls,
//! and hostile bytes give typed errors.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::Arc;

use keel_schemas::events::*;
use keel_schemas::{
    AvroCodec, CodecOptions, LocalRegistry, Registry, SchemaError, SubjectNameStrategy,
};
use uuid::Uuid;

fn codec(registry: Arc<LocalRegistry>, strategy: SubjectNameStrategy) -> AvroCodec {
    AvroCodec::new(
        registry,
        CodecOptions {
            strategy,
            auto_register: true,
        },
    )
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms).unwrap()
}

fn address() -> Address {
    Address {
        line1: "1 Quay Street".into(),
        line2: None,
        city: "Bristol".into(),
        postal_code: "BS1 4DJ".into(),
        country: "GB".into(),
    }
}

fn order() -> OrderPlaced {
    keel_schemas::testdata::order_placed()
}

fn v1(o: &OrderPlaced) -> OrderPlacedV1 {
    OrderPlacedV1 {
        order_id: o.order_id,
        customer_id: o.customer_id.clone(),
        placed_at: o.placed_at,
        channel: o.channel,
        currency: o.currency.clone(),
        lines: o.lines.clone(),
        subtotal: o.subtotal,
        shipping_fee: o.shipping_fee,
        total: o.total,
        shipping_address: o.shipping_address.clone(),
        coupon_code: o.coupon_code.clone(),
    }
}

/// Encodes `value` through the codec and checks that the bytes are what
/// serde_avro_fast writes under the registered schema with the amounts as
/// decimal text (Keel's domain events write `Money` as the decimal's bytes
/// themselves, `Event::MONEY_DECIMALS`), and that both decode paths — the
/// event path (bytes) and `decode_value` (text) — read it back.
async fn round_trip<T>(c: &AvroCodec, registry: &LocalRegistry, topic: &str, value: &T)
where
    T: Event + PartialEq + std::fmt::Debug + 'static,
{
    let framed = c.encode(topic, value).await.unwrap();
    let id = u32::from_be_bytes(framed[1..5].try_into().unwrap());
    let registered: serde_avro_fast::Schema =
        registry.schema_by_id(id).await.unwrap().parse().unwrap();
    let as_text = serde_avro_fast::to_datum_vec(
        value,
        &mut serde_avro_fast::ser::SerializerConfig::new(&registered),
    )
    .unwrap();
    assert_eq!(&framed[5..], &as_text[..], "{} {value:?}", T::FULL_NAME);
    assert_eq!(&c.decode::<T>(&framed).await.unwrap(), value);
    assert_eq!(&c.decode_value::<T>(&framed).await.unwrap(), value);
}

#[tokio::test]
async fn every_event_type_round_trips() {
    let registry = Arc::new(LocalRegistry::new());
    let c = codec(registry.clone(), SubjectNameStrategy::TopicRecordName);
    let o = order();
    round_trip(&c, &registry, "orders", &o).await;
    round_trip(&c, &registry, "orders-v1", &v1(&o)).await;
    let cancelled = OrderCancelled {
        order_id: o.order_id,
        cancelled_at: at(1),
        reason: CancelReason::OutOfStock,
        note: None,
    };
    round_trip(&c, &registry, "orders", &cancelled).await;
    let captured = PaymentCaptured {
        payment_id: Uuid::now_v7(),
        order_id: o.order_id,
        amount: Money(-1),
        currency: "EUR".into(),
        captured_at: at(-5),
        provider: "acme-pay".into(),
        provider_reference: "ch_1".into(),
    };
    round_trip(&c, &registry, "payments", &captured).await;
    let failed = PaymentFailed {
        payment_id: Uuid::now_v7(),
        order_id: o.order_id,
        amount: Money(999_999_999_999),
        currency: "EUR".into(),
        failed_at: at(0),
        reason_code: "insufficient_funds".into(),
        retriable: true,
    };
    round_trip(&c, &registry, "payments", &failed).await;
    let dispatched = ShipmentDispatched {
        shipment_id: Uuid::now_v7(),
        order_id: o.order_id,
        dispatched_at: at(7),
        carrier: "DHL".into(),
        tracking_number: "JD0001".into(),
        address: address(),
    };
    round_trip(&c, &registry, "shipping", &dispatched).await;
}

#[tokio::test]
async fn the_wire_is_confluent_framed_avro() {
    let registry = Arc::new(LocalRegistry::new());
    let c = codec(registry.clone(), SubjectNameStrategy::TopicName);
    let bytes = c.encode("orders", &order()).await.unwrap();
    assert_eq!(bytes[0], 0);
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    assert_eq!(
        registry
            .lookup("orders-value", &registry.schema_by_id(id).await.unwrap())
            .await
            .unwrap(),
        Some(id)
    );
    // The money fields are Avro decimals: 54.94 is the unscaled 5494.
    let decoded = c.decode_json(&bytes).await.unwrap();
    assert_eq!(decoded["total"], "54.94");
    assert_eq!(decoded["channel"], "MOBILE");
    assert_eq!(decoded["shipping_address"]["city"], "Bristol");
}

/// Keel's domain events have their `Money` amounts write and read the
/// decimal bytes themselves (`Event::MONEY_DECIMALS`); the wire must be
/// exactly what serde_avro_fast writes for the same amounts as decimal text
/// under the registered schema, and read back the same both ways — signs,
/// byte boundaries, extremes.
#[tokio::test]
async fn money_written_as_bytes_is_the_decimal_encoding() {
    let registry = Arc::new(LocalRegistry::new());
    let codec = codec(registry.clone(), SubjectNameStrategy::TopicName);
    let amounts = [
        0,
        1,
        -1,
        99,
        127,
        128,
        -128,
        -129,
        255,
        256,
        32_767,
        32_768,
        -32_768,
        -32_769,
        8_388_608,
        999_999_999_999,
        -999_999_999_999,
        i64::MAX,
        i64::MIN + 1,
    ];
    for cents in amounts {
        let mut event = order();
        event.total = Money(cents);
        event.subtotal = Money(cents / 2);
        event.lines[0].unit_price = Money(-cents);
        round_trip(&codec, &registry, "orders", &event).await;
    }
    // Outside the codec, Money is decimal text again (JSON, other tools).
    assert_eq!(serde_json::to_string(&Money(-1234)).unwrap(), "\"-12.34\"");
}

#[tokio::test]
async fn old_events_decode_into_new_types_and_new_into_old() {
    let registry = Arc::new(LocalRegistry::new());
    let c = codec(registry, SubjectNameStrategy::RecordName);
    let new = order();
    let old = v1(&new);
    // Written by a version-1 producer, read by a version-2 consumer: the
    // added field takes its default.
    let from_old = c
        .decode::<OrderPlaced>(&c.encode("orders", &old).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        from_old,
        OrderPlaced {
            gift_wrap: false,
            ..new.clone()
        }
    );
    // Written by version 2, read by version 1: the new field is skipped.
    let from_new = c
        .decode::<OrderPlacedV1>(&c.encode("orders", &new).await.unwrap())
        .await
        .unwrap();
    assert_eq!(from_new, old);
}

#[tokio::test]
async fn steady_state_makes_no_registry_calls() {
    let c = codec(Arc::default(), SubjectNameStrategy::TopicName);
    let o = order();
    let bytes = c.encode("orders", &o).await.unwrap();
    c.decode::<OrderPlaced>(&bytes).await.unwrap();
    let warm = c.registry_calls();
    assert!(warm > 0);
    for _ in 0..1000 {
        let bytes = c.encode("orders", &o).await.unwrap();
        c.decode::<OrderPlaced>(&bytes).await.unwrap();
    }
    assert_eq!(c.registry_calls(), warm, "registry calls after warm-up");
}

#[tokio::test]
async fn an_unknown_schema_id_is_asked_about_once_not_per_record() {
    let c = codec(Arc::default(), SubjectNameStrategy::TopicName);
    // Confluent framing with id 999, which the registry does not hold.
    let poison = [0u8, 0, 0, 0x03, 0xe7, 0x02, 0x61];
    for _ in 0..100 {
        let err = c.decode::<OrderPlaced>(&poison).await.unwrap_err();
        assert!(matches!(err, SchemaError::UnknownSchemaId(999)), "{err}");
    }
    assert_eq!(c.registry_calls(), 1);
}

#[tokio::test]
async fn unregistered_types_are_refused_without_auto_registration() {
    let c = AvroCodec::new(Arc::new(LocalRegistry::new()), CodecOptions::default());
    let err = c.encode("orders", &order()).await.unwrap_err();
    assert!(matches!(err, SchemaError::NotRegistered { .. }), "{err}");
    assert!(err.to_string().contains("orders-value"), "{err}");
}

#[tokio::test]
async fn hostile_bytes_give_typed_errors() {
    let c = codec(Arc::default(), SubjectNameStrategy::TopicName);
    let good = c.encode("orders", &order()).await.unwrap();
    let id = &good[1..5];
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("wrong magic", [&[1u8][..], &good[1..]].concat()),
        ("short header", vec![0, 0, 0]),
        (
            "unknown id",
            [&[0u8, 0xff, 0xff, 0xff, 0xff][..], &good[5..]].concat(),
        ),
        ("truncated", good[..good.len() / 2].to_vec()),
        (
            "trailing garbage in a string length",
            [
                &[0u8][..],
                id,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ]
            .concat(),
        ),
    ];
    // uuid string claiming 2^60 bytes.
    let mut huge_string = vec![0u8];
    huge_string.extend_from_slice(id);
    huge_string.extend_from_slice(&zigzag(1 << 60));
    cases.push(("2^60-byte string", huge_string));
    // A valid prefix up to `lines`, then a block claiming 10^9 items.
    let prefix_len = lines_offset(&good);
    let mut huge_array = good[..prefix_len].to_vec();
    huge_array.extend_from_slice(&zigzag(1_000_000_000));
    cases.push(("10^9 array items", huge_array));
    for (name, bytes) in cases {
        let err = c.decode::<OrderPlaced>(&bytes).await.unwrap_err();
        match (name, &err) {
            ("empty" | "wrong magic" | "short header", SchemaError::Framing(_))
            | ("unknown id", SchemaError::UnknownSchemaId(_))
            | (_, SchemaError::Decode { .. }) => {}
            _ => panic!("{name}: unexpected error {err:?}"),
        }
    }
}

/// Avro's zig-zag varint encoding of a long.
fn zigzag(v: i64) -> Vec<u8> {
    let mut n = ((v << 1) ^ (v >> 63)) as u64;
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Offset of the `lines` block in an encoded `order()`: framing, then
/// order_id (uuid string), customer_id, placed_at, channel, currency.
fn lines_offset(encoded: &[u8]) -> usize {
    let mut at = 5;
    let skip_string = |at: &mut usize| {
        let (len, used) = read_varint(&encoded[*at..]);
        *at += used + len as usize;
    };
    skip_string(&mut at); // order_id
    skip_string(&mut at); // customer_id
    at += read_varint(&encoded[at..]).1; // placed_at
    at += read_varint(&encoded[at..]).1; // channel
    skip_string(&mut at); // currency
    at
}

fn read_varint(bytes: &[u8]) -> (i64, usize) {
    let mut n = 0u64;
    for (i, b) in bytes.iter().enumerate() {
        n |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (((n >> 1) as i64) ^ -((n & 1) as i64), i + 1);
        }
    }
    panic!("unterminated varint")
}

/// JSON written for an older version of a record encodes under the newer
/// one: the fields it leaves out take their schema defaults (`keel
/// publish`), at the top and in nested records.
#[tokio::test]
async fn json_missing_fields_with_defaults_encodes_with_them() {
    let registry = Arc::new(LocalRegistry::new());
    let c = codec(registry.clone(), SubjectNameStrategy::TopicName);
    let mut placed = order();
    placed.gift_wrap = true;
    placed.coupon_code = Some("SPRING".into());
    placed.shipping_address.line2 = Some("Flat 2".into());
    let bytes = c.encode("orders", &placed).await.unwrap();
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let mut json = c.decode_json(&bytes).await.unwrap();
    let object = json.as_object_mut().unwrap();
    object.remove("gift_wrap");
    object.remove("coupon_code");
    object["shipping_address"]
        .as_object_mut()
        .unwrap()
        .remove("line2");
    let encoded = c.encode_json(id, &json).await.unwrap();
    let back: OrderPlaced = c.decode(&encoded).await.unwrap();
    assert!(!back.gift_wrap);
    assert_eq!(back.coupon_code, None);
    assert_eq!(back.shipping_address.line2, None);
    assert_eq!(back.total, placed.total);
    assert_eq!(back.lines, placed.lines);

    // A field without a default is still required, by name.
    json.as_object_mut().unwrap().remove("customer_id");
    let e = c.encode_json(id, &json).await.unwrap_err().to_string();
    assert!(e.contains("customer_id"), "{e}");
}
