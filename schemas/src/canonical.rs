//! Resolving and normalizing schema documents.
//!
//! A registered schema may refer to named types defined in other subjects
//! (`references`). [`resolve`] turns a document plus its references into one
//! self-contained schema in a normal form: full names everywhere, each named
//! type defined at its first use and referenced by full name after, `{"type":
//! "string"}` collapsed to `"string"`, docs and custom properties dropped,
//! keys sorted. Everything that changes how data is written or resolved
//! (names, aliases, field order, defaults, symbols, sizes, logical types) is
//! kept. Two documents that resolve to the same normal form are the same
//! schema for registration and lookup, whatever their whitespace, key order,
//! docs or use of references.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Map, Value};

use crate::error::{Result, SchemaError};

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Bounds nesting so hostile documents cannot overflow the stack.
const MAX_DEPTH: usize = 64;

/// Named types from references: full name → definition (JSON).
pub type References = HashMap<String, Value>;

/// The self-contained normal form of `schema` (see the module docs).
pub fn resolve(schema: &Value, references: &References) -> Result<Value> {
    resolve_with_usage(schema, references).map(|(resolved, _)| resolved)
}

/// Like [`resolve`], also naming the types taken from `references` (in
/// order of first use): what a registration must list as references.
pub fn resolve_with_usage(schema: &Value, references: &References) -> Result<(Value, Vec<String>)> {
    let mut walker = Walker {
        references,
        defined: HashSet::new(),
        used: Vec::new(),
        in_reference: 0,
        defined_by_references: HashSet::new(),
    };
    let resolved = walker.walk(schema, "", 0)?;
    // apache-avro checks what the walk does not: defaults against types,
    // duplicate names, valid identifiers.
    apache_avro::Schema::parse(&resolved).map_err(|e| SchemaError::InvalidSchema(e.to_string()))?;
    Ok((resolved, walker.used))
}

/// Parses `text` and resolves it: the registry's normal form as a string.
pub fn normal_form(text: &str, references: &References) -> Result<String> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| SchemaError::InvalidSchema(format!("not JSON: {e}")))?;
    Ok(resolve(&value, references)?.to_string())
}

/// The named types a document defines (full name → definition), so that
/// another document can reference them.
pub fn named_types(schema: &Value) -> Result<References> {
    let mut out = References::new();
    collect_named(schema, "", &mut out, 0)?;
    Ok(out)
}

struct Walker<'r> {
    references: &'r References,
    defined: HashSet<String>,
    /// Names taken from `references`, in order of first use.
    used: Vec<String>,
    /// How many referenced definitions the walk is inside.
    in_reference: usize,
    /// Types defined from inside a referenced definition.
    defined_by_references: HashSet<String>,
}

fn invalid(msg: impl Into<String>) -> SchemaError {
    SchemaError::InvalidSchema(msg.into())
}

/// The full name of `name` in `namespace` (Avro's rules: a dotted name is
/// already full; otherwise the namespace applies).
fn full_name(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}.{name}")
    }
}

fn namespace_of(full: &str) -> &str {
    full.rsplit_once('.').map_or("", |(ns, _)| ns)
}

