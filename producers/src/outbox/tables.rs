//! Where the outbox lives: schema and table names, checked against an
//! identifier allowlist and quoted before they reach any SQL, and the
//! migrations that create the tables.
//!
//! The migrations are sqlx migrations rendered from a template shipped with
//! the crate (`migrations/postgres`). They are recorded in sqlx's
//! `_sqlx_migrations` table *inside the outbox's own schema* (the migrator
//! runs with `search_path` set to it), so they never mix with the
//! application's own sqlx migrations in `public`. One schema holds one set
//! of Keel tables.

use std::borrow::Cow;

use futures::future::BoxFuture;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{Connection, PgPool};

use super::error::{OutboxError, Result};

/// The template of every migration, in order: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        20261128000001,
        "keel outbox and inbox",
        include_str!("../../migrations/postgres/0001_outbox_inbox.sql"),
    ),
    (
        20261130000001,
        "keel outbox archive",
        include_str!("../../migrations/postgres/0002_outbox_archive.sql"),
    ),
];

/// Longest schema or table name accepted. Keel derives index, lease and
/// notification-channel names from these and PostgreSQL cuts identifiers
/// at 63 bytes, so the names are kept short enough for every derived one.
pub const MAX_IDENTIFIER_LEN: usize = 31;

/// Names of the outbox's schema and tables. Defaults: schema `keel`, tables
/// `outbox` and `inbox`; the archive of published rows and the relay's
/// lease tables are named after the outbox (`outbox_archive`,
/// `outbox_leases`, `outbox_relays`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxTables {
    schema: String,
    outbox: String,
    inbox: String,
}

impl Default for OutboxTables {
    fn default() -> Self {
        OutboxTables {
            schema: "keel".into(),
            outbox: "outbox".into(),
            inbox: "inbox".into(),
        }
    }
}

impl OutboxTables {
    /// Custom names; each must match `[a-z_][a-z0-9_]*`, at most
    /// [`MAX_IDENTIFIER_LEN`] characters, and not start with `pg_`.
    pub fn new(schema: &str, outbox: &str, inbox: &str) -> Result<Self> {
        for (setting, name) in [
            ("outbox.schema (keel's --schema)", schema),
            ("outbox.table (keel's --table)", outbox),
            ("outbox.inbox_table (keel's --inbox-table)", inbox),
        ] {
            check_identifier(setting, name)?;
        }
        // Every relation the migrations create, by whose name it carries:
        // none may be another's (CREATE … IF NOT EXISTS would silently
        // take the existing one), nor sqlx's migration table.
        let of_outbox = derived_names(outbox, &OUTBOX_RELATIONS, &OUTBOX_IMPLIED);
        let of_inbox = derived_names(inbox, &INBOX_RELATIONS, &INBOX_IMPLIED);
        for (setting, names) in [
            ("outbox.table (keel's --table)", &of_outbox[..]),
            ("outbox.inbox_table (keel's --inbox-table)", &of_inbox[..]),
        ] {
            if names.iter().any(|name| name == "_sqlx_migrations") {
                return Err(OutboxError::config(
                    setting,
                    "`_sqlx_migrations` is the migration table in the outbox's schema: \
                     choose other names",
                ));
            }
        }
        if let Some(clash) = of_inbox.iter().find(|name| of_outbox.contains(name)) {
            return Err(OutboxError::config(
                "outbox.inbox_table (keel's --inbox-table)",
                format!(
                    "outbox `{outbox}` and inbox `{inbox}` would both use the name `{clash}` \
                     (the outbox's tables, indexes and sequence: {}; the inbox's: {}): \
                     choose other names",
                    of_outbox.join(", "),
                    of_inbox.join(", ")
                ),
            ));
        }
        Ok(OutboxTables {
            schema: schema.into(),
            outbox: outbox.into(),
            inbox: inbox.into(),
        })
    }

    /// The schema name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The outbox table's bare name.
    pub fn outbox_name(&self) -> &str {
        &self.outbox
    }

    /// The inbox table's bare name.
    pub fn inbox_name(&self) -> &str {
        &self.inbox
    }

