//! `keel-integration-tests`: the harness for tests against real servers.
//!
//! | function | the real service |
//! |---|---|
//! | [`kafka_bootstrap`] | a Kafka-compatible broker: `KEEL_TEST_KAFKA` (`host:port`), else an Apache Kafka (KRaft) container |
//! | [`nats_url`] | NATS with JetStream: `KEEL_TEST_NATS` (`nats://host:port`), else a `nats -js` container |
//! | [`postgres_url`] | PostgreSQL: `KEEL_TEST_DATABASE_URL`, else a `postgres` container |
//! | [`TestDatabase`] | a fresh, uniquely named database on that server, dropped afterwards |
//! | [`unique_name`] | a topic/stream/group name no other test uses |
//! | [`read_acked`] | the next `n` deliveries of a group member, acked, as text |
//! | [`kafka_topic`], [`kafka_publisher`] | a fresh Kafka topic, and a `KafkaPublisher` with default settings |
//! | [`RegistryUnderTest`] | Keel's registry server on `127.0.0.1:0`, on PostgreSQL or SQLite |
//! | [`NatsUnderTest`] | a private nats-server with JetStream (configurable, to kill and restart) |
//! | [`PostgresUnderTest`] | a private PostgreSQL cluster to crash and restart |
//! | [`TansuUnderTest`] | a private tansu broker process (durable `sqlite://` storage, to stop and restart, or `memory://`) |
//! | [`kafka_transport`], [`nats_transport`], [`nats_consumer_config`] | Keel's Kafka and NATS transports with test-speed group timings |
//! | [`faults`] | worker processes and their records, for the SIGKILL tests |
//! | [`outbox`] | a migrated outbox, concurrent writers, and the completeness and key-order checks |
//! | [`bench`] | what the benchmark binaries share: medians, percentiles, latency loops |
//! | [`tls`] | a private CA, and a TLS terminator in front of a plaintext server |
//! | [`sasl_plain`] | a SASL PLAIN front in front of a plaintext broker (tansu offers only SCRAM) |
//!
//! CI (`.ci/run`) starts the local services through `infra/local/` and sets
//! the variables; a laptop with Docker gets containers through
//! `testcontainers`. A service that is neither configured nor startable
//! fails the test with a message naming it — never a silent skip.

#![forbid(unsafe_code)]
// Test support: failing loudly with the service's name is the point.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

pub mod bench;
pub mod chain;
pub mod faults;
pub mod outbox;
pub mod sasl_plain;
pub mod tls;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, ImageExt};
use testcontainers_modules::kafka::apache;
use testcontainers_modules::nats::{Nats, NatsServerCmd};
use testcontainers_modules::postgres::Postgres;
use tokio::sync::OnceCell;

/// Environment variable naming the Kafka bootstrap server (`host:port`).
pub const KAFKA_ENV: &str = "KEEL_TEST_KAFKA";
/// Environment variable naming the NATS server (`nats://host:port`).
pub const NATS_ENV: &str = "KEEL_TEST_NATS";
/// Environment variable naming the PostgreSQL server (`postgres://…`).
pub const DATABASE_ENV: &str = "KEEL_TEST_DATABASE_URL";

/// A name unique to this test run: `<prefix>-<random hex>`. Valid as a Kafka
/// topic, a JetStream stream and a PostgreSQL identifier (after `-` → `_`).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

fn from_env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// Fails fast, naming the service, when a configured endpoint does not
/// accept connections (rather than after a client's long timeout).
async fn reachable(service: &str, var: &str, endpoint: &str, default_port: u16) {
    let authority = first_host(endpoint, default_port);
    let connect = tokio::net::TcpStream::connect(authority.clone());
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!(
            "{service} at {endpoint} ({var}) is not reachable on {authority}: {e}. Start it with infra/local/."
        ),
        Err(_) => panic!("{service} at {endpoint} ({var}) did not accept a connection within 5 s"),
    }
}

