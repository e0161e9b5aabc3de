//! The reconciliation itself, pure: given what each store holds for one `source`, which seqs are
//! missing, stored twice, in the wrong place (where the routes version recorded for it did not
//! send it), carry a bad hash, or sit in a group that breaks the nesting rule.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use flowmesh_common::record::{Record, record_hash};
use flowmesh_common::routing::{Destination, Routes};
use flowmesh_common::services::Role;
use flowmesh_mongo_writer::nesting::{DEFAULT_MAX_NEST, GroupDoc, Op, OpenGroups, nests, plan};

/// The rules stored records are checked against: the same functions the services run.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Every routes version the filter applied, by version (the built-in routes always among
    /// them). A record is judged by the version recorded for it; one of no recorded version by
    /// the built-in routes.
    pub versions: Arc<HashMap<String, Arc<Routes>>>,
    /// The largest nested group (mongo-writer's `max_nest`).
    pub max_nest: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Self::with_routes([])
    }
}

impl Rules {
    /// The built-in routes and `routes`, with the default `max_nest`.
    pub fn with_routes(routes: impl IntoIterator<Item = Arc<Routes>>) -> Self {
        let builtin = Routes::builtin();
        let mut versions = HashMap::from([(builtin.version().to_owned(), builtin)]);
        versions.extend(routes.into_iter().map(|r| (r.version().to_owned(), r)));
        Self {
            versions: Arc::new(versions),
            max_nest: DEFAULT_MAX_NEST,
        }
    }

    /// The routes version recorded for `record` (the built-in one when none is).
    fn version_of(record: &Record) -> String {
        record
            .provenance
            .as_ref()
            .map(|p| p.version.clone())
            .unwrap_or_else(Routes::builtin_version)
    }

    /// Where the version recorded for `record` sends it, and by which route; `None` when that
    /// version is unknown.
    fn sends(&self, record: &Record) -> Option<(Destination, String)> {
        let routes = self.versions.get(&Self::version_of(record))?;
        let choice = routes.choose(record);
        Some((choice.route.to(), choice.route.name().to_owned()))
    }

    /// True when `record` is stored where its version sends it, under the route that sends it
    /// there (where the store kept the route's name).
    fn belongs(&self, record: &Record, here: Destination) -> bool {
        match self.sends(record) {
            None => false,
            Some((to, route)) => {
                to == here
                    && record
                        .provenance
                        .as_ref()
                        .and_then(|p| p.route.as_ref())
                        .is_none_or(|stored| *stored == route)
            }
        }
    }
}

/// What one writer's store holds for the source.
#[derive(Debug, Clone, PartialEq)]
pub enum Held {
    /// One record a row or a document.
    Records(Vec<Record>),
    /// Records nested in groups (mongo-writer's layout), each with the `count` it stores.
    Groups(Vec<(GroupDoc, i64)>),
}

impl Held {
    /// Every record held, of any source.
    pub fn records(&self) -> Vec<&Record> {
        match self {
            Self::Records(records) => records.iter().collect(),
            Self::Groups(groups) => groups.iter().flat_map(|(g, _)| g.records.iter()).collect(),
        }
    }
}

/// What the stores hold for one source.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Records read from the file sink (every rotated file and the active one) of every filter.
    pub file: Vec<Record>,
    /// The filter instance each record of `file` was read from (an index into the data
    /// directories given), in the same order; shorter than `file` (empty, say) means one filter.
    pub file_instance: Vec<usize>,
    /// Each writer's store by its name (`flowmesh_common::services`), in the list's order;
    /// `None` when that store was not checked.
    pub stores: Vec<(&'static str, Option<Held>)>,
}

impl Default for Observed {
    /// Nothing in the file, and every writer's store checked and empty.
    fn default() -> Self {
        let stores = flowmesh_common::services::writers()
            .filter_map(|w| match w.role {
                Role::Writer { store, .. } => Some((store, Some(Held::Records(Vec::new())))),
                _ => None,
            })
            .collect();
        Self {
            file: Vec::new(),
            file_instance: Vec::new(),
            stores,
        }
    }
}

impl Observed {
    /// What the store called `name` holds (`None`: not checked, or no such store).
    pub fn held(&self, name: &str) -> Option<&Held> {
        self.stores
            .iter()
            .find(|(store, _)| *store == name)
            .and_then(|(_, held)| held.as_ref())
    }

    /// Sets what the store called `name` holds (`None`: not checked).
    pub fn set(&mut self, name: &str, held: Option<Held>) {
        let slot = self
            .stores
            .iter_mut()
            .find(|(store, _)| *store == name)
            .unwrap_or_else(|| panic!("no writer stores into {name}"));
        slot.1 = held;
    }

