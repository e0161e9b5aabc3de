//! pg-writer as a [`Writer`]: PostgreSQL is its [`Database`]; the shell in `flowmesh_common`
//! does the rest.

use flowmesh_common::writers::{Database, Writer};
use sqlx::PgPool;

use crate::config::PgWriterConfig;
use crate::store::{self, PgStore};

/// How long a health check's `select 1` may wait for its answer.
const PING_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// A pg-writer with its probe port bound, not yet consuming.
pub type Application = Writer<Postgres>;

/// PostgreSQL through a lazily connecting pool.
#[derive(Debug, Clone)]
pub struct Postgres {
    pool: PgPool,
    /// The store deadline the inserts are bounded by (a little under the consumer's).
    deadline: std::time::Duration,
}

impl Database for Postgres {
    type Store = PgStore;
    const WRITER: &'static str = "pg-writer";
    const BREAKER: &'static str = "pg_writer_postgresql";

    fn name(&self) -> &'static str {
        "postgresql"
    }

    async fn ping(&self) -> bool {
        let Ok(mut connection) = self.pool.acquire().await else {
            return false;
        };
        let ping = sqlx::query("select 1").execute(&mut *connection);
        match tokio::time::timeout(PING_WITHIN, ping).await {
            Ok(answered) => answered.is_ok(),
            Err(_) => {
                // As for an insert: a connection without an answer is closed, not kept.
                connection.close_on_drop();
                false
            }
        }
    }

    fn store(&self) -> PgStore {
        PgStore::new(self.pool.clone(), self.deadline)
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
    let deadline = config.writer.consumer.store_timeout;
    let pool = store::pool(
        config.postgres.database_url.expose(),
        config.pool_size,
        deadline,
    )?;
    let settings = config.writer.settings::<Postgres>()?;
    // The insert gives up a little before the consumer's own bound, closing its connection.
    let database = Postgres {
        pool,
        deadline: deadline.mul_f64(0.9),
    };
    Writer::build(settings, database).await
}
