//! The registry's storage: PostgreSQL or SQLite through sqlx's `Any`
//! driver, one set of queries for both (`$N` placeholders work on each).
//!
//! Ids come from the database, so they are stable across restarts; one
//! schema (same type, text and references) has one id, enforced by a
//! unique index, so concurrent registrations of it agree on the id.
//! Versions are allocated in a transaction and retried when two writers
//! race for the same number.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

/// Errors of the store; the API maps them to Confluent's 50001.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database URL is not `postgres://…` or `sqlite://…`.
    #[error("database URL `{0}` is not postgres://… or sqlite://…")]
    UnsupportedUrl(String),
    /// A `sqlite:` URL the registry cannot keep schemas in.
    #[error("database URL `{url}`: {reason}")]
    BadSqliteUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it and what to give instead.
        reason: &'static str,
    },
    /// The database refused or failed a statement.
    #[error("registry database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error("cannot apply the registry's migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Stored data is not what this version of Keel wrote.
    #[error("corrupt registry data: {0}")]
    Corrupt(String),
    /// A new schema would take an id past the largest one allowed.
    #[error("no schema id left: the next id would be {next}")]
    IdsExhausted {
        /// The id it would have taken.
        next: i64,
    },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A reference from one schema to a named type registered elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaReference {
    /// The referenced type's full name.
    pub name: String,
    /// The subject it is registered under.
    pub subject: String,
    /// Its version there.
    pub version: i64,
}

/// A stored schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSchema {
    /// Global id.
    pub id: i64,
    /// `AVRO`.
    pub schema_type: String,
    /// The schema text as stored.
    pub text: String,
    /// Its references.
    pub references: Vec<SchemaReference>,
    /// The resolved normal form.
    pub normal_form: String,
}

/// One version of a subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectVersion {
    /// The subject.
    pub subject: String,
    /// The version number (from 1).
    pub version: i64,
    /// Whether it is soft-deleted.
    pub deleted: bool,
    /// The schema.
    pub schema: StoredSchema,
}

/// A schema to store.
#[derive(Clone, Debug)]
pub struct NewSchema {
    /// `AVRO`.
    pub schema_type: String,
    /// The text to store.
    pub text: String,
    /// References.
    pub references: Vec<SchemaReference>,
    /// The resolved normal form.
    pub normal_form: String,
}

/// The registry's tables.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    /// PostgreSQL (a sequence to move past imported ids) or SQLite
    /// (`AUTOINCREMENT` moves past them by itself).
    postgres: bool,
}

/// Why an import (a registration with an explicit id) was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImportRefusal {
    /// The id already holds a different schema.
    IdTaken(i64),
    /// The schema is already stored under this other id.
    OtherId(i64),
    /// The subject's version was soft-deleted (it may be deleted for good,
    /// then imported).
    VersionDeleted(i64),
    /// The subject's version already holds another schema (the id given).
    VersionTaken {
        /// The version asked for.
        version: i64,
        /// The schema id it holds.
        holds: i64,
    },
}

const SCHEMA_COLUMNS: &str = "s.id, s.schema_type, s.schema_text, s.references_json, s.normal_form";

/// How often a version allocation is retried when writers race.
const VERSION_RETRIES: usize = 20;

