//! The four services end to end against the real RabbitMQ and PostgreSQL (mongo-writer on its
//! in-memory store, whose groups are checked by the same rules), then `verify`.

use std::time::Duration;

use clap::Parser;
use flowmesh_common::testkit::TestWriter;
use flowmesh_filter::testkit::TestFilter;
use flowmesh_generator::config::Rate;
use flowmesh_generator::{Application as Generator, GeneratorConfig};
use flowmesh_mongo_writer::MongoWriterConfig;
use flowmesh_mongo_writer::config::StoreKind;
use flowmesh_mongo_writer::groups::Groups;
use flowmesh_mongo_writer::store::MemoryStore;
use flowmesh_pg_writer::PgWriterConfig;
use flowmesh_pg_writer::testkit::TestDb;
use flowmesh_verify::{Held, Rules, VerifyConfig, observe, reconcile};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

async fn pg_writer(db: &TestDb, prefix: &str) -> TestWriter {
    let config = PgWriterConfig::for_tests(&db.url, prefix);
    TestWriter::start(
        flowmesh_pg_writer::build(config)
            .await
            .expect("pg-writer builds"),
    )
}

async fn mongo_writer(prefix: &str, memory: &MemoryStore) -> TestWriter {
    let mut config = MongoWriterConfig::for_tests(prefix);
    config.store = StoreKind::Memory;
    let groups = Groups::Memory(memory.clone());
    let writer = flowmesh_mongo_writer::build_with(config, groups)
        .await
        .expect("mongo-writer builds");
    TestWriter::start(writer)
}

async fn generate(filter: &TestFilter, source: &str, count: u64) {
    let mut config = GeneratorConfig::for_tests(&filter.url());
    config.source = Some(source.to_owned());
    config.rate = Rate::Max;
    config.count = Some(count);
    let summary = run_generator(config).await;
    assert_eq!(summary.counts.acked, count);
}

/// Runs a generator on `config` to its end (at most 3 minutes).
async fn run_generator(config: GeneratorConfig) -> flowmesh_generator::Summary {
    Generator::run_to_end(config, Duration::from_secs(180))
        .await
        .expect("the generator ran to its end")
}

async fn pg_rows(db: &TestDb) -> usize {
    let pool = db.pool().await;
    let count: i64 = match sqlx::query("select count(*) from records")
        .fetch_one(&pool)
        .await
    {
        Ok(row) => row.get(0),
        Err(_) => 0,
    };
    pool.close().await;
    count as usize
}

fn mongo_records(memory: &MemoryStore) -> usize {
    memory.groups().iter().map(|g| g.records.len()).sum()
}

fn verify_config(filter: &TestFilter, db: &TestDb, source: &str, expected: u64) -> VerifyConfig {
    let mut config = VerifyConfig::parse_from(["verify", "--source", source]);
    config.expected = Some(expected);
    config.data_dirs = vec![filter.dir.path().to_path_buf()];
    config.postgres.database_url = db.url.as_str().into();
    config.mongodb_url = Some("".into());
    config
}

