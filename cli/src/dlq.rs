//! `keel dlq list` and `keel dlq redrive`: read a topic's dead letters
//! (decoded, with the error and the original coordinates) and send them
//! back to the topic they came from with their original event ids, so
//! inboxes de-duplicate events that were handled meanwhile.
//!
//! Both read the dead-letter topic from its start to the end it had when
//! the command started, as a throw-away consumer group (nothing of the
//! router's position moves, nothing is removed: a dead-letter topic is a
//! log). Filters pick by event type, key, reason and dead-letter time.
//! A redrive appends a marker record to the dead-letter topic for each
//! letter it sent back (`keel-dlq-redriven: <partition>@<position>`, no
//! payload), and skips letters so marked: running it again sends only the
//! events that were dead-lettered again since (their newer letters).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use keel_consumers::router::DeadLetterReason;
use keel_consumers::router::dead_letter::{self, headers};
use keel_core::{Error, KeelConfig, RawRecord, StartFrom, Subscription, wire};
use keel_schemas::{AvroCodec, CodecOptions, RegistryClient, SchemaError};
use serde_json::{Value, json};

use crate::broker::{self, Broker, End};

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// Print a topic's dead letters as JSON lines: the decoded event, the
    /// error, why it was dead-lettered, attempts, original coordinates.
    #[command(after_help = "Examples:\n  \
        keel --broker kafka://127.0.0.1:9092 dlq list --topic orders\n  \
        keel --broker nats://127.0.0.1:4222 dlq list --topic orders --reason poison")]
    List(DlqArgs),
    /// Publish dead letters back to the topic they came from, with their
    /// original event ids (inboxes skip events already applied).
    #[command(after_help = "Examples:\n  \
        keel --broker kafka://127.0.0.1:9092 dlq redrive --topic orders --type shop.orders.OrderPlaced\n  \
        keel --broker kafka://127.0.0.1:9092 dlq redrive --topic orders --key order-42 --dry-run")]
    Redrive(RedriveArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DlqArgs {
    /// The topic whose dead letters to read (its dead-letter topic is
    /// `<topic>.dlq`, or `<topic>-dlq` on NATS). With --dlq-topic: only
    /// that topic's dead letters in it.
    #[arg(long, required_unless_present = "dlq_topic", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    topic: Option<String>,
    /// Read this dead-letter topic instead of the default name.
    #[arg(long, value_name = "TOPIC", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    dlq_topic: Option<String>,
    /// Only events of this type (Avro full name).
    #[arg(long = "type", value_name = "EVENT_TYPE")]
    event_type: Option<String>,
    /// Only events with this key.
    #[arg(long)]
    key: Option<String>,
    /// Only dead letters of this reason.
    #[arg(long, value_parser = ["poison", "unknown-type", "fatal", "retries-exhausted"])]
    reason: Option<String>,
    /// Only dead letters written at or after this time (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    since: Option<String>,
    /// Only dead letters written before this time (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    until: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct RedriveArgs {
    #[command(flatten)]
    filter: DlqArgs,
    /// Print what would be redriven, publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// Send back also the letters an earlier redrive already sent (by
    /// default each redrive records the letters it sent in the dead-letter
    /// topic, which needs write access to it, and a later one skips them;
    /// an event dead-lettered again since has a newer letter, which goes).
    #[arg(long)]
    include_redriven: bool,
}

/// The selection, parsed.
struct Filter {
    /// The original topic (`--topic`): a letter naming another is left
    /// out. With `--dlq-topic` (which may hold the dead letters of several
    /// topics) a letter must name it; read from `<topic>.dlq`, a letter
    /// naming none is taken (and reported by a redrive as not sendable).
    origin: Option<String>,
    /// A letter must name `origin` (read from a `--dlq-topic`).
    origin_required: bool,
    event_type: Option<String>,
    key: Option<String>,
    reason: Option<DeadLetterReason>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
}

impl Filter {
    fn new(args: &DlqArgs) -> anyhow::Result<Filter> {
        let time = |flag: &str, text: &Option<String>| -> anyhow::Result<Option<DateTime<Utc>>> {
            text.as_deref()
                .map(|t| broker::rfc3339(flag, t))
                .transpose()
        };
        let since = time("--since", &args.since)?;
        let until = time("--until", &args.until)?;
        if let (Some(since), Some(until)) = (since, until)
            && since >= until
        {
            bail!("--since ({since}) is not before --until ({until}): no dead letter can match");
        }
        Ok(Filter {
            origin: args.topic.clone(),
            origin_required: args.dlq_topic.is_some(),
            event_type: args.event_type.clone(),
            key: args.key.clone(),
            reason: args.reason.as_deref().and_then(DeadLetterReason::parse),
            since,
            until,
        })
    }

    /// What the selection makes of `record`.
    fn pick(&self, record: &RawRecord) -> Pick {
        match self.came_from_origin(record) {
            Some(true) => {}
            Some(false) => return Pick::OtherTopic,
            None => return Pick::NoOrigin,
        }
        let fields_differ = self
            .event_type
            .as_ref()
            .is_some_and(|t| record.header(wire::EVENT_TYPE) != Some(t.as_str()))
            || self
                .key
                .as_ref()
                .is_some_and(|k| record.partition_key().as_deref() != Some(k.as_bytes()))
            || self
                .reason
                .is_some_and(|r| record.header(headers::REASON) != Some(r.as_str()));
        if fields_differ {
            return Pick::Other;
        }
        if self.since.is_none() && self.until.is_none() {
            return Pick::Taken;
        }
        match dead_lettered_at(record) {
            None => Pick::Untimed,
            Some(at)
                if self.since.is_some_and(|s| at < s) || self.until.is_some_and(|u| at >= u) =>
            {
                Pick::Other
            }
            Some(_) => Pick::Taken,
        }
    }

    /// Whether `record` came from the `--topic` asked for (see `origin`).
    /// `None`: it names no topic where one is required.
    fn came_from_origin(&self, record: &RawRecord) -> Option<bool> {
        let Some(origin) = &self.origin else {
            return Some(true);
        };
        match record.header(headers::TOPIC).filter(|t| !t.is_empty()) {
            Some(t) => Some(t == origin),
            None => (!self.origin_required).then_some(true),
        }
    }
}

/// What a [`Filter`] makes of a letter.
#[derive(Debug, PartialEq, Eq)]
enum Pick {
    Taken,
    /// It names another original topic than `--topic`.
    OtherTopic,
    /// It names no original topic, and one is required (`--dlq-topic`).
    NoOrigin,
    /// `--since`/`--until` alone left it out: it carries no readable
    /// dead-letter time (another producer's letter).
    Untimed,
    /// Another condition left it out.
    Other,
}

/// Letters the selection left out that the command reports.
#[derive(Default)]
struct LeftOut {
    other_topic: usize,
    no_origin: usize,
    untimed: usize,
}

impl LeftOut {
    fn count(&mut self, pick: &Pick) {
        match pick {
            Pick::OtherTopic => self.other_topic += 1,
            Pick::NoOrigin => self.no_origin += 1,
            Pick::Untimed => self.untimed += 1,
            Pick::Taken | Pick::Other => {}
        }
    }

    /// On stderr; `other_topic` says what became of those letters.
    fn report(&self, topic: &str, other_topic: &str) {
        if self.other_topic > 0 {
            note!(
                "{} dead letters in {topic} name another original topic than --topic; \
                 {other_topic}",
                self.other_topic
            );
        }
        if self.no_origin > 0 {
            note!(
                "records in {topic} that name no original topic (no `{}` header), so are \
                 no dead letters of Keel's router, left out: {} (is {topic} a dead-letter topic?)",
                headers::TOPIC,
                self.no_origin
            );
        }
        if self.untimed > 0 {
            note!(
                "{} dead letters carry no readable `{}` time (another producer's) and were \
                 left out by --since/--until; without those flags they are included",
                self.untimed,
                headers::AT
            );
        }
    }
}

/// One dead letter as read.
struct DeadLetter {
    partition: u32,
    position: u64,
    record: RawRecord,
}

pub(crate) async fn run(
    config: &KeelConfig,
    registry: RegistryClient,
    command: DlqCommand,
) -> anyhow::Result<()> {
    match command {
        DlqCommand::List(args) => list(config, registry, args).await,
        DlqCommand::Redrive(args) => redrive(config, args).await,
    }
}

fn dlq_topic(config: &KeelConfig, args: &DlqArgs, command: &str) -> anyhow::Result<String> {
    let broker = broker::broker(config, command)?;
    Ok(match (&args.dlq_topic, &args.topic) {
        (Some(dlq), _) => dlq.clone(),
        (None, Some(topic)) => {
            let transport = match broker {
                Broker::Kafka(_) => "kafka",
                Broker::Nats(_) => "nats",
            };
            format!("{topic}{}", dead_letter::default_suffix(transport))
        }
        (None, None) => bail!("give --topic (or --dlq-topic)"),
    })
}

async fn list(config: &KeelConfig, registry: RegistryClient, args: DlqArgs) -> anyhow::Result<()> {
    let topic = dlq_topic(config, &args, "dlq list")?;
    let filter = Filter::new(&args)?;
    let codec = AvroCodec::new(Arc::new(registry), CodecOptions::default());
    let mut printed = 0;
    // Listed records that carry no dead-letter reason: not letters of
    // Keel's router (a wrong --dlq-topic, say).
    let mut not_letters = 0;
    let mut left_out = LeftOut::default();
    let mut failed = None;
    read_dead_letters(config, &topic, async |dead| {
        if dead_letter::is_redrive_marker(&dead.record) {
            return true;
        }
        let pick = filter.pick(&dead.record);
        if pick != Pick::Taken {
            left_out.count(&pick);
            return true;
        }
        let line = match describe(&dead, &codec).await {
            Ok(line) => line,
            Err(e) => {
                failed = Some(e);
                return false;
            }
        };
        say!("{line}");
        if crate::output::stopped() {
            return false; // a closed pipe (`keel dlq list | head`)
        }
        printed += 1;
        if dead.record.header(headers::REASON).is_none() {
            not_letters += 1;
        }
        true
    })
    .await?;
    if let Some(e) = failed {
        return Err(anyhow::Error::new(e).context(format!(
            "{printed} dead letters listed from {topic}, then the schema registry failed; \
             run the command again once it answers"
        )));
    }
    note!("{printed} dead letters listed from {topic}");
    if not_letters > 0 {
        note!(
            "warning: {not_letters} of them carry no `{}` header: not dead letters of Keel's \
             router (is {topic} the dead-letter topic?)",
            headers::REASON
        );
    }
    left_out.report(
        &topic,
        &format!("not listed (`--dlq-topic {topic}` alone lists every letter)"),
    );
    Ok(())
}

/// A letter as `dlq list` prints it; fails only when the registry does
/// (unreachable, refusing: no fault of the letter, and every later one
/// would show as undecodable too).
async fn describe(dead: &DeadLetter, codec: &AvroCodec) -> Result<Value, SchemaError> {
    let r = &dead.record;
    let event = match codec.decode_json(&r.payload).await {
        Ok(v) => v,
        Err(e) if !e.is_poison() => return Err(e),
        Err(e) => json!({ "undecodable": e.to_string() }),
    };
    let other = wire::group_headers(
        r.headers
            .iter()
            .filter(|(n, _)| !n.starts_with("keel-") && !n.eq_ignore_ascii_case("nats-msg-id"))
            .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v))),
    );
    Ok(json!({
        "dlq_partition": dead.partition,
        "dlq_position": dead.position,
        "reason": r.header(headers::REASON),
        "error": r.header(headers::ERROR),
        "attempts": r.header(headers::ATTEMPTS).and_then(|a| a.parse::<u64>().ok()),
        "topic": r.header(headers::TOPIC),
        "partition": r.header(headers::PARTITION).and_then(|p| p.parse::<u64>().ok()),
        "position": r.header(headers::POSITION).and_then(|p| p.parse::<u64>().ok()),
        "group": r.header(headers::GROUP),
        "dead_lettered_at": r.header(headers::AT),
        "key": r.partition_key().map(|k| String::from_utf8_lossy(&k).into_owned()),
        "id": r.header(wire::EVENT_ID),
        "type": r.header(wire::EVENT_TYPE),
        "headers": other,
        "event": event,
    }))
}

