//! Traces: the services' `tracing` spans exported as OpenTelemetry spans over OTLP, when the
//! standard variables ask for it, and nothing at all (no exporter, no thread, no layer) when
//! they do not.
//!
//! Export is on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (the latter gets `/v1/traces` appended), unless `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none`. The exporter reads the rest of the OTLP variables itself
//! (`OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`, the default, or `http/json`; `_HEADERS`,
//! `_TIMEOUT`, the per-signal `_TRACES_` forms), the SDK reads `OTEL_SERVICE_NAME` (default: the
//! service's own name). `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` choose the sampler
//! ([`Sampling`]; default `parentbased_ratelimiting`: a record's `traceparent` decides, and at
//! most 100 traces a second start here). A span without a parent that links to records' spans
//! (a batch's store call, a packed message's publish) follows them instead: sampled when one of
//! them is, dropped when none is ([`FollowLinks`]).
//!
//! Export never slows the mesh down. A finished span goes into a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048) without waiting: when the queue is full the span is dropped
//! and counted. One thread of its own sends batches (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512, or
//! whatever is queued every `OTEL_BSP_SCHEDULE_DELAY`, 5000 ms); a batch the collector does not
//! take within the exporter's timeout is dropped and counted too, never retried into a backlog,
//! and the thread then rests (1 s, doubling to 30 s while the collector keeps failing), dropping
//! batches unencoded: a dead collector costs no more than the queue.
//! `flowmesh_trace_spans_exported_total` and `flowmesh_trace_spans_dropped_total{reason}` say
//! which.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult, ShouldSample, SpanProcessor};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter};

use crate::metrics as m;

mod sampling;
pub use sampling::{DEFAULT_PER_SECOND, RateLimited, Sampling};

/// How spans are queued and batched (the `OTEL_BSP_*` variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Finished spans waiting for export; more are dropped.
    pub max_queue: usize,
    /// Spans per export request.
    pub max_batch: usize,
    /// The longest a span waits for its batch to fill.
    pub delay: Duration,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_queue: 2048,
            max_batch: 512,
            delay: Duration::from_millis(5000),
        }
    }
}

/// What the environment asks for: `Ok(None)` when traces are off, an error naming the variable
/// when one is set to something unusable.
pub fn settings(env: impl Fn(&str) -> Option<String>) -> Result<Option<Batching>, String> {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none")
    {
        return Ok(None);
    }
    if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        && set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
    {
        return Ok(None);
    }
    if let Some(exporter) = set("OTEL_TRACES_EXPORTER")
        && exporter.trim() != "otlp"
    {
        return Err(format!(
            "OTEL_TRACES_EXPORTER={exporter}: only otlp (or none) is supported"
        ));
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(protocol) = set(name) {
            match protocol.trim() {
                "http/protobuf" | "http/json" => break,
                other => {
                    return Err(format!(
                        "{name}={other}: the services export over http/protobuf or http/json"
                    ));
                }
            }
        }
    }
    let number = |name: &str, default: usize| -> Result<usize, String> {
        match set(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name}={v}: expected a whole number above 0")),
        }
    };
    let defaults = Batching::default();
    let batching = Batching {
        max_queue: number("OTEL_BSP_MAX_QUEUE_SIZE", defaults.max_queue)?,
        max_batch: number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", defaults.max_batch)?,
        delay: Duration::from_millis(number(
            "OTEL_BSP_SCHEDULE_DELAY",
            defaults.delay.as_millis() as usize,
        )? as u64),
    };
    Ok(Some(Batching {
        max_batch: batching.max_batch.min(batching.max_queue),
        ..batching
    }))
}

