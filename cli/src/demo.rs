//! `keel demo`: a producer and a consumer group on one machine, checked.
//!
//! Today it runs on the in-memory transport: an orders service writes
//! numbered events over many keys into its transactional outbox (SQLite, a
//! file in the temp directory) — some transactions roll back — and the
//! outbox relay publishes the committed ones; a group of members handles
//! them in parallel, scaled out mid-run (one more member joins and takes
//! its share of the partitions) and back (it leaves and its partitions move
//! back); then a new group replays the topic from the start of its log. The
//! demo checks what a user would — every committed event handled and no
//! rolled-back one, per-key order held, the hand-overs seen, every partition
//! committed to its end, the replay complete and in order — and fails
//! (non-zero exit) if any check does not hold.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use keel_consumers::{ServeOptions, serve};
use keel_core::config::BrokerUrl;
use keel_core::{
    DeliveryInfo, Envelope, EventId, KeelConfig, MemoryTransport, Publisher, StartFrom, Subscriber,
    Subscription, TopicAdmin, TopicSpec, handler_fn,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const TOPIC: &str = "demo.orders";
const EVENT_TYPE: &str = "keel.demo.OrderUpdated";
const BATCH: usize = 200;

/// `keel demo` options.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Events to publish.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    events: u32,
    /// Distinct keys (order ids) the events are spread over.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    keys: u32,
    /// Members of the consumer group at the start; one more joins a third
    /// of the way in and leaves at two thirds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=64))]
    members: u32,
    /// Partitions of the demo topic (overrides `topics.partitions`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(keel_core::config::MAX_PARTITIONS)))]
    pub(crate) partitions: Option<u32>,
}

/// What the members handled, in the order they handled it.
#[derive(Default)]
struct Ledger {
    per_key: HashMap<String, Vec<u32>>,
    per_member: BTreeMap<u32, u64>,
    deliveries: HashMap<EventId, u32>,
}

impl Ledger {
    fn distinct(&self) -> usize {
        self.deliveries.len()
    }
}

