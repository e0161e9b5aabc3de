//! The shell every writer shares: probe port, health, the database's circuit breaker, the
//! consumer loop, the grace period and shutdown. A writer crate is its configuration plus a
//! [`Database`]; everything else lives here, so a third writer is a store and a config away.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Breaker, BreakerSettings, BreakerState};
use crate::health::{Health, Reachability};
use crate::link::LinkStatus;
use crate::progress::Tally;
use crate::writers::consumer::{self, ConsumerProgress, ConsumerSettings, RecordStore, StoreGate};

/// How often the database's reachability is checked for health.
const PING_EVERY: Duration = Duration::from_secs(2);
/// After this long without reaching the database, one clear error line says so.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(7);
/// How long closing the database's connections may take at the end of a stop.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// The database a writer stores into, as the shell needs it. Clones share one client or pool.
pub trait Database: Clone + Send + Sync + 'static {
    /// What stores a batch.
    type Store: RecordStore;

    /// The writer's name (`pg-writer`): its service, its queue and its metric label.
    const WRITER: &'static str;

    /// The name of the breaker guarding the database (metric label value).
    const BREAKER: &'static str;

    /// The health component's name (`postgresql`, `mongodb`).
    fn name(&self) -> &'static str;

    /// True when the database answers now (a cheap round trip).
    fn ping(&self) -> impl Future<Output = bool> + Send;

    /// The store the consumer writes through.
    fn store(&self) -> Self::Store;

    /// Work before consuming (migrations, indexes). A failure is logged, not fatal: the
    /// database may come later, and the store prepares again before its first batch.
    fn prepare(&self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }

    /// Releases connections after the last batch.
    fn close(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Everything the shell needs to know of a writer.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// How the writer reads its queue; `consumer.writer` names the service, its queue and
    /// its metric label.
    pub consumer: ConsumerSettings,
    /// The breaker's name (metric label value) and settings.
    pub breaker: (&'static str, BreakerSettings),
    /// The probe port.
    pub http_addr: SocketAddr,
    /// Time allowed to finish the batch in hand on SIGTERM/SIGINT.
    pub grace: Duration,
    /// How often to log a progress line (zero: never).
    pub progress_every: Duration,
    /// The partitions of its queue this writer consumes, one consumer each (§4
    /// "Partitions"); empty: its own queue, whole.
    pub partitions: Vec<u16>,
}

/// A writer with its probe port bound, not yet consuming.
pub struct Writer<D: Database> {
    settings: WriterSettings,
    http_listener: TcpListener,
    database: D,
    breaker: Breaker,
    link: LinkStatus,
}

impl<D: Database> Writer<D> {
    /// Binds the probe port; nothing connects yet.
    pub async fn build(settings: WriterSettings, database: D) -> anyhow::Result<Self> {
        crate::metrics::install(settings.consumer.writer)
            .context("installing the metrics recorder")?;
        let http_listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("binding the HTTP port {}", settings.http_addr))?;
        let (name, breaker_settings) = settings.breaker.clone();
        Ok(Self {
            breaker: Breaker::new(name, breaker_settings),
            link: LinkStatus::new("amqp"),
            settings,
            http_listener,
            database,
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The database's breaker.
    pub fn breaker(&self) -> Breaker {
        self.breaker.clone()
    }

    /// The RabbitMQ link.
    pub fn link(&self) -> LinkStatus {
        self.link.clone()
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &WriterSettings {
        &self.settings
    }

    /// Consumes until `shutdown` fires, then finishes the batch in hand (within the grace
    /// period) and stops. In order: probes served, database prepared, consuming, stopping.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            settings,
            http_listener,
            database,
            breaker,
            link,
        } = self;
        let writer = settings.consumer.writer;
        let background = CancellationToken::new();
        let ping = database.clone();
        let reachable = Reachability::spawn(PING_EVERY, background.clone(), move || {
            let database = ping.clone();
            async move { database.ping().await }
        });
        let consumers = settings.consumer.per_partition(&settings.partitions);
        // One RabbitMQ link per consumer; the first is the writer's own.
        let links: Vec<LinkStatus> = std::iter::once(link)
            .chain((1..consumers.len()).map(|_| LinkStatus::new("amqp")))
            .collect();
        let queues: Vec<String> = consumers.iter().map(ConsumerSettings::queue).collect();
        let health = health_of(&queues, &database, &breaker, &links, &reachable);
        let http = crate::http::spawn(writer, http_listener, health.clone(), background.clone())?;

        prepare(&database, settings.consumer.store_timeout).await;
        say_once_if_unreachable(writer, database.name(), &reachable, &background);
        tracing::info!(http = %settings.http_addr, database = database.name(), "{writer} started");

        // Consume only while the database answers and its breaker is not open.
        let gate_reachable = reachable.clone();
        let gate_breaker = breaker.clone();
        let gate: StoreGate =
            Arc::new(move || gate_reachable.is_up() && gate_breaker.state() != BreakerState::Open);
        let progress = Arc::new(ConsumerProgress::default());
        spawn_progress_line(
            &settings,
            queues,
            database.name(),
            progress.clone(),
            reachable,
            breaker.clone(),
            links.clone(),
            background.clone(),
        );
        // Every consumer in one task, so a stop past the grace period aborts them all.
        let runs: Vec<_> = consumers
            .into_iter()
            .zip(links)
            .map(|(consumer, link)| {
                consumer::run(
                    consumer,
                    database.store(),
                    breaker.clone(),
                    link,
                    gate.clone(),
                    progress.clone(),
                    shutdown.clone(),
                )
            })
            .collect();
        let consuming = tokio::spawn(async move {
            futures_util::future::join_all(runs).await;
        });

        shutdown.cancelled().await;
        health.set_draining();
        stop(consuming, &database, settings.grace).await;
        background.cancel();
        let _ = http.await;
        tracing::info!("{writer} stopped");
        Ok(())
    }
}

/// The writer's health: its RabbitMQ links (with the queue of each; up when every one is) and
/// its database (reachable, breaker).
fn health_of<D: Database>(
    queues: &[String],
    database: &D,
    breaker: &Breaker,
    links: &[LinkStatus],
    reachable: &Reachability,
) -> Health {
    let health = Health::new();
    let queue = match queues {
        [one] => serde_json::json!(one),
        many => serde_json::json!(many),
    };
    let broker_links = links.to_vec();
    health.require("rabbitmq", move || {
        let link = broker_links
            .iter()
            .find(|link| !link.is_connected())
            .unwrap_or(&broker_links[0]);
        link.component()
            .with_details(serde_json::json!({"queue": queue}))
    });
    let (db_breaker, db_reachable) = (breaker.clone(), reachable.clone());
    health.require(database.name(), move || {
        db_breaker.component_with(&db_reachable)
    });
    health
}

/// Migrations or indexes before consuming, under the store deadline. A failure is logged: the
/// database may come later, and the store prepares again before its first batch.
async fn prepare<D: Database>(database: &D, deadline: Duration) {
    let prepared = tokio::time::timeout(deadline, database.prepare())
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "no answer within {} ms",
                deadline.as_millis()
            ))
        });
    if let Err(err) = prepared {
        tracing::warn!(
            database = database.name(),
            error = format!("{err:#}"),
            "database not reachable at startup; will retry"
        );
    }
}

