//! The PostgreSQL side: embedded migrations and one set-based, idempotent INSERT per batch.

use std::time::Duration;

use anyhow::Context;
use flowmesh_common::consumer::{RecordStore, StoreReport};
use flowmesh_common::record::{Record, parse_timestamp};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The migrations in `pg-writer/migrations`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// One statement for the whole batch: arrays in, `on conflict do nothing` for redeliveries.
const INSERT: &str = "
    insert into records (id, source, seq, ts, value, hash)
    select * from unnest($1::uuid[], $2::text[], $3::int8[], $4::timestamptz[], $5::int2[], $6::text[])
    on conflict (id) do nothing";

/// A lazily connecting pool: the writer starts (and reports not ready) while PostgreSQL is down.
pub fn pool(url: &str, size: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(url)
        .context("parsing DATABASE_URL")
}

/// Runs the embedded migrations (idempotent).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("running migrations")
}

/// Stores records in the `records` table.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    migrated: bool,
}

impl PgStore {
    /// A store over `pool`; migrations run before the first batch.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            migrated: false,
        }
    }
}

impl RecordStore for PgStore {
    async fn store(&mut self, records: &[Record]) -> anyhow::Result<StoreReport> {
        if !self.migrated {
            migrate(&self.pool).await?;
            self.migrated = true;
        }
        let mut ids = Vec::with_capacity(records.len());
        let mut sources = Vec::with_capacity(records.len());
        let mut seqs = Vec::with_capacity(records.len());
        let mut times = Vec::with_capacity(records.len());
        let mut values = Vec::with_capacity(records.len());
        let mut hashes = Vec::with_capacity(records.len());
        for record in records {
            // Validation upstream guarantees these parse; a failure here is a bug, not bad input.
            ids.push(uuid::Uuid::parse_str(&record.id).context("record id")?);
            sources.push(record.source.clone());
            seqs.push(i64::try_from(record.seq).context("record seq")?);
            times.push(parse_timestamp(&record.timestamp).context("record timestamp")?);
            values.push(i16::from(record.value));
            hashes.push(record.hash.clone());
        }
        let result = sqlx::query(INSERT)
            .bind(ids)
            .bind(sources)
            .bind(seqs)
            .bind(times)
            .bind(values)
            .bind(hashes)
            .execute(&self.pool)
            .await
            .context("inserting a batch")?;
        let stored = result.rows_affected();
        Ok(StoreReport {
            stored,
            duplicates: records.len() as u64 - stored,
        })
    }
}
