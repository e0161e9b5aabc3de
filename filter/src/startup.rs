//! Building and running the filter: bind the listeners (port 0 allowed), start the sinks, serve
//! until the shutdown token fires, then drain in order — intake, sinks, probes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use flowmesh_common::breaker::Breaker;
use flowmesh_common::health::{Component, ComponentStatus, Health};
use flowmesh_common::link::LinkStatus;
use flowmesh_common::progress::Tally;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::broker::{BrokerConfig, BrokerSink};
use crate::config::FilterConfig;
use crate::dispatch::Dispatcher;
use crate::file_sink::{FileSink, FileSinkConfig};
use crate::ingest::{self, IngestSettings, IntakeTally};
use crate::live_routes::RoutesHandle;
use flowmesh_common::token::Tokens;

/// Breaker names (metric label values), one per guarded dependency.
pub const BREAKER_BROKER: &str = "filter_rabbitmq";
/// Breaker of the records file.
pub const BREAKER_FILE: &str = "filter_file";
/// Breaker of the dead-letter file.
pub const BREAKER_DEAD_LETTER: &str = "filter_dead_letter_file";

/// A filter with its listeners bound and its sinks started, not yet serving.
pub struct Application {
    config: FilterConfig,
    ws_listener: TcpListener,
    http_listener: TcpListener,
    health: Health,
    dispatcher: Dispatcher,
    routes: RoutesHandle,
    routes_watch: CancellationToken,
    broker: BrokerSink,
    file: FileSink,
    sink_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Application {
    /// Binds both ports and starts the sinks (RabbitMQ connects in the background).
    pub async fn build(config: FilterConfig) -> anyhow::Result<Self> {
        flowmesh_common::metrics::install("filter").context("installing the metrics recorder")?;
        let ws_listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the WebSocket port {}", config.listen))?;
        let http_addr = config.service.http_addr;
        let http_listener = TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("binding the HTTP port {http_addr}"))?;

        let breaker_settings = config.breaker.settings();
        let (broker, broker_task) = BrokerSink::start(
            BrokerConfig {
                nodes: config.broker.nodes()?,
                topology: config
                    .broker
                    .topology()
                    .with_partitions(Some(config.broker.mongo_partitions), true),
                max_unconfirmed: config.max_unconfirmed,
                confirm_timeout: config.confirm_timeout,
                pack: config.publish_pack,
            },
            Breaker::new(BREAKER_BROKER, breaker_settings.clone()),
        );
        let file_config = |stem, dedupe_window, max_total_bytes| FileSinkConfig {
            dir: config.data_dir.clone(),
            stem,
            max_bytes: config.file_max_bytes,
            max_age: config.file_max_age,
            durability: config.durability,
            dedupe_window,
            max_total_bytes,
        };
        let records_config = file_config("records", config.dedupe_window, None);
        let records_path = records_config.active_path();
        let (file, file_task) = FileSink::start(
            records_config,
            Breaker::new(BREAKER_FILE, breaker_settings.clone()),
        );
        let (dead_letters, dead_task) = FileSink::start(
            file_config("dead-letter", 0, Some(config.dead_letter_max_bytes)),
            Breaker::new(BREAKER_DEAD_LETTER, breaker_settings),
        );

        let health = Health::new();
        let broker_link = broker.link();
        let broker_breaker = broker.breaker().clone();
        health.require("rabbitmq", move || broker_link.guarded_by(&broker_breaker));
        let file_breaker = file.breaker().clone();
        let durability = format!("{:?}", config.durability).to_lowercase();
        health.require("file", move || {
            file_breaker
                .component()
                .with_details(serde_json::json!({"path": records_path.display().to_string(), "durability": durability}))
        });
        let dead_breaker = dead_letters.breaker().clone();
        health.optional("dead_letter_file", move || dead_breaker.component());

        let routes = RoutesHandle::load(config.routes.as_deref(), &config.data_dir)
            .map_err(|e| anyhow::anyhow!("--routes (FILTER_ROUTES): {e}"))?;
        // Watching starts now, so SIGHUP reloads from the moment the filter is built.
        let routes_watch = CancellationToken::new();
        routes.watch(routes_watch.clone());
        let routes_in_force = routes.clone();
        health.optional("routes", move || routes_in_force.component());
        let dispatcher =
            Dispatcher::new(broker.clone(), file.clone(), dead_letters, routes.clone());
        Ok(Self {
            routes,
            routes_watch,
            config,
            ws_listener,
            http_listener,
            health,
            dispatcher,
            broker,
            file,
            sink_tasks: vec![broker_task, file_task, dead_task],
        })
    }

    /// The bound WebSocket address.
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The service's health registry.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The RabbitMQ publisher's link (tests wait for its connection).
    pub fn broker(&self) -> LinkStatus {
        self.broker.link()
    }

    /// The breaker guarding RabbitMQ.
    pub fn broker_breaker(&self) -> Breaker {
        self.broker.breaker().clone()
    }

    /// The routes in force (tests reload them).
    pub fn routes(&self) -> RoutesHandle {
        self.routes.clone()
    }

    /// The records file sink's breaker (tests force it open).
    pub fn file_breaker(&self) -> Breaker {
        self.file.breaker().clone()
    }