/// `host:port` of the first server in a URL or host list
/// (`kafka://a:9092,b:9092`, `nats://u:p@h`, `postgres://u@h/db`, `h:1`).
fn first_host(endpoint: &str, default_port: u16) -> String {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let rest = rest.split(',').next().unwrap_or(rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.split(['/', '?']).next().unwrap_or(rest);
    let has_port = match rest.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !port.ends_with(']') && port.parse::<u16>().is_ok()
        }
        None => false,
    };
    if has_port {
        rest.to_owned()
    } else {
        format!("{rest}:{default_port}")
    }
}

fn no_service(service: &str, var: &str, example: &str, error: impl std::fmt::Display) -> ! {
    panic!(
        "{service} is not available: {var} is not set and a container could not be started ({error}).\n\
         Start the local service (see infra/local/) and export {var}={example}, or run Docker."
    )
}

/// The Kafka bootstrap server for this test process.
pub async fn kafka_bootstrap() -> String {
    if let Some(addr) = from_env(KAFKA_ENV) {
        reachable("Kafka", KAFKA_ENV, &addr, 9092).await;
        return addr;
    }
    static KAFKA: OnceCell<(ContainerAsync<apache::Kafka>, String)> = OnceCell::const_new();
    let (_, addr) = KAFKA
        .get_or_init(|| async {
            let container = apache::Kafka::default()
                .start()
                .await
                .unwrap_or_else(|e| no_service("Kafka", KAFKA_ENV, "127.0.0.1:9092", e));
            let port = container
                .get_host_port_ipv4(apache::KAFKA_PORT)
                .await
                .unwrap_or_else(|e| no_service("Kafka", KAFKA_ENV, "127.0.0.1:9092", e));
            (container, format!("127.0.0.1:{port}"))
        })
        .await;
    addr.clone()
}

/// A new topic `<prefix>-<random hex>` with `partitions`, on the broker
/// `client` names.
pub async fn kafka_topic(
    client: &keel_producers::kafka::KafkaClientConfig,
    prefix: &str,
    partitions: u32,
) -> String {
    use keel_core::TopicAdmin;
    let name = unique_name(prefix);
    keel_producers::kafka::KafkaAdmin::new(client, 1)
        .unwrap_or_else(|e| panic!("Kafka admin client: {e}"))
        .ensure_topic(&keel_core::TopicSpec {
            name: name.clone(),
            partitions,
        })
        .await
        .unwrap_or_else(|e| panic!("create topic {name}: {e}"));
    name
}

/// A `KafkaPublisher` with default settings on `client`.
pub fn kafka_publisher(
    client: &keel_producers::kafka::KafkaClientConfig,
) -> keel_producers::kafka::KafkaPublisher {
    keel_producers::kafka::KafkaPublisher::new(keel_producers::kafka::KafkaPublisherConfig {
        client: client.clone(),
        ..keel_producers::kafka::KafkaPublisherConfig::default()
    })
    .unwrap_or_else(|e| panic!("Kafka publisher: {e}"))
}

/// The NATS (JetStream) server URL for this test process.
pub async fn nats_url() -> String {
    if let Some(url) = from_env(NATS_ENV) {
        reachable("NATS", NATS_ENV, &url, 4222).await;
        return url;
    }
    static NATS: OnceCell<(ContainerAsync<Nats>, String)> = OnceCell::const_new();
    let (_, url) = NATS
        .get_or_init(|| async {
            let container = Nats::default()
                .with_cmd(&NatsServerCmd::default().with_jetstream())
                .start()
                .await
                .unwrap_or_else(|e| no_service("NATS", NATS_ENV, "nats://127.0.0.1:4222", e));
            let port = container
                .get_host_port_ipv4(4222)
                .await
                .unwrap_or_else(|e| no_service("NATS", NATS_ENV, "nats://127.0.0.1:4222", e));
            (container, format!("nats://127.0.0.1:{port}"))
        })
        .await;
    url.clone()
}

/// A URL of the PostgreSQL server (its maintenance database) for this test
/// process. Tests that write should use [`TestDatabase`] instead.
pub async fn postgres_url() -> String {
    const EXAMPLE: &str = "postgres://postgres@127.0.0.1:5432/postgres";
    if let Some(url) = from_env(DATABASE_ENV) {
        reachable("PostgreSQL", DATABASE_ENV, &url, 5432).await;
        return url;
    }
    static POSTGRES: OnceCell<(ContainerAsync<Postgres>, String)> = OnceCell::const_new();
    let (_, url) = POSTGRES
        .get_or_init(|| async {
            let container = Postgres::default()
                .with_tag("16-alpine")
                .start()
                .await
                .unwrap_or_else(|e| no_service("PostgreSQL", DATABASE_ENV, EXAMPLE, e));
            let port = container
                .get_host_port_ipv4(5432)
                .await
                .unwrap_or_else(|e| no_service("PostgreSQL", DATABASE_ENV, EXAMPLE, e));
            (
                container,
                format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres"),
            )
        })
        .await;
    url.clone()
}

