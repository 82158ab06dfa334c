//! Checks a JSON value against its schema's logical types before it is
//! encoded (`keel publish`, [`AvroCodec::encode_json`]).
//!
//! The Avro encoder takes a decimal's text and *rescales* it to the
//! schema's scale, rounding `"12.505"` to `12.51` for a `decimal(12,2)`,
//! and never looks at the precision; a `uuid` string is written as any
//! string. A value the schema's type cannot hold exactly is refused here,
//! with the field's path, instead of being changed silently. Decimals are
//! JSON strings, or JSON integers: a JSON number with a fraction is a
//! binary float by the time it is parsed (`0.1` is not one tenth), so it is
//! refused with a hint to quote it.
//!
//! [`AvroCodec::encode_json`]: crate::codec::AvroCodec::encode_json

use std::fmt::Write as _;

use rust_decimal::Decimal as RustDecimal;
use serde_avro_fast::schema::{LogicalType, RegularType, SchemaKey, SchemaMut};
use serde_json::Value;

/// Checks `value` against `schema`'s logical types and JSON kinds. The
/// error names the field (`lines[1].unit_price`) and what is wrong; a
/// top-level value of the wrong kind, and types whose JSON form is not
/// checked here (`duration`), are left to the encoder.
pub(crate) fn check(schema: &SchemaMut, value: &Value) -> Result<(), String> {
    let mut path = String::new();
    let mut memo = Memo::new();
    match walk(schema, schema.root(), value, &mut path, &mut memo) {
        Fit::Bad(reason) => Err(reason),
        Fit::Fits | Fit::OtherKind => Ok(()),
    }
}

/// What a union's branch made of a value, by (branch node, value)
/// address: a branch is walked once per value however many enclosing
/// branches try it (nested unions of records would otherwise walk a deep
/// value once per path through them, 2^depth times).
type Memo = std::collections::HashMap<(usize, usize), Fit>;

#[derive(Clone)]
enum Fit {
    /// The value has the node's JSON kind and, where it has a logical
    /// type, a value that type holds.
    Fits,
    /// The value is of another JSON kind (another union branch may take
    /// it; otherwise the encoder says what it expected).
    OtherKind,
    /// The value has the node's kind but its logical type cannot hold it.
    Bad(String),
}

