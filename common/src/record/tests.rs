//! The record rules of docs/contracts.md §1, one case per invalid class.

use super::*;
use serde_json::json;

/// Vectors computed with Python's `hashlib`, independently of the `md5` crate.
const VECTORS: [(&str, u8, &str); 5] = [
    ("2026-11-22T04:00:00.123Z", 93, "59"),
    ("2026-11-22T04:00:00.123Z", 0, "13"),
    ("1999-12-31T23:59:59.999Z", 100, "b2"),
    ("2026-01-01T00:00:00.000Z", 42, "23"),
    ("2030-06-15T12:30:45.500Z", 91, "e8"),
];

fn valid() -> Value {
    json!({
        "id": "0193a5c2-7c1e-7d2a-8b3c-4d5e6f708192",
        "source": "gen-1",
        "seq": 7,
        "timestamp": "2026-11-22T04:00:00.123Z",
        "value": 93,
        "hash": "59",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    })
}

fn with(field: &str, value: Value) -> Value {
    let mut record = valid();
    record[field] = value;
    record
}

fn without(field: &str) -> Value {
    let mut record = valid();
    record.as_object_mut().expect("object").remove(field);
    record
}

#[test]
fn the_hash_is_the_last_two_hex_chars_of_the_md5_of_timestamp_pipe_value() {
    for (timestamp, value, hash) in VECTORS {
        assert_eq!(record_hash(timestamp, value), hash, "{timestamp}|{value}");
    }
}

#[test]
fn a_valid_record_round_trips_unchanged() {
    let record = Record::from_value(&valid()).expect("valid");
    assert_eq!(record.seq, 7);
    assert_eq!(record.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    let again: Value = serde_json::from_str(&record.to_json()).expect("json");
    assert_eq!(again, valid());
}

#[test]
fn traceparent_is_optional() {
    let record = Record::from_value(&without("traceparent")).expect("valid");
    assert_eq!(record.traceparent, None);
    assert!(!record.to_json().contains("traceparent"));
}

#[test]
fn a_new_record_is_valid_and_carries_the_hash_of_its_own_timestamp() {
    let at = parse_timestamp("2026-11-22T04:00:00.123Z").expect("ts");
    let record = Record::new("gen-1", 1, at, 93, Some(new_traceparent()));
    assert_eq!(record.hash, "59");
    let parsed = Record::from_json(&record.to_json()).expect("valid");
    assert_eq!(parsed, record);
}

#[test]
fn every_invalid_class_is_rejected_with_a_reason_naming_the_field() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("not an object", json!([1]), "record"),
        ("a string", json!("hello"), "record"),
        ("missing id", without("id"), "id"),
        ("missing source", without("source"), "source"),
        ("missing seq", without("seq"), "seq"),
        ("missing timestamp", without("timestamp"), "timestamp"),
        ("missing value", without("value"), "value"),
        ("missing hash", without("hash"), "hash"),
        ("unknown field", with("extra", json!(1)), "unknown"),
        ("id not a string", with("id", json!(5)), "id"),
        ("id not a uuid", with("id", json!("not-a-uuid")), "id"),
        (
            "id uppercase",
            with("id", json!("0193A5C2-7C1E-7D2A-8B3C-4D5E6F708192")),
            "id",
        ),
        (
            "id without hyphens",
            with("id", json!("0193a5c27c1e7d2a8b3c4d5e6f708192")),
            "id",
        ),
        ("source empty", with("source", json!("")), "source"),
        (
            "source too long",
            with("source", json!("a".repeat(65))),
            "source",
        ),
        ("source bad char", with("source", json!("gen 1")), "source"),
        ("source not a string", with("source", json!(null)), "source"),
        ("seq zero", with("seq", json!(0)), "seq"),
        ("seq negative", with("seq", json!(-3)), "seq"),
        ("seq fractional", with("seq", json!(1.5)), "seq"),
        ("seq a string", with("seq", json!("7")), "seq"),
        (
            "seq too large for bigint",
            with("seq", json!(u64::MAX)),
            "seq",
        ),
        (
            "timestamp no millis",
            with("timestamp", json!("2026-11-22T04:00:00Z")),
            "timestamp",
        ),
        (
            "timestamp offset",
            with("timestamp", json!("2026-11-22T04:00:00.123+00:00")),
            "timestamp",
        ),
        (
            "timestamp micros",
            with("timestamp", json!("2026-11-22T04:00:00.123456Z")),
            "timestamp",
        ),
        (
            "timestamp impossible date",
            with("timestamp", json!("2026-02-30T04:00:00.123Z")),
            "timestamp",
        ),
        (
            "timestamp garbage",
            with("timestamp", json!("yesterday")),
            "timestamp",
        ),
        (
            "timestamp a number",
            with("timestamp", json!(1_700_000_000)),
            "timestamp",
        ),
        ("value above 100", with("value", json!(101)), "value"),
        ("value negative", with("value", json!(-1)), "value"),
        ("value huge", with("value", json!(100_000)), "value"),
        ("value fractional", with("value", json!(93.0)), "value"),
        ("value a string", with("value", json!("93")), "value"),
        ("hash mismatch", with("hash", json!("58")), "hash"),
        ("hash uppercase", with("hash", json!("5A")), "hash"),
        ("hash too long", with("hash", json!("059")), "hash"),
        ("hash not hex", with("hash", json!("zz")), "hash"),
        ("hash a number", with("hash", json!(59)), "hash"),
        (
            "traceparent malformed",
            with("traceparent", json!("00-abc-def-01")),
            "traceparent",
        ),
        (
            "traceparent zero trace id",
            with(
                "traceparent",
                json!(format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32))),
            ),
            "traceparent",
        ),
        (
            "traceparent not a string",
            with("traceparent", json!(1)),
            "traceparent",
        ),
    ];
    for (name, input, field) in cases {
        let err = Record::from_value(&input).expect_err(name);
        assert_eq!(err.field(), field, "{name}: {err}");
        let text = err.to_string();
        if field != "record" && field != "unknown" {
            assert!(text.contains(&format!("`{field}`")), "{name}: {text}");
        }
    }
}

