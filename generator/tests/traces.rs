//! One trace per record, across every hop it crossed (docs/contracts.md §4 "Traces"): the
//! generator, the filter, pg-writer and mongo-writer in-process against the real RabbitMQ,
//! PostgreSQL and MongoDB-wire server, each exporting its spans to a real OTLP/HTTP receiver
//! that decodes the official protobuf messages. Then the same across a lost RabbitMQ link: a
//! record whose publish failed shows both attempts.

use std::collections::BTreeMap;
use std::time::Duration;

use flowmesh_common::testkit::otlp::{ReceivedSpan, Receiver};
use flowmesh_common::testkit::{TestWriter, amqp_url, eventually, proxy_url};
use flowmesh_common::traces::Traces;
use flowmesh_filter::testkit::TestFilter;
use flowmesh_generator::config::Rate;
use flowmesh_generator::{Application, GeneratorConfig};
use flowmesh_mongo_writer::config::MongoWriterConfig;
use flowmesh_pg_writer::config::PgWriterConfig;
use flowmesh_pg_writer::testkit::{TestDb, rows};

/// The services share this process: one test at a time installs their tracers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn mongodb_url() -> Option<String> {
    match std::env::var("MONGODB_URL") {
        Ok(url) if url.is_empty() => None,
        Ok(url) => Some(url),
        Err(_) => Some("mongodb://127.0.0.1:27017".into()),
    }
}

/// The four services' tracers, all exporting to `receiver`.
fn trace_all(receiver: &Receiver) -> Vec<Traces> {
    ["generator", "filter", "pg-writer", "mongo-writer"]
        .into_iter()
        .map(|service| receiver.trace(service))
        .collect()
}

/// The mesh behind a filter: both writers on its topology.
struct Writers {
    pg: TestWriter,
    mongo: TestWriter,
    db: TestDb,
}

impl Writers {
    async fn start(filter: &TestFilter, mongodb_url: &str) -> Self {
        let prefix = &filter.topology.prefix;
        let db = TestDb::create().await;
        let pg = PgWriterConfig::for_tests(&db.url, prefix);
        let pg = TestWriter::start(flowmesh_pg_writer::build(pg).await.expect("builds"));
        let mut mongo = MongoWriterConfig::for_tests(prefix);
        mongo.mongodb_url = mongodb_url.into();
        mongo.mongodb_database = format!(
            "traces_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mongo = TestWriter::start(flowmesh_mongo_writer::build(mongo).await.expect("builds"));
        Self { pg, mongo, db }
    }

    /// Waits until PostgreSQL holds `count` rows, then stops both writers (acks done).
    async fn finish(self, count: i64) {
        let pool = self.db.pool().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let stored = rows(&pool).await;
            if stored >= count {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pg-writer stored {stored} rows of {count}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pool.close().await;
        self.pg.finish().await;
        self.mongo.finish().await;
        self.db.drop().await;
    }
}

fn generator(url: &str, count: u64, rate: Rate) -> GeneratorConfig {
    let mut config = GeneratorConfig::for_tests(url);
    config.source = Some("traced".to_owned());
    config.rate = rate;
    config.count = Some(count);
    config.seed = Some(7);
    config
}

/// After a run of `count` acked records: waits until the writers stored the broker-bound ones
/// (every record acked is in the file or in RabbitMQ, once), stops everything and flushes the
/// spans; the queues are deleted. Returns the filter's topology and how many records were
/// broker-bound.
async fn wind_down(
    filter: TestFilter,
    writers: Writers,
    traces: Vec<Traces>,
    count: u64,
) -> (flowmesh_common::topology::Topology, usize) {
    let broker_bound = count as usize - filter.file_records().len();
    writers.finish(broker_bound as i64).await;
    let topology = filter.topology.clone();
    filter.finish().await;
    flowmesh_common::testkit::delete_topology(&topology).await;
    flush(traces);
    (topology, broker_bound)
}

/// Flushes every service's spans and uninstalls their tracers.
fn flush(traces: Vec<Traces>) {
    for traces in traces {
        traces.shutdown(Duration::from_secs(10));
    }
    for service in ["generator", "filter", "pg-writer", "mongo-writer"] {
        flowmesh_common::spans::uninstall(service);
    }
}

/// One record's trace: its spans by name.
struct Trace<'a> {
    spans: Vec<&'a ReceivedSpan>,
}

impl<'a> Trace<'a> {
    fn named(&self, service: &str, name: &str) -> Vec<&'a ReceivedSpan> {
        self.spans
            .iter()
            .copied()
            .filter(|s| s.service == service && s.name == name)
            .collect()
    }

