//! The RabbitMQ sink: pipelined publishes with publisher confirms, and a supervisor that
//! reconnects with backoff and jitter.
//!
//! Many publishes are in flight at once (up to `max_unconfirmed` records); each job (one
//! frame's broker records) is answered when all its confirms are in. With `pack` above 1, a
//! job's consecutive records of one provenance travel packed, up to `pack` a message
//! (docs/contracts.md §4): under load frames grow, and so do messages; a frame of one record is
//! still a record message. Only a positive confirm without a return is an ack: a nack, a
//! returned (unroutable) message or a lost connection nacks the records back to the client,
//! which sends them again. Nothing is ever acked on hope.

use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use flowmesh_common::breaker::Breaker;
use flowmesh_common::link::LinkStatus;
use flowmesh_common::message;
use flowmesh_common::metrics as m;
use flowmesh_common::nodes::{Node, Nodes};
use flowmesh_common::record::Record;
use flowmesh_common::retry;
use flowmesh_common::spans::{
    self, KeyValue, Parent, RecordSpan, RecordTracer, SpanContext, SpanKind,
};
use flowmesh_common::topology::{HEADER_TRACEPARENT, Topology, TopologyError, routing_key};
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, join_all};
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, Event};
use tokio::sync::mpsc;

use crate::reply::{Destination, Replier};

/// Jobs queued for the publisher at most.
const QUEUE_JOBS: usize = 256;
/// Longest a connection attempt (TCP, AMQP handshake, topology) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the sink reaches RabbitMQ.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The RabbitMQ nodes (their URLs may hold a password: never logged).
    pub nodes: Nodes,
    /// Exchanges and queues, declared at every (re)connect.
    pub topology: Topology,
    /// Published records awaiting a confirm at most.
    pub max_unconfirmed: usize,
    /// Longest wait for a publish and its confirm; past it the message counts as nacked.
    pub confirm_timeout: Duration,
    /// Records per message at most (1: every record its own message).
    pub pack: usize,
}

/// Records bound for RabbitMQ and the connection to answer.
#[derive(Debug)]
pub struct BrokerJob {
    /// The records, in arrival order.
    pub records: Vec<Record>,
    /// Each record's `route` span (empty where traces are off): the parent of its publish span.
    pub routed: Vec<SpanContext>,
    /// Who to answer.
    pub replier: Replier,
}

/// Handle to the running publisher. Cheap to clone; the publisher drains and stops when every
/// handle is gone.
#[derive(Debug, Clone)]
pub struct BrokerSink {
    sender: mpsc::Sender<BrokerJob>,
    breaker: Breaker,
    link: LinkStatus,
    /// The records exchange, for the spans of records never published.
    exchange: String,
    tracer: RecordTracer,
}

impl BrokerSink {
    /// Starts the publisher and its connection supervisor.
    pub fn start(config: BrokerConfig, breaker: Breaker) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(QUEUE_JOBS);
        let link = LinkStatus::new("amqp");
        let exchange = config.topology.exchange.clone();
        let task = tokio::spawn(
            Publisher {
                config,
                breaker: breaker.clone(),
                link: link.clone(),
                tracer: spans::tracer(crate::SERVICE),
            }
            .run(receiver),
        );
        (
            Self {
                sender,
                breaker,
                link,
                exchange,
                tracer: spans::tracer(crate::SERVICE),
            },
            task,
        )
    }

    /// The breaker guarding RabbitMQ.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The connection's state, for health and tests. Holding it does not keep the publisher
    /// running.
    pub fn link(&self) -> LinkStatus {
        self.link.clone()
    }

    /// Ends a failed publish span for each of `records` that is not published at all (the
    /// breaker open, the publisher stopped): `reason` in the record's trace, under its route.
    pub fn unpublished(&self, records: &[Record], routed: &[SpanContext], reason: &str) {
        unpublished(&self.tracer, &self.exchange, records, routed, reason);
    }

    /// Queues a job, waiting for room (backpressure). Fails only when the publisher stopped.
    pub async fn submit(&self, job: BrokerJob) -> Result<(), BrokerJob> {
        self.sender.send(job).await.map_err(|err| err.0)
    }
}

