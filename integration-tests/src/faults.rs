//! Helpers for the fault-injection tests that run consumer-group members
//! as separate OS processes (`kafka_group_worker`, `nats_group_worker`):
//! the processes, the records they leave, and what the tests compute from
//! them.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// The worker processes' common part, after they joined their group:
/// records assignment changes to `<out>.assignments` and handles `key:seq`
/// events, appending `<end nanos> <worker> <key> <seq> <partition>
/// <position> <start nanos>` to `out` *before* acking each (so a SIGKILL
/// never loses a handled event from the record), until Ctrl-C. Each
/// handler first sleeps up to twice `pace` at random (zero: not at all), so
/// that many run at once and finish out of order. With `fail_every` n > 0,
/// every key's events whose number is 1 modulo n fail their first attempt
/// (retried after `serve`'s back-off, 100 ms; nothing recorded).
pub async fn work(
    deliveries: keel_core::Deliveries,
    out: &str,
    worker: &str,
    pace: Duration,
    fail_every: u64,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use keel_core::{DeliveryInfo, Envelope, Error, handler_fn};

    let file = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)?,
    ));
    record_assignments(
        &deliveries,
        Path::new(&format!("{out}.assignments")),
        worker,
    )?;
    let name = worker.to_owned();
    let handler = handler_fn(move |event: Envelope, info: DeliveryInfo| {
        let (file, name) = (file.clone(), name.clone());
        async move {
            let started = unix_nanos();
            if !pace.is_zero() {
                // Anywhere from nothing to twice the pace: events of
                // different keys finish out of their partition's order.
                tokio::time::sleep(pace.mul_f64(2.0 * rand::random::<f64>())).await;
            }
            let text = String::from_utf8_lossy(event.payload()).into_owned();
            let (key, seq) = text
                .rsplit_once(':')
                .ok_or_else(|| Error::fatal(format!("payload `{text}` is not key:seq")))?;
            if fail_every > 0
                && info.attempt == 1
                && seq.parse::<u64>().is_ok_and(|seq| seq % fail_every == 1)
            {
                return Err(Error::retriable("fails its first attempt, as asked"));
            }
            let mut f = file
                .lock()
                .map_err(|_| Error::fatal("output file lock poisoned"))?;
            let line = format!(
                "{} {name} {key} {seq} {} {} {started}\n",
                unix_nanos(),
                info.coordinates.partition,
                info.coordinates.position
            );
            f.write_all(line.as_bytes()).map_err(Error::retriable)?;
            Ok(())
        }
    });
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    keel_consumers::serve(
        deliveries,
        Arc::new(handler),
        keel_consumers::ServeOptions::default(),
        shutdown,
    )
    .await?;
    // Left: nothing owned from now (the background recorder may not get
    // to write it before the process exits).
    let mut assignments = std::fs::OpenOptions::new()
        .append(true)
        .open(format!("{out}.assignments"))?;
    assignments.write_all(format!("{} \n", unix_nanos()).as_bytes())?;
    Ok(())
}

/// Whether `worker` (its records in `dir`) owns some partition now.
pub fn owns_some(dir: &Path, worker: &str) -> bool {
    std::fs::read_to_string(dir.join(format!("{worker}.log.assignments")))
        .unwrap_or_default()
        .lines()
        .last()
        .is_some_and(|line| {
            line.split_once(' ')
                .is_some_and(|(_, list)| !list.trim().is_empty())
        })
}

/// The event `key-<key>:<seq>` of key `key-<key>`: what the workers
/// record (see [`work`]).
pub fn numbered(key: usize, seq: usize) -> keel_core::Envelope {
    keel_core::Envelope::new(
        "keel.test.Numbered",
        format!("key-{key}"),
        format!("key-{key}:{seq}"),
    )
}