/// A fresh database for one test, created on the PostgreSQL server and
/// dropped (with its connections) when this value is dropped.
pub struct TestDatabase {
    name: String,
    url: String,
    server: PgConnectOptions,
    pool: PgPool,
}

impl TestDatabase {
    /// Creates `keel_test_<random>` on the server from [`postgres_url`].
    pub async fn create() -> TestDatabase {
        let server_url = postgres_url().await;
        let server: PgConnectOptions = server_url.parse().unwrap_or_else(|e| {
            panic!("{DATABASE_ENV}=`{server_url}` is not a PostgreSQL URL: {e}")
        });
        let name = unique_name("keel_test").replace('-', "_");
        let mut admin = server
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {server_url}: {e}"));
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        admin.close().await.ok();
        let options = server.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test database {name}: {e}"));
        let url = with_database(&server_url, &name);
        TestDatabase {
            name,
            url,
            server,
            pool,
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL that connects to this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connection pool on this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await; a short-lived runtime on its own thread does the
        // cleanup so it works from inside or outside a Tokio runtime.
        // `WITH (FORCE)` ends the pool's connections; the pool itself is not
        // closed here because its connections belong to the test's runtime.
        let (server, name) = (self.server.clone(), self.name.clone());
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut admin) = server.connect().await {
                    let _ = admin
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A private nats-server (the machine's binary, JetStream with file
/// storage in a temporary directory) on a free port, to configure, kill
/// and restart; killed when dropped.
pub struct NatsUnderTest {
    /// `<scheme>://127.0.0.1:<port>`.
    pub url: String,
    port: u16,
    config: std::path::PathBuf,
    dir: TempDir,
    child: Option<std::process::Child>,
}

impl NatsUnderTest {
    /// Starts a server with `fragment` added to its config (authorization,
    /// TLS); `scheme` is `nats` or `tls` for [`NatsUnderTest::url`].
    pub fn start(fragment: &str, scheme: &str) -> NatsUnderTest {
        Self::start_in(TempDir::new(), fragment, scheme)
    }

    /// As [`NatsUnderTest::start`], in `dir` (which may hold certificates
    /// the fragment names).
    pub fn start_in(dir: TempDir, fragment: &str, scheme: &str) -> NatsUnderTest {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("cannot find a free port for nats-server: {e}"));
        let config = dir.path().join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n{fragment}\n",
                dir.path().join("js").display()
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let mut server = NatsUnderTest {
            url: format!("{scheme}://127.0.0.1:{port}"),
            port,
            config,
            dir,
            child: None,
        };
        server.restart();
        server
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!("nats-server is not installed (infra/local/nats.sh needs it too)")
            });
        let log = self.dir.path().join("server.log");
        let child = std::process::Command::new(binary)
            .arg("-c")
            .arg(&self.config)
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display())),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NatsUnderTest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private PostgreSQL cluster (the machine's `initdb`/`pg_ctl`, trust
/// auth, a Unix socket and 127.0.0.1 on a free port, data in a temporary
/// directory) to crash and restart; stopped when dropped. Run as the
/// `postgres` user when the tests run as root (PostgreSQL refuses root).
pub struct PostgresUnderTest {
    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub url: String,
    port: u16,
    bin: std::path::PathBuf,
    dir: TempDir,
}

impl PostgresUnderTest {
    /// Creates and starts the cluster.
    pub fn start() -> PostgresUnderTest {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(|v| v.ok().map(|v| v.path().join("bin")))
                    .filter(|bin| bin.join("initdb").exists())
                    .max()
            })
            .unwrap_or_else(|| {
                panic!("PostgreSQL's server binaries (initdb, pg_ctl) are not under /usr/lib/postgresql")
            });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("cannot find a free port for PostgreSQL: {e}"));
        let server = PostgresUnderTest {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port,
            bin,
            dir: TempDir::new(),
        };
        if Self::as_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(server.dir.path())
                .status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "cannot hand the data directory to postgres"
            );
        }
        let data = server.dir.path().join("data");
        server.run(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        );
        server.restart();
        server
    }

    fn as_root() -> bool {
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
    }

    /// Runs one of the server's tools (as `postgres` when root).
    fn output(&self, tool: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
        let program = self.bin.join(tool);
        if Self::as_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .output()
        } else {
            std::process::Command::new(&program).args(args).output()
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let output = self
            .output(tool, args)
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            output.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Stops the server in `immediate` mode: every backend is killed with
    /// no shutdown checkpoint, as in a crash; the next start recovers.
    pub fn crash(&self) {
        let data = self.dir.path().join("data").display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Starts the server (again) on the same port and data.
    pub fn restart(&self) {
        let data = self.dir.path().join("data").display().to_string();
        let log = self.dir.path().join("postgres.log").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-o", &options, "-w", "start"],
        );
    }
}