/// The tracer provider of a service that exports; [`Traces::shutdown`] sends what is queued.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// A provider exporting through `exporter`, sampling as `sampling` says, with `service` as
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
    pub fn new<E: SpanExporter + 'static>(
        service: &'static str,
        exporter: E,
        batching: Batching,
        sampling: Sampling,
    ) -> Self {
        Self::with_sampler(service, exporter, batching, sampling.sampler())
    }

    /// [`Traces::new`] with any SDK sampler (still wrapped so that a span that links to records
    /// follows them).
    pub fn with_sampler<E: SpanExporter + 'static>(
        service: &'static str,
        exporter: E,
        batching: Batching,
        sampler: Box<dyn ShouldSample>,
    ) -> Self {
        let resource = match std::env::var("OTEL_SERVICE_NAME") {
            Ok(name) if !name.trim().is_empty() => Resource::builder().build(),
            _ => Resource::builder().with_service_name(service).build(),
        };
        let provider = SdkTracerProvider::builder()
            .with_sampler(FollowLinks(sampler))
            .with_span_processor(BoundedExport::new(exporter, batching))
            .with_resource(resource)
            .build();
        Self { provider }
    }

    /// The OTLP exporter the environment describes.
    pub fn otlp(
        service: &'static str,
        batching: Batching,
        sampling: Sampling,
    ) -> anyhow::Result<Self> {
        use opentelemetry_otlp::WithHttpConfig;
        // One attempt a batch: the exporter's own retries (with backoff, up to its timeout)
        // would hold the export thread, and a stopping service, on a dead collector.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .build()
            .map_err(|err| anyhow::anyhow!("cannot build the OTLP span exporter: {err}"))?;
        Ok(Self::new(service, exporter, batching, sampling))
    }

    /// The tracer the `tracing` bridge records into.
    pub fn tracer(&self, service: &'static str) -> SdkTracer {
        self.provider.tracer(service)
    }

    /// Sends what is queued (waiting at most `timeout`) and stops the export thread.
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(err) = self.provider.shutdown_with_timeout(timeout) {
            tracing::warn!(error = %err, "traces: not every queued span was sent at shutdown");
        }
    }
}

/// The environment's sampler, except for a span with no parent that links to other spans: it
/// is sampled when one of them is, and dropped otherwise. A store call's span links to every
/// record it stored; left to a ratio sampler of its own, it would be missing from most sampled
/// records' traces and be exported for unsampled ones.
#[derive(Debug, Clone)]
struct FollowLinks(Box<dyn ShouldSample>);

impl ShouldSample for FollowLinks {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: opentelemetry::trace::TraceId,
        name: &str,
        span_kind: &opentelemetry::trace::SpanKind,
        attributes: &[opentelemetry::KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        use opentelemetry::trace::TraceContextExt as _;
        let parent = parent_context.is_some_and(|cx| cx.has_active_span());
        if parent || links.is_empty() {
            return self.0.should_sample(
                parent_context,
                trace_id,
                name,
                span_kind,
                attributes,
                links,
            );
        }
        let sampled = links.iter().any(|link| link.span_context.is_sampled());
        SamplingResult {
            decision: if sampled {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::Drop
            },
            attributes: Vec::new(),
            trace_state: opentelemetry::trace::TraceState::default(),
        }
    }
}

enum Job {
    Span(Box<SpanData>),
    /// The provider's resource (`service.name`), for the exporter to send with every batch.
    Resource(Box<Resource>),
    Flush(SyncSender<()>),
    Stop(SyncSender<()>),
}

/// A span processor with a bounded queue and one export thread: `on_end` never waits.
#[derive(Debug)]
struct BoundedExport {
    queue: SyncSender<Job>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// True while the export thread rests after a failed batch: spans are dropped at once.
    resting: Arc<AtomicBool>,
}

