//! Building and running the filter: bind the listeners (port 0 allowed), start the sinks, serve
//! until the shutdown token fires, then drain in order — intake, sinks, probes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use flowmesh_common::breaker::Breaker;
use flowmesh_common::health::{Component, ComponentStatus, Health};
use flowmesh_common::metrics as m;
use flowmesh_common::topology::Topology;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{BrokerConfig, BrokerSink, BrokerStatus};
use crate::config::FilterConfig;
use crate::file_sink::{FileSink, FileSinkConfig};
use crate::ingest::{self, IngestSettings};
use crate::router::Router;

/// Breaker names (metric label values), one per guarded dependency.
pub const BREAKER_RABBITMQ: &str = "filter_rabbitmq";
/// Breaker of the records file.
pub const BREAKER_FILE: &str = "filter_file";
/// Breaker of the dead-letter file.
pub const BREAKER_DEAD_LETTER: &str = "filter_dead_letter_file";

/// Makes the filter's counter series exist at zero from the start.
fn zero_series() {
    m::zero_counters(m::FILTER_RECEIVED, None);
    m::zero_counters(m::FILTER_DEAD_LETTERED, None);
    m::zero_counters(
        m::FILTER_FRAMES,
        Some(("kind", &["text", "binary", "oversized"])),
    );
    m::zero_counters(m::FILTER_ACKED, Some(("destination", &["broker", "file"])));
    m::zero_counters(m::FILTER_NACKED, Some(("destination", &["broker", "file"])));
    m::zero_counters(
        m::FILTER_REJECTED,
        Some((
            "field",
            &[
                "record",
                "unknown",
                "id",
                "source",
                "seq",
                "timestamp",
                "value",
                "hash",
                "traceparent",
            ],
        )),
    );
    m::zero_counters(m::FILTER_FILE_DUPLICATES, Some(("file", &["records"])));
    for reason in ["size", "age"] {
        for file in ["records", "dead-letter"] {
            metrics::counter!(m::FILTER_FILE_ROTATIONS, "file" => file, "reason" => reason)
                .absolute(0);
        }
    }
    m::zero_counters(m::RECONNECTS, Some(("link", &["amqp"])));
    metrics::gauge!(m::FILTER_CONNECTIONS).set(0.0);
    metrics::gauge!(m::FILTER_PUBLISH_IN_FLIGHT).set(0.0);
    metrics::gauge!(m::CONNECTION_UP, "link" => "amqp").set(0.0);
}

/// A filter with its listeners bound and its sinks started, not yet serving.
pub struct Application {
    config: FilterConfig,
    ws_listener: TcpListener,
    http_listener: TcpListener,
    health: Health,
    router: Router,
    broker: BrokerSink,
    file: FileSink,
    sink_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Application {
    /// Binds both ports and starts the sinks (RabbitMQ connects in the background).
    pub async fn build(config: FilterConfig) -> anyhow::Result<Self> {
        let metrics =
            flowmesh_common::metrics::install().context("installing the metrics recorder")?;
        drop(metrics);
        let ws_listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the WebSocket port {}", config.listen))?;
        let http_listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding the HTTP port {}", config.http_addr))?;

        zero_series();
        let breaker_settings = config.breaker();
        let (broker, broker_task) = BrokerSink::start(
            BrokerConfig {
                url: config.amqp_url.clone(),
                topology: Topology::new(&config.amqp_prefix, config.delivery_limit),
                max_unconfirmed: config.max_unconfirmed,
            },
            Breaker::new(BREAKER_RABBITMQ, breaker_settings.clone()),
        );
        let file_config = |stem, dedupe_window| FileSinkConfig {
            dir: config.data_dir.clone(),
            stem,
            max_bytes: config.file_max_bytes,
            max_age: config.file_max_age,
            durability: config.durability,
            dedupe_window,
        };
        let records_config = file_config("records", config.dedupe_window);
        let records_path = records_config.active_path();
        let (file, file_task) = FileSink::start(
            records_config,
            Breaker::new(BREAKER_FILE, breaker_settings.clone()),
        );
        let (dead_letters, dead_task) = FileSink::start(
            file_config("dead-letter", 0),
            Breaker::new(BREAKER_DEAD_LETTER, breaker_settings),
        );

        let health = Health::new();
        let broker_probe = broker.status();
        health.require("rabbitmq", move || broker_probe.component());
        let file_breaker = file.breaker().clone();
        let durability = format!("{:?}", config.durability).to_lowercase();
        health.require("file", move || {
            file_breaker
                .component()
                .with_details(serde_json::json!({"path": records_path.display().to_string(), "durability": durability}))
        });
        let dead_breaker = dead_letters.breaker().clone();
        health.optional("dead_letter_file", move || dead_breaker.component());

        let router = Router::new(broker.clone(), file.clone(), dead_letters);
        Ok(Self {
            config,
            ws_listener,
            http_listener,
            health,
            router,
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

    /// The RabbitMQ publisher's state (tests read its breaker and connection).
    pub fn broker(&self) -> BrokerStatus {
        self.broker.status()
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
            router,
            broker,
            file,
            sink_tasks,
        } = self;
        let metrics = flowmesh_common::metrics::install().context("metrics recorder")?;
        let http_stop = CancellationToken::new();
        let http =
            flowmesh_common::http::spawn(http_listener, health.clone(), metrics, http_stop.clone());
        health.require("intake", || Component::new(ComponentStatus::Up));

        let settings = Arc::new(IngestSettings {
            token: config.token.clone(),
            max_frame_bytes: config.max_frame_bytes as usize,
            max_in_flight: config.max_in_flight,
            ping_interval: config.ping_interval,
            peer_timeout: config.peer_timeout,
            drain_timeout: config.grace,
        });
        tracing::info!(
            listen = %ws_listener.local_addr()?,
            http = %config.http_addr,
            data_dir = %config.data_dir.display(),
            auth = config.token.is_some(),
            "filter started"
        );
        let tracker = TaskTracker::new();
        ingest::serve(
            ws_listener,
            settings,
            router,
            shutdown.clone(),
            tracker.clone(),
        )
        .await;

        health.set_draining();
        tracker.close();
        if tokio::time::timeout(config.grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections did not drain within the grace period");
        }
        drop(broker);
        drop(file);
        for task in sink_tasks {
            if tokio::time::timeout(config.grace, task).await.is_err() {
                tracing::warn!("a sink did not drain within the grace period");
            }
        }
        http_stop.cancel();
        let _ = http.await;
        tracing::info!("filter stopped");
        Ok(())
    }
}