/// Logs to stderr as `RUST_LOG` says (for worker processes).
pub fn init_worker_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// Appends every assignment change of `deliveries` to `path` as
/// `<unix nanos> <partitions, comma-separated>` lines (what [`ownership`]
/// reads), from a background task.
pub fn record_assignments(
    deliveries: &keel_core::Deliveries,
    path: &Path,
    worker: &str,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut changes = deliveries.assignment_changes();
    let worker = worker.to_owned();
    tokio::spawn(async move {
        loop {
            let owned = changes.borrow_and_update().clone();
            tracing::info!(%worker, ?owned, "assignment");
            let list: Vec<String> = owned.iter().map(u32::to_string).collect();
            let line = format!("{} {}\n", unix_nanos(), list.join(","));
            if let Err(e) = file.write_all(line.as_bytes()) {
                tracing::error!(error = %e, "cannot record the assignment");
            }
            if changes.changed().await.is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// Now, in nanoseconds since the Unix epoch (comparable across processes).
pub fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// A worker process, killed when dropped.
pub struct Worker {
    /// The worker's name in its records.
    pub name: String,
    /// The process.
    pub child: Child,
}

impl Worker {
    /// Stops the worker the way an orchestrator does (SIGINT: drain, commit,
    /// leave) and waits up to 30 s for it to exit.
    pub fn interrupt(mut self) {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not stop within 30 s of SIGINT", self.name);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One handled event, as a worker recorded it.
pub struct Handled {
    /// When the handler finished (unix nanos).
    pub nanos: u128,
    /// When the handler started, where the worker records it.
    pub started: Option<u128>,
    /// Which worker.
    pub worker: String,
    /// Event key.
    pub key: String,
    /// Sequence number within the key.
    pub seq: u32,
    /// Partition.
    pub partition: u32,
    /// Kafka offset or JetStream stream sequence.
    pub offset: u64,
}

/// Every handled event so far, in the order handled.
pub fn handled(dir: &Path) -> Vec<Handled> {
    let mut out = Vec::new();
    for path in files(dir, ".log") {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            // A line being written at the moment of reading is skipped.
            if parts.len() != 6 && parts.len() != 7 {
                continue;
            }
            if let (Ok(nanos), Ok(seq), Ok(partition), Ok(offset)) = (
                parts[0].parse(),
                parts[3].parse(),
                parts[4].parse(),
                parts[5].parse(),
            ) {
                out.push(Handled {
                    nanos,
                    started: parts.get(6).and_then(|s| s.parse().ok()),
                    worker: parts[1].to_owned(),
                    key: parts[2].to_owned(),
                    seq,
                    partition,
                    offset,
                });
            }
        }
    }
    out.sort_by_key(|h| h.nanos);
    out
}

/// Files in `dir` whose names end with `suffix`, sorted.
pub fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

/// How many distinct `(key, seq)` events were handled.
pub fn distinct(records: &[Handled]) -> usize {
    records
        .iter()
        .map(|h| (&h.key, h.seq))
        .collect::<HashSet<_>>()
        .len()
}

/// When each worker owned each partition, from the workers' assignment
/// records: `(worker, partition)` → `[start, end)` intervals in unix nanos.
/// A worker's last interval ends when it stopped (`ended`), else never.
pub fn ownership(
    dir: &Path,
    ended: &HashMap<String, u128>,
) -> HashMap<(String, u32), Vec<(u128, u128)>> {
    let mut out: HashMap<(String, u32), Vec<(u128, u128)>> = HashMap::new();
    for path in files(dir, ".log.assignments") {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let worker = name.trim_end_matches(".log.assignments").to_owned();
        let end = ended.get(&worker).copied().unwrap_or(u128::MAX);
        let mut open: HashMap<u32, u128> = HashMap::new();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let (nanos, list) = line.split_once(' ').unwrap();
            let nanos: u128 = nanos.parse().unwrap();
            let owned: HashSet<u32> = list
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            for p in &owned {
                open.entry(*p).or_insert(nanos);
            }
            let released: Vec<u32> = open
                .keys()
                .filter(|p| !owned.contains(p))
                .copied()
                .collect();
            for p in released {
                let since = open.remove(&p).unwrap();
                out.entry((worker.clone(), p))
                    .or_default()
                    .push((since, nanos));
            }
        }
        for (p, since) in open {
            out.entry((worker.clone(), p))
                .or_default()
                .push((since, end));
        }
    }
    out
}

/// Each spell (from, to) of `partition` being assigned to two members at
/// once, from [`ownership`]'s intervals. During one the partition's
/// committed position is not trustworthy: tansu does not fence commits by
/// generation, so the member behind can commit over the one ahead, and a
/// later owner resumes from there.
pub fn double_assignments(
    owners: &HashMap<(String, u32), Vec<(u128, u128)>>,
    partition: u32,
) -> Vec<(u128, u128)> {
    let intervals: Vec<(&str, (u128, u128))> = owners
        .iter()
        .filter(|((_, p), _)| *p == partition)
        .flat_map(|((w, _), v)| v.iter().map(move |i| (w.as_str(), *i)))
        .collect();
    let mut spells = Vec::new();
    for (a, x) in &intervals {
        for (b, y) in &intervals {
            let (from, to) = (x.0.max(y.0), x.1.min(y.1));
            if a != b && from < to {
                spells.push((from, to));
            }
        }
    }
    spells
}

/// How far from a double assignment an event may have been first handled
/// and still come back because of it. The member given the partition too
/// starts at the last commit, which members make every second
/// (`commit_interval_ms`), so what it reads again was first handled from
/// about a commit interval before the spell on; while both hold the
/// partition the one behind commits over the one ahead, so what comes
/// back later was first handled during the spell, or after it only until
/// the owner's next commit moves the position on (a stale commit left on a
/// partition idle since points back into the spell too). The rest is
/// slack for a loaded machine.
pub const DOUBLE_ASSIGNMENT_REACH: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether a double assignment of `partition` explains an event first
/// handled at `first` (unix nanos) being handled again at `again`: a spell
/// that began by `again`, with `first` within [`DOUBLE_ASSIGNMENT_REACH`]
/// of it. Anything else handled again is a commit Keel lost.
pub fn explained_by_double_assignment(
    owners: &HashMap<(String, u32), Vec<(u128, u128)>>,
    partition: u32,
    first: u128,
    again: u128,
) -> bool {
    let reach = DOUBLE_ASSIGNMENT_REACH.as_nanos();
    double_assignments(owners, partition)
        .into_iter()
        .any(|(from, to)| {
            // `to` is u128::MAX for a spell still open at the end.
            from <= again
                && from.saturating_sub(reach) <= first
                && first <= to.saturating_add(reach)
        })
}

/// Per partition: distinct offsets handled, the highest, and the gaps.
pub fn coverage(records: &[Handled]) -> String {
    let mut offsets: BTreeMap<u32, HashSet<u64>> = BTreeMap::new();
    for h in records {
        offsets.entry(h.partition).or_default().insert(h.offset);
    }
    let mut out = String::new();
    for (p, set) in offsets {
        let max = set.iter().max().copied().unwrap_or(0);
        let missing: Vec<u64> = (0..=max).filter(|o| !set.contains(o)).collect();
        let sample: Vec<u64> = missing.iter().take(5).copied().collect();
        out.push_str(&format!(
            "p{p}: {} offsets, max {max}, {} missing below max (first {sample:?})\n",
            set.len(),
            missing.len()
        ));
    }
    out
}

/// Waits (up to 300 s) until `pred` holds for the number of distinct
/// events handled.
pub async fn wait_until(dir: &Path, what: &str, pred: impl Fn(usize) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let records = handled(dir);
        let n = distinct(&records);
        if pred(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: only {n} distinct events handled after 300 s\n{}",
            coverage(&records)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
