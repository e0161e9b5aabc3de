//! The record that crosses every process boundary, its strict validation and the MD5 rule.
//!
//! Validation works on a parsed `serde_json::Value` rather than a derived `Deserialize` so that
//! every rejection names the field at fault and what was wrong with it, and so that the `seq` of
//! an invalid record can still be reported back to its sender. Well-typed records (nearly all of
//! them) take a shortcut through a borrowed struct that runs the same checks in the same order.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Highest `value` a record may carry.
pub const MAX_VALUE: u8 = 100;
/// Longest `source` name.
pub const MAX_SOURCE_LEN: usize = 64;
/// `seq` travels as a PostgreSQL `bigint`, so it must fit an `i64`.
pub const MAX_SEQ: u64 = i64::MAX as u64;

const FIELDS: [&str; 7] = [
    "id",
    "source",
    "seq",
    "timestamp",
    "value",
    "hash",
    "traceparent",
];

/// One generated measurement. Field order here is the order of the JSON the services write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Canonical (lowercase, hyphenated) UUID: the record's identity everywhere.
    pub id: String,
    /// The generator instance that made the record.
    pub source: String,
    /// Strictly increasing per `source`, starting at 1.
    pub seq: u64,
    /// RFC 3339 UTC with millisecond precision and a `Z` suffix, kept exactly as sent.
    pub timestamp: String,
    /// 0 ..= 100.
    pub value: u8,
    /// The last two hex chars of `md5("{timestamp}|{value}")`.
    pub hash: String,
    /// W3C Trace Context `traceparent`, carried to every later hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Which route of which routes version stored it, where that is known (set by whoever
    /// reads the record back from a store or from RabbitMQ). Never part of the record's JSON,
    /// so no client can claim one.
    #[serde(skip)]
    pub provenance: Option<Provenance>,
}

/// Which route of which routes version stored a record. Travels beside the record (AMQP
/// headers, table columns, a field of each record in a MongoDB group, the file's name), never
/// in the record's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Provenance {
    /// The routes version in force when the record was routed.
    pub version: String,
    /// The route that took it; `None` where the store keeps only the version (the file sink).
    pub route: Option<String>,
}

/// Why a record is invalid. The text is what the sender sees in a `reject`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The JSON is not an object at all.
    #[error("a record must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// A field the schema does not know.
    #[error("unknown field `{0}`")]
    Unknown(String),
    /// A field of the wrong JSON type.
    #[error("field `{field}` must be {expected}, got {got}")]
    WrongType {
        /// The field at fault.
        field: &'static str,
        /// What the schema wants.
        expected: &'static str,
        /// The JSON type found.
        got: &'static str,
    },
    /// A field of the right type whose content breaks a rule.
    #[error("field `{field}` {reason}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// What rule it breaks, with the offending value where that helps.
        reason: String,
    },
}

impl RecordError {
    /// The field at fault, for a bounded metric label (`unknown` stands for any unknown field).
    pub fn field(&self) -> &'static str {
        match self {
            Self::NotAnObject(_) => "record",
            Self::Unknown(_) => "unknown",
            Self::Missing(field) | Self::WrongType { field, .. } | Self::Invalid { field, .. } => {
                field
            }
        }
    }
}

/// The two-char hash of docs/contracts.md §1: the last two hex chars of the lowercase hex MD5 of
/// `"{timestamp}|{value}"`.
pub fn record_hash(timestamp: &str, value: u8) -> String {
    let [high, low] = hash_chars(timestamp, value);
    String::from_utf8(vec![high, low]).expect("hex digits are ASCII")
}

/// Lowercase hex digits, for the hash and for new traceparents.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// The two lowercase hex characters of [`record_hash`], without allocating (the filter computes
/// one per record it validates).
fn hash_chars(timestamp: &str, value: u8) -> [u8; 2] {
    let mut context = md5::Context::new();
    context.consume(timestamp.as_bytes());
    context.consume(b"|");
    let mut digits = [0u8; 3];
    let mut start = digits.len();
    let mut rest = value;
    loop {
        start -= 1;
        digits[start] = b'0' + rest % 10;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    context.consume(&digits[start..]);
    let last = context.finalize().0[15];
    [HEX[usize::from(last >> 4)], HEX[usize::from(last & 0x0f)]]
}

/// Formats a time the way records carry it: `2026-11-22T04:00:00.123Z`.
pub fn format_timestamp(at: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    // Written by hand for the years records carry (chrono's formatter costs more than the rest
    // of making a record); any other year, and a leap second, go through chrono.
    let (year, nanos) = (at.year(), at.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return at.to_rfc3339_opts(SecondsFormat::Millis, true);
    }
    let mut out = [0u8; 24];
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, at.month());
    put(8, 2, at.day());
    put(11, 2, at.hour());
    put(14, 2, at.minute());
    put(17, 2, at.second());
    put(20, 3, nanos / 1_000_000);
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ] {
        out[i] = c;
    }
    String::from_utf8(out.to_vec()).expect("digits and separators are ASCII")
}

