//! Each Rust event type's derived schema is exactly its `.avsc` file:
//! names, namespaces, docs, logical types, defaults.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use apache_avro::{AvroSchema, Schema};
use keel_schemas::domain::avsc;
use keel_schemas::events::*;
use serde_json::{Map, Value};

/// Replaces references to the named types of `deps` with their definitions
/// at first use, as the derive writes them.
fn inline(schema: &mut Value, deps: &[Value], defined: &mut Vec<String>) {
    match schema {
        Value::String(name) => {
            if let Some(dep) = deps.iter().find(|d| full_name(d) == *name)
                && !defined.contains(name)
            {
                defined.push(name.clone());
                *schema = dep.clone();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| inline(i, deps, defined)),
        Value::Object(map) => {
            if let Some(Value::String(_)) = map.get("namespace") {
                defined.push(full_name(&Value::Object(map.clone())));
            }
            for key in ["type", "items", "values", "fields"] {
                if let Some(v) = map.get_mut(key) {
                    inline(v, deps, defined);
                }
            }
        }
        _ => {}
    }
}

fn full_name(v: &Value) -> String {
    let name = v["name"].as_str().unwrap_or_default();
    match v.get("namespace").and_then(Value::as_str) {
        Some(ns) if !name.contains('.') => format!("{ns}.{name}"),
        _ => name.to_owned(),
    }
}

fn from_file(file: &str) -> Schema {
    let address: Value = serde_json::from_str(avsc("shop.common.Address.avsc").unwrap()).unwrap();
    let mut schema: Value = serde_json::from_str(avsc(file).unwrap()).unwrap();
    inline(&mut schema, &[address], &mut Vec::new());
    Schema::parse(&schema).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn normalized(schema: &Schema) -> Value {
    let mut v = serde_json::to_value(schema).unwrap();
    sort_keys(&mut v);
    v
}

fn sort_keys(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let sorted: Map<String, Value> = std::mem::take(map)
                .into_iter()
                .map(|(k, mut v)| {
                    sort_keys(&mut v);
                    (k, v)
                })
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_iter()
                .collect();
            *map = sorted;
        }
        Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

/// Every doc string with where it sits (the JSON form above drops field
/// and enum docs).
fn docs(schema: &Schema, at: &str, out: &mut Vec<(String, Option<String>)>) {
    match schema {
        Schema::Record(r) => {
            out.push((format!("{at}{}", r.name), r.doc.clone()));
            for f in &r.fields {
                out.push((format!("{at}{}.{}", r.name, f.name), f.doc.clone()));
                docs(&f.schema, &format!("{at}{}.{}/", r.name, f.name), out);
            }
        }
        Schema::Enum(e) => out.push((format!("{at}{}", e.name), e.doc.clone())),
        Schema::Array(a) => docs(&a.items, at, out),
        Schema::Map(m) => docs(&m.types, at, out),
        Schema::Union(u) => u.variants().iter().for_each(|v| docs(v, at, out)),
        _ => {}
    }
}

fn all_docs(schema: &Schema) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    docs(schema, "", &mut out);
    out
}

fn assert_matches<T: AvroSchema>(file: &str) {
    let derived = normalized(&T::get_schema());
    let parsed = from_file(file);
    let expected = normalized(&parsed);
    let expected_docs = all_docs(&parsed);
    // Docs must be complete in the file, and the same in the type.
    assert!(
        expected_docs.iter().all(|(_, d)| d.is_some()),
        "{file}: missing docs {expected_docs:?}"
    );
    assert_eq!(
        all_docs(&T::get_schema()),
        expected_docs,
        "{file}: docs differ"
    );
    assert_eq!(
        derived,
        expected,
        "{file} and {} differ:\nderived: {}\nfile:    {}",
        std::any::type_name::<T>(),
        serde_json::to_string(&derived).unwrap(),
        serde_json::to_string(&expected).unwrap()
    );
}

#[test]
fn every_type_matches_its_avsc() {
    assert_matches::<Address>("shop.common.Address.avsc");
    assert_matches::<OrderPlaced>("shop.orders.OrderPlaced.avsc");
    assert_matches::<OrderPlacedV1>("shop.orders.OrderPlaced.v1.avsc");
    assert_matches::<OrderCancelled>("shop.orders.OrderCancelled.avsc");
    assert_matches::<PaymentCaptured>("shop.payments.PaymentCaptured.avsc");
    assert_matches::<PaymentFailed>("shop.payments.PaymentFailed.avsc");
    assert_matches::<ShipmentDispatched>("shop.shipping.ShipmentDispatched.avsc");
}

#[test]
fn full_names_match_the_schemas() {
    fn name<T: Event>() -> (String, &'static str) {
        (T::get_schema().name().unwrap().fullname(None), T::FULL_NAME)
    }
    for (schema, constant) in [
        name::<OrderPlaced>(),
        name::<OrderPlacedV1>(),
        name::<OrderCancelled>(),
        name::<PaymentCaptured>(),
        name::<PaymentFailed>(),
        name::<ShipmentDispatched>(),
    ] {
        assert_eq!(schema, constant);
    }
}
