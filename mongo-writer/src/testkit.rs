//! Test support (feature `testkit`, and this crate's own tests): a store wrapper that crashes in
//! the middle of a batch's writes, the same around MongoDB and around the in-memory twin.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::nesting::{Op, OpenGroup};
use crate::store::GroupStore;

/// Wraps a store; after [`crash_next_apply_after`](Self::crash_next_apply_after)`(k)`, the next
/// `apply` performs only its first `k` operations and fails. Clones share the switch.
#[derive(Debug, Clone, Default)]
pub struct Crashing<G> {
    /// The store written to.
    pub inner: G,
    limit: Arc<Mutex<Option<usize>>>,
}

impl<G> Crashing<G> {
    /// Wraps `inner`.
    pub fn new(inner: G) -> Self {
        Self {
            inner,
            limit: Arc::default(),
        }
    }

    /// Arms (or with `None` disarms) a crash of the next `apply` after `k` operations.
    pub fn crash_next_apply_after(&self, k: Option<usize>) {
        *self.limit.lock().unwrap_or_else(|e| e.into_inner()) = k;
    }
}

impl<G: GroupStore + Clone + Sync> GroupStore for Crashing<G> {
    async fn last_group(&mut self, source: &str) -> anyhow::Result<Option<OpenGroup>> {
        self.inner.last_group(source).await
    }
    async fn max_wseq(&mut self) -> anyhow::Result<u64> {
        self.inner.max_wseq().await
    }
    async fn stored_ids(&mut self, ids: &[String]) -> anyhow::Result<HashSet<String>> {
        self.inner.stored_ids(ids).await
    }
    async fn apply(&mut self, ops: &[Op]) -> anyhow::Result<()> {
        let limit = self.limit.lock().unwrap_or_else(|e| e.into_inner()).take();
        match limit {
            Some(k) => {
                let k = k.min(ops.len());
                self.inner.apply(&ops[..k]).await?;
                anyhow::bail!("crashed after {k} of {} writes", ops.len())
            }
            None => self.inner.apply(ops).await,
        }
    }
}
