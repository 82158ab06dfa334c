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
    let mut changed = false;
    walk(schema, "", &named, &mut filled, &mut changed, 0);
    changed.then_some(filled)
}

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
            (None, Some(ns)) if !ns.is_empty() => (format!("{ns}.{name}"), ns.to_owned()),
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
    changed: &mut bool,
    depth: usize,
) {
    if depth > MAX_DEPTH {
        return;
    }
    let (node, ns) = resolve(schema, namespace, named);
    match (kind(node), value) {
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
                    Some(inner) => walk(t, &ns, named, inner, changed, depth + 1),
                    None => {
                        let Some(default) = field.get("default") else {
                            continue;
                        };
                        // A union's default is of its first branch.
                        let first = match t {
                            Value::Array(branches) => branches.first(),
                            other => Some(other),
                        };
                        let takes_text = first.is_some_and(|b| {
                            matches!(kind(resolve(b, &ns, named).0), "bytes" | "fixed")
                        });
                        if takes_text {
                            continue;
                        }
                        let mut default = default.clone();
                        if let Some(first) = first {
                            walk(first, &ns, named, &mut default, changed, depth + 1);
                        }
                        object.insert(name.to_owned(), default);
                        *changed = true;
                    }
                }
            }
        }
        ("array", Value::Array(items)) => {
            if let Some(t) = node.get("items") {
                for item in items {
                    walk(t, &ns, named, item, changed, depth + 1);
                }
            }
        }
        ("map", Value::Object(entries)) => {
            if let Some(t) = node.get("values") {
                for entry in entries.values_mut() {
                    walk(t, &ns, named, entry, changed, depth + 1);
                }
            }
        }
        ("union", value @ Value::Object(_)) => {
            // The one branch an object can be (a record or a map); with
            // several, which one is the encoder's to decide.
            let Value::Array(branches) = node else {
                return;
            };
            let takes_object: Vec<&Value> = branches
                .iter()
                .filter(|b| matches!(kind(resolve(b, &ns, named).0), "record" | "error" | "map"))
                .collect();
            if let [branch] = takes_object[..] {
                walk(branch, &ns, named, value, changed, depth + 1);
            }
        }
        ("union", value @ Value::Array(_)) => {
            let Value::Array(branches) = node else {
                return;
            };
            let takes_array: Vec<&Value> = branches
                .iter()
                .filter(|b| kind(resolve(b, &ns, named).0) == "array")
                .collect();
            if let [branch] = takes_array[..] {
                walk(branch, &ns, named, value, changed, depth + 1);
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
