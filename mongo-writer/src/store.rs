//! The narrow store trait the writer needs from MongoDB, its in-memory twin, and the
//! [`NestingStore`] that turns batches of records into group writes.
//!
//! Exactly-once per record comes from three facts: records already stored are filtered out
//! before planning (`stored_ids`); a group's `_id` is its first record's id; and the open group
//! is recovered from the store — the document updated last — not from memory.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use flowmesh_common::consumer::{RecordStore, StoreReport};
use flowmesh_common::record::Record;

use crate::nesting::{GroupDoc, Op, OpenGroup, plan};

/// What the writer needs from a document store.
pub trait GroupStore: Send + 'static {
    /// The group written last (greatest `updated_at`), if any.
    fn last_group(&mut self) -> impl Future<Output = anyhow::Result<Option<OpenGroup>>> + Send;
    /// Which of `ids` are already stored in some group.
    fn stored_ids(
        &mut self,
        ids: &[String],
    ) -> impl Future<Output = anyhow::Result<HashSet<String>>> + Send;
    /// Performs the operations in order. An insert of an existing `_id` and an append of a
    /// record the group already holds must be no-ops.
    fn apply(&mut self, ops: &[Op]) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Groups kept in memory with MongoDB's semantics, for tests and for running without MongoDB.
/// Clones share the same groups; [`MemoryStore::set_failing`] makes every call fail.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    groups: Arc<Mutex<Vec<GroupDoc>>>,
    failing: Arc<AtomicBool>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every call fail (an unreachable database) until set back.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// A copy of every group, in creation order.
    pub fn groups(&self) -> Vec<GroupDoc> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<GroupDoc>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            anyhow::bail!("in-memory store set to fail");
        }
        Ok(())
    }
}

impl GroupStore for MemoryStore {
    async fn last_group(&mut self) -> anyhow::Result<Option<OpenGroup>> {
        self.check()?;
        Ok(self
            .lock()
            .iter()
            .max_by_key(|g| g.updated_at)
            .map(GroupDoc::open))
    }

    async fn stored_ids(&mut self, ids: &[String]) -> anyhow::Result<HashSet<String>> {
        self.check()?;
        let wanted: HashSet<&String> = ids.iter().collect();
        Ok(self
            .lock()
            .iter()
            .flat_map(|g| g.records.iter())
            .filter(|r| wanted.contains(&r.id))
            .map(|r| r.id.clone())
            .collect())
    }

    async fn apply(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        self.check()?;
        let mut groups = self.lock();
        for op in ops {
            match op {
                Op::Insert(doc) => {
                    if !groups.iter().any(|g| g.id == doc.id) {
                        groups.push(doc.clone());
                    }
                }
                Op::Append { id, records, at } => {
                    if let Some(group) = groups.iter_mut().find(|g| g.id == *id) {
                        for record in records {
                            if !group.records.iter().any(|r| r.id == record.id) {
                                group.records.push(record.clone());
                            }
                        }
                        group.updated_at = *at;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Turns batches of records into group writes on a [`GroupStore`].
#[derive(Debug)]
pub struct NestingStore<G> {
    groups: G,
    max_nest: usize,
    /// The open group, once recovered from the store; `None` inside means "no group yet".
    open: Option<Option<OpenGroup>>,
    /// Last `updated_at` handed out: each write gets a strictly later one, so "written last"
    /// is always well defined.
    clock: DateTime<Utc>,
}

impl<G: GroupStore> NestingStore<G> {
    /// A writer over `groups` nesting at most `max_nest` records per document.
    pub fn new(groups: G, max_nest: usize) -> Self {
        Self {
            groups,
            max_nest,
            open: None,
            clock: DateTime::<Utc>::MIN_UTC,
        }
    }

    fn tick(&mut self) -> DateTime<Utc> {
        let now = Utc::now();
        // Millisecond resolution is what MongoDB keeps.
        let floor = self.clock + chrono::Duration::milliseconds(1);
        self.clock = if now > floor { now } else { floor };
        self.clock
    }

    async fn store_batch(&mut self, records: &[Record]) -> anyhow::Result<StoreReport> {
        let open = match self.open.clone() {
            Some(open) => open,
            None => {
                let open = self.groups.last_group().await?;
                tracing::info!(open_group = ?open, "recovered the open group from the store");
                if let Some(group) = &open {
                    // Never write a time earlier than what the store already holds.
                    self.clock = self.clock.max(group.updated_at);
                }
                open
            }
        };
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let stored = self.groups.stored_ids(&ids).await?;
        let mut seen = HashSet::new();
        let fresh: Vec<Record> = records
            .iter()
            .filter(|r| !stored.contains(&r.id) && seen.insert(r.id.clone()))
            .cloned()
            .collect();
        let now = self.tick();
        let (ops, next_open) = plan(open, &fresh, self.max_nest, now);
        self.groups.apply(&ops).await?;
        self.open = Some(next_open);
        Ok(StoreReport {
            stored: fresh.len() as u64,
            duplicates: (records.len() - fresh.len()) as u64,
        })
    }
}

impl<G: GroupStore> RecordStore for NestingStore<G> {
    async fn store(&mut self, records: &[Record]) -> anyhow::Result<StoreReport> {
        let result = self.store_batch(records).await;
        if result.is_err() {
            // Part of the batch may have been written: re-read the truth before the next try.
            self.open = None;
        }
        result
    }
}

#[cfg(test)]
mod tests;
