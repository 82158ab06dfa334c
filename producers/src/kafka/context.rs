//! A librdkafka client context that remembers the client's last error, so
//! a publish that times out can say why (authentication refused, TLS
//! handshake failed, broker unreachable) instead of only "timed out".

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Logs librdkafka's client-level errors and keeps the last one. Clones
/// share the memory: the client holds one, its owner another.
#[derive(Clone, Debug, Default)]
pub struct ErrorMemory {
    last: Arc<Mutex<Option<(Instant, String)>>>,
}

impl ErrorMemory {
    /// The last client-level error if it is at most `max_age` old, with
    /// how long ago it was reported: `"SASL authentication error: … (2 s
    /// ago)"`. (An older one is not what a timeout of `max_age` is about.)
    pub fn last(&self, max_age: Duration) -> Option<String> {
        let last = match self.last.lock() {
            Ok(last) => last.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        last.filter(|(at, _)| at.elapsed() <= max_age)
            .map(|(at, reason)| format!("{reason} ({} s ago)", at.elapsed().as_secs()))
    }
}

impl ClientContext for ErrorMemory {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
        // "All brokers are down" follows the error that took them down
        // (refused credentials, an untrusted certificate): keep that one.
        let consequence = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        let mut last = match self.last.lock() {
            Ok(last) => last,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !(consequence && last.is_some()) {
            *last = Some((Instant::now(), reason.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_error() {
        let memory = ErrorMemory::default();
        assert_eq!(memory.last(Duration::from_secs(60)), None);
        memory.error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(
            memory.last(Duration::from_secs(60)).as_deref(),
            Some("1/1 brokers are down (0 s ago)")
        );
        memory.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "first",
        );
        memory.error(
            KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL authentication error: bad password",
        );
        memory.error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(
            memory.last(Duration::from_secs(60)).as_deref(),
            Some("SASL authentication error: bad password (0 s ago)"),
            "the cause is kept over its consequence"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            memory.last(Duration::from_millis(10)),
            None,
            "too old to explain a timeout"
        );
    }
}