impl Drop for PostgresUnderTest {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let _ = self.output("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
    }
}

/// Which database a registry under test stores its schemas in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistryBackend {
    /// A fresh PostgreSQL database ([`TestDatabase`]).
    Postgres,
    /// A fresh SQLite file in a temporary directory.
    Sqlite,
}

/// Keel's registry server running in this process on `127.0.0.1:0`.
pub struct RegistryUnderTest {
    /// `http://127.0.0.1:<port>` (`https://` when started with TLS).
    pub url: String,
    /// The database URL it stores into (reuse it to restart).
    pub database_url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _database: Option<std::sync::Arc<TestDatabase>>,
    _dir: Option<std::sync::Arc<TempDir>>,
}

/// A directory removed when dropped.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// A new empty directory under the system temp dir.
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(unique_name("keel-test"));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl RegistryUnderTest {
    /// Starts a registry on a fresh database of `backend`.
    pub async fn start(
        backend: RegistryBackend,
        options: keel_schemas::server::ServerOptions,
    ) -> RegistryUnderTest {
        match backend {
            RegistryBackend::Postgres => {
                let db = std::sync::Arc::new(TestDatabase::create().await);
                let mut r = Self::start_on(db.url(), options).await;
                r._database = Some(db);
                r
            }
            RegistryBackend::Sqlite => {
                let dir = std::sync::Arc::new(TempDir::new());
                let url = format!("sqlite://{}", dir.path().join("registry.db").display());
                let mut r = Self::start_on(&url, options).await;
                r._dir = Some(dir);
                r
            }
        }
    }

    /// Starts a registry on an existing database (e.g. to test a restart).
    pub async fn start_on(
        database_url: &str,
        options: keel_schemas::server::ServerOptions,
    ) -> RegistryUnderTest {
        let store = keel_schemas::server::Store::connect(database_url)
            .await
            .unwrap_or_else(|e| panic!("registry store on {database_url}: {e}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind a port for the registry: {e}"));
        let url = format!(
            "{}://{}",
            if options.tls.is_some() {
                "https"
            } else {
                "http"
            },
            listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) =
                keel_schemas::server::serve(listener, store.clone(), options, shutdown).await
            {
                panic!("registry server failed: {e}");
            }
            store.close().await;
        });
        RegistryUnderTest {
            url,
            database_url: database_url.to_owned(),
            shutdown: Some(tx),
            task: Some(task),
            _database: None,
            _dir: None,
        }
    }

    /// Stops the server (in-flight requests finish) and keeps the database,
    /// returning what a restart needs.
    pub async fn stop(mut self) -> StoppedRegistry {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        StoppedRegistry {
            database_url: self.database_url.clone(),
            _database: self._database.take(),
            _dir: self._dir.take(),
        }
    }
}

/// A stopped registry's database, kept alive for a restart.
pub struct StoppedRegistry {
    /// The database URL.
    pub database_url: String,
    _database: Option<std::sync::Arc<TestDatabase>>,
    _dir: Option<std::sync::Arc<TempDir>>,
}

