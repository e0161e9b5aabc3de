//! pg-writer as a [`Writer`]: PostgreSQL is its [`Database`]; the shell in `flowmesh_common`
//! does the rest.

use flowmesh_common::writer::{Database, Writer};
use sqlx::PgPool;

use crate::config::PgWriterConfig;
use crate::store::{self, PgStore};

/// A pg-writer with its probe port bound, not yet consuming.
pub type Application = Writer<Postgres>;

/// PostgreSQL through a lazily connecting pool.
#[derive(Debug, Clone)]
pub struct Postgres {
    pool: PgPool,
}

impl Database for Postgres {
    type Store = PgStore;
    const WRITER: &'static str = "pg-writer";
    const BREAKER: &'static str = "pg_writer_postgresql";

    fn name(&self) -> &'static str {
        "postgresql"
    }

    async fn ping(&self) -> bool {
        sqlx::query("select 1").execute(&self.pool).await.is_ok()
    }

    fn store(&self) -> PgStore {
        PgStore::new(self.pool.clone())
    }

    async fn prepare(&self) -> anyhow::Result<()> {
        store::migrate(&self.pool).await
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// Binds the probe port and prepares the pool; nothing connects yet.
pub async fn build(config: PgWriterConfig) -> anyhow::Result<Application> {
    let pool = store::pool(config.postgres.database_url.expose(), config.pool_size)?;
    let settings = config.writer.settings::<Postgres>();
    Writer::build(settings, Postgres { pool }).await
}
