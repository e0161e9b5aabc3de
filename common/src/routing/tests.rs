use super::*;
use crate::record::record_hash;
use proptest::prelude::*;

fn record(value: u8, timestamp: &str, seq: u64, source: &str) -> Record {
    Record {
        id: "018f3c1e-0000-7000-8000-000000000001".into(),
        source: source.into(),
        seq,
        timestamp: timestamp.into(),
        value,
        hash: record_hash(timestamp, value),
        traceparent: None,
        provenance: None,
    }
}

fn routes(when: &str) -> Routes {
    Routes::parse(&format!(
        "[[route]]\nname = \"a\"\nwhen = {when:?}\nto = \"broker\"\n[[route]]\nname = \"b\"\nto = \"file\"\n"
    ))
    .unwrap_or_else(|e| panic!("{when}: {e}"))
}

fn refusal(text: &str) -> String {
    Routes::parse(text).expect_err("refused").0
}

#[test]
fn the_builtin_routes_send_only_values_above_ninety_to_the_broker() {
    let builtin = Routes::builtin();
    assert_eq!(builtin.names(), ["hot", "rest"]);
    assert_eq!(builtin.version(), Routes::builtin_version());
    assert_eq!(builtin.version().len(), 12);
    for value in 0..=100u8 {
        let expected = if value > 90 {
            Destination::Broker
        } else {
            Destination::File
        };
        let r = record(value, "2026-12-01T00:00:00.000Z", 1, "s");
        assert_eq!(builtin.destination(&r), expected, "{value}");
        assert_eq!(
            builtin.choose(&r).route.name(),
            if value > 90 { "hot" } else { "rest" }
        );
    }
}

#[test]
fn the_first_matching_route_wins() {
    let routes = Routes::parse(
        "[[route]]\nname = \"low\"\nwhen = \"value < 10\"\nto = \"file\"\n[[route]]\nname = \"low-too\"\nwhen = \"value < 20\"\nto = \"broker\"\n[[route]]\nname = \"rest\"\nto = \"broker\"\n",
    )
    .expect("parses");
    let at = |value| routes.choose(&record(value, "2026-12-01T00:00:00.000Z", 1, "s"));
    assert_eq!(at(5).route.name(), "low");
    assert_eq!(at(5).index, 0);
    assert_eq!(at(15).route.name(), "low-too");
    assert_eq!(at(50).route.name(), "rest");
    assert_eq!(at(50).route.to(), Destination::Broker);
}

#[test]
fn the_version_is_a_hash_of_the_exact_text() {
    let a = routes("value > 80");
    let b = routes("value > 81");
    assert_ne!(a.version(), b.version());
    assert_eq!(a.version(), version_of(a.text()));
    assert_eq!(routes("value > 80").version(), a.version());
}

#[test]
fn bad_files_are_refused_with_the_route_and_position() {
    /// Two routes, "hot" to the broker `when`, and "rest" to the file.
    fn hot_when(when: &str) -> String {
        format!(
            "[[route]]\nname = \"hot\"\nwhen = \"{when}\"\nto = \"broker\"\n[[route]]\nname = \"rest\"\nto = \"file\"\n"
        )
    }
    // Each file, and what its refusal must say.
    let cases: Vec<(String, &[&str])> = vec![
        (hot_when("value >"), &["route \"hot\"", "line 1 column"]),
        (hot_when("value > 'x'"), &["route \"hot\"", "bool"]),
        (hot_when("value + 1"), &["not a bool"]),
        (hot_when("colour == 'red'"), &["`colour`", "column 1"]),
        (
            "[[route]]\nname = \"hot\"\nwhen = \"value > 1\"\nto = \"broker\"\n".into(),
            &["last route"],
        ),
        (
            "[[route]]\nname = \"all\"\nto = \"broker\"\n[[route]]\nname = \"rest\"\nto = \"file\"\n".into(),
            &["route \"all\"", "only the last"],
        ),
        (
            "[[route]]\nname = \"a\"\nwhen = \"value > 1\"\nto = \"broker\"\n[[route]]\nname = \"a\"\nto = \"file\"\n".into(),
            &["used twice"],
        ),
        ("[[route]]\nname = \"Hot Route\"\nto = \"file\"\n".into(), &["a-z"]),
        (
            "[[route]]\nname = \"a\"\nto = \"disk\"\n".into(),
            &["not a valid routes file", "line"],
        ),
        ("[[route]]\nname = \"a\"\nto = \"file\"\nextra = 1\n".into(), &["extra"]),
    ];
    for (text, says) in cases {
        let e = refusal(&text);
        assert!(says.iter().all(|s| e.contains(s)), "{text:?}: {e}");
    }
    assert!(refusal("").contains("no [[route]]"));
    assert!(refusal(&"#".repeat(MAX_TEXT_BYTES + 1)).contains("at most"));
}

#[test]
fn comprehension_variables_are_not_record_fields() {
    let r = routes("['aa', 'ff'].exists(h, h == hash)");
    let hit = Record {
        hash: "ff".into(),
        ..record(1, "2026-12-01T00:00:00.000Z", 1, "s")
    };
    assert_eq!(r.choose(&hit).route.name(), "a");
}

#[test]
fn simple_comparisons_run_natively_and_others_through_cel() {
    let native = |when: &str| {
        routes(when).routes()[0]
            .when
            .as_ref()
            .expect("when")
            .native
            .is_some()
    };
    assert!(native("value > 90"));
    assert!(native("value > 80 || hash >= 'f0'"));
    assert!(native("!(10 <= value) && source != 'x'"));
    assert!(!native("source.startsWith('gen')"));
    assert!(!native("value > 90u"));
    assert!(!native("seq % 2 == 0"));
}

/// Expressions the native predicate handles, each checked against CEL itself.
const NATIVE: &[&str] = &[
    "value > 90",
    "value >= 90",
    "value < 10",
    "value <= 10",
    "value == 50",
    "value != 50",
    "90 < value",
    "value > 80 || hash >= 'f0'",
    "value < 10 && hash < '80'",
    "!(value > 50)",
    "seq > 100 || source == 'b'",
    "timestamp >= '2026-06-01T00:00:00.000Z'",
    "id != '018f3c1e-0000-7000-8000-000000000001' || true",
    "hash == 'ff' || hash > '99' && value <= 3",
    "false || value == 0",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_builtin_routes_give_exactly_the_old_rule(value in 0u8..=100, ms in 0i64..4_000_000_000_000, seq in 1u64..u64::MAX / 2) {
        let at = chrono::DateTime::from_timestamp_millis(ms).expect("in range");
        let r = record(value, &crate::record::format_timestamp(at), seq, "src");
        let old = if value > 90 { Destination::Broker } else { Destination::File };
        prop_assert_eq!(Routes::builtin().destination(&r), old);
    }

    #[test]
    fn the_native_predicate_agrees_with_cel(value in 0u8..=100, ms in 1_700_000_000_000i64..1_900_000_000_000, seq in 1u64..1000, source in "[ab]") {
        let at = chrono::DateTime::from_timestamp_millis(ms).expect("in range");
        let r = record(value, &crate::record::format_timestamp(at), seq, &source);
        for when in NATIVE {
            let routes = routes(when);
            let condition = routes.routes()[0].when.as_ref().expect("when");
            let native = condition.native.as_ref().expect("compiled natively");
            prop_assert_eq!(Ok(native.eval(&r)), condition.eval_cel(&r), "{}", when);
        }
    }
}
