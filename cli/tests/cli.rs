//! The `keel` binary as a user runs it: the demo proves its lines, bad
//! configuration is refused by name with a non-zero exit and no panic.

use std::path::Path;
use std::process::{Command, Output};

fn keel(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(args).current_dir(dir);
    // Keep the caller's KEEL_* settings out of these tests.
    for (key, _) in std::env::vars() {
        if key.starts_with("KEEL_") {
            cmd.env_remove(key);
        }
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.output().expect("run keel")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A throwaway working directory (no keel.toml unless a test writes one).
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> Scratch {
    use std::hash::{BuildHasher, RandomState};
    let unique = RandomState::new().hash_one(std::process::id());
    let path = std::env::temp_dir().join(format!("keel-cli-{unique:016x}"));
    std::fs::create_dir_all(&path).expect("create a scratch directory");
    Scratch(path)
}

#[test]
fn demo_prints_what_it_proved() {
    let dir = scratch();
    let out = keel(
        &["demo", "--events", "3000", "--keys", "50"],
        dir.path(),
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    for line in [
        "published  3000 events over 50 keys",
        "handled    3000 of 3000 events",
        "order      held for all 50 keys",
        "rebalance  member #3 left after",
        "committed  every partition",
        "demo OK",
    ] {
        assert!(stdout.contains(line), "missing `{line}` in:\n{stdout}");
    }
}

#[test]
fn help_and_version_work() {
    let dir = scratch();
    let out = keel(&["--help"], dir.path(), &[]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("demo"));
    let out = keel(&["demo", "--help"], dir.path(), &[]);
    assert!(text(&out.stdout).contains("Examples:"));
    let out = keel(&["--version"], dir.path(), &[]);
    assert_eq!(
        text(&out.stdout).trim(),
        format!("keel {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_config_is_refused_by_name() {
    let cases: [(&str, &str); 4] = [
        ("brokr = \"memory://\"\n", "`brokr`"),
        ("broker = \"kafka//nohost\"\n", "`broker`"),
        ("[topics]\npartitions = 0\n", "`topics.partitions`"),
        (
            "[consumer]\nmax_in_flight = -3\n",
            "`consumer.max_in_flight`",
        ),
    ];
    for (toml, setting) in cases {
        let dir = scratch();
        std::fs::write(dir.path().join("keel.toml"), toml).unwrap();
        let out = keel(&["demo"], dir.path(), &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{toml:?}: {stderr}");
        assert!(stderr.contains(setting), "{toml:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{toml:?}: {stderr}");
    }
}

#[test]
fn bad_flags_and_environment_are_refused_by_name() {
    let dir = scratch();
    let out = keel(&["demo", "--partitions", "0"], dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("`topics.partitions`"),
        "{}",
        text(&out.stderr)
    );

    let out = keel(&["--broker", "tcp://x:1", "demo"], dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unknown scheme `tcp`"),
        "{}",
        text(&out.stderr)
    );

    let out = keel(
        &["demo"],
        dir.path(),
        &[("KEEL_TOPICS__PARTITIONS", "zero")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("`topics.partitions`") && stderr.contains("KEEL_"),
        "{stderr}"
    );

    let out = keel(&["--config", "missing.toml", "demo"], dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("missing.toml"),
        "{}",
        text(&out.stderr)
    );

    let out = keel(&["demo", "--events", "0"], dir.path(), &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap refuses out-of-range flags"
    );
}

#[test]
fn the_demo_refuses_brokers_it_cannot_run_on_yet() {
    let dir = scratch();
    let out = keel(
        &["--broker", "kafka://127.0.0.1:9", "demo"],
        dir.path(),
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("memory://"),
        "{}",
        text(&out.stderr)
    );
}
