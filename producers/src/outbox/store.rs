//! What the relay needs from the database holding the outbox — claiming
//! rows, marking them, parking refused ones, purging, backlog figures and
//! the relay's leases — so one relay loop serves PostgreSQL
//! ([`super::postgres`]) and SQLite ([`super::sqlite`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_core::wire::HeaderValues;
use keel_core::{Envelope, EventId, Key, TraceContext};
use tokio::sync::Notify;
use uuid::Uuid;

use super::error::Result;

/// The relay's view of an outbox database.
#[async_trait]
pub(crate) trait RelayStore: Send + Sync {
    /// A name for logs (`keel.outbox`).
    fn label(&self) -> String;
    /// One-time set-up before the first heartbeat.
    async fn prepare(&mut self) -> Result<()>;
    /// Renews (and rebalances) this relay's leases.
    async fn heartbeat(&mut self) -> Result<()>;
    /// Forgets leases that could not be renewed in time.
    fn lapse_if_expired(&mut self);
    /// Slots this relay may publish now.
    fn publishable(&self) -> Vec<u32>;
    /// How long the leases stay trusted.
    fn remaining(&self) -> Duration;
    /// Unpublished, unparked rows of `slots` in id order, leaving out the
    /// topics in `skip` (backing off): at most `limit.rows` rows, and no
    /// more than fit in `limit.bytes` of payload and headers (at least one).
    /// Rows in `exclude` (published, their mark running alongside) are
    /// left out too.
    async fn claim(
        &self,
        slots: &[u32],
        limit: Limit,
        skip: &[String],
        exclude: &[i64],
    ) -> Result<ClaimedBatch>;
    /// Whether a batch's mark may run alongside the next claim (the
    /// database serves both at once).
    fn pipelines(&self) -> bool {
        false
    }
    /// Marks rows published (after the broker acknowledged them).
    async fn mark(&self, ids: &[i64]) -> Result<()>;
    /// Reclaims what marking left behind (dead index entries the next
    /// claim would walk) and refreshes the planner's statistics, where the
    /// database needs it.
    /// Runs on its own (the relay spawns it and goes on publishing).
    fn vacuum(&self, _analyze: bool) -> Option<futures::future::BoxFuture<'static, Result<()>>> {
        None
    }
    /// Counts a refusal against a row; `true` when that parked it.
    async fn refuse(&self, id: i64, reason: &str, max_attempts: u32) -> Result<bool>;
    /// Deletes up to `batch` published rows older than `retention`.
    async fn purge(&self, retention: Duration, batch: usize) -> Result<u64>;
    /// Backlog, parked rows and the oldest unpublished row's age.
    async fn backlog(&self) -> Result<Backlog>;
    /// Releases the leases (graceful stop).
    async fn leave(&mut self) -> Result<()>;
    /// Starts waking `wake` when rows are enqueued, where the database can
    /// tell (PostgreSQL's LISTEN/NOTIFY); `None` means polling only.
    fn listen(&self, _wake: Arc<Notify>) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}

/// Backlog figures.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Backlog {
    pub(crate) backlog: u64,
    pub(crate) parked: u64,
    pub(crate) oldest: Option<Duration>,
}

/// How much one claim takes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limit {
    pub(crate) rows: usize,
    pub(crate) bytes: usize,
}

/// The rows of one claim, and whether more were waiting (a limit cut it).
pub(crate) struct ClaimedBatch {
    pub(crate) rows: Vec<Claimed>,
    pub(crate) more: bool,
}

/// Collects a claim's rows as they arrive, up to its [`Limit`] (a row
/// weighs its payload and headers): rows past the byte limit are left
/// unread (the first row goes whatever its size).
pub(crate) struct Budget {
    limit: Limit,
    rows: Vec<Claimed>,
    bytes: usize,
    cut: bool,
}

impl Budget {
    pub(crate) fn new(limit: Limit) -> Self {
        Budget {
            limit,
            rows: Vec::new(),
            bytes: 0,
            cut: false,
        }
    }

    /// Whether `row` still fits, its size then counted; when it does not,
    /// the batch is closed (the claim stops reading there).
    pub(crate) fn admit(&mut self, row: &ClaimedRow) -> bool {
        let size = row.payload.len() + row.headers.len();
        if !self.rows.is_empty() && self.bytes.saturating_add(size) > self.limit.bytes {
            self.cut = true;
        }
        if !self.cut {
            self.bytes = self.bytes.saturating_add(size);
        }
        !self.cut
    }

    /// Adds an admitted row.
    pub(crate) fn push(&mut self, row: Claimed) {
        self.rows.push(row);
    }

    /// The batch; `more` when a limit stopped it.
    pub(crate) fn finish(self) -> ClaimedBatch {
        let more = self.cut || self.rows.len() >= self.limit.rows;
        ClaimedBatch {
            rows: self.rows,
            more,
        }
    }
}

/// One claimed row: its id, topic and the event rebuilt from it (or why
/// its columns do not make one).
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) topic: String,
    pub(crate) event: std::result::Result<Envelope, String>,
    /// The key of a row that does not make an event (empty otherwise: the
    /// event carries it), so its key's later rows still wait behind it.
    pub(crate) broken_key: Vec<u8>,
}