fn walk(
    schema: &SchemaMut,
    node: &serde_avro_fast::schema::SchemaNode,
    value: &Value,
    path: &mut String,
    memo: &mut Memo,
) -> Fit {
    match (&node.logical_type, &node.type_) {
        (Some(LogicalType::Decimal(decimal)), RegularType::Bytes | RegularType::Fixed(_)) => {
            let checked = match value {
                Value::String(text) => check_decimal(text, decimal.precision, decimal.scale),
                Value::Number(number) if number.is_i64() || number.is_u64() => {
                    check_decimal(&number.to_string(), decimal.precision, decimal.scale)
                }
                // A fraction, an exponent, or more digits than a 64-bit
                // integer: JSON readers take it as a binary float.
                Value::Number(number) => {
                    let text = number.to_string();
                    let as_string = match text.contains(['e', 'E']) {
                        true => "e.g. \"12.50\"".to_owned(),
                        false => format!("\"{text}\""),
                    };
                    Err(format!(
                        "{text} is a JSON number that is not a 64-bit integer (a fraction, an \
                         exponent, or too many digits), which JSON readers take as a binary \
                         float (inexact); write the decimal as a string: {as_string}"
                    ))
                }
                _ => return Fit::OtherKind,
            };
            match checked {
                Ok(()) => Fit::Fits,
                Err(reason) => Fit::Bad(at(path, &reason)),
            }
        }
        (Some(LogicalType::Uuid), RegularType::String) => match value {
            // The hyphenated form only, as other languages' readers (Java's
            // UUID.fromString) take it.
            Value::String(text) if text.len() == 36 && uuid::Uuid::try_parse(text).is_ok() => {
                Fit::Fits
            }
            Value::String(_) => Fit::Bad(at(
                path,
                &format!(
                    "{value} is not a UUID in its hyphenated form \
                     (8-4-4-4-12 hex digits; the schema's logical type is uuid)"
                ),
            )),
            _ => Fit::OtherKind,
        },
        (_, RegularType::Union(union)) => {
            let mut bad = None;
            for variant in &union.variants {
                let branch = node_at(schema, *variant);
                // Whether a value fits never depends on the path; a
                // reason's path could differ (a record names a member `.a`,
                // a map `["a"]`), but a branch is walked again only after
                // an earlier one was bad, and that earlier reason is told.
                let seen = (
                    std::ptr::from_ref(branch) as usize,
                    std::ptr::from_ref(value) as usize,
                );
                let fit = match memo.get(&seen) {
                    Some(fit) => fit.clone(),
                    None => {
                        let fit = walk(schema, branch, value, path, memo);
                        memo.insert(seen, fit.clone());
                        fit
                    }
                };
                match fit {
                    Fit::Fits => return Fit::Fits,
                    Fit::Bad(reason) => {
                        bad.get_or_insert(reason);
                    }
                    Fit::OtherKind => {}
                }
            }
            bad.map_or(Fit::OtherKind, Fit::Bad)
        }
        (_, RegularType::Record(record)) => {
            let Value::Object(fields) = value else {
                return Fit::OtherKind;
            };
            for field in &record.fields {
                if let Some(member) = fields.get(&field.name) {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&field.name);
                    let node = node_at(schema, field.type_);
                    let fit = walk(schema, node, member, path, memo);
                    let fit = named_kind(schema, node, member, path, fit);
                    path.truncate(len);
                    if let Fit::Bad(reason) = fit {
                        return Fit::Bad(reason);
                    }
                }
            }
            Fit::Fits
        }
        (_, RegularType::Enum(e)) => match value {
            Value::String(symbol) if e.symbols.iter().any(|s| s == symbol) => Fit::Fits,
            Value::String(_) => Fit::Bad(at(
                path,
                &format!(
                    "{value} is not one of the enum's symbols ({})",
                    e.symbols.join(", ")
                ),
            )),
            _ => Fit::OtherKind,
        },
        (_, RegularType::Array(array)) => {
            let Value::Array(items) = value else {
                return Fit::OtherKind;
            };
            each(
                schema,
                array.items,
                items.iter().enumerate(),
                path,
                memo,
                |path, i| {
                    let _ = write!(path, "[{i}]");
                },
            )
        }
        (_, RegularType::Map(map)) => {
            let Value::Object(entries) = value else {
                return Fit::OtherKind;
            };
            each(
                schema,
                map.values,
                entries.iter(),
                path,
                memo,
                |path, key| {
                    let _ = write!(path, "[{key:?}]");
                },
            )
        }
        (_, plain) => {
            let fits = match plain {
                RegularType::Null => value.is_null(),
                RegularType::Boolean => value.is_boolean(),
                RegularType::Int | RegularType::Long => value.is_i64() || value.is_u64(),
                RegularType::Float | RegularType::Double => value.is_number(),
                RegularType::Bytes
                | RegularType::String
                | RegularType::Fixed(_)
                | RegularType::Enum(_) => value.is_string(),
                _ => true,
            };
            if fits { Fit::Fits } else { Fit::OtherKind }
        }
    }
}

/// Walks every `(label, value)` of an array or map against `items`.
fn each<'v, L>(
    schema: &SchemaMut,
    items: SchemaKey,
    values: impl Iterator<Item = (L, &'v Value)>,
    path: &mut String,
    memo: &mut Memo,
    label: impl Fn(&mut String, L),
) -> Fit {
    let node = node_at(schema, items);
    for (name, item) in values {
        let len = path.len();
        label(path, name);
        let fit = walk(schema, node, item, path, memo);
        let fit = named_kind(schema, node, item, path, fit);
        path.truncate(len);
        if let Fit::Bad(reason) = fit {
            return Fit::Bad(reason);
        }
    }
    Fit::Fits
}

