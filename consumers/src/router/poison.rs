//! Poison detection: records that can never be handled go straight to dead
//! letters, without spending the retry budget — records that are not Keel
//! events, payloads that are not Confluent-framed Avro, unknown schema ids,
//! Avro that does not decode into the handler's type, payloads over the
//! router's size limit (never decoded). A registry that is
//! down or refusing us is not the record's fault: that is retried.

use keel_core::Error;
use keel_schemas::SchemaError;

use super::context::Incoming;
use super::layer::{DeadLetterReason, Verdict};

/// The verdict for a record that is not a Keel event.
pub(crate) fn undecodable(incoming: &Incoming) -> Verdict {
    let reason = match incoming {
        Incoming::Undecodable { reason, .. } => reason.clone(),
        Incoming::Event(_) => "not an undecodable record".to_owned(),
    };
    Verdict::DeadLetter {
        error: Error::malformed(reason),
        reason: DeadLetterReason::Poison,
    }
}

/// The verdict for a payload of `size` bytes, over the router's `limit`.
pub(crate) fn oversize(size: usize, limit: usize) -> Verdict {
    Verdict::DeadLetter {
        error: Error::malformed(format!(
            "the payload is {size} bytes, over the router's limit of {limit} \
             (RouterOptions::max_payload_bytes); raise it to handle such events, \
             then redrive this one"
        )),
        reason: DeadLetterReason::Poison,
    }
}

/// The verdict for a payload the codec could not decode.
pub(crate) fn decode_failure(e: SchemaError) -> Verdict {
    match e {
        SchemaError::Framing(_)
        | SchemaError::UnknownSchemaId(_)
        | SchemaError::Decode { .. }
        | SchemaError::InvalidSchema(_) => Verdict::DeadLetter {
            error: e.into(),
            reason: DeadLetterReason::Poison,
        },
        // The registry is down, overloaded, or refuses our credentials:
        // nothing wrong with the record, try again later.
        e => Verdict::Backoff {
            error: Error::retriable(e),
            delay: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use keel_core::RawRecord;

    use super::*;

    #[test]
    fn bytes_that_never_decode_are_poison_and_an_absent_registry_is_not() {
        for e in [
            SchemaError::Framing("magic byte 0x7b".into()),
            SchemaError::UnknownSchemaId(99),
            SchemaError::Decode {
                schema_id: 1,
                rust_type: "T",
                reason: "truncated".into(),
            },
        ] {
            let text = e.to_string();
            match decode_failure(e) {
                Verdict::DeadLetter { error, reason } => {
                    assert_eq!(reason, DeadLetterReason::Poison);
                    assert!(error.to_string().contains(&text), "{error}");
                    assert!(!error.is_retriable());
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        for e in [
            SchemaError::Unreachable {
                url: "http://registry".into(),
                cause: "connection refused".into(),
            },
            SchemaError::Registry {
                status: 401,
                code: 40101,
                message: "unauthorized".into(),
            },
        ] {
            assert!(
                matches!(decode_failure(e), Verdict::Backoff { delay: None, .. }),
                "backs off without spending the budget"
            );
        }
        let record = Incoming::Undecodable {
            record: RawRecord::default(),
            reason: "record has no key".into(),
        };
        match undecodable(&record) {
            Verdict::DeadLetter { error, reason } => {
                assert_eq!(reason, DeadLetterReason::Poison);
                assert!(error.to_string().contains("record has no key"));
            }
            other => panic!("{other:?}"),
        }
    }
}
