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
use flowmesh_common::record::Record;
use flowmesh_common::writers::consumer::{Contended, RecordStore, StoreReport};
use flowmesh_common::writers::traced::StoreTarget;

use crate::nesting::{Append, GroupDoc, Op, OpenGroup, OpenGroups, plan};

/// A write refused because the store is no longer as the plan saw it: another writer (or an
/// earlier attempt of this one) wrote first. The writer re-reads the store and plans again.
///
/// This is the fence between writers (docs/contracts.md §6): an append applies only to a group
/// whose count and write sequence are those it was planned from, no record id may stand in two
/// groups, and no two groups may share a write sequence.
#[derive(Debug, thiserror::Error)]
#[error("write conflict: {0}")]
pub struct Conflict(pub String);

/// How many times one batch is planned again after a [`Conflict`] before the call gives up as
/// [`Contended`](flowmesh_common::writers::consumer::Contended): writers of other partitions
/// share the collection's write sequences, so under load they keep taking the numbers a plan
/// chose. The consumer tries the batch again after a short jittered pause, as contention,
/// not as a failure of the database.
pub const MAX_REPLANS: usize = 8;

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
    /// Performs the operations in order, stopping at the first that fails. An insert whose
    /// `_id`, write sequence or any record id is stored already, and an append to a group that
    /// is missing or no longer in the state it was planned from (or that would store a record
    /// id twice or reuse a write sequence), fail with [`Conflict`]; the operations before it
    /// stay written.
    fn apply(&mut self, ops: &[Op]) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Work before the first batch (indexes); done again lazily if it fails here.
    fn prepare(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }
    /// The collection written, for the store's spans.
    fn collection_name(&self) -> String {
        "records".to_owned()
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
    /// Every group's `wseq` (unique, as MongoDB's index makes it).
    wseqs: HashSet<u64>,
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
        // As MongoDB does it (see `mongo.rs`): unique `_id`, `records.id` and `wseq`, and an
        // append guarded by the group's count and wseq.
        for op in ops {
            match op {
                Op::Insert(doc) => {
                    if store.by_id.contains_key(&doc.id) {
                        return Err(Conflict(format!("group {} exists already", doc.id)).into());
                    }
                    store.check_new(&doc.records, doc.wseq)?;
                    let index = store.groups.len();
                    store.by_id.insert(doc.id.clone(), index);
                    store
                        .record_ids
                        .extend(doc.records.iter().map(|r| r.id.clone()));
                    store.wseqs.insert(doc.wseq);
                    store.groups.push(doc.clone());
                    store.note_written(index);
                }
                Op::Append(Append {
                    id,
                    seen,
                    records,
                    wseq,
                    at,
                }) => {
                    let index = store.as_planned(id, *seen)?;
                    store.check_new(records, *wseq)?;
                    let old_wseq = store.groups[index].wseq;
                    store.wseqs.remove(&old_wseq);
                    store.wseqs.insert(*wseq);
                    store
                        .record_ids
                        .extend(records.iter().map(|r| r.id.clone()));
                    let group = &mut store.groups[index];
                    group.records.extend(records.iter().cloned());
                    group.wseq = *wseq;
                    group.updated_at = *at;
                    store.note_written(index);
                }
            }
        }
        Ok(())
    }
}

impl Indexed {
    /// The position of group `id` if it exists and holds `seen.0` records at write
    /// sequence `seen.1`; a [`Conflict`] otherwise.
    fn as_planned(&self, id: &str, seen: (usize, u64)) -> Result<usize, Conflict> {
        let Some(&index) = self.by_id.get(id) else {
            return Err(Conflict(format!("group {id} does not exist")));
        };
        let group = &self.groups[index];
        if (group.records.len(), group.wseq) != seen {
            return Err(Conflict(format!(
                "group {id} is no longer at {} records and write sequence {}",
                seen.0, seen.1
            )));
        }
        Ok(index)
    }

    /// Refuses records already stored and a write sequence already taken, as MongoDB's unique
    /// indexes do.
    fn check_new(&self, records: &[Record], wseq: u64) -> Result<(), Conflict> {
        if let Some(record) = records.iter().find(|r| self.record_ids.contains(&r.id)) {
            return Err(Conflict(format!("record {} is stored already", record.id)));
        }
        if self.wseqs.contains(&wseq) {
            return Err(Conflict(format!("write sequence {wseq} is taken")));
        }
        Ok(())
    }
}

/// Turns batches of records into group writes on a [`GroupStore`].
///
/// Each batch is planned from the store as it is now, read in this order: which of the
/// records are stored already, then the highest write sequence, then each source's open group.
/// That order, with the store's fence ([`Conflict`]), is what keeps two writers from corrupting
/// a group: anything another writer stores for a source after the first read includes the
/// source's first record this batch would write, so this batch's first write for that source
/// conflicts (a record id stored twice, a write sequence taken, or a group no longer as read),
/// and the batch is planned again from the new state. Nothing is cached between batches: a
/// writer that lost its queue to another and got it back never plans from what it saw before.
#[derive(Debug)]
pub struct NestingStore<G> {
    groups: G,
    max_nest: usize,
}

impl<G: GroupStore> NestingStore<G> {
    /// A writer over `groups` nesting at most `max_nest` records per document.
    pub fn new(groups: G, max_nest: usize) -> Self {
        Self { groups, max_nest }
    }

    async fn store_batch(&mut self, records: &[Record]) -> anyhow::Result<StoreReport> {
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let stored = self.groups.stored_ids(&ids).await?;
        let mut next_wseq = self.groups.max_wseq().await? + 1;
        let mut seen = HashSet::new();
        let fresh: Vec<Record> = records
            .iter()
            .filter(|r| !stored.contains(&r.id) && seen.insert(r.id.clone()))
            .cloned()
            .collect();
        let mut open = OpenGroups::new();
        for record in &fresh {
            if !open.contains_key(&record.source) {
                let group = self.groups.last_group(&record.source).await?;
                tracing::debug!(source = %record.source, open_group = ?group, "read the open group from the store");
                open.insert(record.source.clone(), group);
            }
        }
        let ops = plan(&mut open, &fresh, self.max_nest, &mut next_wseq, Utc::now());
        self.groups.apply(&ops).await?;
        Ok(StoreReport {
            stored: fresh.len() as u64,
            duplicates: (records.len() - fresh.len()) as u64,
        })
    }
}

impl<G: GroupStore> RecordStore for NestingStore<G> {
    fn target(&self) -> StoreTarget {
        // Inserts of new groups and appends to open ones, in one ordered series of writes.
        StoreTarget {
            system: "mongodb",
            operation: "write",
            collection: self.groups.collection_name(),
        }
    }

    async fn store(&mut self, records: &[Record]) -> anyhow::Result<StoreReport> {
        let mut replans = 0;
        loop {
            let result = self.store_batch(records).await;
            let Err(err) = result else {
                return result;
            };
            // Part of the batch may have been written, or another writer wrote first: the
            // next try plans from what the store holds then.
            match err.downcast_ref::<Conflict>() {
                Some(conflict) if replans < MAX_REPLANS => {
                    replans += 1;
                    tracing::info!(error = %conflict, replans, "the store changed under this writer; planning the batch again from what it holds");
                }
                Some(conflict) => {
                    return Err(anyhow::Error::new(Contended(format!(
                        "planned {} times, other writers kept writing first: {conflict}",
                        replans + 1
                    ))));
                }
                None => return Err(err),
            }
        }
    }
}

#[cfg(test)]
mod tests;
