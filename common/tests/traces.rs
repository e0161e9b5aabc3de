//! Trace export against a real OTLP/HTTP receiver that decodes the official protobuf messages:
//! spans arrive with their parents and attributes; a dead or slow collector costs spans (counted)
//! and never the caller's time.
#![cfg(feature = "testkit")]

use std::sync::OnceLock;
use std::time::Duration;

use flowmesh_common::testkit::otlp::Receiver;
use flowmesh_common::traces::{Batching, Sampling, Traces};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry_otlp::WithExportConfig;
use tracing_subscriber::layer::SubscriberExt;

/// One test at a time reads and moves the counters (the tests share the process's recorder).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The process's metrics, read as Prometheus text.
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("the test's metrics recorder")
    })
}

fn counter(series: &str) -> u64 {
    metrics()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn traces_to(endpoint: &str, batching: Batching, timeout: Duration) -> Traces {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .with_timeout(timeout)
        .build()
        .expect("an OTLP exporter");
    Traces::new("traces-test", exporter, batching, Sampling::AlwaysOn)
}

/// The export counters, read before a test's spans so that it counts only its own.
struct Counts {
    failed: u64,
    full: u64,
    exported: u64,
}

impl Counts {
    fn now() -> Self {
        metrics();
        Self {
            failed: counter("flowmesh_trace_spans_dropped_total{reason=\"export_failed\"}"),
            full: counter("flowmesh_trace_spans_dropped_total{reason=\"queue_full\"}"),
            exported: counter("flowmesh_trace_spans_exported_total"),
        }
    }

    fn since(&self, before: &Counts) -> Counts {
        Counts {
            failed: self.failed - before.failed,
            full: self.full - before.full,
            exported: self.exported - before.exported,
        }
    }
}

/// A receiver that answers after 30 s, and traces exporting to it in batches of 16 every 20 ms
/// through a queue of `max_queue`, giving up on a batch after `timeout`.
async fn to_a_slow_collector(max_queue: usize, timeout: Duration) -> (Receiver, Traces) {
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_secs(30));
    let batching = Batching {
        max_queue,
        max_batch: 16,
        delay: Duration::from_millis(20),
    };
    let traces = traces_to(&receiver.endpoint(), batching, timeout);
    (receiver, traces)
}

/// Runs `spans` with the traces' tracer as the thread's subscriber.
fn record_with(traces: &Traces, spans: impl FnOnce()) {
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(traces.tracer("traces-test")));
    tracing::subscriber::with_default(subscriber, spans);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_real_receiver_with_their_parents_attributes_and_service() {
    let _serial = SERIAL.lock().await;
    metrics();
    let receiver = Receiver::start().await;
    let traces = traces_to(
        &receiver.endpoint(),
        Batching::default(),
        Duration::from_secs(10),
    );
    record_with(&traces, || {
        let record = tracing::info_span!("record", record.id = "src-1", seq = 1_u64);
        let _in_record = record.enter();
        tracing::info_span!("store", db.system = "postgresql").in_scope(|| {});
    });
    tokio::task::spawn_blocking(move || traces.shutdown(Duration::from_secs(10)))
        .await
        .expect("the traces shut down");
    let spans = receiver.spans();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let record = spans
        .iter()
        .find(|s| s.name == "record")
        .expect("the record span");
    let store = spans
        .iter()
        .find(|s| s.name == "store")
        .expect("the store span");
    assert_eq!(record.service, "traces-test");
    assert_eq!(record.parent_span_id, "", "a root span");
    assert_eq!(store.trace_id, record.trace_id);
    assert_eq!(store.parent_span_id, record.span_id);
    assert_eq!(
        record.attributes.get("record.id").map(String::as_str),
        Some("src-1")
    );
    assert_eq!(record.attributes.get("seq").map(String::as_str), Some("1"));
    assert_eq!(
        store.attributes.get("db.system").map(String::as_str),
        Some("postgresql")
    );
    assert!(record.start_ns <= store.start_ns && store.end_ns <= record.end_ns);
}

/// A collector that answers too late: every span is dropped and counted, and spans never wait
/// for it — the queue overflows (`queue_full`) instead of holding the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_collector_costs_counted_spans_and_never_the_callers_time() {
    let _serial = SERIAL.lock().await;
    metrics();
    let dropped = |reason: &str| {
        counter(&format!(
            "flowmesh_trace_spans_dropped_total{{reason=\"{reason}\"}}"
        ))
    };
    let (full_before, failed_before) = (dropped("queue_full"), dropped("export_failed"));
    let (receiver, traces) = to_a_slow_collector(64, Duration::from_millis(300)).await;
    const SPANS: u64 = 20_000;
    record_with(&traces, || {
        for seq in 0..SPANS {
            tracing::info_span!("record", seq).in_scope(|| {});
        }
    });
    tokio::task::spawn_blocking(move || traces.shutdown(Duration::from_secs(30)))
        .await
        .expect("the traces shut down");
    let (full, failed) = (
        dropped("queue_full") - full_before,
        dropped("export_failed") - failed_before,
    );
    assert!(
        receiver.requests() > 0,
        "the exporter never reached the collector"
    );
    assert!(
        full > 0,
        "no span was dropped at a full queue: did on_end wait?"
    );
    assert_eq!(
        full + failed,
        SPANS,
        "every span is either dropped or exported"
    );
    assert!(
        receiver.spans().is_empty(),
        "answered after the timeout: none taken"
    );
}

