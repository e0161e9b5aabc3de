//! Raw ceilings for `scripts/bench.sh`: each hop of the mesh done by a minimal program, with the
//! same libraries, the same topology and the same record bodies, but none of the mesh's logic
//! (no validation, no breakers, no spool, no de-duplication). The bench prints a flowmesh figure
//! beside each of these, measured in the same run, so a ratio says how much of the hop's cost
//! is ours.
//!
//! Each subcommand prints one JSON line `{"hop", "count", "seconds", "rate"}` on stdout;
//! `latency` prints `{"hop", "count", "rate", "p50_ms", "p99_ms", "max_ms"}`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use flowmesh_common::record::Record;
use flowmesh_common::topology::{Topology, record_properties};
use flowmesh_pg_writer::store::Columns;
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio_tungstenite::tungstenite::Message;

/// Raw ceilings of the mesh's hops.
#[derive(Debug, Parser)]
#[command(name = "bench", about, long_about = None)]
struct Args {
    /// Messages, rows or documents to move.
    #[arg(long, default_value_t = 100_000, global = true)]
    count: usize,
    #[command(subcommand)]
    hop: Hop,
}

#[derive(Debug, Subcommand)]
enum Hop {
    /// Not a hop: an OTLP/HTTP trace receiver (decoding every request) for the bench's traces
    /// part and the chaos suite's traced fault; prints its endpoint, then its span count every
    /// second, until stopped.
    Receiver {
        /// Appends every span received to this file, one JSON object a line, every second.
        #[arg(long)]
        spans: Option<std::path::PathBuf>,
        /// Answers every request this many milliseconds late (a slow collector).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// WebSocket loopback: a client sends frames of `batch` records (JSON arrays) as fast as
    /// TCP takes them, a server parses each into records (serde, no validation) and answers one
    /// ack frame listing the seqs; done when every record is acked.
    Ws {
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
    /// Confirmed, persistent, mandatory publishes of record bodies into the records fanout of a
    /// private copy of the topology (so every message lands in two quorum queues), with up to
    /// `window` confirms outstanding. Leaves the messages in the queues for `consume`.
    Publish {
        #[arg(long, env = "AMQP_URL")]
        amqp_url: String,
        /// Topology prefix (a private copy; `consume` and `cleanup` take the same).
        #[arg(long, default_value = "flowmesh-bench-raw")]
        prefix: String,
        #[arg(long, default_value_t = 10_000)]
        window: usize,
    },
    /// Consumes `count` messages from the pg-writer queue of the prefix's topology with a
    /// prefetch, acking each `batch` with one multiple-ack (what a writer does, minus storing).
    Consume {
        #[arg(long, env = "AMQP_URL")]
        amqp_url: String,
        #[arg(long, default_value = "flowmesh-bench-raw")]
        prefix: String,
        /// The writers' default prefetch.
        #[arg(long, default_value_t = 2000)]
        prefetch: u16,
        /// The writers' default batch size.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Deletes the prefix's topology and, when named, a MongoDB database the bench made.
    Cleanup {
        #[arg(long, env = "AMQP_URL")]
        amqp_url: String,
        #[arg(long, default_value = "flowmesh-bench-raw")]
        prefix: String,
        #[arg(long, env = "MONGODB_URL")]
        mongodb_url: Option<String>,
        #[arg(long, requires = "mongodb_url")]
        mongodb_database: Option<String>,
    },
    /// `insert … select from unnest(…) on conflict (id) do nothing` in batches into a table shaped
    /// like `records` (created fresh, dropped after).
    Insert {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// One record at a time at `rate` records/s: a WebSocket client sends each in its own frame,
    /// the server publishes it (confirmed, persistent, mandatory) into the records fanout of the
    /// prefix's topology and acks the frame after the confirm, a consumer on the pg-writer queue
    /// inserts each delivery as one row (`received_at` = `now()`) into a fresh table shaped like
    /// `records` and acks it after the commit. Reports `received_at - timestamp` percentiles in
    /// milliseconds: the floor of the mesh's latency from generator to PostgreSQL.
    Latency {
        #[arg(long, env = "AMQP_URL")]
        amqp_url: String,
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long, default_value = "flowmesh-bench-raw-latency")]
        prefix: String,
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
    },
    /// `insert_many` (`j: true`) of one-record group documents shaped like mongo-writer's, in
    /// batches, into a fresh collection (dropped after).
    Mongo {
        #[arg(long, env = "MONGODB_URL")]
        mongodb_url: String,
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
}

fn records(count: usize) -> Vec<Record> {
    let source = bench_source();
    let now = chrono::Utc::now();
    (0..count)
        .map(|i| record(&source, i as u64 + 1, now, (i % 101) as u8))
        .collect()
}

/// A source name of its own for each bench run.
fn bench_source() -> String {
    format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A valid record with a traceparent and the provenance the filter's routes give a broker-bound
/// record, so a message carries the same headers as one of the mesh's.
fn record(source: &str, seq: u64, at: chrono::DateTime<chrono::Utc>, value: u8) -> Record {
    let mut record = Record::new(
        source,
        seq,
        at,
        value,
        Some(flowmesh_common::record::new_traceparent()),
    );
    record.provenance = Some(flowmesh_common::record::Provenance {
        version: "0123456789ab".into(),
        route: Some("hot".into()),
    });
    record
}

fn report(hop: &str, count: usize, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "hop": hop, "count": count, "seconds": seconds, "rate": count as f64 / seconds,
        })
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let count = args.count;
    match args.hop {
        Hop::Ws { batch } => ws(count, batch).await,
        Hop::Publish {
            amqp_url,
            prefix,
            window,
        } => publish(&amqp_url, &prefix, count, window).await,
        Hop::Consume {
            amqp_url,
            prefix,
            prefetch,
            batch,
        } => consume(&amqp_url, &prefix, count, prefetch, batch).await,
        Hop::Cleanup {
            amqp_url,
            prefix,
            mongodb_url,
            mongodb_database,
        } => {
            let (_connection, channel) = channel(&amqp_url).await?;
            Topology::new(&prefix, 5).delete(&channel).await?;
            if let (Some(url), Some(database)) = (mongodb_url, mongodb_database) {
                let client = mongodb::Client::with_uri_str(&url).await?;
                client.database(&database).drop().await?;
            }
            Ok(())
        }
        Hop::Insert {
            database_url,
            batch,
        } => insert(&database_url, count, batch).await,
        Hop::Mongo { mongodb_url, batch } => mongo(&mongodb_url, count, batch).await,
        Hop::Latency {
            amqp_url,
            database_url,
            prefix,
            rate,
        } => latency(&amqp_url, &database_url, &prefix, count, rate).await,
        Hop::Receiver { spans, delay_ms } => receiver(spans, delay_ms).await,
    }
}

/// Runs an OTLP/HTTP receiver until stopped, answering each request `delay_ms` late: prints its
/// endpoint, then every second the spans it took so far, as `{"spans", "requests"}` lines,
/// appending the new ones to `file`.
async fn receiver(file: Option<std::path::PathBuf>, delay_ms: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let receiver = flowmesh_common::testkit::otlp::Receiver::start().await;
    receiver.set_delay(Duration::from_millis(delay_ms));
    let mut out = match &file {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        )),
        None => None,
    };
    println!("{}", receiver.endpoint());
    let mut received = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Only the new spans: copying every span kept so far each second cost this receiver
        // more CPU than decoding them, taken from the mesh it measures.
        let spans = receiver.take_spans();
        if let Some(out) = out.as_mut() {
            for span in &spans {
                serde_json::to_writer(&mut *out, span)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        received += spans.len();
        println!(
            "{}",
            serde_json::json!({"spans": received, "requests": receiver.requests()})
        );
    }
}

/// A WebSocket server on a loopback port for one client: each text frame is read as records
/// and answered by one ack frame listing the seqs `handle` returns for them.
async fn serve_records<F, Fut>(
    mut handle: F,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)>
where
    F: FnMut(Vec<Record>) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<Vec<u64>>> + Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let mut socket = tokio_tungstenite::accept_async(stream).await?;
        while let Some(message) = socket.next().await {
            let Message::Text(text) = message? else {
                continue;
            };
            let seqs = handle(serde_json::from_str(text.as_str())?).await?;
            let ack = serde_json::json!({"type": "ack", "seqs": seqs}).to_string();
            socket.send(Message::text(ack)).await?;
        }
        anyhow::Ok(())
    });
    Ok((addr, server))
}

