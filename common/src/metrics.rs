//! The one catalogue of metric names (SPEC §7). Every metric a service exports is declared here,
//! with its type, labels and meaning; `docs/metrics.md` lists the same entries (a test checks it).
//!
//! Labels are bounded: breaker names, destinations, outcomes and field names, never ids.

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic count, name ends in `_total`.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Observations in explicit buckets.
    Histogram,
}

/// One catalogue entry.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// Full name.
    pub name: &'static str,
    /// Series type.
    pub kind: Kind,
    /// Label names.
    pub labels: &'static [&'static str],
    /// What it means.
    pub help: &'static str,
}

macro_rules! catalogue {
    ($( $(#[$doc:meta])* $ident:ident = $name:literal, $kind:ident, [$($label:literal),*], $help:literal; )*) => {
        $( $(#[$doc])* #[doc = $help] pub const $ident: &str = $name; )*
        /// Every metric flowmesh exports.
        pub const CATALOGUE: &[MetricDef] = &[
            $( MetricDef { name: $name, kind: Kind::$kind, labels: &[$($label),*], help: $help }, )*
        ];
    };
}

catalogue! {
    BREAKER_STATE = "flowmesh_circuit_breaker_state", Gauge, ["breaker", "state"],
        "1 for the breaker's current state (closed, open, half_open), 0 for the others.";
    BREAKER_CALLS = "flowmesh_circuit_breaker_calls_total", Counter, ["breaker", "outcome"],
        "Calls a breaker let through, by outcome (success, failure).";
    BREAKER_NOT_PERMITTED = "flowmesh_circuit_breaker_not_permitted_calls_total", Counter, ["breaker"],
        "Calls a breaker refused because it was open.";
    BREAKER_TRANSITIONS = "flowmesh_circuit_breaker_transitions_total", Counter, ["breaker", "state"],
        "State changes of a breaker, by the state entered.";
    RECONNECTS = "flowmesh_reconnects_total", Counter, ["link"],
        "Connection attempts after the first, by link (filter, amqp).";
    CONNECTION_UP = "flowmesh_connection_up", Gauge, ["link"],
        "1 while the link's connection is established, else 0.";

    GEN_GENERATED = "flowmesh_generator_records_generated_total", Counter, [],
        "Records the generator made.";
    GEN_SENT = "flowmesh_generator_records_sent_total", Counter, [],
        "Records written to the WebSocket, first sends and re-sends alike.";
    GEN_RESENT = "flowmesh_generator_records_resent_total", Counter, [],
        "Records sent again after a nack or a reconnect.";
    GEN_ACKED = "flowmesh_generator_records_acked_total", Counter, [],
        "Records the filter acked (forgotten by the generator).";
    GEN_NACKED = "flowmesh_generator_records_nacked_total", Counter, [],
        "Records the filter nacked (kept and re-sent later).";
    GEN_REJECTED = "flowmesh_generator_records_rejected_total", Counter, [],
        "Records the filter rejected as invalid.";
    GEN_IN_FLIGHT = "flowmesh_generator_in_flight_records", Gauge, [],
        "Generated records not yet acked (the in-flight window).";
    GEN_WINDOW_FULL = "flowmesh_generator_window_full", Gauge, [],
        "1 while generation is paused because the in-flight window is full.";
    GEN_WINDOW_FULL_TOTAL = "flowmesh_generator_window_full_total", Counter, [],
        "Times generation paused on a full in-flight window.";
    GEN_FRAME_RECORDS = "flowmesh_generator_frame_records", Histogram, [],
        "Records per WebSocket frame sent.";

    FILTER_CONNECTIONS = "flowmesh_filter_connections", Gauge, [],
        "Open WebSocket connections.";
    FILTER_FRAMES = "flowmesh_filter_frames_total", Counter, ["kind"],
        "Frames received, by kind (text, binary, oversized).";
    FILTER_RECEIVED = "flowmesh_filter_records_received_total", Counter, [],
        "Records received, valid or not.";
    FILTER_ACKED = "flowmesh_filter_records_acked_total", Counter, ["destination"],
        "Records durably routed and acked, by destination (broker, file).";
    FILTER_NACKED = "flowmesh_filter_records_nacked_total", Counter, ["destination"],
        "Records nacked (not stored), by the destination they were meant for.";
    FILTER_REJECTED = "flowmesh_filter_records_rejected_total", Counter, ["field"],
        "Invalid records rejected and dead-lettered, by the field at fault.";
    FILTER_DEAD_LETTERED = "flowmesh_filter_dead_lettered_total", Counter, [],
        "Invalid records written to the dead-letter file.";
    FILTER_PUBLISH_SECONDS = "flowmesh_filter_publish_duration_seconds", Histogram, [],
        "Time from publishing a frame's records to RabbitMQ's last confirm.";
    FILTER_PUBLISH_IN_FLIGHT = "flowmesh_filter_publish_in_flight", Gauge, [],
        "Published records awaiting RabbitMQ's confirm.";
    FILTER_FILE_COMMIT_SECONDS = "flowmesh_filter_file_commit_duration_seconds", Histogram, ["file"],
        "Time to write, flush (and fsync) one group commit of a file sink.";
    FILTER_FILE_COMMIT_RECORDS = "flowmesh_filter_file_commit_records", Histogram, ["file"],
        "Records per group commit of a file sink.";
    FILTER_FILE_DUPLICATES = "flowmesh_filter_file_duplicates_total", Counter, ["file"],
        "Re-sent records already in the file: acked again, not written twice.";
    FILTER_FILE_ROTATIONS = "flowmesh_filter_file_rotations_total", Counter, ["file", "reason"],
        "File rotations, by reason (size, age).";

    WRITER_RECORDS = "flowmesh_writer_records_total", Counter, ["writer", "outcome"],
        "Records a writer handled, by outcome (stored, duplicate, dead_lettered).";
    WRITER_BATCH_RECORDS = "flowmesh_writer_batch_records", Histogram, ["writer"],
        "Records per stored batch.";
    WRITER_STORE_SECONDS = "flowmesh_writer_store_duration_seconds", Histogram, ["writer"],
        "Time to store one batch in the database (successful attempts).";
    WRITER_STORE_FAILURES = "flowmesh_writer_store_failures_total", Counter, ["writer"],
        "Failed attempts to store a batch (each is retried).";
    WRITER_END_TO_END_SECONDS = "flowmesh_writer_end_to_end_latency_seconds", Histogram, ["writer"],
        "From a record's timestamp to its commit in the writer's database.";
}

/// Makes counter series exist at zero, for every combination of the given label values, so
/// dashboards and alerts see `0` instead of nothing before the first event.
pub fn zero_counters(name: &'static str, label: Option<(&'static str, &[&'static str])>) {
    match label {
        None => metrics::counter!(name).absolute(0),
        Some((key, values)) => {
            for value in values {
                metrics::counter!(name, key => *value).absolute(0);
            }
        }
    }
}

/// Seconds buckets, 100 µs to 10 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Count buckets for batch and frame sizes.
pub const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

static HANDLE: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);

/// Installs the process-wide Prometheus recorder once and returns its handle.
///
/// Services in one test process share it, which is why this is idempotent.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let mut slot = HANDLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_records".into()), COUNT_BUCKETS)?
        .install_recorder()?;
    *slot = Some(handle.clone());
    describe();
    // Histogram samples are held until upkeep folds them into buckets. Scrapes run it too, but
    // a service nobody scrapes must not grow: fold them every few seconds regardless.
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        });
    if let Err(err) = spawned {
        // Scrapes still run upkeep; only an unscraped service would hold samples longer.
        tracing::warn!(error = %err, "cannot start the metrics upkeep thread");
    }
    Ok(handle)
}

fn describe() {
    for def in CATALOGUE {
        match def.kind {
            Kind::Counter => metrics::describe_counter!(def.name, def.help),
            Kind::Gauge => metrics::describe_gauge!(def.name, def.help),
            Kind::Histogram => metrics::describe_histogram!(def.name, def.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_follows_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for def in CATALOGUE {
            assert!(seen.insert(def.name), "{} declared twice", def.name);
            assert!(def.name.starts_with("flowmesh_"), "{}", def.name);
            assert!(
                def.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                def.name
            );
            assert_eq!(
                def.kind == Kind::Counter,
                def.name.ends_with("_total"),
                "{}",
                def.name
            );
            assert!(!def.labels.iter().any(|l| l.contains("id")), "{}", def.name);
        }
    }

    #[test]
    fn the_docs_list_every_metric_of_the_catalogue() {
        let docs = include_str!("../../docs/metrics.md");
        for def in CATALOGUE {
            assert!(
                docs.contains(&format!("`{}`", def.name)),
                "docs/metrics.md lacks {}",
                def.name
            );
        }
    }
}