/// An established connection and its confirming channel.
struct Link {
    connection: Connection,
    channel: Channel,
    /// Fires when lapin reports a connection error.
    failed: mpsc::UnboundedReceiver<lapin::Error>,
    /// The node it is connected to.
    node: Node,
}

/// A job's seqs, who to answer, when its publishing started, and for each message the number
/// of records (of `seqs`, in order) it carried and why it was not confirmed (`None`: it was).
type Confirmed = (Vec<u64>, Replier, Instant, Vec<(usize, Option<String>)>);

/// Why a publish did not store its message (`None`: RabbitMQ confirmed it and did not return it).
fn problem(result: Result<Confirmation, String>) -> Option<String> {
    match result {
        Ok(Confirmation::Ack(None)) => None,
        Ok(Confirmation::Ack(Some(returned))) => Some(format!(
            "returned unroutable: {} {}",
            returned.reply_code, returned.reply_text
        )),
        Ok(Confirmation::Nack(_)) => Some("nacked by RabbitMQ".to_owned()),
        Ok(Confirmation::NotRequested) => Some("channel not in confirm mode".to_owned()),
        Err(err) => Some(err),
    }
}

/// A publish span failed at once with `reason` for each record never published, under its
/// route span (nothing where traces are off).
fn unpublished(
    tracer: &RecordTracer,
    exchange: &str,
    records: &[Record],
    routed: &[SpanContext],
    reason: &str,
) {
    if !tracer.is_on() {
        return;
    }
    for (record, route) in records.iter().zip(routed) {
        let reason = format!("not published: {reason}");
        publish_span(
            tracer,
            exchange,
            std::slice::from_ref(record),
            std::slice::from_ref(route),
        )
        .fail(&reason);
    }
}

/// The span of publishing `run` (one message) until its confirm: a child of its record's
/// `route` span for a record message, linked to each record's for a packed one.
fn publish_span(
    tracer: &RecordTracer,
    exchange: &str,
    run: &[Record],
    routed: &[SpanContext],
) -> RecordSpan {
    if !tracer.is_on() {
        return RecordSpan::default();
    }
    let name = format!("publish {exchange}");
    let attributes = || {
        let mut attributes = vec![
            KeyValue::new("messaging.system", "rabbitmq"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.operation.name", "publish"),
            KeyValue::new("messaging.destination.name", exchange.to_owned()),
            KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                routing_key(&run[0].source),
            ),
            KeyValue::new("messaging.message.id", run[0].id.clone()),
        ];
        if run.len() == 1 {
            attributes.extend(spans::record_attributes(&run[0]));
        } else {
            attributes.push(KeyValue::new(
                "messaging.batch.message_count",
                run.len() as i64,
            ));
        }
        attributes
    };
    match routed {
        [route] => tracer.start(name, SpanKind::Producer, Parent::Span(route), attributes),
        _ => tracer.start_linked(name, SpanKind::Producer, routed, attributes),
    }
}

/// `properties` with the `traceparent` header naming the publish span, so that a writer's span
/// is its child (contracts §4). A packed message has no such header: its lines carry theirs.
fn traced(
    properties: lapin::BasicProperties,
    span: &RecordSpan,
    packed: bool,
) -> lapin::BasicProperties {
    match span.traceparent() {
        Some(traceparent) if !packed => {
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert(
                HEADER_TRACEPARENT.into(),
                lapin::types::AMQPValue::LongString(traceparent.into()),
            );
            properties.with_headers(headers)
        }
        _ => properties,
    }
}

