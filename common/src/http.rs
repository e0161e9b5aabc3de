//! The HTTP port every service serves: `/metrics`, `/health/live`, `/health/ready`, `/health`,
//! and the self-probe a container healthcheck runs without curl.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::{ComponentStatus, Health};

pub mod guard;

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: PrometheusHandle,
}

/// The router of the probe port.
pub fn router(health: Health, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", routing::get(metrics_text))
        .route("/health/live", routing::get(live))
        .route("/health/ready", routing::get(ready))
        .route("/health", routing::get(health_json))
        .with_state(AppState { health, metrics })
}

/// Serves `service`'s probe port on `listener` (its `/metrics` from the process's recorder,
/// installed here if it is not yet) until `shutdown` fires, with a bounded number of
/// connections and a read timeout (see [`guard`]).
pub fn spawn(
    service: &'static str,
    listener: TcpListener,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let metrics = crate::metrics::install(service).context("installing the metrics recorder")?;
    let app = router(health, metrics);
    let listener =
        guard::GuardedListener::new(listener, guard::MAX_CONNECTIONS, guard::READ_TIMEOUT);
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "HTTP probe server failed");
        }
    }))
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn live() -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "UP"})),
    )
        .into_response()
}

async fn ready(State(state): State<AppState>) -> Response {
    let (code, status) = if state.health.is_ready() {
        (StatusCode::OK, "UP")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "DOWN")
    };
    (code, axum::Json(serde_json::json!({"status": status}))).into_response()
}

async fn health_json(State(state): State<AppState>) -> Response {
    let report = state.health.report();
    let code = if report.status == ComponentStatus::Down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, axum::Json(report)).into_response()
}

/// Largest response [`get`] reads; the probe port's answers are far smaller.
const MAX_RESPONSE_BYTES: u64 = 8 * 1024 * 1024;

/// GETs `path` from `addr` with a plain HTTP/1.0 request: the status code and the body.
///
/// This is the container healthcheck's client (the image needs no curl) and the tests' one.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let text = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(text.as_bytes()).await?;
        let mut response = Vec::new();
        stream
            .take(MAX_RESPONSE_BYTES)
            .read_to_end(&mut response)
            .await?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
        Ok((code, body.to_owned()))
    };
    tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))?
}

/// The status code of `GET path` on `addr`.
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    get(addr, path, timeout).await.map(|(code, _)| code)
}

/// Runs the self-probe against `/health/ready` on the service's own port; the process exit code
/// is 0 when ready, 1 otherwise.
pub fn probe_ready_exit_code(http_addr: SocketAddr) -> std::process::ExitCode {
    // A wildcard bind address is probed on loopback.
    let target = if http_addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), http_addr.port())
    } else {
        http_addr
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(_) => return std::process::ExitCode::FAILURE,
    };
    match runtime.block_on(probe(target, "/health/ready", Duration::from_secs(3))) {
        Ok(200) => std::process::ExitCode::SUCCESS,
        Ok(code) => {
            eprintln!("not ready: HTTP {code}");
            std::process::ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("not ready: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