impl StoppedRegistry {
    /// Starts a new server on the same database.
    pub async fn restart(self, options: keel_schemas::server::ServerOptions) -> RegistryUnderTest {
        let mut r = RegistryUnderTest::start_on(&self.database_url, options).await;
        r._database = self._database;
        r._dir = self._dir;
        r
    }
}

impl Drop for RegistryUnderTest {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Environment variable naming the tansu binary (else `tansu` on `PATH`,
/// else `~/.cargo/bin/tansu`).
pub const TANSU_ENV: &str = "KEEL_TEST_TANSU";

/// A tansu broker process of this test alone, on its own port, storing into
/// `sqlite://` in a temporary directory (durable across a stop and restart)
/// or in memory.
pub struct TansuUnderTest {
    /// Where clients connect, and what the broker advertises:
    /// `127.0.0.1:<port>`, its TLS terminator's `localhost:<port>`
    /// (librdkafka verifies a host name against the certificate's DNS
    /// names, not IP addresses), or its SASL PLAIN front's
    /// `127.0.0.1:<port>`.
    pub bootstrap: String,
    port: u16,
    /// Whether clients must authenticate (SASL).
    authentication: bool,
    /// Held for its lifetime: the terminator stops when dropped.
    tls: Option<tls::TlsTerminator>,
    /// Held for its lifetime, like `tls`.
    _plain: Option<sasl_plain::SaslPlainFront>,
    binary: std::path::PathBuf,
    dir: TempDir,
    storage: &'static str,
    child: Option<std::process::Child>,
}

/// A SCRAM mechanism tansu stores credentials for.
#[derive(Clone, Copy, Debug)]
pub enum Scram {
    /// `SCRAM-SHA-256`.
    Sha256,
    /// `SCRAM-SHA-512`.
    Sha512,
}

/// A user of a secured [`TansuUnderTest`], with SCRAM credentials.
#[derive(Clone, Copy, Debug)]
pub struct ScramUser<'a> {
    /// User name.
    pub name: &'a str,
    /// Password.
    pub password: &'a str,
    /// The mechanism the credentials are for.
    pub mechanism: Scram,
}

impl TansuUnderTest {
    /// The TLS terminator clients reach the broker through, if it has one.
    pub fn tls(&self) -> Option<&tls::TlsTerminator> {
        self.tls.as_ref()
    }

    /// Starts the broker and waits until it accepts connections.
    pub async fn start() -> TansuUnderTest {
        Self::start_on("sqlite://tansu.db").await
    }

    /// Starts a broker with `memory://` storage: fast, gone when stopped —
    /// for a heavy test that should not share (or grow) the suite's broker.
    pub async fn start_in_memory() -> TansuUnderTest {
        Self::start_on("memory://tansu/").await
    }

    async fn start_on(storage: &'static str) -> TansuUnderTest {
        let mut tansu = Self::unstarted(storage, None, None).await;
        tansu.restart().await;
        tansu
    }