#[test]
fn a_value_whose_hash_matches_another_value_is_still_checked_against_its_own() {
    // The hash of value 0 at the same timestamp is "13"; value 93 with "13" must fail.
    let err = Record::from_value(&with("hash", json!("13"))).expect_err("mismatch");
    assert!(err.to_string().contains("expected \"59\""), "{err}");
}

#[test]
fn invalid_json_text_is_a_record_error() {
    let err = Record::from_json("{not json").expect_err("invalid");
    assert_eq!(err.field(), "record");
}

#[test]
fn timestamps_are_formatted_with_milliseconds_and_z() {
    let at = parse_timestamp("2026-11-22T04:00:00.120Z").expect("ts");
    assert_eq!(format_timestamp(at), "2026-11-22T04:00:00.120Z");
}

/// The hand-written timestamp parser accepts exactly what chrono's `%Y-%m-%dT%H:%M:%S%.3f`
/// (with the `Z` and millisecond checks) accepts, except where chrono is laxer than the
/// contract's form: a signed year (`-026`), a space-padded field (`- 1`) or a leap second
/// (`:60`), all of which the parser refuses.
#[test]
fn the_timestamp_parser_agrees_with_chrono_on_every_single_character_change() {
    fn by_chrono(text: &str) -> Option<DateTime<Utc>> {
        let bytes = text.as_bytes();
        if bytes.len() != 24 || bytes[19] != b'.' || bytes[23] != b'Z' {
            return None;
        }
        if !bytes[20..23].iter().all(u8::is_ascii_digit)
            || !bytes[..4].iter().all(u8::is_ascii_digit)
        {
            return None;
        }
        NaiveDateTime::parse_from_str(&text[..23], "%Y-%m-%dT%H:%M:%S%.3f")
            .ok()
            .map(|naive| naive.and_utc())
    }
    let seeds = [
        "2026-11-22T04:00:00.123Z",
        "2024-02-29T23:59:59.999Z",
        "2023-02-28T00:00:00.000Z",
        "1999-12-31T12:30:45.500Z",
    ];
    let alphabet = b"0123456789-:T.Z +x";
    let mut compared = 0;
    for seed in seeds {
        assert_eq!(parse_timestamp(seed), by_chrono(seed), "{seed}");
        for position in 0..seed.len() {
            for &c in alphabet {
                let mut bytes = seed.as_bytes().to_vec();
                bytes[position] = c;
                let digits_where_digits_belong = [0..4, 5..7, 8..10, 11..13, 14..16, 17..19]
                    .into_iter()
                    .all(|range| bytes[range].iter().all(u8::is_ascii_digit));
                let text = String::from_utf8(bytes).expect("ASCII");
                if !digits_where_digits_belong {
                    assert_eq!(
                        parse_timestamp(&text),
                        None,
                        "{text}: not the contract's form"
                    );
                    continue;
                }
                if text.get(17..19) == Some("60") {
                    assert_eq!(parse_timestamp(&text), None, "{text}: leap second refused");
                    continue;
                }
                assert_eq!(parse_timestamp(&text), by_chrono(&text), "{text}");
                compared += 1;
            }
        }
    }
    assert!(compared > 500, "only {compared} compared");
    for invalid in [
        "2026-02-30T00:00:00.000Z",
        "2026-13-01T00:00:00.000Z",
        "2026-11-22T24:00:00.000Z",
        "2026-11-22T04:60:00.000Z",
        "2026-11-22T04:00:00.123+",
        "2026-11-22 04:00:00.123Z",
    ] {
        assert_eq!(parse_timestamp(invalid), None, "{invalid}");
    }
}

