//! [`OutboxError`]: what the outbox, the relay and the inbox report.

use keel_core::EventId;
use sqlx::sqlite::SqliteError;

/// Errors of the outbox, the relay and the inbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// A setting is invalid; the message names it.
    #[error("invalid setting `{setting}`: {reason}")]
    Config {
        /// The setting, as named in `keel.toml`.
        setting: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database refused or failed a statement, or could not be reached.
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The outbox's migrations could not be applied.
    #[error("cannot apply the outbox migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The event id is already in the outbox, waiting to be published
    /// (event ids are unique there; once published, a row moves to the
    /// archive or is deleted, and consumers' inboxes de-duplicate by id).
    #[error("event {0} is already in the outbox: give each event its own id")]
    DuplicateEvent(EventId),
    /// The event could not be encoded (unknown schema, codec error).
    #[error("cannot encode the event for the outbox: {0}")]
    Encode(#[from] keel_schemas::SchemaError),
    /// The event is not fit for the outbox (a header the wire refuses).
    #[error(transparent)]
    Event(#[from] keel_core::Error),
    /// A batch of discarded parked rows could not be recorded (written
    /// out) by the caller, so it was not discarded: the rows stay parked.
    #[error(
        "cannot record the {rows} parked row(s) being discarded ({source}): they were put back and stay parked"
    )]
    NotRecorded {
        /// The rows of the batch, all still parked.
        rows: usize,
        /// Why recording them failed.
        source: std::io::Error,
    },
}

impl OutboxError {
    pub(crate) fn config(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        OutboxError::Config {
            setting: setting.into(),
            reason: reason.into(),
        }
    }

    /// Whether trying again later may succeed (a lost connection, a
    /// database restarting), as opposed to bad input or configuration.
    pub fn is_retriable(&self) -> bool {
        match self {
            OutboxError::Database(e) => is_transient(e),
            OutboxError::Event(e) => e.is_retriable(),
            _ => false,
        }
    }
}

/// Connection loss, pool exhaustion, a database shutting down, a
/// serialization failure, or a statement that ran out of time or did not
/// get its lock in time: worth retrying.
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        // SQLite: the database busy or a table locked by another
        // connection (a deferred transaction that read before another
        // committed cannot write: it must start again).
        sqlx::Error::Database(db) if db.try_downcast_ref::<SqliteError>().is_some() => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(is_transient_sqlite_code),
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_code(&code)),
        _ => false,
    }
}

/// SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes
/// (`SQLITE_BUSY_SNAPSHOT`, 517, …: the primary code is the low byte).
fn is_transient_sqlite_code(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6)
}

/// 08: connection exception; 40: transaction rollback (serialization,
/// deadlock); 57P: operator intervention (shutdown, restart); 57014: the
/// statement was cancelled (`statement_timeout`, or an operator's
/// `pg_cancel_backend`); 55P03: a lock not granted within `lock_timeout`
/// (the relay's start-up locks the lease table, a migration may hold it);
/// 53: insufficient resources.
fn is_transient_code(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("40")
        || code.starts_with("57P")
        || code.starts_with("53")
        || code == "57014"
        || code == "55P03"
}

/// Result of outbox operations.
pub type Result<T, E = OutboxError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::{is_transient_code, is_transient_sqlite_code};

    #[test]
    fn a_busy_or_locked_sqlite_database_is_transient() {
        for code in [5, 6, 261, 517, 773, 262] {
            assert!(is_transient_sqlite_code(code), "{code}");
        }
        for code in [19, 2067, 1, 11] {
            assert!(!is_transient_sqlite_code(code), "{code}");
        }
    }

    #[test]
    fn timeouts_and_lost_connections_are_transient_constraint_errors_are_not() {
        for code in [
            "08006", "40001", "40P01", "57P01", "53300", "57014", "55P03",
        ] {
            assert!(is_transient_code(code), "{code}");
        }
        for code in ["23505", "42P01", "42501", "22P02", "55000"] {
            assert!(!is_transient_code(code), "{code}");
        }
    }
}
