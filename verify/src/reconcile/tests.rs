//! Reconciliation catches every kind of damage, and names the seqs.

use super::*;

fn rec(seq: u64, value: u8) -> Record {
    let at = flowmesh_common::record::parse_timestamp("2026-11-22T04:00:00.123Z").expect("ts")
        + chrono::Duration::milliseconds(seq as i64);
    Record::new("v", seq, at, value, None)
}

fn clean(n: u64) -> Observed {
    let records: Vec<Record> = (1..=n)
        .map(|s| rec(s, if s % 7 == 0 { 95 } else { 40 }))
        .collect();
    Observed {
        file: records.iter().filter(|r| r.value <= 90).cloned().collect(),
        postgres: records.iter().filter(|r| r.value > 90).cloned().collect(),
        mongo: None,
    }
}

#[test]
fn a_clean_run_reconciles() {
    let report = reconcile("v", Some(50), &clean(50), 100);
    assert!(report.is_ok(), "{}", report.render());
    assert!(report.render().contains("skipped: no MongoDB"));
}

#[test]
fn a_deleted_row_is_named() {
    let mut observed = clean(50);
    observed.postgres.retain(|r| r.seq != 14);
    let report = reconcile("v", Some(50), &observed, 100);
    assert!(!report.is_ok());
    assert_eq!(report.lost, BTreeSet::from([14]));
    assert!(
        report.render().contains("lost everywhere: 14"),
        "{}",
        report.render()
    );
}

#[test]
fn a_deleted_line_is_named() {
    let mut observed = clean(50);
    observed.file.retain(|r| r.seq != 3);
    let report = reconcile("v", Some(50), &observed, 100);
    assert_eq!(report.lost, BTreeSet::from([3]));
}

#[test]
fn duplicates_wrong_places_and_bad_hashes_are_each_found() {
    let mut observed = clean(20);
    observed.file.push(rec(1, 40));
    observed.file.push(rec(7, 95));
    let mut tampered = rec(2, 40);
    tampered.hash = "zz".into();
    observed.file.retain(|r| r.seq != 2);
    observed.file.push(tampered);
    let report = reconcile("v", Some(20), &observed, 100);
    assert_eq!(report.file.duplicated, BTreeSet::from([1]));
    assert_eq!(report.file.wrong_place, BTreeSet::from([7]));
    assert_eq!(report.file.bad_hash, BTreeSet::from([2]));
}

#[test]
fn a_missing_expected_tail_is_lost() {
    let report = reconcile("v", Some(55), &clean(50), 100);
    assert_eq!(report.lost, (51..=55).collect());
}

#[test]
fn groups_that_break_the_rule_are_reported() {
    let high = (0..)
        .map(|i| rec(100 + i, 95))
        .find(|r| nests(&r.hash))
        .expect("a high hash");
    let low = (0..)
        .map(|i| rec(200 + i, 95))
        .find(|r| !nests(&r.hash))
        .expect("a low hash");
    let now = chrono::Utc::now();
    let mut mixed = GroupDoc::new(high.clone(), now);
    mixed.records.push(low.clone());
    assert!(group_problem(&mixed, 2, 100).is_some_and(|why| why.contains("nested")));
    let good = GroupDoc::new(high.clone(), now);
    assert_eq!(group_problem(&good, 1, 100), None);
    assert!(group_problem(&good, 3, 100).is_some_and(|why| why.contains("count")));
    let mut full = GroupDoc::new(high.clone(), now);
    full.records.push(high.clone());
    assert!(group_problem(&full, 2, 100).is_some_and(|why| why.contains("twice")));
    let mut plain = GroupDoc::new(low.clone(), now);
    plain.records.push(low);
    assert!(group_problem(&plain, 2, 100).is_some());
}
