//! Session ends cost healthy records nothing: a pg-writer process draining a 100 000-record
//! backlog has its session ended 20 times, of every kind (SIGTERM, SIGKILL, the broker closing
//! its connection, an AMQP call past its bound), at the queue's default delivery limit, and not
//! one record is dead-lettered, lost or stored twice. See "What counts as a delivery attempt"
//! in docs/contracts.md §4.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flowmesh_common::message;
use flowmesh_common::record::Record;
use flowmesh_common::testkit::{
    amqp_url, delete_topology, drain_dead_letters, proxy_url, publish, queue_depth, record,
    unique_prefix,
};
use flowmesh_common::topology::{DEFAULT_DELIVERY_LIMIT, Topology};
use flowmesh_pg_writer::testkit::{TestDb, rows};
use sqlx::{PgPool, Row};

const BACKLOG: u64 = 100_000;

/// Records stored between two session ends: the 20 ends fall while the backlog drains.
const BETWEEN_ENDS: i64 = 2_500;

/// Records a batch holds at most: a tenth of the default, so that with the database's 50 ms a
/// batch (below) the backlog drains while the ends fall. The prefetch is the default (2 000).
const BATCH_MAX: &str = "100";

#[derive(Debug, Clone, Copy)]
enum End {
    /// SIGTERM: the writer stops gracefully.
    Term,
    /// SIGKILL: the process is gone, its connection with it.
    Kill,
    /// `rabbitmqctl close_connection`: the broker ends the session.
    Close,
    /// The link freezes (no byte either way, the connection open): the writer's next AMQP call
    /// gets no answer within its bound and it ends the session itself.
    Freeze,
}

/// Six of each quick kind and two freezes (each costs some 20 s). The first six return what the
/// writer holds (no stop drains it first): a writer holding more than its prefetch in records
/// (a window counted in messages, of packed messages) loses its tail to the delivery limit.
const ENDS: [End; 20] = {
    use End::*;
    [
        Kill, Close, Kill, Close, Kill, Close, Term, Freeze, Term, Kill, //
        Close, Term, Kill, Close, Term, Freeze, Kill, Close, Term, Term,
    ]
};

/// A pg-writer process on the test's database and topology, logging to a file.
struct Process {
    child: Child,
}

impl Process {
    fn start(database_url: &str, amqp_url: &str, prefix: &str, log: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pg-writer"))
            .env("DATABASE_URL", database_url)
            .env("AMQP_URL", amqp_url)
            .env("AMQP_PREFIX", prefix)
            .env("PG_WRITER_HTTP_ADDR", "127.0.0.1:0")
            .env("PG_WRITER_BATCH_MAX", BATCH_MAX)
            .env("LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("pg-writer starts");
        Self { child }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Waits (at most `within`) for the process to exit.
    async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pg-writer did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks the broker to close the connection the client named `name` (every one of them), as an operator
/// would with `rabbitmqctl close_connection`. False when there was none.
fn close_connection(name: &str) -> bool {
    let listed = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "pid",
            "client_properties",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl runs (the tests need the broker's own tools on this machine)");
    assert!(
        listed.status.success(),
        "rabbitmqctl list_connections failed"
    );
    let mut closed = false;
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        // The client's properties, `connection_name` among them, as Erlang terms.
        let Some((pid, properties)) = line.split_once('\t') else {
            continue;
        };
        if properties.contains(&format!("\"{name}\"")) {
            let status = Command::new("rabbitmqctl")
                .args(["-q", "close_connection", pid.trim(), "session-end test"])
                .status()
                .expect("rabbitmqctl runs");
            closed |= status.success();
        }
    }
    closed
}

/// Rows stored (none before the writer made its table).
/// Waits until more than `at_least` rows are stored, at most `within`.
async fn wait_rows_past(pool: &PgPool, at_least: i64, within: Duration, log: &Path) {
    let deadline = tokio::time::Instant::now() + within;
    while rows(pool).await <= at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress past {at_least} rows within {within:?} (log: {})",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn twenty_session_ends_dead_letter_nothing(name: &str, pack: usize) {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    // A database that takes 50 ms a batch: the backlog drains in about a minute, so the ends
    // fall while it does (a `rabbitmqctl` call alone takes a second or two).
    flowmesh_pg_writer::store::migrate(&pool)
        .await
        .expect("table");
    for statement in [
        "create function slow_batches() returns trigger language plpgsql as \
         $$ begin perform pg_sleep(0.05); return null; end $$",
        "create trigger slow_batches after insert on records \
         for each statement execute function slow_batches()",
    ] {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .expect("trigger");
    }
    let prefix = unique_prefix(name);
    let topology = Topology::new(&prefix, DEFAULT_DELIVERY_LIMIT);
    let log = std::env::temp_dir().join(format!("{prefix}.log"));
    let records: Vec<Record> = (1..=BACKLOG).map(|seq| record(name, seq, 95)).collect();
    let messages = records.chunks(pack).map(message::encode).collect();
    publish(&topology, &topology.exchange, messages).await;
    let queue = topology.queue_for("pg-writer").expect("queue").name.clone();

    let (proxy, proxied) = proxy_url(&amqp_url()).await;
    let start = || Process::start(&db.url, &proxied, &prefix, &log);
    let mut writer = start();
    for (done, end) in ENDS.into_iter().enumerate() {
        let before = rows(&pool).await;
        wait_rows_past(&pool, before + BETWEEN_ENDS, Duration::from_secs(60), &log).await;
        assert!(
            rows(&pool).await < BACKLOG as i64,
            "the backlog drained before end {done} ({end:?}): the ends must fall while it drains"
        );
        match end {
            End::Term => {
                writer.signal("-TERM");
                assert!(writer.exited(Duration::from_secs(30)).await.success());
                writer = start();
            }
            End::Kill => {
                writer.signal("-KILL");
                writer.exited(Duration::from_secs(10)).await;
                writer = start();
            }
            End::Close => {
                let connection = format!("{prefix}-pg-writer");
                assert!(
                    close_connection(&connection),
                    "no connection named {connection}"
                );
            }
            End::Freeze => {
                proxy.freeze();
                // Quiet for 5 s, then a probe unanswered for 10 s: the session ends.
                tokio::time::sleep(Duration::from_secs(18)).await;
                proxy.thaw();
            }
        }
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while rows(&pool).await < BACKLOG as i64 || queue_depth(&queue).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {BACKLOG} stored, {} left in the queue (log: {})",
            rows(&pool).await,
            queue_depth(&queue).await,
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dead = drain_dead_letters(&topology, 0, Duration::from_secs(1)).await;
    assert!(
        dead.is_empty(),
        "{} messages were dead-lettered (log: {})",
        dead.len(),
        log.display()
    );
    let distinct: i64 = sqlx::query("select count(distinct id) from records")
        .fetch_one(&pool)
        .await
        .expect("distinct")
        .get(0);
    assert_eq!(distinct, BACKLOG as i64, "every record stored once");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("probe of an idle link") || text.contains("no answer in 10 s"),
        "a freeze ended a session at an AMQP call's bound (log: {})",
        log.display()
    );

    writer.signal("-TERM");
    assert!(writer.exited(Duration::from_secs(30)).await.success());
    delete_topology(&topology).await;
    pool.close().await;
    db.drop().await;
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_session_ends_of_every_kind_dead_letter_no_record_of_an_unpacked_backlog() {
    twenty_session_ends_dead_letter_nothing("pg-ends", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_session_ends_of_every_kind_dead_letter_no_record_of_a_packed_backlog() {
    twenty_session_ends_dead_letter_nothing("pg-ends-packed", 100).await;
}
