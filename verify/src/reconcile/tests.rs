//! Reconciliation catches every kind of damage, and names the seqs.

use super::*;
use flowmesh_common::record::Provenance;

fn rec(seq: u64, value: u8) -> Record {
    let at = flowmesh_common::record::parse_timestamp("2026-11-22T04:00:00.123Z").expect("ts")
        + chrono::Duration::milliseconds(seq as i64);
    Record::new("v", seq, at, value, None)
}

fn pg(report: &Report) -> &StoreFindings {
    report.store("postgresql").expect("PostgreSQL checked")
}

/// These tests store the broker's records in PostgreSQL alone; MongoDB is not checked. (Not
/// `Observed::default()`, which follows the list of writers: a new writer changes nothing here.)
fn without_mongodb() -> Observed {
    Observed {
        file: Vec::new(),
        file_instance: Vec::new(),
        stores: vec![
            ("postgresql", Some(Held::Records(Vec::new()))),
            ("mongodb", None),
        ],
    }
}

fn clean(n: u64) -> Observed {
    let records: Vec<Record> = (1..=n)
        .map(|s| rec(s, if s % 7 == 0 { 95 } else { 40 }))
        .collect();
    let mut observed = without_mongodb();
    observed.file = records
        .iter()
        .filter(|r| Routes::builtin().destination(r) == Destination::File)
        .cloned()
        .collect();
    *observed.records_mut("postgresql") = records
        .iter()
        .filter(|r| Routes::builtin().destination(r) == Destination::Broker)
        .cloned()
        .collect();
    observed
}

#[test]
fn a_clean_run_reconciles() {
    let report = reconcile("v", Some(50), &clean(50), Rules::default());
    assert!(report.is_ok(), "{}", report.render());
    assert!(
        report
            .render()
            .contains("mongodb      skipped: not configured")
    );
}