/// One clear line when the database cannot be reached soon after start; the breaker logs the rest.
fn say_once_if_unreachable(
    writer: &'static str,
    name: &'static str,
    reachable: &Reachability,
    stop: &CancellationToken,
) {
    let (stop, reachable) = (stop.clone(), reachable.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(UNREACHABLE_AFTER) => if !reachable.is_up() {
                tracing::error!(database = name, "the database is not reachable: {writer} is not ready and its records wait in RabbitMQ");
            }
        }
    });
}

/// Lets the consumer finish the batch in hand within `grace`, then closes the database's
/// connections within [`CLOSE_WITHIN`]: a frozen database never holds the process.
async fn stop<D: Database>(
    mut consuming: tokio::task::JoinHandle<()>,
    database: &D,
    grace: Duration,
) {
    if tokio::time::timeout(grace, &mut consuming).await.is_err() {
        consuming.abort();
        tracing::warn!(
            "the batch in hand was not stored within the grace period; it will be redelivered"
        );
    }
    if tokio::time::timeout(CLOSE_WITHIN, database.close())
        .await
        .is_err()
    {
        tracing::warn!(
            database = database.name(),
            "the database did not close its connections within {} s; exiting without them",
            CLOSE_WITHIN.as_secs()
        );
    }
}

/// Logs the writer's progress line every `settings.progress_every`.
#[allow(clippy::too_many_arguments)]
fn spawn_progress_line(
    settings: &WriterSettings,
    queues: Vec<String>,
    database: &'static str,
    progress: Arc<ConsumerProgress>,
    reachable: Reachability,
    breaker: Breaker,
    links: Vec<LinkStatus>,
    stop: CancellationToken,
) {
    let writer = settings.consumer.writer;
    let mut received = Tally::default();
    let mut stored = Tally::default();
    crate::progress::spawn(settings.progress_every, stop, move |over| {
        let total_received = progress.received.load(Ordering::Relaxed);
        let total_stored = progress.stored.load(Ordering::Relaxed);
        let (received_since, stored_since) =
            (received.since(total_received), stored.since(total_stored));
        let progress = progress.clone();
        let queues = queues.clone();
        let (breaker, link) = (breaker.state(), links.iter().all(LinkStatus::is_connected));
        let waiting = progress.failing_for().or(reachable.down_for());
        async move {
            let mut queued = Some(0u32);
            for queue in &queues {
                queued = match (queued, progress.queued(queue).await) {
                    (Some(sum), Some(more)) => Some(sum + more),
                    _ => None,
                };
            }
            let held = progress.held.load(Ordering::Relaxed);
            let queued_text = queued.map_or("unknown".into(), |q| q.to_string());
            let message = match waiting {
                Some(waiting) => format!(
                    "waiting for {database} for {} s; {held} held; {queued_text} queued",
                    waiting.as_secs()
                ),
                None if !link => format!("waiting for RabbitMQ; {queued_text} queued"),
                None => format!(
                    "{stored_since} stored in the last {} s; {queued_text} queued",
                    over.as_secs()
                ),
            };
            tracing::info!(
                writer,
                received = received_since,
                received_total = total_received,
                stored = stored_since,
                stored_total = total_stored,
                duplicates_total = progress.duplicates.load(Ordering::Relaxed),
                dead_lettered_total = progress.dead_lettered.load(Ordering::Relaxed),
                rate_per_s = crate::progress::rate(stored_since, over),
                held,
                queued,
                consuming = progress.consuming.load(Ordering::Relaxed),
                breaker = breaker.as_str(),
                rabbitmq_connected = link,
                "progress: {message}"
            );
        }
    });
}

