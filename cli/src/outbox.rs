//! `keel outbox parked`, `requeue` and `discard`: the rows a relay parked
//! because the broker refused them `max_attempts` times (their keys'
//! later rows wait behind them), listed with their errors, put back in
//! line once the cause is fixed, or deleted when they can never go out.

use std::collections::HashSet;

use anyhow::bail;
use clap::{Args, Subcommand};
use keel_core::KeelConfig;
use keel_core::config::redact;
use keel_producers::outbox::parked::{self, ParkedFilter, ParkedRow};
use keel_producers::outbox::sqlite;
use keel_producers::outbox::{OutboxError, OutboxTables};
use sqlx::{PgPool, SqlitePool};

use crate::relay::{OutboxDb, connect};

#[derive(Debug, Subcommand)]
pub(crate) enum OutboxCommand {
    /// Print parked rows as JSON lines, oldest first: id, topic, event id,
    /// type, key, payload size, attempts, last error, when enqueued and
    /// parked.
    #[command(after_help = "Examples:\n  \
        keel outbox parked --database postgres://app@db/orders\n  \
        keel outbox parked --database postgres://app@db/orders --topic orders --limit 10\n  \
        keel outbox parked --database sqlite:///var/lib/orders/outbox.db")]
    Parked(ParkedArgs),
    /// Put parked rows back in line (attempts reset) and wake the relays.
    /// Pick them with --topic and/or --id, or take every one with --all.
    #[command(after_help = "Examples:\n  \
        keel outbox requeue --database postgres://app@db/orders --topic orders\n  \
        keel outbox requeue --database postgres://app@db/orders --id 1042 --id 1043\n  \
        keel outbox requeue --database postgres://app@db/orders --all")]
    Requeue(PickedArgs),
    /// Delete parked rows that can never be published, so the later rows
    /// of their keys go on; prints each deleted row as a JSON line (payload
    /// aside) for the record. Pick them with --topic and/or --id, or --all.
    /// Rows go a batch of 1,000 at a time, each deleted only once it was
    /// written out in full: an interrupted run, or one whose output could
    /// not be written (a pipe closed while the batch was written, a full
    /// disk; the command then fails), has deleted the batches it wrote and
    /// left the rest parked (the batch being written may show in part).
    /// What a reader like `head` took in and threw away counts as written.
    #[command(after_help = "Examples:\n  \
        keel outbox discard --database postgres://app@db/orders --id 1042\n  \
        keel outbox discard --database postgres://app@db/orders --topic orders")]
    Discard(PickedArgs),
}

#[derive(Debug, Args)]
pub(crate) struct Selection {
    /// Only rows of this topic.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    topic: Option<String>,
    /// Only this row (its outbox id); repeat for several.
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<i64>,
}

