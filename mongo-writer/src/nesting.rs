//! The nesting rule of SPEC §6 as a pure planner: given the open group (the last document
//! written) and the next records in stream order, the operations to perform.
//!
//! - `hash <= "99"`: a new document, `nested: false`, holding only this record.
//! - `hash > "99"`: appended to the open group if that group is nested (so the record before it
//!   also had `hash > "99"`) and holds fewer than `max_nest` records; otherwise a new nested
//!   document.
//!
//! A group's `_id` is the id of its first record, so re-planning a redelivered record can never
//! create a second group for it. Records already stored are removed before planning (see
//! `store.rs`), which makes replays of any prefix harmless.

use chrono::{DateTime, Utc};
use flowmesh_common::record::Record;

/// Default largest number of records in one nested document.
pub const DEFAULT_MAX_NEST: usize = 100;

/// True for a hash that nests: strictly above `"99"` as a plain string comparison.
pub fn nests(hash: &str) -> bool {
    hash > "99"
}

/// One stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDoc {
    /// The id of its first record.
    pub id: String,
    /// True for a group of `hash > "99"` records.
    pub nested: bool,
    /// Its records in stream order.
    pub records: Vec<Record>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When a record was last added.
    pub updated_at: DateTime<Utc>,
}

impl GroupDoc {
    /// A new group holding `record`.
    pub fn new(record: Record, now: DateTime<Utc>) -> Self {
        Self {
            id: record.id.clone(),
            nested: nests(&record.hash),
            records: vec![record],
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
            updated_at: self.updated_at,
        }
    }
}

/// The last group written: the only one a new record can join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenGroup {
    /// Its `_id`.
    pub id: String,
    /// Whether it is a nested group.
    pub nested: bool,
    /// Records it holds.
    pub count: usize,
    /// When it was last written: later writes must carry a later time.
    pub updated_at: DateTime<Utc>,
}

/// One write to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a group (possibly already holding several records).
    Insert(GroupDoc),
    /// Append records to an existing group, in order.
    Append {
        /// The group's `_id`.
        id: String,
        /// The records to add.
        records: Vec<Record>,
        /// The group's new `updated_at`.
        at: DateTime<Utc>,
    },
}

/// Plans the writes for `records` (already free of stored ones), continuing from `open`.
/// Returns the operations in order and the group left open afterwards.
pub fn plan(
    open: Option<OpenGroup>,
    records: &[Record],
    max_nest: usize,
    now: DateTime<Utc>,
) -> (Vec<Op>, Option<OpenGroup>) {
    let max_nest = max_nest.max(1);
    let mut ops: Vec<Op> = Vec::new();
    let mut open = open;
    for record in records {
        let joins = nests(&record.hash)
            && open
                .as_ref()
                .is_some_and(|g| g.nested && g.count < max_nest);
        if joins {
            let group = open.as_mut().expect("joins implies an open group");
            group.count += 1;
            group.updated_at = now;
            match ops.last_mut() {
                Some(Op::Insert(doc)) if doc.id == group.id => doc.records.push(record.clone()),
                Some(Op::Append { id, records, .. }) if *id == group.id => {
                    records.push(record.clone())
                }
                _ => ops.push(Op::Append {
                    id: group.id.clone(),
                    records: vec![record.clone()],
                    at: now,
                }),
            }
        } else {
            let doc = GroupDoc::new(record.clone(), now);
            open = Some(doc.open());
            ops.push(Op::Insert(doc));
        }
    }
    (ops, open)
}

#[cfg(test)]
mod tests;