impl BoundedExport {
    fn new<E: SpanExporter + 'static>(exporter: E, batching: Batching) -> Self {
        let (queue, jobs) = mpsc::sync_channel(batching.max_queue);
        let resting = Arc::new(AtomicBool::new(false));
        let limit = Warnings {
            resting: resting.clone(),
            ..Warnings::default()
        };
        let worker = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_loop(exporter, jobs, batching, limit))
            .ok();
        Self {
            queue,
            worker: Mutex::new(worker),
            resting,
        }
    }

    /// Sends `job` (waiting for room, as flush and stop are rare) and waits for its answer.
    fn ask(&self, job: impl FnOnce(SyncSender<()>) -> Job, timeout: Duration) -> OTelSdkResult {
        let (done, answered) = mpsc::sync_channel(1);
        self.queue
            .send(job(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        answered
            .recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for BoundedExport {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.resting.load(Ordering::Relaxed) {
            metrics::counter!(m::TRACE_SPANS_DROPPED, "reason" => "export_failed").increment(1);
            return;
        }
        if let Err(TrySendError::Full(_)) = self.queue.try_send(Job::Span(Box::new(span))) {
            metrics::counter!(m::TRACE_SPANS_DROPPED, "reason" => "queue_full").increment(1);
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once, as the provider is built, before any span: the queue has room.
        let _ = self
            .queue
            .try_send(Job::Resource(Box::new(resource.clone())));
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Job::Flush, Duration::from_secs(30))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let answer = self.ask(Job::Stop, timeout);
        if answer.is_ok()
            && let Some(worker) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            let _ = worker.join();
        }
        answer
    }
}

fn export_loop<E: SpanExporter>(
    mut exporter: E,
    jobs: Receiver<Job>,
    batching: Batching,
    mut limit: Warnings,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(batching.max_batch);
    let mut due = Instant::now() + batching.delay;
    loop {
        let job = jobs.recv_timeout(due.saturating_duration_since(Instant::now()));
        let (full, stop) = match job {
            Ok(Job::Span(span)) => {
                batch.push(*span);
                (batch.len() >= batching.max_batch, None)
            }
            Ok(Job::Resource(resource)) => {
                exporter.set_resource(&resource);
                (false, None)
            }
            Ok(Job::Flush(done)) => {
                export(&exporter, &mut batch, &mut limit);
                let _ = done.send(());
                (false, None)
            }
            Ok(Job::Stop(done)) => (true, Some(done)),
            Err(RecvTimeoutError::Timeout) => (true, None),
            Err(RecvTimeoutError::Disconnected) => {
                export(&exporter, &mut batch, &mut limit);
                return;
            }
        };
        if full {
            export(&exporter, &mut batch, &mut limit);
            due = Instant::now() + batching.delay;
        }
        if let Some(done) = stop {
            let _ = exporter.shutdown();
            let _ = done.send(());
            return;
        }
    }
}

fn export<E: SpanExporter>(exporter: &E, batch: &mut Vec<SpanData>, limit: &mut Warnings) {
    if limit
        .resting_until
        .is_some_and(|until| Instant::now() >= until)
    {
        limit.resting_until = None;
        limit.resting.store(false, Ordering::Relaxed);
    }
    if batch.is_empty() {
        return;
    }
    let spans = batch.len() as u64;
    // Resting after a failure: the batch is dropped before it is encoded (and new spans are
    // dropped as they end), so a dead collector costs the services no more than a live one.
    if limit.resting_until.is_some() {
        batch.clear();
        metrics::counter!(m::TRACE_SPANS_DROPPED, "reason" => "export_failed").increment(spans);
        return;
    }
    match futures_executor::block_on(exporter.export(std::mem::take(batch))) {
        Ok(()) => {
            limit.rest = Duration::ZERO;
            limit.resting_until = None;
            metrics::counter!(m::TRACE_SPANS_EXPORTED).increment(spans);
        }
        Err(err) => {
            metrics::counter!(m::TRACE_SPANS_DROPPED, "reason" => "export_failed").increment(spans);
            limit.rest = (limit.rest * 2).clamp(REST_FIRST, REST_MAX);
            limit.resting_until = Some(Instant::now() + limit.rest);
            limit.resting.store(true, Ordering::Relaxed);
            limit.failed += 1;
            if limit
                .last
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
            {
                limit.last = Some(Instant::now());
                let failed_batches = std::mem::take(&mut limit.failed);
                tracing::warn!(error = %err, spans, failed_batches, "traces: the collector did not take a batch; it is dropped");
            }
        }
    }
}

/// How long the export thread rests after a failed batch, doubling while failures continue.
const REST_FIRST: Duration = Duration::from_secs(1);
/// See [`REST_FIRST`].
const REST_MAX: Duration = Duration::from_secs(30);

/// At most one warning a minute about failed exports, with the count since the last one; and
/// the rest after a failure, during which batches are dropped unsent.
#[derive(Default)]
struct Warnings {
    last: Option<Instant>,
    failed: u64,
    rest: Duration,
    resting_until: Option<Instant>,
    /// Shared with the span processor, which drops spans at once while it is set.
    resting: Arc<AtomicBool>,
}

/// True for the spans of the mesh's own code (not of its libraries: an HTTP client's spans must
/// not be exported by the HTTP client exporting them).
pub fn is_own_target(target: &str) -> bool {
    const OWN: &[&str] = &[
        "flowmesh",
        "generator",
        "filter",
        "pg_writer",
        "mongo_writer",
    ];
    OWN.iter().any(|own| {
        target == *own
            || target
                .strip_prefix(own)
                .is_some_and(|rest| rest.starts_with("::") || rest.starts_with('_'))
    })
}

#[cfg(test)]
mod tests;
