//! The spans that follow a record through the mesh (docs/contracts.md §1 `traceparent`), made
//! with the OpenTelemetry API directly: a record's hops run on different tasks, and a span per
//! record is started in one and ended in another (at a confirm, an fsync, an ack).
//!
//! A service exports them only where [`crate::traces`] is on: [`install`] gives the service's
//! name a tracer, and [`tracer`] hands it to the code that makes spans. Where nothing is
//! installed every [`RecordSpan`] is empty and costs a branch: no id is made, no attribute
//! built (attributes are passed as closures).

use std::sync::Mutex;

use opentelemetry::Context;
/// What the services name in their spans, so that they need no OpenTelemetry crate of their own.
pub use opentelemetry::KeyValue;
use opentelemetry::trace::Span as _;
use opentelemetry::trace::{
    Link, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
};
pub use opentelemetry::trace::{SpanContext, SpanKind};
use opentelemetry_sdk::trace::{SdkTracer, Span};

/// The tracers installed, by service name (a test may run several services in one process).
static INSTALLED: Mutex<Vec<(&'static str, SdkTracer)>> = Mutex::new(Vec::new());

/// Makes `service`'s record spans go to `tracer` (replacing an earlier one).
pub fn install(service: &'static str, tracer: SdkTracer) {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    installed.retain(|(name, _)| *name != service);
    installed.push((service, tracer));
}

/// Stops exporting `service`'s record spans (a test that installed a tracer removes it).
pub fn uninstall(service: &'static str) {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    installed.retain(|(name, _)| *name != service);
}

/// `service`'s record tracer: off unless [`install`]ed. Taken once, where a component is built.
pub fn tracer(service: &'static str) -> RecordTracer {
    let installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    RecordTracer(
        installed
            .iter()
            .find(|(name, _)| *name == service)
            .map(|(_, tracer)| tracer.clone()),
    )
}

/// Starts a service's record spans, or nothing. Cheap to clone.
#[derive(Clone, Default)]
pub struct RecordTracer(Option<SdkTracer>);

impl std::fmt::Debug for RecordTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "RecordTracer(on)"
        } else {
            "RecordTracer(off)"
        })
    }
}

/// Where a span hangs in its trace.
#[derive(Debug, Clone, Copy)]
pub enum Parent<'a> {
    /// The start of a trace.
    Root,
    /// Under the span a `traceparent` names; a root when there is none or it is malformed.
    Traceparent(Option<&'a str>),
    /// Under a span of this service.
    Span(&'a SpanContext),
}

impl RecordTracer {
    /// True when spans are exported.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Starts a span named `name` under `parent`, with the attributes `attributes` makes (only
    /// called when on).
    pub fn start(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        parent: Parent<'_>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> RecordSpan {
        let Some(tracer) = &self.0 else {
            return RecordSpan::default();
        };
        let cx = match parent {
            Parent::Root => Context::new(),
            Parent::Traceparent(text) => match text.and_then(parse_traceparent) {
                Some(remote) => Context::new().with_remote_span_context(remote),
                None => Context::new(),
            },
            Parent::Span(local) => Context::new().with_remote_span_context(local.clone()),
        };
        let mut span = tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(tracer, &cx);
        // An unsampled record's spans carry its context onwards and nothing else.
        if span.is_recording() {
            span.set_attributes(attributes());
        }
        RecordSpan(Some(span))
    }

    /// Starts a span for work on many records (a batch, a packed message): a trace of its own
    /// that links to each of `records`.
    pub fn start_linked<'a>(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        records: impl IntoIterator<Item = &'a SpanContext>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> RecordSpan {
        let Some(tracer) = &self.0 else {
            return RecordSpan::default();
        };
        // Only sampled records' spans are linked: the others are exported nowhere. With none,
        // there is no span (the tracer's sampler would drop it: `traces::FollowLinks`).
        let links: Vec<Link> = records
            .into_iter()
            .filter(|cx| cx.is_valid() && cx.is_sampled())
            .map(|cx| Link::with_context(cx.clone()))
            .collect();
        if links.is_empty() {
            return RecordSpan::default();
        }
        let mut span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_links(links)
            .start_with_context(tracer, &Context::new());
        if span.is_recording() {
            span.set_attributes(attributes());
        }
        RecordSpan(Some(span))
    }
}

/// One span of a record's trace, ended by [`RecordSpan::ok`] or [`RecordSpan::fail`] (or when
/// dropped, with no status). Empty when traces are off.
#[derive(Debug, Default)]
pub struct RecordSpan(Option<Span>);

impl RecordSpan {
    /// The span's context (for children made later, on another task); `None` when empty.
    pub fn context(&self) -> Option<SpanContext> {
        self.0.as_ref().map(|span| span.span_context().clone())
    }

    /// The W3C `traceparent` naming this span, for the next hop; `None` when empty.
    pub fn traceparent(&self) -> Option<String> {
        self.0
            .as_ref()
            .map(|span| format_traceparent(span.span_context()))
    }

    /// Notes a moment in the span (a send, a nack).
    pub fn event(&mut self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(span) = self.0.as_mut().filter(|span| span.is_recording()) {
            span.add_event(name, attributes());
        }
    }

    /// Adds an attribute known only later.
    pub fn set(&mut self, attribute: impl FnOnce() -> KeyValue) {
        if let Some(span) = self.0.as_mut().filter(|span| span.is_recording()) {
            span.set_attribute(attribute());
        }
    }

    /// Ends the span: its work was done.
    pub fn ok(self) {
        if let Some(mut span) = self.0 {
            span.set_status(Status::Ok);
            span.end();
        }
    }

    /// Ends the span: its work failed for `reason`.
    pub fn fail(self, reason: &str) {
        if let Some(mut span) = self.0 {
            if span.is_recording() {
                span.set_status(Status::error(reason.to_owned()));
            }
            span.end();
        }
    }

    /// Ends the span by `result`.
    pub fn finish<E: std::fmt::Display>(self, result: Result<(), E>) {
        match result {
            Ok(()) => self.ok(),
            Err(err) => self.fail(&err.to_string()),
        }
    }
}

/// The span context a W3C `traceparent` names (version 00), as a remote parent.
pub fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16)
        .ok()
        .filter(|_| flags.len() == 2)?;
    let cx = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// The W3C `traceparent` of a span context.
pub fn format_traceparent(cx: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8()
    )
}

/// The `flowmesh.record.*` attributes every record span carries.
pub fn record_attributes(record: &crate::record::Record) -> Vec<KeyValue> {
    vec![
        KeyValue::new("flowmesh.record.id", record.id.clone()),
        KeyValue::new("flowmesh.record.source", record.source.clone()),
        KeyValue::new("flowmesh.record.seq", record.seq as i64),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_it_was_written() {
        let text = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = parse_traceparent(text).expect("valid");
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(format_traceparent(&cx), text);
        let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        assert!(!parse_traceparent(unsampled).expect("valid").is_sampled());
    }

    #[test]
    fn malformed_or_zero_traceparents_name_no_parent() {
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
            "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn with_nothing_installed_spans_are_empty_and_attributes_never_built() {
        let tracer = tracer("a-service-with-no-tracer");
        assert!(!tracer.is_on());
        let span = tracer.start("x", SpanKind::Internal, Parent::Root, || {
            panic!("attributes built while traces are off")
        });
        assert!(span.traceparent().is_none() && span.context().is_none());
    }
}
