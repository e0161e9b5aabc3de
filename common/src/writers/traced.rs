//! The writers' spans (docs/contracts.md §4 "Traces"): one `process <queue>` span per record,
//! a child of the context its message carries (the filter's publish span in the `traceparent`
//! header of a record message; the record's own `traceparent` in a packed message's line),
//! lasting from the batch's decoding to its ack; and one span per store call, which links to
//! each record it carried rather than inventing one parent for many traces.

use lapin::types::AMQPValue;

use crate::record::Record;
use crate::spans::{KeyValue, Parent, RecordSpan, RecordTracer, SpanContext, SpanKind};
use crate::topology::HEADER_TRACEPARENT;

/// What a store writes to, for its spans (OpenTelemetry's database conventions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreTarget {
    /// `db.system.name`: `postgresql`, `mongodb`.
    pub system: &'static str,
    /// `db.operation.name`: `INSERT`, `insertMany`.
    pub operation: &'static str,
    /// `db.collection.name`: the table or collection.
    pub collection: String,
}

/// The `traceparent` header of a message's properties, if it has one.
pub(crate) fn header_traceparent(properties: &lapin::BasicProperties) -> Option<String> {
    match properties
        .headers()
        .as_ref()?
        .inner()
        .get(HEADER_TRACEPARENT)?
    {
        AMQPValue::LongString(text) => Some(text.to_string()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

/// A `process <queue>` span for each of `records`, under the context `carried(i)` names (the
/// record's own `traceparent` when that is `None`). Empty where traces are off.
pub(crate) fn process_spans(
    tracer: &RecordTracer,
    queue: &str,
    records: &[Record],
    carried: impl Fn(usize) -> Option<String>,
) -> Vec<RecordSpan> {
    if !tracer.is_on() {
        return Vec::new();
    }
    records
        .iter()
        .enumerate()
        .map(|(index, record)| {
            let header = carried(index);
            let parent = header.as_deref().or(record.traceparent.as_deref());
            tracer.start(
                format!("process {queue}"),
                SpanKind::Consumer,
                Parent::Traceparent(parent),
                || {
                    let mut attributes = crate::spans::record_attributes(record);
                    attributes.extend([
                        KeyValue::new("messaging.system", "rabbitmq"),
                        KeyValue::new("messaging.operation.type", "process"),
                        KeyValue::new("messaging.destination.name", queue.to_owned()),
                        KeyValue::new("messaging.message.id", record.id.clone()),
                    ]);
                    attributes
                },
            )
        })
        .collect()
}

/// The span of one store call of the records whose `process` spans are `records`.
pub(crate) fn store_span(
    tracer: &RecordTracer,
    target: impl FnOnce() -> StoreTarget,
    records: &[SpanContext],
    count: usize,
) -> RecordSpan {
    if !tracer.is_on() {
        return RecordSpan::default();
    }
    let target = target();
    tracer.start_linked(
        format!("{} {}", target.operation, target.collection),
        SpanKind::Client,
        records,
        || {
            vec![
                KeyValue::new("db.system.name", target.system),
                KeyValue::new("db.operation.name", target.operation),
                KeyValue::new("db.collection.name", target.collection.clone()),
                KeyValue::new("db.operation.batch.size", count as i64),
            ]
        },
    )
}