async fn ws(count: usize, batch: usize) -> anyhow::Result<()> {
    let (addr, server) =
        serve_records(|parsed| async move { Ok(parsed.iter().map(|r| r.seq).collect()) }).await?;
    let frames: Vec<String> = records(count)
        .chunks(batch)
        .map(|chunk| serde_json::to_string(chunk).expect("records serialise"))
        .collect();
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await?;
    let started = Instant::now();
    let (mut sink, mut stream) = socket.split();
    let reader = tokio::spawn(async move {
        let mut acked = 0usize;
        while acked < count {
            let Some(message) = stream.next().await else {
                bail!("the server closed after {acked} acks");
            };
            if let Message::Text(text) = message? {
                let ack: serde_json::Value = serde_json::from_str(text.as_str())?;
                acked += ack["seqs"].as_array().map_or(0, Vec::len);
            }
        }
        Ok(stream)
    });
    for frame in frames {
        sink.feed(Message::text(frame)).await?;
    }
    sink.flush().await?;
    let stream = reader.await??;
    let elapsed = started.elapsed();
    socket = sink.reunite(stream).expect("halves of one socket");
    socket.close(None).await.ok();
    server.abort();
    report("ws", count, elapsed);
    Ok(())
}

async fn channel(amqp_url: &str) -> anyhow::Result<(Connection, lapin::Channel)> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// A confirmed channel and the mesh's topology under `prefix`, declared on it.
async fn confirmed_channel(
    amqp_url: &str,
    prefix: &str,
) -> anyhow::Result<(Connection, lapin::Channel, Topology)> {
    let (connection, channel) = channel(amqp_url).await?;
    let topology = Topology::new(prefix, 5);
    topology.declare(&connection).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel, topology))
}

