//! The nesting rule of docs/contracts.md §6 as a pure planner: given each source's open group
//! (the group of that source written last) and the next records in delivery order, the
//! operations to perform.
//!
//! Per source, in the order the queue delivers that source's records:
//! - `hash <= "99"`: a new document, `nested: false`, holding only this record.
//! - `hash > "99"`: appended to the source's open group if that group is nested (so the
//!   source's record before it also had `hash > "99"`) and holds fewer than `max_nest` records;
//!   otherwise a new nested document.
//!
//! A group never holds two sources. Every operation carries a write sequence (`wseq`) one above
//! the last: the open group of a source is the one with the highest `wseq`, which no clock tie
//! can make ambiguous. A group's `_id` is the id of its first record, so re-planning a
//! redelivered record can never create a second group for it. Records already stored are
//! removed before planning (see `store.rs`), which makes replays of any prefix harmless.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use flowmesh_common::record::Record;

/// Default largest number of records in one nested document.
pub const DEFAULT_MAX_NEST: usize = 100;

/// The largest `max_nest` accepted: a group of this many records (each well under 1 KiB as
/// BSON) stays far below MongoDB's 16 MiB document limit.
pub const MAX_NEST_LIMIT: usize = 10_000;

/// True for a hash that nests: strictly above `"99"` as a plain string comparison.
pub fn nests(hash: &str) -> bool {
    hash > "99"
}

/// One stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDoc {
    /// The id of its first record.
    pub id: String,
    /// The source of every record it holds.
    pub source: String,
    /// True for a group of `hash > "99"` records.
    pub nested: bool,
    /// Its records in delivery order.
    pub records: Vec<Record>,
    /// The write sequence of the last operation on it.
    pub wseq: u64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When a record was last added.
    pub updated_at: DateTime<Utc>,
}

impl GroupDoc {
    /// A new group holding `record`, written as operation `wseq`.
    pub fn new(record: Record, wseq: u64, now: DateTime<Utc>) -> Self {
        Self {
            id: record.id.clone(),
            source: record.source.clone(),
            nested: nests(&record.hash),
            records: vec![record],
            wseq,
            created_at: now,
            updated_at: now,
        }
    }

    /// The group as the open-group state the planner continues from.
    pub fn open(&self) -> OpenGroup {
        OpenGroup {
            id: self.id.clone(),
            nested: self.nested,
            count: self.records.len(),
            wseq: self.wseq,
        }
    }
}

/// A source's last group written: the only one a new record of that source can join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenGroup {
    /// Its `_id`.
    pub id: String,
    /// Whether it is a nested group.
    pub nested: bool,
    /// Records it holds.
    pub count: usize,
    /// The write sequence of the last operation on it.
    pub wseq: u64,
}

/// One write to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a group (possibly already holding several records).
    Insert(GroupDoc),
    /// Append records to an existing group, in order, if the group is still as the plan saw
    /// it (`seen`): its count and write sequence are the fence between two writers.
    Append(Append),
}

/// Records to add to an existing group, if the group is still as the plan saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// The group's `_id`.
    pub id: String,
    /// The group's count and write sequence when planned: the store applies the append only to
    /// a group still in that state, and reports a conflict otherwise.
    pub seen: (usize, u64),
    /// The records to add.
    pub records: Vec<Record>,
    /// The operation's write sequence (the group's new `wseq`).
    pub wseq: u64,
    /// The group's new `updated_at`.
    pub at: DateTime<Utc>,
}

/// Each source's open group (`None`: the source has no group yet). The planner needs an entry
/// for every source of the records it plans.
pub type OpenGroups = HashMap<String, Option<OpenGroup>>;

/// Plans the writes for `records` (already free of stored ones), continuing from `open`, which
/// it updates. `next_wseq` is the write sequence of the first new operation; it is advanced.
pub fn plan(
    open: &mut OpenGroups,
    records: &[Record],
    max_nest: usize,
    next_wseq: &mut u64,
    now: DateTime<Utc>,
) -> Vec<Op> {
    let max_nest = max_nest.max(1);
    let mut ops: Vec<Op> = Vec::new();
    for record in records {
        let group = open.entry(record.source.clone()).or_default();
        let joins = nests(&record.hash)
            && group
                .as_ref()
                .is_some_and(|g| g.nested && g.count < max_nest);
        match group.as_mut() {
            Some(group) if joins => {
                group.count += 1;
                match ops.last_mut() {
                    Some(Op::Insert(doc)) if doc.id == group.id => doc.records.push(record.clone()),
                    Some(Op::Append(append)) if append.id == group.id => {
                        append.records.push(record.clone())
                    }
                    _ => {
                        ops.push(Op::Append(Append {
                            id: group.id.clone(),
                            seen: (group.count - 1, group.wseq),
                            records: vec![record.clone()],
                            wseq: *next_wseq,
                            at: now,
                        }));
                        group.wseq = *next_wseq;
                        *next_wseq += 1;
                    }
                }
            }
            _ => {
                let doc = GroupDoc::new(record.clone(), *next_wseq, now);
                *next_wseq += 1;
                *group = Some(doc.open());
                ops.push(Op::Insert(doc));
            }
        }
    }
    ops
}

#[cfg(test)]
pub(crate) mod tests;