impl Walker<'_> {
    fn walk(&mut self, v: &Value, ns: &str, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!(
                "schema nests deeper than {MAX_DEPTH} levels"
            )));
        }
        match v {
            Value::String(name) => self.reference(name, ns, depth),
            Value::Array(branches) => branches
                .iter()
                .map(|b| self.walk(b, ns, depth + 1))
                .collect::<Result<Vec<_>>>()
                .map(Value::Array),
            Value::Object(map) => self.complex(map, ns, depth),
            other => Err(invalid(format!("`{other}` is not a schema"))),
        }
    }

    fn reference(&mut self, name: &str, ns: &str, depth: usize) -> Result<Value> {
        if PRIMITIVES.contains(&name) {
            return Ok(Value::String(name.to_owned()));
        }
        let qualified = full_name(name, ns);
        let full = if self.defined.contains(&qualified) || self.references.contains_key(&qualified)
        {
            qualified
        } else if self.defined.contains(name) || self.references.contains_key(name) {
            name.to_owned()
        } else {
            return Err(invalid(format!(
                "unknown type `{qualified}`: not defined before use and not in the schema's references"
            )));
        };
        if self.defined.contains(&full) {
            return Ok(Value::String(full));
        }
        let definition = self.references[&full].clone();
        self.used.push(full.clone());
        // The reference's own namespace applies inside its definition.
        self.in_reference += 1;
        let resolved = self.walk(&definition, namespace_of(&full), depth + 1);
        self.in_reference -= 1;
        resolved
    }

    fn complex(&mut self, map: &Map<String, Value>, ns: &str, depth: usize) -> Result<Value> {
        let ty = map
            .get("type")
            .ok_or_else(|| invalid("a schema object needs a `type`"))?;
        let Value::String(ty) = ty else {
            // `{"type": {...}}` or `{"type": [...]}`: a wrapped schema.
            return self.walk(ty, ns, depth + 1);
        };
        let mut out = BTreeMap::new();
        match ty.as_str() {
            "record" | "error" | "enum" | "fixed" => {
                let name = map
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid(format!("a `{ty}` needs a string `name`")))?;
                let own_ns = map.get("namespace").and_then(Value::as_str).unwrap_or(ns);
                let full = full_name(name, own_ns);
                if !self.defined.insert(full.clone()) {
                    // A referenced type nesting another referenced type the
                    // schema already used by name: that one is defined
                    // (inlined from the references) already, and is
                    // referred to here. A type the schema defined itself
                    // is not replaced this way.
                    if self.in_reference > 0 && self.defined_by_references.contains(&full) {
                        return Ok(Value::String(full));
                    }
                    return Err(invalid(format!("type `{full}` is defined twice")));
                }
                if self.in_reference > 0 {
                    self.defined_by_references.insert(full.clone());
                }
                let inner_ns = namespace_of(&full).to_owned();
                out.insert("type".into(), Value::String(ty.clone()));
                out.insert("name".into(), Value::String(full));
                if let Some(aliases) = map.get("aliases") {
                    out.insert("aliases".into(), qualify_aliases(aliases, &inner_ns)?);
                }
                match ty.as_str() {
                    "record" | "error" => {
                        let fields =
                            map.get("fields").and_then(Value::as_array).ok_or_else(|| {
                                invalid(format!("record `{name}` needs a `fields` array"))
                            })?;
                        let fields = fields
                            .iter()
                            .map(|f| self.field(f, &inner_ns, depth))
                            .collect::<Result<Vec<_>>>()?;
                        out.insert("fields".into(), Value::Array(fields));
                    }
                    "enum" => {
                        let symbols = map
                            .get("symbols")
                            .ok_or_else(|| invalid(format!("enum `{name}` needs `symbols`")))?;
                        out.insert("symbols".into(), symbols.clone());
                        if let Some(default) = map.get("default") {
                            out.insert("default".into(), default.clone());
                        }
                    }
                    _ => {
                        let size = map
                            .get("size")
                            .ok_or_else(|| invalid(format!("fixed `{name}` needs a `size`")))?;
                        out.insert("size".into(), size.clone());
                        keep_logical(map, &mut out);
                    }
                }
            }
            "array" => {
                let items = map
                    .get("items")
                    .ok_or_else(|| invalid("an array needs `items`"))?;
                out.insert("type".into(), Value::String("array".into()));
                out.insert("items".into(), self.walk(items, ns, depth + 1)?);
            }
            "map" => {
                let values = map
                    .get("values")
                    .ok_or_else(|| invalid("a map needs `values`"))?;
                out.insert("type".into(), Value::String("map".into()));
                out.insert("values".into(), self.walk(values, ns, depth + 1)?);
            }
            primitive if PRIMITIVES.contains(&primitive) => {
                if !map.contains_key("logicalType") {
                    return Ok(Value::String(primitive.to_owned()));
                }
                out.insert("type".into(), Value::String(primitive.to_owned()));
                keep_logical(map, &mut out);
            }
            // A named type used as `{"type": "shop.common.Address"}`.
            other => return self.reference(other, ns, depth + 1),
        }
        Ok(Value::Object(out.into_iter().collect()))
    }

    fn field(&mut self, f: &Value, ns: &str, depth: usize) -> Result<Value> {
        let f = f
            .as_object()
            .ok_or_else(|| invalid("a record field must be an object"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("a record field needs a string `name`"))?;
        let ty = f
            .get("type")
            .ok_or_else(|| invalid(format!("field `{name}` needs a `type`")))?;
        let mut out = BTreeMap::new();
        out.insert("name".to_owned(), Value::String(name.to_owned()));
        out.insert("type".to_owned(), self.walk(ty, ns, depth + 1)?);
        for key in ["default", "aliases", "order"] {
            if let Some(v) = f.get(key) {
                out.insert(key.to_owned(), v.clone());
            }
        }
        Ok(Value::Object(out.into_iter().collect()))
    }
}

