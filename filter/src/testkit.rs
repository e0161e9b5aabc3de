//! Test support (feature `testkit`): an in-process filter on free ports with a private AMQP
//! topology and a temporary data directory, and a raw WebSocket client. What tests of other
//! crates need as well (RabbitMQ helpers, records) lives in `flowmesh_common::testkit`.

use std::net::SocketAddr;
use std::time::Duration;

use flowmesh_common::protocol::ServerMessage;
use flowmesh_common::topology::Topology;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::{Application, FilterConfig};
use flowmesh_common::link::LinkStatus;
use flowmesh_common::testkit::{amqp_channel, read_lines};

/// A filter running in-process.
pub struct TestFilter {
    /// Its WebSocket address.
    pub ws_addr: SocketAddr,
    /// Its HTTP probe address.
    pub http_addr: SocketAddr,
    /// Its private topology.
    pub topology: Topology,
    /// Its data directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The publisher's link to RabbitMQ.
    pub broker: LinkStatus,
    /// The breaker guarding RabbitMQ.
    pub broker_breaker: flowmesh_common::breaker::Breaker,
    /// The records file breaker.
    pub file_breaker: flowmesh_common::breaker::Breaker,
    /// The routes in force.
    pub routes: crate::live_routes::RoutesHandle,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestFilter {
    /// Starts a filter with a fresh topology and data directory, after `configure` adjusts the
    /// test defaults, and waits until RabbitMQ is connected (unless the test cut it off).
    pub async fn start(name: &str, configure: impl FnOnce(&mut FilterConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = flowmesh_common::testkit::unique_prefix(name);
        let mut config = FilterConfig::for_tests(dir.path().to_path_buf(), &prefix);
        configure(&mut config);
        let topology = config.broker.topology();
        let app = Application::build(config).await.expect("filter builds");
        let ws_addr = app.ws_addr();
        let http_addr = app.http_addr();
        let broker = app.broker();
        let broker_breaker = app.broker_breaker();
        let file_breaker = app.file_breaker();
        let routes = app.routes();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Self {
            ws_addr,
            http_addr,
            topology,
            dir,
            broker,
            broker_breaker,
            file_breaker,
            routes,
            shutdown,
            task,
        }
    }

    /// Waits until the publisher is connected to RabbitMQ.
    pub async fn wait_connected(&self) {
        flowmesh_common::testkit::wait_linked("the filter", &self.broker).await;
    }

    /// `ws://…/ingest` of this filter.
    pub fn url(&self) -> String {
        format!("ws://{}/ingest", self.ws_addr)
    }

    /// The lines of every records file (rotated ones first), parsed.
    pub fn file_records(&self) -> Vec<serde_json::Value> {
        crate::file_sink::sink_files(self.dir.path(), "records")
            .unwrap_or_default()
            .iter()
            .flat_map(|path| read_lines(path))
            .collect()
    }

    /// The dead-letter file's lines, parsed.
    pub fn dead_letters(&self) -> Vec<serde_json::Value> {
        read_lines(&self.dir.path().join("dead-letter.jsonl"))
    }

    /// Sends the shutdown signal and waits for a clean stop.
    pub async fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Stops the filter, waits for it, and deletes its topology.
    pub async fn finish(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("filter stops within 30 s")
            .expect("filter task")
            .expect("filter ran cleanly");
        let (connection, channel) = amqp_channel().await;
        let _ = self.topology.delete(&channel).await;
        let _ = connection.close(200, "done".into()).await;
        self.dir
    }
}

/// A bare WebSocket client speaking docs/contracts.md §2 by hand.
pub struct RawClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl RawClient {
    /// Connects, with a bearer token if given.
    pub async fn connect(
        url: &str,
        token: Option<&str>,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let mut request = url.into_client_request()?;
        if let Some(token) = token {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("header"),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Self { ws })
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("send");
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .expect("send");
    }

    /// The next answer, or the close frame's code if the server closed; fails after 20 s.
    pub async fn next(&mut self) -> Result<ServerMessage, Option<u16>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("an answer within 20 s");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Ok(ServerMessage::from_json(text.as_str())
                        .expect("answers are ServerMessage JSON"));
                }
                Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    /// Collects answers until every seq in `seqs` was acked; panics on a nack or reject.
    pub async fn expect_acks(&mut self, seqs: &[u64]) {
        let mut missing: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
        while !missing.is_empty() {
            match self.next().await {
                Ok(ServerMessage::Ack { seqs }) => {
                    for seq in seqs {
                        assert!(
                            missing.remove(&seq),
                            "seq {seq} acked twice or unexpectedly"
                        );
                    }
                }
                other => panic!("expected acks for {missing:?}, got {other:?}"),
            }
        }
    }
}

/// How many times each seq of `source` is in the records files (rotated and active) of the
/// filter data directory `dir`.
pub fn file_seqs(dir: &std::path::Path, source: &str) -> std::collections::BTreeMap<u64, usize> {
    let mut seqs = std::collections::BTreeMap::new();
    for path in crate::file_sink::sink_files(dir, "records").unwrap_or_default() {
        for line in read_lines(&path) {
            if line["source"] == source {
                *seqs
                    .entry(line["seq"].as_u64().expect("a record's seq"))
                    .or_default() += 1;
            }
        }
    }
    seqs
}

/// Checks what several filters (their data directories, by name) stored of `source`'s seqs
/// 1..=`generated`: none twice in one filter, each in at least one. Returns the records stored
/// by more than one.
pub fn assert_stored_by_filters(
    filters: &[(&str, &std::path::Path)],
    source: &str,
    generated: u64,
) -> usize {
    let stored: Vec<_> = filters
        .iter()
        .map(|(name, dir)| (*name, file_seqs(dir, source)))
        .collect();
    for (name, seqs) in &stored {
        let twice: Vec<_> = seqs.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{name} stored these twice: {twice:?}");
    }
    for seq in 1..=generated {
        assert!(
            stored.iter().any(|(_, seqs)| seqs.contains_key(&seq)),
            "seq {seq} was acked but is in no filter's file"
        );
    }
    (1..=generated)
        .filter(|seq| {
            stored
                .iter()
                .filter(|(_, seqs)| seqs.contains_key(seq))
                .count()
                > 1
        })
        .count()
}

/// `N` distinct loopback addresses free when asked (all bound at once, then released): for
/// servers a test starts later, or restarts on the same port. Bound together so that no two
/// are the same port (one released and bound again would give the same port twice).
pub fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    let listeners: [std::net::TcpListener; N] =
        std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    listeners.map(|listener| listener.local_addr().expect("addr"))
}
