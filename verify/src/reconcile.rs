//! The reconciliation itself, pure: given what each store holds for one `source`, which seqs are
//! missing, stored twice, in the wrong place, carry a bad hash, or sit in a group that breaks the
//! nesting rule.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use flowmesh_common::record::{Record, record_hash};
use flowmesh_common::routing::{Destination, Routing};
use flowmesh_mongo_writer::nesting::{DEFAULT_MAX_NEST, GroupDoc, Op, OpenGroups, nests, plan};

/// The rules stored records are checked against: the same functions the services run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Where each record belongs (the filter's rule).
    pub routing: Routing,
    /// The largest nested group (mongo-writer's `max_nest`).
    pub max_nest: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            routing: Routing::DEFAULT,
            max_nest: DEFAULT_MAX_NEST,
        }
    }
}

/// What the stores hold for one source.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// Records read from the file sink (every rotated file and the active one).
    pub file: Vec<Record>,
    /// Rows of the PostgreSQL table, as records (`ts` formatted back to the record form).
    pub postgres: Vec<Record>,
    /// MongoDB groups holding records of the source with their stored `count`; `None` when
    /// MongoDB was not checked.
    pub mongo: Option<Vec<(GroupDoc, i64)>>,
}

/// Problems found in one store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoreFindings {
    /// Records of the source in this store.
    pub records: usize,
    /// Seqs that belong here but are absent.
    pub missing: BTreeSet<u64>,
    /// Seqs stored more than once here.
    pub duplicated: BTreeSet<u64>,
    /// Seqs here that belong elsewhere.
    pub wrong_place: BTreeSet<u64>,
    /// Seqs whose hash does not match their timestamp and value.
    pub bad_hash: BTreeSet<u64>,
}

impl StoreFindings {
    fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.duplicated.is_empty()
            && self.wrong_place.is_empty()
            && self.bad_hash.is_empty()
    }
}

/// The outcome of a reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The source checked.
    pub source: String,
    /// Seqs expected: 1 ..= this.
    pub expected: u64,
    /// Seqs found in no store at all.
    pub lost: BTreeSet<u64>,
    /// Per store.
    pub file: StoreFindings,
    /// PostgreSQL.
    pub postgres: StoreFindings,
    /// MongoDB, when checked.
    pub mongo: Option<StoreFindings>,
    /// Groups that break the nesting rule: `_id` and why.
    pub bad_groups: Vec<(String, String)>,
}

impl Report {
    /// True when everything reconciles.
    pub fn is_ok(&self) -> bool {
        self.lost.is_empty()
            && self.file.is_clean()
            && self.postgres.is_clean()
            && self.mongo.as_ref().is_none_or(StoreFindings::is_clean)
            && self.bad_groups.is_empty()
    }

    /// The report as one JSON object: counts per store, seqs lost, and whether it reconciles.
    pub fn to_json(&self) -> serde_json::Value {
        let store = |f: &StoreFindings| {
            serde_json::json!({
                "records": f.records,
                "missing": f.missing.len(),
                "duplicated": f.duplicated.len(),
                "wrong_place": f.wrong_place.len(),
                "bad_hash": f.bad_hash.len(),
            })
        };
        serde_json::json!({
            "source": self.source,
            "expected": self.expected,
            "lost": self.lost.len(),
            "lost_seqs": self.lost.iter().take(20).collect::<Vec<_>>(),
            "file": store(&self.file),
            "postgresql": store(&self.postgres),
            "mongodb": self.mongo.as_ref().map(store),
            "bad_groups": self.bad_groups.len(),
            "ok": self.is_ok(),
        })
    }

