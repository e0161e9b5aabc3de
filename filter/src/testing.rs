//! Test support (feature `testkit`): an in-process filter on free ports with a private AMQP
//! topology and a temporary data directory, a raw WebSocket client, and queue inspection.

use std::net::SocketAddr;
use std::time::Duration;

use flowmesh_common::protocol::ServerMessage;
use flowmesh_common::topology::Topology;
use futures_util::{SinkExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerStatus;
use crate::{Application, FilterConfig};

/// The RabbitMQ the tests use: `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A channel to the test RabbitMQ, for inspecting queues.
pub async fn amqp_channel() -> (Connection, Channel) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable at AMQP_URL");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
}

/// Consumes messages from `queue` (acking them) until `expect` have arrived and the queue has
/// been quiet for a moment, or until `within` has passed. A consumer rather than `basic.get`,
/// which single-active-consumer quorum queues refuse.
pub async fn drain_queue(
    channel: &Channel,
    queue: &str,
    expect: usize,
    within: Duration,
) -> Vec<lapin::message::Delivery> {
    let tag = format!("test-drain-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("basic.consume");
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let quiet = if got.len() >= expect {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(3600)
        };
        let wait = deadline.min(tokio::time::Instant::now() + quiet);
        match tokio::time::timeout_at(wait, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
                got.push(delivery);
            }
            Ok(Some(Err(err))) => panic!("consuming {queue}: {err}"),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    got
}

/// Polls `condition` every 20 ms until it holds, failing the test after `within`.
pub async fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
    /// The publisher's state.
    pub broker: BrokerStatus,
    /// The records file breaker.
    pub file_breaker: flowmesh_common::breaker::Breaker,
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
        let topology = Topology::new(&config.amqp_prefix, config.delivery_limit);
        let app = Application::build(config).await.expect("filter builds");
        let ws_addr = app.ws_addr();
        let http_addr = app.http_addr();
        let broker = app.broker();
        let file_breaker = app.file_breaker();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Self {
            ws_addr,
            http_addr,
            topology,
            dir,
            broker,
            file_breaker,
            shutdown,
            task,
        }
    }

    /// Waits until the publisher is connected to RabbitMQ.
    pub async fn wait_connected(&self) {
        let broker = self.broker.clone();
        eventually(
            "filter connected to RabbitMQ",
            Duration::from_secs(30),
            || broker.is_connected(),
        )
        .await;
    }

    /// `ws://…/ingest` of this filter.
    pub fn url(&self) -> String {
        format!("ws://{}/ingest", self.ws_addr)
    }

    /// The records file's lines, parsed.
    pub fn file_records(&self) -> Vec<serde_json::Value> {
        read_lines(&self.dir.path().join("records.jsonl"))
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

/// Parses every line of a JSON Lines file (none if it does not exist).
pub fn read_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is JSON"))
        .collect()
}

/// A bare WebSocket client speaking SPEC §2 by hand.
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
                    return Ok(serde_json::from_str(text.as_str())
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

/// Declares `topology`, then publishes each message to `exchange` and waits for its confirm.
pub async fn publish(
    topology: &Topology,
    exchange: &str,
    messages: Vec<(Vec<u8>, lapin::BasicProperties)>,
) {
    let (connection, channel) = amqp_channel().await;
    topology.declare(&channel).await.expect("declare");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for (body, properties) in messages {
        channel
            .basic_publish(
                exchange.into(),
                "".into(),
                lapin::options::BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    let _ = connection.close(200, "ok".into()).await;
}

/// Publishes records to the records exchange as the filter would (same properties).
pub async fn publish_records(topology: &Topology, records: &[flowmesh_common::record::Record]) {
    let messages = records
        .iter()
        .map(|r| {
            (
                r.to_json().into_bytes(),
                flowmesh_common::topology::record_properties(r),
            )
        })
        .collect();
    publish(topology, &topology.exchange, messages).await;
}

/// Deletes a test's private topology.
pub async fn delete_topology(topology: &Topology) {
    let (connection, channel) = amqp_channel().await;
    let _ = topology.delete(&channel).await;
    let _ = connection.close(200, "ok".into()).await;
}

/// A valid record timestamped now, with a fresh `traceparent`.
pub fn record(source: &str, seq: u64, value: u8) -> flowmesh_common::record::Record {
    flowmesh_common::record::Record::new(
        source,
        seq,
        chrono::Utc::now(),
        value,
        Some(flowmesh_common::record::new_traceparent()),
    )
}

/// A valid record whose hash satisfies `wanted`, found by trying successive milliseconds.
pub fn record_where(
    source: &str,
    seq: u64,
    value: u8,
    wanted: impl Fn(&str) -> bool,
) -> flowmesh_common::record::Record {
    let base = chrono::Utc::now();
    (0..)
        .map(|ms| {
            flowmesh_common::record::Record::new(
                source,
                seq,
                base + chrono::Duration::milliseconds(ms),
                value,
                Some(flowmesh_common::record::new_traceparent()),
            )
        })
        .find(|r| wanted(&r.hash))
        .expect("some millisecond gives a wanted hash")
}