/// A member of a record, array or map whose JSON kind its type cannot
/// take is refused here, naming it (the encoder's own message names
/// neither the field nor, in words, the type: "Could not serialize str to
/// Int").
fn named_kind(
    schema: &SchemaMut,
    node: &serde_avro_fast::schema::SchemaNode,
    value: &Value,
    path: &str,
    fit: Fit,
) -> Fit {
    // Types whose JSON form this check does not know (a `duration` is an
    // object or array, as `decode_json` writes it): the encoder's to judge.
    if matches!(
        node.logical_type,
        Some(LogicalType::Duration | LogicalType::BigDecimal | LogicalType::Unknown(_))
    ) {
        return fit;
    }
    match fit {
        Fit::OtherKind => Fit::Bad(at(
            path,
            &format!(
                "expected {}, got {}",
                type_name(schema, node, 0),
                kind_of(value)
            ),
        )),
        fit => fit,
    }
}

/// The Avro type of `node` in words (`long`, `null or string`, `record
/// shop.Address`).
fn type_name(
    schema: &SchemaMut,
    node: &serde_avro_fast::schema::SchemaNode,
    depth: usize,
) -> String {
    let logical = match &node.logical_type {
        Some(LogicalType::Decimal(d)) => {
            return format!("a decimal({}, {}) as a string", d.precision, d.scale);
        }
        Some(LogicalType::Uuid) => return "a uuid string".to_owned(),
        Some(LogicalType::TimestampMillis) => " (timestamp-millis: ms since 1970)",
        Some(LogicalType::TimestampMicros) => " (timestamp-micros: µs since 1970)",
        Some(LogicalType::Date) => " (date: days since 1970)",
        _ => "",
    };
    let plain = match &node.type_ {
        RegularType::Null => "null".to_owned(),
        RegularType::Boolean => "boolean".to_owned(),
        RegularType::Int => "int".to_owned(),
        RegularType::Long => "long".to_owned(),
        RegularType::Float => "float".to_owned(),
        RegularType::Double => "double".to_owned(),
        RegularType::Bytes => "bytes (a string)".to_owned(),
        RegularType::String => "string".to_owned(),
        RegularType::Array(_) => "an array".to_owned(),
        RegularType::Map(_) => "a map (an object)".to_owned(),
        RegularType::Record(record) => format!("record {}", record.name.fully_qualified_name()),
        RegularType::Enum(e) => format!(
            "enum {} (one of its symbols, a string)",
            e.name.fully_qualified_name()
        ),
        RegularType::Fixed(f) => format!("fixed {} (a string)", f.name.fully_qualified_name()),
        RegularType::Union(union) if depth == 0 => union
            .variants
            .iter()
            .map(|v| type_name(schema, node_at(schema, *v), depth + 1))
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "a union".to_owned(),
    };
    format!("{plain}{logical}")
}

/// A JSON value's kind in words, with the value when it is short.
fn kind_of(value: &Value) -> String {
    let kind = match value {
        Value::Null => return "null".to_owned(),
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => return "an array".to_owned(),
        Value::Object(_) => return "an object".to_owned(),
    };
    let text = value.to_string();
    if text.chars().count() <= 40 {
        format!("{kind} ({text})")
    } else {
        kind.to_owned()
    }
}

fn node_at(schema: &SchemaMut, key: SchemaKey) -> &serde_avro_fast::schema::SchemaNode {
    // Keys come from the schema's own nodes, so every one resolves.
    schema.get(key).unwrap_or(schema.root())
}

fn at(path: &str, reason: &str) -> String {
    if path.is_empty() {
        reason.to_owned()
    } else {
        format!("field `{path}`: {reason}")
    }
}