/// A claimed row's columns, as each database reads them.
pub(crate) struct ClaimedRow {
    pub(crate) id: i64,
    pub(crate) topic: String,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: String,
    pub(crate) key: Vec<u8>,
    /// `None` when the column holds no time an event can carry (edited by
    /// hand to `infinity`, or past chrono's range): the row is refused.
    pub(crate) occurred_at: Option<DateTime<Utc>>,
    pub(crate) source: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<String>,
    pub(crate) traceparent: Option<String>,
    pub(crate) tracestate: Option<String>,
    pub(crate) headers: String,
    pub(crate) payload: Vec<u8>,
}

impl Claimed {
    /// The row's key.
    pub(crate) fn key(&self) -> &[u8] {
        self.event
            .as_ref()
            .map_or(self.broken_key.as_slice(), |e| e.key().as_bytes())
    }

    /// The same row refused for `reason` before it is sent.
    pub(crate) fn broken(self, reason: String) -> Claimed {
        let broken_key = self.key().to_vec();
        Claimed {
            event: Err(reason),
            broken_key,
            ..self
        }
    }
}

impl ClaimedRow {
    /// Rebuilds the event. Headers that are not a JSON object of strings
    /// (or of lists of strings, for a header given more than once; a row
    /// edited by hand) make a refusal, not an error: the row is
    /// parked after its attempts and the relay goes on.
    pub(crate) fn into_claimed(self) -> Claimed {
        let id = self.id;
        let Some(occurred_at) = self.occurred_at else {
            return Claimed {
                id,
                topic: self.topic,
                event: Err(format!(
                    "outbox row {id}: occurred_at is not a time an event can carry \
                     (infinite, or out of range); fix the column and requeue the row"
                )),
                broken_key: self.key,
            };
        };
        let mut event = Envelope::new(self.event_type, Key::from_bytes(self.key), self.payload)
            .with_id(EventId::from_uuid(self.event_id))
            .with_occurred_at(occurred_at)
            .with_trace(TraceContext {
                traceparent: self.traceparent,
                tracestate: self.tracestate,
            });
        if let Some(source) = self.source {
            event = event.with_source(source);
        }
        if let Some(id) = self.correlation_id {
            event = event.with_correlation_id(id);
        }
        if let Some(id) = self.causation_id {
            event = event.with_causation_id(id);
        }
        let claimed = |event| Claimed {
            id,
            topic: self.topic,
            event: Ok(event),
            broken_key: Vec::new(),
        };
        if let Ok(map) = serde_json::from_str::<BTreeMap<String, String>>(&self.headers) {
            return claimed(
                map.into_iter()
                    .fold(event, |event, (name, value)| event.with_header(name, value)),
            );
        }
        // A header given more than once is stored as the list of its values.
        match serde_json::from_str::<BTreeMap<String, HeaderValues<String>>>(&self.headers) {
            Ok(map) if map.values().any(|v| *v == HeaderValues::Many(Vec::new())) => claimed(event)
                .broken(format!(
                    "outbox row {id}: a header's list of values is empty; give it a value \
                     or remove it, then requeue the row"
                )),
            Ok(map) => claimed(
                map.into_iter()
                    .fold(event, |event, (name, values)| match values {
                        HeaderValues::One(value) => event.with_header(name, value),
                        HeaderValues::Many(values) => {
                            values.into_iter().fold(event, |event, value| {
                                event.with_added_header(name.clone(), value)
                            })
                        }
                    }),
            ),
            Err(e) => claimed(event).broken(format!(
                "outbox row {id}: headers are not a JSON object of strings \
                 (or lists of strings, for a header given more than once): {e}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(headers: &str) -> ClaimedRow {
        ClaimedRow {
            id: 7,
            topic: "orders".into(),
            event_id: Uuid::now_v7(),
            event_type: "shop.orders.OrderPlaced".into(),
            key: b"k".to_vec(),
            occurred_at: Some(Utc::now()),
            source: None,
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            tracestate: None,
            headers: headers.into(),
            payload: Vec::new(),
        }
    }

    #[test]
    fn a_header_stored_as_a_list_comes_back_with_every_value() {
        let event = row(r#"{"tenant":"acme","x-hop":["gateway","orders"]}"#)
            .into_claimed()
            .event
            .unwrap();
        assert_eq!(
            event.all_headers().collect::<Vec<_>>(),
            [
                ("tenant", "acme"),
                ("x-hop", "gateway"),
                ("x-hop", "orders")
            ]
        );
        for (headers, expected) in [
            (r#"{"x-hop":[]}"#, "list of values is empty"),
            (r#"{"x-hop":[1]}"#, "not a JSON object of strings"),
            ("[]", "not a JSON object of strings"),
        ] {
            let refused = row(headers).into_claimed().event.unwrap_err();
            assert!(refused.contains(expected), "{headers}: {refused}");
            assert!(refused.contains("outbox row 7"), "{refused}");
        }
    }
}
