//! `verify`: exit 0 when every record of the source reconciles, 1 when not (the table names the
//! records), 2 on bad configuration, 3 when a store cannot be read.

use std::process::ExitCode;

use flowmesh_verify::{VerifyConfig, verify};

#[tokio::main]
async fn main() -> ExitCode {
    let config: VerifyConfig = match flowmesh_common::config::parse() {
        Ok(config) => config,
        Err(code) => return code,
    };
    match verify(&config).await {
        Ok(report) => {
            if config.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.render());
            }
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(3)
        }
    }
}