/// What became of one job handed to the link.
enum Published {
    /// On its way; the future settles when RabbitMQ confirms.
    Pending(BoxFuture<'static, Confirmed>),
    /// Nacked at once: no link.
    Refused,
    /// Nacked: the link failed while publishing and must be replaced.
    LinkFailed(String),
}

struct Publisher {
    config: BrokerConfig,
    breaker: Breaker,
    link: LinkStatus,
    tracer: RecordTracer,
}

impl Publisher {
    async fn run(self, mut receiver: mpsc::Receiver<BrokerJob>) {
        let mut link: Option<Link> = None;
        let mut connecting: Option<BoxFuture<'static, Result<Link, (Node, String)>>> = Some(
            Box::pin(connect(self.config.clone(), self.config.nodes.next())),
        );
        let mut backoff = retry::reconnect().build();
        let mut next_attempt: Option<tokio::time::Instant> = None;
        let mut pending: FuturesUnordered<BoxFuture<'static, Confirmed>> = FuturesUnordered::new();
        let mut unconfirmed = 0usize;
        let mut input_open = true;

        while input_open || !pending.is_empty() {
            let room = unconfirmed < self.config.max_unconfirmed;
            tokio::select! {
                result = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                    connecting = None;
                    match result {
                        Ok(new_link) => {
                            tracing::info!(node = new_link.node.name(), "connected to RabbitMQ");
                            self.link.set_node(new_link.node.name());
                            link = Some(new_link);
                            backoff = retry::reconnect().build();
                            self.link.set_connected(true);
                        }
                        Err((node, err)) => {
                            let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                            tracing::warn!(node = node.name(), error = %err, retry_in_ms = wait.as_millis() as u64, "cannot connect to RabbitMQ");
                            next_attempt = Some(tokio::time::Instant::now() + wait);
                        }
                    }
                }
                _ = sleep_until(next_attempt), if link.is_none() && connecting.is_none() => {
                    next_attempt = None;
                    self.link.count_reconnect();
                    connecting = Some(Box::pin(connect(self.config.clone(), self.config.nodes.next())));
                }
                err = async { link.as_mut().expect("guarded").failed.recv().await }, if link.is_some() => {
                    let reason = err.map(|e| e.to_string()).unwrap_or_else(|| "connection closed".into());
                    self.drop_link(&mut link, &reason);
                    next_attempt = Some(tokio::time::Instant::now() + backoff.next().unwrap_or_default());
                }
                Some((seqs, replier, started, results)) = pending.next(), if !pending.is_empty() => {
                    unconfirmed -= seqs.len();
                    metrics::gauge!(m::FILTER_PUBLISH_IN_FLIGHT).set(unconfirmed as f64);
                    metrics::histogram!(m::FILTER_PUBLISH_SECONDS).record(started.elapsed().as_secs_f64());
                    self.settle(seqs, replier, results);
                }
                job = receiver.recv(), if input_open && room => {
                    let Some(job) = job else {
                        input_open = false;
                        continue;
                    };
                    let count = job.records.len();
                    match self.publish_job(link.as_ref(), job).await {
                        Published::Pending(confirming) => {
                            unconfirmed += count;
                            metrics::gauge!(m::FILTER_PUBLISH_IN_FLIGHT).set(unconfirmed as f64);
                            pending.push(confirming);
                        }
                        Published::Refused => {}
                        Published::LinkFailed(err) => {
                            self.drop_link(&mut link, &err);
                            next_attempt = Some(tokio::time::Instant::now() + backoff.next().unwrap_or_default());
                        }
                    }
                }
            }
        }
        if let Some(link) = link.take() {
            let _ = link
                .connection
                .close(200, "filter shutting down".into())
                .await;
        }
        self.link.set_connected(false);
        tracing::info!("RabbitMQ publisher drained and closed");
    }

    /// Publishes one job on the link; a job that cannot be published is nacked here.
    async fn publish_job(&self, link: Option<&Link>, job: BrokerJob) -> Published {
        let Some(current) = link else {
            let reason = "RabbitMQ unavailable";
            let exchange = &self.config.topology.exchange;
            unpublished(&self.tracer, exchange, &job.records, &job.routed, reason);
            self.refuse(job, reason.into());
            return Published::Refused;
        };
        match publish(current, &self.config, &self.tracer, job).await {
            Ok(confirming) => Published::Pending(confirming),
            Err((job, err)) => {
                self.refuse(job, format!("publish failed: {err}"));
                Published::LinkFailed(err)
            }
        }
    }

    /// Nacks every record of `job` (the breaker counts a failure).
    fn refuse(&self, job: BrokerJob, reason: String) {
        self.breaker.record(false);
        let seqs = job.records.iter().map(|r| r.seq).collect();
        job.replier.nack(
            seqs,
            Destination::Broker,
            reason,
            self.breaker.retry_after(),
        );
    }

    fn drop_link(&self, link: &mut Option<Link>, reason: &str) {
        if let Some(old) = link.take() {
            tracing::warn!(
                error = reason,
                "RabbitMQ connection lost; unconfirmed records will be nacked"
            );
            self.link.set_connected(false);
            self.breaker.trip();
            tokio::spawn(async move {
                let _ = old.connection.close(320, "reconnecting".into()).await;
            });
        }
    }

    /// Acks the records RabbitMQ confirmed and nacks the rest.
    fn settle(&self, seqs: Vec<u64>, replier: Replier, results: Vec<(usize, Option<String>)>) {
        let mut acked = Vec::with_capacity(seqs.len());
        let mut failed = Vec::new();
        let mut first_error = None;
        let mut seqs = seqs.into_iter();
        for (count, problem) in results {
            let carried = seqs.by_ref().take(count);
            match problem {
                None => acked.extend(carried),
                Some(problem) => {
                    failed.extend(carried);
                    first_error.get_or_insert(problem);
                }
            }
        }
        self.breaker.record(failed.is_empty());
        replier.ack(acked, Destination::Broker);
        if let Some(reason) = first_error {
            tracing::warn!(records = failed.len(), reason = %reason, "publishes not confirmed; nacked");
            replier.nack(
                failed,
                Destination::Broker,
                reason,
                self.breaker.retry_after(),
            );
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Opens a connection and a confirming channel and declares the topology.
async fn connect(config: BrokerConfig, node: Node) -> Result<Link, (Node, String)> {
    let attempt = async {
        let properties =
            ConnectionProperties::default().with_connection_name("flowmesh-filter".into());
        let connection = Connection::connect(node.url(), properties)
            .await
            .map_err(TopologyError::from)?;
        let (failed_tx, failed) = mpsc::unbounded_channel();
        let mut events = connection.events_listener();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                // A channel RabbitMQ closed (a soft error, such as the 404 that ends the
                // topology's probe of its partitions) leaves the connection as it was; a failed
                // publish on the publishing channel shows on its own.
                if let Event::Error(err) = event
                    && !err.is_amqp_soft_error()
                {
                    let _ = failed_tx.send(err);
                    break;
                }
            }
        });
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        config.topology.declare(&connection).await?;
        Ok::<_, TopologyError>(Link {
            connection,
            channel,
            failed,
            node: node.clone(),
        })
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(err)) => Err((node, err.to_string())),
        Err(_) => Err((node, format!("timed out after {CONNECT_TIMEOUT:?}"))),
    }
}

