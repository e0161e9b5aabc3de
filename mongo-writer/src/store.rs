//! The narrow store trait the writer needs from MongoDB, its in-memory twin, and the
//! [`NestingStore`] that turns batches of records into group writes.
//!
//! Exactly-once per record comes from three facts: records already stored are filtered out
//! before planning (`stored_ids`); a group's `_id` is its first record's id; and each source's
//! open group is recovered from the store — the group of that source with the highest write
//! sequence — not from memory.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use flowmesh_common::consumer::{RecordStore, StoreReport};
use flowmesh_common::record::Record;

use crate::nesting::{GroupDoc, Op, OpenGroup, OpenGroups, plan};

/// What the writer needs from a document store.
pub trait GroupStore: Send + 'static {
    /// The group of `source` written last (highest `wseq`), if any.
    fn last_group(
        &mut self,
        source: &str,
    ) -> impl Future<Output = anyhow::Result<Option<OpenGroup>>> + Send;
    /// The highest write sequence in the store (0 when empty).
    fn max_wseq(&mut self) -> impl Future<Output = anyhow::Result<u64>> + Send;
    /// Which of `ids` are already stored in some group.
    fn stored_ids(
        &mut self,
        ids: &[String],
    ) -> impl Future<Output = anyhow::Result<HashSet<String>>> + Send;
    /// Performs the operations in order. An insert of an existing `_id` adds only the records
    /// the group lacks; an append adds only the records the group lacks, and fails when the
    /// group does not exist.
    fn apply(&mut self, ops: &[Op]) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Work before the first batch (indexes); done again lazily if it fails here.
    fn prepare(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }
}

/// The store a running writer uses: MongoDB, or the in-memory twin (`--store memory`).
#[derive(Debug, Clone)]
pub enum Groups {
    /// MongoDB through the official driver.
    Mongo(crate::mongo::MongoStore),
    /// This process's memory.
    Memory(MemoryStore),
}

impl GroupStore for Groups {
    async fn last_group(&mut self, source: &str) -> anyhow::Result<Option<OpenGroup>> {
        match self {
            Self::Mongo(store) => store.last_group(source).await,
            Self::Memory(store) => store.last_group(source).await,
        }
    }

    async fn max_wseq(&mut self) -> anyhow::Result<u64> {
        match self {
            Self::Mongo(store) => store.max_wseq().await,
            Self::Memory(store) => store.max_wseq().await,
        }
    }

    async fn stored_ids(&mut self, ids: &[String]) -> anyhow::Result<HashSet<String>> {
        match self {
            Self::Mongo(store) => store.stored_ids(ids).await,
            Self::Memory(store) => store.stored_ids(ids).await,
        }
    }

    async fn apply(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        match self {
            Self::Mongo(store) => store.apply(ops).await,
            Self::Memory(store) => store.apply(ops).await,
        }
    }

    async fn prepare(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Mongo(store) => store.prepare().await,
            Self::Memory(store) => store.prepare().await,
        }
    }
}

/// Groups kept in memory with MongoDB's semantics, for tests and for running without MongoDB.
/// Clones share the same groups; [`MemoryStore::set_failing`] makes every call fail.
///
/// Indexed as the MongoDB collection is (`_id`, `records.id`, `{source, wseq}`), so every call
/// costs what it costs there, not a scan of everything stored.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Indexed>>,
    failing: Arc<AtomicBool>,
    /// Fault injection for the chaos suite: fail while a file exists at this path.
    fail_while: Option<Arc<PathBuf>>,
}

/// The groups in creation order and the indexes over them.
#[derive(Debug, Default)]
struct Indexed {
    groups: Vec<GroupDoc>,
    /// Group `_id` → position in `groups`.
    by_id: HashMap<String, usize>,
    /// Every stored record's id.
    record_ids: HashSet<String>,
    /// Source → position of its group with the highest `wseq`.
    last_by_source: HashMap<String, usize>,
}

