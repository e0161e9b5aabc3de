//! The consuming side both writers share: read a writer queue with a prefetch, batch by size and
//! a short linger, store through a circuit breaker with retries, ack after the store committed,
//! and dead-letter (reject without requeue) what can never be stored.
//!
//! While the store fails, the consumer holds its current batch and takes no more: everything
//! else waits in RabbitMQ, and memory is bounded by the prefetch.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use crate::breaker::Breaker;
use crate::health::{Component, ComponentStatus};
use crate::metrics as m;
use crate::record::{Record, parse_timestamp};
use crate::retry;
use crate::telemetry::redact_url;
use crate::topology::Topology;

/// What a store did with a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreReport {
    /// Records newly stored.
    pub stored: u64,
    /// Records that were already stored (redeliveries, duplicates from the generator).
    pub duplicates: u64,
}

/// A database the consumer writes to. Storing must be idempotent by record id.
pub trait RecordStore: Send + 'static {
    /// Stores `records` (in delivery order) durably, or fails without acking anything.
    fn store(
        &mut self,
        records: &[Record],
    ) -> impl Future<Output = anyhow::Result<StoreReport>> + Send;
}

/// How the consumer reads its queue.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// AMQP URL.
    pub url: String,
    /// The topology (declared at each connect).
    pub topology: Topology,
    /// Which writer this is (`pg-writer`, `mongo-writer`): picks the queue and labels metrics.
    pub writer: &'static str,
    /// Unacked messages RabbitMQ may hand this consumer at once.
    pub prefetch: u16,
    /// Records per batch at most.
    pub batch_max: usize,
    /// How long a batch waits for more records after its first.
    pub linger: Duration,
}

/// The consumer's connection state, for health.
#[derive(Debug, Clone, Default)]
pub struct ConsumerStatus {
    connected: Arc<AtomicBool>,
}

impl ConsumerStatus {
    /// True while consuming.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    fn set(&self, up: bool) {
        self.connected.store(up, Ordering::SeqCst);
        metrics::gauge!(m::CONNECTION_UP, "link" => "amqp").set(if up { 1.0 } else { 0.0 });
    }

    /// Health of the RabbitMQ link.
    pub fn component(&self, queue: &str) -> Component {
        let up = self.is_connected();
        Component::new(if up {
            ComponentStatus::Up
        } else {
            ComponentStatus::Down
        })
        .with_details(serde_json::json!({"connected": up, "queue": queue}))
    }
}

/// Consumes until `shutdown` fires. The batch in hand when it fires is stored and acked if the
/// store works; otherwise it stays unacked and RabbitMQ delivers it again later.
pub async fn run<S: RecordStore>(
    settings: ConsumerSettings,
    mut store: S,
    breaker: Breaker,
    status: ConsumerStatus,
    shutdown: CancellationToken,
) {
    m::zero_counters(m::RECONNECTS, Some(("link", &["amqp"])));
    for outcome in ["stored", "duplicate", "dead_lettered"] {
        metrics::counter!(m::WRITER_RECORDS, "writer" => settings.writer, "outcome" => outcome)
            .absolute(0);
    }
    metrics::counter!(m::WRITER_STORE_FAILURES, "writer" => settings.writer).absolute(0);
    status.set(false);
    let mut backoff = retry::reconnect().build();
    let mut attempts = 0u64;
    while !shutdown.is_cancelled() {
        if attempts > 0 {
            metrics::counter!(m::RECONNECTS, "link" => "amqp").increment(1);
        }
        attempts += 1;
        let connected = tokio::select! {
            _ = shutdown.cancelled() => break,
            connected = connect(&settings) => connected,
        };
        let (connection, channel, consumer) = match connected {
            Ok(parts) => parts,
            Err(err) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(url = %redact_url(&settings.url), error = %err, retry_in_ms = wait.as_millis() as u64, "cannot consume from RabbitMQ");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        backoff = retry::reconnect().build();
        status.set(true);
        tracing::info!(queue = %queue_name(&settings), "consuming");
        let ended = consume(&settings, &mut store, &breaker, consumer, &shutdown).await;
        status.set(false);
        if let Err(reason) = ended {
            tracing::warn!(error = %reason, "consuming stopped; reconnecting (unacked messages will be redelivered)");
        }
        let _ = channel.close(200, "bye".into()).await;
        let _ = connection.close(200, "bye".into()).await;
    }
    tracing::info!("consumer stopped");
}

fn queue_name(settings: &ConsumerSettings) -> String {
    settings
        .topology
        .queue_for(settings.writer)
        .map(|q| q.name.clone())
        .unwrap_or_default()
}

async fn connect(
    settings: &ConsumerSettings,
) -> Result<(Connection, lapin::Channel, lapin::Consumer), String> {
    let attempt = async {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("flowmesh-{}", settings.writer).into());
        let connection = Connection::connect(&settings.url, properties).await?;
        let channel = connection.create_channel().await?;
        settings.topology.declare(&channel).await?;
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue_name(settings).as_str().into(),
                format!(
                    "flowmesh-{}-{}",
                    settings.writer,
                    uuid::Uuid::new_v4().simple()
                )
                .as_str()
                .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((connection, channel, consumer))
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(parts)) => Ok(parts),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("timed out after 10 s".into()),
    }
}

