//! Fills a JSON value's missing record fields with their schema defaults
//! before it is encoded (`keel publish`, [`AvroCodec::encode_json`]), as an
//! Avro reader fills fields its writer did not know: a line written for an
//! older version of a record publishes under the newer one that added
//! fields with defaults.
//!
//! Defaults of `bytes` and `fixed` fields (decimals among them) are left
//! out: Avro writes them as ISO-8859-1 text, while `keel publish` takes a
//! decimal as its decimal text, so such a field must be given.
//!
//! [`AvroCodec::encode_json`]: crate::codec::AvroCodec::encode_json

use std::collections::HashMap;

use serde_json::{Map, Value};

/// `value` with every record's missing fields that have a default set to
/// it, walking `schema` (the schema's JSON); `None` when nothing was
/// missing (the value is used as it is).
pub(crate) fn fill(schema: &Value, value: &Value) -> Option<Value> {
    let mut named = HashMap::new();
    collect(schema, "", &mut named);
    let mut filled = value.clone();
    let mut state = State::default();
    walk(schema, "", &named, &mut filled, &mut state, 0);
    state.changed.then_some(filled)
}

#[derive(Default)]
struct State {
    /// Something was filled in (or a number made a float).
    changed: bool,
    /// Defaults filled in so far.
    filled: usize,
}

/// Most defaults filled into one value: a recursive record whose fields
/// default to records of its own type would otherwise grow a tree of
/// 2^depth defaults (past it, fields stay missing and the encoder names
/// the first).
const MAX_FILLED: usize = 1_000;

/// Deepest schema nesting walked (recursive records end at their data;
/// this bounds a hostile schema's).
const MAX_DEPTH: usize = 64;

/// A named type's full name and the namespace it sets for what it holds,
/// with `outer` the namespace in force around it.
fn naming(node: &Map<String, Value>, outer: &str) -> Option<(String, String)> {
    let name = node.get("name").and_then(Value::as_str)?;
    Some(
        match (
            name.rfind('.'),
            node.get("namespace").and_then(Value::as_str),
        ) {
            (Some(dot), _) => (name.to_owned(), name[..dot].to_owned()),
            // `"namespace": ""` is the null namespace.
            (None, Some("")) => (name.to_owned(), String::new()),
            (None, Some(ns)) => (format!("{ns}.{name}"), ns.to_owned()),
            _ if outer.is_empty() => (name.to_owned(), String::new()),
            _ => (format!("{outer}.{name}"), outer.to_owned()),
        },
    )
}

/// Every named type of `schema` by full name, with its namespace.
fn collect<'s>(
    schema: &'s Value,
    namespace: &str,
    named: &mut HashMap<String, (&'s Value, String)>,
) {
    match schema {
        Value::Array(branches) => {
            for branch in branches {
                collect(branch, namespace, named);
            }
        }
        Value::Object(node) => {
            let inner = match naming(node, namespace) {
                Some((full, inner)) => {
                    named.insert(full, (schema, inner.clone()));
                    inner
                }
                None => namespace.to_owned(),
            };
            for key in ["items", "values"] {
                if let Some(child) = node.get(key) {
                    collect(child, &inner, named);
                }
            }
            if let Some(Value::Array(fields)) = node.get("fields") {
                for field in fields {
                    if let Some(t) = field.get("type") {
                        collect(t, &inner, named);
                    }
                }
            }
            if let Some(t @ (Value::Object(_) | Value::Array(_))) = node.get("type") {
                collect(t, &inner, named);
            }
        }
        _ => {}
    }
}

/// The schema node `schema` stands for (a name is looked up) and the
/// namespace inside it.
fn resolve<'s>(
    schema: &'s Value,
    namespace: &str,
    named: &HashMap<String, (&'s Value, String)>,
) -> (&'s Value, String) {
    match schema {
        Value::String(name) => {
            let full = if name.contains('.') || namespace.is_empty() {
                name.clone()
            } else {
                format!("{namespace}.{name}")
            };
            named.get(&full).or_else(|| named.get(name)).map_or_else(
                || (schema, namespace.to_owned()),
                |(n, ns)| (*n, ns.clone()),
            )
        }
        Value::Object(node) => match node.get("type") {
            // `{"type": "string", …}`, or a name wrapped so.
            Some(t @ Value::String(name))
                if !matches!(
                    name.as_str(),
                    "record" | "error" | "enum" | "fixed" | "array" | "map"
                ) =>
            {
                let (inner, ns) = resolve(t, namespace, named);
                if std::ptr::eq(inner, t) {
                    (schema, ns)
                } else {
                    (inner, ns)
                }
            }
            _ => {
                let ns = naming(node, namespace).map_or_else(|| namespace.to_owned(), |(_, ns)| ns);
                (schema, ns)
            }
        },
        _ => (schema, namespace.to_owned()),
    }
}