#[test]
fn hashes_of_every_value_match_the_formatted_md5() {
    for value in 0..=MAX_VALUE {
        let timestamp = "2026-11-22T04:00:00.123Z";
        let digest = md5::compute(format!("{timestamp}|{value}"));
        assert_eq!(
            record_hash(timestamp, value),
            format!("{:02x}", digest.0[15]),
            "value {value}"
        );
    }
}

/// The typed shortcut of `from_json` and the `Value` path give the same answer for every
/// field replaced by every kind of JSON value, for missing fields, unknown and duplicated keys
/// and escaped strings.
#[test]
fn the_shortcut_and_the_value_path_agree_on_every_variation() {
    let replacements = [
        json!(null),
        json!(true),
        json!(0),
        json!(-1),
        json!(7),
        json!(100),
        json!(101),
        json!(93.0),
        json!(u64::MAX),
        json!(""),
        json!("59"),
        json!("x"),
        json!("0193A5C2-7C1E-7D2A-8B3C-4D5E6F708192"),
        json!("0193a5c27c1e7d2a8b3c4d5e6f708192"),
        json!("2026-11-22T04:00:00.123Z"),
        json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        json!([]),
        json!({}),
    ];
    let mut texts = vec![valid().to_string()];
    for field in FIELDS {
        texts.push(without(field).to_string());
        for replacement in &replacements {
            texts.push(with(field, replacement.clone()).to_string());
        }
    }
    texts.push(with("extra", json!(1)).to_string());
    // Escapes force owned strings in the shortcut; a duplicated key makes it step aside.
    texts.push(valid().to_string().replace("gen-1", "gen\\u002d1"));
    texts.push(valid().to_string().replacen('{', "{\"seq\":1,", 1));
    for text in texts {
        let by_value = Record::from_value(&serde_json::from_str(&text).expect("JSON"));
        assert_eq!(Record::from_json(&text), by_value, "{text}");
    }
}

#[test]
fn new_ids_are_distinct_v7_uuids_carrying_their_millisecond() {
    let at = parse_timestamp("2026-11-22T04:00:00.123Z").expect("ts");
    let ids: std::collections::HashSet<uuid::Uuid> = (0..10_000).map(|_| new_id(at)).collect();
    assert_eq!(
        ids.len(),
        10_000,
        "no two ids alike, even within one millisecond"
    );
    for id in ids.iter().take(10) {
        assert_eq!(id.get_version_num(), 7);
        let (seconds, nanos) = id.get_timestamp().expect("v7 has a timestamp").to_unix();
        assert_eq!((seconds, nanos / 1_000_000), (at.timestamp() as u64, 123));
    }
}

/// The straightforward reading of the `traceparent` rule, which [`is_traceparent`] must match.
fn traceparent_by_parts(text: &str) -> bool {
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

mod written_by_hand {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn to_json_is_what_serde_writes(
            source in "[A-Za-z0-9._\"\\\\\u{1}é-]{1,20}",
            seq in 1u64..=MAX_SEQ,
            value in 0u8..=100,
            ms in 0i64..4_000_000_000_000,
            traced in any::<bool>(),
        ) {
            let at = chrono::DateTime::from_timestamp_millis(ms).expect("in range");
            let traceparent = traced.then(new_traceparent);
            let record = Record::new(&source, seq, at, value, traceparent);
            let by_hand = record.to_json();
            prop_assert_eq!(&by_hand, &serde_json::to_string(&record).expect("serde"));
            let back: Record = serde_json::from_str(&by_hand).expect("parses");
            prop_assert_eq!(back, record);
        }

        #[test]
        fn the_timestamp_is_what_chrono_writes(
            secs in -70_000_000_000i64..300_000_000_000,
            nanos in 0u32..2_000_000_000,
        ) {
            // Years from before 0 to after 9999, and leap-second nanos, where chrono takes over.
            if let Some(at) = chrono::DateTime::from_timestamp(secs, nanos) {
                prop_assert_eq!(
                    format_timestamp(at),
                    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                );
            }
        }

        #[test]
        fn a_new_traceparent_is_well_formed_and_random(_case in 0u8..8) {
            let (a, b) = (new_traceparent(), new_traceparent());
            prop_assert!(is_traceparent(&a), "{}", a);
            prop_assert!(traceparent_by_parts(&a), "{}", a);
            prop_assert!(a.starts_with("00-") && a.ends_with("-01"), "{}", a);
            prop_assert_ne!(a, b);
        }

        #[test]
        fn the_one_pass_traceparent_check_is_the_rule(
            shape in "(0[0-9a-g]|[0-9a-fA-F]{2})-[0-9a-fA-F-]{30,34}-[0-9a-f0]{14,17}-[0-9a-fg]{1,3}",
        ) {
            prop_assert_eq!(is_traceparent(&shape), traceparent_by_parts(&shape), "{}", shape);
        }
    }

    #[test]
    fn edge_traceparents_agree() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for text in [
            good,
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(is_traceparent(text), traceparent_by_parts(text), "{text}");
        }
        assert!(is_traceparent(good));
    }
}