impl Indexed {
    fn note_written(&mut self, index: usize) {
        let group = &self.groups[index];
        let newer = match self.last_by_source.get(&group.source) {
            Some(&last) => group.wseq >= self.groups[last].wseq,
            None => true,
        };
        if newer {
            self.last_by_source.insert(group.source.clone(), index);
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every call fail while a file exists at `path` (the chaos suite's switch).
    pub fn failing_while_exists(mut self, path: PathBuf) -> Self {
        self.fail_while = Some(Arc::new(path));
        self
    }

    /// False while the store is set to fail, as an unreachable database would be.
    pub fn is_available(&self) -> bool {
        !self.failing.load(Ordering::SeqCst)
            && !self.fail_while.as_ref().is_some_and(|p| p.exists())
    }

    /// Makes every call fail (an unreachable database) until set back.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// A copy of every group, in creation order.
    pub fn groups(&self) -> Vec<GroupDoc> {
        self.lock().groups.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Indexed> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self) -> anyhow::Result<()> {
        if !self.is_available() {
            anyhow::bail!("in-memory store set to fail");
        }
        Ok(())
    }
}

impl GroupStore for MemoryStore {
    async fn last_group(&mut self, source: &str) -> anyhow::Result<Option<OpenGroup>> {
        self.check()?;
        let store = self.lock();
        Ok(store
            .last_by_source
            .get(source)
            .map(|&index| store.groups[index].open()))
    }

    async fn max_wseq(&mut self) -> anyhow::Result<u64> {
        self.check()?;
        let store = self.lock();
        Ok(store
            .last_by_source
            .values()
            .map(|&index| store.groups[index].wseq)
            .max()
            .unwrap_or(0))
    }

    async fn stored_ids(&mut self, ids: &[String]) -> anyhow::Result<HashSet<String>> {
        self.check()?;
        let store = self.lock();
        Ok(ids
            .iter()
            .filter(|id| store.record_ids.contains(*id))
            .cloned()
            .collect())
    }

    async fn apply(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        self.check()?;
        let mut store = self.lock();
        // As MongoDB does it (see `mongo.rs`): an insert of an existing `_id` becomes an append
        // of what the group lacks; an append adds only missing records and fails on a missing
        // group.
        for op in ops {
            let (id, records, wseq, at) = match op {
                Op::Insert(doc) => {
                    if !store.by_id.contains_key(&doc.id) {
                        let index = store.groups.len();
                        store.by_id.insert(doc.id.clone(), index);
                        for record in &doc.records {
                            store.record_ids.insert(record.id.clone());
                        }
                        store.groups.push(doc.clone());
                        store.note_written(index);
                        continue;
                    }
                    (&doc.id, &doc.records[1..], doc.wseq, doc.updated_at)
                }
                Op::Append {
                    id,
                    records,
                    wseq,
                    at,
                } => (id, &records[..], *wseq, *at),
            };
            let Some(&index) = store.by_id.get(id) else {
                anyhow::bail!("appending to group {id}: the group does not exist");
            };
            let group = &store.groups[index];
            let missing: Vec<Record> = records
                .iter()
                .filter(|r| !group.records.iter().any(|g| g.id == r.id))
                .cloned()
                .collect();
            if !missing.is_empty() {
                for record in &missing {
                    store.record_ids.insert(record.id.clone());
                }
                let group = &mut store.groups[index];
                group.records.extend(missing);
                group.wseq = wseq;
                group.updated_at = at;
                store.note_written(index);
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
    /// Open groups of the sources seen since the last (re)read of the store.
    open: OpenGroups,
    /// The next write sequence, once recovered from the store.
    next_wseq: Option<u64>,
}

impl<G: GroupStore> NestingStore<G> {
    /// A writer over `groups` nesting at most `max_nest` records per document.
    pub fn new(groups: G, max_nest: usize) -> Self {
        Self {
            groups,
            max_nest,
            open: OpenGroups::new(),
            next_wseq: None,
        }
    }

    async fn store_batch(&mut self, records: &[Record]) -> anyhow::Result<StoreReport> {
        let mut next_wseq = match self.next_wseq {
            Some(next) => next,
            None => self.groups.max_wseq().await? + 1,
        };
        let mut open = self.open.clone();
        for record in records {
            if !open.contains_key(&record.source) {
                let group = self.groups.last_group(&record.source).await?;
                tracing::debug!(source = %record.source, open_group = ?group, "recovered the open group from the store");
                open.insert(record.source.clone(), group);
            }
        }
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let stored = self.groups.stored_ids(&ids).await?;
        let mut seen = HashSet::new();
        let fresh: Vec<Record> = records
            .iter()
            .filter(|r| !stored.contains(&r.id) && seen.insert(r.id.clone()))
            .cloned()
            .collect();
        let ops = plan(&mut open, &fresh, self.max_nest, &mut next_wseq, Utc::now());
        self.groups.apply(&ops).await?;
        self.open = open;
        self.next_wseq = Some(next_wseq);
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
            self.open.clear();
            self.next_wseq = None;
        }
        result
    }
}

#[cfg(test)]
mod tests;