/// Publishes every record of a job, at most `pack` a message; the returned future resolves
/// when all are confirmed.
async fn publish(
    link: &Link,
    config: &BrokerConfig,
    tracer: &RecordTracer,
    job: BrokerJob,
) -> Result<BoxFuture<'static, Confirmed>, (BrokerJob, String)> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + config.confirm_timeout;
    let late = || format!("no confirm within {:?}", config.confirm_timeout);
    let mut confirms = Vec::new();
    let mut spans = Vec::new();
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let runs: Vec<usize> = packs(&job.records, config.pack)
        .map(<[Record]>::len)
        .collect();
    let sizes = metrics::histogram!(m::FILTER_PUBLISH_MESSAGE_RECORDS);
    let mut start = 0;
    for len in runs {
        let run = &job.records[start..start + len];
        let routed = job.routed.get(start..start + len).unwrap_or_default();
        start += len;
        let span = publish_span(tracer, &config.topology.exchange, run, routed);
        let (body, properties) = message::encode(run);
        let properties = traced(properties, &span, len > 1);
        let published = tokio::time::timeout_at(
            deadline,
            link.channel.basic_publish(
                config.topology.exchange.as_str().into(),
                routing_key(&run[0].source).as_str().into(),
                options,
                &body,
                properties,
            ),
        )
        .await
        .unwrap_or_else(|_| Err(lapin::Error::from(std::io::Error::other(late()))));
        match published {
            Ok(confirm) => {
                sizes.record(len as f64);
                confirms.push((len, confirm));
                spans.push(span);
            }
            // Records published before the failure still get their confirms (or errors);
            // simplest correct answer is to nack the whole job: duplicates are harmless.
            Err(err) => {
                let err = err.to_string();
                for span in spans.into_iter().chain([span]) {
                    span.fail(&format!("publish failed: {err}"));
                }
                return Err((job, err));
            }
        }
    }
    let seqs: Vec<u64> = job.records.iter().map(|r| r.seq).collect();
    let replier = job.replier;
    let late = late();
    Ok(Box::pin(async move {
        let (counts, confirms): (Vec<usize>, Vec<_>) = confirms.into_iter().unzip();
        // Each confirm waits until the deadline at most: a late one counts as a nack.
        let bounded = confirms.into_iter().map(|confirm| async {
            problem(match tokio::time::timeout_at(deadline, confirm).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(late.clone()),
            })
        });
        let problems = join_all(bounded).await;
        for (span, problem) in spans.into_iter().zip(&problems) {
            span.finish(problem.as_ref().map_or(Ok(()), Err));
        }
        let results = counts.into_iter().zip(problems).collect();
        (seqs, replier, started, results)
    }))
}

