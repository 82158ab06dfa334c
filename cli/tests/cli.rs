//! The `keel` binary as a user runs it: the demo proves its lines, bad
//! configuration is refused by name with a non-zero exit and no panic.

use std::path::Path;
use std::process::{Command, Output};

/// `keel args` in `dir` with `env` and none of the caller's KEEL_* settings.
fn command(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(args).current_dir(dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("KEEL_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

fn keel(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    command(args, dir, env).output().expect("run keel")
}

/// [`keel`] for a command expected to end by itself: one still running
/// after `limit` (a server that should have refused its settings) is
/// killed and fails the test instead of holding it for ever.
fn keel_within(args: &[&str], dir: &Path, limit: std::time::Duration) -> Output {
    let mut child = command(args, dir, &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start keel");
    let started = std::time::Instant::now();
    while child.try_wait().expect("keel's status").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("keel ends");
            panic!(
                "keel {args:?} still ran after {limit:?}: {}",
                text(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("keel ends")
}

/// [`keel`] with its standard output closed before it writes (as under
/// `keel … | head -0`).
fn keel_unread(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut child = command(args, dir, env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start keel");
    drop(child.stdout.take());
    child.wait_with_output().expect("keel ends")
}

/// A failing command whose standard error nobody reads (`keel … 2>&1 |
/// head -0`) fails with its own exit code, not a panic's (101).
#[test]
fn a_closed_standard_error_loses_the_message_not_the_exit_code() {
    let dir = scratch();
    let mut child = command(
        &["--broker", "bogus://nowhere", "topics", "list"],
        dir.path(),
        &[],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("start keel");
    drop(child.stderr.take());
    let out = child.wait_with_output().expect("keel ends");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
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
        "outbox     3000 events over 50 keys committed in",
        "the relay published 3000",
        "handled    3000 of 3000 events",
        "order      held for all 50 keys",
        "rebalance  member #4 joined after",
        "its partitions moved back: now #1 [",
        "committed  every partition",
        "replay     group `",
        "re-read all 3000 events from the start of the log, in order for all 50 keys",
        "demo OK",
    ] {
        assert!(stdout.contains(line), "missing `{line}` in:\n{stdout}");
    }
    // Fewer events than keys: one key each, and the summary says so.
    let out = keel(
        &["demo", "--events", "10", "--keys", "100"],
        dir.path(),
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    for line in ["10 events over 10 keys", "held for all 10 keys"] {
        assert!(stdout.contains(line), "missing `{line}` in:\n{stdout}");
    }
}

/// A demo stopped by Ctrl-C (SIGINT) says so, fails, and leaves no outbox
/// file in the temp directory.
#[test]
fn an_interrupted_demo_leaves_no_file_behind() {
    let dir = scratch();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).expect("create the demo's temp directory");
    let tmp_text = tmp.to_str().expect("a UTF-8 path");
    let child = command(
        &["demo", "--events", "5000000", "--keys", "1000"],
        dir.path(),
        &[("TMPDIR", tmp_text)],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("start keel");
    let files = || std::fs::read_dir(&tmp).map_or(0, Iterator::count);
    let started = std::time::Instant::now();
    while files() == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the demo made no outbox file in {tmp_text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Well into its run: the outbox is being written and relayed.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let pid = child.id().to_string();
    let kill = Command::new("kill").args(["-INT", &pid]).status();
    assert!(kill.expect("run kill").success());
    let out = child.wait_with_output().expect("keel ends");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("read the temp directory")
        .map(|entry| entry.map(|e| e.file_name()))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn help_and_version_work() {
    let dir = scratch();
    let out = keel(&["--help"], dir.path(), &[]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("demo"));
    // Every command, and every group of commands, shows how it is used.
    let commands = [
        "demo", "registry", "schema", "topics", "lag", "group", "publish", "tail", "relay",
        "outbox", "dlq",
    ];
    for command in commands {
        let out = keel(&[command, "--help"], dir.path(), &[]);
        assert!(
            text(&out.stdout).contains("Example"),
            "keel {command} --help:\n{}",
            text(&out.stdout)
        );
    }
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

/// Settings `registry serve` cannot serve with are refused, naming them,
/// before anything is created or announced.
#[test]
fn registry_settings_are_checked_before_serving() {
    let dir = scratch();
    std::fs::write(dir.path().join("junk.pem"), "not a certificate").expect("write");
    // Taken: the registry cannot listen there.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("its address").to_string();
    let cases: [(&[&str], &str); 7] = [
        (
            &["--tls-cert", "missing.pem", "--tls-key", "missing.key"],
            "--tls-cert missing.pem",
        ),
        // Files that are there but are no certificate: refused before the
        // registry says it serves.
        (
            &["--tls-cert", "junk.pem", "--tls-key", "junk.pem"],
            "cannot load the registry's TLS certificate",
        ),
        (&["--listen", &taken], "cannot listen on"),
        // Settings that would refuse every request.
        (&["--body-limit", "0"], "--body-limit"),
        (&["--basic-auth", "user:"], "empty password"),
        (&["--basic-auth", ":secret"], "empty user"),
        (&["--basic-auth", "user"], "the colon is missing"),
    ];
    for (flags, says) in cases {
        let mut args = vec!["registry", "serve", "--database", "sqlite://registry.db"];
        if !flags.contains(&"--listen") {
            args.extend(["--listen", "127.0.0.1:0"]);
        }
        args.extend(flags);
        let out = keel_within(&args, dir.path(), std::time::Duration::from_secs(30));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
        assert!(!stderr.contains("serving"), "{flags:?}: {stderr}");
        assert!(
            !dir.path().join("registry.db").exists(),
            "{flags:?}: nothing created before the refusal"
        );
    }
}

#[test]
fn bad_flags_and_environment_are_refused_by_name() {
    let dir = scratch();
    // A flag out of range is named as the flag, a setting as the setting.
    let out = keel(&["demo", "--partitions", "0"], dir.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("'--partitions <PARTITIONS>': 0 is not in 1..=10000"),
        "{}",
        text(&out.stderr)
    );
    let out = keel(&["demo"], dir.path(), &[("KEEL_TOPICS__PARTITIONS", "0")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("`topics.partitions`"),
        "{}",
        text(&out.stderr)
    );
    // A nested setting's variable with one underscore: the hint says two.
    let out = keel(&["demo"], dir.path(), &[("KEEL_TOPICS_PARTITIONS", "3")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("KEEL_TOPICS__PARTITIONS for `topics.partitions`"),
        "{}",
        text(&out.stderr)
    );

    // The flags' own variables are read as flags, not refused as unknown
    // settings: the command gets as far as the (unreachable) registry.
    let out = keel(
        &["--registry", "http://127.0.0.1:1", "schema", "list"],
        dir.path(),
        &[("KEEL_REGISTRY_AUTH", "user:secret")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("unknown setting") && stderr.contains("127.0.0.1:1"),
        "{stderr}"
    );
    // Credentials without their colon: refused by name, not sent as none.
    let out = keel(
        &["--registry", "http://127.0.0.1:1", "schema", "list"],
        dir.path(),
        &[("KEEL_REGISTRY_AUTH", "user")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("--registry-auth") && stderr.contains("user:password"),
        "{stderr}"
    );

    // Refused before anything connects (a stream would list a subject per
    // partition).
    let out = keel(
        &[
            "--broker",
            "nats://127.0.0.1:1",
            "topics",
            "create",
            "t",
            "--partitions",
            "4294967295",
        ],
        dir.path(),
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--partitions"),
        "{}",
        text(&out.stderr)
    );

    // Topic settings read alike for both brokers, refused before either is
    // asked (Kafka took a zero retention, NATS a zero replication factor).
    for broker in ["kafka://127.0.0.1:1", "nats://127.0.0.1:1"] {
        for (flag, value, says) in [
            ("--retention-ms", "0", "Kafka would delete events at once"),
            ("--retention-ms", "-2", "-1 to keep events for ever"),
            ("--replication-factor", "0", "1 or more"),
            ("--replication-factor", "-3", "1 or more"),
        ] {
            let out = keel(
                &["--broker", broker, "topics", "create", "t", flag, value],
                dir.path(),
                &[],
            );
            let stderr = text(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{broker} {flag} {value}: {stderr}"
            );
            assert!(
                stderr.contains(flag) && stderr.contains(says),
                "{broker} {flag} {value}: {stderr}"
            );
        }
    }

    // An empty name is refused by clap, not passed on to the broker
    // (librdkafka answered an empty group with "consumer queue not
    // available").
    for (args, flag) in [
        (&["lag", "--group", "", "--topic", "t"][..], "--group"),
        (&["lag", "--group", "g", "--topic", ""][..], "--topic"),
        (&["publish", "--topic", ""][..], "--topic"),
        (&["dlq", "list", "--topic", ""][..], "--topic"),
        (&["topics", "create", ""][..], "<TOPIC>"),
        (
            &[
                "schema",
                "register",
                "x.avsc",
                "--strategy",
                "topic-name",
                "--topic",
                "",
            ][..],
            "--topic",
        ),
        (&["outbox", "parked", "--topic", ""][..], "--topic"),
    ] {
        let mut all = vec!["--broker", "kafka://127.0.0.1:1"];
        all.extend(args);
        let out = keel(&all, dir.path(), &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }

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
    // An empty config that is no regular file (`/dev/null`) is read, not
    // called missing.
    let out = keel(
        &["--config", "/dev/null", "demo", "--events", "10"],
        dir.path(),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

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

/// A `keel registry serve` child process on a free port.
struct RegistryProcess {
    child: std::process::Child,
    url: String,
}

impl RegistryProcess {
    fn start(dir: &Path) -> RegistryProcess {
        use std::io::BufRead;
        let db = format!("sqlite://{}", dir.join("registry.db").display());
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args([
                "registry",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database",
                &db,
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start keel registry serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut stderr = std::io::BufReader::new(stderr);
        // Warnings (a slow statement on a loaded machine, say) may come
        // before the line that names the URL.
        let mut seen = Vec::new();
        let url = loop {
            let mut line = String::new();
            let read = stderr
                .read_line(&mut line)
                .expect("read the registry's output");
            assert!(read > 0 && seen.len() < 100, "no URL in {seen:?}");
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                break url.to_owned();
            }
            seen.push(line);
        };
        RegistryProcess { child, url }
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn schema_commands_register_check_list_diff_and_get() {
    let dir = scratch();
    let registry = RegistryProcess::start(dir.path());
    let env = [("KEEL_REGISTRY", registry.url.as_str())];
    let avro = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/avro");

    // Several records under one topic-name subject: refused before any
    // is registered.
    let out = keel(
        &[
            "schema",
            "register",
            avro,
            "--strategy",
            "topic-name",
            "--topic",
            "orders",
        ],
        dir.path(),
        &env,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("nothing registered")
            && text(&out.stderr).contains("`orders-value`"),
        "{}",
        text(&out.stderr)
    );
    let out = keel(&["schema", "list"], dir.path(), &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("orders-value"),
        "{}",
        text(&out.stdout)
    );

    let out = keel(&["schema", "register", avro], dir.path(), &env);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("shop.orders.OrderPlaced version 2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("references shop.common.Address"),
        "{stdout}"
    );

    let out = keel(&["schema", "list"], dir.path(), &env);
    assert!(
        text(&out.stdout).contains("shop.orders.OrderPlaced"),
        "{}",
        text(&out.stdout)
    );

    let placed = format!("{avro}/shop.orders.OrderPlaced.avsc");
    let out = keel(&["schema", "check", &placed], dir.path(), &env);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("compatible"),
        "{}",
        text(&out.stdout)
    );

    // A field without a default breaks BACKWARD: exit code 1, reason shown.
    let local = dir.path().join("local");
    std::fs::create_dir_all(&local).expect("mkdir");
    for f in ["shop.common.Address.avsc", "shop.orders.OrderPlaced.avsc"] {
        std::fs::copy(format!("{avro}/{f}"), local.join(f)).expect("copy");
    }
    let path = local.join("shop.orders.OrderPlaced.avsc");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    doc["fields"]
        .as_array_mut()
        .expect("fields")
        .push(serde_json::json!({"name": "priority", "type": "int"}));
    std::fs::write(&path, doc.to_string()).expect("write");
    let path = path.display().to_string();
    let out = keel(&["schema", "check", &path], dir.path(), &env);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("`priority`"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("incompatible"),
        "{}",
        text(&out.stderr)
    );
    // Nobody reading its output (`… | head -0`) does not make a failed
    // check pass.
    let out = keel_unread(&["schema", "check", &path], dir.path(), &env);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("incompatible"),
        "{}",
        text(&out.stderr)
    );

    let out = keel(
        &[
            "schema",
            "diff",
            "--subject",
            "shop.orders.OrderPlaced",
            "--from",
            "1",
            "--to",
            "2",
        ],
        dir.path(),
        &env,
    );
    assert!(
        text(&out.stdout).contains("+ /gift_wrap: boolean (default false)"),
        "{}",
        text(&out.stdout)
    );
    let out = keel(
        &[
            "schema",
            "diff",
            "--subject",
            "shop.orders.OrderPlaced",
            &path,
        ],
        dir.path(),
        &env,
    );
    assert!(
        text(&out.stdout).contains("+ /priority: int (no default)"),
        "{}",
        text(&out.stdout)
    );

    let out = keel(
        &[
            "schema",
            "get",
            "--subject",
            "shop.common.Address",
            "--version",
            "1",
        ],
        dir.path(),
        &env,
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("get prints JSON");
    assert_eq!(got["schema"]["name"], "Address");
    let out = keel(&["schema", "get", "--id", "999"], dir.path(), &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("999"), "{}", text(&out.stderr));
}

/// The Kafka bootstrap server the test suite runs against.
fn kafka() -> String {
    std::env::var("KEEL_TEST_KAFKA").unwrap_or_else(|_| {
        panic!(
            "KEEL_TEST_KAFKA is not set: start a broker with infra/local/tansu.sh and \
             export KEEL_TEST_KAFKA=127.0.0.1:9092 (infra/local/test.sh does both)"
        )
    })
}

/// The NATS server the test suite runs against.
fn nats() -> String {
    std::env::var("KEEL_TEST_NATS").unwrap_or_else(|_| {
        panic!(
            "KEEL_TEST_NATS is not set: start nats-server with infra/local/nats.sh and \
             export KEEL_TEST_NATS=nats://127.0.0.1:4222 (infra/local/test.sh does both)"
        )
    })
}

#[test]
fn kafka_commands_create_publish_tail_lag_and_reset() {
    broker_commands(&format!("kafka://{}", kafka()), 3);
}

#[test]
fn nats_commands_create_publish_tail_lag_and_reset() {
    broker_commands(&nats(), 3);
}

/// `topics`, `publish`, `tail`, `lag`, `group reset|list` against `broker`.
fn broker_commands(broker: &str, partitions: usize) {
    let dir = scratch();
    let registry = RegistryProcess::start(dir.path());
    let env = [
        ("KEEL_REGISTRY", registry.url.as_str()),
        ("KEEL_BROKER", broker),
    ];
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let topic = format!("cli-{unique}");
    let group = format!("cli-g-{unique}");
    let run = |args: &[&str]| {
        let out = keel(args, dir.path(), &env);
        assert!(
            out.status.success(),
            "keel {args:?} failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    };

    let schemas = dir.path().join("schemas");
    std::fs::create_dir_all(&schemas).expect("mkdir");
    std::fs::write(
        schemas.join("test.Greeting.avsc"),
        r#"{"type":"record","name":"Greeting","namespace":"test","fields":[
            {"name":"id","type":"string"},{"name":"n","type":"long"},
            {"name":"price","type":["null",{"type":"bytes","logicalType":"decimal",
             "precision":6,"scale":2}],"default":null}]}"#,
    )
    .expect("write schema");
    let dir_arg = schemas.display().to_string();
    run(&[
        "schema",
        "register",
        &dir_arg,
        "--strategy",
        "topic-name",
        "--topic",
        &topic,
    ]);

    run(&[
        "topics",
        "create",
        &topic,
        "--partitions",
        &partitions.to_string(),
    ]);
    assert!(run(&["topics", "list"]).lines().any(|l| l == topic));
    // A retention under NATS' 2-minute de-duplication window is taken, and
    // creating the topic again without one keeps it.
    let kept = format!("{topic}-kept");
    run(&["topics", "create", &kept, "--retention-ms", "60000"]);
    run(&["topics", "create", &kept]);
    run(&["topics", "create", &kept, "--retention-ms", "60000"]);
    // Another retention for it is refused, naming both, not ignored.
    let out = keel(
        &["topics", "create", &kept, "--retention-ms", "120000"],
        dir.path(),
        &env,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("60000") && stderr.contains("120000"),
        "{stderr}"
    );
    if broker.starts_with("nats://") {
        // NATS holds durations as i64 nanoseconds: a longer retention is
        // refused, naming the flag, not sent wrapped around (this one as
        // about an hour).
        let long = format!("{topic}-long");
        let out = keel(
            &[
                "topics",
                "create",
                &long,
                "--retention-ms",
                "18446747673710",
            ],
            dir.path(),
            &env,
        );
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("--retention-ms") && stderr.contains("longer than NATS can hold"),
            "{stderr}"
        );
        assert!(!run(&["topics", "list"]).lines().any(|l| l == long));
    }
    let described: serde_json::Value =
        serde_json::from_str(&run(&["topics", "describe", &topic])).expect("describe JSON");
    // Kafka lists each partition; NATS gives the count.
    let described_partitions = described["partitions"]
        .as_array()
        .map(Vec::len)
        .or(described["partitions"].as_u64().map(|n| n as usize));
    assert_eq!(described_partitions, Some(partitions), "{described}");

    // JSON lines in, one receipt per event out (the file starts with a
    // byte-order mark, as some editors write it).
    let lines: String = std::iter::once("\u{feff}".to_owned())
        .chain((0..10).map(|i| format!("{{\"id\":\"k{}\",\"n\":{i}}}\n", i % 3)))
        .collect();
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, lines).expect("write events");
    let file_arg = file.display().to_string();
    let receipts = run(&[
        "publish",
        "--topic",
        &topic,
        "--file",
        &file_arg,
        "--key-field",
        "id",
    ]);
    assert_eq!(receipts.lines().count(), 10, "{receipts}");

    // A line that does not fit the schema: refused by line, nothing sent.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\":\"x\",\"n\":1}\n{\"id\":\"x\",\"n\":\"two\"}\n",
    )
    .expect("write");
    let bad_arg = bad.display().to_string();
    let out = keel(
        &[
            "publish",
            "--topic",
            &topic,
            "--file",
            &bad_arg,
            "--key-field",
            "id",
        ],
        dir.path(),
        &env,
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A decimal the schema's scale cannot hold is refused, not rounded.
    std::fs::write(&bad, "{\"id\":\"x\",\"n\":1,\"price\":\"1.005\"}\n").expect("write");
    let out = keel(
        &[
            "publish", "--topic", &topic, "--file", &bad_arg, "--key", "x",
        ],
        dir.path(),
        &env,
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("line 1") && stderr.contains("field `price`: 1.005 has 3 decimal places"),
        "{stderr}"
    );
    if !broker.starts_with("nats://") {
        // publisher.ack_timeout_ms bounds how long `keel publish` waits
        // for a broker that does not answer (it was ignored: 30 s always).
        std::fs::write(&bad, "{\"id\":\"x\",\"n\":1}\n").expect("write");
        let started = std::time::Instant::now();
        let out = keel(
            &[
                "--broker",
                "kafka://127.0.0.1:1",
                "publish",
                "--topic",
                &topic,
                "--file",
                &bad_arg,
                "--key",
                "x",
            ],
            dir.path(),
            &[env[0], ("KEEL_PUBLISHER__ACK_TIMEOUT_MS", "6000")],
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("timed out"), "{stderr}");
        // The wait is not silent: after 3 s the broker's silence is said.
        assert!(
            stderr.contains("no answer from Kafka at 127.0.0.1:1 after 3 s"),
            "{stderr}"
        );
        // 6 s asked; the default would be 30 s.
        let waited = started.elapsed();
        assert!(waited < std::time::Duration::from_secs(15), "{waited:?}");
    }
    // One event too large among good ones: the receipt of what was stored
    // still comes out, and the error names the lines to send again (the
    // client refuses the second at its send, after the first went out;
    // the third is not sent: its key's order).
    let partial = format!("{topic}-partial");
    run(&["topics", "create", &partial, "--partitions", "6"]);
    let huge = "x".repeat(3 << 20);
    std::fs::write(
        &bad,
        format!(
            "{{\"id\":\"a\",\"n\":1}}\n{{\"id\":\"{huge}\",\"n\":2}}\n{{\"id\":\"c\",\"n\":3}}\n"
        ),
    )
    .expect("write");
    // `bad`'s lines to the partial topic, under the topic's subject.
    let subject = format!("{topic}-value");
    let publish_partial = |key: &'static str| {
        [
            "publish",
            "--topic",
            partial.as_str(),
            "--subject",
            subject.as_str(),
            "--file",
            bad_arg.as_str(),
            "--key",
            key,
        ]
    };
    let out = keel(&publish_partial("x"), dir.path(), &env);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("line 2 (event "), "{stderr}");
    let receipts: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a receipt"))
        .collect();
    assert_eq!(receipts.len(), 1, "line 1 was stored: {stdout}{stderr}");
    assert_eq!(receipts[0]["topic"], partial.as_str(), "{stdout}");
    assert!(stderr.contains("not sent: line 3"), "{stderr}");
    if !broker.starts_with("nats://") {
        // A misspelt topic is named at once, not after the acknowledgement
        // timeout (30 s here) librdkafka would hold its events for.
        let missing = format!("{topic}-missing");
        let started = std::time::Instant::now();
        let out = keel(
            &[
                "publish",
                "--topic",
                &missing,
                "--subject",
                &subject,
                "--file",
                &bad_arg,
                "--key",
                "x",
            ],
            dir.path(),
            &env,
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
        assert!(
            stderr.contains("no such topic")
                && stderr.contains(&format!("keel topics create {missing}"))
                && stderr.contains("none stored"),
            "{stderr}"
        );
        let waited = started.elapsed();
        assert!(waited < std::time::Duration::from_secs(20), "{waited:?}");
    }

    // No schema under the topic's default subject: the hint names both ways.
    let other = format!("{topic}-other");
    let out = keel(
        &[
            "publish", "--topic", &other, "--file", &bad_arg, "--key", "x",
        ],
        dir.path(),
        &env,
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("`{other}-value`")) && stderr.contains("--subject"),
        "{stderr}"
    );
    let out = keel(
        &["publish", "--topic", &topic, "--file", &bad_arg],
        dir.path(),
        &env,
    );
    assert!(
        text(&out.stderr).contains("--key-field"),
        "{}",
        text(&out.stderr)
    );

    // A tail from the latest position says which partitions it holds as
    // they come; an event published once it holds them all is shown (NATS
    // fixed the start only about a second in, silently missing what came
    // before, with no sign of when).
    {
        use std::io::BufRead as _;
        let mut tail = command(
            &[
                "tail", "--topic", &partial, "--from", "latest", "--count", "1",
            ],
            dir.path(),
            &env,
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start keel tail");
        let stderr = std::io::BufReader::new(tail.stderr.take().expect("stderr"));
        let (lines_in, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines() {
                if lines_in.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut said = String::new();
        // Every one of its 6 partitions: a member may take them one at a
        // time (NATS), each listed once its start is fixed.
        while !said.contains("partitions [0, 1, 2, 3, 4, 5]") {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(Ok(line)) => {
                    said.push_str(&line);
                    said.push('\n');
                }
                _ => {
                    let _ = tail.kill();
                    panic!("the tail did not say it reads within 60 s: {said}");
                }
            }
        }
        std::fs::write(&bad, "{\"id\":\"after\",\"n\":7}\n").expect("write");
        run(&publish_partial("after"));
        let started = std::time::Instant::now();
        while tail.try_wait().expect("the tail's status").is_none() {
            if started.elapsed() > std::time::Duration::from_secs(60) {
                let _ = tail.kill();
                panic!("the tail missed the event published after it said it reads: {said}");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = tail.wait_with_output().expect("the tail's output");
        let shown: serde_json::Value =
            serde_json::from_str(text(&out.stdout).trim()).expect("one JSON line");
        assert_eq!(shown["key"], "after", "{shown}");
    }

    // Read back: decoded events with key, type, headers, partition, offset.
    let tailed = run(&[
        "tail", "--topic", &topic, "--group", &group, "--from", "earliest", "--count", "10",
    ]);
    let events: Vec<serde_json::Value> = tailed
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(events.len(), 10);
    let mut seen: Vec<i64> = events
        .iter()
        .map(|e| e["event"]["n"].as_i64().expect("decoded n"))
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    for e in &events {
        assert_eq!(e["type"], "test.Greeting");
        assert_eq!(e["key"], e["event"]["id"]);
        assert!(e["partition"].is_u64() && e["offset"].is_u64(), "{e}");
    }

    let lag = run(&["lag", "--group", &group, "--topic", &topic]);
    assert!(!lag.contains("committed nothing"), "{lag}");
    // A group that never committed (a misspelt name) is said to be one,
    // on either broker.
    let never = run(&[
        "lag",
        "--group",
        &format!("{group}-never"),
        "--topic",
        &topic,
    ]);
    assert!(never.contains("has committed nothing"), "{never}");
    assert!(lag.contains("events behind"), "{lag}");
    let reset_to_earliest = || {
        run(&[
            "group",
            "reset",
            "--group",
            &group,
            "--topic",
            &topic,
            "--to-earliest",
        ])
    };
    let reset = reset_to_earliest();
    assert_eq!(reset.lines().count(), partitions, "{reset}");
    assert!(run(&["group", "list"]).contains(&group));
    // A reset of a name with no position (misspelt?) says so; of a group
    // that had one, it does not.
    let reset_stderr = |group: &str| {
        let out = keel(
            &[
                "group",
                "reset",
                "--group",
                group,
                "--topic",
                &topic,
                "--to-earliest",
            ],
            dir.path(),
            &env,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    let fresh = reset_stderr(&format!("{group}-fresh"));
    assert!(fresh.contains("had no position"), "{fresh}");
    let known = reset_stderr(&group);
    assert!(!known.contains("had no position"), "{known}");
    // The reset group reads everything again.
    let again = run(&[
        "tail", "--topic", &topic, "--group", &group, "--count", "10",
    ]);
    assert_eq!(again.lines().count(), 10, "{again}");

    // The registry down: the tail stops with the reason and commits
    // nothing it could not decode (each event used to be printed as
    // undecodable and committed as read).
    reset_to_earliest();
    let out = keel(
        &[
            "--registry",
            "http://127.0.0.1:1",
            "tail",
            "--topic",
            &topic,
            "--group",
            &group,
            "--count",
            "10",
        ],
        dir.path(),
        &env,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the schema registry failed")
            && stderr.contains("nothing from there on was committed"),
        "{stderr}"
    );
    assert_eq!(text(&out.stdout), "");
    let again = run(&[
        "tail", "--topic", &topic, "--group", &group, "--count", "10",
    ]);
    assert_eq!(again.lines().count(), 10, "{again}");

    // SIGTERM (a service manager's stop) ends a tail as Ctrl-C does: it
    // leaves its group, removes it (a throw-away group) and exits 0.
    let throwaway_groups = || -> std::collections::BTreeSet<String> {
        run(&["group", "list"])
            .lines()
            .filter_map(|l| l.split('\t').next())
            .filter(|name| name.starts_with("keel-tail-"))
            .map(str::to_owned)
            .collect()
    };
    let before = throwaway_groups();
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["tail", "--topic", &topic, "--from", "earliest"])
        .current_dir(dir.path())
        .envs(env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start keel tail");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        tail.stdout.take().expect("tail's stdout"),
    ));
    assert!(
        lines.next().is_some_and(|l| l.is_ok()),
        "tail printed nothing"
    );
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &tail.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    // Its stdout stays open until it ended: a closed pipe would end it
    // cleanly on its own.
    let status = tail.wait().expect("tail ends");
    drop(lines);
    let mut stderr = String::new();
    if let Some(mut pipe) = tail.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert!(status.success(), "{status}: {stderr}");
    let left: Vec<String> = throwaway_groups().difference(&before).cloned().collect();
    assert!(left.is_empty(), "throw-away groups left: {left:?}");

    // A reader that goes away (`keel … | head -0`) ends the command
    // quietly, never with a panic.
    let out = keel_unread(&["topics", "list"], dir.path(), &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );

    let status = |args: &[&str]| keel(args, dir.path(), &env);
    dlq_commands(broker, &topic, &registry.url, &run, &status);

    // A topic that does not exist: refused at once on either broker (a
    // Kafka consumer alone would wait for it without end).
    let missing = format!("{topic}-missing");
    let out = keel(
        &["tail", "--topic", &missing, "--count", "1"],
        dir.path(),
        &env,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("keel topics create"),
        "{}",
        text(&out.stderr)
    );

    // Not a broker: refused by name.
    let out = keel(
        &["--broker", "memory://", "tail", "--topic", &topic],
        dir.path(),
        &env,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("needs a broker"),
        "{}",
        text(&out.stderr)
    );
}

/// `dlq list` and `dlq redrive` on dead letters of `topic` (whose
/// `test.Greeting` schema is registered) stored as the router's dead-letter
/// layer stores them, plus a later dead letter of an event already there
/// (redriven and failed again) and one another producer wrote. `run`
/// asserts success, `status` does not.
fn dlq_commands(
    broker: &str,
    topic: &str,
    registry_url: &str,
    run: &dyn Fn(&[&str]) -> String,
    status: &dyn Fn(&[&str]) -> Output,
) {
    use keel_consumers::router::dead_letter::{default_suffix, headers};
    use keel_core::{Envelope, Publisher, RawRecord};
    use keel_schemas::Registry;

    let nats = broker.starts_with("nats://");
    let dlq = format!(
        "{topic}{}",
        default_suffix(if nats { "nats" } else { "kafka" })
    );
    run(&["topics", "create", &dlq, "--partitions", "1"]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (ids, publisher, refailed) = runtime.block_on(async {
        let registry =
            keel_schemas::RegistryClient::new(registry_url, keel_schemas::ClientOptions::default())
                .expect("registry client");
        let schema = r#"{"type":"record","name":"Greeting","namespace":"test","fields":[{"name":"id","type":"string"},{"name":"n","type":"long"}]}"#;
        let id = registry
            .register(&format!("{topic}-value"), schema)
            .await
            .expect("the registered schema's id");
        let codec = keel_schemas::AvroCodec::new(
            std::sync::Arc::new(registry),
            keel_schemas::CodecOptions::default(),
        );
        let publisher: Box<dyn Publisher> = if nats {
            Box::new(
                keel_producers::nats::JetStreamPublisher::connect(
                    keel_producers::nats::JetStreamPublisherConfig::new(
                        keel_producers::nats::NatsClientConfig::new(broker),
                    ),
                )
                .await
                .expect("NATS publisher"),
            )
        } else {
            Box::new(
                keel_producers::kafka::KafkaPublisher::new(
                    keel_producers::kafka::KafkaPublisherConfig {
                        client: keel_producers::kafka::KafkaClientConfig::new([
                            broker.trim_start_matches("kafka://"),
                        ]),
                        ..Default::default()
                    },
                )
                .expect("Kafka publisher"),
            )
        };
        let mut records = Vec::new();
        let mut ids = Vec::new();
        for n in [100, 101] {
            let payload = codec
                .encode_with_id(id, &serde_json::json!({"id": "k9", "n": n}))
                .await
                .expect("encode");
            let event = Envelope::new("test.Greeting", "k9", payload);
            ids.push(event.id().to_string());
            records.push((RawRecord::from_envelope(&event).expect("record"), "retries-exhausted"));
        }
        let poison = RawRecord {
            key: Some("k8".into()),
            headers: vec![],
            payload: "not an event".into(),
        };
        records.push((poison, "poison"));
        // The first event again, dead-lettered an hour later.
        let again = records[0].0.clone();
        records.push((again, "fatal"));
        // The second event once more, dead-lettered after its redrive
        // (published below, after the first redrive).
        let mut refailed = None;
        for (i, (mut record, reason)) in records.into_iter().enumerate() {
            let at = if i == 3 {
                "2026-11-29T13:00:00.000Z"
            } else {
                "2026-11-29T12:00:00.000Z"
            };
            for (name, value) in [
                (headers::ERROR, "handler failed: boom"),
                (headers::REASON, reason),
                (headers::ATTEMPTS, "5"),
                (headers::TOPIC, topic),
                (headers::PARTITION, "0"),
                (headers::POSITION, "7"),
                (headers::GROUP, "billing"),
                (headers::AT, at),
            ] {
                record.headers.push((name.to_owned(), value.to_owned().into()));
            }
            if i == 1 {
                let mut later = record.clone();
                for (name, value) in &mut later.headers {
                    if name == headers::AT {
                        *value = "2026-11-29T14:00:00.000Z".into();
                    }
                }
                refailed = Some(later);
            }
            publisher.publish_record(&dlq, record).await.expect("store a dead letter");
        }
        // Another producer's record: no original topic to send it back to.
        let foreign = Envelope::new("test.Foreign", "k7", b"x".to_vec());
        let foreign = RawRecord::from_envelope(&foreign).expect("record");
        publisher.publish_record(&dlq, foreign).await.expect("store a foreign record");
        (ids, publisher, refailed.expect("the second letter"))
    });

    let mut listed: Vec<serde_json::Value> = run(&["dlq", "list", "--topic", topic])
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    listed.sort_by_key(|l| l["dlq_position"].as_u64());
    assert_eq!(listed.len(), 5, "{listed:?}");
    assert_eq!(listed[3]["reason"], "fatal");
    assert_eq!(listed[3]["id"], ids[0].as_str());
    assert_eq!(listed[4]["type"], "test.Foreign");
    assert!(listed[4]["topic"].is_null(), "{}", listed[4]);
    // A dead-letter topic read for one original topic: only its letters.
    let only_topic = run(&["dlq", "list", "--dlq-topic", &dlq, "--topic", topic]);
    assert_eq!(only_topic.lines().count(), 4, "{only_topic}");
    let other = run(&["dlq", "list", "--dlq-topic", &dlq, "--topic", "elsewhere"]);
    assert_eq!(other.lines().count(), 0, "{other}");
    // A topic of ordinary events taken for a dead-letter topic: listed,
    // with a warning that they are not dead letters.
    let out = status(&["dlq", "list", "--dlq-topic", topic]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("carry no `keel-dlq-reason` header")
            && stderr.contains(&format!("is {topic} the dead-letter topic?")),
        "{stderr}"
    );
    // The registry down: the listing stops with the reason rather than
    // show every letter as undecodable and succeed.
    let out = status(&[
        "--registry",
        "http://127.0.0.1:1",
        "dlq",
        "list",
        "--topic",
        topic,
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the schema registry failed"), "{stderr}");
    // (A poison letter, undecodable without the registry, may come first.)
    assert!(
        !text(&out.stdout).contains("unreachable"),
        "{}",
        text(&out.stdout)
    );
    for line in &listed[..2] {
        assert_eq!(line["reason"], "retries-exhausted");
        assert_eq!(line["error"], "handler failed: boom");
        assert_eq!(line["attempts"], 5);
        assert_eq!(line["topic"], topic);
        assert_eq!(line["position"], 7);
        assert_eq!(line["type"], "test.Greeting");
        assert_eq!(line["key"], "k9");
        assert!(line["event"]["n"].as_i64().is_some(), "decoded: {line}");
    }
    assert_eq!(listed[2]["reason"], "poison");
    assert!(
        listed[2]["event"]["undecodable"].is_string(),
        "{}",
        listed[2]
    );
    let poison_only = run(&["dlq", "list", "--topic", topic, "--reason", "poison"]);
    assert_eq!(poison_only.lines().count(), 1, "{poison_only}");
    let later = run(&[
        "dlq",
        "list",
        "--topic",
        topic,
        "--since",
        "2026-11-29T12:30:00Z",
    ]);
    assert_eq!(later.lines().count(), 1, "{later}");

    let dry = run(&[
        "dlq",
        "redrive",
        "--topic",
        topic,
        "--type",
        "test.Greeting",
        "--dry-run",
    ]);
    assert_eq!(
        dry.lines()
            .filter(|l| l.starts_with("would redrive"))
            .count(),
        2,
        "{dry}"
    );
    // Three dead letters of two events: each event goes back once.
    let redriven = run(&[
        "dlq",
        "redrive",
        "--topic",
        topic,
        "--type",
        "test.Greeting",
    ]);
    assert_eq!(
        redriven
            .lines()
            .filter(|l| l.starts_with("redrove"))
            .count(),
        2,
        "{redriven}"
    );
    // Each redrive is recorded in the dead-letter topic: a second one sends
    // nothing (the tail below finds each event back once), unless asked.
    let again = status(&[
        "dlq",
        "redrive",
        "--topic",
        topic,
        "--type",
        "test.Greeting",
    ]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        !text(&again.stdout).contains("redrove"),
        "{}",
        text(&again.stdout)
    );
    assert!(
        text(&again.stderr).contains("2 letters already redriven"),
        "{}",
        text(&again.stderr)
    );
    let forced = run(&[
        "dlq",
        "redrive",
        "--topic",
        topic,
        "--type",
        "test.Greeting",
        "--include-redriven",
        "--dry-run",
    ]);
    assert_eq!(
        forced
            .lines()
            .filter(|l| l.starts_with("would redrive"))
            .count(),
        2,
        "{forced}"
    );
    let listed_after = run(&["dlq", "list", "--topic", topic]);
    assert_eq!(
        listed_after.lines().count(),
        5,
        "markers are not listed: {listed_after}"
    );
    // The second event fails again after its redrive: its newer letter
    // goes back, alone.
    runtime
        .block_on(publisher.publish_record(&dlq, refailed))
        .expect("store a newer dead letter");
    let third = run(&[
        "dlq",
        "redrive",
        "--topic",
        topic,
        "--type",
        "test.Greeting",
    ]);
    assert_eq!(
        third.lines().filter(|l| l.starts_with("redrove")).count(),
        1,
        "{third}"
    );
    // The foreign record is skipped, named, and the command fails.
    let out = status(&["dlq", "redrive", "--topic", topic, "--key", "k7"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("skipped"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("1 more dead letters matched but were skipped"),
        "{}",
        text(&out.stderr)
    );

    // Back in the original topic, with the original event ids and without
    // the dead-letter headers; the dry run published nothing.
    let tailed = run(&[
        "tail", "--topic", topic, "--from", "earliest", "--count", "13",
    ]);
    let back: Vec<serde_json::Value> = tailed
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|e| e["key"] == "k9")
        .collect();
    // The first event once, the second twice (redriven, failed again,
    // redriven again).
    assert_eq!(back.len(), 3, "{tailed}");
    for e in &back {
        assert!(
            ids.contains(&e["id"].as_str().unwrap_or_default().to_owned()),
            "{e}"
        );
        assert!(
            e["headers"]
                .as_object()
                .is_none_or(|h| h.keys().all(|k| !k.starts_with("keel-dlq-"))),
            "{e}"
        );
    }
    // The dead-letter topic as `keel tail` shows it: five letters, the
    // newer one and three markers, each marker naming the letter it
    // covers (not shown as an undecodable record, as the poison letter is).
    let dlq_tailed = run(&[
        "tail", "--topic", &dlq, "--from", "earliest", "--count", "9",
    ]);
    let lines: Vec<serde_json::Value> = dlq_tailed
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 9, "{dlq_tailed}");
    let markers: Vec<&serde_json::Value> = lines
        .iter()
        .filter_map(|l| l.get("redrive_marker"))
        .collect();
    assert_eq!(markers.len(), 3, "{dlq_tailed}");
    for marker in markers {
        assert!(
            marker["letter"].as_str().is_some_and(|l| l.contains('@')),
            "{marker}"
        );
        assert!(
            ids.contains(&marker["id"].as_str().unwrap_or_default().to_owned()),
            "{marker}"
        );
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["undecodable"].is_string())
            .count(),
        1,
        "only the poison letter: {dlq_tailed}"
    );
}
