//! Test support (feature `testkit`): a PostgreSQL database created for one test and dropped
//! after it, on the server `DATABASE_URL` names.

use sqlx::PgPool;

/// `DATABASE_URL`, or the local default.
pub fn base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/flowmesh".into())
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (server, _) = url.rsplit_once('/').expect("URL has a database");
    format!("{server}/{database}")
}

/// A database created for one test.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
    admin: PgPool,
}

impl TestDb {
    /// Creates a fresh, empty database.
    pub async fn create() -> Self {
        let admin = PgPool::connect(&with_database(&base_url(), "postgres"))
            .await
            .expect("PostgreSQL reachable at DATABASE_URL");
        let name = format!("flowmesh_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("create database {name}"))
            .execute(&admin)
            .await
            .expect("create database");
        let url = with_database(&base_url(), &name);
        Self { name, url, admin }
    }

    /// A pool on the test database.
    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url).await.expect("test database")
    }

    /// Drops the database.
    pub async fn drop(self) {
        let _ = sqlx::query(&format!(
            "drop database if exists {} with (force)",
            self.name
        ))
        .execute(&self.admin)
        .await;
    }
}

/// Rows in the `records` table (0 before the first migration made it).
pub async fn rows(pool: &PgPool) -> i64 {
    use sqlx::Row;
    sqlx::query("select count(*) from records")
        .fetch_one(pool)
        .await
        .map_or(0, |row| row.get(0))
}
