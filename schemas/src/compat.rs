//! Schema compatibility, by Avro's resolution rules — the rules of Apache
//! Avro's Java `SchemaCompatibility`, which Confluent's registry applies.
//!
//! [`can_read`] answers "can data written with `writer` be read with
//! `reader`?" and lists why not: names must match (or the reader aliases the
//! writer's full name), reader fields missing from the writer need defaults,
//! enum symbols must be known to the reader (or it has a default symbol),
//! fixed sizes must be equal, every branch of a writer union must be
//! readable, and the numeric/text promotions of the specification apply.
//! Logical types are ignored, as in Java: only the underlying type counts.
//! [`Compatibility`] turns that into the registry's levels.
//!
//! Both schemas are in the normal form of [`crate::canonical`]: full names,
//! self-contained, each named type defined at first use.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// A registry compatibility level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compatibility {
    /// The new schema reads data of the latest version.
    #[default]
    Backward,
    /// The new schema reads data of every earlier version.
    BackwardTransitive,
    /// The latest version reads data of the new schema.
    Forward,
    /// Every earlier version reads data of the new schema.
    ForwardTransitive,
    /// Backward and forward with the latest version.
    Full,
    /// Backward and forward with every earlier version.
    FullTransitive,
    /// No checks.
    None,
}

impl Compatibility {
    /// Every level, in Confluent's order.
    pub const ALL: [Compatibility; 7] = [
        Compatibility::Backward,
        Compatibility::BackwardTransitive,
        Compatibility::Forward,
        Compatibility::ForwardTransitive,
        Compatibility::Full,
        Compatibility::FullTransitive,
        Compatibility::None,
    ];

    /// The versions of `existing` (oldest first) a new one is checked
    /// against under this level: none, the latest, or all.
    pub fn compared<'a, T>(&self, existing: &'a [T]) -> &'a [T] {
        match self {
            Compatibility::None => &[],
            Compatibility::Backward | Compatibility::Forward | Compatibility::Full => existing
                .last()
                .map(std::slice::from_ref)
                .unwrap_or_default(),
            _ => existing,
        }
    }

    /// Checks `new` against `existing` versions (oldest first) under this
    /// level; returns the reasons it is incompatible (empty: compatible).
    pub fn check(&self, new: &Value, existing: &[Value]) -> Vec<String> {
        self.check_each(new, self.compared(existing))
    }

    /// Checks `new` against each of `against` (oldest first, already the
    /// versions [`compared`](Self::compared) picks) in this level's
    /// directions.
    pub fn check_each(&self, new: &Value, against: &[Value]) -> Vec<String> {
        let (backward, forward) = match self {
            Compatibility::Backward | Compatibility::BackwardTransitive => (true, false),
            Compatibility::Forward | Compatibility::ForwardTransitive => (false, true),
            _ => (true, true),
        };
        let mut problems = Vec::new();
        // Newest first, as Confluent reports.
        for old in against.iter().rev() {
            if backward {
                problems.extend(
                    can_read(new, old)
                        .into_iter()
                        .map(|p| format!("{p} (new schema reading old data)")),
                );
            }
            if forward {
                problems.extend(
                    can_read(old, new)
                        .into_iter()
                        .map(|p| format!("{p} (old schema reading new data)")),
                );
            }
        }
        problems
    }
}

impl FromStr for Compatibility {
    type Err = ();

    /// Case-insensitive `BACKWARD`, `full_transitive`, …
    fn from_str(s: &str) -> Result<Self, ()> {
        Compatibility::ALL
            .into_iter()
            .find(|c| c.to_string().eq_ignore_ascii_case(s))
            .ok_or(())
    }
}

impl fmt::Display for Compatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
            Compatibility::None => "NONE",
        })
    }
}

/// Why data written with `writer` cannot be read with `reader` (empty when
/// it can). Each reason names the location (`/fields/2/type`) in the reader.
pub fn can_read(reader: &Value, writer: &Value) -> Vec<String> {
    let mut checker = Checker {
        reader_defs: definitions(reader),
        writer_defs: definitions(writer),
        in_progress: HashSet::new(),
        checked: HashMap::new(),
        compatible_log: Vec::new(),
        problems: Vec::new(),
    };
    checker.check(reader, writer, "");
    checker.problems
}

