//! The WebSocket hop of docs/contracts.md §2: what the filter answers for every record it receives, and how a
//! frame from the generator is split into records.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::record::{Record, RecordError, TypedFields};

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

    /// Reads one text frame. Gives exactly what `serde_json::from_str` gives, but an ack in the
    /// filter's own shape, `{"type":"ack","seqs":[…]}` (nearly every answer), is read in one
    /// pass: the derived reading of an internally tagged enum first copies the whole object
    /// into an intermediate tree, one allocation per seq.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        /// An ack's two fields and nothing else; anything more goes the general way.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct PlainAck<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
            seqs: Vec<u64>,
        }
        match serde_json::from_str::<PlainAck>(text) {
            Ok(ack) if ack.kind == "ack" => Ok(ServerMessage::Ack { seqs: ack.seqs }),
            _ => serde_json::from_str(text),
        }
    }
}

/// One element of a client frame after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Default largest number of records in one frame; a frame with more is rejected whole.
pub const DEFAULT_MAX_BATCH: usize = 10_000;

/// How many bytes of an invalid input are kept in dead-letter lines and echoed in errors.
pub const EXCERPT_BYTES: usize = 256;

/// Splits a text frame into records: one object, or an array of at most `max_batch` of them.
///
/// Err when the frame is not JSON, not an object/array, or holds more than `max_batch`
/// elements: then the whole frame is refused with one answer. Memory stays a small multiple of
/// the frame: elements are sliced out of the text without building a JSON tree of the whole
/// frame, and elements past the limit are counted, not kept.
pub fn parse_frame(text: &str, max_batch: usize) -> Result<Vec<Item>, RecordError> {
    // An array of valid records (nearly every frame) is read in one pass; anything else is
    // read again element by element, which names every fault. Both give the same items.
    if text.trim_start().starts_with('[')
        && let Some(records) = parse_valid_array(text, max_batch)
    {
        return Ok(records.into_iter().map(Item::Valid).collect());
    }
    parse_elements(text, max_batch)
}

/// The records of a frame that is an array of at most `max` valid records, read in one pass;
/// None for any other frame.
fn parse_valid_array(text: &str, max: usize) -> Option<Vec<Record>> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let records = ValidArray { max }.deserialize(&mut deserializer).ok()??;
    deserializer.end().ok()?;
    Some(records)
}

/// The element-by-element reading of [`parse_frame`].
fn parse_elements(text: &str, max_batch: usize) -> Result<Vec<Item>, RecordError> {
    let not_json = |err: serde_json::Error| RecordError::Invalid {
        field: "record",
        reason: format!("frame is not valid JSON: {err}"),
    };
    let elements: Vec<&RawValue> = match text.trim_start().as_bytes().first() {
        Some(b'[') => {
            let mut deserializer = serde_json::Deserializer::from_str(text);
            let elements = Elements { max: max_batch }
                .deserialize(&mut deserializer)
                .map_err(not_json)?;
            deserializer.end().map_err(not_json)?;
            match elements {
                Ok(elements) => elements,
                Err(count) => {
                    return Err(RecordError::Invalid {
                        field: "record",
                        reason: format!(
                            "frame holds {count} records, more than the limit of {max_batch}"
                        ),
                    });
                }
            }
        }
        Some(b'{') => vec![serde_json::from_str(text).map_err(not_json)?],
        _ => {
            let value: Value = serde_json::from_str(text).map_err(not_json)?;
            return Err(RecordError::NotAnObject(crate::record::json_type(&value)));
        }
    };
    Ok(elements
        .into_iter()
        .map(|raw| {
            // Valid records (nearly all) take the shortcut; an invalid one is read again as a
            // JSON tree, for the field at fault and its `seq`.
            if let Ok(record) = Record::from_json(raw.get()) {
                return Item::Valid(record);
            }
            let parsed: Result<Value, _> = serde_json::from_str(raw.get());
            let element = match parsed {
                Ok(element) => element,
                Err(err) => {
                    return Item::Invalid {
                        seq: None,
                        error: not_json(err),
                        raw: excerpt(raw.get()),
                    };
                }
            };
            match Record::from_value(&element) {
                Ok(record) => Item::Valid(record),
                Err(error) => Item::Invalid {
                    seq: element.get("seq").and_then(Value::as_u64),
                    error,
                    raw: excerpt(raw.get()),
                },
            }
        })
        .collect())
}

/// Reads a JSON array whose elements are all valid records, up to `max` of them; `None` as
/// soon as one is not (or there are more), leaving the frame to [`parse_elements`].
struct ValidArray {
    max: usize,
}

