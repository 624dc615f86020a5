//! `ferrybox-contracts`: checks consumer-driven contracts, offline against `schemas/` (what
//! `make contracts` runs) or against a live Confluent-API schema registry (for CI pipelines).
//!
//! Exit status: 0 when every contract holds, 1 when a check failed, 2 when the inputs could not
//! be read.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferrybox::apache_avro::Schema;
use ferrybox::contract::{self, ConsumerContract, Finding, ProducerCatalog};

#[derive(Parser)]
#[command(
    version,
    about = "Check that every consumer can read what its producers publish"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check schemas/ and the consumers' contracts without any server.
    Check {
        /// The producers' schema folder.
        #[arg(long, default_value = "schemas")]
        schemas: PathBuf,
        /// Folders of consumer contracts; by default every `*/contracts` folder here.
        #[arg(long = "contracts")]
        contracts: Vec<PathBuf>,
    },
    /// Write the AsyncAPI 3.0 document of schemas/ and the consumers' contracts (or, with
    /// `--check`, fail when the file is not what they say now).
    Asyncapi {
        /// The producers' schema folder.
        #[arg(long, default_value = "schemas")]
        schemas: PathBuf,
        /// Folders of consumer contracts; by default every `*/contracts` folder here.
        #[arg(long = "contracts")]
        contracts: Vec<PathBuf>,
        /// The document.
        #[arg(long, default_value = "schemas/asyncapi.json")]
        out: PathBuf,
        /// Compare with `--out` instead of writing it: exit 1 when it is out of date.
        #[arg(long)]
        check: bool,
    },
    /// Check the consumers' contracts against the versions registered in a schema registry
    /// (subjects named `<topic>-<message type>`).
    CheckRegistry {
        /// The registry's base URL.
        #[arg(long, env = "SCHEMA_REGISTRY_URL")]
        url: String,
        /// Folders of consumer contracts; by default every `*/contracts` folder here.
        #[arg(long = "contracts")]
        contracts: Vec<PathBuf>,
    },
}

fn contract_dirs(given: Vec<PathBuf>) -> Vec<PathBuf> {
    if !given.is_empty() {
        return given;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(".")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("contracts")))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn load_contracts(dirs: &[PathBuf]) -> Result<Vec<ConsumerContract>, contract::ContractError> {
    let mut all = Vec::new();
    for dir in dirs {
        all.extend(ConsumerContract::load_dir(dir)?);
    }
    Ok(all)
}

fn report(findings: &[Finding], contracts: &[ConsumerContract], what: &str) -> ExitCode {
    if findings.is_empty() {
        let readers: usize = contracts.iter().map(|c| c.readers.len()).sum();
        println!(
            "contracts hold: {} consumer contract(s), {readers} message(s) read, checked against {what}",
            contracts.len()
        );
        return ExitCode::SUCCESS;
    }
    for finding in findings {
        eprintln!("{finding}");
    }
    eprintln!("{} contract problem(s)", findings.len());
    ExitCode::from(1)
}

async fn registry_versions(
    http: &reqwest::Client,
    url: &str,
    subject: &str,
) -> Result<Vec<(u32, Schema)>, String> {
    let base = url.trim_end_matches('/');
    let response = http
        .get(format!("{base}/subjects/{subject}/versions"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(Vec::new());
    }
    let versions: Vec<u32> = response
        .error_for_status()
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for version in versions {
        let body: serde_json::Value = http
            .get(format!("{base}/subjects/{subject}/versions/{version}"))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let text = body["schema"]
            .as_str()
            .ok_or_else(|| format!("{subject} v{version}: no schema in the answer"))?;
        out.push((
            version,
            Schema::parse_str(text).map_err(|e| format!("{subject} v{version}: {e}"))?,
        ));
    }
    Ok(out)
}

async fn check_registry(url: &str, contracts: &[ConsumerContract]) -> Result<Vec<Finding>, String> {
    let http = reqwest::Client::new();
    let mut findings = Vec::new();
    for c in contracts {
        for (message_type, reader) in &c.readers {
            let subject = format!("{}-{message_type}", c.topic);
            let versions = registry_versions(&http, url, &subject).await?;
            if versions.is_empty() {
                findings.push(Finding::UnknownMessage {
                    consumer: c.consumer.clone(),
                    message: format!("{}/{message_type}", c.topic),
                });
            }
            for (version, writer) in versions {
                for problem in contract::explain(&writer, reader) {
                    findings.push(Finding::BreaksConsumer {
                        producer: format!("registry subject {subject}"),
                        consumer: c.consumer.clone(),
                        message: format!("{}/{message_type}", c.topic),
                        version,
                        problem,
                    });
                }
            }
        }
    }
    Ok(findings)
}

/// `asyncapi`: writes the document to `out`, or checks that it is current.
fn asyncapi(schemas: &Path, contracts: Vec<PathBuf>, out: &Path, check: bool) -> ExitCode {
    let loaded = ProducerCatalog::load(schemas)
        .and_then(|catalog| load_contracts(&contract_dirs(contracts)).map(|c| (catalog, c)));
    let text = match loaded {
        Ok((catalog, contracts)) => contract::asyncapi_text(&catalog, &contracts),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if check {
        return match std::fs::read_to_string(out) {
            Ok(committed) if committed == text => {
                println!("{} is current", out.display());
                ExitCode::SUCCESS
            }
            Ok(_) => {
                eprintln!(
                    "{} is out of date with schemas/ or a consumer contract: run \
                     `cargo run -p ferrybox --features cli --bin ferrybox-contracts -- asyncapi` \
                     and commit it",
                    out.display()
                );
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!(
                    "{}: {e} (write it with `ferrybox-contracts asyncapi`)",
                    out.display()
                );
                ExitCode::from(1)
            }
        };
    }
    match std::fs::write(out, text) {
        Ok(()) => {
            println!("wrote {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", out.display());
            ExitCode::from(2)
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (contracts, outcome) = match cli.command {
        Command::Asyncapi {
            schemas,
            contracts,
            out,
            check,
        } => return asyncapi(&schemas, contracts, &out, check),
        Command::Check { schemas, contracts } => {
            let loaded = ProducerCatalog::load(Path::new(&schemas)).and_then(|catalog| {
                load_contracts(&contract_dirs(contracts)).map(|c| (catalog, c))
            });
            match loaded {
                Ok((catalog, contracts)) => {
                    let findings = contract::check(&catalog, &contracts);
                    (
                        contracts,
                        Ok((
                            findings,
                            format!("{} topic(s) in {}", catalog.topics.len(), schemas.display()),
                        )),
                    )
                }
                Err(e) => (Vec::new(), Err(e.to_string())),
            }
        }
        Command::CheckRegistry { url, contracts } => {
            match load_contracts(&contract_dirs(contracts)) {
                Ok(contracts) => {
                    let outcome = check_registry(&url, &contracts)
                        .await
                        .map(|f| (f, format!("the registry at {url}")));
                    (contracts, outcome)
                }
                Err(e) => (Vec::new(), Err(e.to_string())),
            }
        }
    };
    match outcome {
        Ok((findings, what)) => report(&findings, &contracts, &what),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