pub(crate) async fn run(config: &KeelConfig, args: &DemoArgs) -> anyhow::Result<()> {
    if !matches!(config.broker, BrokerUrl::Memory { .. }) {
        bail!(
            "`keel demo` runs on the embedded in-memory broker (broker = memory://), not {}; \
             leave out --broker, KEEL_BROKER and keel.toml's `broker` (or pass \
             --broker memory://); the integration tests run the same checks against Kafka and \
             NATS (infra/local/test.sh)",
            config.broker.redacted()
        );
    }
    let started = Instant::now();
    let partitions = config.topics.partitions;
    ensure!(
        args.members < partitions,
        "--members {} leaves no partition of the topic's {partitions} (topics.partitions) for \
         the member that joins mid-run: give fewer members or more partitions",
        args.members
    );
    let group = config.group().to_owned();
    let transport = MemoryTransport::new();
    transport
        .ensure_topic(&TopicSpec {
            name: TOPIC.into(),
            partitions,
        })
        .await?;
    say!(
        "keel demo: in-memory broker, topic `{TOPIC}` with {partitions} partitions, group `{group}` of {} members (one more joins and leaves mid-run)",
        args.members
    );

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (progress_tx, mut progress) = watch::channel(0usize);
    let progress_tx = Arc::new(progress_tx);
    let join = |number: u32, group: String| {
        Member::start(
            &transport,
            Subscription::new(TOPIC, group).max_in_flight(config.consumer.max_in_flight),
            number,
            ledger.clone(),
            progress_tx.clone(),
        )
    };
    let mut members = Vec::new();
    for number in 1..=args.members {
        members.push(join(number, group.clone()).await?);
    }

    let outbox = DemoOutbox::open(Arc::new(transport.clone())).await?;
    let publisher = {
        let outbox = outbox.clone();
        let (events, keys) = (args.events, args.keys);
        tokio::spawn(async move { outbox.write(events, keys).await })
    };

    // Scale out a third of the way in: one more member joins and takes its
    // share of the partitions; scale back two thirds in: it leaves and its
    // partitions move back.
    let total = args.events as usize;
    let join_at = (total / 3).max(1);
    let leave_at = (total * 2 / 3).max(join_at);
    wait_for(&mut progress, join_at).await?;
    let joined_after = *progress.borrow();
    let mut extra = join(args.members + 1, group.clone()).await?;
    extra.assigned().await?;
    wait_for(&mut progress, leave_at).await?;
    let left_after = *progress.borrow();
    // What it held by then: a cooperative hand-over may come in steps.
    let held = extra.assignment.borrow().clone();
    let extra_report = extra.leave().await?;
    let extra_number = extra.number;
    let extra_after = extra.assignment.borrow().clone();

    let writes = publisher.await.context("orders service task")??;
    wait_for(&mut progress, total).await?;
    let relayed = outbox.stop().await?;
    let after: Vec<Vec<u32>> = members
        .iter()
        .map(|m| m.assignment.borrow().clone())
        .collect();
    for member in &mut members {
        member.leave().await?;
    }

    // The ledger's lock is not held past this block (the replay awaits).
    {
        let ledger = ledger
            .lock()
            .map_err(|_| anyhow::anyhow!("ledger poisoned"))?;
        let redeliveries: u32 = ledger.deliveries.values().map(|n| n - 1).sum();
        say!(
            "  outbox     {total} events over {} keys committed in {} SQLite transactions ({} more rolled back); \
             the relay published {relayed}, each acknowledged by the broker",
            // Fewer events than keys use one key each.
            args.keys.min(args.events),
            writes.committed_transactions,
            writes.rolled_back_transactions,
        );
        ensure!(
            relayed == total as u64,
            "the relay published {relayed} events for {total} committed"
        );
        ensure!(
            !ledger.per_key.contains_key(ROLLED_BACK_KEY),
            "an event of a rolled-back transaction was handled"
        );
        ensure!(
            ledger.distinct() == total,
            "only {} of {total} events were handled",
            ledger.distinct()
        );
        let shares: Vec<String> = ledger
            .per_member
            .iter()
            .map(|(m, n)| format!("#{m}: {n}"))
            .collect();
        say!(
            "  handled    {total} of {total} events, {redeliveries} re-deliveries; per member {}",
            shares.join(", ")
        );

        let keys_checked = check_order(&ledger)?;
        say!(
            "  order      held for all {keys_checked} keys: every key's events handled in publish order"
        );
    }

    ensure!(
        extra_after.is_empty(),
        "member #{extra_number} kept partitions {extra_after:?} after it left"
    );
    let mut owned: Vec<u32> = after.iter().flatten().copied().collect();
    owned.sort_unstable();
    ensure!(
        owned == (0..partitions).collect::<Vec<u32>>(),
        "after member #{extra_number} left, the others own partitions {owned:?}, not each of \
         0..{partitions} once"
    );
    let owners: Vec<String> = after
        .iter()
        .enumerate()
        .filter(|(_, a)| !a.is_empty())
        .map(|(i, a)| format!("#{} {:?}", i + 1, a))
        .collect();
    say!(
        "  rebalance  member #{extra_number} joined after {joined_after} events and took \
         partitions {held:?}; it handled {} and left after {left_after} events; its \
         partitions moved back: now {}",
        extra_report.handled,
        owners.join(", ")
    );

    let committed = transport
        .committed(TOPIC, &group)
        .context("the group has no committed positions")?;
    let ends: u64 = committed.iter().flatten().sum();
    ensure!(
        committed.iter().all(Option::is_some) && ends == total as u64,
        "committed positions {committed:?} do not cover all {total} events"
    );
    say!("  committed  every partition of group `{group}` at the end of its log");

    // Replay: a new group reads the topic again from the start of its log,
    // as a team re-reads a topic after an incident.
    let replay_group = format!("{group}-replay");
    let replay = Arc::new(Mutex::new(Ledger::default()));
    let (replay_tx, mut replayed) = watch::channel(0usize);
    let mut reader = Member::start(
        &transport,
        Subscription::new(TOPIC, &replay_group)
            .start_from(StartFrom::Earliest)
            .max_in_flight(config.consumer.max_in_flight),
        1,
        replay.clone(),
        Arc::new(replay_tx),
    )
    .await?;
    wait_for(&mut replayed, total).await?;
    reader.leave().await?;
    let replay = replay
        .lock()
        .map_err(|_| anyhow::anyhow!("replay ledger poisoned"))?;
    ensure!(
        replay.distinct() == total && !replay.per_key.contains_key(ROLLED_BACK_KEY),
        "the replay read {} distinct events, not the {total} committed",
        replay.distinct()
    );
    let keys_replayed = check_order(&replay)?;
    say!(
        "  replay     group `{replay_group}` re-read all {total} events from the start of the \
         log, in order for all {keys_replayed} keys"
    );
    say!("demo OK in {:.1?}", started.elapsed());
    Ok(())
}

