//! Making records at the configured rate: seeded values, gap-free seqs, fresh trace ids.

use std::sync::Arc;
use std::time::Duration;

use flowmesh_common::metrics as m;
use flowmesh_common::record::{Record, new_traceparent};
use flowmesh_common::spans::{self, KeyValue, Parent, RecordSpan, RecordTracer, SpanKind};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Rate, Values};
use crate::window::Window;

/// The record maker of one generator instance.
#[derive(Debug)]
pub struct RecordSource {
    source: String,
    next_seq: u64,
    rng: fastrand::Rng,
    values: Values,
    tracer: RecordTracer,
}

impl RecordSource {
    /// Starts at seq 1 with values over all of 0–100. The same `seed` gives the same sequence
    /// of values.
    pub fn new(source: String, seed: Option<u64>) -> Self {
        let rng = seed.map(fastrand::Rng::with_seed).unwrap_or_default();
        Self {
            source,
            next_seq: 1,
            rng,
            values: Values::ALL,
            tracer: spans::tracer(crate::SERVICE),
        }
    }

    /// Draws values from `values` only (uniformly, both ends included).
    pub fn with_values(mut self, values: Values) -> Self {
        self.values = values;
        self
    }

    /// Continues an earlier run's sequence: the next record gets `next_seq`.
    pub fn starting_at(mut self, next_seq: u64) -> Self {
        self.next_seq = next_seq.max(1);
        self
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The next record, timestamped now, and the span of its trace that lasts until the
    /// filter acks it (empty where traces are off; its context is the record's `traceparent`,
    /// so the sampler decides once per record for every hop).
    pub fn next_record(&mut self) -> (Record, RecordSpan) {
        let value = self.rng.u8(self.values.low..=self.values.high);
        let (seq, source) = (self.next_seq, &self.source);
        let mut span = self
            .tracer
            .start("record", SpanKind::Producer, Parent::Root, || {
                vec![
                    KeyValue::new("flowmesh.record.source", source.clone()),
                    KeyValue::new("flowmesh.record.seq", seq as i64),
                    KeyValue::new("flowmesh.record.value", i64::from(value)),
                ]
            });
        let traceparent = span.traceparent().unwrap_or_else(new_traceparent);
        let record = Record::new(source, seq, chrono::Utc::now(), value, Some(traceparent));
        self.next_seq += 1;
        span.set(|| KeyValue::new("flowmesh.record.id", record.id.clone()));
        (record, span)
    }
}

/// Makes records into the window at `rate` until the record with seq `count` is made (a run
/// continued from a spool counts from where it left off) or `stop` fires. Returns how many were
/// made by this run.
pub async fn produce(
    mut source: RecordSource,
    rate: Rate,
    count: Option<u64>,
    window: Arc<Window>,
    stop: CancellationToken,
) -> u64 {
    let mut made = 0u64;
    let generated = metrics::counter!(m::GEN_GENERATED);
    // The schedule restarts after a pause on a full window, so a stall is not followed by a burst.
    let mut epoch = Instant::now();
    let mut made_at_epoch = 0u64;
    while count.is_none_or(|count| source.next_seq() <= count) && !stop.is_cancelled() {
        if let Rate::PerSecond(per_second) = rate {
            let due = epoch + Duration::from_secs_f64((made - made_at_epoch) as f64 / per_second);
            if due > Instant::now() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep_until(due) => {}
                }
            }
        }
        let (record, span) = source.next_record();
        tracing::debug!(record_id = %record.id, trace_id = record.trace_id(), seq = record.seq, value = record.value, "generated");
        let waited = tokio::select! {
            _ = stop.cancelled() => break,
            waited = window.push(&record, span) => waited,
        };
        made += 1;
        generated.increment(1);
        if waited {
            epoch = Instant::now();
            made_at_epoch = made;
        }
        if rate == Rate::Max && made.is_multiple_of(1024) {
            tokio::task::yield_now().await;
        }
    }
    made
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowmesh_common::record::Record;

    #[test]
    fn values_stay_in_the_configured_range_and_cover_both_ends() {
        let mut broker_only =
            RecordSource::new("v".into(), Some(3)).with_values(Values { low: 91, high: 100 });
        let values: Vec<u8> = (0..2000)
            .map(|_| broker_only.next_record().0.value)
            .collect();
        assert!(values.iter().all(|v| (91..=100).contains(v)));
        assert!(values.contains(&91) && values.contains(&100));
        let mut all = RecordSource::new("v".into(), Some(3));
        let values: Vec<u8> = (0..5000).map(|_| all.next_record().0.value).collect();
        assert!(values.contains(&0) && values.contains(&100));
    }

    #[test]
    fn the_same_seed_gives_the_same_values_and_seqs_have_no_gaps() {
        let mut a = RecordSource::new("a".into(), Some(7));
        let mut b = RecordSource::new("a".into(), Some(7));
        let first: Vec<Record> = (0..50).map(|_| a.next_record().0).collect();
        let second: Vec<Record> = (0..50).map(|_| b.next_record().0).collect();
        assert_eq!(
            first.iter().map(|r| r.value).collect::<Vec<_>>(),
            second.iter().map(|r| r.value).collect::<Vec<_>>()
        );
        assert_eq!(
            first.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (1..=50).collect::<Vec<_>>()
        );
        for record in &first {
            assert!(record.value <= 100);
            Record::from_json(&record.to_json()).expect("every generated record is valid");
        }
    }

    #[tokio::test]
    async fn a_rate_spaces_records_evenly() {
        let window = Arc::new(Window::new(1000));
        let stop = CancellationToken::new();
        let started = Instant::now();
        let made = produce(
            RecordSource::new("r".into(), Some(1)),
            Rate::PerSecond(100.0),
            Some(21),
            window,
            stop,
        )
        .await;
        assert_eq!(made, 21);
        // 21 records at 100/s: the first at once, the last 200 ms later. A timer never fires
        // early, so this is a floor; a busy machine may only make it later.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    }
}