fn definitions(schema: &Value) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    collect(schema, &mut out, 0);
    out
}

fn collect(v: &Value, out: &mut HashMap<String, Value>, depth: usize) {
    if depth > 128 {
        return;
    }
    match v {
        Value::Array(branches) => branches.iter().for_each(|b| collect(b, out, depth + 1)),
        Value::Object(map) => {
            if let Some(name) = map.get("name").and_then(Value::as_str)
                && matches!(
                    kind_str(map.get("type")),
                    "record" | "error" | "enum" | "fixed"
                )
            {
                out.entry(name.to_owned()).or_insert_with(|| v.clone());
            }
            if let Some(fields) = map.get("fields").and_then(Value::as_array) {
                for f in fields {
                    if let Some(t) = f.get("type") {
                        collect(t, out, depth + 1);
                    }
                }
            }
            for key in ["items", "values"] {
                if let Some(t) = map.get(key) {
                    collect(t, out, depth + 1);
                }
            }
        }
        _ => {}
    }
}

fn kind_str(v: Option<&Value>) -> &str {
    v.and_then(Value::as_str).unwrap_or_default()
}

/// The kind of a (resolved) schema node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Record,
    Enum,
    Fixed,
    Array,
    Map,
    Union,
    Unknown,
}

fn kind_of(name: &str) -> Kind {
    match name {
        "null" => Kind::Null,
        "boolean" => Kind::Boolean,
        "int" => Kind::Int,
        "long" => Kind::Long,
        "float" => Kind::Float,
        "double" => Kind::Double,
        "bytes" => Kind::Bytes,
        "string" => Kind::String,
        "record" | "error" => Kind::Record,
        "enum" => Kind::Enum,
        "fixed" => Kind::Fixed,
        "array" => Kind::Array,
        "map" => Kind::Map,
        _ => Kind::Unknown,
    }
}

struct Checker {
    reader_defs: HashMap<String, Value>,
    writer_defs: HashMap<String, Value>,
    in_progress: HashSet<(String, String)>,
    /// Named pairs compared in full, and whether the reader's could read
    /// the writer's: a type used in many places is compared once (without
    /// this, a schema reusing named types level after level costs
    /// exponential time).
    checked: HashMap<(String, String), bool>,
    /// The pairs entered in `checked` as compatible, in order: such an
    /// answer may rest on a pair still in progress being assumed
    /// compatible (recursive types), so when that pair turns out
    /// incompatible, every compatible answer entered since it started is
    /// withdrawn. (An incompatible answer never rests on an assumption.)
    compatible_log: Vec<(String, String)>,
    problems: Vec<String>,
}

impl Checker {
    /// Follows a reference by name to its definition.
    fn deref<'a>(defs: &'a HashMap<String, Value>, v: &'a Value) -> &'a Value {
        match v {
            Value::String(name) if kind_of(name) == Kind::Unknown => defs.get(name).unwrap_or(v),
            _ => v,
        }
    }

    fn kind(v: &Value) -> Kind {
        match v {
            Value::String(name) => kind_of(name),
            Value::Array(_) => Kind::Union,
            Value::Object(map) => kind_of(kind_str(map.get("type"))),
            _ => Kind::Unknown,
        }
    }

    /// Records a problem unless `quiet` (used to probe union branches).
    fn check(&mut self, reader: &Value, writer: &Value, path: &str) -> bool {
        let before = self.problems.len();
        self.visit(reader, writer, path);
        self.problems.len() == before
    }

    /// Whether `reader` can read `writer`, without recording anything.
    fn probe(&mut self, reader: &Value, writer: &Value, path: &str) -> bool {
        let before = self.problems.len();
        let ok = self.check(reader, writer, path);
        self.problems.truncate(before);
        ok
    }