fn sha256(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.len().to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    /// Connects and applies the migrations. A `sqlite://path` file is
    /// created when missing.
    pub async fn connect(url: &str) -> Result<Store> {
        install_default_drivers();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // One direct connection first: its error says why (refused, no
            // such database, authentication), where the pool retries a
            // refused connection until its timeout and then says only that.
            {
                use sqlx::Connection;
                sqlx::AnyConnection::connect(url).await?.close().await.ok();
            }
            let pool = AnyPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Ok(Store {
                pool,
                postgres: true,
            })
        } else if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let bad = |reason| StoreError::BadSqliteUrl {
                url: url.to_owned(),
                reason,
            };
            if path.contains('?') {
                return Err(bad(
                    "options after `?` are not taken (the registry opens its file read-write, \
                     creating it): give the file alone, e.g. sqlite://keel-registry.db",
                ));
            }
            if path.is_empty() || path == ":memory:" {
                return Err(bad(
                    "names no file, so schemas would live in memory and be lost when the \
                     registry stops: give a file, e.g. sqlite://keel-registry.db",
                ));
            }
            if let Some(dir) = Path::new(path).parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
            }
            // One connection: SQLite has one writer anyway, and a single
            // connection makes version allocation race-free.
            let pool = AnyPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(30))
                .connect(&format!("sqlite://{path}?mode=rwc"))
                .await?;
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
            Ok(Store {
                pool,
                postgres: false,
            })
        } else {
            Err(StoreError::UnsupportedUrl(url.to_owned()))
        }
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn schema_from_row(row: &sqlx::any::AnyRow, offset: usize) -> Result<StoredSchema> {
        let references_json: String = row.try_get(offset + 3)?;
        let references = serde_json::from_str(&references_json)
            .map_err(|e| StoreError::Corrupt(format!("references of schema: {e}")))?;
        Ok(StoredSchema {
            id: row.try_get(offset)?,
            schema_type: row.try_get(offset + 1)?,
            text: row.try_get(offset + 2)?,
            references,
            normal_form: row.try_get(offset + 4)?,
        })
    }

    fn version_from_row(row: &sqlx::any::AnyRow) -> Result<SubjectVersion> {
        Ok(SubjectVersion {
            subject: row.try_get(0)?,
            version: row.try_get(1)?,
            deleted: row.try_get::<i64, _>(2)? != 0,
            schema: Self::schema_from_row(row, 3)?,
        })
    }

    /// The schema with `id`, while some subject version (live or
    /// soft-deleted) holds it: once the last is deleted permanently, the
    /// id is no longer served.
    pub async fn schema(&self, id: i64) -> Result<Option<StoredSchema>> {
        let row = sqlx::query(&format!(
            "SELECT {SCHEMA_COLUMNS} FROM registry_schemas s WHERE s.id = $1 \
             AND EXISTS (SELECT 1 FROM registry_subject_versions v WHERE v.schema_id = s.id)"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Self::schema_from_row(&r, 0)).transpose()
    }

    /// Subjects, sorted; soft-deleted ones only when `deleted`.
    pub async fn subjects(&self, deleted: bool, prefix: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT DISTINCT subject FROM registry_subject_versions \
             WHERE (deleted = 0 OR $1 = 1) AND substr(subject, 1, length($2)) = $2 ORDER BY subject",
        )
        .bind(i64::from(deleted))
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(Into::into))
            .collect()
    }

    /// Every version of `subject` (oldest first), soft-deleted ones only
    /// when `deleted`.
    pub async fn versions(&self, subject: &str, deleted: bool) -> Result<Vec<SubjectVersion>> {
        let rows = sqlx::query(&format!(
            "SELECT v.subject, v.version, v.deleted, {SCHEMA_COLUMNS} \
             FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id \
             WHERE v.subject = $1 AND (v.deleted = 0 OR $2 = 1) ORDER BY v.version"
        ))
        .bind(subject)
        .bind(i64::from(deleted))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::version_from_row).collect()
    }

    /// Registers `schema` (or finds it) and returns its global id; a new
    /// schema whose id would pass `max_id` is refused and nothing is kept.
    pub async fn upsert_schema(&self, schema: &NewSchema, max_id: i64) -> Result<i64> {
        let references_json = serde_json::to_string(&schema.references)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let identity = sha256(&[&schema.schema_type, &schema.text, &references_json]);
        let normal_hash = sha256(&[&schema.normal_form]);
        let mut attempts = 0;
        let (mut tx, id) = loop {
            let mut tx = self.pool.begin().await?;
            // Any conflict: the same schema (then its id is found below),
            // or an id an import took that the sequence handed out again
            // (then nothing is found and the next id is drawn).
            sqlx::query(
                "INSERT INTO registry_schemas (schema_type, schema_text, references_json, identity, normal_form, normal_hash) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(&schema.schema_type)
            .bind(&schema.text)
            .bind(&references_json)
            .bind(&identity)
            .bind(&schema.normal_form)
            .bind(&normal_hash)
            .execute(&mut *tx)
            .await?;
            let found = sqlx::query("SELECT id FROM registry_schemas WHERE identity = $1")
                .bind(&identity)
                .fetch_optional(&mut *tx)
                .await?;
            match found {
                Some(row) => {
                    let id = row.try_get::<i64, _>(0)?;
                    // Nothing stored past the limit (the schema was new:
                    // a stored one has its id within it).
                    if id > max_id {
                        tx.rollback().await?;
                        return Err(StoreError::IdsExhausted { next: id });
                    }
                    break (tx, id);
                }
                None if attempts < VERSION_RETRIES => {
                    attempts += 1;
                    tx.rollback().await?;
                }
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "could not allocate a schema id after {VERSION_RETRIES} attempts: \
                         every id drawn was taken (imported ids above the id sequence?)"
                    )));
                }
            }
        };
        insert_references(&mut tx, id, &schema.references).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Adds `schema_id` as the next version of `subject` and returns it,
    /// unless `schema_id` already is a live version there (then that
    /// version). `check` sees the live versions (oldest first) right before
    /// the insert and may refuse it.
    pub async fn add_version<E>(
        &self,
        subject: &str,
        schema_id: i64,
        check: impl Fn(&[SubjectVersion]) -> Result<(), E>,
    ) -> Result<Result<i64, E>> {
        for _ in 0..VERSION_RETRIES {
            let live = self.versions(subject, false).await?;
            if let Some(existing) = live.iter().find(|v| v.schema.id == schema_id) {
                return Ok(Ok(existing.version));
            }
            if let Err(refused) = check(&live) {
                return Ok(Err(refused));
            }
            let mut tx = self.pool.begin().await?;
            let next: i64 = sqlx::query(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM registry_subject_versions WHERE subject = $1",
            )
            .bind(subject)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            // The live set may have changed since it was checked: only
            // insert if the latest live version is still the one checked.
            let latest_now: Option<i64> = sqlx::query(
                "SELECT MAX(version) FROM registry_subject_versions WHERE subject = $1 AND deleted = 0",
            )
            .bind(subject)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            if latest_now != live.last().map(|v| v.version) {
                tx.rollback().await?;
                continue;
            }
            if insert_version(tx, subject, next, schema_id).await? {
                return Ok(Ok(next));
            }
        }
        Err(StoreError::Corrupt(format!(
            "could not allocate a version of `{subject}` after {VERSION_RETRIES} attempts"
        )))
    }

    /// Imports `schema` under the given global `id` as `version` of
    /// `subject` (the next version when `None`), as a registry in IMPORT
    /// mode does when another registry's schemas are copied in with their
    /// ids. Idempotent: importing the same schema, id and version again
    /// answers the version it has. Nothing is overwritten: an id holding
    /// another schema, a schema stored under another id, or a version
    /// holding another schema is refused. Returns the version.
    pub async fn import_version(
        &self,
        subject: &str,
        id: i64,
        version: Option<i64>,
        schema: &NewSchema,
    ) -> Result<Result<i64, ImportRefusal>> {
        let references_json = serde_json::to_string(&schema.references)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let identity = sha256(&[&schema.schema_type, &schema.text, &references_json]);
        let normal_hash = sha256(&[&schema.normal_form]);
        for _ in 0..VERSION_RETRIES {
            let mut tx = self.pool.begin().await?;
            let by_id: Option<String> =
                sqlx::query("SELECT identity FROM registry_schemas WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?;
            let by_identity: Option<i64> =
                sqlx::query("SELECT id FROM registry_schemas WHERE identity = $1")
                    .bind(&identity)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?;
            match (by_id, by_identity) {
                (Some(held), _) if held != identity => {
                    return Ok(Err(ImportRefusal::IdTaken(id)));
                }
                (_, Some(other)) if other != id => return Ok(Err(ImportRefusal::OtherId(other))),
                (Some(_), _) => {}
                (None, _) => {
                    let inserted = sqlx::query(
                        "INSERT INTO registry_schemas (id, schema_type, schema_text, references_json, identity, normal_form, normal_hash) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(id)
                    .bind(&schema.schema_type)
                    .bind(&schema.text)
                    .bind(&references_json)
                    .bind(&identity)
                    .bind(&schema.normal_form)
                    .bind(&normal_hash)
                    .execute(&mut *tx)
                    .await;
                    match inserted {
                        Ok(_) => {}
                        // Another import raced us to the id or the schema:
                        // look again.
                        Err(e) if is_unique_violation(&e) => {
                            tx.rollback().await?;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    insert_references(&mut tx, id, &schema.references).await?;
                    if self.postgres {
                        // Ids assigned later continue above every imported
                        // one. Sequences ignore transactions, so only ever
                        // move it forward (`last_value` counts ids drawn by
                        // uncommitted registrations too); an id drawn by a
                        // registration racing this is retried there.
                        sqlx::query(
                            "SELECT setval('registry_schemas_id_seq', $1) \
                             FROM registry_schemas_id_seq WHERE last_value < $1",
                        )
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
            let rows = sqlx::query(
                "SELECT version, schema_id, deleted FROM registry_subject_versions WHERE subject = $1 ORDER BY version",
            )
            .bind(subject)
            .fetch_all(&mut *tx)
            .await?;
            let mut held = Vec::with_capacity(rows.len());
            for row in &rows {
                let (v, schema_id, deleted): (i64, i64, i64) =
                    (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                held.push((v, schema_id, deleted != 0));
            }
            let wanted = match version {
                Some(v) => match held.iter().find(|(held_v, _, _)| *held_v == v) {
                    Some((_, holds, false)) if *holds == id => {
                        tx.commit().await?;
                        return Ok(Ok(v));
                    }
                    Some((_, _, true)) => return Ok(Err(ImportRefusal::VersionDeleted(v))),
                    Some((_, holds, false)) => {
                        return Ok(Err(ImportRefusal::VersionTaken {
                            version: v,
                            holds: *holds,
                        }));
                    }
                    None => v,
                },
                None => {
                    if let Some((v, _, _)) =
                        held.iter().find(|(_, s, deleted)| *s == id && !deleted)
                    {
                        let v = *v;
                        tx.commit().await?;
                        return Ok(Ok(v));
                    }
                    held.last().map_or(1, |(v, _, _)| v.saturating_add(1))
                }
            };
            if insert_version(tx, subject, wanted, id).await? {
                return Ok(Ok(wanted));
            }
        }
        Err(StoreError::Corrupt(format!(
            "could not import schema id {id} into `{subject}` after {VERSION_RETRIES} attempts"
        )))
    }

    /// Soft- or hard-deletes versions of `subject`.
    pub async fn delete_versions(
        &self,
        subject: &str,
        versions: &[i64],
        permanent: bool,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for v in versions {
            let sql = if permanent {
                "DELETE FROM registry_subject_versions WHERE subject = $1 AND version = $2"
            } else {
                "UPDATE registry_subject_versions SET deleted = 1 WHERE subject = $1 AND version = $2"
            };
            sqlx::query(sql)
                .bind(subject)
                .bind(*v)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Ids of schemas that reference `subject` version `version`.
    pub async fn referenced_by(&self, subject: &str, version: i64) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT DISTINCT r.schema_id FROM registry_references r \
             JOIN registry_subject_versions v ON v.schema_id = r.schema_id \
             WHERE r.subject = $1 AND r.version = $2 ORDER BY r.schema_id",
        )
        .bind(subject)
        .bind(version)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(Into::into))
            .collect()
    }

    /// `(subject, version)` pairs where schema `id` is registered (live).
    pub async fn usages(&self, id: i64, deleted: bool) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT subject, version FROM registry_subject_versions \
             WHERE schema_id = $1 AND (deleted = 0 OR $2 = 1) ORDER BY subject, version",
        )
        .bind(id)
        .bind(i64::from(deleted))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// A setting (`registry_config` or `registry_mode`) of `subject` ("" = global).
    pub async fn setting(&self, table: Setting, subject: &str) -> Result<Option<String>> {
        let row = sqlx::query(&format!(
            "SELECT {} FROM {} WHERE subject = $1",
            table.column(),
            table.table()
        ))
        .bind(subject)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.try_get(0).map_err(Into::into)).transpose()
    }

    /// Sets a setting of `subject` ("" = global).
    pub async fn set_setting(&self, table: Setting, subject: &str, value: &str) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO {t} (subject, {c}) VALUES ($1, $2) ON CONFLICT (subject) DO UPDATE SET {c} = $2",
            t = table.table(),
            c = table.column()
        ))
        .bind(subject)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a subject's setting; returns what it was.
    pub async fn delete_setting(&self, table: Setting, subject: &str) -> Result<Option<String>> {
        let old = self.setting(table, subject).await?;
        sqlx::query(&format!("DELETE FROM {} WHERE subject = $1", table.table()))
            .bind(subject)
            .execute(&self.pool)
            .await?;
        Ok(old)
    }
}

/// The two per-subject settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Compatibility level.
    Compatibility,
    /// Mode (READWRITE, READONLY, IMPORT).
    Mode,
}

impl Setting {
    fn table(self) -> &'static str {
        match self {
            Setting::Compatibility => "registry_config",
            Setting::Mode => "registry_mode",
        }
    }

    fn column(self) -> &'static str {
        match self {
            Setting::Compatibility => "compatibility",
            Setting::Mode => "mode",
        }
    }
}

