//! An OTLP/HTTP trace receiver for tests: it decodes the official protobuf messages
//! (`ExportTraceServiceRequest`) and keeps every span it was sent, and it can be made slow.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One span as the receiver decoded it; ids in lowercase hex, as in a `traceparent`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, empty for a root span.
    pub parent_span_id: String,
    /// String, integer, float and boolean attributes, as text.
    pub attributes: BTreeMap<String, String>,
    /// Links to other spans: (trace id, span id).
    pub links: Vec<(String, String)>,
    /// Start and end, in nanoseconds since the Unix epoch.
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// The status: `ok`, `unset`, or `error: <message>`.
    pub status: String,
}

#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<ReceivedSpan>>,
    requests: Mutex<u64>,
    delay: Mutex<Duration>,
}

/// A receiver listening on 127.0.0.1; dropping it stops it.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver on a free port.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new()
            .route("/v1/traces", post(receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP receiver");
        let addr = listener.local_addr().expect("the receiver's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            server,
        }
    }

    /// What `OTEL_EXPORTER_OTLP_ENDPOINT` should be to reach it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Exports `service`'s spans (its record spans included, every record sampled) to this
    /// receiver, batched every 200 ms; the [`crate::traces::Traces`] returned flushes them at its shutdown.
    pub fn trace(&self, service: &'static str) -> crate::traces::Traces {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .with_endpoint(format!("{}/v1/traces", self.endpoint()))
            .with_timeout(Duration::from_secs(10))
            .build()
            .expect("an OTLP exporter");
        let batching = crate::traces::Batching {
            max_queue: 65_536,
            max_batch: 512,
            delay: Duration::from_millis(200),
        };
        // Every record sampled: a test follows each record's trace.
        let sampling = crate::traces::Sampling::ParentBasedAlwaysOn;
        let traces = crate::traces::Traces::new(service, exporter, batching, sampling);
        crate::spans::install(service, traces.tracer(service));
        traces
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes the spans received since the last take out of the receiver (and out of what
    /// [`Receiver::spans`] returns): a long-running receiver then holds one interval's spans,
    /// not every span of its life, copied at every look.
    pub fn take_spans(&self) -> Vec<ReceivedSpan> {
        std::mem::take(&mut *self.shared.spans.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Export requests received so far.
    pub fn requests(&self) -> u64 {
        *self
            .shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every later request wait `delay` before it is answered (a slow collector).
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(State(shared): State<Arc<Shared>>, body: Bytes) -> (StatusCode, Vec<u8>) {
    *shared.requests.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    let delay = *shared.delay.lock().unwrap_or_else(|e| e.into_inner());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref().map(text))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .into_iter()
                        .filter_map(|kv| Some((kv.key, text(kv.value?.value.as_ref()?))))
                        .collect(),
                    links: span
                        .links
                        .into_iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                    status: match span.status {
                        Some(status) if status.code == 1 => "ok".to_owned(),
                        Some(status) if status.code == 2 => format!("error: {}", status.message),
                        _ => "unset".to_owned(),
                    },
                });
            }
        }
    }
    shared
        .spans
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(spans);
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

/// The trace `trace_id` as text: one line per span, children under their parent, each with its
/// start (ms after the trace's first span), its duration and its status; store spans that link
/// to one of the trace's spans are shown under it, marked `(linked)`.
pub fn render(spans: &[ReceivedSpan], trace_id: &str) -> String {
    let own: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let first = own.iter().map(|s| s.start_ns).min().unwrap_or_default();
    let mut out = String::new();
    let mut roots: Vec<&&ReceivedSpan> = own
        .iter()
        .filter(|s| !own.iter().any(|p| p.span_id == s.parent_span_id))
        .collect();
    roots.sort_by_key(|s| s.start_ns);
    for root in roots {
        render_span(spans, &own, root, first, 0, "", &mut out);
    }
    out
}

fn render_span(
    all: &[ReceivedSpan],
    own: &[&ReceivedSpan],
    span: &ReceivedSpan,
    first: u64,
    depth: usize,
    mark: &str,
    out: &mut String,
) {
    let ms = |ns: u64| ns as f64 / 1e6;
    out.push_str(&format!(
        "{:indent$}{} {}{mark}  +{:.1} ms, {:.1} ms, {}\n",
        "",
        span.service,
        span.name,
        ms(span.start_ns.saturating_sub(first)),
        ms(span.end_ns.saturating_sub(span.start_ns)),
        span.status,
        indent = depth * 2
    ));
    let mut children: Vec<(&ReceivedSpan, &str)> = own
        .iter()
        .filter(|s| s.parent_span_id == span.span_id)
        .map(|s| (*s, ""))
        .collect();
    let link = (span.trace_id.clone(), span.span_id.clone());
    children.extend(
        all.iter()
            .filter(|s| s.links.contains(&link))
            .map(|s| (s, " (linked)")),
    );
    children.sort_by_key(|(s, _)| s.start_ns);
    for (child, mark) in children {
        render_span(all, own, child, first, depth + 1, mark, out);
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(f) => f.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
