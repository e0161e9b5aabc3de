//! The WebSocket link to the filter: a supervisor that connects through a circuit breaker with
//! jittered exponential backoff, and per connection a sender (frames from the window) and a
//! reader (acks, nacks, rejects back into the window).

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use flowmesh_common::breaker::Breaker;
use flowmesh_common::link::LinkStatus;
use flowmesh_common::metrics as m;
use flowmesh_common::protocol::ServerMessage;
use flowmesh_common::retry;
use flowmesh_common::telemetry::redact_url;
use flowmesh_common::token::Tokens;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::window::Window;

/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the link.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// The filter's WebSocket URL.
    pub url: String,
    /// Bearer token, if the filter wants one: read again from its file on SIGHUP, and used
    /// from the next connection on.
    pub tokens: Arc<Tokens>,
    /// Records per frame at most.
    pub batch_max: usize,
    /// Bytes per frame at most.
    pub max_frame_bytes: usize,
    /// How often to ping.
    pub ping_interval: Duration,
    /// Silence after which the filter is considered dead.
    pub peer_timeout: Duration,
    /// TLS for `wss://` URLs: the system's roots plus `FILTER_CA_FILE`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Keeps a connection to the filter until `stop` fires, re-sending everything unacked on each
/// new connection.
pub async fn supervise(
    settings: LinkSettings,
    state: LinkStatus,
    breaker: Breaker,
    window: Arc<Window>,
    stop: CancellationToken,
) {
    let mut backoff = retry::reconnect().build();
    let mut first = true;
    while !stop.is_cancelled() {
        if !breaker.permit() {
            // Open: no attempts until the open wait has passed.
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        }
        if !first {
            state.count_reconnect();
        }
        first = false;
        let connected = tokio::select! {
            _ = stop.cancelled() => break,
            connected = connect(&settings) => connected,
        };
        match connected {
            Ok(ws) => {
                breaker.record(true);
                backoff = retry::reconnect().build();
                state.set_connected(true);
                tracing::info!(url = %redact_url(&settings.url), "connected to the filter");
                window.requeue_all();
                let ended = run_connection(ws, &settings, &window, &stop).await;
                state.set_connected(false);
                match ended {
                    Ok(()) => tracing::info!("connection to the filter closed"),
                    Err(reason) => {
                        breaker.record(false);
                        tracing::warn!(error = %reason, "connection to the filter lost; unacked records will be re-sent");
                    }
                }
            }
            Err(reason) => {
                breaker.record(false);
                let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(url = %redact_url(&settings.url), error = %reason, retry_in_ms = wait.as_millis() as u64, "cannot connect to the filter");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(settings: &LinkSettings) -> Result<Ws, String> {
    let mut request = settings
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad filter URL: {e}"))?;
    if let Some(token) = settings.tokens.current() {
        let value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| "the token holds characters not allowed in a header".to_owned())?;
        request.headers_mut().insert("authorization", value);
    }
    let config = WebSocketConfig::default()
        .max_frame_size(Some(settings.max_frame_bytes.max(64 * 1024)))
        .max_message_size(Some(settings.max_frame_bytes.max(64 * 1024)));
    let connector = settings
        .tls
        .clone()
        .map(tokio_tungstenite::Connector::Rustls);
    let attempt =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, connector);
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => Err(format!(
            "the filter refused the upgrade: HTTP {}",
            response.status()
        )),
        Ok(Err(err)) => Err(flowmesh_common::tls::explain(&err).unwrap_or_else(|| err.to_string())),
        Err(_) => Err(format!("timed out after {CONNECT_TIMEOUT:?}")),
    }
}

/// Runs one connection: Ok when it ended because `stop` fired or the filter closed it cleanly.
async fn run_connection(
    ws: Ws,
    settings: &LinkSettings,
    window: &Window,
    stop: &CancellationToken,
) -> Result<(), String> {
    let (mut sink, mut stream) = ws.split();
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                return Ok(());
            }
            _ = window.wait_ready() => {
                loop {
                    let batch = window.take_batch(settings.batch_max, settings.max_frame_bytes);
                    if batch.is_empty() {
                        break;
                    }
                    let count = batch.len();
                    let frame = if count == 1 {
                        batch[0].1.to_string()
                    } else {
                        let mut frame = String::with_capacity(batch.iter().map(|(_, j)| j.len() + 1).sum::<usize>() + 2);
                        frame.push('[');
                        for (i, (_, json)) in batch.iter().enumerate() {
                            if i > 0 {
                                frame.push(',');
                            }
                            frame.push_str(json);
                        }
                        frame.push(']');
                        frame
                    };
                    sink.send(Message::Text(frame.into())).await.map_err(|e| format!("send failed: {e}"))?;
                    metrics::counter!(m::GEN_SENT).increment(count as u64);
                    metrics::histogram!(m::GEN_FRAME_RECORDS).record(count as f64);
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > settings.peer_timeout {
                    return Err(format!("the filter was silent for {:?}", settings.peer_timeout));
                }
                sink.send(Message::Ping(Default::default())).await.map_err(|e| format!("ping failed: {e}"))?;
            }
            message = stream.next() => {
                last_heard = tokio::time::Instant::now();
                match message {
                    Some(Ok(Message::Text(text))) => handle_answer(text.as_str(), window),
                    Some(Ok(Message::Close(frame))) => {
                        return match frame {
                            Some(frame) if u16::from(frame.code) == 1000 => Ok(()),
                            Some(frame) => Err(format!("the filter closed the connection: {} {}", u16::from(frame.code), frame.reason)),
                            None => Err("the filter closed the connection".into()),
                        };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(err.to_string()),
                    None => return Err("the connection ended".into()),
                }
            }
        }
    }
}

fn handle_answer(text: &str, window: &Window) {
    match ServerMessage::from_json(text) {
        Ok(ServerMessage::Ack { seqs }) => window.ack(&seqs),
        Ok(ServerMessage::Nack {
            seqs,
            reason,
            retry_after_ms,
        }) => {
            tracing::debug!(
                records = seqs.len(),
                reason,
                retry_after_ms,
                "records nacked; will re-send"
            );
            window.nack(&seqs, Duration::from_millis(retry_after_ms));
        }
        Ok(ServerMessage::Reject {
            seq: Some(seq),
            error,
        }) => {
            tracing::error!(seq, error, "the filter rejected a record as invalid");
            window.reject(seq);
        }
        Ok(ServerMessage::Reject { seq: None, error }) => {
            tracing::error!(error, "the filter rejected a frame as not a record");
        }
        Err(err) => tracing::warn!(error = %err, "unintelligible answer from the filter"),
    }
}
