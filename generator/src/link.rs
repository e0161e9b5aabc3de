//! The WebSocket link to the filter: a supervisor that connects through a circuit breaker with
//! jittered exponential backoff, and per connection a sender (frames from the window) and a
//! reader (acks, nacks, rejects back into the window).
//!
//! **Several filters.** Given more than one filter URL, the link ranks them for its source by
//! rendezvous hashing ([`preference`]): the first is the source's home, and adding or removing a
//! filter moves only the sources whose home it is. The link stays with a filter it loses for
//! [`LinkSettings::failover_after`] (a restarted filter has its dedupe window back, so waiting
//! costs no duplicates), then fails over to the next in its order; while away, it checks every
//! [`LinkSettings::home_check`] whether home answers again and, once it does, lets the other
//! filter answer what it was sent and returns home.

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

/// How long a link moving home waits at most for the filter it leaves to answer what it was
/// sent, and how long a quiet spell ends that wait early.
const HANDOVER_MAX: Duration = Duration::from_secs(5);
const HANDOVER_QUIET: Duration = Duration::from_millis(500);

/// The filter URLs in `source`'s order of preference: rendezvous (highest random weight)
/// hashing, each URL weighted by the first eight bytes (big-endian) of the MD5 of
/// `source`, a newline and the URL, highest first (ties by URL). The first is the source's home.
/// Stable across runs and machines; adding a filter moves only the sources it now ranks first.
pub fn preference(source: &str, urls: &[String]) -> Vec<String> {
    let weight = |url: &str| {
        let digest = md5::compute(format!("{source}\n{url}"));
        u64::from_be_bytes(digest.0[..8].try_into().expect("eight bytes"))
    };
    let mut ranked: Vec<(u64, &String)> = urls.iter().map(|url| (weight(url), url)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.into_iter().map(|(_, url)| url.clone()).collect()
}

/// Settings of the link.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// The filters' WebSocket URLs, in the source's order of preference ([`preference`]): the
    /// first is home.
    pub urls: Vec<String>,
    /// How long the link keeps trying a filter it lost before it fails over to the next.
    pub failover_after: Duration,
    /// While connected elsewhere, how often the link checks whether home answers again.
    pub home_check: Duration,
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

/// How a connection ended.
enum Ended {
    /// `stop` fired, or the filter closed it cleanly.
    Closed,
    /// Home answers again: the link leaves this filter (after it answered what it was sent).
    HomeIsBack,
    /// Lost, for this reason.
    Lost(String),
}

/// Which filter the link uses, and how long it may keep trying it.
struct Choice {
    /// Index in [`LinkSettings::urls`].
    index: usize,
    /// Until when a failed attempt is retried on this filter rather than the next.
    patience: tokio::time::Instant,
}

impl Choice {
    fn url<'a>(&self, settings: &'a LinkSettings) -> &'a str {
        &settings.urls[self.index]
    }

    /// After a failed attempt, or while the breaker refuses attempts: past its patience, the
    /// next filter in the order (one attempt before the one after it); the move is counted and
    /// logged. True when it moved.
    fn after_failure(&mut self, settings: &LinkSettings) -> bool {
        let now = tokio::time::Instant::now();
        if settings.urls.len() < 2 || now < self.patience {
            return false;
        }
        let from = self.index;
        self.index = (self.index + 1) % settings.urls.len();
        self.patience = now;
        metrics::counter!(m::GEN_FILTER_SWITCHES, "reason" => "failover").increment(1);
        tracing::warn!(
            from = %redact_url(&settings.urls[from]),
            to = %redact_url(self.url(settings)),
            home = self.index == 0,
            "failing over: the filter did not answer within GENERATOR_FAILOVER_AFTER ({} ms)",
            settings.failover_after.as_millis()
        );
        true
    }
}

