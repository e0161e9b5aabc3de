//! Building and running mongo-writer: bind the probe port, choose the store, consume until the
//! shutdown token fires and finish the batch in hand.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use flowmesh_common::breaker::Breaker;
use flowmesh_common::consumer::{self, ConsumerSettings, ConsumerStatus};
use flowmesh_common::health::{Health, Reachability};
use flowmesh_common::telemetry::redact_url;
use flowmesh_common::topology::Topology;
use mongodb::bson::doc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{MongoWriterConfig, StoreKind};
use crate::mongo::{self, MongoStore};
use crate::store::{MemoryStore, NestingStore};

/// Name of the breaker guarding MongoDB (metric label value).
pub const BREAKER_MONGODB: &str = "mongo_writer_mongodb";
/// The writer's name: its queue and its metric label.
pub const WRITER: &str = "mongo-writer";

/// A mongo-writer with its probe port bound, not yet consuming.
pub struct Application {
    config: MongoWriterConfig,
    http_listener: TcpListener,
    breaker: Breaker,
    status: ConsumerStatus,
    memory: MemoryStore,
}

impl Application {
    /// Binds the probe port.
    pub async fn build(config: MongoWriterConfig) -> anyhow::Result<Self> {
        flowmesh_common::metrics::install().context("installing the metrics recorder")?;
        let http_listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding the HTTP port {}", config.http_addr))?;
        let breaker = Breaker::new(BREAKER_MONGODB, config.breaker());
        Ok(Self {
            config,
            http_listener,
            breaker,
            status: ConsumerStatus::default(),
            memory: MemoryStore::new(),
        })
    }

    /// Uses `memory` as the in-memory store (tests share one across restarts, or make it fail).
    pub fn with_memory_store(mut self, memory: MemoryStore) -> Self {
        self.memory = memory;
        self
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The MongoDB breaker.
    pub fn breaker(&self) -> Breaker {
        self.breaker.clone()
    }

    /// Consumes until `shutdown` fires, then finishes the batch in hand and stops.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            config,
            http_listener,
            breaker,
            status,
            memory,
        } = self;
        let metrics = flowmesh_common::metrics::install().context("metrics recorder")?;
        let background = CancellationToken::new();
        let topology = Topology::new(&config.amqp_prefix, config.delivery_limit);
        let queue = topology
            .queue_for(WRITER)
            .map(|q| q.name.clone())
            .unwrap_or_default();
        let health = Health::new();
        let rabbit = status.clone();
        health.require("rabbitmq", move || rabbit.component(&queue));

        let settings = ConsumerSettings {
            url: config.amqp_url.clone(),
            topology,
            writer: WRITER,
            prefetch: config.prefetch,
            batch_max: config.batch_max,
            linger: config.linger,
        };
        let consuming = match config.store {
            StoreKind::Mongodb => {
                let client = mongo::client(&config.mongodb_url).await?;
                let ping_client = client.clone();
                let database = config.mongodb_database.clone();
                let reachable =
                    Reachability::spawn(Duration::from_secs(5), background.clone(), move || {
                        let client = ping_client.clone();
                        let database = database.clone();
                        async move {
                            client
                                .database(&database)
                                .run_command(doc! {"ping": 1})
                                .await
                                .is_ok()
                        }
                    });
                let watch = reachable.clone();
                let url = redact_url(&config.mongodb_url);
                tokio::spawn(async move {
                    // One clear line when MongoDB cannot be reached; the breaker logs the rest.
                    tokio::time::sleep(Duration::from_secs(7)).await;
                    if !watch.is_up() {
                        tracing::error!(url = %url, "MongoDB is not reachable: mongo-writer is not ready and its records wait in RabbitMQ");
                    }
                });
                let db_breaker = breaker.clone();
                health.require("mongodb", move || reachable.with_breaker(&db_breaker));
                let store = NestingStore::new(
                    MongoStore::new(
                        &client,
                        &config.mongodb_database,
                        &config.mongodb_collection,
                    ),
                    config.max_nest,
                );
                tokio::spawn(consumer::run(
                    settings,
                    store,
                    breaker,
                    status,
                    shutdown.clone(),
                ))
            }
            StoreKind::Memory => {
                tracing::warn!(
                    "using the in-memory store: groups are lost when this process exits"
                );
                let db_breaker = breaker.clone();
                health.require("memory_store", move || db_breaker.component());
                let store = NestingStore::new(memory, config.max_nest);
                tokio::spawn(consumer::run(
                    settings,
                    store,
                    breaker,
                    status,
                    shutdown.clone(),
                ))
            }
        };
        let http = flowmesh_common::http::spawn(
            http_listener,
            health.clone(),
            metrics,
            background.clone(),
        );
        tracing::info!(http = %config.http_addr, store = ?config.store, max_nest = config.max_nest, "mongo-writer started");
        shutdown.cancelled().await;
        health.set_draining();
        if tokio::time::timeout(config.grace, consuming).await.is_err() {
            tracing::warn!(
                "the batch in hand was not stored within the grace period; it will be redelivered"
            );
        }
        background.cancel();
        let _ = http.await;
        tracing::info!("mongo-writer stopped");
        Ok(())
    }
}