/// Runs one consuming session: Ok when stopped by `shutdown`, Err when the link failed.
async fn consume<S: RecordStore>(
    settings: &ConsumerSettings,
    store: &mut S,
    breaker: &Breaker,
    mut consumer: lapin::Consumer,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let writer = settings.writer;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            next = consumer.next() => next,
        };
        let mut batch = vec![take(first)?];
        let linger = tokio::time::sleep(settings.linger);
        tokio::pin!(linger);
        while batch.len() < settings.batch_max {
            tokio::select! {
                _ = &mut linger => break,
                next = consumer.next() => batch.push(take(next)?),
            }
        }

        let mut records = Vec::with_capacity(batch.len());
        let mut last_valid = None;
        for (index, delivery) in batch.iter().enumerate() {
            match std::str::from_utf8(&delivery.data)
                .map_err(|e| e.to_string())
                .and_then(|text| Record::from_json(text).map_err(|e| e.to_string()))
            {
                Ok(record) => {
                    records.push(record);
                    last_valid = Some(index);
                }
                Err(reason) => {
                    tracing::warn!(writer, error = %reason, "message can never be stored; dead-lettering it");
                    metrics::counter!(m::WRITER_RECORDS, "writer" => writer, "outcome" => "dead_lettered").increment(1);
                    delivery
                        .reject(BasicRejectOptions { requeue: false })
                        .await
                        .map_err(|e| format!("reject failed: {e}"))?;
                }
            }
        }
        let Some(last_valid) = last_valid else {
            continue;
        };

        let report = store_until_done(settings, store, breaker, &records, shutdown).await;
        let Some(report) = report else {
            // Shutdown while the store is down: leave the batch unacked for redelivery.
            return Ok(());
        };
        let now = chrono::Utc::now();
        for record in &records {
            tracing::debug!(writer, record_id = %record.id, trace_id = record.trace_id(), seq = record.seq, "stored");
            if let Some(at) = parse_timestamp(&record.timestamp) {
                let latency = (now - at).to_std().unwrap_or_default().as_secs_f64();
                metrics::histogram!(m::WRITER_END_TO_END_SECONDS, "writer" => writer)
                    .record(latency);
            }
        }
        metrics::counter!(m::WRITER_RECORDS, "writer" => writer, "outcome" => "stored")
            .increment(report.stored);
        metrics::counter!(m::WRITER_RECORDS, "writer" => writer, "outcome" => "duplicate")
            .increment(report.duplicates);
        metrics::histogram!(m::WRITER_BATCH_RECORDS, "writer" => writer)
            .record(records.len() as f64);
        // One multiple-ack on the last stored delivery settles the batch (rejected deliveries
        // were settled already).
        batch[last_valid]
            .acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .map_err(|e| format!("ack failed after commit (redelivery is harmless): {e}"))?;
    }
}

fn take(next: Option<Result<Delivery, lapin::Error>>) -> Result<Delivery, String> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(err)) => Err(err.to_string()),
        None => Err("the consumer was cancelled".into()),
    }
}

/// Stores a batch, retrying with backoff through the breaker until it succeeds. `None` if
/// shutdown came first.
async fn store_until_done<S: RecordStore>(
    settings: &ConsumerSettings,
    store: &mut S,
    breaker: &Breaker,
    records: &[Record],
    shutdown: &CancellationToken,
) -> Option<StoreReport> {
    let mut backoff = retry::bounded(
        usize::MAX,
        Duration::from_millis(100),
        Duration::from_secs(5),
    )
    .build();
    loop {
        if !breaker.permit() {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        }
        let started = Instant::now();
        match store.store(records).await {
            Ok(report) => {
                breaker.record(true);
                metrics::histogram!(m::WRITER_STORE_SECONDS, "writer" => settings.writer)
                    .record(started.elapsed().as_secs_f64());
                return Some(report);
            }
            Err(err) => {
                breaker.record(false);
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(
                    writer = settings.writer,
                    error = format!("{err:#}"),
                    records = records.len(),
                    retry_in_ms = wait.as_millis() as u64,
                    "store failed; batch kept unacked and retried"
                );
                metrics::counter!(m::WRITER_STORE_FAILURES, "writer" => settings.writer)
                    .increment(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