    /// Serves until `shutdown` fires, then drains: stops intake, waits for every in-flight record
    /// to be answered, lets the sinks finish (flush, confirms), and stops the probe port.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            config,
            ws_listener,
            http_listener,
            health,
            dispatcher,
            routes: _,
            routes_watch,
            broker,
            file,
            sink_tasks,
        } = self;
        let http_stop = CancellationToken::new();
        let http = flowmesh_common::http::spawn(
            "filter",
            http_listener,
            health.clone(),
            http_stop.clone(),
        )?;
        health.require("intake", || Component::new(ComponentStatus::Up));

        let settings = Arc::new(ingest_settings(&config)?);
        spawn_progress_line(
            config.service.progress_every,
            settings.tally.clone(),
            broker.link(),
            [
                broker.breaker().clone(),
                file.breaker().clone(),
                dispatcher.dead_letter_breaker(),
            ],
            http_stop.clone(),
        );
        tracing::info!(
            listen = %ws_listener.local_addr()?,
            http = %config.service.http_addr,
            data_dir = %config.data_dir.display(),
            auth = settings.tokens.required(),
            tls = settings.tls.is_some(),
            "filter started"
        );
        settings.tokens.reload_on_hangup(http_stop.clone());
        let tracker = TaskTracker::new();
        ingest::serve(
            ws_listener,
            settings,
            dispatcher,
            shutdown.clone(),
            tracker.clone(),
        )
        .await;

        health.set_draining();
        drain(tracker, broker, file, sink_tasks, config.service.grace).await;
        routes_watch.cancel();
        http_stop.cancel();
        let _ = http.await;
        tracing::info!("filter stopped");
        Ok(())
    }
}

/// The intake's settings, from the configuration.
fn ingest_settings(config: &FilterConfig) -> anyhow::Result<IngestSettings> {
    Ok(IngestSettings {
        tokens: Tokens::new(config.token.clone(), config.token_rotation_window)
            .map_err(anyhow::Error::msg)?,
        max_frame_bytes: config.max_frame_bytes as usize,
        max_in_flight: config.max_in_flight,
        ping_interval: config.ping_interval,
        peer_timeout: config.peer_timeout,
        drain_timeout: config.service.grace,
        max_batch: config.max_batch,
        max_invalid: config.max_invalid,
        admission: Admission::new(config.max_connections, config.max_connections_per_peer),
        handshakes: Admission::handshakes(config.max_handshakes, config.max_handshakes_per_peer),
        write_timeout: config.write_timeout,
        tls: config.tls()?,
        tally: Arc::new(IntakeTally::default()),
    })
}

/// After intake stopped: every connection answers what it holds, then the sinks (their last
/// handles dropped here) flush and settle their confirms; each step within `grace`.
async fn drain(
    connections: TaskTracker,
    broker: BrokerSink,
    file: FileSink,
    sink_tasks: Vec<tokio::task::JoinHandle<()>>,
    grace: std::time::Duration,
) {
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections did not drain within the grace period");
    }
    drop(broker);
    drop(file);
    for task in sink_tasks {
        if tokio::time::timeout(grace, task).await.is_err() {
            tracing::warn!("a sink did not drain within the grace period");
        }
    }
}

/// Logs the filter's progress line every `every`.
fn spawn_progress_line(
    every: std::time::Duration,
    tally: Arc<IntakeTally>,
    broker: LinkStatus,
    breakers: [Breaker; 3],
    stop: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let (mut to_broker, mut to_file, mut nacked, mut rejected) = Default::default();
    flowmesh_common::progress::spawn(every, stop, move |over| {
        let (broker_total, file_total) = (
            tally.acked_broker.load(Relaxed),
            tally.acked_file.load(Relaxed),
        );
        let (nacked_total, rejected_total) =
            (tally.nacked.load(Relaxed), tally.rejected.load(Relaxed));
        let to_broker_since = Tally::since(&mut to_broker, broker_total);
        let to_file_since = Tally::since(&mut to_file, file_total);
        let acked = to_broker_since + to_file_since;
        let nacked_since = Tally::since(&mut nacked, nacked_total);
        let rejected_since = Tally::since(&mut rejected, rejected_total);
        let connections = tally.connections.load(Relaxed);
        let message = match broker.down_for() {
            Some(down) => format!(
                "waiting for RabbitMQ for {} s: records for it are nacked; {acked} acked to the file in the last {} s",
                down.as_secs(),
                over.as_secs()
            ),
            None => format!(
                "{acked} acked in the last {} s ({to_broker_since} to RabbitMQ, {to_file_since} to the file); {connections} connection(s)",
                over.as_secs()
            ),
        };
        let [broker_breaker, file_breaker, dead_letter_breaker] = &breakers;
        tracing::info!(
            acked,
            acked_total = broker_total + file_total,
            nacked = nacked_since,
            nacked_total,
            rejected = rejected_since,
            rejected_total,
            rate_per_s = flowmesh_common::progress::rate(acked, over),
            connections,
            rabbitmq_connected = broker.is_connected(),
            breaker_rabbitmq = broker_breaker.state().as_str(),
            breaker_file = file_breaker.state().as_str(),
            breaker_dead_letter_file = dead_letter_breaker.state().as_str(),
            "progress: {message}"
        );
        async {}
    });
}