    fn visit(&mut self, reader: &Value, writer: &Value, path: &str) {
        let reader_defs = std::mem::take(&mut self.reader_defs);
        let writer_defs = std::mem::take(&mut self.writer_defs);
        let r = Self::deref(&reader_defs, reader).clone();
        let w = Self::deref(&writer_defs, writer).clone();
        self.reader_defs = reader_defs;
        self.writer_defs = writer_defs;
        let (rk, wk) = (Self::kind(&r), Self::kind(&w));

        // Named types: a pair already being compared is assumed compatible
        // (recursive types).
        if let (Some(rn), Some(wn)) = (name(&r), name(&w)) {
            let key = (rn.to_owned(), wn.to_owned());
            if let Some(&compatible) = self.checked.get(&key) {
                if !compatible {
                    self.problems.push(format!(
                        "{}: the reader's `{rn}` cannot read the writer's `{wn}`",
                        at(path)
                    ));
                }
                return;
            }
            if !self.in_progress.insert(key.clone()) {
                return;
            }
            let before = self.problems.len();
            let logged = self.compatible_log.len();
            self.visit_resolved(&r, &w, rk, wk, path);
            self.in_progress.remove(&key);
            if self.problems.len() == before {
                self.compatible_log.push(key.clone());
                self.checked.insert(key, true);
            } else {
                for withdrawn in self.compatible_log.drain(logged..) {
                    self.checked.remove(&withdrawn);
                }
                self.checked.insert(key, false);
            }
        } else {
            self.visit_resolved(&r, &w, rk, wk, path);
        }
    }

    fn visit_resolved(&mut self, r: &Value, w: &Value, rk: Kind, wk: Kind, path: &str) {
        if rk == wk {
            match rk {
                Kind::Record => self.records(r, w, path),
                Kind::Enum => self.enums(r, w, path),
                Kind::Fixed => self.fixed(r, w, path),
                Kind::Array => {
                    let p = format!("{path}/items");
                    self.check(&r["items"], &w["items"], &p);
                }
                Kind::Map => {
                    let p = format!("{path}/values");
                    self.check(&r["values"], &w["values"], &p);
                }
                Kind::Union => {
                    for (i, branch) in branches(w).iter().enumerate() {
                        if !self.probe(r, branch, path) {
                            self.problems.push(format!(
                                "{}: the writer's union branch {i} ({}) has no matching branch in the reader's union",
                                at(path),
                                describe(branch)
                            ));
                        }
                    }
                }
                Kind::Unknown => self.problems.push(format!("{}: unknown type", at(path))),
                _ => {}
            }
            return;
        }
        if wk == Kind::Union {
            for (i, branch) in branches(w).iter().enumerate() {
                if !self.probe(r, branch, path) {
                    self.problems.push(format!(
                        "{}: the reader's {} cannot read the writer's union branch {i} ({})",
                        at(path),
                        describe(r),
                        describe(branch)
                    ));
                }
            }
            return;
        }
        let promoted = matches!(
            (wk, rk),
            (Kind::Int, Kind::Long | Kind::Float | Kind::Double)
                | (Kind::Long, Kind::Float | Kind::Double)
                | (Kind::Float, Kind::Double)
                | (Kind::String, Kind::Bytes)
                | (Kind::Bytes, Kind::String)
        );
        if promoted {
            return;
        }
        if rk == Kind::Union {
            if branches(r).iter().any(|b| self.probe(b, w, path)) {
                return;
            }
            self.problems.push(format!(
                "{}: the writer's {} matches no branch of the reader's union",
                at(path),
                describe(w)
            ));
            return;
        }
        self.problems.push(format!(
            "{}: type mismatch: the reader expects {}, the writer wrote {}",
            at(path),
            describe(r),
            describe(w)
        ));
    }

    fn names_match(&mut self, r: &Value, w: &Value, path: &str) -> bool {
        let (rn, wn) = (name(r).unwrap_or_default(), name(w).unwrap_or_default());
        let aliased = r
            .get("aliases")
            .and_then(Value::as_array)
            .is_some_and(|aliases| aliases.iter().any(|a| a.as_str() == Some(wn)));
        if short(rn) == short(wn) || aliased {
            return true;
        }
        self.problems.push(format!(
            "{}: name mismatch: the reader expects `{rn}`, the writer wrote `{wn}` (add `{wn}` to the reader's aliases to rename)",
            at(path)
        ));
        false
    }