/// Whether a value of `schema` holds `bytes` or `fixed` anywhere.
fn holds_bytes<'s>(
    schema: &'s Value,
    namespace: &str,
    named: &HashMap<String, (&'s Value, String)>,
    seen: &mut Vec<*const Value>,
    depth: usize,
) -> bool {
    let (node, ns) = resolve(schema, namespace, named);
    if depth > MAX_DEPTH || seen.contains(&std::ptr::from_ref(node)) {
        return false;
    }
    seen.push(std::ptr::from_ref(node));
    let mut inner = |t: &'s Value| holds_bytes(t, &ns, named, seen, depth + 1);
    match kind(node) {
        "bytes" | "fixed" => true,
        "record" | "error" => match node.get("fields") {
            Some(Value::Array(fields)) => {
                fields.iter().filter_map(|f| f.get("type")).any(&mut inner)
            }
            _ => false,
        },
        "array" => node.get("items").is_some_and(&mut inner),
        "map" => node.get("values").is_some_and(&mut inner),
        "union" => match node {
            Value::Array(branches) => branches.iter().any(inner),
            _ => false,
        },
        _ => false,
    }
}

/// The primitive or complex type name of a resolved node.
fn kind(node: &Value) -> &str {
    match node {
        Value::String(t) => t,
        Value::Object(o) => o.get("type").and_then(Value::as_str).unwrap_or(""),
        Value::Array(_) => "union",
        _ => "",
    }
}