    /// A readable summary table, with the seqs at fault (the first 20 of each kind).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "verify: source {} — seqs 1..={}",
            self.source, self.expected
        );
        let _ = writeln!(
            out,
            "{:<12} {:>9} {:>9} {:>11} {:>12} {:>9}",
            "store", "records", "missing", "duplicated", "wrong place", "bad hash"
        );
        let row = |out: &mut String, name: &str, f: &StoreFindings| {
            let _ = writeln!(
                out,
                "{:<12} {:>9} {:>9} {:>11} {:>12} {:>9}",
                name,
                f.records,
                f.missing.len(),
                f.duplicated.len(),
                f.wrong_place.len(),
                f.bad_hash.len()
            );
        };
        row(&mut out, "file", &self.file);
        row(&mut out, "postgresql", &self.postgres);
        match &self.mongo {
            Some(mongo) => row(&mut out, "mongodb", mongo),
            None => {
                let _ = writeln!(
                    out,
                    "{:<12} skipped: no MongoDB configured (set MONGODB_URL)",
                    "mongodb"
                );
            }
        }
        let mut details = Vec::new();
        let mut list = |what: String, seqs: &BTreeSet<u64>| {
            if !seqs.is_empty() {
                let shown: Vec<String> = seqs.iter().take(20).map(u64::to_string).collect();
                let more = if seqs.len() > 20 {
                    format!(" … ({} in all)", seqs.len())
                } else {
                    String::new()
                };
                details.push(format!("  {what}: {}{more}", shown.join(", ")));
            }
        };
        list("lost everywhere".into(), &self.lost);
        for (name, f) in [
            ("file", Some(&self.file)),
            ("postgresql", Some(&self.postgres)),
            ("mongodb", self.mongo.as_ref()),
        ] {
            if let Some(f) = f {
                list(format!("{name} missing"), &f.missing);
                list(format!("{name} duplicated"), &f.duplicated);
                list(format!("{name} wrong place"), &f.wrong_place);
                list(format!("{name} bad hash"), &f.bad_hash);
            }
        }
        for (id, why) in self.bad_groups.iter().take(20) {
            details.push(format!("  mongodb group {id}: {why}"));
        }
        for line in details {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(
            out,
            "{}",
            if self.is_ok() {
                "OK: every record is stored exactly once, in the right place"
            } else {
                "FAILED: the stores do not reconcile"
            }
        );
        out
    }
}

fn findings(
    records: &[&Record],
    belongs: impl Fn(&Record) -> bool,
    expected_here: &BTreeSet<u64>,
) -> StoreFindings {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    let mut f = StoreFindings {
        records: records.len(),
        ..StoreFindings::default()
    };
    for record in records {
        *counts.entry(record.seq).or_default() += 1;
        if !belongs(record) {
            f.wrong_place.insert(record.seq);
        }
        if record_hash(&record.timestamp, record.value) != record.hash {
            f.bad_hash.insert(record.seq);
        }
    }
    f.duplicated = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    f.missing = expected_here
        .iter()
        .filter(|s| !counts.contains_key(s))
        .copied()
        .collect();
    f
}

/// Reconciles what was observed for `source`. `expected` defaults to the highest seq seen.
pub fn reconcile(source: &str, expected: Option<u64>, observed: &Observed, rules: Rules) -> Report {
    let belongs = |record: &Record, here: Destination| rules.routing.destination(record) == here;
    let mongo_records: Option<Vec<&Record>> = observed.mongo.as_ref().map(|groups| {
        groups
            .iter()
            .flat_map(|(g, _)| g.records.iter())
            .filter(|r| r.source == source)
            .collect()
    });
    let all = observed
        .file
        .iter()
        .chain(observed.postgres.iter())
        .chain(mongo_records.iter().flatten().copied());
    // The value of each seq, from wherever it was seen (it decides where the seq belongs).
    let mut value_of: BTreeMap<u64, u8> = BTreeMap::new();
    for record in all {
        value_of.entry(record.seq).or_insert(record.value);
    }
    let expected = expected.unwrap_or_else(|| value_of.keys().next_back().copied().unwrap_or(0));
    let lost: BTreeSet<u64> = (1..=expected)
        .filter(|s| !value_of.contains_key(s))
        .collect();
    let bound_for = |here: Destination| -> BTreeSet<u64> {
        value_of
            .iter()
            .filter(|(_, v)| rules.routing.destination_of(**v) == here)
            .map(|(s, _)| *s)
            .collect()
    };
    let to_broker = bound_for(Destination::Broker);
    let to_file = bound_for(Destination::File);

    let file: Vec<&Record> = observed.file.iter().collect();
    let postgres: Vec<&Record> = observed.postgres.iter().collect();
    let mut bad_groups = Vec::new();
    if let Some(groups) = &observed.mongo {
        for (group, count) in groups {
            if let Some(why) = group_problem(group, *count, rules.max_nest) {
                bad_groups.push((group.id.clone(), why));
            }
        }
        bad_groups.extend(partition_problem(source, groups, rules.max_nest));
    }
    Report {
        source: source.to_owned(),
        expected,
        lost,
        file: findings(&file, |r| belongs(r, Destination::File), &to_file),
        postgres: findings(&postgres, |r| belongs(r, Destination::Broker), &to_broker),
        mongo: mongo_records
            .map(|records| findings(&records, |r| belongs(r, Destination::Broker), &to_broker)),
        bad_groups,
    }
}

