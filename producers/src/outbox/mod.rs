//! The transactional outbox on PostgreSQL: a publish as durable as the
//! service's own database write, and an inbox that applies a redelivered
//! event's effect once.
//!
//! | module | what it holds |
//! |---|---|
//! | [`tables`] | [`OutboxTables`]: validated schema/table names and the migrations |
//! | [`enqueue`] | [`Outbox`]: enqueue events inside the caller's transaction |
//! | [`relay`] | [`OutboxRelay`]: publishes committed rows, in key order, at least once |
//! | [`leases`] | how several relays split the outbox (slots and leases) |
//! | [`inbox`] | [`Inbox`]: `(group, event id)` records for exactly-once effects |
//! | [`parked`] | rows the broker refused `max_attempts` times: list them, requeue them |
//! | [`sqlite`] | the same on SQLite for the embedded default: [`SqliteOutbox`](sqlite::SqliteOutbox), [`OutboxRelay::sqlite`], [`SqliteInbox`](sqlite::SqliteInbox) |
//! | [`error`] | [`OutboxError`] |

pub mod enqueue;
pub mod error;
pub mod inbox;
pub mod leases;
pub mod parked;
mod postgres;
pub mod relay;
pub mod sqlite;
mod store;
pub mod tables;

pub use enqueue::Outbox;
pub use error::OutboxError;
pub use inbox::Inbox;
pub use relay::{OutboxRelay, RelayConfig, RelayStats};
pub use tables::OutboxTables;