impl Selection {
    fn filter(&self) -> ParkedFilter {
        ParkedFilter {
            topic: self.topic.clone(),
            ids: self.ids.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        self.topic.is_none() && self.ids.is_empty()
    }
}

#[derive(Debug, Args)]
pub(crate) struct ParkedArgs {
    #[command(flatten)]
    db: OutboxDb,
    #[command(flatten)]
    selection: Selection,
    /// Print at most this many rows.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    limit: u32,
}

#[derive(Debug, Args)]
pub(crate) struct PickedArgs {
    #[command(flatten)]
    db: OutboxDb,
    #[command(flatten)]
    selection: Selection,
    /// Every parked row of the outbox.
    #[arg(long, conflicts_with_all = ["topic", "ids"])]
    all: bool,
}

/// Rows `keel outbox discard` deletes (and prints) per statement.
const DISCARD_BATCH: u32 = 1_000;

pub(crate) async fn run(config: &KeelConfig, command: OutboxCommand) -> anyhow::Result<()> {
    match command {
        OutboxCommand::Parked(args) => {
            let (database, tables) = args.db.resolve_for(config, "keel outbox parked", true)?;
            let db = connect_outbox(&database, &tables).await?;
            let rows = db
                .list(&tables, &args.selection.filter(), args.limit)
                .await?;
            for row in &rows {
                say!("{}", serde_json::to_string(row)?);
            }
            let more = if rows.len() == args.limit as usize {
                " (the --limit: there may be more)"
            } else {
                ""
            };
            note!("{} parked row(s) in {}{more}", rows.len(), db.name(&tables));
        }
        OutboxCommand::Requeue(args) => {
            let (db, tables, filter) = args.open(config, "keel outbox requeue").await?;
            let done = db.requeue(&tables, &filter).await?;
            say!("requeued {done} parked row(s) of {}", db.name(&tables));
        }
        OutboxCommand::Discard(args) => {
            let (db, tables, filter) = args.open(config, "keel outbox discard").await?;
            // A batch at a time, each printed (the record of what is gone)
            // before its delete takes effect: memory stays bounded however
            // many rows are parked, and a batch that cannot be written out
            // (a closed pipe, a full disk) stays parked. Until a batch
            // finds none (one cut short by a concurrent requeue is not the
            // end).
            let mut discarded = 0;
            loop {
                let mut printed = Vec::new();
                let batch = db
                    .discard(&tables, &filter, DISCARD_BATCH, |rows| {
                        printed = rows.iter().map(|row| row.id).collect();
                        print_rows(rows)
                    })
                    .await;
                let rows = match batch {
                    Ok(rows) => rows,
                    Err(e) => {
                        let outbox = db.name(&tables);
                        return Err(anyhow::Error::new(e).context(format!(
                            "discarded {discarded} parked row(s) of {outbox} before this batch (each printed above)"
                        )));
                    }
                };
                if printed.is_empty() {
                    break;
                }
                discarded += rows.len();
                // SQLite's discard prints before it deletes: a row requeued
                // in between was printed but stays.
                let gone: HashSet<i64> = rows.iter().map(|row| row.id).collect();
                let kept: Vec<i64> = printed
                    .into_iter()
                    .filter(|id| !gone.contains(id))
                    .collect();
                if !kept.is_empty() {
                    note!(
                        "{} printed row(s) were requeued meanwhile and stay in the outbox, not discarded: ids {kept:?}",
                        kept.len()
                    );
                }
            }
            note!(
                "discarded {discarded} parked row(s) of {}",
                db.name(&tables)
            );
        }
    }
    Ok(())
}

impl PickedArgs {
    /// The outbox's pool, tables and the rows picked, for `command`, which
    /// changes rows: refused without a selection (--all picks every one).
    async fn open(
        &self,
        config: &KeelConfig,
        command: &str,
    ) -> anyhow::Result<(OutboxDatabase, OutboxTables, ParkedFilter)> {
        if !self.all && self.selection.is_empty() {
            bail!("`{command}` needs a selection: --topic, --id, or --all for every parked row");
        }
        let (database, tables) = self.db.resolve_for(config, command, true)?;
        let db = connect_outbox(&database, &tables).await?;
        Ok((db, tables, self.selection.filter()))
    }
}

/// Writes `rows` to standard output as JSON lines, flushed: the record of
/// a batch of discarded rows, which is committed only if this succeeds.
fn print_rows(rows: &[ParkedRow]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for row in rows {
        serde_json::to_writer(&mut out, row)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// The outbox's database: PostgreSQL, or a SQLite file (the embedded
/// flavour, which has no schema: --schema does not apply).
enum OutboxDatabase {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl OutboxDatabase {
    /// The outbox as its database names it (`schema.table`, or the table
    /// alone on SQLite).
    fn name(&self, tables: &OutboxTables) -> String {
        match self {
            OutboxDatabase::Postgres(_) => tables.channel(),
            OutboxDatabase::Sqlite(_) => tables.outbox_name().to_owned(),
        }
    }

    async fn list(
        &self,
        tables: &OutboxTables,
        filter: &ParkedFilter,
        limit: u32,
    ) -> anyhow::Result<Vec<ParkedRow>> {
        Ok(match self {
            OutboxDatabase::Postgres(pool) => parked::list(pool, tables, filter, limit).await?,
            OutboxDatabase::Sqlite(pool) => {
                sqlite::list_parked(pool, tables, filter, limit).await?
            }
        })
    }

    async fn requeue(&self, tables: &OutboxTables, filter: &ParkedFilter) -> anyhow::Result<u64> {
        Ok(match self {
            OutboxDatabase::Postgres(pool) => parked::requeue(pool, tables, filter).await?,
            OutboxDatabase::Sqlite(pool) => sqlite::requeue_parked(pool, tables, filter).await?,
        })
    }

    /// Discards at most `limit` of the picked rows, the oldest first, once
    /// `record` took them (they stay parked when it fails).
    async fn discard(
        &self,
        tables: &OutboxTables,
        filter: &ParkedFilter,
        limit: u32,
        record: impl FnOnce(&[ParkedRow]) -> std::io::Result<()>,
    ) -> Result<Vec<ParkedRow>, OutboxError> {
        match self {
            OutboxDatabase::Postgres(pool) => {
                parked::discard_some(pool, tables, filter, limit, record).await
            }
            OutboxDatabase::Sqlite(pool) => {
                sqlite::discard_parked_some(pool, tables, filter, limit, record).await
            }
        }
    }
}

/// The outbox's database, once its outbox table is known to be there (a
/// wrong --schema/--table or a database never migrated is named, not
/// reported as a failing query).
async fn connect_outbox(database: &str, tables: &OutboxTables) -> anyhow::Result<OutboxDatabase> {
    if database.starts_with("sqlite:") {
        return connect_sqlite(database, tables).await;
    }
    let (pool, _) = connect(database).await?;
    if !tables.outbox_exists(&pool).await? {
        bail!(
            "there is no outbox table {}.{} in {}: check --schema and --table, or create it by running `keel relay` once (it migrates) or OutboxTables::migrate",
            tables.schema(),
            tables.outbox_name(),
            redact(database)
        );
    }
    Ok(OutboxDatabase::Postgres(pool))
}

/// A SQLite outbox: the file must exist (it is never created here) and
/// hold the outbox table.
async fn connect_sqlite(database: &str, tables: &OutboxTables) -> anyhow::Result<OutboxDatabase> {
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(database)
        .map_err(|e| anyhow::anyhow!("--database {}: not a SQLite URL: {e}", redact(database)))?
        .create_if_missing(false);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open the SQLite outbox {}: {e} (the file must exist)",
                redact(database)
            )
        })?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?)",
    )
    .bind(tables.outbox_name())
    .fetch_one(&pool)
    .await?;
    if !exists {
        bail!(
            "there is no outbox table {} in {}: check --table, or create it with migrate_sqlite",
            tables.outbox_name(),
            redact(database)
        );
    }
    Ok(OutboxDatabase::Sqlite(pool))
}