fn walk(
    schema: &Value,
    namespace: &str,
    named: &HashMap<String, (&Value, String)>,
    value: &mut Value,
    state: &mut State,
    depth: usize,
) {
    if depth > MAX_DEPTH {
        return;
    }
    let (node, ns) = resolve(schema, namespace, named);
    match (kind(node), &mut *value) {
        ("record" | "error", Value::Object(object)) => {
            let Some(Value::Array(fields)) = node.get("fields") else {
                return;
            };
            for field in fields {
                let (Some(name), Some(t)) =
                    (field.get("name").and_then(Value::as_str), field.get("type"))
                else {
                    continue;
                };
                match object.get_mut(name) {
                    Some(inner) => walk(t, &ns, named, inner, state, depth + 1),
                    None => {
                        let Some(default) = field.get("default") else {
                            continue;
                        };
                        // A union's default is of its first branch.
                        let first = match t {
                            Value::Array(branches) => branches.first(),
                            other => Some(other),
                        };
                        // Avro writes bytes defaults as ISO-8859-1 text,
                        // not the decimal text (or UTF-8) taken here.
                        let takes_text = first
                            .is_some_and(|b| holds_bytes(b, &ns, named, &mut Vec::new(), depth));
                        if takes_text || state.filled >= MAX_FILLED {
                            continue;
                        }
                        state.filled += 1;
                        let mut default = default.clone();
                        if let Some(first) = first {
                            walk(first, &ns, named, &mut default, state, depth + 1);
                        }
                        object.insert(name.to_owned(), default);
                        state.changed = true;
                    }
                }
            }
        }
        // JSON integers for floats (`0` as a double's default, `3` for a
        // price): the encoder takes only floats there.
        ("float" | "double", Value::Number(n)) if !n.is_f64() => {
            if let Some(float) = n.as_f64().and_then(serde_json::Number::from_f64) {
                *value = Value::Number(float);
                state.changed = true;
            }
        }
        ("array", Value::Array(items)) => {
            if let Some(t) = node.get("items") {
                for item in items {
                    walk(t, &ns, named, item, state, depth + 1);
                }
            }
        }
        ("map", Value::Object(entries)) => {
            if let Some(t) = node.get("values") {
                for entry in entries.values_mut() {
                    walk(t, &ns, named, entry, state, depth + 1);
                }
            }
        }
        ("union", value) => {
            // The one branch of the value's JSON kind (a record or map for
            // an object, an array, a number); with several, which one is
            // the encoder's to decide.
            let Value::Array(branches) = node else {
                return;
            };
            let takes: &[&str] = match value {
                Value::Object(_) => &["record", "error", "map"],
                Value::Array(_) => &["array"],
                Value::Number(_) => &["int", "long", "float", "double"],
                _ => return,
            };
            let mut of_kind = branches
                .iter()
                .filter(|b| takes.contains(&kind(resolve(b, &ns, named).0)));
            if let (Some(branch), None) = (of_kind.next(), of_kind.next()) {
                walk(branch, &ns, named, value, state, depth + 1);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({
            "type": "record", "name": "Order", "namespace": "shop",
            "fields": [
                {"name": "id", "type": "string"},
                {"name": "gift", "type": "boolean", "default": false},
                {"name": "coupon", "type": ["null", "string"], "default": null},
                {"name": "price", "type": {"type": "bytes", "logicalType": "decimal",
                    "precision": 6, "scale": 2}, "default": "\u{0}"},
                {"name": "address", "type": {"type": "record", "name": "Address",
                    "namespace": "shop.common", "fields": [
                        {"name": "city", "type": "string"},
                        {"name": "line2", "type": ["null", "string"], "default": null}]}},
                {"name": "lines", "type": {"type": "array", "items": {
                    "type": "record", "name": "Line", "fields": [
                        {"name": "sku", "type": "string"},
                        {"name": "qty", "type": "int", "default": 1}]}}},
                {"name": "billing", "type": ["null", "shop.common.Address"], "default": null},
                {"name": "first_line", "type": ["null", "Line"], "default": null}
            ]
        })
    }

    #[test]
    fn missing_fields_with_defaults_are_filled_at_every_depth() {
        let value = json!({
            "id": "o1",
            "address": {"city": "Oslo"},
            "lines": [{"sku": "a"}, {"sku": "b", "qty": 3}],
            "billing": {"city": "Bergen"},
            "first_line": {"sku": "c"}
        });
        let filled = fill(&schema(), &value).unwrap();
        assert_eq!(
            filled,
            json!({
                "id": "o1",
                "gift": false,
                "coupon": null,
                "address": {"city": "Oslo", "line2": null},
                "lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 3}],
                "billing": {"city": "Bergen", "line2": null},
                "first_line": {"sku": "c", "qty": 1}
            }),
            "a decimal's default (bytes text) is not filled in"
        );
    }

    #[test]
    fn a_recursive_default_fills_a_bounded_number_of_fields() {
        // Each N defaults to an N with two more fields to fill.
        let schema = json!({"type": "record", "name": "N", "fields": [
            {"name": "a", "type": "N", "default": {}},
            {"name": "b", "type": "N", "default": {}}]});
        let filled = fill(&schema, &json!({})).unwrap();
        let mut count = 0;
        let mut stack = vec![&filled];
        while let Some(Value::Object(o)) = stack.pop() {
            count += 1;
            stack.extend(o.values());
        }
        assert!(count <= MAX_FILLED + 1, "{count}");
    }

    #[test]
    fn floats_take_integers_and_defaults_holding_bytes_are_left_out() {
        let schema = json!({"type": "record", "name": "R", "namespace": "", "fields": [
            {"name": "discount", "type": "double", "default": 0},
            {"name": "rate", "type": ["float", "null"], "default": 1},
            {"name": "price", "type": "double"},
            {"name": "tip", "type": ["null", "double"]},
            {"name": "count", "type": ["null", "long", "double"]},
            {"name": "money", "type": {"type": "record", "name": "M", "fields": [
                {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal",
                    "precision": 6, "scale": 2}}]},
             "default": {"amount": "\u{0}"}},
            {"name": "blobs", "type": {"type": "array", "items": "bytes"}, "default": []}
        ]});
        let filled = fill(&schema, &json!({"price": 3, "tip": 2, "count": 5})).unwrap();
        assert_eq!(
            filled,
            json!({"discount": 0.0, "rate": 1.0, "price": 3.0, "tip": 2.0, "count": 5})
        );
        assert!(filled["discount"].is_f64() && filled["price"].is_f64());
        assert!(filled["tip"].is_f64() && filled["count"].is_i64());
    }

    #[test]
    fn an_empty_namespace_is_the_null_namespace() {
        let schema = json!({"type": "record", "name": "Outer", "namespace": "shop",
        "fields": [
            {"name": "inner", "type": {"type": "record", "name": "X", "namespace": "",
                "fields": [{"name": "y", "type": "Y"}, {"name": "z", "type": "int", "default": 1}]}},
            {"name": "shop_x", "type": {"type": "record", "name": "Y",
                "fields": [{"name": "w", "type": "int", "default": 2}]}}
        ]});
        // `Y` inside X (null namespace) is not shop.Y: nothing is filled there.
        let filled = fill(&schema, &json!({"inner": {"y": {}}, "shop_x": {}})).unwrap();
        assert_eq!(
            filled,
            json!({"inner": {"y": {}, "z": 1}, "shop_x": {"w": 2}})
        );
    }

    #[test]
    fn a_complete_value_or_one_of_another_kind_is_left_alone() {
        let complete = json!({
            "id": "o1", "gift": true, "coupon": "X", "price": "1.00",
            "address": {"city": "Oslo", "line2": "c/o"}, "lines": [],
            "billing": null, "first_line": null
        });
        assert_eq!(fill(&schema(), &complete), None);
        assert_eq!(fill(&schema(), &json!("not a record")), None);
        assert_eq!(
            fill(&schema(), &json!({"lines": 5})).unwrap()["gift"],
            false
        );
    }
}