    /// A broker on durable storage. With `sasl_users` it requires SASL
    /// authentication (tansu's `--authentication`): SCRAM against these
    /// users (tansu 0.6 offers no PLAIN), created before authentication is
    /// switched on (tansu then refuses unauthenticated admin requests).
    /// With `tls`, clients reach the broker only through a
    /// [`tls::TlsTerminator`] on `bootstrap`, which the broker advertises.
    pub async fn start_secured(
        sasl_users: Option<&[ScramUser<'_>]>,
        tls: Option<tls::ServerTls<'_>>,
    ) -> TansuUnderTest {
        let mut tansu = Self::unstarted("sqlite://tansu.db", tls, None).await;
        tansu.restart().await;
        let Some(users) = sasl_users else {
            return tansu;
        };
        for user in users {
            let mechanism = match user.mechanism {
                Scram::Sha256 => "scram256",
                Scram::Sha512 => "scram512",
            };
            let broker = format!("tcp://127.0.0.1:{}", tansu.port);
            let output = std::process::Command::new(&tansu.binary)
                .args([
                    "user",
                    "create",
                    "--broker",
                    &broker,
                    "--mechanism",
                    mechanism,
                ])
                .args([user.name, user.password])
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", tansu.binary.display()));
            assert!(
                output.status.success(),
                "tansu user create {} failed: {}",
                user.name,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        tansu.authentication = true;
        tansu.restart().await;
        tansu
    }

    /// A broker on durable storage whose advertised address (`bootstrap`)
    /// is a [`sasl_plain::SaslPlainFront`]: clients authenticate there with
    /// SASL PLAIN as one of `users` (`(name, password)`). The broker's own
    /// port stays open, unauthenticated, as a plaintext backend does.
    pub async fn start_behind_sasl_plain(users: &[(&str, &str)]) -> TansuUnderTest {
        let mut tansu = Self::unstarted("sqlite://tansu.db", None, Some(users)).await;
        tansu.restart().await;
        tansu
    }

    async fn unstarted(
        storage: &'static str,
        tls: Option<tls::ServerTls<'_>>,
        plain_users: Option<&[(&str, &str)]>,
    ) -> TansuUnderTest {
        assert!(
            tls.is_none() || plain_users.is_none(),
            "a TLS terminator and a SASL PLAIN front cannot be chained here; use one"
        );
        let binary = tansu_binary();
        // The port stays reserved until the terminator (or front) has its
        // own, so the two cannot be given the same one.
        let reserved = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot find a free port for tansu: {e}"));
        let port = reserved
            .local_addr()
            .unwrap_or_else(|e| panic!("cannot find a free port for tansu: {e}"))
            .port();
        let terminator = match tls {
            Some(tls) => Some(tls::TlsTerminator::start(port, tls).await),
            None => None,
        };
        let plain = match plain_users {
            Some(users) => Some(sasl_plain::SaslPlainFront::start(port, users).await),
            None => None,
        };
        drop(reserved);
        let bootstrap = match (&terminator, &plain) {
            (Some(t), _) => format!("localhost:{}", t.port),
            (None, Some(front)) => format!("127.0.0.1:{}", front.port),
            (None, None) => format!("127.0.0.1:{port}"),
        };
        TansuUnderTest {
            bootstrap,
            port,
            authentication: false,
            tls: terminator,
            _plain: plain,
            binary,
            dir: TempDir::new(),
            storage,
            child: None,
        }
    }

    /// Kills the broker process (SIGKILL: no shutdown of any kind).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and storage.
    pub async fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .unwrap_or_else(|e| panic!("cannot open the tansu log: {e}"));
        let mut command = std::process::Command::new(&self.binary);
        command.current_dir(self.dir.path()).args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{}", self.port),
            "--advertised-listener-url",
            &format!("tcp://{}", self.bootstrap),
            "--storage-engine",
            self.storage,
        ]);
        if self.authentication {
            command.arg("--authentication");
        }
        let child = command
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || std::time::Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default();
                panic!(
                    "tansu did not start on port {} ({exited:?}):\n{log}",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TansuUnderTest {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tansu_binary() -> std::path::PathBuf {
    if let Some(path) = from_env(TANSU_ENV) {
        return path.into();
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("tansu"))
            .find(|p| p.is_file())
    });
    let in_cargo = std::env::var_os("HOME")
        .map(|home| std::path::PathBuf::from(home).join(".cargo/bin/tansu"))
        .filter(|p| p.is_file());
    on_path.or(in_cargo).unwrap_or_else(|| {
        panic!(
            "tansu is not installed: this test runs its own broker. Run infra/local/tansu.sh \
             (installs tansu 0.6.0) or set {TANSU_ENV} to the binary"
        )
    })
}

fn with_database(server_url: &str, name: &str) -> String {
    match url::Url::parse(server_url) {
        Ok(mut url) => {
            url.set_path(&format!("/{name}"));
            url.to_string()
        }
        Err(_) => server_url.to_owned(),
    }
}

/// Polls `check` (every 50 ms) until it holds; fails the test naming `what`
/// after `budget`.
pub async fn eventually(what: &str, budget: Duration, mut check: impl AsyncFnMut() -> bool) {
    let reached = tokio::time::timeout(budget, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_ok();
    assert!(reached, "{what} (waited {budget:?})");
}

/// Reads `n` deliveries from a group member (up to 30 s each), acking each,
/// and returns their payloads as text.
pub async fn read_acked(deliveries: &mut keel_core::Deliveries, n: usize) -> Vec<String> {
    use futures::StreamExt;
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(30), deliveries.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events within 30 s", out.len()))
            .unwrap_or_else(|| {
                panic!(
                    "the delivery stream ended after {} of {n} events",
                    out.len()
                )
            })
            .unwrap_or_else(|e| panic!("delivery {} of {n} failed: {e}", out.len() + 1));
        out.push(String::from_utf8_lossy(d.envelope().payload()).into_owned());
        d.ack();
    }
    out
}

/// Deletes `topic`'s stream on the shared NATS server (big or many test
/// streams would otherwise pile up in its store).
pub async fn delete_nats_topic(topic: &str) {
    use keel_producers::nats::{JetStreamAdmin, NatsClientConfig};
    let admin = JetStreamAdmin::connect(&NatsClientConfig::new(nats_url().await))
        .await
        .unwrap_or_else(|e| panic!("NATS admin: {e}"));
    // A JetStream API request can time out while parallel tests load the
    // server (seen once in a full run): the clean-up tries again.
    let mut attempt = 1;
    while let Err(e) = admin.delete_topic(topic).await {
        eprintln!("deleting stream {topic}, attempt {attempt}: {e}");
        assert!(attempt < 3, "cannot delete stream {topic}: {e}");
        attempt += 1;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Keel's Kafka transport for tests: 100 ms commits, a 10 s session.
pub async fn kafka_transport() -> keel_consumers::kafka::KafkaTransport {
    kafka_transport_on(&kafka_bootstrap().await)
}

/// [`kafka_transport`] on the broker at `bootstrap` (a test's own).
pub fn kafka_transport_on(bootstrap: &str) -> keel_consumers::kafka::KafkaTransport {
    use keel_consumers::kafka::{KafkaConsumerConfig, KafkaTransport};
    use keel_producers::kafka::{KafkaClientConfig, KafkaPublisherConfig};
    let client = KafkaClientConfig::new([bootstrap.to_owned()]);
    KafkaTransport::new(
        KafkaPublisherConfig {
            client: client.clone(),
            ..KafkaPublisherConfig::default()
        },
        KafkaConsumerConfig {
            client,
            commit_interval_ms: 100,
            drain_timeout_ms: 5_000,
            session_timeout_ms: 10_000,
            ..KafkaConsumerConfig::default()
        },
        1,
    )
    .unwrap_or_else(|e| panic!("cannot build the Kafka transport: {e}"))
}

/// A NATS transport for tests: fast heartbeats so rebalances and crash
/// take-overs settle within seconds.
pub async fn nats_transport() -> keel_consumers::nats::NatsTransport {
    use keel_consumers::nats::NatsTransport;
    use keel_producers::nats::{JetStreamPublisherConfig, NatsClientConfig, StreamSettings};
    let client = NatsClientConfig::new(nats_url().await);
    NatsTransport::connect(
        JetStreamPublisherConfig::new(client.clone()),
        nats_consumer_config(client),
        StreamSettings::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot build the NATS transport: {e}"))
}

/// Consumer settings for tests: a 4 s session, 500 ms heartbeats.
pub fn nats_consumer_config(
    client: keel_producers::nats::NatsClientConfig,
) -> keel_consumers::nats::JetStreamConsumerConfig {
    keel_consumers::nats::JetStreamConsumerConfig {
        client,
        session_timeout: Duration::from_secs(4),
        heartbeat: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(5),
        ..keel_consumers::nats::JetStreamConsumerConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::first_host;

    #[test]
    fn first_host_applies_the_default_port() {
        assert_eq!(first_host("kafka://a:9093,b:9092", 9092), "a:9093");
        assert_eq!(first_host("127.0.0.1:9092", 9092), "127.0.0.1:9092");
        assert_eq!(first_host("nats://u:p@h", 4222), "h:4222");
        assert_eq!(
            first_host("postgres://postgres@127.0.0.1/postgres", 5432),
            "127.0.0.1:5432"
        );
        assert_eq!(first_host("postgres://u@[::1]:6000/db", 5432), "[::1]:6000");
        assert_eq!(first_host("postgres://u@[::1]/db", 5432), "[::1]:5432");
    }
}