    /// The records of a store that holds one record a row (tests change them).
    pub fn records_mut(&mut self, name: &str) -> &mut Vec<Record> {
        match self.stores.iter_mut().find(|(store, _)| *store == name) {
            Some((_, Some(Held::Records(records)))) => records,
            _ => panic!("{name} is not a checked store of records"),
        }
    }
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
    /// The file sink.
    pub file: StoreFindings,
    /// Each writer's store, in the list's order (`None`: not checked).
    pub stores: Vec<(&'static str, Option<StoreFindings>)>,
    /// Groups that break the nesting rule: the store, the group's `_id`, and why.
    pub bad_groups: Vec<(&'static str, String, String)>,
    /// Routes versions recorded for stored records that no filter recorded in `routes.log`.
    pub unknown_versions: BTreeSet<String>,
    /// Records in the files of more than one filter instance (once in each): what a generator's
    /// failover re-sends (contracts §2). Reported with their ids, not a fault.
    pub across_filters: BTreeMap<u64, String>,
}

impl Report {
    /// True when everything reconciles.
    pub fn is_ok(&self) -> bool {
        self.lost.is_empty()
            && self.file.is_clean()
            && self
                .stores
                .iter()
                .all(|(_, f)| f.as_ref().is_none_or(StoreFindings::is_clean))
            && self.bad_groups.is_empty()
            && self.unknown_versions.is_empty()
    }

    /// The findings of the store called `name` (`None`: not checked, or no such store).
    pub fn store(&self, name: &str) -> Option<&StoreFindings> {
        self.stores
            .iter()
            .find(|(store, _)| *store == name)
            .and_then(|(_, f)| f.as_ref())
    }

    /// The report as one JSON object: counts per store (by name; `null` when not checked), seqs
    /// lost, and whether it reconciles.
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
        let mut json = serde_json::json!({
            "source": self.source,
            "expected": self.expected,
            "lost": self.lost.len(),
            "lost_seqs": self.lost.iter().take(20).collect::<Vec<_>>(),
            "file": store(&self.file),
            "bad_groups": self.bad_groups.len(),
            "unknown_routes_versions": self.unknown_versions.iter().collect::<Vec<_>>(),
            "across_filters": self.across_filters.len(),
            "across_filters_ids": self.across_filters.values().take(20).collect::<Vec<_>>(),
            "ok": self.is_ok(),
        });
        for (name, findings) in &self.stores {
            json[*name] = findings.as_ref().map(store).into();
        }
        json
    }

    /// A readable summary table, with the seqs at fault (the first 20 of each kind).
    pub fn render(&self) -> String {
        let mut out = self.table();
        for line in self.details() {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(
            out,
            "{}",
            if self.is_ok() {
                "OK: every record is stored exactly once, where the routes version in force sent it"
            } else {
                "FAILED: the stores do not reconcile"
            }
        );
        out
    }

    /// The stores in the order the table shows them (`None`: not checked).
    fn rows(&self) -> Vec<(&'static str, Option<&StoreFindings>)> {
        std::iter::once(("file", Some(&self.file)))
            .chain(self.stores.iter().map(|(name, f)| (*name, f.as_ref())))
            .collect()
    }

    /// The heading and one row of counts per store.
    fn table(&self) -> String {
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
        for (name, findings) in self.rows() {
            let _ = match findings {
                Some(f) => writeln!(
                    out,
                    "{:<12} {:>9} {:>9} {:>11} {:>12} {:>9}",
                    name,
                    f.records,
                    f.missing.len(),
                    f.duplicated.len(),
                    f.wrong_place.len(),
                    f.bad_hash.len()
                ),
                None => writeln!(out, "{name:<12} skipped: not configured"),
            };
        }
        out
    }

    /// One line per kind of fault with the seqs at fault (the first 20 of each).
    fn details(&self) -> Vec<String> {
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
        for (name, f) in self.rows() {
            if let Some(f) = f {
                list(format!("{name} missing"), &f.missing);
                list(format!("{name} duplicated"), &f.duplicated);
                list(format!("{name} wrong place"), &f.wrong_place);
                list(format!("{name} bad hash"), &f.bad_hash);
            }
        }
        for (store, id, why) in self.bad_groups.iter().take(20) {
            details.push(format!("  {store} group {id}: {why}"));
        }
        for version in &self.unknown_versions {
            details.push(format!(
                "  routes version {version} is recorded for stored records but not in routes.log"
            ));
        }
        if !self.across_filters.is_empty() {
            let shown: Vec<String> = self
                .across_filters
                .iter()
                .take(20)
                .map(|(seq, id)| format!("{seq} ({id})"))
                .collect();
            details.push(format!(
                "  file across filter instances, not a fault (a failover re-sent them): {} records: {}{}",
                self.across_filters.len(),
                shown.join(", "),
                if self.across_filters.len() > 20 { " …" } else { "" }
            ));
        }
        details
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

/// Each writer's store with the source's records in it (`None`: not checked).
fn stored_records<'a>(
    observed: &'a Observed,
    source: &str,
) -> Vec<(&'static str, Option<Vec<&'a Record>>)> {
    observed
        .stores
        .iter()
        .map(|(name, held)| {
            let records = held.as_ref().map(|held| {
                held.records()
                    .into_iter()
                    .filter(|r| r.source == source)
                    .collect()
            });
            (*name, records)
        })
        .collect()
}

/// The groups, in every store that nests records, that break the nesting rule: the store, the
/// group's `_id`, and why.
fn bad_groups(
    observed: &Observed,
    source: &str,
    max_nest: usize,
) -> Vec<(&'static str, String, String)> {
    let mut bad = Vec::new();
    for (name, held) in &observed.stores {
        if let Some(Held::Groups(groups)) = held {
            for (group, count) in groups {
                if let Some(why) = group_problem(group, *count, max_nest) {
                    bad.push((*name, group.id.clone(), why));
                }
            }
            if let Some((id, why)) = partition_problem(source, groups, max_nest) {
                bad.push((*name, id, why));
            }
        }
    }
    bad
}

/// Reconciles what was observed for `source`. `expected` defaults to the highest seq seen.
pub fn reconcile(source: &str, expected: Option<u64>, observed: &Observed, rules: Rules) -> Report {
    let belongs = |record: &Record, here: Destination| rules.belongs(record, here);
    let stored = stored_records(observed, source);
    let all = observed
        .file
        .iter()
        .chain(stored.iter().flat_map(|(_, r)| r.iter().flatten().copied()));
    // Each seq as first seen (the file, then each store in the list's order): its fields and
    // its routes version decide where it belongs.
    let mut value_of: BTreeMap<u64, &Record> = BTreeMap::new();
    let mut unknown_versions = BTreeSet::new();
    for record in all {
        value_of.entry(record.seq).or_insert(record);
        let version = Rules::version_of(record);
        if !rules.versions.contains_key(&version) {
            unknown_versions.insert(version);
        }
    }
    let expected = expected.unwrap_or_else(|| value_of.keys().next_back().copied().unwrap_or(0));
    let lost: BTreeSet<u64> = (1..=expected)
        .filter(|s| !value_of.contains_key(s))
        .collect();
    let bound_for = |here: Destination| -> BTreeSet<u64> {
        value_of
            .iter()
            .filter(|(_, r)| rules.sends(r).is_some_and(|(to, _)| to == here))
            .map(|(s, _)| *s)
            .collect()
    };
    let to_broker = bound_for(Destination::Broker);
    let to_file = bound_for(Destination::File);

    let file: Vec<&Record> = observed.file.iter().collect();
    let (file_duplicated, across_filters) = file_copies(observed);
    let bad_groups = bad_groups(observed, source, rules.max_nest);
    // A copy belongs only where its own version sends it and where the seq belongs as first
    // seen: one record stored in both the file and the broker's stores, each copy under a
    // version that sends it there, is still in one place too many. Every writer's store gets
    // every record RabbitMQ takes (the fanout exchange).
    let in_stores = |records: &[&Record]| {
        findings(
            records,
            |r| belongs(r, Destination::Broker) && to_broker.contains(&r.seq),
            &to_broker,
        )
    };
    Report {
        source: source.to_owned(),
        expected,
        lost,
        file: StoreFindings {
            duplicated: file_duplicated,
            ..findings(
                &file,
                |r| belongs(r, Destination::File) && to_file.contains(&r.seq),
                &to_file,
            )
        },
        stores: stored
            .iter()
            .map(|(name, records)| (*name, records.as_deref().map(in_stores)))
            .collect(),
        bad_groups,
        unknown_versions,
        across_filters,
    }
}

/// The file's copies of each seq by filter instance: the seqs some instance holds more than
/// once (a fault), and those held once each by more than one instance, with their ids.
fn file_copies(observed: &Observed) -> (BTreeSet<u64>, BTreeMap<u64, String>) {
    let mut copies: BTreeMap<u64, BTreeMap<usize, usize>> = BTreeMap::new();
    let mut ids: BTreeMap<u64, &str> = BTreeMap::new();
    for (i, record) in observed.file.iter().enumerate() {
        let instance = observed.file_instance.get(i).copied().unwrap_or(0);
        *copies
            .entry(record.seq)
            .or_default()
            .entry(instance)
            .or_default() += 1;
        ids.entry(record.seq).or_insert(&record.id);
    }
    let duplicated = copies
        .iter()
        .filter(|(_, by)| by.values().any(|n| *n > 1))
        .map(|(seq, _)| *seq)
        .collect();
    let across = copies
        .iter()
        .filter(|(_, by)| by.len() > 1 && by.values().all(|n| *n == 1))
        .map(|(seq, _)| (*seq, ids[seq].to_owned()))
        .collect();
    (duplicated, across)
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
            Op::Append(_) => None,
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