#[test]
fn a_deleted_row_is_named() {
    let mut observed = clean(50);
    observed.records_mut("postgresql").retain(|r| r.seq != 14);
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

/// Two filters: the file-bound records 1..=20 split between them, and some in both (a
/// failover re-sent them). Those are reported with their ids and are not a fault; a record
/// twice in one filter's file still is.
#[test]
fn records_in_two_filters_files_are_reported_apart_and_twice_in_one_is_a_fault() {
    let mut observed = clean(20);
    let file = std::mem::take(&mut observed.file);
    // First filter: the first half; second filter: from the 6th file record on.
    let first: Vec<Record> = file[..file.len() / 2].to_vec();
    let second: Vec<Record> = file[5..].to_vec();
    let both: BTreeMap<u64, String> = first
        .iter()
        .filter(|r| second.iter().any(|s| s.seq == r.seq))
        .map(|r| (r.seq, r.id.clone()))
        .collect();
    assert!(!both.is_empty());
    observed.file_instance = [vec![0; first.len()], vec![1; second.len()]].concat();
    observed.file = [first.clone(), second].concat();
    let report = reconcile("v", Some(20), &observed, Rules::default());
    assert!(report.is_ok(), "{}", report.render());
    assert_eq!(report.across_filters, both);
    let first_id = both.values().next().expect("one");
    assert!(
        report.render().contains(first_id.as_str()),
        "{}",
        report.render()
    );
    assert_eq!(report.to_json()["across_filters"], both.len());

    // The same record twice in the first filter's file is a duplicate, as with one filter.
    observed.file.push(first[0].clone());
    observed.file_instance.push(0);
    let report = reconcile("v", Some(20), &observed, Rules::default());
    assert!(!report.is_ok());
    assert_eq!(report.file.duplicated, BTreeSet::from([first[0].seq]));
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

fn routes(when: &str) -> Arc<Routes> {
    Arc::new(
        Routes::parse(&format!(
            "[[route]]\nname = \"hot\"\nwhen = {when:?}\nto = \"broker\"\n[[route]]\nname = \"rest\"\nto = \"file\"\n"
        ))
        .expect("routes parse"),
    )
}

/// `records` stored as a filter running `routes` stores them: the file's records with the
/// version only, the broker's with the version and the route.
fn stored_by(routes: &Routes, records: &[Record], into: &mut Observed) {
    for record in records {
        let choice = routes.choose(record);
        let mut stored = record.clone();
        stored.provenance = Some(Provenance {
            version: routes.version().to_owned(),
            route: (choice.route.to() == Destination::Broker)
                .then(|| choice.route.name().to_owned()),
        });
        match choice.route.to() {
            Destination::File => into.file.push(stored),
            Destination::Broker => into.records_mut("postgresql").push(stored),
        }
    }
}

#[test]
fn verify_judges_each_record_by_the_routes_version_recorded_for_it() {
    let first = routes("value > 80 || hash >= 'f0'");
    let second = routes("value < 10");
    let records: Vec<Record> = (1..=200).map(|s| rec(s, (s % 101) as u8)).collect();
    let mut observed = without_mongodb();
    stored_by(&first, &records[..120], &mut observed);
    stored_by(&second, &records[120..], &mut observed);
    let rules = Rules::with_routes([first.clone(), second.clone()]);
    let report = reconcile("v", Some(200), &observed, rules.clone());
    assert!(report.is_ok(), "{}", report.render());
    assert!(
        observed.file.iter().any(|r| r.value > 80)
            && observed
                .records_mut("postgresql")
                .iter()
                .any(|r| r.value < 80)
    );

    // One record moved to the other store: wrong place there, missing where it belongs.
    let mut moved = observed.clone();
    let at = moved
        .records_mut("postgresql")
        .iter()
        .position(|r| r.value > 80)
        .expect("a hot record");
    let mut record = moved.records_mut("postgresql").remove(at);
    let seq = record.seq;
    record.provenance.as_mut().expect("provenance").route = None;
    moved.file.push(record);
    let report = reconcile("v", Some(200), &moved, rules.clone());
    assert!(!report.is_ok());
    assert_eq!(report.file.wrong_place, BTreeSet::from([seq]));
    assert_eq!(pg(&report).missing, BTreeSet::from([seq]));

    // A record stored under the right store but a route its version does not name.
    let mut renamed = observed.clone();
    renamed.records_mut("postgresql")[0]
        .provenance
        .as_mut()
        .expect("provenance")
        .route = Some("rest".into());
    let report = reconcile("v", Some(200), &renamed, rules.clone());
    assert_eq!(
        pg(&report).wrong_place,
        BTreeSet::from([renamed.records_mut("postgresql")[0].seq])
    );

    // A record in both stores, each copy under a version that sends it there: one too many.
    let mut twice = observed.clone();
    let in_file = twice
        .file
        .iter()
        .find(|r| {
            r.provenance
                .as_ref()
                .is_some_and(|p| p.version == first.version())
                && second.destination(r) == Destination::Broker
        })
        .expect("a record the second version would send to the broker")
        .clone();
    let mut copy = in_file.clone();
    copy.provenance = Some(Provenance {
        version: second.version().to_owned(),
        route: Some(second.choose(&copy).route.name().to_owned()),
    });
    twice.records_mut("postgresql").push(copy);
    let report = reconcile("v", Some(200), &twice, rules.clone());
    assert_eq!(pg(&report).wrong_place, BTreeSet::from([in_file.seq]));

    // The same stores judged without the second version: its records are unknown.
    let report = reconcile("v", Some(200), &observed, Rules::with_routes([first]));
    assert!(!report.is_ok());
    assert_eq!(
        report.unknown_versions,
        BTreeSet::from([second.version().to_owned()])
    );
    assert!(report.render().contains("not in routes.log"));
}

#[test]
fn records_of_no_recorded_version_are_judged_by_the_builtin_routes() {
    // Stored by routes of threshold 50 but with no version recorded: values 51..=90 are then in
    // the wrong place.
    let fifty = routes("value > 50");
    let records: Vec<Record> = (1..=30).map(|s| rec(s, (s * 3) as u8)).collect();
    let mut observed = without_mongodb();
    stored_by(&fifty, &records, &mut observed);
    let rules = Rules::with_routes([fifty]);
    assert!(reconcile("v", Some(30), &observed, rules.clone()).is_ok());
    observed.file.iter_mut().for_each(|r| r.provenance = None);
    observed
        .records_mut("postgresql")
        .iter_mut()
        .for_each(|r| r.provenance = None);
    let report = reconcile("v", Some(30), &observed, rules);
    let misplaced: BTreeSet<u64> = (17..=30).collect();
    assert_eq!(pg(&report).wrong_place, misplaced);
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

#[test]
fn every_writer_store_is_held_to_every_broker_bound_record() {
    // A store verify knows nothing special of (a third writer's) is judged like the others.
    let mut observed = clean(50);
    let broker = observed.records_mut("postgresql").clone();
    observed
        .stores
        .push(("clickhouse", Some(Held::Records(broker.clone()))));
    let report = reconcile("v", Some(50), &observed, Rules::default());
    assert!(report.is_ok(), "{}", report.render());
    assert_eq!(
        report.store("clickhouse").map(|f| f.records),
        Some(broker.len())
    );

    observed.stores.last_mut().expect("clickhouse").1 = Some(Held::Records(broker[1..].to_vec()));
    let report = reconcile("v", Some(50), &observed, Rules::default());
    assert!(!report.is_ok());
    assert_eq!(
        report.store("clickhouse").map(|f| f.missing.clone()),
        Some(BTreeSet::from([broker[0].seq]))
    );
    assert!(report.render().contains("clickhouse missing: 7"));
    assert_eq!(report.to_json()["clickhouse"]["missing"], 1);
}