    /// The archive's bare name (`<outbox>_archive`): published rows, kept
    /// for the relay's retention. The outbox table holds unpublished rows
    /// only.
    pub fn archive_name(&self) -> String {
        format!("{}_archive", self.outbox)
    }

    /// Whether the outbox table exists in `pool`'s database.
    pub async fn outbox_exists(&self, pool: &PgPool) -> Result<bool> {
        Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(self.outbox())
            .fetch_one(pool)
            .await?)
    }

    /// Checks that the outbox, its archive and the relays' tables exist in
    /// `pool`'s database (`migrate` made them), naming the settings and the
    /// migration when not: what a relay needs before it starts.
    pub async fn check_migrated(&self, pool: &PgPool) -> Result<()> {
        let (outbox, archive, leases, relays): (bool, bool, bool, bool) = sqlx::query_as(
            "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL, \
                    to_regclass($3) IS NOT NULL, to_regclass($4) IS NOT NULL",
        )
        .bind(self.outbox())
        .bind(self.archive())
        .bind(self.leases())
        .bind(self.relays())
        .fetch_one(pool)
        .await?;
        if !outbox {
            return Err(OutboxError::config(
                "outbox.schema and outbox.table (keel's --schema and --table)",
                format!(
                    "there is no outbox table {} in this database: check the names, or apply \
                     Keel's outbox migrations (OutboxTables::migrate, or `keel relay` without \
                     --no-migrate)",
                    self.outbox(),
                ),
            ));
        }
        // Without the archive every mark would fail and the same batch
        // would go out again and again; without the relays' own tables no
        // lease can be taken: refuse to start instead.
        for (exists, kind, table) in [
            (archive, "archive", self.archive()),
            (leases, "relay", self.leases()),
            (relays, "relay", self.relays()),
        ] {
            if !exists {
                return Err(OutboxError::config(
                    "outbox.table",
                    format!(
                        "{} has no {kind} table {table}: apply Keel's outbox migrations \
                         (OutboxTables::migrate, or `keel relay` without --no-migrate)",
                        self.outbox(),
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The archive, quoted, for SQL.
    pub(crate) fn archive(&self) -> String {
        self.qualified(&self.archive_name())
    }

    /// `"schema"."outbox"`, quoted, for SQL.
    pub(crate) fn outbox(&self) -> String {
        self.qualified(&self.outbox)
    }

    /// `"schema"."inbox"`, quoted, for SQL.
    pub(crate) fn inbox(&self) -> String {
        self.qualified(&self.inbox)
    }

    /// The relay's slot leases, quoted.
    pub(crate) fn leases(&self) -> String {
        self.qualified(&format!("{}_leases", self.outbox))
    }

    /// The relays' heartbeats, quoted.
    pub(crate) fn relays(&self) -> String {
        self.qualified(&format!("{}_relays", self.outbox))
    }

    /// The LISTEN/NOTIFY channel that enqueues signal (passed as a value to
    /// `pg_notify`, never spliced into SQL).
    pub fn channel(&self) -> String {
        format!("{}.{}", self.schema, self.outbox)
    }

    fn qualified(&self, table: &str) -> String {
        format!("{}.{}", quote(&self.schema), quote(table))
    }

    /// The migration SQL with this outbox's names filled in.
    fn render(&self, template: &str) -> String {
        let relations = OUTBOX_RELATIONS
            .iter()
            .map(|(placeholder, suffix)| (*placeholder, &self.outbox, *suffix))
            .chain(
                INBOX_RELATIONS
                    .iter()
                    .map(|(placeholder, suffix)| (*placeholder, &self.inbox, *suffix)),
            );
        relations.fold(
            template.replace("{schema}", &quote(&self.schema)),
            |sql, (placeholder, name, suffix)| {
                sql.replace(placeholder, &quote(&format!("{name}{suffix}")))
            },
        )
    }

    /// Creates the schema and applies the outbox and inbox migrations
    /// (idempotent; concurrent callers are serialised by sqlx's migration
    /// lock).
    pub async fn migrate(&self, pool: &PgPool) -> Result<()> {
        let mut conn = pool.acquire().await?.detach();
        let outcome = async {
            sqlx::query(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote(&self.schema)
            ))
            .execute(&mut conn)
            .await?;
            // sqlx's migration table is unqualified: on this connection it
            // lands in the outbox's schema.
            sqlx::query(&format!("SET search_path TO {}", quote(&self.schema)))
                .execute(&mut conn)
                .await?;
            let migrator = Migrator::new(Rendered(self.clone())).await?;
            let e = match migrator.run_direct(&mut conn).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            Err(match e {
                sqlx::migrate::MigrateError::VersionMismatch(_) => OutboxError::config(
                    "outbox.schema",
                    format!(
                        "schema `{}` already holds Keel tables created under other names; \
                         use one schema per outbox",
                        self.schema
                    ),
                ),
                sqlx::migrate::MigrateError::VersionMissing(version) => {
                    // Whose migration is it? Keel's descriptions start with
                    // "keel"; anything else is another application's sqlx
                    // migrations sharing the schema's `_sqlx_migrations`.
                    let description: Option<String> = sqlx::query_scalar(
                        "SELECT description FROM _sqlx_migrations WHERE version = $1",
                    )
                    .bind(version)
                    .fetch_optional(&mut conn)
                    .await
                    .ok()
                    .flatten();
                    self.unknown_migration(version, description.as_deref())
                }
                other => OutboxError::Migrate(other),
            })
        }
        .await;
        // The connection's search_path was changed: it never goes back to
        // the pool.
        let _ = conn.close().await;
        outcome
    }

    /// The refusal for a migration recorded in the schema that this build
    /// does not have: a newer Keel's, or another application's.
    fn unknown_migration(&self, version: i64, description: Option<&str>) -> OutboxError {
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        let reason = match description {
            Some(d)
                if version > newest
                    && d.get(..4).is_some_and(|h| h.eq_ignore_ascii_case("keel")) =>
            {
                format!(
                    "schema `{}` was migrated by a newer Keel (its migration {version} is unknown \
                     to this build, which knows up to {newest}); run a relay of that version or \
                     later against it",
                    self.schema
                )
            }
            Some(d) => format!(
                "schema `{}` holds sqlx migrations that are not Keel's (version {version}, \
                 \"{d}\"): another application's migrations share its `_sqlx_migrations` table, \
                 and each would refuse the other's; give the outbox a schema of its own",
                self.schema
            ),
            None => format!(
                "schema `{}` records sqlx migration {version}, which this build does not know \
                 (it knows Keel's up to {newest}): a newer Keel's, or another application's; \
                 give the outbox a schema of its own, or run a newer relay",
                self.schema
            ),
        };
        OutboxError::config("outbox.schema", reason)
    }
}

#[derive(Debug)]
struct Rendered(OutboxTables);

impl<'s> MigrationSource<'s> for Rendered {
    fn resolve(
        self,
    ) -> BoxFuture<'s, std::result::Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(MIGRATIONS
                .iter()
                .map(|(version, description, template)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Owned(self.0.render(template)),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// The relations the migrations create for an outbox, by their
/// placeholder in the migration SQL: the outbox's name plus the suffix.
const OUTBOX_RELATIONS: [(&str, &str); 8] = [
    ("{outbox}", ""),
    ("{archive}", "_archive"),
    ("{archive_published_index}", "_archived"),
    ("{leases}", "_leases"),
    ("{relays}", "_relays"),
    ("{outbox_pending_index}", "_pending"),
    ("{outbox_parked_index}", "_parked"),
    ("{outbox_published_index}", "_published"),
];
/// The names PostgreSQL gives those tables' keys and id sequence, and the
/// SQLite flavour's lease table: the outbox's name plus these.
const OUTBOX_IMPLIED: [&str; 7] = [
    "_pkey",
    "_id_seq",
    "_event_id_key",
    "_archive_pkey",
    "_leases_pkey",
    "_relays_pkey",
    "_relay",
];
/// The same for an inbox (table, index; its key).
const INBOX_RELATIONS: [(&str, &str); 2] =
    [("{inbox}", ""), ("{inbox_processed_index}", "_processed")];
const INBOX_IMPLIED: [&str; 1] = ["_pkey"];

/// Every relation name `name`'s migrations create or imply.
fn derived_names(name: &str, relations: &[(&str, &str)], implied: &[&str]) -> Vec<String> {
    relations
        .iter()
        .map(|(_, suffix)| *suffix)
        .chain(implied.iter().copied())
        .map(|suffix| format!("{name}{suffix}"))
        .collect()
}

fn check_identifier(setting: &str, name: &str) -> Result<()> {
    let mut chars = name.chars();
    let well_formed = matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
    if !well_formed || name.len() > MAX_IDENTIFIER_LEN || name.starts_with("pg_") {
        return Err(OutboxError::config(
            setting,
            format!(
                "`{name}` is not an accepted SQL identifier: use lower-case letters, digits \
                 and `_`, starting with a letter or `_`, at most {MAX_IDENTIFIER_LEN} \
                 characters, not starting with `pg_`"
            ),
        ));
    }
    Ok(())
}

/// Identifiers passed [`check_identifier`]; quoting them as well keeps
/// reserved words (`user`, `order`) usable as names.
fn quote(identifier: &str) -> String {
    format!("\"{identifier}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outside_the_allowlist_are_refused() {
        for bad in [
            "",
            "Outbox",
            "1outbox",
            "out-box",
            "out\"box",
            "outbox; drop table x",
            "pg_outbox",
            "a_name_that_is_far_too_long_for_keel",
        ] {
            let e = OutboxTables::new("keel", bad, "inbox").unwrap_err();
            assert!(e.to_string().contains("outbox.table"), "{bad}: {e}");
        }
        assert!(OutboxTables::new("keel", "outbox", "outbox").is_err());
        for (outbox, inbox) in [
            ("outbox", "outbox_archive"),
            ("outbox", "outbox_leases"),
            ("orders_processed", "orders"),
            ("outbox", "outbox_pkey"),
            ("outbox", "_sqlx_migrations"),
        ] {
            let e = OutboxTables::new("keel", outbox, inbox).unwrap_err();
            assert!(e.to_string().contains("choose other names"), "{e}");
        }
        let e = OutboxTables::new("keel", "_sqlx_migrations", "inbox").unwrap_err();
        assert!(e.to_string().contains("outbox.table"), "{e}");
        let e = OutboxTables::new("keel", "orders_processed", "orders").unwrap_err();
        assert!(
            e.to_string().contains("inbox's: orders, orders_processed"),
            "{e}"
        );
        assert!(OutboxTables::new("shop", "order", "_inbox_2").is_ok());
    }

    #[test]
    fn every_placeholder_is_filled() {
        let tables = OutboxTables::new("shop", "orders_outbox", "orders_inbox").unwrap();
        for (_, _, template) in MIGRATIONS {
            let sql = tables.render(template);
            let unfilled = sql
                .match_indices('{')
                .any(|(at, _)| sql[at + 1..].starts_with(|c: char| c.is_ascii_lowercase()));
            assert!(!unfilled, "unfilled placeholder in:\n{sql}");
            assert!(sql.contains("\"shop\".\"orders_outbox\""));
        }
        let all: String = MIGRATIONS
            .iter()
            .map(|(_, _, t)| tables.render(t))
            .collect();
        // Every name the migrations create comes from a placeholder (and
        // so is one the clash check knows), none is written in by hand.
        let known: Vec<String> = derived_names("orders_outbox", &OUTBOX_RELATIONS, &[])
            .into_iter()
            .chain(derived_names("orders_inbox", &INBOX_RELATIONS, &[]))
            .chain(["shop".to_owned()])
            .collect();
        for quoted in all.split('"').skip(1).step_by(2) {
            assert!(
                known.iter().any(|name| name == quoted),
                "\"{quoted}\" is not named by a placeholder"
            );
        }
        assert!(all.contains("\"orders_outbox_leases\""));
        assert!(all.contains("\"shop\".\"orders_outbox_archive\""));
    }
}
