//! Dispatch (docs/contracts.md §3, the routes owned by `flowmesh_common::routing`): each valid
//! record to RabbitMQ or the file sink by the routes in force, every invalid one to the
//! dead-letter file and a reject. A frame is routed entirely under one routes version, which
//! goes with its records: in AMQP headers, and as the version of the file they are written to.
//! A sink whose breaker is open is not called: its records are nacked at once with a
//! `retry_after_ms`.

use flowmesh_common::metrics as m;
use flowmesh_common::protocol::{Item, excerpt};
use flowmesh_common::record::Provenance;
use flowmesh_common::record::{Record, RecordError, format_timestamp};
use flowmesh_common::spans::{self, KeyValue, Parent, RecordTracer, SpanContext, SpanKind};
use flowmesh_common::telemetry::LogLimit;
use serde_json::json;

use crate::broker::{BrokerJob, BrokerSink};
use crate::file_sink::{FileJob, FileSink, id_key};
use crate::live_routes::RoutesHandle;
use crate::reply::{Completion, Destination, Replier};

/// Warnings about invalid records logged per second at most.
const WARNINGS_PER_SECOND: u32 = 10;

/// When a client should re-send what a stopped or open sink could not take.
const UNSTORED_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Hands each record to its destination. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    broker: BrokerSink,
    file: FileSink,
    dead_letters: FileSink,
    routes: RoutesHandle,
    /// Warnings about invalid records: a few a second, the rest counted (metrics count all).
    warnings: std::sync::Arc<LogLimit>,
    /// The `route` span of each valid record, and its sink's span, where traces are on.
    tracer: RecordTracer,
}

impl Dispatcher {
    /// A dispatcher over the three sinks, by the routes `routes` holds at each frame.
    pub fn new(
        broker: BrokerSink,
        file: FileSink,
        dead_letters: FileSink,
        routes: RoutesHandle,
    ) -> Self {
        Self {
            broker,
            file,
            dead_letters,
            routes,
            warnings: std::sync::Arc::new(LogLimit::new(WARNINGS_PER_SECOND)),
            tracer: spans::tracer(crate::SERVICE),
        }
    }

    /// Routes the items of one frame. Every item gets exactly one answer through `replier`,
    /// now or when its sink has finished. Waits while a sink's queue is full (backpressure).
    pub async fn route(&self, items: Vec<Item>, replier: &Replier) {
        metrics::counter!(m::FILTER_RECEIVED).increment(items.len() as u64);
        let mut to_broker: Vec<Record> = Vec::new();
        let mut to_file: Vec<Record> = Vec::new();
        // The `route` span of each, where traces are on.
        let (mut broker_spans, mut file_spans) = (Vec::new(), Vec::new());
        let mut dead = Vec::new();
        let routes = self.routes.current();
        // Records each route took in this frame, and its `when` failures.
        let mut taken = vec![0u64; routes.routes().len()];
        let mut failed = vec![0u32; routes.routes().len()];
        for item in items {
            match item {
                Item::Valid(mut record) => {
                    let choice = routes.choose(&record);
                    taken[choice.index] += 1;
                    if choice.errors > 0 {
                        count_failures(&routes, &record, &mut failed);
                    }
                    let span = self.route_span(&record, &routes, choice.route);
                    match choice.route.to() {
                        Destination::Broker => {
                            broker_spans.extend(span);
                            record.provenance = Some(Provenance {
                                version: routes.version().to_owned(),
                                route: Some(choice.route.name().to_owned()),
                            });
                            to_broker.push(record);
                        }
                        Destination::File => {
                            file_spans.extend(span);
                            to_file.push(record);
                        }
                    }
                }
                Item::Invalid { seq, error, raw } => dead.push((seq, error, raw)),
            }
        }
        for (route, (taken, failed)) in routes.routes().iter().zip(taken.iter().zip(&failed)) {
            if *taken > 0 {
                metrics::counter!(m::FILTER_ROUTED, "route" => route.name().to_owned(), "destination" => route.to().as_str())
                    .increment(*taken);
            }
            if *failed > 0 {
                metrics::counter!(m::FILTER_ROUTE_ERRORS, "route" => route.name().to_owned())
                    .increment(u64::from(*failed));
                if let Some(left_out) = self.warnings.check() {
                    tracing::warn!(
                        route = route.name(),
                        failures = failed,
                        left_out,
                        "a route's `when` failed to evaluate; counted as not matching"
                    );
                }
            }
        }
        if !dead.is_empty() {
            self.dead_letter(dead, replier).await;
        }
        if !to_file.is_empty() {
            self.to_file(to_file, file_spans, routes.version(), replier)
                .await;
        }
        if !to_broker.is_empty() {
            self.to_broker(to_broker, broker_spans, replier).await;
        }
    }

    /// The span of `record`'s validation and routing (a child of its `traceparent`), ended at
    /// once; its context, for the sink's span. `None` where traces are off.
    fn route_span(
        &self,
        record: &Record,
        routes: &flowmesh_common::routing::Routes,
        route: &flowmesh_common::routing::Route,
    ) -> Option<SpanContext> {
        let span = self.tracer.start(
            "route",
            SpanKind::Consumer,
            Parent::Traceparent(record.traceparent.as_deref()),
            || {
                let mut attributes = spans::record_attributes(record);
                attributes.push(KeyValue::new("flowmesh.route", route.name().to_owned()));
                attributes.push(KeyValue::new(
                    "flowmesh.routes.version",
                    routes.version().to_owned(),
                ));
                attributes.push(KeyValue::new("flowmesh.destination", route.to().as_str()));
                attributes
            },
        );
        let context = span.context();
        span.ok();
        context
    }