/// The messages a job's records travel in: consecutive runs of at most `pack` records that
/// share their provenance (a packed message carries it once) and their source's bucket (a
/// message has one routing key, contracts §4 "Partitions").
fn same_bucket(a: &Record, b: &Record) -> bool {
    a.source == b.source || routing_key(&a.source) == routing_key(&b.source)
}

fn packs(records: &[Record], pack: usize) -> impl Iterator<Item = &[Record]> {
    let mut rest = records;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        let len = rest
            .iter()
            .take(pack.max(1))
            .take_while(|r| r.provenance == first.provenance && same_bucket(r, first))
            .count();
        let (run, tail) = rest.split_at(len);
        rest = tail;
        Some(run)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowmesh_common::record::Provenance;

    fn record(seq: u64, version: &str) -> Record {
        let mut record = Record::new("gen-a", seq, chrono::Utc::now(), 95, None);
        record.provenance = Some(Provenance {
            version: version.into(),
            route: Some("broker".into()),
        });
        record
    }

    fn runs(records: &[Record], pack: usize) -> Vec<Vec<u64>> {
        packs(records, pack)
            .map(|run| run.iter().map(|r| r.seq).collect())
            .collect()
    }

    #[test]
    fn a_job_packs_into_runs_of_at_most_pack_records_of_one_provenance() {
        let records: Vec<Record> = (1..=7)
            .map(|seq| record(seq, if seq == 4 { "v2" } else { "v1" }))
            .collect();
        assert_eq!(
            runs(&records, 1),
            (1..=7).map(|s| vec![s]).collect::<Vec<_>>()
        );
        assert_eq!(
            runs(&records, 2),
            vec![vec![1, 2], vec![3], vec![4], vec![5, 6], vec![7]]
        );
        assert_eq!(
            runs(&records, 100),
            vec![vec![1, 2, 3], vec![4], vec![5, 6, 7]]
        );
        assert!(runs(&[], 100).is_empty());
    }
}
