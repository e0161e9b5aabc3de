//! The filter's frame decoder (`protocol::parse_frame`) on any input. Half the inputs are used
//! as they are; the other half build a batch of records whose hashes are computed, then corrupt
//! one field, so mutations reach past the MD5 check into every rule. For every input:
//! - it never panics;
//! - every accepted record re-serialises and re-validates to the same record;
//! - every error names a field of the fixed set;
//! - what comes out (records, excerpts) stays within a fixed multiple of what went in.
#![no_main]

use flowmesh_common::protocol::{EXCERPT_BYTES, Item, parse_frame};
use flowmesh_common::record::{Record, record_hash};
use libfuzzer_sys::fuzz_target;

const FIELDS: &[&str] = &[
    "record", "unknown", "id", "source", "seq", "timestamp", "value", "hash", "traceparent",
];
const MAX_BATCH: usize = 64;

fuzz_target!(|data: &[u8]| {
    let text = match data.split_first() {
        Some((mode, rest)) if mode % 2 == 1 => structured(rest),
        _ => String::from_utf8_lossy(data).into_owned(),
    };
    check(&text);
});

fn check(text: &str) {
    match parse_frame(text, MAX_BATCH) {
        Err(error) => assert!(FIELDS.contains(&error.field()), "{error:?}"),
        Ok(items) => {
            assert!(items.len() <= MAX_BATCH);
            let mut out = 0usize;
            for item in items {
                match item {
                    Item::Valid(record) => {
                        let json = record.to_json();
                        let again = Record::from_json(&json).expect("an accepted record re-validates");
                        assert_eq!(again, record);
                        out += json.len();
                    }
                    Item::Invalid { error, raw, .. } => {
                        assert!(FIELDS.contains(&error.field()), "{error:?}");
                        assert!(raw.len() <= EXCERPT_BYTES + 80, "excerpt of {} bytes", raw.len());
                        out += raw.len();
                    }
                }
            }
            // Re-serialising can add at most escapes, quotes and a traceparent's worth per record.
            assert!(out <= 8 * text.len() + 256, "{out} bytes out of {} in", text.len());
        }
    }
}

/// A batch of records with correct hashes built from `bytes`, most with one field corrupted.
fn structured(bytes: &[u8]) -> String {
    let mut chunks = bytes.chunks(8);
    let mut records = Vec::new();
    for (n, chunk) in chunks.by_ref().take(8).enumerate() {
        let ms = chunk.iter().fold(0u64, |acc, b| acc.wrapping_mul(31).wrapping_add(u64::from(*b)));
        let timestamp = format!(
            "2026-11-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            1 + ms % 28,
            ms % 24,
            (ms / 24) % 60,
            (ms / 1440) % 60,
            ms % 1000
        );
        let value = (chunk.first().copied().unwrap_or(0) % 101) as u8;
        let mut record = serde_json::json!({
            "id": format!("0190b6e2-7c1a-7000-8000-{:012x}", ms % (1 << 48)),
            "source": "fuzz",
            "seq": n as u64 + 1,
            "timestamp": timestamp,
            "value": value,
            "hash": record_hash(&timestamp, value),
        });
        // One record in four stays valid, so acceptance and re-serialisation are exercised too.
        if let Some(&twist) = chunk.get(1).filter(|t| *t % 4 != 0) {
            let field = ["id", "source", "seq", "timestamp", "value", "hash", "extra"][usize::from(twist) % 7];
            let garbage = String::from_utf8_lossy(chunk.get(2..).unwrap_or_default()).into_owned();
            record[field] = match twist % 3 {
                0 => serde_json::Value::String(garbage),
                1 => serde_json::json!(i64::from(twist) - 128),
                _ => serde_json::Value::Null,
            };
        }
        records.push(record);
    }
    serde_json::to_string(&records).unwrap_or_default()
}