async fn publish(amqp_url: &str, prefix: &str, count: usize, window: usize) -> anyhow::Result<()> {
    let (_connection, channel, topology) = confirmed_channel(amqp_url, prefix).await?;
    let records = records(count);
    let bodies: Vec<Vec<u8>> = records.iter().map(|r| r.to_json().into_bytes()).collect();
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    for (record, body) in records.iter().zip(&bodies) {
        if pending.len() >= window {
            let confirm = pending.pop_front().expect("non-empty");
            let confirmation: lapin::Confirmation = confirm.await?;
            if !matches!(confirmation, lapin::Confirmation::Ack(None)) {
                bail!("a publish was nacked");
            }
        }
        let confirm = channel
            .basic_publish(
                topology.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                record_properties(record),
            )
            .await?;
        pending.push_back(confirm);
    }
    for confirm in pending {
        if !matches!(confirm.await?, lapin::Confirmation::Ack(None)) {
            bail!("a publish was nacked");
        }
    }
    report("publish", count, started.elapsed());
    Ok(())
}

/// A consumer on the pg-writer queue of `topology` with `prefetch`.
async fn pg_writer_consumer(
    channel: &lapin::Channel,
    topology: &Topology,
    prefetch: u16,
    tag: &str,
) -> anyhow::Result<lapin::Consumer> {
    let queue = topology
        .queue_for("pg-writer")
        .context("the topology has a pg-writer queue")?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel
        .basic_consume(
            queue.name.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

async fn consume(
    amqp_url: &str,
    prefix: &str,
    count: usize,
    prefetch: u16,
    batch: usize,
) -> anyhow::Result<()> {
    let (_connection, channel) = channel(amqp_url).await?;
    let topology = Topology::new(prefix, 5);
    let mut consumer = pg_writer_consumer(&channel, &topology, prefetch, "bench").await?;
    let mut taken = 0usize;
    let mut started = None;
    while taken < count {
        let Some(delivery) = consumer.next().await else {
            bail!("the consumer ended after {taken} messages");
        };
        let delivery = delivery?;
        started.get_or_insert_with(Instant::now);
        taken += 1;
        if taken.is_multiple_of(batch) || taken == count {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await?;
        }
    }
    report(
        "consume",
        count,
        started.map(|s| s.elapsed()).unwrap_or_default(),
    );
    Ok(())
}

/// One connection to PostgreSQL: the writers' inserts run one at a time.
async fn pg_pool(database_url: &str) -> anyhow::Result<sqlx::PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await
        .context("connecting to PostgreSQL")
}

async fn insert(database_url: &str, count: usize, batch: usize) -> anyhow::Result<()> {
    let pool = pg_pool(database_url).await?;
    sqlx::raw_sql(
        "drop table if exists bench_records;
         create table bench_records (
             id uuid primary key, source text not null, seq bigint not null,
             ts timestamptz not null, value smallint not null check (value between 0 and 100),
             hash char(2) not null, received_at timestamptz not null default now(),
             route text, routes_version text);
         create index on bench_records (source, seq);",
    )
    .execute(&pool)
    .await?;
    let records = records(count);
    let started = Instant::now();
    for chunk in records.chunks(batch) {
        let query = sqlx::query(
            "insert into bench_records (id, source, seq, ts, value, hash, route, routes_version)
             select * from unnest($1::uuid[], $2::text[], $3::int8[], $4::timestamptz[], $5::int2[], $6::text[], $7::text[], $8::text[])
             on conflict (id) do nothing",
        );
        Columns::of(chunk)?.bind(query).execute(&pool).await?;
    }
    let elapsed = started.elapsed();
    sqlx::raw_sql("drop table bench_records")
        .execute(&pool)
        .await?;
    report("insert", count, elapsed);
    Ok(())
}

async fn mongo(mongodb_url: &str, count: usize, batch: usize) -> anyhow::Result<()> {
    use mongodb::bson::{Document, doc};
    use mongodb::options::WriteConcern;
    let client = mongodb::Client::with_uri_str(mongodb_url)
        .await
        .context("connecting to MongoDB")?;
    let collection = client
        .database(&format!(
            "flowmesh_bench_raw_{}",
            uuid::Uuid::new_v4().simple()
        ))
        .collection::<Document>("records");
    // The writer's write concern: acknowledged once in the journal.
    let concern = WriteConcern::builder().journal(true).build();
    let records = records(count);
    let now = mongodb::bson::DateTime::now();
    let documents: Vec<Document> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut record = mongodb::bson::to_document(r).expect("a record is a document");
            if let Some(provenance) = &r.provenance {
                record.insert("route", provenance.route.clone());
                record.insert("routes_version", provenance.version.clone());
            }
            doc! {
                "_id": &r.id, "source": &r.source, "nested": false, "records": [record],
                "count": 1, "first_seq": r.seq as i64, "last_seq": r.seq as i64,
                "wseq": i as i64 + 1, "created_at": now, "updated_at": now,
            }
        })
        .collect();
    let started = Instant::now();
    for chunk in documents.chunks(batch) {
        collection
            .insert_many(chunk)
            .write_concern(concern.clone())
            .await?;
    }
    let elapsed = started.elapsed();
    client
        .database(collection.namespace().db.as_str())
        .drop()
        .await
        .ok();
    report("mongo", count, elapsed);
    Ok(())
}

