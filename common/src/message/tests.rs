use super::*;
use crate::record::Provenance;
use crate::topology::{CONTENT_TYPE_JSON, HEADER_SEQ, HEADER_SOURCE};

fn record(seq: u64, value: u8) -> Record {
    let mut record = Record::new(
        "gen-a",
        seq,
        chrono::Utc::now(),
        value,
        Some(crate::record::new_traceparent()),
    );
    record.provenance = Some(Provenance {
        version: "v7".into(),
        route: Some("broker".into()),
    });
    record
}

fn header(properties: &BasicProperties, key: &str) -> Option<AMQPValue> {
    properties.headers().as_ref()?.inner().get(key).cloned()
}

#[test]
fn one_record_is_a_record_message_as_before() {
    let one = record(1, 95);
    let (body, properties) = encode(std::slice::from_ref(&one));
    assert_eq!(body, one.to_json().into_bytes());
    assert_eq!(
        properties.content_type().as_ref().map(|t| t.as_str()),
        Some(CONTENT_TYPE_JSON)
    );
    assert!(!is_packed(&properties));
    assert_eq!(records_hint(&properties), 1);
    assert_eq!(
        header(&properties, HEADER_SEQ),
        Some(AMQPValue::LongLongInt(1))
    );
    let decoded = decode(&properties, &body).expect("a record");
    assert_eq!(decoded.records, vec![one]);
    assert!(decoded.invalid.is_empty());
}

#[test]
fn several_records_travel_packed_and_read_back_in_order_with_their_provenance() {
    let records: Vec<Record> = (1..=5).map(|seq| record(seq, 90 + seq as u8)).collect();
    let (body, properties) = encode(&records);
    assert!(is_packed(&properties));
    assert_eq!(records_hint(&properties), 5);
    assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        properties.message_id().as_ref().map(|s| s.as_str()),
        Some(records[0].id.as_str())
    );
    assert_eq!(
        header(&properties, HEADER_SOURCE),
        None,
        "source is per line"
    );
    let text = String::from_utf8(body.clone()).expect("utf-8");
    assert_eq!(text.lines().count(), 5);
    assert!(!text.ends_with('\n'));
    let decoded = decode(&properties, &body).expect("records");
    assert_eq!(
        decoded.records, records,
        "same records, same order, provenance kept"
    );
    let mut trailing = body.clone();
    trailing.push(b'\n');
    let decoded = decode(&properties, &trailing).expect("records");
    assert_eq!(decoded.records, records, "a trailing newline adds no line");
    assert!(decoded.invalid.is_empty());
}

#[test]
fn a_packed_message_s_bad_lines_are_named_and_the_rest_still_read() {
    let records: Vec<Record> = (1..=3).map(|seq| record(seq, 95)).collect();
    let (_, properties) = encode(&records);
    let mut forged = records[1].clone();
    forged.hash = "zz".into();
    let body = format!(
        "{}\nnot json\n{}\n{}",
        records[0].to_json(),
        forged.to_json(),
        records[2].to_json()
    );
    let decoded = decode(&properties, body.as_bytes()).expect("two valid lines");
    assert_eq!(
        decoded.records,
        vec![records[0].clone(), records[2].clone()]
    );
    let lines: Vec<usize> = decoded.invalid.iter().map(|bad| bad.line).collect();
    assert_eq!(lines, vec![2, 3]);
    assert_eq!(decoded.invalid[0].text, "not json");
    assert!(
        decoded.invalid[1].reason.contains("hash"),
        "{:?}",
        decoded.invalid[1]
    );
}

#[test]
fn a_message_with_nothing_storable_is_refused_whole() {
    let (_, packed) = encode(&[record(1, 95), record(2, 96)]);
    let (_, single) = encode(&[record(3, 97)]);
    for (properties, body) in [
        (&packed, &b""[..]),
        (&packed, &b"\n"[..]),
        (&packed, &b"junk\n{}"[..]),
        (&packed, &[0xff, 0xfe][..]),
        (&single, &b"junk"[..]),
        (&single, &b"{\"id\":1}"[..]),
    ] {
        assert!(
            decode(properties, body).is_err(),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
    let line = record(4, 95).to_json();
    let too_long = vec![line.as_str(); MAX_PACKED + 1].join("\n");
    let err = decode(&packed, too_long.as_bytes()).expect_err("over the cap");
    assert!(err.contains("more than"), "{err}");
    let at_cap = vec![line.as_str(); MAX_PACKED].join("\n");
    assert_eq!(
        decode(&packed, at_cap.as_bytes())
            .expect("at the cap")
            .records
            .len(),
        MAX_PACKED
    );
}

#[test]
fn a_lying_count_header_only_sizes_batches_within_bounds() {
    for (claimed, hint) in [(0i64, 1usize), (-5, 1), (3, 3), (1 << 40, MAX_PACKED)] {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_RECORDS.into(), AMQPValue::LongLongInt(claimed));
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE_PACKED.into())
            .with_headers(headers);
        assert_eq!(records_hint(&properties), hint, "claimed {claimed}");
    }
}
