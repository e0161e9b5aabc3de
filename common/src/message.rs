//! A record message on the wire (docs/contracts.md §4): one record, or a packed run of
//! several, and how a consumer reads either back.
//!
//! A message holding one record is JSON with the record's own headers. A *packed* message
//! (the filter's `--publish-pack`, off by default) carries consecutive records of one frame
//! that share their provenance, one JSON line each, as `application/x-ndjson`: RabbitMQ's cost
//! is per message, so packing divides it by the records per message. Each line is a record
//! exactly as a single-record body would be, so every reader validates both the same way.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use crate::record::Record;
use crate::topology::{HEADER_ROUTE, HEADER_ROUTES_VERSION, provenance_of, record_properties};

/// Content type of a packed message: one record JSON per line.
pub const CONTENT_TYPE_PACKED: &str = "application/x-ndjson";
/// Header of a packed message: how many records (lines) it holds.
pub const HEADER_RECORDS: &str = "x-flowmesh-records";
/// Records a packed message may hold at most; a longer one is refused whole by its reader.
pub const MAX_PACKED: usize = 10_000;

/// The body and properties of the message carrying `records`: a record message for one, a
/// packed message for several (which must share their provenance: the packed message's headers
/// carry it once, from the first record).
///
/// # Panics
/// If `records` is empty.
pub fn encode(records: &[Record]) -> (Vec<u8>, BasicProperties) {
    match records {
        [] => panic!("a message carries at least one record"),
        [record] => (record.to_json().into_bytes(), record_properties(record)),
        [first, ..] => {
            let mut body = String::with_capacity(records.len() * 256);
            for (index, record) in records.iter().enumerate() {
                if index > 0 {
                    body.push('\n');
                }
                record.write_json(&mut body);
            }
            (body.into_bytes(), packed_properties(first, records.len()))
        }
    }
}

/// The properties of a packed message of `count` records whose first is `first`: persistent,
/// `message_id` = the first record's id, the record count and the provenance. Source, seq and
/// traceparent are in each line, not in headers.
fn packed_properties(first: &Record, count: usize) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(HEADER_RECORDS.into(), AMQPValue::LongLongInt(count as i64));
    if let Some(provenance) = &first.provenance {
        headers.insert(
            HEADER_ROUTES_VERSION.into(),
            AMQPValue::LongString(provenance.version.as_str().into()),
        );
        if let Some(route) = &provenance.route {
            headers.insert(
                HEADER_ROUTE.into(),
                AMQPValue::LongString(route.as_str().into()),
            );
        }
    }
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE_PACKED.into())
        .with_delivery_mode(2)
        .with_message_id(first.id.as_str().into())
        .with_headers(headers)
}

/// How often RabbitMQ returned this message to its queue before this delivery: the quorum
/// queue's `x-delivery-count` header (0 when absent).
pub fn delivery_count(properties: &BasicProperties) -> u64 {
    let count = properties
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get("x-delivery-count") {
            Some(AMQPValue::LongLongInt(n)) => Some(*n),
            Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
            Some(AMQPValue::ShortInt(n)) => Some(i64::from(*n)),
            Some(AMQPValue::ShortShortInt(n)) => Some(i64::from(*n)),
            Some(AMQPValue::LongUInt(n)) => Some(i64::from(*n)),
            Some(AMQPValue::ShortUInt(n)) => Some(i64::from(*n)),
            Some(AMQPValue::ShortShortUInt(n)) => Some(i64::from(*n)),
            _ => None,
        })
        .unwrap_or(0);
    count.max(0) as u64
}

/// Whether a message is packed (by its content type).
pub fn is_packed(properties: &BasicProperties) -> bool {
    properties
        .content_type()
        .as_ref()
        .is_some_and(|t| t.as_str() == CONTENT_TYPE_PACKED)
}

/// How many records a message says it holds: 1 for a record message, the `x-flowmesh-records`
/// header (within 1 ..= [`MAX_PACKED`]) for a packed one. A hint for sizing batches only; the
/// body decides.
pub fn records_hint(properties: &BasicProperties) -> usize {
    if !is_packed(properties) {
        return 1;
    }
    let count = properties
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get(HEADER_RECORDS) {
            Some(AMQPValue::LongLongInt(n)) => Some(*n),
            Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
            _ => None,
        })
        .unwrap_or(1);
    count.clamp(1, MAX_PACKED as i64) as usize
}

/// How many records a message's body would hold if every line were valid: 1 for a record
/// message, its line count for a packed one. What a message dead-lettered whole counts as.
pub fn lines(properties: &BasicProperties, data: &[u8]) -> usize {
    if is_packed(properties) {
        data.iter().filter(|&&b| b == b'\n').count() + 1
    } else {
        1
    }
}

/// A line of a packed message that is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidLine {
    /// 1-based line number.
    pub line: usize,
    /// The line as it came.
    pub text: String,
    /// Why it is not a record.
    pub reason: String,
}

/// What a message held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoded {
    /// The valid records, in message order, each with the message's provenance.
    pub records: Vec<Record>,
    /// The lines of a packed message that are not records (a record message is all or
    /// nothing: it is an `Err`).
    pub invalid: Vec<InvalidLine>,
}

/// Reads a message's records. `Err` when nothing in it can be stored: a record message that
/// is not a valid record, or a packed message that is not UTF-8, is empty, holds more than
/// [`MAX_PACKED`] lines or no valid line at all. Otherwise the valid records, and the lines that
/// are not.
pub fn decode(properties: &BasicProperties, data: &[u8]) -> Result<Decoded, String> {
    let provenance = provenance_of(properties);
    let text = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    if !is_packed(properties) {
        let mut record = Record::from_json(text).map_err(|e| e.to_string())?;
        record.provenance = provenance;
        return Ok(Decoded {
            records: vec![record],
            invalid: Vec::new(),
        });
    }
    // One trailing newline (as many NDJSON writers leave) ends the last line; it is not an
    // empty line of its own.
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() {
        return Err("a packed message with no records".into());
    }
    let mut decoded = Decoded::default();
    for (index, line) in text.split('\n').enumerate() {
        if index == MAX_PACKED {
            return Err(format!(
                "a packed message holds more than {MAX_PACKED} records"
            ));
        }
        match Record::from_json(line) {
            Ok(mut record) => {
                record.provenance = provenance.clone();
                decoded.records.push(record);
            }
            Err(err) => decoded.invalid.push(InvalidLine {
                line: index + 1,
                text: line.to_owned(),
                reason: err.to_string(),
            }),
        }
    }
    if decoded.records.is_empty() {
        let first = &decoded.invalid[0];
        return Err(format!(
            "no line of the packed message is a valid record (line {}: {})",
            first.line, first.reason
        ));
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests;
