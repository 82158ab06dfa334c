//! `keel relay` as an operator runs it: against a real PostgreSQL outbox
//! and nats-server it publishes committed events, serves its metrics,
//! stops on SIGTERM releasing its slots, and refuses bad settings by name.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::Envelope;
use keel_producers::outbox::{Outbox, OutboxTables};
use sqlx::{Connection, Executor, PgPool};

fn env(name: &str, hint: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: {hint} (infra/local/test.sh sets it)"))
}

/// A fresh database on the test server; returns its URL.
async fn database() -> String {
    let server = env("KEEL_TEST_DATABASE_URL", "point it at PostgreSQL");
    let name = format!("keel_cli_{:016x}", rand_u64());
    let mut admin = sqlx::PgConnection::connect(&server)
        .await
        .expect("connect to PostgreSQL");
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create database");
    let mut url = url::Url::parse(&server).expect("database URL");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

fn keel() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    for (key, _) in std::env::vars() {
        if key.starts_with("KEEL_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_serves_metrics_and_stops_on_sigterm() {
    let nats = env("KEEL_TEST_NATS", "point it at nats-server");
    let url = database().await;
    let topic = format!("cli-relay-{:016x}", rand_u64());
    let created = keel()
        .args([
            "--broker",
            &nats,
            "topics",
            "create",
            &topic,
            "--partitions",
            "2",
        ])
        .output()
        .expect("run keel");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    let port = free_port();
    let relay = keel()
        .args([
            "--broker",
            &nats,
            "relay",
            "--database",
            &url,
            "--relay-id",
            "cli-relay",
            "--metrics-listen",
            &format!("localhost:{port}"),
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("start keel relay");

    // The relay migrates the outbox; enqueue once the tables are there
    // (the archive comes with the last migration, each of which commits on
    // its own: the leases table of the first is not enough).
    // Every counter is there from the start, at 0 (rate() and absence
    // alerts need the series before the first row is published).
    let scrape = || async {
        match reqwest::get(format!("http://localhost:{port}/metrics")).await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    };
    let started = Instant::now();
    let before = loop {
        let metrics = scrape().await;
        if metrics.contains("keel_outbox_parked_total")
            || started.elapsed() > Duration::from_secs(30)
        {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for counter in [
        "keel_outbox_published_total 0",
        "keel_outbox_publish_failures_total 0",
        "keel_outbox_parked_total 0",
        "keel_outbox_failed_batches_total 0",
    ] {
        assert!(before.contains(counter), "no `{counter}` in:\n{before}");
    }
    let pool = PgPool::connect(&url).await.expect("connect");
    enqueue_three_once_migrated(&pool, &topic).await;
    wait_for_archived(&pool, 3, Duration::from_secs(30)).await;
    // The counter moves after the mark's commit returns: polled.
    let started = Instant::now();
    let metrics = loop {
        let metrics = reqwest::get(format!("http://localhost:{port}/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        if metrics.contains("keel_outbox_published_total 3")
            || started.elapsed() > Duration::from_secs(10)
        {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        metrics.contains("keel_outbox_published_total 3"),
        "{metrics}"
    );
    assert!(metrics.contains("keel_outbox_backlog"), "{metrics}");

    let described = keel()
        .args(["--broker", &nats, "topics", "describe", &topic])
        .output()
        .expect("run keel");
    let described: serde_json::Value =
        serde_json::from_slice(&described.stdout).expect("describe JSON");
    let stored: u64 = described["messages_per_partition"]
        .as_array()
        .expect("messages per partition")
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    assert_eq!(stored, 3, "{described}");

    // SIGTERM: a graceful stop that hands the slots back at once.
    let status = stop(relay);
    assert!(status.success(), "{status}");
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM keel.outbox_leases WHERE owner IS NOT NULL")
            .fetch_one(&pool)
            .await
            .expect("query");
    assert_eq!(held, 0);

    pool.close().await;
    let admin = keel_producers::nats::JetStreamAdmin::connect(
        &keel_producers::nats::NatsClientConfig::new(nats),
    )
    .await
    .expect("NATS admin");
    admin.delete_topic(&topic).await.expect("delete the stream");
    drop_database(&url).await;
}

/// Once the relay has migrated the outbox (the archive comes with the last
/// migration, each of which commits on its own: the leases table of the
/// first is not enough), enqueues three events for `topic`.
async fn enqueue_three_once_migrated(pool: &PgPool, topic: &str) {
    let started = Instant::now();
    loop {
        let ready: bool =
            sqlx::query_scalar("SELECT to_regclass('keel.outbox_archive') IS NOT NULL")
                .fetch_one(pool)
                .await
                .expect("query");
        if ready {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "keel relay never created its tables"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outbox = Outbox::new(OutboxTables::default(), local_codec());
    let mut tx = pool.begin().await.expect("begin");
    for i in 0..3 {
        let event = Envelope::new("test.Event", format!("k{i}"), format!("{i}"));
        outbox
            .enqueue(&mut tx, topic, &event)
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
}

/// Waits until `n` rows were published (moved to the archive), at most
/// `limit`.
async fn wait_for_archived(pool: &PgPool, n: i64, limit: Duration) {
    let started = Instant::now();
    loop {
        let published: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.outbox_archive")
            .fetch_one(pool)
            .await
            .expect("query");
        if published == n {
            break;
        }
        assert!(started.elapsed() < limit, "{published} of {n} published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A relay started while its NATS server is down keeps trying (as it backs
/// off from a broker that goes away later) instead of exiting, and
/// publishes what was committed meanwhile once the server is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_while_nats_is_down_publishes_once_it_is_up() {
    let url = database().await;
    let topic = format!("cli-relay-late-{:016x}", rand_u64());
    let port = free_port();
    let nats = format!("nats://127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("keel-relay-late-{:016x}.log", rand_u64()));
    let mut relay = keel()
        .args(["--broker", &nats, "relay", "--database", &url])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log file"))
        .spawn()
        .expect("start keel relay");
    let pool = PgPool::connect(&url).await.expect("connect");
    enqueue_three_once_migrated(&pool, &topic).await;
    // Down for a while: the relay waits, it does not give up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        relay.try_wait().expect("relay status").is_none(),
        "the relay exited while the broker was down: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let store = std::env::temp_dir().join(format!("keel-nats-late-{:016x}", rand_u64()));
    let _server = Stopped(
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (Debian's package puts it in /usr/sbin)"),
    );
    let started = Instant::now();
    loop {
        let created = keel()
            .args(["--broker", &nats, "topics", "create", &topic])
            .output()
            .expect("run keel");
        if created.status.success() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "cannot create the topic: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The relay's back-off is at most 30 s between tries.
    wait_for_archived(&pool, 3, Duration::from_secs(60)).await;

    let status = stop(relay);
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("the broker cannot be reached; trying again"),
        "{stderr}"
    );
    drop(_server);
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_file(&log);
    pool.close().await;
    drop_database(&url).await;
}

/// A child process killed when dropped (also when an assertion fails).
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGTERM (a service manager's stop), then the exit status.
fn stop(mut process: std::process::Child) -> std::process::ExitStatus {
    let pid = process.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    process.wait().expect("wait")
}

async fn drop_database(url: &str) {
    let server = env("KEEL_TEST_DATABASE_URL", "point it at PostgreSQL");
    let name = url.rsplit('/').next().unwrap_or_default().to_owned();
    let mut admin = sqlx::PgConnection::connect(&server)
        .await
        .expect("connect to PostgreSQL");
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .expect("drop database");
}

#[test]
fn relay_refuses_bad_settings_by_name() {
    let cases: [(&[&str], &str); 6] = [
        (
            // No broker: refused before the database is touched (nothing
            // listens on port 1: a relay that connected first would name
            // the database, and would have created the outbox tables).
            &["relay", "--database", "postgres://127.0.0.1:1/x"],
            "`keel relay` needs a broker",
        ),
        (
            &["--broker", "nats://127.0.0.1:4222", "relay"],
            "--database",
        ),
        (
            &[
                "--broker",
                "nats://127.0.0.1:4222",
                "relay",
                "--database",
                "sqlite://x.db",
            ],
            "PostgreSQL",
        ),
        (
            &[
                "--broker",
                "nats://127.0.0.1:4222",
                "relay",
                "--database",
                "postgres://127.0.0.1/x",
                "--schema",
                "Robert'); DROP TABLE students;--",
            ],
            // The setting and the flag that sets it.
            "outbox.schema (keel's --schema)",
        ),
        (
            // Refused before the database is touched (nothing listens on
            // port 1: a relay that connected first would name the database).
            &[
                "--broker",
                "nats://127.0.0.1:4222",
                "relay",
                "--database",
                "postgres://127.0.0.1:1/x",
                "--metrics-listen",
                "127.0.0.1:notaport",
            ],
            "--metrics-listen 127.0.0.1:notaport",
        ),
        (
            // Named by its flag (`relay.batch_size` is no keel.toml key).
            &[
                "--broker",
                "nats://127.0.0.1:4222",
                "relay",
                "--database",
                "postgres://127.0.0.1:1/x",
                "--batch-size",
                "0",
            ],
            "invalid setting `--batch-size`",
        ),
    ];
    for (args, expected) in cases {
        let out = keel().args(args).output().expect("run keel");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "keel {args:?}: {stderr}");
        assert!(stderr.contains(expected), "keel {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A codec on an in-process registry.
fn local_codec() -> Arc<keel_schemas::AvroCodec> {
    Arc::new(keel_schemas::AvroCodec::new(
        Arc::new(keel_schemas::LocalRegistry::new()),
        keel_schemas::CodecOptions::default(),
    ))
}

/// The events the parked-rows tests enqueue (keys o-1 and p-1 get parked).
fn parkable_events() -> [(&'static str, Envelope); 3] {
    [("orders", "o-1"), ("orders", "o-2"), ("payments", "p-1")]
        .map(|(topic, key)| (topic, Envelope::new("test.Event", key, "{}")))
}

/// Runs `keel` with `args`; returns (exit code, stdout, stderr).
fn keel_output(args: &[&str]) -> (Option<i32>, String, String) {
    let out = keel().args(args).output().expect("run keel");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_rows_are_listed_with_their_errors_requeued_and_discarded_by_selection() {
    let url = database().await;
    let pool = PgPool::connect(&url).await.expect("connect");
    let tables = OutboxTables::default();
    tables.migrate(&pool).await.expect("migrate");
    let outbox = Outbox::new(tables, local_codec());
    let mut tx = pool.begin().await.expect("begin");
    for (topic, event) in parkable_events() {
        outbox
            .enqueue(&mut tx, topic, &event)
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    // What a relay leaves behind after max_attempts refusals (the relay's
    // parking itself is tested in keel-integration-tests' outbox tests).
    sqlx::query(
        "UPDATE keel.outbox SET attempts = 5, parked_at = now(), \
         last_error = 'Message size too large' WHERE event_key <> 'o-2'",
    )
    .execute(&pool)
    .await
    .expect("park two rows");
    let parked_ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM keel.outbox WHERE parked_at IS NOT NULL ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("query");
    assert_eq!(parked_ids.len(), 2);

    let (code, out, err) = keel_output(&["outbox", "parked", "--database", &url]);
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[0]["id"], parked_ids[0]);
    assert_eq!(rows[0]["key"], "o-1");
    assert_eq!(rows[0]["topic"], "orders");
    assert_eq!(rows[0]["attempts"], 5);
    assert_eq!(rows[0]["last_error"], "Message size too large");
    assert_eq!(rows[0]["payload_bytes"], 2);
    assert_eq!(rows[1]["key"], "p-1");
    assert!(err.contains("2 parked row(s)"), "{err}");

    let (code, out, _) = keel_output(&["outbox", "parked", "--database", &url, "--topic", "nope"]);
    assert_eq!((code, out.as_str()), (Some(0), ""));

    // No selection: refused, nothing requeued.
    let (code, _, err) = keel_output(&["outbox", "requeue", "--database", &url]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--all"), "{err}");
    let (code, _, err) = keel_output(&[
        "outbox",
        "requeue",
        "--database",
        &url,
        "--all",
        "--topic",
        "orders",
    ]);
    assert_eq!(code, Some(2), "--all with --topic is a usage error: {err}");

    let first = parked_ids[0].to_string();
    let (code, out, err) = keel_output(&["outbox", "requeue", "--database", &url, "--id", &first]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("requeued 1 parked row(s)"), "{out}");
    let (attempts, parked): (i32, bool) =
        sqlx::query_as("SELECT attempts, parked_at IS NOT NULL FROM keel.outbox WHERE id = $1")
            .bind(parked_ids[0])
            .fetch_one(&pool)
            .await
            .expect("query");
    assert_eq!(
        (attempts, parked),
        (0, false),
        "back in line, attempts reset"
    );

    let (code, out, err) = keel_output(&["outbox", "requeue", "--database", &url, "--all"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("requeued 1 parked row(s)"), "{out}");
    let (code, out, _) = keel_output(&["outbox", "parked", "--database", &url]);
    assert_eq!((code, out.as_str()), (Some(0), ""));

    // Discarded: deleted and printed for the record; needs a selection.
    sqlx::query("UPDATE keel.outbox SET attempts = 5, parked_at = now() WHERE id = $1")
        .bind(parked_ids[1])
        .execute(&pool)
        .await
        .expect("park again");
    let (code, _, err) = keel_output(&["outbox", "discard", "--database", &url]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--all"), "{err}");
    let second = parked_ids[1].to_string();
    let (code, out, err) = keel_output(&["outbox", "discard", "--database", &url, "--id", &second]);
    assert_eq!(code, Some(0), "{err}");
    let discarded: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(discarded["key"], "p-1");
    assert!(err.contains("discarded 1 parked row(s)"), "{err}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.outbox WHERE id = $1")
        .bind(parked_ids[1])
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(left, 0, "the discarded row is gone");

    // Many parked rows go a batch at a time, every one printed.
    let mut tx = pool.begin().await.expect("begin");
    for n in 0..2_500 {
        let event = Envelope::new("shop.Parked", format!("many-{n}"), vec![0u8, 1]);
        outbox
            .enqueue(&mut tx, "many", &event)
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    sqlx::query("UPDATE keel.outbox SET attempts = 5, parked_at = now() WHERE topic = 'many'")
        .execute(&pool)
        .await
        .expect("park them");
    // Output that closes after one line (`| head -1`): the batch being
    // printed is not deleted, and the command fails saying so.
    let mut child = keel()
        .args(["outbox", "discard", "--database", &url, "--all"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keel");
    let mut first = String::new();
    {
        use std::io::BufRead as _;
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .expect("read a line");
    } // the reading end closes here, a thousand rows' worth of output unread
    let closed = child.wait_with_output().expect("keel ends");
    let err = String::from_utf8_lossy(&closed.stderr);
    assert!(first.contains("many-"), "{first}");
    assert!(!closed.status.success(), "a closed output fails: {err}");
    assert!(
        err.contains("put back and stay parked") && err.contains("discarded 0 parked row(s)"),
        "{err}"
    );
    let parked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM keel.outbox WHERE topic = 'many' AND parked_at IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .expect("query");
    assert_eq!(parked, 2_500, "nothing is discarded unrecorded");

    let (code, out, err) = keel_output(&["outbox", "discard", "--database", &url, "--all"]);
    assert_eq!(code, Some(0), "{err}");
    let keys: HashSet<String> = out
        .lines()
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            row["key"].as_str().expect("a key").to_owned()
        })
        .collect();
    assert_eq!(
        out.lines().count(),
        2_500,
        "each discarded row printed once"
    );
    assert_eq!(keys.len(), 2_500, "every discarded row printed");
    assert!(err.contains("discarded 2500 parked row(s)"), "{err}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM keel.outbox WHERE topic = 'many'")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(left, 0);

    pool.close().await;
    drop_database(&url).await;
}

#[test]
fn outbox_commands_refuse_bad_settings_by_name() {
    for (args, expected) in [
        (&["outbox", "parked"][..], "--database"),
        (
            &["outbox", "requeue", "--all", "--database", "mysql://x/y"][..],
            "PostgreSQL",
        ),
        (
            &["outbox", "parked", "--database", "postgres://127.0.0.1:1/x"][..],
            "cannot connect to the outbox database",
        ),
        (
            &[
                "outbox",
                "parked",
                "--database",
                "sqlite:///nonexistent-keel-dir/outbox.db",
            ][..],
            "the file must exist",
        ),
    ] {
        let (code, _, err) = keel_output(args);
        assert_eq!(code, Some(1), "keel {args:?}: {err}");
        assert!(err.contains(expected), "keel {args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_commands_name_a_missing_outbox_table() {
    let url = database().await;
    for args in [
        &["outbox", "parked", "--database", &url][..],
        // The relay told not to migrate: the outbox is what is missing
        // (not, as it said, its archive). Kafka's client connects lazily:
        // the tables are checked without a broker.
        &[
            "--broker",
            "kafka://127.0.0.1:9",
            "relay",
            "--database",
            &url,
            "--no-migrate",
        ][..],
        &[
            "outbox",
            "requeue",
            "--all",
            "--database",
            &url,
            "--schema",
            "orders",
        ][..],
    ] {
        let (code, _, err) = keel_output(args);
        assert_eq!(code, Some(1), "keel {args:?}: {err}");
        assert!(
            err.contains("there is no outbox table"),
            "keel {args:?}: {err}"
        );
        assert!(err.contains("--schema"), "keel {args:?}: {err}");
    }
    // A NATS server that is down is waited for (backed off), but the
    // missing table is said at once, not once the server answers.
    let nats = format!("nats://127.0.0.1:{}", free_port());
    let mut relay = keel()
        .args([
            "--broker",
            &nats,
            "relay",
            "--database",
            &url,
            "--no-migrate",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keel relay");
    let started = Instant::now();
    while relay.try_wait().expect("relay status").is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            stop(relay);
            panic!("the relay waited for its broker instead of naming the missing table");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = relay.wait_with_output().expect("relay output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("there is no outbox table"), "{err}");
    // An outbox whose other tables went missing: each is named.
    let pool = PgPool::connect(&url).await.expect("connect");
    OutboxTables::default()
        .migrate(&pool)
        .await
        .expect("migrate");
    for (table, expected) in [
        ("keel.outbox_leases", "has no relay table"),
        ("keel.outbox_archive", "has no archive table"),
    ] {
        sqlx::query(&format!("DROP TABLE {table}"))
            .execute(&pool)
            .await
            .expect("drop a table");
        let (code, _, err) = keel_output(&[
            "--broker",
            "kafka://127.0.0.1:9",
            "relay",
            "--database",
            &url,
            "--no-migrate",
        ]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(expected), "{table}: {err}");
    }
    pool.close().await;
    drop_database(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_outboxs_parked_rows_are_listed_requeued_and_discarded() {
    use keel_producers::outbox::sqlite::{SqliteOutbox, migrate_sqlite};
    let dir = std::env::temp_dir().join(format!("keel-cli-sqlite-{:016x}", rand_u64()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let url = format!("sqlite://{}", dir.join("outbox.db").display());
    let options: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("sqlite URL");
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect_with(options.create_if_missing(true))
        .await
        .expect("open");
    let tables = OutboxTables::default();
    migrate_sqlite(&tables, &pool).await.expect("migrate");
    let outbox = SqliteOutbox::new(&tables, local_codec());
    let mut tx = pool.begin().await.expect("begin");
    for (topic, event) in parkable_events() {
        outbox
            .enqueue(&mut tx, topic, &event)
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    sqlx::query(
        "UPDATE outbox SET attempts = 5, parked_at_ms = 1, \
         last_error = 'Message size too large' WHERE event_key <> CAST('o-2' AS BLOB)",
    )
    .execute(&pool)
    .await
    .expect("park two rows");

    let (code, out, err) = keel_output(&["outbox", "parked", "--database", &url]);
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[0]["key"], "o-1");
    assert_eq!(rows[0]["last_error"], "Message size too large");
    let first = rows[0]["id"].to_string();
    let (code, out, err) = keel_output(&["outbox", "requeue", "--database", &url, "--id", &first]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("requeued 1 parked row(s)"), "{out}");
    let (code, out, err) = keel_output(&[
        "outbox",
        "discard",
        "--database",
        &url,
        "--topic",
        "payments",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let discarded: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(discarded["key"], "p-1");
    let left: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT CAST(event_key AS TEXT), parked_at_ms FROM outbox ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("query");
    assert_eq!(
        left,
        [("o-1".to_owned(), None), ("o-2".to_owned(), None)],
        "o-1 requeued, p-1 discarded"
    );
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
