//! The in-flight window: every generated record stays here until the filter acks (or rejects)
//! it. Bounded: when full, [`Window::push`] waits and generation pauses.
//!
//! Records are sent from a queue of seqs; a nack puts its seqs back after `retry_after_ms`, and
//! a new connection re-queues everything still unacked (the old connection's answers are lost
//! with it). A seq is never queued twice.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowmesh_common::metrics as m;
use flowmesh_common::record::Record;
use flowmesh_common::spans::{KeyValue, RecordSpan};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::spool::Spool;

#[derive(Debug)]
struct Pending {
    /// Shared with the batches that carry it, so sending copies no record.
    json: Arc<str>,
    queued: bool,
    sent_before: bool,
    /// The record's span: ended at the ack (or reject), with an event at every send and nack.
    span: RecordSpan,
}

#[derive(Debug, Default)]
struct State {
    records: BTreeMap<u64, Pending>,
    queue: VecDeque<u64>,
    delayed: Vec<(Instant, u64)>,
    acked: u64,
    rejected: u64,
}

/// Counts of what happened to the generated records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowCounts {
    /// Records acked by the filter.
    pub acked: u64,
    /// Records rejected as invalid.
    pub rejected: u64,
    /// Records still waiting for an ack.
    pub in_flight: u64,
}

/// A batch of records to send: `(seq, json)` in seq order.
pub type Batch = Vec<(u64, Arc<str>)>;

/// The bounded set of unacked records and the queue of those to (re-)send.
#[derive(Debug)]
pub struct Window {
    state: Mutex<State>,
    /// Where generated and forgotten records are logged, when crash safety is on.
    spool: Option<Spool>,
    capacity: usize,
    /// Signalled when room frees up or the window empties.
    changed: Notify,
    /// Signalled when records are queued for sending.
    ready: Notify,
    /// The in-flight gauge ([`m::GEN_IN_FLIGHT`]), resolved once rather than per record.
    in_flight: metrics::Gauge,
}

