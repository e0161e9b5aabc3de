//! The planner on hand-picked streams: the edges of the rule.

use super::*;

pub(crate) fn rec(seq: u64, hash: &str) -> Record {
    Record {
        id: format!("00000000-0000-7000-8000-{seq:012x}"),
        source: "t".into(),
        seq,
        timestamp: "2026-11-22T04:00:00.000Z".into(),
        value: 95,
        hash: hash.into(),
        traceparent: None,
        provenance: None,
    }
}

/// The planner over one source ("t"), continuing from `open`.
fn plan_t(
    open: Option<OpenGroup>,
    records: &[Record],
    max_nest: usize,
) -> (Vec<Op>, Option<OpenGroup>) {
    let mut groups = OpenGroups::from([("t".to_owned(), open)]);
    let mut wseq = 1;
    let ops = plan(&mut groups, records, max_nest, &mut wseq, Utc::now());
    (ops, groups.remove("t").flatten())
}

fn shapes(ops: &[Op]) -> Vec<(bool, Vec<u64>)> {
    ops.iter()
        .map(|op| match op {
            Op::Insert(doc) => (doc.nested, doc.records.iter().map(|r| r.seq).collect()),
            Op::Append(append) => (true, append.records.iter().map(|r| r.seq).collect()),
        })
        .collect()
}

#[test]
fn the_comparison_is_a_plain_string_comparison_with_99() {
    for low in ["00", "09", "90", "99", "5f"] {
        assert!(!nests(low), "{low}");
    }
    for high in ["9a", "9f", "a0", "ff"] {
        assert!(nests(high), "{high}");
    }
}

#[test]
fn low_hashes_each_get_their_own_plain_document() {
    let (ops, open) = plan_t(None, &[rec(1, "00"), rec(2, "99")], 100);
    assert_eq!(shapes(&ops), vec![(false, vec![1]), (false, vec![2])]);
    assert_eq!(open.map(|g| (g.nested, g.count)), Some((false, 1)));
}

#[test]
fn consecutive_high_hashes_share_one_nested_document() {
    let records = [
        rec(1, "00"),
        rec(2, "9a"),
        rec(3, "ff"),
        rec(4, "a0"),
        rec(5, "10"),
        rec(6, "fe"),
    ];
    let (ops, _) = plan_t(None, &records, 100);
    assert_eq!(
        shapes(&ops),
        vec![
            (false, vec![1]),
            (true, vec![2, 3, 4]),
            (false, vec![5]),
            (true, vec![6])
        ]
    );
}

#[test]
fn a_full_group_closes_and_the_next_high_hash_starts_a_new_one() {
    let records: Vec<Record> = (1..=5).map(|s| rec(s, "ab")).collect();
    let (ops, open) = plan_t(None, &records, 2);
    assert_eq!(
        shapes(&ops),
        vec![(true, vec![1, 2]), (true, vec![3, 4]), (true, vec![5])]
    );
    assert_eq!(open.map(|g| g.count), Some(1));
}

/// An open group `id` of one record, written by the first operation.
fn one_record_group(id: &str, nested: bool) -> Option<OpenGroup> {
    Some(OpenGroup {
        id: id.into(),
        nested,
        count: 1,
        wseq: 0,
    })
}

#[test]
fn a_batch_continues_the_open_group_of_the_previous_one() {
    let open = one_record_group("g", true);
    let (ops, open) = plan_t(open, &[rec(7, "cc"), rec(8, "dd")], 3);
    assert!(
        matches!(&ops[..], [Op::Append(Append { id, seen: (1, 0), records, .. })] if id == "g" && records.len() == 2)
    );
    assert_eq!(open.map(|g| g.count), Some(3));
}

#[test]
fn a_high_hash_after_an_open_plain_group_starts_a_nested_one() {
    let open = one_record_group("p", false);
    let (ops, _) = plan_t(open, &[rec(9, "ee")], 100);
    assert_eq!(shapes(&ops), vec![(true, vec![9])]);
}

#[test]
fn a_group_is_named_after_its_first_record() {
    let (ops, _) = plan_t(None, &[rec(3, "fa"), rec(4, "fb")], 100);
    match &ops[0] {
        Op::Insert(doc) => assert_eq!(doc.id, rec(3, "fa").id),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sources_nest_independently_and_never_share_a_group() {
    let of = |source: &str, seq: u64, hash: &str| Record {
        source: source.into(),
        ..rec(seq, hash)
    };
    // a's high-hash run continues across b's records; b's runs are its own.
    let records = [
        of("a", 1, "aa"),
        of("b", 2, "bb"),
        of("a", 3, "cc"),
        of("b", 4, "10"),
        of("a", 5, "dd"),
    ];
    let mut open = OpenGroups::new();
    let mut wseq = 7;
    let ops = plan(&mut open, &records, 100, &mut wseq, Utc::now());
    let groups: Vec<(String, Vec<u64>)> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Insert(doc) => Some((
                doc.source.clone(),
                doc.records.iter().map(|r| r.seq).collect(),
            )),
            Op::Append(_) => None,
        })
        .collect();
    assert_eq!(
        groups,
        vec![
            ("a".into(), vec![1]),
            ("b".into(), vec![2]),
            ("b".into(), vec![4])
        ]
    );
    let appended: Vec<u64> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Append(append) => Some(append.records.iter().map(|r| r.seq)),
            Op::Insert(_) => None,
        })
        .flatten()
        .collect();
    assert_eq!(appended, vec![3, 5]);
    assert_eq!(open["a"].as_ref().map(|g| g.count), Some(3));
    // Every operation got its own write sequence, strictly increasing.
    assert_eq!(wseq, 7 + ops.len() as u64);
}
