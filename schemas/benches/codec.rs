//! Encode and decode of a typical event (`OrderPlaced`, 12 fields, two
//! nested lines and an address) — `serde_json` as the baseline, against
//! `apache-avro` and `serde_avro_fast` on the same data and schema, and
//! Keel's codec (serde_avro_fast + framing + schema cache) on top.
//!
//! Run: `cargo bench -p keel-schemas --bench codec`

use std::hint::black_box;
use std::sync::Arc;

use apache_avro::AvroSchema;
use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use keel_schemas::events::{Address, OrderLine, OrderPlaced, SalesChannel};
use keel_schemas::{AvroCodec, CodecOptions, LocalRegistry, SubjectNameStrategy, testdata};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The same event in apache-avro's own data model: money as
/// `apache_avro::Decimal` (its decimal type; apache-avro refuses decimal
/// text), everything else as in `OrderPlaced`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ApacheOrderPlaced {
    order_id: Uuid,
    customer_id: String,
    placed_at: i64,
    channel: SalesChannel,
    currency: String,
    lines: Vec<ApacheOrderLine>,
    subtotal: apache_avro::Decimal,
    shipping_fee: apache_avro::Decimal,
    total: apache_avro::Decimal,
    shipping_address: Address,
    coupon_code: Option<String>,
    gift_wrap: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ApacheOrderLine {
    sku: String,
    quantity: i32,
    unit_price: apache_avro::Decimal,
}

fn decimal(cents: i64) -> apache_avro::Decimal {
    apache_avro::Decimal::from(cents.to_be_bytes().to_vec())
}

fn apache_twin(o: &OrderPlaced) -> ApacheOrderPlaced {
    ApacheOrderPlaced {
        order_id: o.order_id,
        customer_id: o.customer_id.clone(),
        placed_at: o.placed_at.millis(),
        channel: o.channel,
        currency: o.currency.clone(),
        lines: o
            .lines
            .iter()
            .map(|l: &OrderLine| ApacheOrderLine {
                sku: l.sku.clone(),
                quantity: l.quantity,
                unit_price: decimal(l.unit_price.0),
            })
            .collect(),
        subtotal: decimal(o.subtotal.0),
        shipping_fee: decimal(o.shipping_fee.0),
        total: decimal(o.total.0),
        shipping_address: o.shipping_address.clone(),
        coupon_code: o.coupon_code.clone(),
        gift_wrap: o.gift_wrap,
    }
}

fn bench(c: &mut Criterion) {
    // uuid as text, the form the `uuid` logical type has on the wire.
    apache_avro::util::set_serde_human_readable(true);
    let order = testdata::order_placed();
    let schema_json = serde_json::to_string(&OrderPlaced::get_schema()).expect("schema json");
    let apache_schema = OrderPlaced::get_schema();
    let fast_schema: serde_avro_fast::Schema = schema_json.parse().expect("fast schema");
    let twin = apache_twin(&order);

    let json_bytes = serde_json::to_vec(&order).expect("json");
    let apache_bytes = {
        let value = apache_avro::to_value(&twin)
            .expect("to_value")
            .resolve(&apache_schema)
            .expect("resolve");
        apache_avro::to_avro_datum(&apache_schema, value).expect("apache encode")
    };
    let fast_bytes = serde_avro_fast::to_datum_vec(
        &order,
        &mut serde_avro_fast::ser::SerializerConfig::new(&fast_schema),
    )
    .expect("fast encode");
    // Same data, same schema: each library reads what the other wrote
    // (apache-avro writes 8-byte decimals, serde_avro_fast the shortest).
    let fast_reads_apache: OrderPlaced =
        serde_avro_fast::from_datum_slice(&apache_bytes, &fast_schema).expect("fast reads apache");
    assert_eq!(fast_reads_apache, order);
    let apache_reads_fast =
        apache_avro::from_avro_datum(&apache_schema, &mut &fast_bytes[..], None)
            .and_then(|v| apache_avro::from_value::<ApacheOrderPlaced>(&v))
            .expect("apache reads fast");
    assert_eq!(apache_reads_fast.customer_id, order.customer_id);

    let codec = AvroCodec::new(
        Arc::new(LocalRegistry::new()),
        CodecOptions {
            strategy: SubjectNameStrategy::TopicName,
            auto_register: true,
        },
    );
    let framed = futures::executor::block_on(codec.encode("orders", &order)).expect("codec encode");

    let mut g = c.benchmark_group("encode OrderPlaced");
    g.bench_function("serde_json", |b| {
        b.iter(|| serde_json::to_vec(black_box(&order)).expect("json"))
    });
    g.bench_function("apache-avro", |b| {
        b.iter(|| {
            // serde → Value, then resolve (enum symbols, uuid and decimal
            // logical types), as apache-avro's own Writer does.
            let value = apache_avro::to_value(black_box(&twin)).expect("to_value");
            let value = value.resolve(&apache_schema).expect("resolve");
            apache_avro::to_avro_datum(&apache_schema, value).expect("encode")
        })
    });
    g.bench_function("serde_avro_fast", |b| {
        let mut config = serde_avro_fast::ser::SerializerConfig::new(&fast_schema);
        b.iter(|| {
            serde_avro_fast::to_datum(black_box(&order), Vec::with_capacity(256), &mut config)
                .expect("encode")
        })
    });
    g.bench_function("keel codec (framed, cached schema)", |b| {
        // Warm, the async call completes on its first poll: poll it once,
        // as a runtime would, instead of paying for an executor per call.
        b.iter(|| {
            codec
                .encode("orders", black_box(&order))
                .now_or_never()
                .expect("cached schema: ready at once")
                .expect("encode")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("decode OrderPlaced");
    g.bench_function("serde_json", |b| {
        b.iter(|| serde_json::from_slice::<OrderPlaced>(black_box(&json_bytes)).expect("json"))
    });
    g.bench_function("apache-avro", |b| {
        b.iter(|| {
            let value = apache_avro::from_avro_datum(
                &apache_schema,
                &mut black_box(&apache_bytes[..]),
                None,
            )
            .expect("decode");
            apache_avro::from_value::<ApacheOrderPlaced>(&value).expect("from_value")
        })
    });
    g.bench_function("serde_avro_fast", |b| {
        b.iter(|| {
            serde_avro_fast::from_datum_slice::<OrderPlaced>(black_box(&fast_bytes), &fast_schema)
                .expect("decode")
        })
    });
    g.bench_function("keel codec (framed, cached schema)", |b| {
        b.iter(|| {
            codec
                .decode::<OrderPlaced>(black_box(&framed))
                .now_or_never()
                .expect("cached schema: ready at once")
                .expect("decode")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
