//! The one catalogue of metric names (docs/contracts.md §7). Every metric a service exports is declared here,
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

/// Which services export a metric (and have its series zeroed at start-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The generator.
    Generator,
    /// The filter.
    Filter,
    /// Each writer (`pg-writer`, `mongo-writer`); its `writer` label is the service's name.
    Writer,
    /// Any service (breakers, links): zeroed by the type that owns the label value.
    Shared,
}

/// One catalogue entry.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// Full name.
    pub name: &'static str,
    /// Series type.
    pub kind: Kind,
    /// Which services export it.
    pub owner: Owner,
    /// Label names.
    pub labels: &'static [&'static str],
    /// Per label, every value it takes; empty where the value is only known at run time
    /// (`writer` is the service's name; breaker and link names are zeroed by their types).
    pub values: &'static [&'static [&'static str]],
    /// What it means.
    pub help: &'static str,
}

macro_rules! catalogue {
    ($( $(#[$doc:meta])* $ident:ident = $name:literal, $kind:ident, $owner:ident,
        [$($label:literal $(= [$($value:literal),*])?),*], $help:literal; )*) => {
        $( $(#[$doc])* #[doc = $help] pub const $ident: &str = $name; )*
        /// Every metric flowmesh exports.
        pub const CATALOGUE: &[MetricDef] = &[
            $( MetricDef {
                name: $name,
                kind: Kind::$kind,
                owner: Owner::$owner,
                labels: &[$($label),*],
                values: &[$( &[$($($value),*)?] ),*],
                help: $help,
            }, )*
        ];
    };
}

catalogue! {
    BREAKER_STATE = "flowmesh_circuit_breaker_state", Gauge, Shared, ["breaker", "state"],
        "1 for the breaker's current state (closed, open, half_open), 0 for the others.";
    BREAKER_CALLS = "flowmesh_circuit_breaker_calls_total", Counter, Shared, ["breaker", "outcome"],
        "Calls a breaker let through, by outcome (success, failure).";
    BREAKER_NOT_PERMITTED = "flowmesh_circuit_breaker_not_permitted_calls_total", Counter, Shared, ["breaker"],
        "Calls a breaker refused because it was open.";
    BREAKER_TRANSITIONS = "flowmesh_circuit_breaker_transitions_total", Counter, Shared, ["breaker", "state"],
        "State changes of a breaker, by the state entered.";
    RECONNECTS = "flowmesh_reconnects_total", Counter, Shared, ["link"],
        "Connection attempts after the first, by link (filter, amqp).";
    CONNECTION_UP = "flowmesh_connection_up", Gauge, Shared, ["link"],
        "1 while the link's connection is established, else 0.";
    AMQP_NODE = "flowmesh_amqp_node", Gauge, Shared, ["link", "node"],
        "1 for the RabbitMQ node (host:port) the link last connected to, 0 for nodes it left.";
    TRACE_SPANS_EXPORTED = "flowmesh_trace_spans_exported_total", Counter, Shared, [],
        "Spans the OTLP collector took (only while traces are exported).";
    TRACE_SPANS_DROPPED = "flowmesh_trace_spans_dropped_total", Counter, Shared, ["reason" = ["queue_full", "export_failed"]],
        "Spans not exported: `queue_full` (the bounded export queue was full) or `export_failed` (the collector did not take their batch in time).";

    GEN_GENERATED = "flowmesh_generator_records_generated_total", Counter, Generator, [],
        "Records the generator made.";
    GEN_SENT = "flowmesh_generator_records_sent_total", Counter, Generator, [],
        "Records written to the WebSocket, first sends and re-sends alike.";
    GEN_RESENT = "flowmesh_generator_records_resent_total", Counter, Generator, [],
        "Records sent again after a nack or a reconnect.";
    GEN_ACKED = "flowmesh_generator_records_acked_total", Counter, Generator, [],
        "Records the filter acked (forgotten by the generator).";
    GEN_NACKED = "flowmesh_generator_records_nacked_total", Counter, Generator, [],
        "Records the filter nacked (kept and re-sent later).";
    GEN_REJECTED = "flowmesh_generator_records_rejected_total", Counter, Generator, [],
        "Records the filter rejected as invalid.";
    GEN_IN_FLIGHT = "flowmesh_generator_in_flight_records", Gauge, Generator, [],
        "Generated records not yet acked (the in-flight window).";
    GEN_WINDOW_FULL = "flowmesh_generator_window_full", Gauge, Generator, [],
        "1 while generation is paused because the in-flight window is full.";
    GEN_WINDOW_FULL_TOTAL = "flowmesh_generator_window_full_total", Counter, Generator, [],
        "Times generation paused on a full in-flight window.";
    GEN_FILTER_SWITCHES = "flowmesh_generator_filter_switches_total", Counter, Generator, ["reason" = ["failover", "home"]],
        "Moves of the link to another filter: `failover` (its filter stayed away longer than GENERATOR_FAILOVER_AFTER) or `home` (back to the source's own filter).";
    GEN_FILTER_HOME = "flowmesh_generator_filter_home", Gauge, Generator, [],
        "1 while the link is connected to the source's own (rendezvous-hashed) filter, 0 while it is elsewhere or down.";
    GEN_FRAME_RECORDS = "flowmesh_generator_frame_records", Histogram, Generator, [],
        "Records per WebSocket frame sent.";
    GEN_SPOOL_BYTES = "flowmesh_generator_spool_bytes", Gauge, Generator, [],
        "Size of the crash-safe spool's log (with --spool-dir); compacted as it grows.";
    GEN_SPOOL_COMPACTIONS = "flowmesh_generator_spool_compactions_total", Counter, Generator, [],
        "Times the running spool was compacted to its unacked records.";

    FILTER_CONNECTIONS = "flowmesh_filter_connections", Gauge, Filter, [],
        "Open WebSocket connections.";
    FILTER_FRAMES = "flowmesh_filter_frames_total", Counter, Filter, ["kind" = ["text", "binary", "oversized"]],
        "Frames received, by kind (text, binary, oversized).";
    FILTER_RECEIVED = "flowmesh_filter_records_received_total", Counter, Filter, [],
        "Records received, valid or not.";
    FILTER_ACKED = "flowmesh_filter_records_acked_total", Counter, Filter, ["destination" = ["broker", "file"]],
        "Records durably routed and acked, by destination (broker, file).";
    FILTER_NACKED = "flowmesh_filter_records_nacked_total", Counter, Filter, ["destination" = ["broker", "file"]],
        "Records nacked (not stored), by the destination they were meant for.";
    FILTER_REJECTED = "flowmesh_filter_records_rejected_total", Counter, Filter, ["field" = ["record", "unknown", "id", "source", "seq", "timestamp", "value", "hash", "traceparent"]],
        "Invalid records rejected and dead-lettered, by the field at fault.";
    FILTER_CONNECTIONS_REFUSED = "flowmesh_filter_connections_refused_total", Counter, Filter,
        ["reason" = ["max_connections", "max_connections_per_peer", "max_handshakes"]],
        "Upgrades answered with HTTP 503 because a connection limit was reached.";
    FILTER_CLOSED_INVALID = "flowmesh_filter_connections_closed_invalid_total", Counter, Filter, [],
        "Connections closed (1008) for sending more invalid records than FILTER_MAX_INVALID.";
    FILTER_DEAD_LETTERED = "flowmesh_filter_dead_lettered_total", Counter, Filter, [],
        "Invalid records written to the dead-letter file.";
    FILTER_PUBLISH_SECONDS = "flowmesh_filter_publish_duration_seconds", Histogram, Filter, [],
        "Time from publishing a frame's records to RabbitMQ's last confirm.";
    FILTER_PUBLISH_IN_FLIGHT = "flowmesh_filter_publish_in_flight", Gauge, Filter, [],
        "Published records awaiting RabbitMQ's confirm.";
    FILTER_PUBLISH_MESSAGE_RECORDS = "flowmesh_filter_publish_message_records", Histogram, Filter, [],
        "Records per message published to RabbitMQ (1 unless FILTER_PUBLISH_PACK is above 1).";
    FILTER_FILE_COMMIT_SECONDS = "flowmesh_filter_file_commit_duration_seconds", Histogram, Filter, ["file"],
        "Time to write, flush (and fsync) one group commit of a file sink.";
    FILTER_FILE_COMMIT_RECORDS = "flowmesh_filter_file_commit_records", Histogram, Filter, ["file"],
        "Records per group commit of a file sink.";
    FILTER_FILE_DUPLICATES = "flowmesh_filter_file_duplicates_total", Counter, Filter, ["file" = ["records"]],
        "Re-sent records already in the file: acked again, not written twice.";
    FILTER_FILE_FULL = "flowmesh_filter_file_full", Gauge, Filter, ["file" = ["records", "dead-letter"]],
        "1 while a file sink's files have reached their size cap and it refuses writes.";
    FILTER_FILE_ROTATIONS = "flowmesh_filter_file_rotations_total", Counter, Filter,
        ["file" = ["records", "dead-letter"], "reason" = ["size", "age", "routes"]],
        "File rotations, by reason (size, age, routes: the routes version changed).";
    FILTER_ROUTED = "flowmesh_filter_records_routed_total", Counter, Filter,
        ["route", "destination" = ["broker", "file"]],
        "Valid records each route took, by route name and destination (counted when routed, before they are stored).";
    FILTER_ROUTE_ERRORS = "flowmesh_filter_route_errors_total", Counter, Filter, ["route"],
        "Evaluations of a route's `when` that failed (counted as not matching).";
    FILTER_ROUTES_RELOADS = "flowmesh_filter_routes_reloads_total", Counter, Filter,
        ["outcome" = ["applied", "unchanged", "invalid"]],
        "Reloads of the routes file (SIGHUP or a change to the file), by outcome.";
    FILTER_ROUTES_VERSION = "flowmesh_filter_routes_version", Gauge, Filter, ["version"],
        "1 for the routes version in force, 0 for the versions it replaced since start.";

    WRITER_RECORDS = "flowmesh_writer_records_total", Counter, Writer,
        ["writer", "outcome" = ["stored", "duplicate", "dead_lettered"]],
        "Records a writer handled, by outcome (stored, duplicate, dead_lettered).";
    WRITER_BATCH_RECORDS = "flowmesh_writer_batch_records", Histogram, Writer, ["writer"],
        "Records per stored batch.";
    WRITER_STORE_SECONDS = "flowmesh_writer_store_duration_seconds", Histogram, Writer, ["writer"],
        "Time to store one batch in the database (successful attempts).";
    WRITER_HELD = "flowmesh_writer_held_messages", Gauge, Writer, ["writer"],
        "Messages the writer holds unacked: the batch being stored.";
    WRITER_CONSUMING = "flowmesh_writer_consuming", Gauge, Writer, ["writer"],
        "1 while the writer has a consumer open on its queue (only while its store can write).";
    WRITER_STORE_FAILURES = "flowmesh_writer_store_failures_total", Counter, Writer, ["writer"],
        "Failed attempts to store a batch (each is retried).";
    WRITER_STORE_CONFLICTS = "flowmesh_writer_store_conflicts_total", Counter, Writer, ["writer"],
        "Store attempts the database aborted to settle a conflict with another writer (deadlock, serialization failure); each is retried at once and none counts as a failure of the database.";
    WRITER_PARTITION_RECORDS = "flowmesh_writer_partition_records_total", Counter, Writer, ["writer", "partition"],
        "Records stored from each partition of the writer's queue (contracts §4 \"Partitions\") by this writer: the active writer of a partition is the one whose count grows.";
    WRITER_END_TO_END_SECONDS = "flowmesh_writer_end_to_end_latency_seconds", Histogram, Writer, ["writer"],
        "From a record's timestamp to its commit in the writer's database.";
}

/// Makes every counter and gauge `service` exports exist at zero, for every combination of its
/// label values, so dashboards and alerts see `0` instead of nothing before the first event.
fn zero_series(service: &'static str) {
    let owner = match service {
        "generator" => Owner::Generator,
        "filter" => Owner::Filter,
        _ => Owner::Writer,
    };
    for def in CATALOGUE.iter().filter(|d| d.owner == owner) {
        let mut series: Vec<Vec<metrics::Label>> = vec![Vec::new()];
        for (label, values) in def.labels.iter().zip(def.values) {
            let values: &[&'static str] = match (*label, values.is_empty()) {
                ("writer", true) => &[service],
                (_, true) => &[],
                (_, false) => values,
            };
            series = series
                .into_iter()
                .flat_map(|labels| {
                    values.iter().map(move |value| {
                        let mut labels = labels.clone();
                        labels.push(metrics::Label::new(*label, *value));
                        labels
                    })
                })
                .collect();
        }
        for labels in series {
            match def.kind {
                Kind::Counter => metrics::counter!(def.name, labels).absolute(0),
                Kind::Gauge => metrics::gauge!(def.name, labels).set(0.0),
                Kind::Histogram => {}
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

/// Installs the process-wide Prometheus recorder (once) and makes `service`'s series exist at
/// zero; returns the handle that renders `/metrics`.
///
/// Services in one test process share the recorder, which is why this is idempotent.
pub fn install(service: &'static str) -> Result<PrometheusHandle, BuildError> {
    let handle = recorder()?;
    zero_series(service);
    Ok(handle)
}

fn recorder() -> Result<PrometheusHandle, BuildError> {
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
    fn label_values_are_declared_for_every_label_or_for_none() {
        for def in CATALOGUE {
            assert_eq!(def.labels.len(), def.values.len(), "{}", def.name);
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