    /// The dead-letter file's breaker.
    pub fn dead_letter_breaker(&self) -> flowmesh_common::breaker::Breaker {
        self.dead_letters.breaker().clone()
    }

    /// Handles a frame that held no record at all (not JSON, binary, wrong shape).
    pub async fn reject_frame(&self, error: RecordError, raw: String, replier: &Replier) {
        metrics::counter!(m::FILTER_RECEIVED).increment(1);
        self.dead_letter(vec![(None, error, excerpt(&raw))], replier)
            .await;
    }

    async fn dead_letter(&self, dead: Vec<(Option<u64>, RecordError, String)>, replier: &Replier) {
        let now = format_timestamp(chrono::Utc::now());
        let mut lines = Vec::with_capacity(dead.len());
        let mut rejects = Vec::with_capacity(dead.len());
        for (seq, error, raw) in dead {
            metrics::counter!(m::FILTER_REJECTED, "field" => error.field()).increment(1);
            let reason = excerpt(&error.to_string());
            if let Some(left_out) = self.warnings.check() {
                tracing::warn!(seq, field = error.field(), error = %reason, left_out, "invalid record rejected");
            }
            lines.push(
                json!({
                    "dead_lettered_at": now,
                    "origin": "filter",
                    "field": error.field(),
                    "reason": reason,
                    "seq": seq,
                    "raw": raw,
                })
                .to_string(),
            );
            rejects.push((seq, reason));
        }
        let count = lines.len() as u64;
        let job = FileJob {
            lines,
            keys: Vec::new(),
            version: None,
            spans: Vec::new(),
            completion: Completion::Rejects {
                rejects,
                replier: replier.clone(),
            },
        };
        if self.dead_letters.breaker().permit() {
            match self.dead_letters.submit(job).await {
                Ok(()) => metrics::counter!(m::FILTER_DEAD_LETTERED).increment(count),
                Err(job) => job
                    .completion
                    .not_stored("dead-letter file stopped", UNSTORED_RETRY),
            }
        } else {
            job.completion
                .not_stored("dead-letter file breaker open", UNSTORED_RETRY);
        }
    }

    async fn to_file(
        &self,
        records: Vec<Record>,
        routed: Vec<SpanContext>,
        version: &str,
        replier: &Replier,
    ) {
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        if !self.file.breaker().permit() {
            let retry = self.file.breaker().retry_after();
            replier.nack(seqs, Destination::File, "file sink breaker open", retry);
            return;
        }
        // Each record's append, under its `route` span, lasts until its commit (fsync) ended.
        let spans = routed
            .iter()
            .zip(&records)
            .map(|(route, record)| {
                self.tracer
                    .start("append", SpanKind::Producer, Parent::Span(route), || {
                        let mut attributes = spans::record_attributes(record);
                        attributes.push(KeyValue::new("flowmesh.file.version", version.to_owned()));
                        attributes
                    })
            })
            .collect();
        for record in &records {
            tracing::debug!(record_id = %record.id, trace_id = record.trace_id(), seq = record.seq, "routed to file");
        }
        let job = FileJob {
            lines: records.iter().map(Record::to_json).collect(),
            keys: records.iter().map(|r| id_key(&r.id)).collect(),
            version: Some(version.to_owned()),
            spans,
            completion: Completion::Records {
                seqs,
                replier: replier.clone(),
            },
        };
        if let Err(job) = self.file.submit(job).await {
            job.completion
                .not_stored("file sink stopped", UNSTORED_RETRY);
        }
    }

    async fn to_broker(&self, records: Vec<Record>, routed: Vec<SpanContext>, replier: &Replier) {
        if !self.broker.breaker().permit() {
            let retry = self.broker.breaker().retry_after();
            self.broker
                .unpublished(&records, &routed, "RabbitMQ breaker open");
            let seqs = records.iter().map(|r| r.seq).collect();
            replier.nack(seqs, Destination::Broker, "RabbitMQ breaker open", retry);
            return;
        }
        for record in &records {
            tracing::debug!(record_id = %record.id, trace_id = record.trace_id(), seq = record.seq, "routed to RabbitMQ");
        }
        let job = BrokerJob {
            records,
            routed,
            replier: replier.clone(),
        };
        if let Err(job) = self.broker.submit(job).await {
            self.broker
                .unpublished(&job.records, &job.routed, "RabbitMQ publisher stopped");
            let seqs = job.records.iter().map(|r| r.seq).collect();
            job.replier.nack(
                seqs,
                Destination::Broker,
                "RabbitMQ publisher stopped",
                self.broker.breaker().retry_after(),
            );
        }
    }
}

/// Which routes' `when` failed for `record`, up to the one that took it (only called for the
/// rare record whose routing met a failure).
fn count_failures(routes: &flowmesh_common::routing::Routes, record: &Record, failed: &mut [u32]) {
    let chosen = routes.choose(record).index;
    for (index, route) in routes.routes().iter().enumerate().take(chosen) {
        if route.fails_on(record) {
            failed[index] += 1;
        }
    }
}