/// Keeps a connection to a filter until `stop` fires, re-sending everything unacked on each
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
    let mut choice = Choice {
        index: 0,
        patience: tokio::time::Instant::now() + settings.failover_after,
    };
    while !stop.is_cancelled() {
        if !breaker.permit() {
            // Open: no attempts on this filter until the open wait has passed. The breaker
            // guards the filter in use: moving to the next (its patience ran out) starts afresh.
            if choice.after_failure(&settings) {
                breaker.reset();
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        }
        if !first {
            state.count_reconnect();
        }
        first = false;
        let url = choice.url(&settings).to_owned();
        let connected = tokio::select! {
            _ = stop.cancelled() => break,
            connected = connect(&settings, &url) => connected,
        };
        match connected {
            Ok(ws) => {
                breaker.record(true);
                backoff = retry::reconnect().build();
                state.set_connected(true);
                let home = choice.index == 0;
                metrics::gauge!(m::GEN_FILTER_HOME).set(if home { 1.0 } else { 0.0 });
                tracing::info!(url = %redact_url(&url), home, "connected to the filter");
                window.requeue_all();
                let ended = run_connection(ws, &settings, home, &window, &stop).await;
                state.set_connected(false);
                metrics::gauge!(m::GEN_FILTER_HOME).set(0.0);
                choice.patience = tokio::time::Instant::now() + settings.failover_after;
                match ended {
                    Ended::Closed => tracing::info!("connection to the filter closed"),
                    Ended::HomeIsBack => {
                        metrics::counter!(m::GEN_FILTER_SWITCHES, "reason" => "home").increment(1);
                        tracing::info!(from = %redact_url(&url), home = %redact_url(&settings.urls[0]), "the source's own filter answers again; returning to it");
                        choice.index = 0;
                    }
                    Ended::Lost(reason) => {
                        breaker.record(false);
                        tracing::warn!(error = %reason, "connection to the filter lost; unacked records will be re-sent");
                    }
                }
            }
            Err(reason) => {
                breaker.record(false);
                let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(url = %redact_url(&url), error = %reason, retry_in_ms = wait.as_millis() as u64, "cannot connect to the filter");
                if choice.after_failure(&settings) {
                    breaker.reset();
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Resolves once the source's home filter accepts a WebSocket connection (tried every
/// `home_check`); never while the link is home.
async fn home_answers(settings: &LinkSettings, home: bool) {
    if home {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(settings.home_check).await;
        if let Ok(mut probe) = connect(settings, &settings.urls[0]).await {
            let _ = probe.close(None).await;
            return;
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(settings: &LinkSettings, url: &str) -> Result<Ws, String> {
    let mut request = url
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

/// One frame of `batch`: the record alone, or a JSON array of them.
fn frame_of(batch: &[(u64, Arc<str>)]) -> String {
    if let [(_, json)] = batch {
        return json.to_string();
    }
    let mut frame =
        String::with_capacity(batch.iter().map(|(_, j)| j.len() + 1).sum::<usize>() + 2);
    frame.push('[');
    for (i, (_, json)) in batch.iter().enumerate() {
        if i > 0 {
            frame.push(',');
        }
        frame.push_str(json);
    }
    frame.push(']');
    frame
}

type Sink = futures_util::stream::SplitSink<Ws, Message>;
type Stream = futures_util::stream::SplitStream<Ws>;

/// Leaves a filter for home: sends nothing more, takes the answers to what was sent until the
/// filter falls quiet ([`HANDOVER_QUIET`], [`HANDOVER_MAX`] at most), then closes normally.
/// What it has not answered by then is sent again to home.
async fn hand_over(mut sink: Sink, mut stream: Stream, window: &Window) {
    let until = tokio::time::Instant::now() + HANDOVER_MAX;
    loop {
        let quiet = tokio::time::sleep(HANDOVER_QUIET);
        let message = tokio::select! {
            _ = tokio::time::sleep_until(until) => break,
            _ = quiet => break,
            message = stream.next() => message,
        };
        match message {
            Some(Ok(Message::Text(text))) => handle_answer(text.as_str(), window),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
    let _ = sink.send(Message::Close(None)).await;
}

/// Runs one connection until `stop` fires, the filter closes it, it is lost, or (when `home`
/// is false) home answers again.
async fn run_connection(
    ws: Ws,
    settings: &LinkSettings,
    home: bool,
    window: &Window,
    stop: &CancellationToken,
) -> Ended {
    let (mut sink, mut stream) = ws.split();
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    let home_back = home_answers(settings, home);
    tokio::pin!(home_back);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                return Ended::Closed;
            }
            _ = &mut home_back => {
                hand_over(sink, stream, window).await;
                return Ended::HomeIsBack;
            }
            _ = window.wait_ready() => {
                loop {
                    let batch = window.take_batch(settings.batch_max, settings.max_frame_bytes);
                    if batch.is_empty() {
                        break;
                    }
                    let count = batch.len();
                    if let Err(e) = sink.send(Message::Text(frame_of(&batch).into())).await {
                        return Ended::Lost(format!("send failed: {e}"));
                    }
                    metrics::counter!(m::GEN_SENT).increment(count as u64);
                    metrics::histogram!(m::GEN_FRAME_RECORDS).record(count as f64);
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > settings.peer_timeout {
                    return Ended::Lost(format!("the filter was silent for {:?}", settings.peer_timeout));
                }
                if let Err(e) = sink.send(Message::Ping(Default::default())).await {
                    return Ended::Lost(format!("ping failed: {e}"));
                }
            }
            message = stream.next() => {
                last_heard = tokio::time::Instant::now();
                match message {
                    Some(Ok(Message::Text(text))) => handle_answer(text.as_str(), window),
                    Some(Ok(Message::Close(frame))) => {
                        return match frame {
                            Some(frame) if u16::from(frame.code) == 1000 => Ended::Closed,
                            Some(frame) => Ended::Lost(format!("the filter closed the connection: {} {}", u16::from(frame.code), frame.reason)),
                            None => Ended::Lost("the filter closed the connection".into()),
                        };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Ended::Lost(err.to_string()),
                    None => return Ended::Lost("the connection ended".into()),
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

#[cfg(test)]
mod tests {
    use super::preference;

    fn urls(n: usize) -> Vec<String> {
        (1..=n)
            .map(|i| format!("ws://filter-{i}:8080/ingest"))
            .collect()
    }

    #[test]
    fn the_order_is_the_documented_hash_and_ignores_the_order_given() {
        let given = urls(3);
        let mut reversed = given.clone();
        reversed.reverse();
        let order = preference("gen-1", &given);
        assert_eq!(order, preference("gen-1", &reversed));
        // docs/contracts.md states this example (weights f5cecb8901805495, 9c7abc4b1faf82d8,
        // 0b584c8831b828bb: `printf 'gen-1\nws://filter-3:8080/ingest' | md5sum`).
        assert_eq!(
            order,
            [
                "ws://filter-3:8080/ingest",
                "ws://filter-1:8080/ingest",
                "ws://filter-2:8080/ingest"
            ]
        );
    }

    #[test]
    fn adding_a_filter_moves_only_the_sources_it_now_ranks_first_and_shares_evenly() {
        let (two, three) = (urls(2), urls(3));
        let mut homes = [0usize; 3];
        for i in 0..3000 {
            let source = format!("gen-{i}");
            let before = &preference(&source, &two)[0];
            let after = &preference(&source, &three)[0];
            assert!(
                after == before || after == &three[2],
                "{source} moved from {before} to {after}, not to the new filter"
            );
            homes[three
                .iter()
                .position(|url| url == after)
                .expect("one of them")] += 1;
        }
        for (url, count) in three.iter().zip(homes) {
            assert!(
                (800..=1200).contains(&count),
                "{url} is home to {count} of 3000"
            );
        }
    }
}