struct Member {
    number: u32,
    assignment: watch::Receiver<Vec<u32>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<keel_core::Result<keel_consumers::ServeReport>>>,
}

impl Member {
    /// Subscribes as member `number` and serves its deliveries, recording
    /// each handled event in `ledger` and the count of distinct events
    /// handled in `progress`.
    async fn start(
        transport: &MemoryTransport,
        subscription: Subscription,
        number: u32,
        ledger: Arc<Mutex<Ledger>>,
        progress: Arc<watch::Sender<usize>>,
    ) -> anyhow::Result<Member> {
        let deliveries = transport.subscribe(subscription).await?;
        let assignment = deliveries.assignment_changes();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let handler = handler_fn(move |event: Envelope, _info: DeliveryInfo| {
            let (ledger, progress) = (ledger.clone(), progress.clone());
            async move {
                let (key, seq) = parse(&event)?;
                let distinct = {
                    let mut l = ledger
                        .lock()
                        .map_err(|_| keel_core::Error::fatal("ledger poisoned"))?;
                    l.per_key.entry(key).or_default().push(seq);
                    *l.per_member.entry(number).or_default() += 1;
                    *l.deliveries.entry(event.id()).or_default() += 1;
                    l.distinct()
                };
                // The highest count wins: two handlers finishing together
                // may send theirs in either order, and a lower one sent
                // last would leave the run waiting for an event already
                // handled.
                progress.send_if_modified(|handled| {
                    let higher = distinct > *handled;
                    if higher {
                        *handled = distinct;
                    }
                    higher
                });
                Ok(())
            }
        });
        let task = tokio::spawn(serve(
            deliveries,
            Arc::new(handler),
            ServeOptions::default(),
            async {
                let _ = stop_rx.await;
            },
        ));
        Ok(Member {
            number,
            assignment,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Waits until the member owns partitions (the others hand theirs over
    /// once their running handlers finish).
    async fn assigned(&mut self) -> anyhow::Result<()> {
        let wait = self
            .assignment
            .wait_for(|partitions| !partitions.is_empty());
        match tokio::time::timeout(STALL, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => bail!(
                "member #{} stopped before it owned a partition",
                self.number
            ),
            Err(_) => bail!(
                "member #{} owned no partition {} s after it joined: the rebalance is stuck",
                self.number,
                STALL.as_secs()
            ),
        }
    }

    /// Stops the member (a graceful leave) and waits for it.
    async fn leave(&mut self) -> anyhow::Result<keel_consumers::ServeReport> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join().await
    }

    async fn join(&mut self) -> anyhow::Result<keel_consumers::ServeReport> {
        match self.task.take() {
            Some(task) => Ok(task
                .await
                .with_context(|| format!("member #{} crashed", self.number))??),
            None => Ok(keel_consumers::ServeReport::default()),
        }
    }
}

/// Key of the events written in transactions that roll back: never
/// published, so never handled.
const ROLLED_BACK_KEY: &str = "rolled-back";

/// The demo orders service's outbox: a SQLite file in the temp directory
/// and the outbox relay publishing it to the broker.
#[derive(Clone)]
struct DemoOutbox {
    pool: sqlx::SqlitePool,
    outbox: keel_producers::outbox::sqlite::SqliteOutbox,
    /// Its file, removed when the last copy goes (or at `stop`).
    files: Arc<OutboxFiles>,
    relay: Arc<Mutex<Option<RunningRelay>>>,
    stats: watch::Receiver<keel_producers::outbox::RelayStats>,
}

/// The relay task and the sender that stops it.
type RunningRelay = (
    oneshot::Sender<()>,
    JoinHandle<keel_producers::outbox::error::Result<()>>,
);

/// What the orders service committed and rolled back.
struct Writes {
    committed_transactions: u32,
    rolled_back_transactions: u32,
}

impl DemoOutbox {
    async fn open(publisher: Arc<dyn Publisher>) -> anyhow::Result<Self> {
        use keel_producers::outbox::sqlite::{SqliteOutbox, migrate_sqlite};
        use keel_producers::outbox::{OutboxRelay, OutboxTables, RelayConfig};
        use sqlx::ConnectOptions as _;
        let path = std::env::temp_dir().join(format!(
            "keel-demo-outbox-{}-{}.db",
            std::process::id(),
            EventId::new()
        ));
        // Removed again if anything below fails.
        let files = OutboxFiles(path.clone());
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            // The demo loads its outbox on purpose: sqlx's "slow
            // statement" warnings would only interleave with its report.
            .log_slow_statements(log::LevelFilter::Off, std::time::Duration::MAX);
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot create the demo outbox {}", path.display()))?;
        let tables = OutboxTables::default();
        migrate_sqlite(&tables, &pool).await?;
        let codec = keel_schemas::AvroCodec::new(
            Arc::new(keel_schemas::LocalRegistry::new()),
            keel_schemas::CodecOptions::default(),
        );
        let outbox = SqliteOutbox::new(&tables, Arc::new(codec));
        // SQLite has no notifications: the relay polls, often.
        let relay = OutboxRelay::sqlite(
            pool.clone(),
            &tables,
            publisher,
            RelayConfig {
                relay_id: "demo-relay".into(),
                batch_size: 500,
                heartbeat: Duration::from_millis(250),
                session_timeout: Duration::from_secs(3),
                publish_timeout: Duration::from_secs(1),
                poll_interval: Duration::from_millis(10),
                ..RelayConfig::default()
            },
        )?;
        let stats = relay.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(relay.run(async {
            let _ = stopped.await;
        }));
        Ok(DemoOutbox {
            files: Arc::new(files),
            pool,
            outbox,
            relay: Arc::new(Mutex::new(Some((stop, task)))),
            stats,
        })
    }

    /// Writes `events` over `keys` in transactions of `BATCH`; every tenth
    /// transaction also writes a draft that is rolled back.
    async fn write(&self, events: u32, keys: u32) -> anyhow::Result<Writes> {
        let mut writes = Writes {
            committed_transactions: 0,
            rolled_back_transactions: 0,
        };
        let mut batch = Vec::with_capacity(BATCH);
        for n in 0..events {
            let (key, seq) = (n % keys, n / keys);
            let key = format!("order-{key}");
            batch.push(
                Envelope::new(EVENT_TYPE, key.as_str(), format!("{key}:{seq}")).with_source("demo"),
            );
            if batch.len() == BATCH || n + 1 == events {
                let transaction = writes.committed_transactions + writes.rolled_back_transactions;
                if transaction % 10 == 9 {
                    let draft = Envelope::new(
                        EVENT_TYPE,
                        ROLLED_BACK_KEY,
                        format!("{ROLLED_BACK_KEY}:{n}"),
                    );
                    let mut tx = self.pool.begin().await?;
                    self.outbox.enqueue(&mut tx, TOPIC, &draft).await?;
                    tx.rollback().await?;
                    writes.rolled_back_transactions += 1;
                }
                let rows: Vec<(&str, &Envelope)> = batch.iter().map(|e| (TOPIC, e)).collect();
                let mut tx = self.pool.begin().await?;
                self.outbox.enqueue_batch(&mut tx, &rows).await?;
                tx.commit().await?;
                writes.committed_transactions += 1;
                batch.clear();
                // Let the relay and the consumers run meanwhile.
                tokio::task::yield_now().await;
            }
        }
        Ok(writes)
    }

    /// Stops the relay and removes the file; returns how many events the
    /// relay published.
    async fn stop(&self) -> anyhow::Result<u64> {
        let relay = self
            .relay
            .lock()
            .map_err(|_| anyhow::anyhow!("relay handle poisoned"))?
            .take();
        if let Some((stop, task)) = relay {
            let _ = stop.send(());
            task.await.context("the outbox relay crashed")??;
        }
        let published = self.stats.borrow().published;
        self.pool.close().await;
        remove_outbox_files(&self.files.0);
        Ok(published)
    }
}

/// Removes the demo's outbox file when the last copy of the outbox is
/// dropped, so a run that failed half-way leaves no file behind either
/// (copies live in the writer task; the first one dropped must not take
/// the file from the others).
struct OutboxFiles(std::path::PathBuf);

impl Drop for OutboxFiles {
    fn drop(&mut self) {
        remove_outbox_files(&self.0);
    }
}

fn remove_outbox_files(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.to_path_buf().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

/// Checks that every key's events were handled in publish order (a
/// re-delivery may repeat one) and returns how many keys were checked.
fn check_order(ledger: &Ledger) -> anyhow::Result<usize> {
    for (key, seqs) in &ledger.per_key {
        ensure!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "per-key order broken for {key}: {seqs:?}"
        );
    }
    Ok(ledger.per_key.len())
}

fn parse(event: &Envelope) -> keel_core::Result<(String, u32)> {
    let text = std::str::from_utf8(event.payload())
        .map_err(|_| keel_core::Error::fatal("payload is not text"))?;
    let (key, seq) = text
        .rsplit_once(':')
        .ok_or_else(|| keel_core::Error::fatal(format!("payload `{text}` is not key:seq")))?;
    let seq = seq
        .parse()
        .map_err(|_| keel_core::Error::fatal(format!("payload `{text}` has no sequence number")))?;
    Ok((key.to_owned(), seq))
}

/// How long the demo waits without a single event handled before it
/// calls the run stuck (a large `--events` run takes as long as it takes).
const STALL: Duration = Duration::from_secs(120);

async fn wait_for(progress: &mut watch::Receiver<usize>, target: usize) -> anyhow::Result<()> {
    loop {
        let handled = *progress.borrow_and_update();
        if handled >= target {
            return Ok(());
        }
        match tokio::time::timeout(STALL, progress.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                bail!("every member stopped after {handled} of {target} events were handled")
            }
            Err(_) => bail!(
                "no event handled for {} s ({handled} of {target} handled): the run is stuck; \
                 run it again with RUST_LOG=keel=debug to see where",
                STALL.as_secs()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_slow_run_goes_on_and_a_stuck_one_stops() {
        // Progress every 100 s: slower than the stall limit in total, never
        // stalled.
        let (tx, mut rx) = watch::channel(0);
        let feeding = tokio::spawn(async move {
            for handled in 1..=3 {
                tokio::time::sleep(Duration::from_secs(100)).await;
                let _ = tx.send(handled);
            }
            tx
        });
        wait_for(&mut rx, 3).await.expect("it made progress");
        let _tx = feeding.await.expect("feeder");
        let e = wait_for(&mut rx, 4).await.expect_err("stuck").to_string();
        assert!(
            e.contains("no event handled for 120 s (3 of 4 handled)"),
            "{e}"
        );
    }
}
