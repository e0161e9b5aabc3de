//! The WebSocket server of docs/contracts.md §2: bearer-token check at the upgrade, frame-size limit, and for
//! every record exactly one ack, nack or reject on the connection it came from.
//!
//! Each connection has a reader (the intake: it alone watches the shutdown token) and a writer
//! that coalesces answers into as few frames as possible. The reader holds one permit per record
//! in flight; at `max_in_flight` it stops reading, and TCP pushes back on the client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flowmesh_common::metrics as m;
use flowmesh_common::protocol::{self, CLOSE_MESSAGE_TOO_BIG, INGEST_PATH, ServerMessage};
use flowmesh_common::record::RecordError;
use futures_util::SinkExt;
use futures_util::stream::{SplitSink, SplitStream, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, Refusal, Ticket};
use crate::dispatch::Dispatcher;
use crate::reply::{Destination, Replier, Reply};
use crate::transport::Transport;
use flowmesh_common::token::Tokens;

/// Answers coalesced into one writer pass at most.
const MAX_REPLIES_PER_PASS: usize = 1024;
/// Longest the TLS and WebSocket handshakes (token check included) may take together: a
/// handshake's place is held no longer than this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the WebSocket intake.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// The bearer token clients must present (none: no check), rotatable on SIGHUP.
    pub tokens: Arc<Tokens>,
    /// Largest frame/message accepted.
    pub max_frame_bytes: usize,
    /// Unanswered records per connection at most.
    pub max_in_flight: usize,
    /// How often to ping the client.
    pub ping_interval: Duration,
    /// Silence after which the client is dead.
    pub peer_timeout: Duration,
    /// Longest a closing connection waits for its in-flight answers.
    pub drain_timeout: Duration,
    /// Records in one frame at most; a larger frame is rejected whole.
    pub max_batch: usize,
    /// Invalid records one connection may send before it is closed with 1008.
    pub max_invalid: usize,
    /// Sessions in all and per peer: a place is taken once the handshake and the token check
    /// passed.
    pub admission: Arc<Admission>,
    /// Handshakes in progress in all and per peer: a place is taken when a TCP connection is
    /// accepted and given back when its handshake ends.
    pub handshakes: Arc<Admission>,
    /// Longest a write to a client may take; a client that stops reading is disconnected.
    pub write_timeout: Duration,
    /// TLS, when the filter serves `wss://`.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// What every connection answered, for progress lines.
    pub tally: Arc<IntakeTally>,
}

/// Answers given and connections open, summed over every connection (for progress lines).
#[derive(Debug, Default)]
pub struct IntakeTally {
    /// Records acked as stored in RabbitMQ.
    pub acked_broker: AtomicU64,
    /// Records acked as written to the file.
    pub acked_file: AtomicU64,
    /// Records nacked.
    pub nacked: AtomicU64,
    /// Records rejected as invalid.
    pub rejected: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
}

/// Accepts connections until `shutdown` fires; each runs on `tracker`.
pub async fn serve(
    listener: TcpListener,
    settings: Arc<IngestSettings>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    // Dead peers (no FIN, no RST) are found by the kernel as well as by pings.
                    let keepalive = socket2::TcpKeepalive::new()
                        .with_time(Duration::from_secs(30))
                        .with_interval(Duration::from_secs(10));
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                    match settings.handshakes.enter(peer.ip()) {
                        Ok(handshake) => {
                            tracker.spawn(connection(stream, peer, handshake, settings.clone(), dispatcher.clone(), shutdown.clone()));
                        }
                        Err(refusal) => {
                            // Too many handshakes at once: closed before a byte is read.
                            metrics::counter!(m::FILTER_CONNECTIONS_REFUSED, "reason" => refusal.as_str()).increment(1);
                            drop(stream);
                        }
                    }
                }
                Err(err) => {
                    // Usually out of file descriptors: back off briefly instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    tracing::info!("WebSocket intake stopped accepting connections");
}