impl Window {
    /// An empty window holding at most `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            spool: None,
            capacity: capacity.max(1),
            changed: Notify::new(),
            ready: Notify::new(),
            in_flight: metrics::gauge!(m::GEN_IN_FLIGHT),
        }
    }

    /// A window that logs to `spool` and starts with the records a previous run left unacked
    /// (they may exceed the capacity; generation waits until they are acked).
    pub fn with_spool(
        capacity: usize,
        spool: Spool,
        unacked: impl IntoIterator<Item = Record>,
    ) -> Self {
        let mut window = Self::new(capacity);
        window.spool = Some(spool);
        {
            let mut state = window.lock();
            for record in unacked {
                state.records.insert(
                    record.seq,
                    Pending {
                        json: record.to_json().into(),
                        queued: true,
                        sent_before: true,
                        // Its span ended with the run that made it.
                        span: RecordSpan::default(),
                    },
                );
                state.queue.push_back(record.seq);
            }
            window.in_flight.set(state.records.len() as f64);
        }
        window
    }

    fn forget_in_spool(&self, seqs: &[u64]) {
        if let Some(spool) = &self.spool
            && let Err(err) = spool.forgotten(seqs)
        {
            // Worst case after a crash: these are sent again, which downstream absorbs.
            tracing::warn!(error = %err, "cannot log acks to the spool");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a record, waiting while the window is full. Returns true if it had to wait. With a
    /// spool, the record's line is logged first (written before it is sent: [`Window::take_batch`]).
    pub async fn push(&self, record: &Record, span: RecordSpan) -> bool {
        let json: Arc<str> = record.to_json().into();
        if let Some(spool) = &self.spool {
            spool.generated(record.seq, &json);
        }
        let mut waited = false;
        let mut span = Some(span);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if state.records.len() < self.capacity {
                    state.records.insert(
                        record.seq,
                        Pending {
                            json: Arc::clone(&json),
                            queued: true,
                            sent_before: false,
                            span: span.take().unwrap_or_default(),
                        },
                    );
                    state.queue.push_back(record.seq);
                    self.in_flight.set(state.records.len() as f64);
                    break;
                }
            }
            if !waited {
                waited = true;
                metrics::counter!(m::GEN_WINDOW_FULL_TOTAL).increment(1);
                metrics::gauge!(m::GEN_WINDOW_FULL).set(1.0);
            }
            notified.await;
        }
        if waited {
            metrics::gauge!(m::GEN_WINDOW_FULL).set(0.0);
        }
        self.ready.notify_one();
        waited
    }

    /// Waits until records may be ready to send (queued, or a nack delay has passed).
    pub async fn wait_ready(&self) {
        let next_due = self.lock().delayed.iter().map(|(at, _)| *at).min();
        match next_due {
            Some(at) => {
                tokio::select! {
                    _ = self.ready.notified() => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            None => self.ready.notified().await,
        }
    }

    /// Takes the next records to send: at most `max_records`, and no more than `max_bytes` of
    /// JSON (a single record is always taken).
    pub fn take_batch(&self, max_records: usize, max_bytes: usize) -> Batch {
        let mut state = self.lock();
        let now = Instant::now();
        // Nothing leaves before its spool line is written: one write for everything made since
        // the last batch. If it fails, nothing is sent, and a wake-up in a second tries again.
        if let Some(spool) = &self.spool
            && let Err(err) = spool.flush()
        {
            tracing::error!(error = %err, "cannot write to the spool; sending paused");
            if let Some(&seq) = state.queue.front() {
                state.delayed.push((now + Duration::from_secs(1), seq));
            }
            return Vec::new();
        }
        let State {
            delayed,
            queue,
            records,
            ..
        } = &mut *state;
        delayed.retain(|(at, seq)| {
            if *at > now {
                return true;
            }
            if let Some(pending) = records.get_mut(seq).filter(|p| !p.queued) {
                pending.queued = true;
                queue.push_back(*seq);
            }
            false
        });
        let mut batch = Vec::new();
        let mut bytes = 2;
        while batch.len() < max_records {
            let Some(&seq) = queue.front() else { break };
            let Some(pending) = records.get_mut(&seq) else {
                queue.pop_front();
                continue;
            };
            if !batch.is_empty() && bytes + pending.json.len() + 1 > max_bytes {
                break;
            }
            queue.pop_front();
            pending.queued = false;
            if pending.sent_before {
                metrics::counter!(m::GEN_RESENT).increment(1);
            }
            let resent = pending.sent_before;
            pending
                .span
                .event("sent", || vec![KeyValue::new("flowmesh.resent", resent)]);
            pending.sent_before = true;
            bytes += pending.json.len() + 1;
            batch.push((seq, Arc::clone(&pending.json)));
        }
        batch
    }

    /// The filter stored these: forget them.
    pub fn ack(&self, seqs: &[u64]) {
        self.forget_in_spool(seqs);
        let mut state = self.lock();
        let mut removed = 0;
        for seq in seqs {
            if let Some(pending) = state.records.remove(seq) {
                pending.span.ok();
                removed += 1;
            }
        }
        state.acked += removed;
        metrics::counter!(m::GEN_ACKED).increment(removed);
        self.in_flight.set(state.records.len() as f64);
        drop(state);
        self.changed.notify_waiters();
    }

    /// The filter could not store these now: send them again after `retry_after`.
    pub fn nack(&self, seqs: &[u64], retry_after: Duration) {
        let at = Instant::now() + retry_after;
        let mut state = self.lock();
        let mut count = 0;
        for seq in seqs {
            if let Some(pending) = state.records.get_mut(seq).filter(|p| !p.queued) {
                pending.span.event("nacked", Vec::new);
                state.delayed.push((at, *seq));
                count += 1;
            }
        }
        metrics::counter!(m::GEN_NACKED).increment(count);
        drop(state);
        self.ready.notify_one();
    }

    /// The filter found this record invalid: it will never be accepted; forget it.
    pub fn reject(&self, seq: u64) {
        self.forget_in_spool(&[seq]);
        let mut state = self.lock();
        if let Some(pending) = state.records.remove(&seq) {
            pending.span.fail("rejected by the filter as invalid");
            state.rejected += 1;
            metrics::counter!(m::GEN_REJECTED).increment(1);
        }
        self.in_flight.set(state.records.len() as f64);
        drop(state);
        self.changed.notify_waiters();
    }

    /// A new connection: every unacked record is queued again, in seq order.
    pub fn requeue_all(&self) {
        let mut state = self.lock();
        let State {
            delayed,
            queue,
            records,
            ..
        } = &mut *state;
        delayed.clear();
        queue.clear();
        for (seq, pending) in records.iter_mut() {
            pending.queued = true;
            queue.push_back(*seq);
        }
        let any = !queue.is_empty();
        drop(state);
        if any {
            self.ready.notify_one();
        }
    }

    /// What happened so far.
    pub fn counts(&self) -> WindowCounts {
        let state = self.lock();
        WindowCounts {
            acked: state.acked,
            rejected: state.rejected,
            in_flight: state.records.len() as u64,
        }
    }

    /// The seqs still waiting for an ack, in order.
    pub fn unacked(&self) -> Vec<u64> {
        self.lock().records.keys().copied().collect()
    }

    /// Waits until no record is in flight.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().records.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests;