    fn records(&mut self, r: &Value, w: &Value, path: &str) {
        if !self.names_match(r, w, path) {
            return;
        }
        let empty = Vec::new();
        let reader_fields = r["fields"].as_array().unwrap_or(&empty);
        let writer_fields = w["fields"].as_array().unwrap_or(&empty);
        for (i, rf) in reader_fields.iter().enumerate() {
            let fname = rf["name"].as_str().unwrap_or_default();
            let aliases: Vec<&str> = rf
                .get("aliases")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let found = writer_fields
                .iter()
                .find(|wf| wf["name"].as_str() == Some(fname))
                .or_else(|| {
                    writer_fields
                        .iter()
                        .find(|wf| wf["name"].as_str().is_some_and(|n| aliases.contains(&n)))
                });
            let p = format!("{path}/fields/{i}");
            match found {
                Some(wf) => {
                    let tp = format!("{p}/type");
                    self.check(&rf["type"], &wf["type"], &tp);
                }
                None if rf.get("default").is_some() => {}
                None => self.problems.push(format!(
                    "{}: the reader's field `{fname}` has no default value and is missing from the writer's `{}`",
                    at(&p),
                    name(w).unwrap_or_default()
                )),
            }
        }
    }

    fn enums(&mut self, r: &Value, w: &Value, path: &str) {
        if !self.names_match(r, w, path) {
            return;
        }
        if r.get("default").is_some() {
            return;
        }
        let symbols = |v: &Value| -> Vec<String> {
            v["symbols"]
                .as_array()
                .map(|s| {
                    s.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let known = symbols(r);
        let missing: Vec<String> = symbols(w)
            .into_iter()
            .filter(|s| !known.contains(s))
            .collect();
        if !missing.is_empty() {
            self.problems.push(format!(
                "{}: the reader's enum `{}` lacks the writer's symbols {missing:?} and has no default",
                at(path),
                name(r).unwrap_or_default()
            ));
        }
    }

    fn fixed(&mut self, r: &Value, w: &Value, path: &str) {
        if !self.names_match(r, w, path) {
            return;
        }
        if r["size"] != w["size"] {
            self.problems.push(format!(
                "{}: fixed size mismatch: the reader expects {}, the writer wrote {}",
                at(path),
                r["size"],
                w["size"]
            ));
        }
    }
}

fn name(v: &Value) -> Option<&str> {
    v.as_object()?.get("name")?.as_str()
}

fn short(full: &str) -> &str {
    full.rsplit('.').next().unwrap_or(full)
}

fn branches(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_else(|| vec![v.clone()])
}

fn at(path: &str) -> String {
    if path.is_empty() {
        "/".to_owned()
    } else {
        path.to_owned()
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(_) => "union".to_owned(),
        Value::Object(map) => match map.get("name").and_then(Value::as_str) {
            Some(n) => format!("{} `{n}`", kind_str(map.get("type"))),
            None => kind_str(map.get("type")).to_owned(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::canonical::{References, resolve};

    fn r(v: Value) -> Value {
        resolve(&v, &References::new()).unwrap()
    }

    /// `L0 {a: L1, b: L1}`, `L1 {a: L2, b: L2}`, … `L{n}`: each level's
    /// type used twice, so a comparison that does not remember the pairs
    /// it compared visits 2^n records.
    fn doubling(levels: usize, last_field: &str) -> Value {
        let mut schema = json!({"type": "record", "name": format!("L{levels}"),
            "fields": [{"name": "x", "type": last_field}]});
        for level in (0..levels).rev() {
            schema = json!({"type": "record", "name": format!("L{level}"), "fields": [
                {"name": "a", "type": schema},
                {"name": "b", "type": format!("L{}", level + 1)},
            ]});
        }
        r(schema)
    }

    #[test]
    fn named_types_reused_at_every_level_are_compared_once() {
        // 2^30 record visits (each cloning its definition) without the
        // memo: this test would run for hours.
        let old = doubling(30, "int");
        assert!(can_read(&old, &old).is_empty());
        let new = doubling(30, "long");
        assert!(can_read(&new, &old).is_empty(), "int promotes to long");
        let problems = can_read(&old, &new);
        assert!(!problems.is_empty());
        assert!(
            problems[0].contains("/fields/0/type"),
            "the first problem is found in full: {problems:?}"
        );
        assert!(problems.len() < 100, "{} problems", problems.len());
    }

    #[test]
    fn a_pair_assumed_compatible_inside_a_failed_union_probe_is_compared_again() {
        // While the probe of x.A against w.A runs, x.B against w.B is found
        // compatible by assuming x.A against w.A (recursion); then x.A fails
        // on `x`. The probe's failure is dropped (y.A matches), but x.B
        // against w.B must not stay remembered as compatible: field `v`
        // compares it again and it fails there.
        let reader = r(json!({"type": "record", "name": "Top", "fields": [
            {"name": "u", "type": [
                {"type": "record", "name": "A", "namespace": "x", "fields": [
                    {"name": "b", "type": {"type": "record", "name": "B", "namespace": "x",
                        "fields": [{"name": "a", "type": ["null", "x.A"]}]}},
                    {"name": "x", "type": "string"}]},
                {"type": "record", "name": "A", "namespace": "y", "fields": [
                    {"name": "x", "type": "int"}]}]},
            {"name": "v", "type": "x.B"}]}));
        let writer = r(json!({"type": "record", "name": "Top", "fields": [
            {"name": "u", "type": {"type": "record", "name": "A", "namespace": "w", "fields": [
                {"name": "b", "type": {"type": "record", "name": "B", "namespace": "w",
                    "fields": [{"name": "a", "type": ["null", "w.A"]}]}},
                {"name": "x", "type": "int"}]}},
            {"name": "v", "type": "w.B"}]}));
        let problems = can_read(&reader, &writer);
        assert!(
            problems.iter().any(|p| p.contains("/fields/1/")),
            "field v cannot be read: {problems:?}"
        );
    }

    #[test]
    fn levels_pick_the_direction_and_the_versions() {
        let v1 =
            r(json!({"type": "record", "name": "E", "fields": [{"name": "a", "type": "int"}]}));
        let v2 = r(json!({"type": "record", "name": "E", "fields": [
            {"name": "a", "type": "int", "default": 0}, {"name": "b", "type": "string", "default": ""}]}));
        // Adding fields with defaults: compatible both ways.
        for level in Compatibility::ALL {
            assert!(
                level.check(&v2, std::slice::from_ref(&v1)).is_empty(),
                "{level}"
            );
        }
        // Adding a field without a default: new cannot read old data.
        let v3 = r(json!({"type": "record", "name": "E", "fields": [
            {"name": "a", "type": "int", "default": 0}, {"name": "b", "type": "string", "default": ""},
            {"name": "c", "type": "long"}]}));
        assert!(
            !Compatibility::Backward
                .check(&v3, &[v1.clone(), v2.clone()])
                .is_empty()
        );
        assert!(
            Compatibility::Forward
                .check(&v3, &[v1.clone(), v2.clone()])
                .is_empty()
        );
        assert!(
            !Compatibility::Full
                .check(&v3, &[v1.clone(), v2.clone()])
                .is_empty()
        );
        // Dropping `a`: v2 (which has a default for it) still reads the new
        // data, v1 does not — only the transitive level sees v1.
        let v4 = r(
            json!({"type": "record", "name": "E", "fields": [{"name": "b", "type": "string", "default": ""}]}),
        );
        assert!(
            Compatibility::Forward
                .check(&v4, &[v1.clone(), v2.clone()])
                .is_empty()
        );
        let problems = Compatibility::ForwardTransitive.check(&v4, &[v1.clone(), v2.clone()]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("`a`"), "{problems:?}");
        assert!(
            Compatibility::None
                .check(&r(json!("string")), &[v1])
                .is_empty()
        );
    }

    #[test]
    fn levels_parse_case_insensitively() {
        for level in Compatibility::ALL {
            assert_eq!(
                level.to_string().to_lowercase().parse::<Compatibility>(),
                Ok(level)
            );
        }
        assert!("SIDEWAYS".parse::<Compatibility>().is_err());
    }

    #[test]
    fn problems_name_the_field() {
        let old =
            r(json!({"type": "record", "name": "E", "fields": [{"name": "a", "type": "int"}]}));
        let new = r(
            json!({"type": "record", "name": "E", "fields": [{"name": "a", "type": "int"}, {"name": "b", "type": "int"}]}),
        );
        let problems = can_read(&new, &old);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("/fields/1") && problems[0].contains("`b`"),
            "{problems:?}"
        );
    }
}