/// Checks an upgrade request in order: the path, the token, then a session's place (so only a
/// client that presented the token can take one). Returns the place.
#[allow(clippy::result_large_err)] // the callback type is tungstenite's
fn check_upgrade(
    tokens: &Tokens,
    admission: &Arc<Admission>,
    peer: SocketAddr,
    request: &Request,
) -> Result<Ticket, ErrorResponse> {
    let refuse = |status: StatusCode, text: &str| {
        let mut response = ErrorResponse::new(Some(text.to_owned()));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != INGEST_PATH {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "not found: the WebSocket endpoint is /ingest",
        ));
    }
    if tokens.required() {
        let presented = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !tokens.accepts(presented) {
            let mut response = refuse(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            if let Ok(value) = "Bearer".parse() {
                response.headers_mut().insert("www-authenticate", value);
            }
            return Err(response);
        }
    }
    admission.enter(peer.ip()).map_err(|refusal: Refusal| {
        metrics::counter!(m::FILTER_CONNECTIONS_REFUSED, "reason" => refusal.as_str()).increment(1);
        let mut response = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("too many connections ({})", refusal.as_str()),
        );
        if let Ok(value) = "1".parse() {
            response.headers_mut().insert("retry-after", value);
        }
        response
    })
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    handshake: Ticket,
    settings: Arc<IngestSettings>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
) {
    let config = WebSocketConfig::default()
        .max_frame_size(Some(settings.max_frame_bytes))
        .max_message_size(Some(settings.max_frame_bytes));
    let tokens = settings.tokens.clone();
    let admission = settings.admission.clone();
    // The session's place, taken by the callback once the token is checked.
    let session: Arc<std::sync::Mutex<Option<Ticket>>> = Arc::default();
    let place = session.clone();
    #[allow(clippy::result_large_err)]
    let callback = move |request: &Request, response: Response| {
        let ticket = check_upgrade(&tokens, &admission, peer, request)?;
        *place.lock().unwrap_or_else(|e| e.into_inner()) = Some(ticket);
        Ok(response)
    };
    let upgrade = async {
        let stream = match &settings.tls {
            None => Transport::Plain(stream),
            Some(tls) => Transport::Tls(Box::new(
                tokio_rustls::TlsAcceptor::from(tls.clone())
                    .accept(stream)
                    .await
                    .map_err(tokio_tungstenite::tungstenite::Error::Io)?,
            )),
        };
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    };
    // One deadline for the TLS and the WebSocket handshakes together.
    let ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(err)) => {
            tracing::info!(%peer, error = %err, "WebSocket upgrade refused or failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "WebSocket upgrade timed out");
            return;
        }
    };
    drop(handshake);
    let Some(_session) = session.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    tracing::info!(%peer, "client connected");
    metrics::gauge!(m::FILTER_CONNECTIONS).increment(1.0);
    let tally = settings.tally.clone();
    tally.connections.fetch_add(1, Ordering::Relaxed);
    Session::new(settings).run(ws, dispatcher, shutdown).await;
    tally.connections.fetch_sub(1, Ordering::Relaxed);
    metrics::gauge!(m::FILTER_CONNECTIONS).decrement(1.0);
    tracing::info!(%peer, "client disconnected");
}

enum Control {
    Close(CloseFrame),
}

/// What one message means for the session.
enum Flow {
    /// Go on reading; the message held this many invalid records (or frames).
    Continue(usize),
    /// End the session, sending this close frame (`None`: a normal close).
    Close(Option<CloseFrame>),
}

struct Session {
    settings: Arc<IngestSettings>,
    permits: Arc<Semaphore>,
    /// Cancelled when the connection is being given up (shutdown, a client that stopped
    /// reading): waits for in-flight room end then.
    abandon: CancellationToken,
}

impl Session {
    fn new(settings: Arc<IngestSettings>) -> Self {
        let permits = Arc::new(Semaphore::new(settings.max_in_flight));
        Self {
            settings,
            permits,
            abandon: CancellationToken::new(),
        }
    }