/// One record a frame at `rate` through the whole broker-bound path (WebSocket, publish with
/// confirm, consume, PostgreSQL commit, ack), each record's latency taken from its timestamp
/// to its row's commit time.
async fn latency(
    amqp_url: &str,
    database_url: &str,
    prefix: &str,
    count: usize,
    rate: f64,
) -> anyhow::Result<()> {
    let pool = pg_pool(database_url).await?;
    sqlx::raw_sql(
        "drop table if exists bench_latency;
         create table bench_latency (
             id uuid primary key, source text not null, seq bigint not null,
             ts timestamptz not null, value smallint not null, hash char(2) not null,
             received_at timestamptz not null default now());",
    )
    .execute(&pool)
    .await?;
    let (_connection, publisher, topology) = confirmed_channel(amqp_url, prefix).await?;
    let (_consume_connection, consume_channel) = channel(amqp_url).await?;
    let consumer = pg_writer_consumer(&consume_channel, &topology, 2000, "bench-latency").await?;
    let inserter = tokio::spawn(insert_each(consumer, pool.clone(), count));
    let (addr, mut server) =
        serve_records(publish_each(publisher, topology.exchange.clone())).await?;
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await?;
    let (mut sink, mut stream) = socket.split();
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let started = tokio::time::Instant::now();
    send_at_rate(&mut sink, count, started, interval).await?;
    // Every record stored, unless a part fails first or the run takes half a minute more than
    // its schedule.
    let deadline = started + interval * count as u32 + Duration::from_secs(30);
    tokio::select! {
        stored = inserter => stored??,
        served = &mut server => {
            served??;
            bail!("the WebSocket client went away before every record was stored");
        }
        _ = tokio::time::sleep_until(deadline) => {
            bail!("not every record was stored within the run's schedule and 30 s more");
        }
    }
    let (p50, p99, max): (f64, f64, f64) = sqlx::query_as(
        "select percentile_cont(0.5) within group (order by ms), percentile_cont(0.99) within group (order by ms), max(ms)
         from (select extract(epoch from received_at - ts)::float8 * 1000 as ms from bench_latency) t",
    )
    .fetch_one(&pool)
    .await?;
    sink.close().await.ok();
    reader.abort();
    server.abort();
    sqlx::raw_sql("drop table bench_latency")
        .execute(&pool)
        .await?;
    topology.delete(&consume_channel).await?;
    println!(
        "{}",
        serde_json::json!({
            "hop": "latency", "count": count, "rate": rate,
            "p50_ms": p50, "p99_ms": p99, "max_ms": max,
        })
    );
    Ok(())
}

