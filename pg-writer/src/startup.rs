//! Building and running pg-writer: bind the probe port, then consume until the shutdown token
//! fires and finish the batch in hand.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use flowmesh_common::breaker::Breaker;
use flowmesh_common::consumer::{self, ConsumerSettings, ConsumerStatus};
use flowmesh_common::health::{Health, Reachability};
use flowmesh_common::topology::Topology;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::PgWriterConfig;
use crate::store::{self, PgStore};

/// Name of the breaker guarding PostgreSQL (metric label value).
pub const BREAKER_POSTGRESQL: &str = "pg_writer_postgresql";
/// The writer's name: its queue and its metric label.
pub const WRITER: &str = "pg-writer";

/// A pg-writer with its probe port bound, not yet consuming.
pub struct Application {
    config: PgWriterConfig,
    http_listener: TcpListener,
    pool: PgPool,
    breaker: Breaker,
    status: ConsumerStatus,
}

impl Application {
    /// Binds the probe port and prepares a lazily connecting pool.
    pub async fn build(config: PgWriterConfig) -> anyhow::Result<Self> {
        flowmesh_common::metrics::install().context("installing the metrics recorder")?;
        let http_listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding the HTTP port {}", config.http_addr))?;
        let pool = store::pool(&config.database_url, config.pool_size)?;
        let breaker = Breaker::new(BREAKER_POSTGRESQL, config.breaker());
        Ok(Self {
            config,
            http_listener,
            pool,
            breaker,
            status: ConsumerStatus::default(),
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The PostgreSQL breaker.
    pub fn breaker(&self) -> Breaker {
        self.breaker.clone()
    }

    /// The RabbitMQ consumer's state.
    pub fn status(&self) -> ConsumerStatus {
        self.status.clone()
    }

    /// Consumes until `shutdown` fires, then finishes the batch in hand and stops.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            config,
            http_listener,
            pool,
            breaker,
            status,
        } = self;
        let metrics = flowmesh_common::metrics::install().context("metrics recorder")?;
        let background = CancellationToken::new();
        let ping_pool = pool.clone();
        let reachable =
            Reachability::spawn(Duration::from_secs(2), background.clone(), move || {
                let pool = ping_pool.clone();
                async move { sqlx::query("select 1").execute(&pool).await.is_ok() }
            });
        let topology = Topology::new(&config.amqp_prefix, config.delivery_limit);
        let queue = topology
            .queue_for(WRITER)
            .map(|q| q.name.clone())
            .unwrap_or_default();
        let health = Health::new();
        let rabbit = status.clone();
        health.require("rabbitmq", move || rabbit.component(&queue));
        let db_breaker = breaker.clone();
        health.require("postgresql", move || reachable.with_breaker(&db_breaker));
        let http = flowmesh_common::http::spawn(
            http_listener,
            health.clone(),
            metrics,
            background.clone(),
        );

        if let Err(err) = store::migrate(&pool).await {
            // Not fatal: PostgreSQL may come later; the store migrates before its first batch.
            tracing::warn!(
                error = format!("{err:#}"),
                "PostgreSQL not reachable at startup; will retry"
            );
        }
        tracing::info!(http = %config.http_addr, "pg-writer started");
        let settings = ConsumerSettings {
            url: config.amqp_url.clone(),
            topology,
            writer: WRITER,
            prefetch: config.prefetch,
            batch_max: config.batch_max,
            linger: config.linger,
        };
        let consuming = tokio::spawn(consumer::run(
            settings,
            PgStore::new(pool.clone()),
            breaker,
            status,
            shutdown.clone(),
        ));
        shutdown.cancelled().await;
        health.set_draining();
        if tokio::time::timeout(config.grace, consuming).await.is_err() {
            tracing::warn!(
                "the batch in hand was not stored within the grace period; it will be redelivered"
            );
        }
        pool.close().await;
        background.cancel();
        let _ = http.await;
        tracing::info!("pg-writer stopped");
        Ok(())
    }
}
