//! Test support (feature `testkit`), for the tests of every crate: fresh names so parallel
//! tests never share a queue or an exchange, RabbitMQ helpers (publish, drain, delete),
//! records, `eventually`, a self-cleaning writer fixture, and a TCP proxy that can cut a
//! dependency away and bring it back; and an OTLP trace receiver ([`otlp`]).
//!
//! Tests run against the real RabbitMQ and PostgreSQL; the proxy sits between a service and
//! the real server so a test can take the dependency away without stopping it for everyone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::breaker::Breaker;
use crate::link::LinkStatus;
use crate::topology::Topology;
use crate::writers::{Database, Writer};

pub mod otlp;

/// A fresh, unique prefix for a test's private AMQP topology or database objects.
pub fn unique_prefix(test: &str) -> String {
    format!("flowmesh-test-{test}-{}", uuid::Uuid::new_v4().simple())
}

/// A loopback TCP proxy to `upstream` that a test can cut and heal, or freeze and thaw.
pub struct Proxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    frozen: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts proxying a fresh loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let (frozen, _) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            open.clone(),
            generation.clone(),
            frozen.clone(),
        ));
        Ok(Self {
            addr,
            open,
            generation,
            frozen,
            task,
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every proxied connection and refuses new ones until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// As a frozen host (`docker pause`, SIGSTOP): every connection stays open and new ones are
    /// accepted, but no byte passes either way until [`thaw`](Self::thaw). Nothing is lost:
    /// what was sent meanwhile is delivered after the thaw.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Lets the bytes held by a [`freeze`](Self::freeze) through, and everything after them.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
        self.frozen.send_replace(false);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    open: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    frozen: watch::Sender<bool>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        if !open.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let mut cut = generation.subscribe();
        cut.mark_unchanged();
        let (up, down) = (frozen.subscribe(), frozen.subscribe());
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(upstream).await else {
                return;
            };
            let (from_client, to_client) = inbound.into_split();
            let (from_server, to_server) = outbound.into_split();
            tokio::select! {
                _ = pump(from_client, to_server, up) => {}
                _ = pump(from_server, to_client, down) => {}
                _ = cut.changed() => {}
            }
        });
    }
}

/// Copies one direction of a proxied connection, holding every byte while `frozen` says so.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        // A freeze that came while reading holds what was read, too.
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

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

/// Waits (up to 30 s) until `link` is connected; `who` names its owner in the failure.
pub async fn wait_linked(who: &str, link: &LinkStatus) {
    eventually(
        &format!("{who} connected to RabbitMQ"),
        Duration::from_secs(30),
        || link.is_connected(),
    )
    .await;
}

/// Parses every line of a JSON Lines file (none if it does not exist).
pub fn read_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is JSON"))
        .collect()
}