/// Parses a record timestamp, accepting only the exact form [`format_timestamp`] writes.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let bytes = text.as_bytes();
    // `YYYY-MM-DDTHH:MM:SS.mmmZ` is 24 bytes; chrono alone would accept other precisions/offsets.
    if bytes.len() != 24 || bytes[19] != b'.' || bytes[23] != b'Z' {
        return None;
    }
    // Parsed by hand: a format string costs more than the rest of a record's validation.
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        bytes[range].iter().try_fold(0u32, |n, b| {
            b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
        })
    };
    if bytes[4] != b'-'
        || bytes[7] != b'-'
        || bytes[10] != b'T'
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(number(0..4)?).ok()?,
        number(5..7)?,
        number(8..10)?,
    )?;
    let time = chrono::NaiveTime::from_hms_milli_opt(
        number(11..13)?,
        number(14..16)?,
        number(17..19)?,
        number(20..23)?,
    )?;
    Some(NaiveDateTime::new(date, time).and_utc())
}

impl Record {
    /// Builds a valid record, computing its hash. `id` is a fresh UUIDv7.
    pub fn new(
        source: &str,
        seq: u64,
        at: DateTime<Utc>,
        value: u8,
        traceparent: Option<String>,
    ) -> Self {
        let timestamp = format_timestamp(at);
        let hash = record_hash(&timestamp, value);
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = new_id(at).hyphenated().encode_lower(&mut id);
        Self {
            id: id.to_owned(),
            source: source.to_owned(),
            seq,
            timestamp,
            value,
            hash,
            traceparent,
            provenance: None,
        }
    }

    /// Validates one JSON value against every rule of docs/contracts.md §1.
    pub fn from_value(value: &Value) -> Result<Self, RecordError> {
        let Value::Object(map) = value else {
            return Err(RecordError::NotAnObject(json_type(value)));
        };
        if let Some(unknown) = map.keys().find(|key| !FIELDS.contains(&key.as_str())) {
            return Err(RecordError::Unknown(unknown.clone()));
        }
        // Each field's type, then its value, in the order of the contract's table: the first
        // fault found is the one reported.
        let id = string_field(map, "id")?;
        check_id(id)?;
        let source = string_field(map, "source")?;
        check_source(source)?;
        let seq = integer_field(map, "seq")?;
        check_seq(seq)?;
        let timestamp = string_field(map, "timestamp")?;
        check_timestamp(timestamp)?;
        let value = check_value(integer_field(map, "value")?)?;
        let hash = string_field(map, "hash")?;
        check_hash(hash, timestamp, value)?;
        let traceparent = match map.get("traceparent") {
            None => None,
            Some(Value::String(tp)) => Some(tp.as_str()),
            Some(other) => {
                return Err(RecordError::WrongType {
                    field: "traceparent",
                    expected: "a string",
                    got: json_type(other),
                });
            }
        };
        check_traceparent(traceparent)?;
        Ok(Self {
            id: id.to_owned(),
            source: source.to_owned(),
            seq,
            timestamp: timestamp.to_owned(),
            value,
            hash: hash.to_owned(),
            traceparent: traceparent.map(str::to_owned),
            provenance: None,
        })
    }