impl ConsumerSettings {
    /// The queue this writer consumes.
    pub fn queue(&self) -> String {
        match self.partition {
            Some(index) => self.topology.partition_queue(index).map(|q| q.name),
            None => self.topology.queue_for(self.writer).map(|q| q.name.clone()),
        }
        .unwrap_or_default()
    }

    /// True when the queue has a single active consumer (its records are stored in order).
    pub fn in_order(&self) -> bool {
        self.partition.is_some()
            || self
                .topology
                .queue_for(self.writer)
                .is_some_and(|queue| queue.single_active_consumer)
    }

    /// One consumer's settings for each of `partitions` (none: the writer's own queue).
    pub fn per_partition(&self, partitions: &[u16]) -> Vec<ConsumerSettings> {
        if partitions.is_empty() {
            return vec![self.clone()];
        }
        partitions
            .iter()
            .map(|&index| ConsumerSettings {
                partition: Some(index),
                ..self.clone()
            })
            .collect()
    }
}

/// The whole `main` of a writer binary: configuration, telemetry, `build`, then consume until
/// SIGTERM/SIGINT.
pub async fn main<C, D, F, Fut>(service: &'static str, build: F) -> std::process::ExitCode
where
    C: crate::service::ServiceConfig,
    D: Database,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = anyhow::Result<Writer<D>>>,
{
    crate::service::main(service, |config: C, shutdown| async move {
        build(config).await?.run_until_stopped(shutdown).await?;
        Ok(std::process::ExitCode::SUCCESS)
    })
    .await
}
