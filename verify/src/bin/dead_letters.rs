//! `dead-letters`: list, replay and purge `flowmesh.dead-letter`, and show the filter's
//! dead-letter file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flowmesh_common::topology::Topology;
use flowmesh_verify::dead_letters::Broker;

/// flowmesh dead-letters: what could never be stored, why, and putting it back after a fix.
#[derive(Debug, Parser)]
#[command(name = "dead-letters", version, about, long_about = None)]
struct Cli {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Prefix of every exchange and queue name.
    #[arg(long, env = "AMQP_PREFIX", default_value = "flowmesh")]
    amqp_prefix: String,
    /// `x-delivery-limit` of the writer queues (must match the services').
    #[arg(long, env = "AMQP_DELIVERY_LIMIT", default_value_t = 5)]
    delivery_limit: u32,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the dead-letter queue (leaving it as it is) and, with --data-dir, the filter's
    /// dead-letter file.
    List {
        /// The filter's data directory.
        #[arg(long, env = "FILTER_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Publishes the chosen messages (by message id; all with none given) to the records
    /// exchange and removes them from the dead-letter queue after RabbitMQ confirmed.
    Replay {
        /// Message ids (record ids) to replay.
        ids: Vec<String>,
    },
    /// Deletes everything in the dead-letter queue.
    Purge,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!(
                "{}",
                err.render()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("invalid arguments")
            );
            return ExitCode::from(2);
        }
    };
    let topology = Topology::new(&cli.amqp_prefix, cli.delivery_limit);
    let result = async {
        let broker = Broker::connect(&cli.amqp_url, topology.clone()).await?;
        match cli.command {
            Command::List { data_dir } => {
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
                        letter.id, letter.reason, letter.origin, body
                    );
                }
                if let Some(dir) = data_dir {
                    let path = dir.join("dead-letter.jsonl");
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    println!("{}: {} line(s)", path.display(), text.lines().count());
                    for line in text.lines() {
                        println!("  {line}");
                    }
                }
            }
            Command::Replay { ids } => {
                let (replayed, invalid) = broker.replay(&ids).await?;
                println!("replayed {replayed} message(s) into {}", topology.exchange);
                for skipped in &invalid {
                    println!("  kept (still not a valid record): {skipped}");
                }
            }
            Command::Purge => println!("purged {} message(s)", broker.purge().await?),
        }
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(3)
        }
    }
}
