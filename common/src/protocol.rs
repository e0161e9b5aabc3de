//! The WebSocket hop of SPEC §2: what the filter answers for every record it receives, and how a
//! frame from the generator is split into records.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::record::{Record, RecordError};

/// Path of the filter's WebSocket endpoint.
pub const INGEST_PATH: &str = "/ingest";
/// Default largest frame (and message) either side accepts: 1 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// WebSocket close code sent when a frame exceeds the limit (RFC 6455 "message too big").
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

/// One server → client frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    /// These records are durably routed; the generator may forget them.
    Ack {
        /// The acked records' `seq`s.
        seqs: Vec<u64>,
    },
    /// Not routed now; send again after `retry_after_ms`. Nothing about them was stored.
    Nack {
        /// The refused records' `seq`s.
        seqs: Vec<u64>,
        /// Why, for logs.
        reason: String,
        /// How long the sender should wait before trying again.
        retry_after_ms: u64,
    },
    /// Invalid record; never send it again. `seq` is `None` when the frame held no record at all.
    Reject {
        /// The rejected record's `seq`, if one could be read.
        seq: Option<u64>,
        /// What is wrong with it.
        error: String,
    },
}

impl ServerMessage {
    /// The message as one text frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One element of a client frame after validation.
#[derive(Debug)]
pub enum Item {
    /// A valid record.
    Valid(Record),
    /// An invalid one: the `seq` if one could be read, the reason, and the element's raw JSON.
    Invalid {
        /// The element's `seq`, when it had a usable one.
        seq: Option<u64>,
        /// Why it is invalid.
        error: RecordError,
        /// The element as received, for the dead-letter store.
        raw: String,
    },
}

/// Splits a text frame into records: one object, or an array of them (a batch).
///
/// Err when the frame is not JSON or not an object/array: then no `seq` can be known.
pub fn parse_frame(text: &str) -> Result<Vec<Item>, RecordError> {
    let value: Value = serde_json::from_str(text).map_err(|err| RecordError::Invalid {
        field: "record",
        reason: format!("frame is not valid JSON: {err}"),
    })?;
    let elements = match value {
        Value::Array(items) => items,
        object @ Value::Object(_) => vec![object],
        other => return Err(RecordError::NotAnObject(crate::record::json_type(&other))),
    };
    Ok(elements
        .into_iter()
        .map(|element| match Record::from_value(&element) {
            Ok(record) => Item::Valid(record),
            Err(error) => Item::Invalid {
                seq: element.get("seq").and_then(Value::as_u64),
                error,
                raw: element.to_string(),
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_exact_wire_shape_of_the_spec() {
        let ack = ServerMessage::Ack { seqs: vec![1, 2] }.to_json();
        assert_eq!(ack, r#"{"type":"ack","seqs":[1,2]}"#);
        let nack = ServerMessage::Nack {
            seqs: vec![3],
            reason: "breaker open".into(),
            retry_after_ms: 500,
        }
        .to_json();
        assert_eq!(
            nack,
            r#"{"type":"nack","seqs":[3],"reason":"breaker open","retry_after_ms":500}"#
        );
        let reject = ServerMessage::Reject {
            seq: None,
            error: "x".into(),
        }
        .to_json();
        assert_eq!(reject, r#"{"type":"reject","seq":null,"error":"x"}"#);
    }

    #[test]
    fn a_batch_frame_is_split_and_each_element_judged_alone() {
        let at = crate::record::parse_timestamp("2026-11-22T04:00:00.123Z").expect("ts");
        let good = Record::new("g", 1, at, 5, None).to_json();
        let frame = format!(r#"[{good}, {{"seq": 2}}, 17]"#);
        let items = parse_frame(&frame).expect("frame");
        assert!(matches!(items[0], Item::Valid(_)));
        assert!(matches!(items[1], Item::Invalid { seq: Some(2), .. }));
        assert!(matches!(items[2], Item::Invalid { seq: None, .. }));
    }

    #[test]
    fn a_frame_that_is_not_json_or_not_a_record_shape_is_an_error() {
        assert!(parse_frame("nope").is_err());
        assert!(parse_frame("42").is_err());
        assert!(parse_frame("[]").expect("empty batch").is_empty());
    }
}
