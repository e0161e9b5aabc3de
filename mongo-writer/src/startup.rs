//! mongo-writer as a [`Writer`]: MongoDB (or the in-memory twin) behind the nesting store is its
//! [`Database`]; the shell in `flowmesh_common` does the rest.

use flowmesh_common::writers::{Database, Writer};

use crate::config::{MongoWriterConfig, StoreKind};
use crate::groups::Groups;
use crate::mongo::MongoStore;
use crate::store::{GroupStore, MemoryStore, NestingStore};

/// A mongo-writer with its probe port bound, not yet consuming.
pub type Application = Writer<GroupDatabase>;

/// Where the groups live, and the nesting bound they are written with.
#[derive(Debug, Clone)]
pub struct GroupDatabase {
    groups: Groups,
    max_nest: usize,
}

impl Database for GroupDatabase {
    type Store = NestingStore<Groups>;
    const WRITER: &'static str = "mongo-writer";
    const BREAKER: &'static str = "mongo_writer_mongodb";

    fn name(&self) -> &'static str {
        match self.groups {
            Groups::Mongo(_) => "mongodb",
            Groups::Memory(_) => "memory_store",
        }
    }

    async fn ping(&self) -> bool {
        match &self.groups {
            Groups::Mongo(store) => store.ping().await,
            Groups::Memory(store) => store.is_available(),
        }
    }

    fn store(&self) -> Self::Store {
        NestingStore::new(self.groups.clone(), self.max_nest)
    }

    async fn prepare(&self) -> anyhow::Result<()> {
        self.groups.clone().prepare().await
    }
}

/// Binds the probe port and creates the store named by `--store`; nothing connects yet.
pub async fn build(config: MongoWriterConfig) -> anyhow::Result<Application> {
    let groups = match config.store {
        StoreKind::Mongodb => Groups::Mongo(
            MongoStore::connect(
                config.mongodb_url.expose(),
                &config.mongodb_database,
                &config.mongodb_collection,
            )
            .await?
            // The server gives up on a read a little before the consumer's own bound.
            .with_deadline(config.writer.consumer.store_timeout.mul_f64(0.8)),
        ),
        StoreKind::Memory => {
            tracing::warn!("using the in-memory store: groups are lost when this process exits");
            let mut memory = MemoryStore::new();
            if let Some(path) = &config.memory_fail_while {
                memory = memory.failing_while_exists(path.clone());
            }
            Groups::Memory(memory)
        }
    };
    build_with(config, groups).await
}

/// [`build`] over the given groups (tests share one in-memory store across restarts).
pub async fn build_with(config: MongoWriterConfig, groups: Groups) -> anyhow::Result<Application> {
    tracing::info!(store = ?config.store, max_nest = config.max_nest, "mongo-writer store");
    let mut settings = config.writer.settings::<GroupDatabase>()?;
    settings.partitions = config
        .consumed_partitions()
        .map_err(|why| anyhow::anyhow!(why))?;
    let database = GroupDatabase {
        groups,
        max_nest: config.max_nest,
    };
    Writer::build(settings, database).await
}