/// Declares `topology`, then publishes each message to `exchange` and waits for its confirm.
pub async fn publish(
    topology: &Topology,
    exchange: &str,
    messages: Vec<(Vec<u8>, lapin::BasicProperties)>,
) {
    let (connection, channel) = amqp_channel().await;
    topology.declare(&connection).await.expect("declare");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    // Confirms are awaited a thousand at a time: a backlog of 100 000 takes seconds.
    let mut pending = Vec::with_capacity(1000);
    for (body, properties) in messages {
        // The key a publisher gives: the source's bucket (§4 "Partitions"), when it is known.
        let key = properties
            .headers()
            .as_ref()
            .and_then(
                |headers| match headers.inner().get(crate::topology::HEADER_SOURCE) {
                    Some(lapin::types::AMQPValue::LongString(source)) => Some(
                        crate::topology::routing_key(&String::from_utf8_lossy(source.as_bytes())),
                    ),
                    _ => None,
                },
            )
            .unwrap_or_default();
        let confirm = channel
            .basic_publish(
                exchange.into(),
                key.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .expect("publish");
        pending.push(confirm);
        if pending.len() == 1000 {
            for confirm in pending.drain(..) {
                assert!(confirm.await.expect("confirm").is_ack(), "RabbitMQ nacked");
            }
        }
    }
    for confirm in pending {
        assert!(confirm.await.expect("confirm").is_ack(), "RabbitMQ nacked");
    }
    let _ = connection.close(200, "ok".into()).await;
}

/// Publishes records to the records exchange as the filter would (same properties).
pub async fn publish_records(topology: &Topology, records: &[crate::record::Record]) {
    let messages = records
        .iter()
        .map(|r| {
            (
                r.to_json().into_bytes(),
                crate::topology::record_properties(r),
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
pub fn record(source: &str, seq: u64, value: u8) -> crate::record::Record {
    crate::record::Record::new(
        source,
        seq,
        chrono::Utc::now(),
        value,
        Some(crate::record::new_traceparent()),
    )
}

/// A valid record whose hash satisfies `wanted`, found by trying successive milliseconds.
pub fn record_where(
    source: &str,
    seq: u64,
    value: u8,
    wanted: impl Fn(&str) -> bool,
) -> crate::record::Record {
    let base = chrono::Utc::now();
    (0..)
        .map(|ms| {
            crate::record::Record::new(
                source,
                seq,
                base + chrono::Duration::milliseconds(ms),
                value,
                Some(crate::record::new_traceparent()),
            )
        })
        .find(|r| wanted(&r.hash))
        .expect("some millisecond gives a wanted hash")
}

/// A writer running in-process on its private topology; [`finish`](Self::finish) stops it and
/// deletes the topology.
pub struct TestWriter {
    /// The database breaker.
    pub breaker: Breaker,
    /// The RabbitMQ link.
    pub link: LinkStatus,
    /// The probe port.
    pub http_addr: SocketAddr,
    topology: Topology,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestWriter {
    /// Runs `writer` until [`stop`](Self::stop) or [`finish`](Self::finish).
    pub fn start<D: Database>(writer: Writer<D>) -> Self {
        let breaker = writer.breaker();
        let link = writer.link();
        let http_addr = writer.http_addr();
        let topology = writer.settings().consumer.topology.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(writer.run_until_stopped(shutdown.clone()));
        Self {
            breaker,
            link,
            http_addr,
            topology,
            shutdown,
            task,
        }
    }

    /// Waits until the writer is connected to RabbitMQ.
    pub async fn wait_connected(&self) {
        wait_linked("the writer", &self.link).await;
    }

    /// Stops the writer and waits for a clean stop; the topology stays (for a restart).
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the writer stops within 30 s")
            .expect("writer task")
            .expect("the writer stopped cleanly");
    }

    /// Stops the writer and deletes its topology.
    pub async fn finish(self) {
        let topology = self.topology.clone();
        self.stop().await;
        delete_topology(&topology).await;
    }
}

/// Starts a [`Proxy`] in front of the server that `url` names (`scheme://user:pass@host:port/…`)
/// and returns it with `url` pointed at the proxy instead.
pub async fn proxy_url(url: &str) -> (Proxy, String) {
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or(authority).to_owned();
    let upstream = tokio::net::lookup_host(&host)
        .await
        .expect("the server's address resolves")
        .next()
        .expect("an address");
    let proxy = Proxy::start(upstream).await.expect("proxy starts");
    let proxied = url.replacen(&host, &proxy.addr().to_string(), 1);
    (proxy, proxied)
}

/// Messages ready in `queue` (a passive declare), as RabbitMQ counts them.
pub async fn queue_depth(queue: &str) -> u32 {
    let (connection, channel) = amqp_channel().await;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..lapin::options::QueueDeclareOptions::default()
    };
    let depth = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .expect("the queue exists")
        .message_count();
    let _ = connection.close(200, "ok".into()).await;
    depth
}

/// Takes what the test's dead-letter queue holds (waiting for `expect` messages at most
/// `within`), on a connection of its own.
pub async fn drain_dead_letters(
    topology: &Topology,
    expect: usize,
    within: Duration,
) -> Vec<lapin::message::Delivery> {
    let (connection, channel) = amqp_channel().await;
    let dead = drain_queue(&channel, &topology.dead_letter_queue.name, expect, within).await;
    let _ = connection.close(200, "ok".into()).await;
    dead
}