    /// One connection, in the order things happen: the answer writer starts, frames are read
    /// and routed until something ends the session, then in-flight answers settle and the
    /// close frame goes out.
    async fn run(
        self,
        ws: WebSocketStream<Transport>,
        dispatcher: Dispatcher,
        shutdown: CancellationToken,
    ) {
        let (sink, stream) = ws.split();
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        let replier = Replier::new(reply_tx);
        let (control_tx, control_rx) = mpsc::channel(1);
        let stalled = CancellationToken::new();
        self.watch(&shutdown, &stalled);
        let writer = tokio::spawn(write_loop(
            sink,
            reply_rx,
            control_rx,
            self.permits.clone(),
            self.settings.ping_interval,
            self.settings.tally.clone(),
            Stall {
                timeout: self.settings.write_timeout,
                stalled: stalled.clone(),
            },
        ));
        let close = self
            .read_loop(stream, &dispatcher, &replier, &shutdown, &stalled)
            .await;
        self.finish(close, control_tx, replier, writer).await;
    }

    /// Abandons the session (so waits for in-flight room end) on shutdown or a stalled writer.
    fn watch(&self, shutdown: &CancellationToken, stalled: &CancellationToken) {
        let (abandon, shutdown, stalled) =
            (self.abandon.clone(), shutdown.clone(), stalled.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = stalled.cancelled() => {}
                _ = abandon.cancelled() => {}
            }
            abandon.cancel();
        });
    }

    /// Reads and routes frames until the session must end; returns the close frame to send
    /// (`None`: the client closed or the connection broke, a normal close is sent if it can be).
    async fn read_loop(
        &self,
        mut stream: SplitStream<WebSocketStream<Transport>>,
        dispatcher: &Dispatcher,
        replier: &Replier,
        shutdown: &CancellationToken,
        stalled: &CancellationToken,
    ) -> Option<CloseFrame> {
        let mut invalid = 0usize;
        loop {
            if self.abandon.is_cancelled() && !shutdown.is_cancelled() && !stalled.is_cancelled() {
                return Some(close_frame(
                    CloseCode::Policy,
                    "no room for the client's records",
                ));
            }
            if invalid > self.settings.max_invalid {
                metrics::counter!(m::FILTER_CLOSED_INVALID).increment(1);
                tracing::warn!(
                    invalid,
                    budget = self.settings.max_invalid,
                    "too many invalid records; closing with 1008"
                );
                return Some(close_frame(CloseCode::Policy, "too many invalid records"));
            }
            let deadline = tokio::time::sleep(self.settings.peer_timeout);
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Some(close_frame(CloseCode::Away, "filter shutting down")),
                _ = stalled.cancelled() => {
                    tracing::warn!(timeout_ms = self.settings.write_timeout.as_millis() as u64, "client stopped reading its answers; disconnecting");
                    return Some(close_frame(CloseCode::Policy, "client stopped reading"));
                }
                _ = deadline => {
                    tracing::warn!(timeout_s = self.settings.peer_timeout.as_secs(), "client silent too long; disconnecting");
                    return Some(close_frame(CloseCode::Policy, "peer timeout"));
                }
                message = stream.next() => message,
            };
            match self.handle_message(message, dispatcher, replier).await {
                Flow::Continue(bad) => invalid += bad,
                Flow::Close(frame) => return frame,
            }
        }
    }

    /// One message from the client: routed, rejected, or the end of the session.
    async fn handle_message(
        &self,
        message: Option<Result<Message, WsError>>,
        dispatcher: &Dispatcher,
        replier: &Replier,
    ) -> Flow {
        match message {
            None | Some(Ok(Message::Close(_))) => Flow::Close(None),
            Some(Ok(Message::Text(text))) => {
                metrics::counter!(m::FILTER_FRAMES, "kind" => "text").increment(1);
                Flow::Continue(self.handle_text(text.as_str(), dispatcher, replier).await)
            }
            Some(Ok(Message::Binary(bytes))) => {
                metrics::counter!(m::FILTER_FRAMES, "kind" => "binary").increment(1);
                if !self.admit(1).await {
                    return Flow::Continue(0);
                }
                let error = RecordError::Invalid {
                    field: "record",
                    reason: "arrived in a binary frame; records travel in text frames".into(),
                };
                let frame = String::from_utf8_lossy(&bytes).into_owned();
                dispatcher.reject_frame(error, frame, replier).await;
                Flow::Continue(1)
            }
            Some(Ok(_)) => Flow::Continue(0), // ping/pong: tungstenite answers pings itself
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                metrics::counter!(m::FILTER_FRAMES, "kind" => "oversized").increment(1);
                tracing::warn!(size, max_size, "frame too large; closing with 1009");
                Flow::Close(Some(CloseFrame {
                    code: CloseCode::from(CLOSE_MESSAGE_TOO_BIG),
                    reason: format!("frame of {size} bytes exceeds the limit of {max_size}").into(),
                }))
            }
            Some(Err(err)) => {
                tracing::info!(error = %err, "connection error");
                Flow::Close(None)
            }
        }
    }

    /// Lets every record already handed to a sink get its answer, then sends the close frame
    /// and ends the writer (each step under the drain timeout).
    async fn finish(
        &self,
        close: Option<CloseFrame>,
        control_tx: mpsc::Sender<Control>,
        replier: Replier,
        writer: tokio::task::JoinHandle<()>,
    ) {
        let all = self.settings.max_in_flight as u32;
        let drained =
            tokio::time::timeout(self.settings.drain_timeout, self.permits.acquire_many(all)).await;
        if drained.is_err() {
            tracing::warn!(
                "in-flight answers not settled within the drain timeout; the client will re-send them"
            );
        }
        let frame = close.unwrap_or_else(|| close_frame(CloseCode::Normal, "bye"));
        let _ = control_tx.send(Control::Close(frame)).await;
        drop(replier);
        let abort = writer.abort_handle();
        if tokio::time::timeout(self.settings.drain_timeout, writer)
            .await
            .is_err()
        {
            abort.abort();
        }
        // Ends the watcher task of this connection.
        self.abandon.cancel();
    }

    /// Routes one text frame; returns how many invalid records (or frames) it held.
    async fn handle_text(&self, text: &str, dispatcher: &Dispatcher, replier: &Replier) -> usize {
        match protocol::parse_frame(text, self.settings.max_batch) {
            Err(error) => {
                if !self.admit(1).await {
                    return 0;
                }
                dispatcher
                    .reject_frame(error, text.to_owned(), replier)
                    .await;
                1
            }
            Ok(mut items) => {
                let invalid = items
                    .iter()
                    .filter(|item| matches!(item, protocol::Item::Invalid { .. }))
                    .count();
                // A batch larger than the window is admitted in parts so it can never deadlock.
                let part = (self.settings.max_in_flight / 2).max(1);
                while !items.is_empty() {
                    let rest = items.split_off(items.len().min(part));
                    if !self.admit(items.len()).await {
                        return 0;
                    }
                    dispatcher.route(items, replier).await;
                    items = rest;
                }
                invalid
            }
        }
    }

    /// Waits for `n` in-flight permits; the writer gives them back as answers go out. False
    /// when the connection is given up first (shutdown, a stalled client) or no room came
    /// within the peer timeout: then the records are not routed, and the client, whose
    /// connection closes, sends them again.
    async fn admit(&self, n: usize) -> bool {
        tokio::select! {
            permit = self.permits.acquire_many(n as u32) => {
                if let Ok(permit) = permit {
                    permit.forget();
                }
                true
            }
            _ = self.abandon.cancelled() => false,
            _ = tokio::time::sleep(self.settings.peer_timeout) => {
                tracing::warn!("no room for the client's records within the peer timeout; closing");
                self.abandon.cancel();
                false
            }
        }
    }
}

fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.to_owned().into(),
    }
}

type WsSink = SplitSink<WebSocketStream<Transport>, Message>;

/// How long a write may take, and what to cancel when one takes longer.
struct Stall {
    timeout: Duration,
    stalled: CancellationToken,
}

async fn write_loop(
    mut sink: WsSink,
    mut replies: mpsc::UnboundedReceiver<Reply>,
    mut control: mpsc::Receiver<Control>,
    permits: Arc<Semaphore>,
    ping_interval: Duration,
    tally: Arc<IntakeTally>,
    stall: Stall,
) {
    let mut ping = tokio::time::interval(ping_interval);
    ping.tick().await;
    let mut writable = true;
    loop {
        tokio::select! {
            Some(reply) = replies.recv() => {
                let mut batch = vec![reply];
                while batch.len() < MAX_REPLIES_PER_PASS {
                    match replies.try_recv() {
                        Ok(reply) => batch.push(reply),
                        Err(_) => break,
                    }
                }
                writable = send_replies(&mut sink, batch, &permits, &tally, &stall, writable).await;
            }
            _ = ping.tick() => {
                if writable {
                    let sent = tokio::time::timeout(stall.timeout, sink.send(Message::Ping(Default::default()))).await;
                    writable = matches!(sent, Ok(Ok(())));
                    if sent.is_err() {
                        stall.stalled.cancel();
                    }
                }
            }
            Some(Control::Close(frame)) = control.recv() => {
                let mut rest = Vec::new();
                while let Ok(reply) = replies.try_recv() {
                    rest.push(reply);
                }
                writable = send_replies(&mut sink, rest, &permits, &tally, &stall, writable).await;
                if writable {
                    let _ = tokio::time::timeout(stall.timeout, async {
                        let _ = sink.send(Message::Close(Some(frame))).await;
                        let _ = sink.close().await;
                    })
                    .await;
                }
                return;
            }
        }
    }
}