fn keep_logical(map: &Map<String, Value>, out: &mut BTreeMap<String, Value>) {
    for key in ["logicalType", "precision", "scale"] {
        if let Some(v) = map.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
}

fn qualify_aliases(aliases: &Value, ns: &str) -> Result<Value> {
    let aliases = aliases
        .as_array()
        .ok_or_else(|| invalid("`aliases` must be an array of names"))?;
    aliases
        .iter()
        .map(|a| {
            a.as_str()
                .map(|a| Value::String(full_name(a, ns)))
                .ok_or_else(|| invalid("an alias must be a string"))
        })
        .collect::<Result<Vec<_>>>()
        .map(Value::Array)
}

fn collect_named(v: &Value, ns: &str, out: &mut References, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(invalid(format!(
            "schema nests deeper than {MAX_DEPTH} levels"
        )));
    }
    match v {
        Value::Array(branches) => {
            for b in branches {
                collect_named(b, ns, out, depth + 1)?;
            }
        }
        Value::Object(map) => {
            let ty = map.get("type").and_then(Value::as_str).unwrap_or_default();
            let mut inner_ns = ns.to_owned();
            if matches!(ty, "record" | "error" | "enum" | "fixed")
                && let Some(name) = map.get("name").and_then(Value::as_str)
            {
                let own_ns = map.get("namespace").and_then(Value::as_str).unwrap_or(ns);
                let full = full_name(name, own_ns);
                inner_ns = namespace_of(&full).to_owned();
                // The definition keeps its own namespace explicitly so it
                // can be inlined anywhere.
                let mut definition = map.clone();
                definition.insert("name".into(), Value::String(full.clone()));
                definition.remove("namespace");
                out.insert(full, Value::Object(definition));
            }
            if let Some(fields) = map.get("fields").and_then(Value::as_array) {
                for f in fields {
                    if let Some(t) = f.get("type") {
                        collect_named(t, &inner_ns, out, depth + 1)?;
                    }
                }
            }
            for key in ["items", "values"] {
                if let Some(t) = map.get(key) {
                    collect_named(t, &inner_ns, out, depth + 1)?;
                }
            }
            if let Some(t @ (Value::Object(_) | Value::Array(_))) = map.get("type") {
                collect_named(t, &inner_ns, out, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::avsc;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn a_referenced_type_nested_in_another_may_be_used_before_it() {
        let outer = json!({"type": "record", "namespace": "a", "name": "Outer", "fields": [
            {"name": "i", "type": {"type": "record", "name": "Inner",
                                   "fields": [{"name": "x", "type": "int"}]}}]});
        let refs = named_types(&outer).unwrap();
        let inner_first = json!({"type": "record", "name": "B", "fields": [
            {"name": "p", "type": "a.Inner"}, {"name": "q", "type": "a.Outer"}]});
        let resolved = resolve(&inner_first, &refs).unwrap();
        let fields = &resolved["fields"];
        assert_eq!(fields[0]["type"]["name"], "a.Inner", "{resolved}");
        assert_eq!(
            fields[1]["type"]["fields"][0]["type"], "a.Inner",
            "{resolved}"
        );
        // The other order worked already; a schema of its own defining a
        // type twice is still refused.
        let outer_first = json!({"type": "record", "name": "B", "fields": [
            {"name": "q", "type": "a.Outer"}, {"name": "p", "type": "a.Inner"}]});
        assert!(resolve(&outer_first, &refs).is_ok());
        let twice = json!({"type": "record", "name": "C", "fields": [
            {"name": "p", "type": {"type": "fixed", "name": "F", "size": 2}},
            {"name": "q", "type": {"type": "fixed", "name": "F", "size": 2}}]});
        assert!(resolve(&twice, &References::new()).is_err());
        // The schema's own a.Inner, then the referenced Outer nesting the
        // referenced a.Inner: two definitions, refused as before.
        let own_inner = json!({"type": "record", "name": "D", "fields": [
            {"name": "p", "type": {"type": "record", "name": "Inner", "namespace": "a",
                                   "fields": [{"name": "y", "type": "long"}]}},
            {"name": "q", "type": "a.Outer"}]});
        assert!(resolve(&own_inner, &refs).is_err());
    }

    #[test]
    fn whitespace_order_docs_and_wrapping_do_not_matter() {
        let a = json!({"type": "record", "name": "E", "namespace": "n", "doc": "x",
            "fields": [{"name": "f", "type": {"type": "string"}, "doc": "y"}]});
        let b =
            json!({"fields": [{"type": "string", "name": "f"}], "name": "n.E", "type": "record"});
        assert_eq!(
            resolve(&a, &References::new()).unwrap(),
            resolve(&b, &References::new()).unwrap()
        );
        let c =
            json!({"type": "record", "name": "n.E", "fields": [{"name": "f", "type": "bytes"}]});
        assert_ne!(
            resolve(&a, &References::new()).unwrap(),
            resolve(&c, &References::new()).unwrap()
        );
    }

    #[test]
    fn logical_types_and_defaults_are_kept() {
        let a = json!({"type": "record", "name": "E", "fields": [
            {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "o", "type": ["null", "string"], "default": null}]});
        let r = resolve(&a, &References::new()).unwrap();
        assert_eq!(r["fields"][0]["type"]["logicalType"], "timestamp-millis");
        assert_eq!(r["fields"][1]["default"], Value::Null);
    }

    #[test]
    fn references_inline_at_first_use_and_equal_the_inline_document() {
        let address = parse(avsc("shop.common.Address.avsc").unwrap());
        let refs = named_types(&address).unwrap();
        assert!(refs.contains_key("shop.common.Address"));
        let shipped = parse(avsc("shop.shipping.ShipmentDispatched.avsc").unwrap());
        let by_reference = resolve(&shipped, &refs).unwrap();
        // The same schema written with the address inline.
        let mut inline = shipped.clone();
        inline["fields"][5]["type"] = address;
        assert_eq!(by_reference, resolve(&inline, &References::new()).unwrap());
        let err = resolve(&shipped, &References::new()).unwrap_err();
        assert!(err.to_string().contains("shop.common.Address"), "{err}");
    }

    #[test]
    fn names_resolve_by_namespace_and_are_defined_once() {
        let s = json!({"type": "record", "name": "a.R", "fields": [
            {"name": "x", "type": {"type": "fixed", "name": "F", "size": 4}},
            {"name": "y", "type": "F"},
            {"name": "z", "type": "a.F"}]});
        let r = resolve(&s, &References::new()).unwrap();
        assert_eq!(r["fields"][0]["type"]["name"], "a.F");
        assert_eq!(r["fields"][1]["type"], "a.F");
        assert_eq!(r["fields"][2]["type"], "a.F");
        let twice = json!({"type": "record", "name": "R", "fields": [
            {"name": "x", "type": {"type": "enum", "name": "E", "symbols": ["A"]}},
            {"name": "y", "type": {"type": "enum", "name": "E", "symbols": ["A"]}}]});
        assert!(resolve(&twice, &References::new()).is_err());
    }

    #[test]
    fn hostile_documents_are_refused_not_overflowed() {
        let mut deep = json!("int");
        for _ in 0..1_000 {
            deep = json!({"type": "array", "items": deep});
        }
        let err = resolve(&deep, &References::new()).unwrap_err();
        assert!(err.to_string().contains("deeper"), "{err}");
        for bad in [
            json!(42),
            json!({"name": "x"}),
            json!({"type": "record", "name": "R"}),
            json!("Nope"),
        ] {
            assert!(resolve(&bad, &References::new()).is_err(), "{bad}");
        }
        assert!(normal_form("{not json", &References::new()).is_err());
    }
}
