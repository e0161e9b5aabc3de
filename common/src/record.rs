//! The record that crosses every process boundary, its strict validation and the MD5 rule.
//!
//! Validation works on a parsed `serde_json::Value` rather than a derived `Deserialize` so that
//! every rejection names the field at fault and what was wrong with it, and so that the `seq` of
//! an invalid record can still be reported back to its sender.

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
    let digest = md5::compute(format!("{timestamp}|{value}"));
    format!("{:02x}", digest.0[15])
}

/// Formats a time the way records carry it: `2026-11-22T04:00:00.123Z`.
pub fn format_timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses a record timestamp, accepting only the exact form [`format_timestamp`] writes.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let bytes = text.as_bytes();
    // `YYYY-MM-DDTHH:MM:SS.mmmZ` is 24 bytes; chrono alone would accept other precisions/offsets.
    if bytes.len() != 24 || bytes[19] != b'.' || bytes[23] != b'Z' {
        return None;
    }
    if !bytes[20..23].iter().all(u8::is_ascii_digit) {
        return None;
    }
    NaiveDateTime::parse_from_str(&text[..23], "%Y-%m-%dT%H:%M:%S%.3f")
        .ok()
        .map(|naive| naive.and_utc())
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
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            source: source.to_owned(),
            seq,
            timestamp,
            value,
            hash,
            traceparent,
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

        let id = string_field(map, "id")?;
        let parsed_id = uuid::Uuid::try_parse(id).map_err(|_| invalid("id", "is not a UUID"))?;
        if parsed_id.hyphenated().to_string() != id {
            return Err(invalid("id", "must be a lowercase hyphenated UUID"));
        }

        let source = string_field(map, "source")?;
        validate_source(source).map_err(|reason| invalid("source", reason))?;

        let seq = integer_field(map, "seq")?;
        if !(1..=MAX_SEQ).contains(&seq) {
            return Err(invalid("seq", format!("must be between 1 and {MAX_SEQ}")));
        }

        let timestamp = string_field(map, "timestamp")?;
        if parse_timestamp(timestamp).is_none() {
            return Err(invalid(
                "timestamp",
                format!("must be RFC 3339 UTC with milliseconds and `Z`, got {timestamp:?}"),
            ));
        }

        let raw_value = integer_field(map, "value")?;
        let value = u8::try_from(raw_value)
            .ok()
            .filter(|v| *v <= MAX_VALUE)
            .ok_or_else(|| {
                invalid(
                    "value",
                    format!("must be between 0 and 100, got {raw_value}"),
                )
            })?;

        let hash = string_field(map, "hash")?;
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
        let expected = record_hash(timestamp, value);
        if hash != expected {
            return Err(invalid(
                "hash",
                format!(
                    "does not match the timestamp and value: expected {expected:?}, got {hash:?}"
                ),
            ));
        }

        let traceparent = match map.get("traceparent") {
            None => None,
            Some(Value::String(tp)) if is_traceparent(tp) => Some(tp.clone()),
            Some(Value::String(tp)) => {
                return Err(invalid(
                    "traceparent",
                    format!("is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>): {tp:?}"),
                ));
            }
            Some(other) => {
                return Err(RecordError::WrongType {
                    field: "traceparent",
                    expected: "a string",
                    got: json_type(other),
                });
            }
        };

        Ok(Self {
            id: id.to_owned(),
            source: source.to_owned(),
            seq,
            timestamp: timestamp.to_owned(),
            value,
            hash: hash.to_owned(),
            traceparent,
        })
    }

    /// Parses and validates one record from JSON text.
    pub fn from_json(text: &str) -> Result<Self, RecordError> {
        let value: Value = serde_json::from_str(text).map_err(|err| RecordError::Invalid {
            field: "record",
            reason: format!("is not valid JSON: {err}"),
        })?;
        Self::from_value(&value)
    }

    /// The record as one line of JSON (no trailing newline).
    pub fn to_json(&self) -> String {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
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
    let parts: Vec<&str> = text.split('-').collect();
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && lower_hex(parts[1], 32)
        && lower_hex(parts[2], 16)
        && lower_hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

/// A fresh random `traceparent` (sampled flag set).
pub fn new_traceparent() -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        fastrand::u128(1..),
        fastrand::u64(1..)
    )
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