/// Nothing listens at the endpoint: batches fail at once and are counted, nothing is retried
/// into a backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_counted_spans() {
    let _serial = SERIAL.lock().await;
    let before = Counts::now();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let traces = traces_to(
        &format!("http://127.0.0.1:{port}"),
        Batching::default(),
        Duration::from_secs(2),
    );
    record_with(&traces, || {
        for seq in 0..100_u64 {
            tracing::info_span!("record", seq).in_scope(|| {});
        }
    });
    tokio::task::spawn_blocking(move || traces.shutdown(Duration::from_secs(10)))
        .await
        .expect("the traces shut down");
    let counted = Counts::now().since(&before);
    assert_eq!(counted.failed + counted.full, 100);
}

/// Sampled at a ratio (`parentbased_traceidratio`): a record's root span decides for every span
/// under it, which then carry attributes only when sampled; a span that links to records'
/// spans (a batch's store call) is exported when one of them is sampled, linking only to the
/// sampled ones, and is not made at all when none is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_records_spans_are_exported_whole_and_an_unsampled_records_not_at_all() {
    use flowmesh_common::spans::{self, KeyValue, Parent, SpanKind};
    let _serial = SERIAL.lock().await;
    metrics();
    let receiver = Receiver::start().await;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", receiver.endpoint()))
        .build()
        .expect("an OTLP exporter");
    let sampling = Sampling::ParentBasedRatio(0.5);
    let traces = Traces::new("sampled-test", exporter, Batching::default(), sampling);
    spans::install("sampled-test", traces.tracer("sampled-test"));
    let tracer = spans::tracer("sampled-test");
    let attributes = |seq: usize| move || vec![KeyValue::new("flowmesh.record.seq", seq as i64)];
    let mut roots = Vec::new();
    for seq in 0..64 {
        let root = tracer.start("record", SpanKind::Producer, Parent::Root, attributes(seq));
        let cx = root.context().expect("a span");
        let route = tracer.start(
            "route",
            SpanKind::Internal,
            Parent::Span(&cx),
            attributes(seq),
        );
        route.ok();
        root.ok();
        roots.push(cx);
    }
    let sampled: Vec<_> = roots.iter().filter(|cx| cx.is_sampled()).collect();
    assert!(
        !sampled.is_empty() && sampled.len() < roots.len(),
        "half of 64, roughly"
    );
    let mut batches = 0;
    for batch in roots.chunks(4) {
        let store = tracer.start_linked("store", SpanKind::Client, batch, || {
            vec![KeyValue::new("db.system", "postgresql")]
        });
        let any = batch.iter().any(|cx| cx.is_sampled());
        assert_eq!(
            store.context().is_some(),
            any,
            "a store span only for sampled records"
        );
        if any {
            batches += 1;
        }
        store.ok();
    }
    let unsampled = roots.iter().find(|cx| !cx.is_sampled()).expect("one");
    let alone = tracer.start_linked("store", SpanKind::Client, [unsampled], Vec::new);
    assert!(
        alone.context().is_none(),
        "no span for an unsampled record's batch"
    );
    spans::uninstall("sampled-test");
    tokio::task::spawn_blocking(move || traces.shutdown(Duration::from_secs(10)))
        .await
        .expect("the traces shut down");
    let spans = receiver.spans();
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();
    assert_eq!(
        named("record").len(),
        sampled.len(),
        "the sampled roots, no other"
    );
    assert_eq!(
        named("route").len(),
        sampled.len(),
        "their children, no other"
    );
    for span in named("record").iter().chain(named("route").iter()) {
        assert!(
            span.attributes.contains_key("flowmesh.record.seq"),
            "{span:?}"
        );
    }
    let stores = named("store");
    assert_eq!(stores.len(), batches);
    for store in stores {
        assert!(!store.links.is_empty() && store.links.len() <= 4);
        for (trace, _) in &store.links {
            assert!(
                sampled.iter().any(|cx| cx.trace_id().to_string() == *trace),
                "a link to an unsampled record: {store:?}"
            );
        }
        assert_eq!(
            store.attributes.get("db.system").map(String::as_str),
            Some("postgresql")
        );
    }
}

/// After a batch the collector did not take, the export thread rests (1 s, then longer) and
/// drops what comes meanwhile unsent and unencoded: a failing collector is asked again only now
/// and then, however many spans the service makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_batch_the_exporter_rests_instead_of_trying_every_batch() {
    let _serial = SERIAL.lock().await;
    let before = Counts::now();
    let (receiver, traces) = to_a_slow_collector(4096, Duration::from_millis(100)).await;
    // Twelve waves of 64 spans over about 1.8 s: without the rest, about one batch every
    // 100 ms (each waits out its timeout) would reach the collector.
    for wave in 0..12_u64 {
        record_with(&traces, || {
            for seq in 0..64_u64 {
                tracing::info_span!("record", seq = wave * 64 + seq).in_scope(|| {});
            }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::task::spawn_blocking(move || traces.shutdown(Duration::from_secs(10)))
        .await
        .expect("the traces shut down");
    let counted = Counts::now().since(&before);
    assert_eq!(counted.exported, 0);
    assert_eq!(
        counted.failed + counted.full,
        12 * 64,
        "every span counted as dropped"
    );
    let requests = receiver.requests();
    assert!(
        (1..=3).contains(&requests),
        "the collector was asked {requests} times in about 2 s (a try, 1 s of rest, a try, 2 s)"
    );
}