/// Whether the source's groups are exactly what the nesting rule gives over its records in the
/// order the writer stored them. A source's groups are written one after the other (a closed
/// group is never written again), so ordering them by `wseq` and concatenating gives that order;
/// planning it afresh must give the same groups. A run split by a wrongly recovered open group,
/// or two runs merged, shows here. Returns the first group that differs, and why.
pub fn partition_problem(
    source: &str,
    groups: &[(GroupDoc, i64)],
    max_nest: usize,
) -> Option<(String, String)> {
    let mut stored: Vec<&GroupDoc> = groups
        .iter()
        .map(|(g, _)| g)
        .filter(|g| g.source == source)
        .collect();
    stored.sort_by_key(|g| g.wseq);
    let records: Vec<Record> = stored.iter().flat_map(|g| g.records.clone()).collect();
    let mut open = OpenGroups::new();
    let mut wseq = 1;
    let planned = plan(&mut open, &records, max_nest, &mut wseq, chrono::Utc::now());
    let ids = |records: &[Record]| records.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    let expected: Vec<Vec<String>> = planned
        .iter()
        .filter_map(|op| match op {
            Op::Insert(doc) => Some(ids(&doc.records)),
            Op::Append { .. } => None,
        })
        .collect();
    stored.iter().zip(expected.iter().map(Some).chain(std::iter::repeat(None))).find_map(
        |(group, want)| {
            let have = ids(&group.records);
            (want != Some(&have)).then(|| {
                (
                    group.id.clone(),
                    format!(
                        "the nesting rule over source {source:?} in stored order gives {} group(s) here, not this one (seq {:?})",
                        expected.len(),
                        group.records.iter().map(|r| r.seq).collect::<Vec<_>>()
                    ),
                )
            })
        },
    )
}

/// Why a group breaks the rule of docs/contracts.md §6, if it does.
pub fn group_problem(group: &GroupDoc, count: i64, max_nest: usize) -> Option<String> {
    let Some(first) = group.records.first() else {
        return Some("holds no records".into());
    };
    if count != group.records.len() as i64 {
        return Some(format!(
            "count is {count} but it holds {} records",
            group.records.len()
        ));
    }
    if group.id != first.id {
        return Some("its _id is not the id of its first record".into());
    }
    if let Some(r) = group.records.iter().find(|r| r.source != group.source) {
        return Some(format!(
            "a group of source {:?} holds seq {} of source {:?}",
            group.source, r.seq, r.source
        ));
    }
    if group.nested {
        if let Some(r) = group.records.iter().find(|r| !nests(&r.hash)) {
            return Some(format!(
                "nested, but seq {} has hash {:?} <= \"99\"",
                r.seq, r.hash
            ));
        }
        if group.records.len() > max_nest {
            return Some(format!(
                "holds {} records, more than max_nest {max_nest}",
                group.records.len()
            ));
        }
        let mut ids = BTreeSet::new();
        if let Some(r) = group.records.iter().find(|r| !ids.insert(&r.id)) {
            return Some(format!("holds seq {} twice", r.seq));
        }
    } else if group.records.len() != 1 || nests(&first.hash) {
        return Some("a plain group must hold exactly one record with hash <= \"99\"".into());
    }
    None
}

#[cfg(test)]
mod tests;
