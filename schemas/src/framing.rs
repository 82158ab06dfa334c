//! The Confluent wire format, shared by Kafka and NATS payloads so that any
//! Confluent-aware tool decodes Keel events: one magic byte `0x00`, the
//! schema id as a 4-byte big-endian integer, then the Avro binary body.

use crate::error::{Result, SchemaError};

/// The magic byte that opens every framed payload.
pub const MAGIC: u8 = 0;

/// Length of the frame header (magic byte + schema id).
pub const HEADER_LEN: usize = 5;

/// Frames an Avro body written with schema `schema_id`.
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Splits a framed payload into its schema id and Avro body.
///
/// Fails, saying what was found, on an empty or short payload and on a
/// wrong magic byte (e.g. JSON or raw Avro on a Keel topic).
pub fn unframe(payload: &[u8]) -> Result<(u32, &[u8])> {
    match payload {
        [MAGIC, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        [MAGIC, ..] => Err(SchemaError::Framing(format!(
            "payload is {} bytes, shorter than the {HEADER_LEN}-byte Confluent header",
            payload.len()
        ))),
        [other, ..] => Err(SchemaError::Framing(format!(
            "payload starts with byte 0x{other:02x}, not the Confluent magic byte 0x00"
        ))),
        [] => Err(SchemaError::Framing(
            "payload is empty; expected a Confluent-framed Avro body".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_big_endian_ids() {
        let framed = frame(0x0102_0304, b"avro");
        assert_eq!(framed, b"\x00\x01\x02\x03\x04avro");
        assert_eq!(unframe(&framed).unwrap(), (0x0102_0304, &b"avro"[..]));
        assert_eq!(unframe(&frame(7, b"")).unwrap(), (7, &b""[..]));
    }

    #[test]
    fn foreign_payloads_are_refused_with_what_was_found() {
        let cases: [(&[u8], &str); 3] = [
            (b"", "empty"),
            (b"\x00\x01", "2 bytes"),
            (b"{\"json\":1}", "0x7b"),
        ];
        for (payload, expected) in cases {
            let msg = unframe(payload).unwrap_err().to_string();
            assert!(msg.contains(expected), "{msg}");
        }
    }
}