/// Records which (subject, version) schema `id` references.
async fn insert_references(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: i64,
    references: &[SchemaReference],
) -> Result<()> {
    for r in references {
        sqlx::query(
            "INSERT INTO registry_references (schema_id, name, subject, version) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (schema_id, name) DO NOTHING",
        )
        .bind(id)
        .bind(&r.name)
        .bind(&r.subject)
        .bind(r.version)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Inserts `version` of `subject` and commits; `false` (rolled back) when a
/// concurrent writer took that version first.
async fn insert_version(
    mut tx: sqlx::Transaction<'_, sqlx::Any>,
    subject: &str,
    version: i64,
    schema_id: i64,
) -> Result<bool> {
    // Versions are Confluent's positive 32-bit numbers (clients read them
    // as such): past the last one (an import at 2147483647, a row edited
    // by hand) there is no next.
    if !(1..=i64::from(i32::MAX)).contains(&version) {
        tx.rollback().await?;
        return Err(StoreError::Corrupt(format!(
            "`{subject}` has no version number left: the next would be {version}, and versions are positive 32-bit numbers; register under a new subject"
        )));
    }
    let inserted = sqlx::query(
        "INSERT INTO registry_subject_versions (subject, version, schema_id, deleted) VALUES ($1, $2, $3, 0)",
    )
    .bind(subject)
    .bind(version)
    .bind(schema_id)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {
            tx.commit().await?;
            Ok(true)
        }
        Err(e) if is_unique_violation(&e) => {
            tx.rollback().await?;
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.is_unique_violation() || db.message().contains("UNIQUE constraint failed")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_database_connection_says_so() {
        let e = Store::connect("postgres://postgres@127.0.0.1:1/x")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.to_lowercase().contains("refused"), "{e}");
    }

    #[tokio::test]
    async fn a_sqlite_url_without_a_file_or_with_options_is_refused() {
        for url in [
            "sqlite://",
            "sqlite:",
            "sqlite://:memory:",
            "sqlite://r.db?mode=ro",
        ] {
            let e = Store::connect(url).await.err().unwrap().to_string();
            assert!(
                e.contains(url) && e.contains("sqlite://keel-registry.db"),
                "{url}: {e}"
            );
        }
    }
}