    /// Parses and validates one record from JSON text.
    ///
    /// A well-typed object (every field present once, of its type, and nothing else) is read
    /// straight into its fields; anything else goes through [`Record::from_value`], whose
    /// answer names the field at fault. Both apply the same checks in the same order, so the
    /// outcome is the same either way; the first path only skips building a JSON tree.
    pub fn from_json(text: &str) -> Result<Self, RecordError> {
        if let Ok(fields) = serde_json::from_str::<TypedFields<'_>>(text) {
            return fields.validate();
        }
        let value: Value = serde_json::from_str(text).map_err(|err| RecordError::Invalid {
            field: "record",
            reason: format!("is not valid JSON: {err}"),
        })?;
        Self::from_value(&value)
    }

    /// The record as one line of JSON (no trailing newline), fields in declaration order.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(
            96 + self.id.len()
                + self.source.len()
                + self.timestamp.len()
                + self.traceparent.as_ref().map_or(0, String::len),
        );
        self.write_json(&mut out);
        out
    }

    /// Appends [`to_json`](Self::to_json)'s text to `out`, without a buffer of its own (a packed
    /// message writes its lines this way).
    pub fn write_json(&self, out: &mut String) {
        // A validated record's strings need no escaping (UUID, [A-Za-z0-9._-], RFC 3339, hex):
        // written directly, that costs a fraction of serde's generic path, which the filter and
        // the generator pay once per record. Anything else goes through serde_json.
        // Without early exit, so the compiler checks many bytes at a time.
        let plain = |s: &str| {
            s.bytes().fold(true, |ok, b| {
                ok & (b >= 0x20) & (b != b'"') & (b != b'\\') & (b < 0x7f)
            })
        };
        let strings_plain = plain(&self.id)
            && plain(&self.source)
            && plain(&self.timestamp)
            && plain(&self.hash)
            && self.traceparent.as_deref().is_none_or(plain);
        if !strings_plain {
            // Serializing a struct of strings and integers cannot fail.
            out.push_str(&serde_json::to_string(self).unwrap_or_default());
            return;
        }
        let mut number = itoa::Buffer::new();
        out.push_str("{\"id\":\"");
        out.push_str(&self.id);
        out.push_str("\",\"source\":\"");
        out.push_str(&self.source);
        out.push_str("\",\"seq\":");
        out.push_str(number.format(self.seq));
        out.push_str(",\"timestamp\":\"");
        out.push_str(&self.timestamp);
        out.push_str("\",\"value\":");
        out.push_str(number.format(self.value));
        out.push_str(",\"hash\":\"");
        out.push_str(&self.hash);
        out.push('"');
        if let Some(traceparent) = &self.traceparent {
            out.push_str(",\"traceparent\":\"");
            out.push_str(traceparent);
            out.push('"');
        }
        out.push('}');
    }

    /// The trace id inside `traceparent`, if any, for log correlation.
    pub fn trace_id(&self) -> &str {
        self.traceparent
            .as_deref()
            .and_then(|tp| tp.get(3..35))
            .unwrap_or("")
    }
}

/// Checks a `source` name: 1–64 chars of `[A-Za-z0-9._-]`.
pub fn validate_source(source: &str) -> Result<(), String> {
    if source.is_empty() || source.len() > MAX_SOURCE_LEN {
        return Err(format!("must be 1 to {MAX_SOURCE_LEN} chars long"));
    }
    if let Some(bad) = source
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("may hold only [A-Za-z0-9._-], found {bad:?}"));
    }
    Ok(())
}

/// True for a well-formed W3C `traceparent` of version 00 with non-zero ids.
pub fn is_traceparent(text: &str) -> bool {
    // `00-<32 hex>-<16 hex>-<2 hex>`: 55 bytes with dashes at 2, 35 and 52, checked in one pass
    // (the filter checks one per record).
    let bytes = text.as_bytes();
    if bytes.len() != 55 || !bytes.starts_with(b"00-") {
        return false;
    }
    // Folds without early exit, so the compiler checks many bytes at a time.
    let lower_hex = |part: &[u8]| {
        part.iter().fold(true, |ok, &b| {
            ok & ((b.wrapping_sub(b'0') < 10) | (b.wrapping_sub(b'a') < 6))
        })
    };
    let non_zero = |part: &[u8]| part.iter().fold(false, |any, &b| any | (b != b'0'));
    let (trace_id, span_id, flags) = (&bytes[3..35], &bytes[36..52], &bytes[53..55]);
    bytes[35] == b'-'
        && bytes[52] == b'-'
        && lower_hex(trace_id)
        && lower_hex(span_id)
        && lower_hex(flags)
        && non_zero(trace_id)
        && non_zero(span_id)
}

/// A UUIDv7 for a record made at `at`: its millisecond timestamp and 74 random bits from the
/// thread's fast generator (seeded from the OS once, not one system call per id).
pub fn new_id(at: DateTime<Utc>) -> uuid::Uuid {
    let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    let random = fastrand::u128(..).to_le_bytes();
    let mut bytes = [0u8; 10];
    bytes.copy_from_slice(&random[..10]);
    uuid::Builder::from_unix_timestamp_millis(millis, &bytes).into_uuid()
}

/// A fresh random `traceparent` (sampled flag set).
pub fn new_traceparent() -> String {
    // `00-{:032x}-{:016x}-01`, written without the formatting machinery (one per record made).
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let (mut trace_id, mut span_id) = (fastrand::u128(1..), fastrand::u64(1..));
    for i in (3..35).rev() {
        out[i] = HEX[(trace_id & 0xf) as usize];
        trace_id >>= 4;
    }
    for i in (36..52).rev() {
        out[i] = HEX[(span_id & 0xf) as usize];
        span_id >>= 4;
    }
    String::from_utf8(out.to_vec()).expect("hex digits are ASCII")
}

