//! Building and running the generator: bind the probe port, then produce and send until the
//! count is reached and acked, or until shutdown (then drain acks within the grace period).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use flowmesh_common::breaker::Breaker;
use flowmesh_common::health::Health;
use flowmesh_common::link::LinkStatus;
use flowmesh_common::progress::Tally;
use flowmesh_common::telemetry::redact_url;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::GeneratorConfig;
use crate::link::{self, LinkSettings};
use crate::source::{self, RecordSource};
use crate::spool::Spool;
use crate::window::{Window, WindowCounts};

/// Name of the breaker guarding the filter (metric label value).
pub const BREAKER_FILTER: &str = "generator_filter";

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The `source` of every record.
    pub source: String,
    /// Records made.
    pub generated: u64,
    /// What the filter answered.
    pub counts: WindowCounts,
}

/// A generator with its probe port bound, not yet running.
pub struct Application {
    config: GeneratorConfig,
    source: String,
    http_listener: TcpListener,
    health: Health,
    link: LinkStatus,
    breaker: Breaker,
    window: Arc<Window>,
    next_seq: u64,
}

impl Application {
    /// Binds the probe port.
    pub async fn build(config: GeneratorConfig) -> anyhow::Result<Self> {
        flowmesh_common::metrics::install("generator")
            .context("installing the metrics recorder")?;
        let http_addr = config.service.http_addr;
        let http_listener = TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("binding the HTTP port {http_addr}"))?;
        let (source, next_seq, window) = match &config.spool_dir {
            None => {
                let source = config
                    .source
                    .clone()
                    .unwrap_or_else(|| format!("gen-{:08x}", fastrand::u32(..)));
                (source, 1, Window::new(config.window))
            }
            Some(dir) => {
                let (spool, recovered) = Spool::open(dir, config.source.as_deref())
                    .with_context(|| format!("opening the spool in {}", dir.display()))?;
                let source = config
                    .source
                    .clone()
                    .or(recovered.source)
                    .unwrap_or_else(|| format!("gen-{:08x}", fastrand::u32(..)));
                Spool::set_source(dir, &source).context("recording the spool's source")?;
                tracing::info!(
                    source = %source,
                    last_seq = recovered.last_seq,
                    unacked = recovered.unacked.len(),
                    "spool recovered: unacked records will be sent again"
                );
                let window =
                    Window::with_spool(config.window, spool, recovered.unacked.into_values());
                (source, recovered.last_seq + 1, window)
            }
        };
        let link = LinkStatus::new("filter");
        let breaker = Breaker::new(BREAKER_FILTER, config.breaker.settings());
        let health = Health::new();
        let probe = link.clone();
        let guard = breaker.clone();
        health.require("filter", move || probe.guarded_by(&guard));
        let window = Arc::new(window);
        Ok(Self {
            config,
            source,
            http_listener,
            health,
            link,
            breaker,
            window,
            next_seq,
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The `source` this run's records carry.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The link to the filter.
    pub fn link(&self) -> LinkStatus {
        self.link.clone()
    }

    /// The breaker guarding the filter.
    pub fn breaker(&self) -> Breaker {
        self.breaker.clone()
    }

    /// The in-flight window (tests read its counts).
    pub fn window(&self) -> Arc<Window> {
        self.window.clone()
    }

    /// Builds on `config` and runs until `--count` records are made and all acked, with no
    /// shutdown signal (a one-shot run, as tests do); fails past `within`.
    pub async fn run_to_end(
        config: GeneratorConfig,
        within: std::time::Duration,
    ) -> anyhow::Result<Summary> {
        let app = Self::build(config).await?;
        tokio::time::timeout(within, app.run_until_stopped(CancellationToken::new()))
            .await
            .map_err(|_| anyhow::anyhow!("the run did not end within {within:?}"))?
    }

    /// Runs until `--count` records are made and all acked, or until `shutdown` fires; then
    /// waits up to the grace period for in-flight acks, closes the link and stops.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<Summary> {
        let http_stop = CancellationToken::new();
        let http = flowmesh_common::http::spawn(
            "generator",
            self.http_listener,
            self.health.clone(),
            http_stop.clone(),
        )?;
        let Self {
            config,
            source,
            health,
            link,
            breaker,
            window,
            next_seq,
            ..
        } = self;

        spawn_progress_line(
            config.service.progress_every,
            window.clone(),
            link.clone(),
            breaker.clone(),
            http_stop.clone(),
        );
        let link_stop = CancellationToken::new();
        let settings = link_settings(&config, &source)?;
        settings.tokens.reload_on_hangup(link_stop.clone());
        let order: Vec<String> = settings.urls.iter().map(|url| redact_url(url)).collect();
        tracing::info!(source = %source, url = %order[0], filters = %order.join(","), rate = ?config.rate, count = config.count, "generator started");
        let supervisor = tokio::spawn(link::supervise(
            settings,
            link,
            breaker,
            window.clone(),
            link_stop.clone(),
        ));

        let generated = source::produce(
            RecordSource::new(source.clone(), config.seed)
                .with_values(config.values)
                .starting_at(next_seq),
            config.rate,
            config.count,
            window.clone(),
            shutdown.clone(),
        )
        .await;

        wait_for_acks(&window, &health, &shutdown, config.service.grace, generated).await;
        link_stop.cancel();
        let _ = supervisor.await;
        http_stop.cancel();
        let _ = http.await;
        let summary = Summary {
            source,
            generated,
            counts: window.counts(),
        };
        tracing::info!(
            source = %summary.source,
            generated = summary.generated,
            acked = summary.counts.acked,
            rejected = summary.counts.rejected,
            unacked = summary.counts.in_flight,
            "generator stopped"
        );
        Ok(summary)
    }
}

/// How the link reaches the filter, from the configuration.
fn link_settings(config: &GeneratorConfig, source: &str) -> anyhow::Result<LinkSettings> {
    Ok(LinkSettings {
        urls: crate::link::preference(source, &config.filter_urls()),
        failover_after: config.failover_after,
        home_check: config.home_check,
        tokens: flowmesh_common::token::Tokens::new(
            config.token.clone(),
            std::time::Duration::ZERO,
        )
        .map_err(anyhow::Error::msg)?,
        tls: config.tls()?,
        batch_max: config.batch_max,
        max_frame_bytes: config.max_frame_bytes as usize,
        ping_interval: config.ping_interval,
        peer_timeout: config.peer_timeout,
    })
}

/// After producing: waits for every ack (the count was reached) or, once `shutdown` fires, for
/// at most the grace period; what stays unacked is in the spool for the next run.
async fn wait_for_acks(
    window: &Window,
    health: &Health,
    shutdown: &CancellationToken,
    grace: std::time::Duration,
    generated: u64,
) {
    if !shutdown.is_cancelled() {
        tracing::info!(generated, "count reached; waiting for every ack");
        tokio::select! {
            _ = window.wait_empty() => return,
            _ = shutdown.cancelled() => {}
        }
    }
    health.set_draining();
    if tokio::time::timeout(grace, window.wait_empty())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = window.counts().in_flight,
            "records still unacked at the end of the grace period"
        );
    }
}

/// Logs the generator's progress line every `every`.
fn spawn_progress_line(
    every: std::time::Duration,
    window: Arc<Window>,
    link: LinkStatus,
    breaker: Breaker,
    stop: CancellationToken,
) {
    let mut acked = Tally::default();
    flowmesh_common::progress::spawn(every, stop, move |over| {
        let counts = window.counts();
        let acked_since = acked.since(counts.acked);
        let message = match link.down_for() {
            Some(down) => format!(
                "waiting for the filter for {} s; {} records held",
                down.as_secs(),
                counts.in_flight
            ),
            None => format!(
                "{acked_since} acked in the last {} s; {} in flight",
                over.as_secs(),
                counts.in_flight
            ),
        };
        tracing::info!(
            acked = acked_since,
            acked_total = counts.acked,
            rejected_total = counts.rejected,
            in_flight = counts.in_flight,
            rate_per_s = flowmesh_common::progress::rate(acked_since, over),
            filter_connected = link.is_connected(),
            breaker = breaker.state().as_str(),
            "progress: {message}"
        );
        async {}
    });
}