    fn children(&self, parent: &ReceivedSpan, service: &str, name: &str) -> Vec<&'a ReceivedSpan> {
        self.named(service, name)
            .into_iter()
            .filter(|s| s.parent_span_id == parent.span_id)
            .collect()
    }
}

fn by_trace(spans: &[ReceivedSpan]) -> BTreeMap<&str, Trace<'_>> {
    let mut traces: BTreeMap<&str, Trace<'_>> = BTreeMap::new();
    for span in spans {
        traces
            .entry(&span.trace_id)
            .or_insert(Trace { spans: Vec::new() })
            .spans
            .push(span);
    }
    traces
}

/// Checks a broker-bound record's spans after `publish`: each writer processed it as the
/// publish span's child, and a store span of that writer links to that process span.
fn assert_consumed(spans: &[ReceivedSpan], trace: &Trace<'_>, publish: &ReceivedSpan) {
    for writer in ["pg-writer", "mongo-writer"] {
        let process: Vec<_> = trace
            .spans
            .iter()
            .filter(|s| {
                s.service == writer
                    && s.name.starts_with("process ")
                    && s.parent_span_id == publish.span_id
            })
            .collect();
        assert_eq!(
            process.len(),
            1,
            "{writer} processed the record once as the publish's child"
        );
        assert_eq!(process[0].status, "ok");
        let link = (process[0].trace_id.clone(), process[0].span_id.clone());
        let stores: Vec<_> = spans
            .iter()
            .filter(|s| s.service == writer && s.links.contains(&link))
            .collect();
        assert!(
            stores
                .iter()
                .any(|s| s.status == "ok" && s.attributes.contains_key("db.system.name")),
            "a store span of {writer} links to the record: {stores:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_has_one_trace_with_the_spans_of_every_hop_it_crossed() {
    let Some(mongodb_url) = mongodb_url() else {
        eprintln!("SKIPPED: MONGODB_URL is empty");
        return;
    };
    let _serial = SERIAL.lock().await;
    let receiver = Receiver::start().await;
    let traces = trace_all(&receiver);
    let filter = TestFilter::start("traces-every-hop", |_| {}).await;
    let writers = Writers::start(&filter, &mongodb_url).await;
    let count = 400;
    let summary = Application::run_to_end(
        generator(&filter.url(), count, Rate::PerSecond(400.0)),
        Duration::from_secs(120),
    )
    .await
    .expect("the generator ran to its end");
    assert_eq!(summary.counts.acked, count);
    let (topology, broker_bound) = wind_down(filter, writers, traces, count).await;
    let spans = receiver.spans();
    let traces = by_trace(&spans);
    let records: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == "generator" && s.name == "record")
        .collect();
    assert_eq!(records.len() as u64, count, "one generator span per record");
    let (mut to_file, mut to_broker) = (0, 0);
    for record in records {
        let trace = &traces[record.trace_id.as_str()];
        assert!(
            record.parent_span_id.is_empty(),
            "the record's span starts its trace"
        );
        assert_eq!(record.status, "ok", "acked");
        let id = &record.attributes["flowmesh.record.id"];
        // A record sent again (a nack under backpressure) is routed again: one `route` span
        // per attempt, and exactly one attempt stored it.
        let routes = trace.children(record, "filter", "route");
        assert!(!routes.is_empty(), "routed: {id}");
        let mut stored = Vec::new();
        for route in &routes {
            assert_eq!(&route.attributes["flowmesh.record.id"], id);
            assert!(route.attributes.contains_key("flowmesh.routes.version"));
            let sink = match route.attributes["flowmesh.destination"].as_str() {
                "file" => "append".to_owned(),
                "broker" => format!("publish {}", topology.exchange),
                other => panic!("unknown destination {other}"),
            };
            let done = trace.children(route, "filter", &sink);
            assert!(done.len() <= 1, "one {sink} under each route span: {id}");
            stored.extend(
                done.into_iter()
                    .filter(|s| s.status == "ok")
                    .map(|s| (*route, s)),
            );
        }
        assert_eq!(stored.len(), 1, "one attempt stored {id}: {routes:?}");
        let (route, sink) = stored[0];
        assert!(sink.end_ns >= sink.start_ns);
        if route.attributes["flowmesh.destination"] == "broker" {
            to_broker += 1;
            assert_eq!(&sink.attributes["messaging.message.id"], id);
            assert_consumed(&spans, trace, sink);
        } else {
            to_file += 1;
        }
        assert!(
            trace.spans.iter().all(|s| s.trace_id == record.trace_id),
            "nothing of another record in its trace"
        );
    }
    // One record of each route, as a person reading the trace would see it (README).
    for destination in ["broker", "file"] {
        if let Some(route) = spans
            .iter()
            .find(|s| s.name == "route" && s.attributes["flowmesh.destination"] == destination)
        {
            println!(
                "{}",
                flowmesh_common::testkit::otlp::render(&spans, &route.trace_id)
            );
        }
    }
    assert!(
        to_file > 0 && to_broker > 0,
        "both routes were taken: {to_file} file, {to_broker} broker"
    );
    assert_eq!(to_broker, broker_bound);
}

/// Broker-bound records as the filter's spans count them (a record routed twice once).
fn filter_broker_count(receiver: &Receiver) -> usize {
    receiver
        .spans()
        .iter()
        .filter(|s| {
            s.name == "route"
                && s.attributes.get("flowmesh.destination").map(String::as_str) == Some("broker")
        })
        .map(|s| s.attributes["flowmesh.record.id"].clone())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_retried_across_a_lost_broker_link_shows_both_attempts() {
    let Some(mongodb_url) = mongodb_url() else {
        eprintln!("SKIPPED: MONGODB_URL is empty");
        return;
    };
    let _serial = SERIAL.lock().await;
    let receiver = Receiver::start().await;
    let traces = trace_all(&receiver);
    let (proxy, proxied) = proxy_url(&amqp_url()).await;
    let filter = TestFilter::start("traces-retried", |config| {
        config.broker.url = proxied.as_str().into();
    })
    .await;
    let writers = Writers::start(&filter, &mongodb_url).await;
    let count = 300;
    let run = tokio::spawn(Application::run_to_end(
        generator(&filter.url(), count, Rate::PerSecond(100.0)),
        Duration::from_secs(120),
    ));
    eventually("records flow to RabbitMQ", Duration::from_secs(30), || {
        filter_broker_count(&receiver) > 5
    })
    .await;
    // RabbitMQ gone from the filter's side for a second: publishes fail, records are nacked
    // and sent again.
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.heal();
    let summary = run
        .await
        .expect("joined")
        .expect("the generator ran to its end");
    assert_eq!(summary.counts.acked, count);
    let (topology, _) = wind_down(filter, writers, traces, count).await;
    let spans = receiver.spans();
    let traces = by_trace(&spans);
    let name = format!("publish {}", topology.exchange);
    let mut retried = 0;
    for record in spans
        .iter()
        .filter(|s| s.service == "generator" && s.name == "record")
    {
        let trace = &traces[record.trace_id.as_str()];
        let routes = trace.children(record, "filter", "route");
        if routes.len() < 2 || routes[0].attributes["flowmesh.destination"] != "broker" {
            continue;
        }
        retried += 1;
        assert_eq!(record.status, "ok", "acked in the end");
        for route in &routes {
            assert!(
                !trace.children(route, "filter", &name).is_empty(),
                "every attempt says what became of it (a publish span, confirmed or failed): {route:?}"
            );
        }
        let publishes: Vec<&ReceivedSpan> = routes
            .iter()
            .flat_map(|route| trace.children(route, "filter", &name))
            .collect();
        let stored: Vec<_> = publishes.iter().filter(|p| p.status == "ok").collect();
        assert!(
            !stored.is_empty(),
            "one attempt was confirmed: {publishes:?}"
        );
        assert!(
            publishes
                .iter()
                .all(|p| p.status == "ok" || p.status.starts_with("error: ")),
            "a failed attempt says why: {publishes:?}"
        );
        assert_consumed(&spans, trace, stored[stored.len() - 1]);
    }
    assert!(retried > 0, "some broker-bound record was sent twice");
}