impl<'de> DeserializeSeed<'de> for ValidArray {
    type Value = Option<Vec<Record>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ValidArray {
    type Value = Option<Vec<Record>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut records = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
        while let Some(fields) = seq.next_element::<TypedFields<'de>>()? {
            if records.len() == self.max {
                return Ok(None);
            }
            match fields.validate() {
                Ok(record) => records.push(record),
                Err(_) => return Ok(None),
            }
        }
        Ok(Some(records))
    }
}

/// Collects the elements of a JSON array as raw slices, up to `max`; beyond that only counts
/// them (`Err(count)`), keeping nothing.
struct Elements {
    max: usize,
}

impl<'de> DeserializeSeed<'de> for Elements {
    type Value = Result<Vec<&'de RawValue>, usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Elements {
    type Value = Result<Vec<&'de RawValue>, usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut kept = Vec::new();
        while kept.len() < self.max {
            match seq.next_element::<&'de RawValue>()? {
                Some(element) => kept.push(element),
                None => return Ok(Ok(kept)),
            }
        }
        let mut count = kept.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok(if count > self.max {
            Err(count)
        } else {
            Ok(kept)
        })
    }
}

/// `text` if it is short; else its first [`EXCERPT_BYTES`] bytes, its length and its MD5, so a
/// dead-letter line or an error stays small whatever the input.
pub fn excerpt(text: &str) -> String {
    if text.len() <= EXCERPT_BYTES {
        return text.to_owned();
    }
    let mut end = EXCERPT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… ({} bytes, md5 {:x})",
        &text[..end],
        text.len(),
        md5::compute(text.as_bytes())
    )
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
        let items = parse_frame(&frame, DEFAULT_MAX_BATCH).expect("frame");
        assert!(matches!(items[0], Item::Valid(_)));
        assert!(matches!(items[1], Item::Invalid { seq: Some(2), .. }));
        assert!(matches!(items[2], Item::Invalid { seq: None, .. }));
    }

    #[test]
    fn a_frame_that_is_not_json_or_not_a_record_shape_is_an_error() {
        assert!(parse_frame("nope", DEFAULT_MAX_BATCH).is_err());
        assert!(parse_frame("42", DEFAULT_MAX_BATCH).is_err());
        assert!(
            parse_frame("[]", DEFAULT_MAX_BATCH)
                .expect("empty batch")
                .is_empty()
        );
    }

    #[test]
    fn a_frame_with_more_records_than_the_limit_is_refused_whole_without_keeping_them() {
        let frame = format!("[{}]", vec!["0"; 524_000].join(","));
        let err = parse_frame(&frame, 10_000).expect_err("too many");
        assert_eq!(err.field(), "record");
        assert!(err.to_string().contains("524000 records"), "{err}");
        let exactly = format!("[{}]", ["0"; 3].join(","));
        assert_eq!(parse_frame(&exactly, 3).expect("at the limit").len(), 3);
    }

    #[test]
    fn long_invalid_input_is_kept_as_a_short_excerpt() {
        let huge = format!("{{\"{}\": 1}}", "x".repeat(100_000));
        let items = parse_frame(&format!("[{huge}]"), 10).expect("frame");
        match &items[0] {
            Item::Invalid { raw, .. } => {
                assert!(raw.len() < EXCERPT_BYTES + 80, "{}", raw.len());
                assert!(raw.contains("100007 bytes, md5"), "{raw}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(excerpt("short"), "short");
        let multibyte = "é".repeat(300);
        assert!(excerpt(&multibyte).starts_with("ééé"));
    }

    mod answers {
        use super::*;
        use proptest::prelude::*;

        fn message() -> impl Strategy<Value = ServerMessage> {
            let seqs = || prop::collection::vec(any::<u64>(), 0..20);
            prop_oneof![
                seqs().prop_map(|seqs| ServerMessage::Ack { seqs }),
                (seqs(), ".{0,12}", any::<u64>()).prop_map(|(seqs, reason, retry_after_ms)| {
                    ServerMessage::Nack {
                        seqs,
                        reason,
                        retry_after_ms,
                    }
                }),
                (any::<Option<u64>>(), ".{0,12}")
                    .prop_map(|(seq, error)| ServerMessage::Reject { seq, error }),
            ]
        }

        /// The message's text, or a variant of it: reordered, spaced, escaped, with a field
        /// more, one less, a wrong type, the other tag, a duplicate key, or not an object.
        fn text() -> impl Strategy<Value = String> {
            (message(), 0usize..12).prop_map(|(message, change)| {
                let text = message.to_json();
                let mut object: serde_json::Map<String, Value> =
                    serde_json::from_str(&text).expect("an object");
                match change {
                    0..=3 => return text,
                    4 => return text.replace(r#""type":"#, r#" "type" : "#),
                    5 => return text.replace(r#""ack""#, r#""\u0061ck""#),
                    6 => drop(object.insert("extra".into(), 1.into())),
                    7 => drop(object.remove("seqs")),
                    8 => drop(object.insert("seqs".into(), "1".into())),
                    9 => drop(object.insert("type".into(), "nack".into())),
                    10 => return text.replace('}', r#","seqs":[1]}"#),
                    _ => return text.replace('{', "[").replace('}', "]"),
                }
                let mut fields: Vec<(String, Value)> = object.into_iter().collect();
                fields.reverse();
                Value::Object(fields.into_iter().collect()).to_string()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn reading_an_answer_gives_what_the_derived_reading_gives(text in text()) {
                let fast = ServerMessage::from_json(&text).map_err(|e| e.to_string());
                let derived = serde_json::from_str::<ServerMessage>(&text).map_err(|e| e.to_string());
                prop_assert_eq!(fast, derived);
            }
        }

        #[test]
        fn an_ack_in_the_filters_shape_reads_and_other_shapes_still_do() {
            let ack = ServerMessage::from_json(r#"{"type":"ack","seqs":[1,2]}"#).expect("ack");
            assert_eq!(ack, ServerMessage::Ack { seqs: vec![1, 2] });
            let with_more = ServerMessage::from_json(r#"{"seqs":[3],"type":"ack","note":"x"}"#);
            assert_eq!(
                with_more.expect("ack"),
                ServerMessage::Ack { seqs: vec![3] }
            );
            let plain_nack = r#"{"type":"nack","seqs":[3]}"#;
            assert!(
                ServerMessage::from_json(plain_nack).is_err(),
                "a nack needs its reason"
            );
        }
    }

    mod one_pass {
        use super::*;
        use proptest::prelude::*;

        /// One element's text: mostly valid records, written plainly or with an escape, and
        /// every kind of fault the element-by-element reading names.
        fn element() -> impl Strategy<Value = String> {
            (1u64..1000, 0u8..=100, any::<bool>(), 0usize..10).prop_map(
                |(seq, value, traced, fault)| {
                    let at =
                        chrono::DateTime::from_timestamp_millis(1_790_000_000_000 + seq as i64)
                            .expect("in range");
                    let traceparent = traced.then(crate::record::new_traceparent);
                    let record = Record::new("s1", seq, at, value, traceparent);
                    let text = record.to_json();
                    let mut object: serde_json::Map<String, Value> =
                        serde_json::from_str(&text).expect("an object");
                    match fault {
                        0..=3 => return text,
                        4 => return text.replace(r#""source":"s1""#, r#""source":"s\u0031""#),
                        5 => drop(object.insert("value".into(), 101.into())),
                        6 => drop(object.insert("hash".into(), "zz".into())),
                        7 => drop(object.remove("id")),
                        8 => return text.replace('}', r#","seq":7}"#),
                        _ => return ["17", "null", "{}", "[1]"][seq as usize % 4].to_owned(),
                    }
                    Value::Object(object).to_string()
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn reading_in_one_pass_gives_what_reading_element_by_element_gives(
                elements in prop::collection::vec(element(), 0..12),
                spaced in any::<bool>(),
                max in 1usize..14,
            ) {
                let text = format!("[{}]", elements.join(if spaced { " ,\n " } else { "," }));
                let expected = parse_elements(&text, max);
                prop_assert_eq!(parse_frame(&text, max), expected.clone());
                if let Some(records) = parse_valid_array(&text, max) {
                    let items: Vec<Item> = records.into_iter().map(Item::Valid).collect();
                    prop_assert_eq!(Ok(items), expected);
                }
            }
        }

        #[test]
        fn a_frame_of_valid_records_is_read_in_one_pass_and_a_faulty_one_is_not() {
            let at = crate::record::parse_timestamp("2026-11-22T04:00:00.123Z").expect("ts");
            let good: Vec<String> = (1..=3)
                .map(|seq| Record::new("g", seq, at, 5, None).to_json())
                .collect();
            let frame = format!("[{}]", good.join(","));
            assert_eq!(parse_valid_array(&frame, 3).map(|r| r.len()), Some(3));
            assert_eq!(parse_valid_array(&frame, 2), None, "more than the limit");
            let faulty = format!("[{},{{\"seq\":2}}]", good[0]);
            assert_eq!(parse_valid_array(&faulty, 10), None);
            assert_eq!(
                parse_valid_array(&format!("{frame} x"), 10),
                None,
                "trailing text"
            );
        }
    }
}
