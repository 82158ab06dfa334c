//! What changed between two schemas, field by field — for `keel schema
//! diff` and for review of a schema change before it is registered.

use serde_json::Value;

/// The changes from `old` to `new` (both in normal form), one line each,
/// `+` added, `-` removed, `~` changed, with the path they apply to.
pub fn diff(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(old, new, "", &mut out, 0);
    out
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(branches) => {
            let parts: Vec<String> = branches.iter().map(describe).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Object(map) => {
            let ty = map.get("type").and_then(Value::as_str).unwrap_or("?");
            match (
                map.get("name").and_then(Value::as_str),
                map.get("logicalType").and_then(Value::as_str),
            ) {
                (Some(name), _) => format!("{ty} {name}"),
                (None, Some(logical)) => format!("{ty} ({logical})"),
                (None, None) if ty == "array" => format!("array<{}>", describe(&map["items"])),
                (None, None) if ty == "map" => format!("map<{}>", describe(&map["values"])),
                _ => ty.to_owned(),
            }
        }
        other => other.to_string(),
    }
}

fn walk(old: &Value, new: &Value, path: &str, out: &mut Vec<String>, depth: usize) {
    if old == new || depth > 64 {
        return;
    }
    let kind = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_owned);
    match (old, new) {
        (Value::Object(o), Value::Object(n)) if kind(old) == kind(new) => {
            let at = if path.is_empty() { "/" } else { path };
            if o.get("name") != n.get("name") {
                out.push(format!(
                    "~ {at}: renamed {} → {}",
                    describe(old),
                    describe(new)
                ));
            }
            match kind(new).as_deref() {
                Some("record" | "error") => fields(o, n, path, out, depth),
                Some("enum") => {
                    let symbols = |m: &serde_json::Map<String, Value>| -> Vec<String> {
                        m.get("symbols")
                            .and_then(Value::as_array)
                            .map(|s| {
                                s.iter()
                                    .filter_map(Value::as_str)
                                    .map(str::to_owned)
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    let (os, ns) = (symbols(o), symbols(n));
                    for s in ns.iter().filter(|s| !os.contains(s)) {
                        out.push(format!("+ {at}: symbol {s}"));
                    }
                    for s in os.iter().filter(|s| !ns.contains(s)) {
                        out.push(format!("- {at}: symbol {s}"));
                    }
                    if o.get("default") != n.get("default") {
                        out.push(format!(
                            "~ {at}: enum default {:?} → {:?}",
                            o.get("default"),
                            n.get("default")
                        ));
                    }
                }
                Some("array") => walk(
                    &o["items"],
                    &n["items"],
                    &format!("{path}/items"),
                    out,
                    depth + 1,
                ),
                Some("map") => walk(
                    &o["values"],
                    &n["values"],
                    &format!("{path}/values"),
                    out,
                    depth + 1,
                ),
                _ => out.push(format!("~ {at}: {} → {}", describe(old), describe(new))),
            }
        }
        _ => {
            let at = if path.is_empty() { "/" } else { path };
            out.push(format!("~ {at}: {} → {}", describe(old), describe(new)));
        }
    }
}

fn fields(
    o: &serde_json::Map<String, Value>,
    n: &serde_json::Map<String, Value>,
    path: &str,
    out: &mut Vec<String>,
    depth: usize,
) {
    let empty = Vec::new();
    let of = o.get("fields").and_then(Value::as_array).unwrap_or(&empty);
    let nf = n.get("fields").and_then(Value::as_array).unwrap_or(&empty);
    let name = |f: &Value| f["name"].as_str().unwrap_or_default().to_owned();
    for f in nf {
        let fname = name(f);
        let at = format!("{path}/{fname}");
        match of.iter().find(|g| name(g) == fname) {
            None => {
                let default = f
                    .get("default")
                    .map_or_else(|| "no default".to_owned(), |d| format!("default {d}"));
                out.push(format!("+ {at}: {} ({default})", describe(&f["type"])));
            }
            Some(g) => {
                walk(&g["type"], &f["type"], &at, out, depth + 1);
                if g.get("default") != f.get("default") {
                    let show =
                        |d: Option<&Value>| d.map_or_else(|| "none".to_owned(), Value::to_string);
                    out.push(format!(
                        "~ {at}: default {} → {}",
                        show(g.get("default")),
                        show(f.get("default"))
                    ));
                }
            }
        }
    }
    for g in of {
        let gname = name(g);
        if !nf.iter().any(|f| name(f) == gname) {
            out.push(format!("- {path}/{gname}: {}", describe(&g["type"])));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::canonical::{References, resolve};
    use crate::domain::avsc;

    #[test]
    fn order_placed_v1_to_v2_adds_gift_wrap() {
        let address: Value =
            serde_json::from_str(avsc("shop.common.Address.avsc").unwrap()).unwrap();
        let refs = crate::canonical::named_types(&address).unwrap();
        let load =
            |f: &str| resolve(&serde_json::from_str(avsc(f).unwrap()).unwrap(), &refs).unwrap();
        let changes = diff(
            &load("shop.orders.OrderPlaced.v1.avsc"),
            &load("shop.orders.OrderPlaced.avsc"),
        );
        assert_eq!(changes, vec!["+ /gift_wrap: boolean (default false)"]);
    }

    #[test]
    fn changes_are_listed_with_their_paths() {
        let old = resolve(
            &json!({"type": "record", "name": "E", "fields": [
                {"name": "a", "type": "int"},
                {"name": "s", "type": {"type": "enum", "name": "S", "symbols": ["X", "Y"]}},
                {"name": "gone", "type": "string"}]}),
            &References::new(),
        )
        .unwrap();
        let new = resolve(
            &json!({"type": "record", "name": "E", "fields": [
                {"name": "a", "type": "long"},
                {"name": "s", "type": {"type": "enum", "name": "S", "symbols": ["X", "Z"]}}]}),
            &References::new(),
        )
        .unwrap();
        assert_eq!(
            diff(&old, &new),
            vec![
                "~ /a: int → long",
                "+ /s: symbol Z",
                "- /s: symbol Y",
                "- /gone: string"
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }
}