/// Whether `text` is a decimal number that `decimal(precision, scale)`
/// holds exactly.
fn check_decimal(text: &str, precision: usize, scale: u32) -> Result<(), String> {
    let malformed = |why: String| {
        format!(
            "{text:?} is not a decimal number ({why}; write digits with an optional sign \
             and point, e.g. \"12.50\", for decimal({precision},{scale}))"
        )
    };
    // rust_decimal reads `1_000` as 1000; JSON users mean no such thing.
    if text.contains('_') {
        return Err(malformed("`_` is not a digit".into()));
    }
    let number = RustDecimal::from_str_exact(text).map_err(|e| malformed(e.to_string()))?;
    let places = number.normalize().scale();
    if places > scale {
        return Err(format!(
            "{text} has {places} decimal places; the schema's decimal({precision},{scale}) \
             keeps {scale}: round it before publishing (nothing is rounded for you)"
        ));
    }
    let whole = number.trunc().abs();
    let digits = if whole.is_zero() {
        0
    } else {
        whole.normalize().to_string().len()
    };
    let allowed = precision.saturating_sub(scale as usize);
    if digits > allowed {
        return Err(format!(
            "{text} has {digits} digits before the point; the schema's \
             decimal({precision},{scale}) allows {allowed}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> SchemaMut {
        r#"{"type": "record", "name": "Order", "fields": [
            {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "total", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
            {"name": "lines", "type": {"type": "array", "items": {"type": "record", "name": "Line", "fields": [
                {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}}
            ]}}},
            {"name": "note", "type": ["null", {"type": "string", "logicalType": "uuid"}], "default": null}
        ]}"#
        .parse()
        .expect("test schema parses")
    }

    fn order(total: Value, price: Value, note: Value) -> Value {
        json!({"id": "0193a5b2-7c1d-7e2f-8a3b-4c5d6e7f8091", "total": total,
               "lines": [{"price": "1.00"}, {"price": price}], "note": note})
    }

    #[test]
    fn nested_unions_of_records_are_walked_once_per_value() {
        // Two record types in a union at every level: without memory of
        // what a branch made of a value, a value 60 levels deep would be
        // walked 2^60 times (the check would never end).
        let schema: SchemaMut = r#"{"type": "record", "name": "A", "fields": [
            {"name": "next", "type": ["null", "A", {"type": "record", "name": "B", "fields": [
                {"name": "next", "type": ["null", "A", "B"]},
                {"name": "d", "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}}
            ]}]},
            {"name": "d", "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}}
        ]}"#
        .parse()
        .expect("test schema parses");
        let mut value = json!({"next": null, "d": "1.005"});
        for _ in 0..60 {
            value = json!({"next": value, "d": "1.00"});
        }
        let e = check(&schema, &value).expect_err("the deepest decimal is refused");
        assert!(e.contains(".next.d`: 1.005 has 3 decimal places"), "{e}");
        *value
            .pointer_mut(&format!("{}/d", "/next".repeat(60)))
            .expect("the deepest") = json!("1.5");
        check(&schema, &value).expect("fits once the deepest decimal does");
    }

    #[test]
    fn an_enum_value_not_among_its_symbols_is_refused_by_field() {
        let schema: SchemaMut = json!({"type": "record", "name": "r", "fields": [
            {"name": "channel", "type": {"type": "enum", "name": "Channel", "symbols": ["WEB", "STORE"]}},
            {"name": "maybe", "type": ["null", "Channel"]},
        ]})
        .to_string()
        .parse()
        .expect("test schema parses");
        check(&schema, &json!({"channel": "WEB", "maybe": "STORE"})).expect("fits");
        let e = check(&schema, &json!({"channel": "NOPE"})).expect_err("refused");
        assert_eq!(
            e,
            "field `channel`: \"NOPE\" is not one of the enum's symbols (WEB, STORE)"
        );
        let e = check(&schema, &json!({"channel": "WEB", "maybe": "NOPE"})).expect_err("refused");
        assert!(e.starts_with("field `maybe`: "), "{e}");
    }

    #[test]
    fn values_the_types_hold_pass() {
        check(&schema(), &order(json!("12.50"), json!(3), Value::Null)).expect("fits");
        for total in [
            "0",
            "-0",
            "+1",
            "-0.01",
            "9999999999.99",
            "12.5",
            "12.500",
            "007.50",
        ] {
            check(&schema(), &order(json!(total), json!("1"), Value::Null))
                .unwrap_or_else(|e| panic!("{total}: {e}"));
        }
        let note = json!("0193a5b2-7c1d-7e2f-8a3b-4c5d6e7f8091");
        check(&schema(), &order(json!("1"), json!("1"), note)).expect("a uuid");
    }

    #[test]
    fn rounding_precision_and_bad_uuids_are_refused_by_field() {
        let refused = |value: Value| check(&schema(), &value).expect_err("refused");
        let e = refused(order(json!("12.505"), json!("1"), Value::Null));
        assert!(
            e.starts_with("field `total`: 12.505 has 3 decimal places"),
            "{e}"
        );
        let e = refused(order(json!("123456789012345.00"), json!("1"), Value::Null));
        assert!(
            e.contains("15 digits before the point") && e.contains("allows 10"),
            "{e}"
        );
        let e = refused(order(json!("1"), json!("10000.00"), Value::Null));
        assert!(e.starts_with("field `lines[1].price`: "), "{e}");
        for bad in ["1e3", "1_000", " 7 ", "", "12.5.0"] {
            let e = refused(order(json!(bad), json!("1"), Value::Null));
            assert!(e.contains("is not a decimal number ("), "{bad}: {e}");
        }
        let e = refused(order(json!("1"), json!(3.5), Value::Null));
        assert!(e.contains("write the decimal as a string: \"3.5\""), "{e}");
        // More digits than an integer holds: no fraction, but a float all
        // the same (it was said to have a fraction).
        let huge: Value =
            serde_json::from_str("123456789012345678901234567890").expect("a JSON number");
        let e = refused(order(json!("1"), huge, Value::Null));
        assert!(
            e.contains("not a 64-bit integer") && e.contains("e.g. \"12.50\""),
            "{e}"
        );
        let e = refused(order(json!("1"), json!(123456), Value::Null));
        assert!(e.contains("6 digits before the point"), "{e}");
        let braced = json!("{0193a5b2-7c1d-7e2f-8a3b-4c5d6e7f8091}");
        let e = refused(order(json!("1"), json!("1"), braced));
        assert!(e.contains("hyphenated form"), "{e}");
        let e = refused(order(json!("1"), json!("1"), json!("o-1")));
        assert!(e.starts_with("field `note`: \"o-1\" is not a UUID"), "{e}");
        let mut value = order(json!("1"), json!("1"), Value::Null);
        value["id"] = json!("o-1");
        assert!(refused(value).starts_with("field `id`: "));
    }

    #[test]
    fn members_of_another_kind_are_refused_by_field_and_type() {
        let refused = |value: Value| check(&schema(), &value).expect_err("refused");
        let e = refused(order(json!(true), json!("1"), Value::Null));
        assert_eq!(
            e,
            "field `total`: expected a decimal(12, 2) as a string, got a boolean (true)"
        );
        let e = refused(order(json!("1"), json!("1"), json!(7)));
        assert_eq!(
            e,
            "field `note`: expected null or a uuid string, got a number (7)"
        );
        let mut value = order(json!("1"), json!("1"), Value::Null);
        value["lines"][1] = json!("x");
        assert_eq!(
            refused(value),
            "field `lines[1]`: expected record Line, got a string (\"x\")"
        );
        // A value that is not a record at all is the encoder's to name.
        check(&schema(), &json!(5)).expect("left to the encoder");
        // So is a duration: an object or array, as decode_json writes it.
        let with_duration: SchemaMut = r#"{"type": "record", "name": "D", "fields": [
            {"name": "d", "type": {"type": "fixed", "name": "F", "size": 12,
                                   "logicalType": "duration"}}]}"#
            .parse()
            .expect("test schema parses");
        check(
            &with_duration,
            &json!({"d": {"months": 1, "days": 2, "milliseconds": 3}}),
        )
        .expect("left to the encoder");
    }
}
