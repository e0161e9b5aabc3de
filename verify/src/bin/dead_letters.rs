//! `dead-letters`: list, replay and purge `flowmesh.dead-letter`, and show the filter's
//! dead-letter file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flowmesh_common::args::BrokerArgs;
use flowmesh_common::config::Validate;
use flowmesh_common::topology::Topology;
use flowmesh_verify::dead_letters::{Action, Broker, Selection, Target, printable};

/// flowmesh dead-letters: what could never be stored, why, and putting it back after a fix.
#[derive(Debug, Parser)]
#[command(name = "dead-letters", version, about, long_about = None)]
struct Cli {
    /// RabbitMQ (the delivery limit must match the services').
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the dead-letter queue (leaving it as it is) and, with --data-dir, the filter's
    /// dead-letter file. Control characters are shown escaped.
    List {
        /// The filter's data directory.
        #[arg(long, env = "FILTER_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Publishes the chosen messages back to the queue each died in (confirmed) and removes
    /// them from the dead-letter queue. Name message ids (record ids), or --all.
    Replay {
        /// Message ids (record ids) to replay.
        ids: Vec<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Publish to the records exchange (every writer) instead of the queue it died in.
        #[arg(long)]
        fanout: bool,
        /// Show what would be replayed, and where, without doing it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Deletes everything in the dead-letter queue (--all is required).
    Purge {
        /// Yes, everything.
        #[arg(long, required = true)]
        all: bool,
        /// Show how many would be deleted, without doing it.
        #[arg(long)]
        dry_run: bool,
    },
}

impl Validate for Cli {
    fn validate(&self) -> Result<(), String> {
        if let Command::Replay {
            ids, all: false, ..
        } = &self.command
            && ids.is_empty()
        {
            return Err("replay: name the message ids to replay, or --all".into());
        }
        self.broker.validate()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = match flowmesh_common::config::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(3)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let topology = cli.broker.topology().with_partitions(None, false);
    let broker = Broker::connect(cli.broker.url.expose(), topology.clone()).await?;
    match cli.command {
        Command::List { data_dir } => list(broker, &topology, data_dir).await?,
        Command::Replay {
            ids,
            all,
            fanout,
            dry_run,
        } => {
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(ids)
            };
            let target = if fanout {
                Target::Fanout
            } else {
                Target::Origin
            };
            replay(broker, &selection, target, dry_run).await?
        }
        Command::Purge { dry_run: true, .. } => {
            println!(
                "dry run: {} message(s) would be purged",
                broker.count().await?
            )
        }
        Command::Purge { .. } => println!("purged {} message(s)", broker.purge().await?),
    }
    Ok(())
}

/// Prints the dead-letter queue and, with a data directory, the filter's dead-letter file.
async fn list(
    broker: Broker,
    topology: &Topology,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let letters = broker.list().await?;
    println!(
        "{}: {} message(s)",
        topology.dead_letter_queue.name,
        letters.len()
    );
    for letter in letters {
        let body: String = letter.body.chars().take(200).collect();
        println!(
            "  id={} reason={} from={} body={}",
            printable(&letter.id),
            printable(&letter.reason),
            printable(&letter.origin),
            printable(&body)
        );
    }
    if let Some(dir) = data_dir {
        let path = dir.join("dead-letter.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        println!("{}: {} line(s)", path.display(), text.lines().count());
        for line in text.lines() {
            println!("  {}", printable(line));
        }
    }
    Ok(())
}

/// Replays the chosen dead letters and prints what became of each.
async fn replay(
    broker: Broker,
    selection: &Selection,
    target: Target,
    dry_run: bool,
) -> anyhow::Result<()> {
    let outcomes = broker.replay(selection, target, dry_run).await?;
    for outcome in &outcomes {
        let id = printable(&outcome.id);
        match &outcome.action {
            Action::Replayed => println!("  replayed {id} into {}", outcome.to),
            Action::WouldReplay => println!("  would replay {id} into {}", outcome.to),
            Action::Kept(why) => println!("  kept {id}: {why}"),
        }
        if outcome.kept_lines > 0 {
            println!(
                "    its valid records only: its {} bad line(s) stay in the dead-letter queue",
                outcome.kept_lines
            );
        }
    }
    let done = |a: &Action| outcomes.iter().filter(|o| &o.action == a).count();
    if dry_run {
        println!(
            "dry run: {} message(s) would be replayed",
            done(&Action::WouldReplay)
        );
    } else {
        println!("replayed {} message(s)", done(&Action::Replayed));
    }
    Ok(())
}