/// A record object whose fields all have the right JSON types, borrowed from the text where no
/// escape forces a copy.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TypedFields<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    source: std::borrow::Cow<'a, str>,
    seq: u64,
    #[serde(borrow)]
    timestamp: std::borrow::Cow<'a, str>,
    value: u64,
    #[serde(borrow)]
    hash: std::borrow::Cow<'a, str>,
    /// Absent is fine; `null` is not a string, so it fails here and the slow path names it.
    #[serde(default, borrow, deserialize_with = "present_string")]
    traceparent: Option<std::borrow::Cow<'a, str>>,
}

fn present_string<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<std::borrow::Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);
    Text::deserialize(deserializer).map(|text| Some(text.0))
}

impl TypedFields<'_> {
    /// The checks of [`Record::from_value`], in its order.
    pub(crate) fn validate(self) -> Result<Record, RecordError> {
        check_id(&self.id)?;
        check_source(&self.source)?;
        check_seq(self.seq)?;
        check_timestamp(&self.timestamp)?;
        let value = check_value(self.value)?;
        check_hash(&self.hash, &self.timestamp, value)?;
        check_traceparent(self.traceparent.as_deref())?;
        Ok(Record {
            id: self.id.into_owned(),
            source: self.source.into_owned(),
            seq: self.seq,
            timestamp: self.timestamp.into_owned(),
            value,
            hash: self.hash.into_owned(),
            traceparent: self.traceparent.map(std::borrow::Cow::into_owned),
            provenance: None,
        })
    }
}

fn check_id(id: &str) -> Result<(), RecordError> {
    uuid::Uuid::try_parse(id).map_err(|_| invalid("id", "is not a UUID"))?;
    // A UUID of 36 characters is the hyphenated form; lowercase means no uppercase hex.
    if id.len() != 36 || id.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid("id", "must be a lowercase hyphenated UUID"));
    }
    Ok(())
}

fn check_source(source: &str) -> Result<(), RecordError> {
    validate_source(source).map_err(|reason| invalid("source", reason))
}

fn check_seq(seq: u64) -> Result<(), RecordError> {
    if !(1..=MAX_SEQ).contains(&seq) {
        return Err(invalid("seq", format!("must be between 1 and {MAX_SEQ}")));
    }
    Ok(())
}

fn check_timestamp(timestamp: &str) -> Result<(), RecordError> {
    if parse_timestamp(timestamp).is_none() {
        return Err(invalid(
            "timestamp",
            format!("must be RFC 3339 UTC with milliseconds and `Z`, got {timestamp:?}"),
        ));
    }
    Ok(())
}

fn check_value(raw_value: u64) -> Result<u8, RecordError> {
    u8::try_from(raw_value)
        .ok()
        .filter(|v| *v <= MAX_VALUE)
        .ok_or_else(|| {
            invalid(
                "value",
                format!("must be between 0 and 100, got {raw_value}"),
            )
        })
}

fn check_hash(hash: &str, timestamp: &str, value: u8) -> Result<(), RecordError> {
    if hash.len() != 2
        || !hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid(
            "hash",
            format!("must be 2 lowercase hex chars, got {hash:?}"),
        ));
    }
    if hash.as_bytes() != hash_chars(timestamp, value) {
        let expected = record_hash(timestamp, value);
        return Err(invalid(
            "hash",
            format!("does not match the timestamp and value: expected {expected:?}, got {hash:?}"),
        ));
    }
    Ok(())
}

fn check_traceparent(traceparent: Option<&str>) -> Result<(), RecordError> {
    match traceparent {
        Some(tp) if !is_traceparent(tp) => Err(invalid(
            "traceparent",
            format!("is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>): {tp:?}"),
        )),
        _ => Ok(()),
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RecordError {
    RecordError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn field<'a>(map: &'a Map<String, Value>, name: &'static str) -> Result<&'a Value, RecordError> {
    map.get(name).ok_or(RecordError::Missing(name))
}

fn string_field<'a>(
    map: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, RecordError> {
    match field(map, name)? {
        Value::String(s) => Ok(s),
        other => Err(RecordError::WrongType {
            field: name,
            expected: "a string",
            got: json_type(other),
        }),
    }
}

fn integer_field(map: &Map<String, Value>, name: &'static str) -> Result<u64, RecordError> {
    match field(map, name)? {
        Value::Number(n) if n.is_u64() => Ok(n.as_u64().unwrap_or_default()),
        Value::Number(n) if n.is_i64() => {
            Err(invalid(name, format!("must not be negative, got {n}")))
        }
        other => Err(RecordError::WrongType {
            field: name,
            expected: "an integer",
            got: json_type(other),
        }),
    }
}

/// The JSON type name of a value, for error messages.
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
