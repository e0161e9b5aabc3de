//! The store a running mongo-writer uses, chosen by `--store`: MongoDB, or the in-memory twin.

use std::collections::HashSet;

use crate::mongo::MongoStore;
use crate::nesting::{Op, OpenGroup};
use crate::store::{GroupStore, MemoryStore};

/// The store a running writer uses: MongoDB, or the in-memory twin (`--store memory`).
#[derive(Debug, Clone)]
pub enum Groups {
    /// MongoDB through the official driver.
    Mongo(MongoStore),
    /// This process's memory.
    Memory(MemoryStore),
}

impl GroupStore for Groups {
    fn collection_name(&self) -> String {
        match self {
            Self::Mongo(store) => store.collection_name(),
            Self::Memory(store) => store.collection_name(),
        }
    }

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
