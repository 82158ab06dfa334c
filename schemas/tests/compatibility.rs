//! Avro's resolution rules, case by case: 139 writer/reader pairs derived
//! from the specification's "Schema Resolution" section (promotions,
//! defaults, aliases, enum symbols and defaults, fixed sizes, unions,
//! named-type references, recursive types, logical types), each checked
//! both ways through the registry's compatibility levels.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use keel_schemas::canonical::{References, resolve};
use keel_schemas::compat::{Compatibility, can_read};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Case {
    name: String,
    rule: String,
    writer: Value,
    reader: Value,
    compatible: bool,
}

fn cases() -> Vec<Case> {
    serde_json::from_str(include_str!("data/compatibility.json")).unwrap()
}

#[test]
fn every_spec_case_resolves_as_expected() {
    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let writer = resolve(&case.writer, &References::new())
            .unwrap_or_else(|e| panic!("{}: writer: {e}", case.name));
        let reader = resolve(&case.reader, &References::new())
            .unwrap_or_else(|e| panic!("{}: reader: {e}", case.name));
        let problems = can_read(&reader, &writer);
        if problems.is_empty() != case.compatible {
            failures.push(format!(
                "{} ({}): expected {}, got {problems:?}",
                case.name,
                case.rule,
                if case.compatible {
                    "compatible"
                } else {
                    "incompatible"
                }
            ));
        }
        if !case.compatible {
            assert!(
                problems.iter().all(|p| p.starts_with('/')),
                "{}: {problems:?}",
                case.name
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn levels_agree_with_the_pairwise_rules() {
    // Registering `reader` after `writer`: BACKWARD asks whether the new
    // schema reads the old data; FORWARD the reverse; FULL both.
    for case in cases() {
        let old = resolve(&case.writer, &References::new()).unwrap();
        let new = resolve(&case.reader, &References::new()).unwrap();
        let backward = Compatibility::Backward
            .check(&new, std::slice::from_ref(&old))
            .is_empty();
        assert_eq!(backward, case.compatible, "{} BACKWARD", case.name);
        let forward = Compatibility::Forward
            .check(&old, std::slice::from_ref(&new))
            .is_empty();
        assert_eq!(
            forward, case.compatible,
            "{} FORWARD (roles swapped)",
            case.name
        );
        let full = Compatibility::Full
            .check(&new, std::slice::from_ref(&old))
            .is_empty();
        let reverse = can_read(&old, &new).is_empty();
        assert_eq!(full, case.compatible && reverse, "{} FULL", case.name);
        assert!(Compatibility::None.check(&new, &[old]).is_empty());
    }
}