/// Writes a pass of answers as few frames (acks merged, nacks merged per reason), then
/// returns their permits. Answers to a dead connection are dropped: the client re-sends.
async fn send_replies(
    sink: &mut WsSink,
    batch: Vec<Reply>,
    permits: &Semaphore,
    tally: &IntakeTally,
    stall: &Stall,
    writable: bool,
) -> bool {
    if batch.is_empty() {
        return writable;
    }
    let settled: usize = batch.iter().map(Reply::records).sum();
    let mut acked = Vec::new();
    let mut nacked: HashMap<(String, u64), Vec<u64>> = HashMap::new();
    let mut frames = Vec::new();
    for reply in batch {
        match reply {
            Reply::Ack { seqs, destination } => {
                metrics::counter!(m::FILTER_ACKED, "destination" => destination.as_str())
                    .increment(seqs.len() as u64);
                let count = match destination {
                    Destination::Broker => &tally.acked_broker,
                    Destination::File => &tally.acked_file,
                };
                count.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                acked.extend(seqs);
            }
            Reply::Nack {
                seqs,
                destination,
                reason,
                retry_after,
            } => {
                metrics::counter!(m::FILTER_NACKED, "destination" => destination.as_str())
                    .increment(seqs.len() as u64);
                tally.nacked.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                nacked
                    .entry((reason, retry_after.as_millis() as u64))
                    .or_default()
                    .extend(seqs);
            }
            Reply::Reject { seq, error } => {
                tally.rejected.fetch_add(1, Ordering::Relaxed);
                frames.push(ServerMessage::Reject { seq, error })
            }
        }
    }
    if !acked.is_empty() {
        frames.push(ServerMessage::Ack { seqs: acked });
    }
    for ((reason, retry_after_ms), seqs) in nacked {
        frames.push(ServerMessage::Nack {
            seqs,
            reason,
            retry_after_ms,
        });
    }
    let mut ok = writable;
    if ok {
        let written = tokio::time::timeout(stall.timeout, async {
            for frame in frames {
                sink.feed(Message::Text(frame.to_json().into())).await?;
            }
            sink.flush().await
        })
        .await;
        ok = matches!(written, Ok(Ok(())));
        if written.is_err() {
            // The client stopped reading: its connection is closed, its answers dropped.
            stall.stalled.cancel();
        }
    }
    permits.add_permits(settled);
    ok
}
