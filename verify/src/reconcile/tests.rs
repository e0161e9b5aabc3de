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
        file: records
            .iter()
            .filter(|r| Routing::DEFAULT.destination(r) == Destination::File)
            .cloned()
            .collect(),
        postgres: records
            .iter()
            .filter(|r| Routing::DEFAULT.destination(r) == Destination::Broker)
            .cloned()
            .collect(),
        mongo: None,
    }
}

#[test]
fn a_clean_run_reconciles() {
    let report = reconcile("v", Some(50), &clean(50), Rules::default());
    assert!(report.is_ok(), "{}", report.render());
    assert!(report.render().contains("skipped: no MongoDB"));
}

#[test]
fn a_deleted_row_is_named() {
    let mut observed = clean(50);
    observed.postgres.retain(|r| r.seq != 14);
    let report = reconcile("v", Some(50), &observed, Rules::default());
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
    let report = reconcile("v", Some(50), &observed, Rules::default());
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
    let report = reconcile("v", Some(20), &observed, Rules::default());
    assert_eq!(report.file.duplicated, BTreeSet::from([1]));
    assert_eq!(report.file.wrong_place, BTreeSet::from([7]));
    assert_eq!(report.file.bad_hash, BTreeSet::from([2]));
}

#[test]
fn a_missing_expected_tail_is_lost() {
    let report = reconcile("v", Some(55), &clean(50), Rules::default());
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
    let mut mixed = GroupDoc::new(high.clone(), 1, now);
    mixed.records.push(low.clone());
    assert!(group_problem(&mixed, 2, DEFAULT_MAX_NEST).is_some_and(|why| why.contains("nested")));
    let good = GroupDoc::new(high.clone(), 1, now);
    assert_eq!(group_problem(&good, 1, DEFAULT_MAX_NEST), None);
    assert!(group_problem(&good, 3, DEFAULT_MAX_NEST).is_some_and(|why| why.contains("count")));
    let mut full = GroupDoc::new(high.clone(), 1, now);
    full.records.push(high.clone());
    assert!(group_problem(&full, 2, DEFAULT_MAX_NEST).is_some_and(|why| why.contains("twice")));
    let mut plain = GroupDoc::new(low.clone(), 1, now);
    plain.records.push(low.clone());
    assert!(group_problem(&plain, 2, DEFAULT_MAX_NEST).is_some());
    let mut mixed_sources = GroupDoc::new(high.clone(), 1, now);
    mixed_sources.records.push(Record {
        source: "other".into(),
        ..high.clone()
    });
    assert!(
        group_problem(&mixed_sources, 2, DEFAULT_MAX_NEST)
            .is_some_and(|why| why.contains("source"))
    );
}

#[test]
fn verify_follows_the_routing_rule_it_is_given() {
    // Stored as a filter with threshold 50 would store them.
    let rule = Routing::broker_above(50);
    let records: Vec<Record> = (1..=30).map(|s| rec(s, (s * 3) as u8)).collect();
    let observed = Observed {
        file: records
            .iter()
            .filter(|r| rule.destination(r) == Destination::File)
            .cloned()
            .collect(),
        postgres: records
            .iter()
            .filter(|r| rule.destination(r) == Destination::Broker)
            .cloned()
            .collect(),
        mongo: None,
    };
    let moved = Rules {
        routing: rule,
        ..Rules::default()
    };
    let report = reconcile("v", Some(30), &observed, moved);
    assert!(report.is_ok(), "{}", report.render());
    // The same stores judged by the default rule: values 51..=90 are in the wrong place.
    let report = reconcile("v", Some(30), &observed, Rules::default());
    let misplaced: BTreeSet<u64> = (17..=30).collect();
    assert_eq!(report.postgres.wrong_place, misplaced);
}

#[test]
fn a_nested_run_split_in_two_is_reported_and_a_correct_partition_is_not() {
    let highs: Vec<Record> = (0..)
        .map(|i| rec(300 + i, 95))
        .filter(|r| nests(&r.hash))
        .take(3)
        .collect();
    let now = chrono::Utc::now();
    let mut whole = GroupDoc::new(highs[0].clone(), 1, now);
    whole.records.extend(highs[1..].iter().cloned());
    let verdict = partition_problem("v", &[(whole.clone(), 3)], 100);
    assert_eq!(
        verdict,
        None,
        "{:?}",
        highs.iter().map(|r| &r.hash).collect::<Vec<_>>()
    );
    // The same run stored as two groups although the first was not full: a wrongly recovered
    // open group.
    let mut first = GroupDoc::new(highs[0].clone(), 1, now);
    first.records.push(highs[1].clone());
    let second = GroupDoc::new(highs[2].clone(), 2, now);
    let first_id = first.id.clone();
    let problem = partition_problem("v", &[(first, 2), (second.clone(), 1)], 100);
    assert!(problem.is_some_and(|(id, why)| id == first_id && why.contains("nesting rule")));
    // With max_nest 2 that split is exactly the rule.
    let mut full = GroupDoc::new(highs[0].clone(), 1, now);
    full.records.push(highs[1].clone());
    assert_eq!(partition_problem("v", &[(full, 2), (second, 1)], 2), None);
}