/// The latency run's consumer: one row per delivery, acked after its commit.
async fn insert_each(
    mut consumer: lapin::Consumer,
    pool: sqlx::PgPool,
    count: usize,
) -> anyhow::Result<()> {
    for _ in 0..count {
        let Some(delivery) = consumer.next().await else {
            bail!("the consumer ended early");
        };
        let delivery = delivery?;
        let record: Record = serde_json::from_slice(&delivery.data)?;
        let ts = flowmesh_common::record::parse_timestamp(&record.timestamp)
            .context("a timestamp parses")?;
        sqlx::query(
            "insert into bench_latency (id, source, seq, ts, value, hash)
             values ($1, $2, $3, $4, $5, $6) on conflict (id) do nothing",
        )
        .bind(uuid::Uuid::parse_str(&record.id)?)
        .bind(&record.source)
        .bind(record.seq as i64)
        .bind(ts)
        .bind(i16::from(record.value))
        .bind(&record.hash)
        .execute(&pool)
        .await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// The latency run's server side: each frame's records published, the frame acked after the
/// confirms.
fn publish_each(
    publisher: lapin::Channel,
    exchange: String,
) -> impl FnMut(Vec<Record>) -> BoxFuture<'static, anyhow::Result<Vec<u64>>> + Send + 'static {
    move |parsed| {
        let (publisher, exchange) = (publisher.clone(), exchange.clone());
        Box::pin(async move {
            let mut seqs = Vec::with_capacity(parsed.len());
            for record in &parsed {
                let options = BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                };
                let confirmation = publisher
                    .basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        options,
                        record.to_json().as_bytes(),
                        record_properties(record),
                    )
                    .await?
                    .await?;
                if !matches!(confirmation, lapin::Confirmation::Ack(None)) {
                    bail!("a publish was nacked");
                }
                seqs.push(record.seq);
            }
            Ok(seqs)
        })
    }
}

/// The latency run's client: one record a frame, each sent on its schedule and timestamped as
/// it is made.
async fn send_at_rate<S>(
    sink: &mut S,
    count: usize,
    started: tokio::time::Instant,
    interval: Duration,
) -> anyhow::Result<()>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let source = bench_source();
    for i in 0..count {
        tokio::time::sleep_until(started + interval * i as u32).await;
        let record = record(
            &source,
            i as u64 + 1,
            chrono::Utc::now(),
            91 + (i % 10) as u8,
        );
        sink.send(Message::text(format!("[{}]", record.to_json())))
            .await?;
    }
    Ok(())
}