/// Waits until both writers hold every broker-bound record, then reconciles all stores.
async fn settle_and_verify(
    filter: &TestFilter,
    db: &TestDb,
    memory: &MemoryStore,
    source: &str,
    count: u64,
) -> flowmesh_verify::Report {
    let to_broker = count as usize - filter.file_records().len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while pg_rows(db).await < to_broker || mongo_records(memory) < to_broker {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writers did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let config = verify_config(filter, db, source, count);
    let mut observed = observe(&config).await.expect("stores readable");
    let groups = memory
        .groups()
        .into_iter()
        .map(|g| {
            let n = g.records.len() as i64;
            (g, n)
        })
        .collect();
    observed.set("mongodb", Some(Held::Groups(groups)));
    let versions =
        flowmesh_filter::live_routes::applied_versions(filter.dir.path()).expect("routes.log");
    reconcile(
        source,
        Some(count),
        &observed,
        Rules::with_routes(versions.into_values()),
    )
}

fn prefix_of(filter: &TestFilter) -> String {
    filter
        .topology
        .exchange
        .trim_end_matches(".records")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twenty_thousand_record_run_verifies_and_verify_names_a_deleted_row_and_line() {
    let db = TestDb::create().await;
    let filter = TestFilter::start("verify-e2e", |_| {}).await;
    let prefix = prefix_of(&filter);
    let memory = MemoryStore::new();
    let pg = pg_writer(&db, &prefix).await;
    let mongo = mongo_writer(&prefix, &memory).await;
    generate(&filter, "e2e-20k", 20_000).await;
    let report = settle_and_verify(&filter, &db, &memory, "e2e-20k", 20_000).await;
    assert!(report.is_ok(), "{}", report.render());
    assert_eq!(
        report.file.records
            + report
                .store("postgresql")
                .expect("PostgreSQL checked")
                .records,
        20_000
    );
    assert_eq!(
        report.store("mongodb").map(|m| m.records),
        Some(
            report
                .store("postgresql")
                .expect("PostgreSQL checked")
                .records
        )
    );

    // Delete one row from PostgreSQL: verify fails and names its seq.
    let pool = db.pool().await;
    let seq: i64 =
        sqlx::query("delete from records where seq = (select min(seq) from records) returning seq")
            .fetch_one(&pool)
            .await
            .expect("delete")
            .get(0);
    pool.close().await;
    let config = verify_config(&filter, &db, "e2e-20k", 20_000);
    let report = flowmesh_verify::verify(&config).await.expect("verify runs");
    assert!(!report.is_ok());
    assert!(
        report
            .store("postgresql")
            .expect("PostgreSQL checked")
            .missing
            .contains(&(seq as u64))
            || report.lost.contains(&(seq as u64))
    );
    assert!(
        report.render().contains(&seq.to_string()),
        "{}",
        report.render()
    );

    // Delete one line from the file: verify names that seq too.
    let path = filter.dir.path().join("records.jsonl");
    let text = std::fs::read_to_string(&path).expect("file");
    let mut lines: Vec<&str> = text.lines().collect();
    let removed: serde_json::Value = serde_json::from_str(lines.remove(10)).expect("json");
    std::fs::write(&path, lines.join("\n") + "\n").expect("rewrite");
    let report = flowmesh_verify::verify(&config).await.expect("verify runs");
    let removed_seq = removed["seq"].as_u64().expect("seq");
    assert!(report.lost.contains(&removed_seq), "{}", report.render());

    mongo.stop().await;
    pg.stop().await;
    filter.finish().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_writer_restarted_in_the_middle_of_a_run_still_verifies() {
    restarted_run("e2e-restart", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_writer_restarted_in_the_middle_of_a_packed_run_still_verifies() {
    restarted_run("e2e-restart-packed", 50).await;
}

/// 12 000 records at 4 000/s with the filter packing up to `pack` records a message; pg-writer
/// is stopped and started again once it stored 100 rows; then every store must reconcile.
async fn restarted_run(source: &'static str, pack: usize) {
    let db = TestDb::create().await;
    let filter = TestFilter::start(source, |c| c.publish_pack = pack).await;
    let prefix = prefix_of(&filter);
    let memory = MemoryStore::new();
    let pg = pg_writer(&db, &prefix).await;
    let mongo = mongo_writer(&prefix, &memory).await;
    let running = {
        let url = filter.url();
        tokio::spawn(async move {
            let mut config = GeneratorConfig::for_tests(&url);
            config.source = Some(source.into());
            config.rate = Rate::PerSecond(4000.0);
            config.count = Some(12_000);
            let app = Generator::build(config).await.expect("builds");
            app.run_until_stopped(CancellationToken::new())
                .await
                .expect("runs")
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while pg_rows(&db).await < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pg-writer never stored anything"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pg = pg_writer(&db, &prefix).await;
    let summary = tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("finishes")
        .expect("task");
    assert_eq!(summary.counts.acked, 12_000);
    let (_, metrics) =
        flowmesh_common::http::get(filter.http_addr, "/metrics", Duration::from_secs(5))
            .await
            .expect("filter metrics");
    // Summed over the run: messages published and the records they carried.
    let histogram = |part: &str| -> f64 {
        let name = format!("flowmesh_filter_publish_message_records_{part} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name.as_str()))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name}in {metrics}"))
    };
    let (records, messages) = (histogram("sum"), histogram("count"));
    // (Unpacked, the two are equal; that is not asserted, because tests sharing a process
    // share the recorder.)
    if pack > 1 {
        assert!(
            records > messages,
            "{records} records in {messages} messages: packed"
        );
    }
    let report = settle_and_verify(&filter, &db, &memory, source, 12_000).await;
    assert!(report.is_ok(), "{}", report.render());
    mongo.stop().await;
    pg.stop().await;
    filter.finish().await;
    db.drop().await;
}

const HOT: &str = "[[route]]\nname = \"hot\"\nwhen = \"value > 80 || hash >= 'f0'\"\nto = \"broker\"\n\n[[route]]\nname = \"rest\"\nto = \"file\"\n";
const LOW: &str = "[[route]]\nname = \"low\"\nwhen = \"value < 10\"\nto = \"broker\"\n\n[[route]]\nname = \"rest\"\nto = \"file\"\n";
const BROKEN: &str = "[[route]]\nname = \"low\"\nwhen = \"value < \"\nto = \"broker\"\n";

fn install(path: &std::path::Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).expect("write routes");
    std::fs::rename(&temporary, path).expect("install routes");
}

/// MongoDB for the routes run: the real server (`MONGODB_URL`, as the test command sets it) in a
/// database of its own, else the in-memory twin.
fn real_mongodb() -> Option<(String, String)> {
    match std::env::var("MONGODB_URL") {
        Ok(url) if !url.is_empty() => Some((
            url,
            format!("flowmesh_test_{}", uuid::Uuid::new_v4().simple()),
        )),
        _ => {
            eprintln!(
                "MONGODB_URL is not set: the routes run checks mongo-writer on its in-memory store"
            );
            None
        }
    }
}

async fn mongo_documents_records(url: &str, database: &str) -> usize {
    use futures_util::TryStreamExt;
    let client = flowmesh_mongo_writer::mongo::client(url)
        .await
        .expect("client");
    let mut cursor = client
        .database(database)
        .collection::<mongodb::bson::Document>("records")
        .find(mongodb::bson::doc! {})
        .projection(mongodb::bson::doc! {"count": 1})
        .await
        .expect("find");
    let mut records = 0;
    while let Some(doc) = cursor.try_next().await.expect("next") {
        records += doc.get_i64("count").unwrap_or_default() as usize;
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_across_two_routes_versions_and_a_refused_file_reconciles_exactly() {
    use flowmesh_common::routing::Routes;
    use flowmesh_filter::live_routes::Reload;
    let db = TestDb::create().await;
    let routes_dir = tempfile::tempdir().expect("dir");
    let path = routes_dir.path().join("routes.toml");
    install(&path, HOT);
    let routes_path = path.clone();
    let filter = TestFilter::start("verify-routes", move |c| c.routes = Some(routes_path)).await;
    let prefix = prefix_of(&filter);
    let memory = MemoryStore::new();
    let mongodb = real_mongodb();
    let pg = pg_writer(&db, &prefix).await;
    let mongo = match &mongodb {
        Some((url, database)) => {
            let mut config = MongoWriterConfig::for_tests(&prefix);
            config.mongodb_url = url.as_str().into();
            config.mongodb_database = database.clone();
            TestWriter::start(
                flowmesh_mongo_writer::build(config)
                    .await
                    .expect("mongo-writer builds"),
            )
        }
        None => mongo_writer(&prefix, &memory).await,
    };
    // Three legs of one source, its seqs continued through the generator's spool: 1..=3000
    // under HOT, a reload to LOW, 3001..=6000, a broken file (refused), 6001..=9000.
    let spool = tempfile::tempdir().expect("spool");
    let leg = |until: u64| {
        let url = filter.url();
        let spool = spool.path().to_path_buf();
        async move {
            let mut config = GeneratorConfig::for_tests(&url);
            config.source = Some("e2e-routes".into());
            config.rate = Rate::PerSecond(3000.0);
            config.count = Some(until);
            config.spool_dir = Some(spool);
            let summary = run_generator(config).await;
            assert_eq!(summary.counts.in_flight, 0, "every record of the leg acked");
        }
    };
    let count = 9_000u64;
    let hot = Routes::parse(HOT).expect("parses");
    let low = Routes::parse(LOW).expect("parses");
    leg(3_000).await;
    install(&path, LOW);
    assert_eq!(
        filter.routes.reload("test"),
        Reload::Applied(low.version().to_owned())
    );
    leg(6_000).await;
    install(&path, BROKEN);
    assert!(matches!(filter.routes.reload("test"), Reload::Invalid(_)));
    assert_eq!(filter.routes.current().version(), low.version());
    leg(count).await;

    let mut config = verify_config(&filter, &db, "e2e-routes", count);
    let report = match &mongodb {
        Some((url, database)) => {
            let to_broker = count as usize - filter.file_records().len();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while pg_rows(&db).await < to_broker
                || mongo_documents_records(url, database).await < to_broker
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the writers did not catch up"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            config.mongodb_url = Some(url.as_str().into());
            config.mongodb_database = database.clone();
            flowmesh_verify::verify(&config).await.expect("verify runs")
        }
        None => settle_and_verify(&filter, &db, &memory, "e2e-routes", count).await,
    };
    assert!(report.is_ok(), "{}", report.render());
    assert_eq!(report.store("mongodb").is_some(), mongodb.is_some());
    // Both versions stored records, each where it sent them.
    let observed = observe(&config).await.expect("stores readable");
    let version = |r: &flowmesh_common::record::Record| {
        r.provenance
            .as_ref()
            .map(|p| p.version.clone())
            .expect("provenance")
    };
    for routes in [&hot, &low] {
        assert!(
            pg_records(&observed)
                .iter()
                .any(|r| version(r) == routes.version())
        );
        assert!(observed.file.iter().any(|r| version(r) == routes.version()));
    }
    assert!(
        observed
            .file
            .iter()
            .any(|r| r.value > 80 && version(r) == low.version())
    );
    assert!(
        pg_records(&observed)
            .iter()
            .any(|r| r.value < 10 && version(r) == low.version())
    );
    // Each record under the version in force when it was routed: HOT for the first leg, LOW
    // for the other two (the broken file changed nothing).
    for r in observed.file.iter().chain(pg_records(&observed)) {
        let expected = if r.seq <= 3_000 { &hot } else { &low };
        assert_eq!(version(r), expected.version(), "seq {}", r.seq);
    }
    let in_mongo: Vec<flowmesh_common::record::Record> = match observed.held("mongodb") {
        Some(held) => held.records().into_iter().cloned().collect(),
        None => memory
            .groups()
            .into_iter()
            .flat_map(|g| g.records)
            .collect(),
    };
    assert!(!in_mongo.is_empty());
    assert!(
        in_mongo
            .iter()
            .all(|r| r.provenance.as_ref().is_some_and(|p| p.route.is_some()))
    );

    // A record moved from PostgreSQL into the file: verify names it.
    let moved = pg_records(&observed)
        .iter()
        .find(|r| version(r) == low.version())
        .expect("a record of the second version")
        .clone();
    let pool = db.pool().await;
    sqlx::query("delete from records where id = $1::uuid")
        .bind(&moved.id)
        .execute(&pool)
        .await
        .expect("delete");
    pool.close().await;
    let active = filter.dir.path().join("records.jsonl");
    let mut text = std::fs::read_to_string(&active).expect("file");
    text.push_str(&moved.to_json());
    text.push('\n');
    std::fs::write(&active, text).expect("append");
    config.mongodb_url = Some("".into());
    let report = flowmesh_verify::verify(&config).await.expect("verify runs");
    assert!(
        report.file.wrong_place.contains(&moved.seq),
        "{}",
        report.render()
    );
    assert!(
        report
            .store("postgresql")
            .expect("PostgreSQL checked")
            .missing
            .contains(&moved.seq),
        "{}",
        report.render()
    );

    mongo.stop().await;
    pg.stop().await;
    filter.finish().await;
    db.drop().await;
    if let Some((url, database)) = &mongodb {
        let client = flowmesh_mongo_writer::mongo::client(url)
            .await
            .expect("client");
        client.database(database).drop().await.expect("drop");
    }
}

/// The records verify read from PostgreSQL.
fn pg_records(observed: &flowmesh_verify::Observed) -> &[flowmesh_common::record::Record] {
    match observed.held("postgresql") {
        Some(Held::Records(records)) => records,
        _ => panic!("PostgreSQL was read"),
    }
}