/// Reads the dead-letter topic twice: first to pick the letters (keeping
/// only where each is and what picks it: memory stays small however large
/// the letters are), then to send the picked ones back, each followed by
/// its marker.
async fn redrive(config: &KeelConfig, args: RedriveArgs) -> anyhow::Result<()> {
    let topic = dlq_topic(config, &args.filter, "dlq redrive")?;
    let filter = Filter::new(&args.filter)?;
    let mut selected: Vec<Note> = Vec::new();
    // The letters earlier redrives sent back, as `partition@position`.
    let mut sent = std::collections::HashSet::new();
    let mut total = 0;
    let mut left_out = LeftOut::default();
    read_dead_letters(config, &topic, async |dead| {
        if dead_letter::is_redrive_marker(&dead.record) {
            if let Some(letter) = dead.record.header(headers::REDRIVEN) {
                sent.insert(letter.to_owned());
            }
            return true;
        }
        total += 1;
        match filter.pick(&dead.record) {
            Pick::Taken => selected.push(Note::of(&dead)),
            pick => left_out.count(&pick),
        }
        true
    })
    .await?;
    left_out.report(
        &topic,
        &format!("left out (redrive them with --dlq-topic {topic} --topic <their topic>)"),
    );
    let (selected, superseded) = latest_per_event(selected);
    // Each event's latest letter, unless an earlier redrive sent that very
    // letter back (a newer one means the event failed again).
    let (selected, already): (Vec<Note>, Vec<Note>) = selected.into_iter().partition(|note| {
        args.include_redriven
            || !sent.contains(&dead_letter::letter_at(note.partition, note.position))
    });
    if !already.is_empty() {
        note!(
            "{} letters already redriven left out (events dead-lettered again since \
             go as their newer letter; --include-redriven sends these again)",
            already.len()
        );
    }
    // Letters another producer wrote (no original topic): reported and
    // left where they are; the rest still go.
    let (selected, foreign): (Vec<Note>, Vec<Note>) =
        selected.into_iter().partition(|note| note.origin.is_some());
    for note in &foreign {
        say!(
            "skipped {topic}/{}@{}: it has no `{}` header naming the topic it came from \
             (not a dead letter of Keel's router)",
            note.partition,
            note.position,
            headers::TOPIC
        );
    }
    if superseded > 0 {
        note!(
            "{superseded} older dead letters of events dead-lettered again later left out \
             (each event goes back once, as its latest dead letter)"
        );
    }
    if args.dry_run {
        for note in &selected {
            say!(
                "would redrive {} ({}) at {}/{}@{} to {}",
                note.id.as_deref().unwrap_or("a record without an event id"),
                note.event_type.as_deref().unwrap_or("no event type"),
                topic,
                note.partition,
                note.position,
                note.origin.as_deref().unwrap_or("?")
            );
        }
        note!(
            "{} of {total} dead letters would be redriven; nothing published (--dry-run)",
            selected.len()
        );
        return skipped(foreign.len());
    }
    let publisher =
        broker::publisher(config, "dlq redrive", config.publisher.ack_timeout()).await?;
    let progress = ProgressBar::new(selected.len() as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} redriving {pos}/{len} dead letters {wide_bar} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // What the first read selected, by place, with what identifies it.
    let mut wanted: HashMap<(u32, u64), Note> = selected
        .into_iter()
        .map(|note| ((note.partition, note.position), note))
        .collect();
    let mut redriven = 0;
    let mut changed = 0;
    let mut failure = None;
    if !wanted.is_empty() {
        let read = read_dead_letters(config, &topic, async |dead| {
            let Some(note) = wanted.remove(&(dead.partition, dead.position)) else {
                return true;
            };
            // Another record at that place (the topic was re-created
            // between the reads): not what was selected, not sent.
            let now = Note::of(&dead);
            if (now.id, now.origin) != (note.id, note.origin) {
                progress.suspend(|| {
                    say!(
                        "skipped {topic}/{}@{}: another record is there than the first read found",
                        dead.partition,
                        dead.position
                    )
                });
                changed += 1;
                return !wanted.is_empty();
            }
            match send_back(&*publisher, &topic, dead, redriven).await {
                Ok(line) => {
                    progress.suspend(|| say!("{line}"));
                    progress.inc(1);
                    redriven += 1;
                    !wanted.is_empty()
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        })
        .await;
        if let Err(e) = read {
            progress.finish_and_clear();
            return Err(e.context(format!(
                "cannot read {topic} again to send the selected letters ({redriven} redriven \
                 before this, each recorded: running the command again skips them)"
            )));
        }
    }
    progress.finish_and_clear();
    if let Some(e) = failure {
        return Err(e);
    }
    note!("{redriven} of {total} dead letters redriven from {topic}");
    let missing = wanted.len() + changed;
    if missing > 0 {
        bail!(
            "{missing} selected dead letters were no longer in {topic} as first read when they \
             were to be sent (removed by its retention, or the topic re-created, meanwhile); \
             they were not redriven: `keel dlq list` shows what it holds now, and running the \
             command again sends what is still there"
        );
    }
    skipped(foreign.len())
}

/// Sends `dead` back to its topic and records that with a marker in
/// `topic`; what to print, or why it failed (`before`: how many were sent
/// before it).
async fn send_back(
    publisher: &dyn keel_core::Publisher,
    topic: &str,
    dead: DeadLetter,
    before: usize,
) -> anyhow::Result<String> {
    let at = format!("{topic}/{}@{}", dead.partition, dead.position);
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let marker = dead_letter::redrive_marker(&dead.record, dead.partition, dead.position, &now);
    let receipt = dead_letter::redrive(publisher, dead.record)
        .await
        .with_context(|| {
            format!(
                "cannot redrive the dead letter at {at} ({before} redriven before it, \
                 each recorded: running the command again skips them)"
            )
        })?;
    // Recorded after the send: a crash between the two sends the event
    // once more on the next run (at least once, never lost).
    publisher
        .publish_record(topic, marker)
        .await
        .with_context(|| {
            format!(
                "redrove the dead letter at {at}, but cannot record that in {topic}: \
                 running the command again sends it again"
            )
        })?;
    Ok(format!(
        "redrove {at} to {}/{}@{}",
        receipt.topic, receipt.partition, receipt.position
    ))
}

/// The command's outcome when `foreign` letters were skipped: a failure
/// naming how many, so scripts notice.
fn skipped(foreign: usize) -> anyhow::Result<()> {
    if foreign == 0 {
        return Ok(());
    }
    bail!(
        "{foreign} more dead letters matched but were skipped (listed above): they do not name \
         the topic they came from; publish them yourself (`keel dlq list` shows them) or leave them out \
         with --type, --key, --reason, --since or --until"
    )
}

/// What a redrive keeps of a letter between its two reads.
struct Note {
    partition: u32,
    position: u64,
    /// The event id.
    id: Option<String>,
    event_type: Option<String>,
    /// The topic it came from (none when the header is missing or empty).
    origin: Option<String>,
    /// When it was dead-lettered, if it says.
    at: Option<DateTime<Utc>>,
}

impl Note {
    fn of(dead: &DeadLetter) -> Note {
        let header = |name: &str| dead.record.header(name).map(str::to_owned);
        Note {
            partition: dead.partition,
            position: dead.position,
            id: header(wire::EVENT_ID),
            event_type: header(wire::EVENT_TYPE),
            origin: header(headers::TOPIC).filter(|t| !t.is_empty()),
            at: dead_lettered_at(&dead.record),
        }
    }
}

/// When `record` was dead-lettered, if it says (`keel-dlq-at`).
fn dead_lettered_at(record: &RawRecord) -> Option<DateTime<Utc>> {
    record
        .header(headers::AT)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// `letters` with only the latest dead letter of each event id (an event
/// redriven and dead-lettered again has several: sending each would
/// deliver it once per copy, and every copy that fails again adds one
/// more), in read order, and how many were left out. The latest is, in
/// each partition of the dead-letter topic (where an event's letters go,
/// by its key), the one later in the log; across partitions (a topic
/// re-partitioned), of those, the one dead-lettered last by its
/// `keel-dlq-at` (the writing host's clock), the higher partition on a tie.
fn latest_per_event(letters: Vec<Note>) -> (Vec<Note>, usize) {
    // Each event's latest letter per partition, then the latest of those.
    let mut per_partition: HashMap<(&str, &str, u32), usize> = HashMap::new();
    for (i, note) in letters.iter().enumerate() {
        let Some(id) = note.id.as_deref() else {
            continue;
        };
        let origin = note.origin.as_deref().unwrap_or_default();
        let slot = per_partition
            .entry((origin, id, note.partition))
            .or_insert(i);
        if letters[*slot].position < note.position {
            *slot = i;
        }
    }
    // A letter without a time ranks below one with it (`None < Some`).
    let mut latest: HashMap<(&str, &str), usize> = HashMap::new();
    for (&(origin, id, _), &i) in &per_partition {
        let rank = |n: &Note| (n.at, n.partition);
        let slot = latest.entry((origin, id)).or_insert(i);
        if rank(&letters[*slot]) < rank(&letters[i]) {
            *slot = i;
        }
    }
    let kept_at: std::collections::HashSet<usize> = latest.into_values().collect();
    let mut superseded = 0;
    let kept: Vec<Note> = letters
        .into_iter()
        .enumerate()
        .filter(|(i, note)| {
            let keep = note.id.is_none() || kept_at.contains(i);
            superseded += usize::from(!keep);
            keep
        })
        .map(|(_, note)| note)
        .collect();
    (kept, superseded)
}

/// Reads `topic` from its start to the end it has now, handing each record
/// to `each` (which returns `false` to stop early).
async fn read_dead_letters(
    config: &KeelConfig,
    topic: &str,
    mut each: impl AsyncFnMut(DeadLetter) -> bool,
) -> anyhow::Result<()> {
    let reader = broker::Reader::new(config, "dlq").await?;
    let mut ends = reader
        .ends_per_partition(topic)
        .await
        .with_context(|| format!("cannot read dead-letter topic `{topic}`"))?;
    let mut left = ends.iter().filter(|end| **end != End::Reached).count();
    if left == 0 {
        return Ok(());
    }
    // One delivery at a time comes in position order within a partition,
    // which an end given as a position needs: with more, a key's next
    // record goes out only once its previous one is settled, after
    // records of other keys further on.
    let in_flight = if ends.iter().any(End::needs_order) {
        1
    } else {
        64
    };
    let mut member = reader
        .subscribe(
            Subscription::new(topic, reader.group())
                .start_from(StartFrom::Earliest)
                .max_in_flight(in_flight),
        )
        .await?;
    let mut seen = std::collections::HashSet::new();
    let outcome = loop {
        let item = match tokio::time::timeout(Duration::from_secs(30), member.next()).await {
            Ok(Some(item)) => item,
            Ok(None) => {
                break Err(anyhow::anyhow!(
                    "the subscription to `{topic}` ended with {left} partitions not read to \
                     their end; nothing was left out on purpose: run the command again"
                ));
            }
            Err(_) => {
                break Err(anyhow::anyhow!(
                    "no record of `{topic}` arrived for 30 s with {left} partitions not read to \
                     their end: check that the broker is reachable, that the topic's \
                     records were not removed meanwhile (its retention), and, on Kafka, \
                     that no transactional producer wrote to it (a transaction's marker \
                     takes the last offset a reader waits for)"
                ));
            }
        };
        let dead = match item {
            Ok(delivery) => {
                let (envelope, info, settler) = delivery.into_parts();
                settler.ack();
                // Headers Keel cannot carry on (a line break in a value,
                // from another producer): kept with the breaks made
                // spaces, as the router dead-letters such an event.
                let record = RawRecord::from_envelope(&envelope)
                    .unwrap_or_else(|_| dead_letter::lossy_record(&envelope));
                (info, record)
            }
            Err(Error::Undecodable(u)) => {
                let (record, info, _, settler) = u.into_parts();
                settler.ack();
                (info, record)
            }
            Err(e) if e.is_retriable() => continue,
            Err(e) => break Err(e.into()),
        };
        let (info, record) = dead;
        let (partition, position) = (info.coordinates.partition, info.coordinates.position);
        let Some(end) = ends.get_mut(partition as usize) else {
            continue;
        };
        // Records past the end as it was, and re-deliveries, are skipped.
        if *end == End::Reached || !seen.insert((partition, position)) {
            continue;
        }
        let within = end.take(position);
        if *end == End::Reached {
            left -= 1;
        }
        let go_on = !within
            || each(DeadLetter {
                partition,
                position,
                record,
            })
            .await;
        if !go_on || left == 0 {
            break Ok(());
        }
    };
    member.leave().await?;
    reader.clean_up(topic).await?;
    outcome
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn note(partition: u32, position: u64, at: &str) -> Note {
        Note {
            partition,
            position,
            id: Some("e1".into()),
            event_type: None,
            origin: Some("orders".into()),
            at: Some(
                DateTime::parse_from_rfc3339(at)
                    .unwrap()
                    .with_timezone(&Utc),
            ),
        }
    }

    #[test]
    fn an_events_latest_letter_is_the_later_in_its_partition_whatever_the_clocks_say() {
        // Dead-lettered again on a host whose clock is behind: still the
        // latest, as the log orders it.
        let (kept, superseded) = latest_per_event(vec![
            note(0, 10, "2026-12-01T10:00:00Z"),
            note(0, 20, "2026-12-01T09:00:00Z"),
        ]);
        assert_eq!(superseded, 1);
        assert_eq!(kept.iter().map(|n| n.position).collect::<Vec<_>>(), [20]);
        // Whatever order the partitions' letters are read in, the same
        // one is kept: each partition's last, then the latest by time.
        let three = || {
            vec![
                note(0, 10, "2026-12-01T10:00:00Z"),
                note(1, 5, "2026-12-01T09:30:00Z"),
                note(0, 20, "2026-12-01T09:00:00Z"),
            ]
        };
        let mut reordered = three();
        reordered.swap(1, 2);
        for letters in [three(), reordered] {
            let (kept, superseded) = latest_per_event(letters);
            assert_eq!(superseded, 2);
            assert_eq!(
                kept.iter()
                    .map(|n| (n.partition, n.position))
                    .collect::<Vec<_>>(),
                [(1, 5)]
            );
        }
        // Across partitions only the time can tell.
        let (kept, _) = latest_per_event(vec![
            note(0, 10, "2026-12-01T10:00:00Z"),
            note(1, 5, "2026-12-01T09:00:00Z"),
        ]);
        assert_eq!(
            kept.iter()
                .map(|n| (n.partition, n.position))
                .collect::<Vec<_>>(),
            [(0, 10)]
        );
    }

    fn letter(origin: Option<&str>) -> RawRecord {
        RawRecord {
            key: None,
            headers: origin
                .map(|t| (headers::TOPIC.to_owned(), t.to_owned().into()))
                .into_iter()
                .collect(),
            payload: Default::default(),
        }
    }

    fn args(topic: Option<&str>, dlq_topic: Option<&str>) -> DlqArgs {
        DlqArgs {
            topic: topic.map(str::to_owned),
            dlq_topic: dlq_topic.map(str::to_owned),
            event_type: None,
            key: None,
            reason: None,
            since: None,
            until: None,
        }
    }

    #[test]
    fn letters_naming_another_topic_than_the_one_asked_for_are_left_out() {
        // `--topic orders` reads orders.dlq: a letter naming payments is
        // not redriven into payments; one naming no topic is taken (and
        // reported as not sendable).
        let f = Filter::new(&args(Some("orders"), None)).unwrap();
        assert_eq!(f.pick(&letter(Some("orders"))), Pick::Taken);
        assert_eq!(f.pick(&letter(Some("payments"))), Pick::OtherTopic);
        assert_eq!(f.pick(&letter(None)), Pick::Taken);
        // A shared dead-letter topic read for one topic: it must be named.
        let f = Filter::new(&args(Some("orders"), Some("all.dlq"))).unwrap();
        assert_eq!(f.pick(&letter(Some("orders"))), Pick::Taken);
        assert_eq!(f.pick(&letter(None)), Pick::NoOrigin);
        let f = Filter::new(&args(None, Some("all.dlq"))).unwrap();
        assert_eq!(f.pick(&letter(Some("payments"))), Pick::Taken);
        assert_eq!(f.pick(&letter(None)), Pick::Taken);
    }

    #[test]
    fn letters_without_a_time_are_counted_when_a_time_filter_leaves_them_out() {
        let untimed = letter(Some("orders"));
        let plain = Filter::new(&args(Some("orders"), None)).unwrap();
        assert_eq!(plain.pick(&untimed), Pick::Taken);
        let mut a = args(Some("orders"), None);
        a.since = Some("2026-12-01T10:00:00Z".into());
        let timed = Filter::new(&a).unwrap();
        assert_eq!(timed.pick(&untimed), Pick::Untimed);
        // Left out by another condition first: not counted as untimed.
        a.event_type = Some("test.Other".into());
        let typed = Filter::new(&a).unwrap();
        assert_eq!(typed.pick(&untimed), Pick::Other);
    }

    #[test]
    fn a_time_range_that_matches_nothing_is_refused() {
        let mut a = args(Some("orders"), None);
        a.since = Some("2026-12-01T10:00:00Z".into());
        a.until = Some("2026-12-01T09:00:00Z".into());
        let e = Filter::new(&a).err().unwrap().to_string();
        assert!(e.contains("--since") && e.contains("--until"), "{e}");
    }
}
