//! The one error type of `keel-core`, shared by every transport.
//!
//! Every variant reads as what could not be done ("cannot publish event … to
//! topic `orders`: …") and answers [`Error::is_retriable`]: a retriable error
//! may succeed if the same operation is tried again later (a broker is
//! restarting, a timeout), a fatal one will not (bad configuration, a
//! malformed event, a closed subscription).

use std::time::Duration;

/// A boxed error from a client library or a handler.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with Keel's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a Keel operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing, malformed or contradicts another one.
    #[error("invalid setting `{setting}`: {reason}")]
    Config {
        /// The setting's name as the user writes it (`consumer.max_in_flight`).
        setting: String,
        /// Why the value was refused and what is accepted.
        reason: String,
    },

    /// An event could not be published (or its acknowledgement never came).
    #[error("cannot publish event {event_id} to topic `{topic}`: {reason}")]
    Publish {
        /// Destination topic.
        topic: String,
        /// The event's id (or `batch` for a whole batch).
        event_id: String,
        /// What failed.
        reason: String,
        /// Whether trying again may succeed.
        retriable: bool,
        /// The client library's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// A subscription could not be created or broke while running.
    #[error("cannot consume topic `{topic}` in group `{group}`: {reason}")]
    Subscribe {
        /// The subscribed topic.
        topic: String,
        /// The consumer group.
        group: String,
        /// What failed.
        reason: String,
        /// Whether trying again may succeed.
        retriable: bool,
        /// The client library's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// A topic could not be created or described, or is missing or not
    /// ours to use (a publish's error when no event is at fault).
    #[error("topic `{topic}`: {reason}")]
    Topic {
        /// The topic concerned.
        topic: String,
        /// What failed.
        reason: String,
        /// Whether trying again may succeed.
        retriable: bool,
        /// The client library's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// Bytes from outside (headers, payload framing) are not a valid Keel
    /// event. Never retriable: the same bytes fail the same way again.
    #[error("malformed event: {reason}")]
    MalformedEvent {
        /// What is wrong with the input, naming the field.
        reason: String,
    },

    /// A stored record is not a Keel event. It still holds its place in the
    /// partition: settle it (dead-letter, then ack) so the partition moves on.
    #[error("{0}")]
    Undecodable(Box<crate::delivery::Undecodable>),

    /// An operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        operation: String,
        /// The limit that was exceeded.
        after: Duration,
    },

    /// The transport, publisher or subscription has been shut down.
    #[error("{what} is closed")]
    Closed {
        /// What is closed.
        what: String,
    },

    /// The broker cannot be reached, or refused the connection.
    #[error("cannot connect to {broker}: {reason}")]
    Connect {
        /// The broker, with any password redacted.
        broker: String,
        /// What went wrong.
        reason: String,
    },

    /// An event handler failed.
    #[error("handler failed: {source}")]
    Handler {
        /// Whether handling the same event again may succeed.
        retriable: bool,
        /// The handler's own error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Whether trying the same operation again may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Publish { retriable, .. }
            | Error::Subscribe { retriable, .. }
            | Error::Topic { retriable, .. }
            | Error::Handler { retriable, .. } => *retriable,
            Error::Timeout { .. } | Error::Connect { .. } => true,
            Error::Config { .. }
            | Error::MalformedEvent { .. }
            | Error::Closed { .. }
            | Error::Undecodable(_) => false,
        }
    }

    /// An invalid setting, named as the user writes it.
    pub fn config(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            setting: setting.into(),
            reason: reason.into(),
        }
    }

    /// A malformed event from outside.
    pub fn malformed(reason: impl Into<String>) -> Self {
        Error::MalformedEvent {
            reason: reason.into(),
        }
    }

    /// A handler failure that may succeed when the event is handled again.
    pub fn retriable(source: impl Into<BoxError>) -> Self {
        Error::Handler {
            retriable: true,
            source: source.into(),
        }
    }

    /// A handler failure that will fail the same way every time (the event
    /// should go to dead letters, not be retried).
    pub fn fatal(source: impl Into<BoxError>) -> Self {
        Error::Handler {
            retriable: false,
            source: source.into(),
        }
    }

    /// Something has been shut down.
    pub fn closed(what: impl Into<String>) -> Self {
        Error::Closed { what: what.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_could_not_be_done() {
        let e = Error::Publish {
            topic: "orders".into(),
            event_id: "0190".into(),
            reason: "broker unreachable".into(),
            retriable: true,
            source: None,
        };
        assert_eq!(
            e.to_string(),
            "cannot publish event 0190 to topic `orders`: broker unreachable"
        );
        assert!(e.is_retriable());
        let e = Error::config("partitions", "must be at least 1, got 0");
        assert_eq!(
            e.to_string(),
            "invalid setting `partitions`: must be at least 1, got 0"
        );
        assert!(!e.is_retriable());
    }

    #[test]
    fn handler_errors_carry_their_retry_class() {
        assert!(Error::retriable("database busy").is_retriable());
        assert!(!Error::fatal("no such customer").is_retriable());
        assert!(
            Error::Timeout {
                operation: "publish".into(),
                after: Duration::from_secs(1)
            }
            .is_retriable()
        );
    }
}
