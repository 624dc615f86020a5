use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use ferrybox::{ReplayOptions, ReplaySelection};
use user_service::{Application, Settings, ops};

/// mimalloc instead of the system allocator: the relay and the consumers allocate per message
/// (librdkafka's copies, decoded rows), and glibc's malloc was a quarter of the relay's
/// instructions per message (`make bench`; 26k to 21k per message with this). Replaces
/// `malloc` for librdkafka's C code too (the `override` feature).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// user-service: owns user accounts and publishes their changes through the outbox.
#[derive(Parser)]
#[command(
    version,
    after_help = "Exit status: 0 done; 1 failed, or `outbox replay` left messages unacknowledged; \
                  2 usage error; 3 `outbox status` found rows the broker refused.\n\
                  Endpoints (serve): /users, /snapshot and /events (internal, bearer token), \
                  /metrics, /health/live, /health/ready."
)]
struct Cli {
    /// A TOML settings file; `USER_SERVICE_*` variables override it.
    #[arg(long, global = true, env = "USER_SERVICE_CONFIG")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and run the relay (the default).
    Serve,
    /// Run only the relay. Several may run at once: one publishes, the others stand by.
    Relay,
    /// Create or update the database tables, then exit.
    Migrate,
    /// Check the configuration (file and `USER_SERVICE_*` variables) and exit: status 0 when
    /// it is valid, 1 with the reason otherwise. Connects to nothing.
    CheckConfig {
        /// Print the effective settings (defaults, then the file, then the environment) as
        /// JSON instead of `configuration ok`; secrets are printed as "[redacted]".
        #[arg(long)]
        print: bool,
    },
    /// Inspect the outbox and replay its sent log.
    Outbox {
        #[command(subcommand)]
        action: Outbox,
    },
    /// Export the full snapshot of users (what `GET /snapshot` serves) to a file, for a
    /// consumer's `reconcile --file`.
    Snapshot {
        /// The file to write (NDJSON).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum Outbox {
    /// Unpublished backlog, its age, rows with errors, and the sent log's extent. Exit status
    /// 3 when some unpublished row has an error (2 is a usage error).
    Status,
    /// Publish a range of the sent log again (after broker data loss), with the original
    /// message ids and headers. Exit status 1 when some message was not acknowledged.
    Replay(Replay),
    /// Split the log relay into this many shards (1 to 64), online: the running relays let
    /// go, the layout and each new slot's recovery bound are recorded, the old slots are
    /// dropped, and the relays take the new shards (see the README's "Relay shards").
    Reshard {
        /// How many shards.
        #[arg(value_parser = clap::value_parser!(u32).range(1..=64))]
        shards: u32,
        /// How long to wait for the running relays to let go.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

#[derive(Args)]
struct Replay {
    /// Only this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Only this message key.
    #[arg(long)]
    key: Option<String>,
    /// Published at or after this time (RFC 3339, e.g. 2026-11-28T10:00:00Z).
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// Published before this time (RFC 3339).
    #[arg(long)]
    until: Option<DateTime<Utc>>,
    /// From this outbox position (inclusive).
    #[arg(long)]
    from_position: Option<i64>,
    /// Up to this outbox position (inclusive).
    #[arg(long)]
    to_position: Option<i64>,
    /// Messages per second at most.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Only count what would be replayed.
    #[arg(long)]
    dry_run: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref())?;
    let _telemetry = ferrybox::telemetry::init("user-service", settings.log_json);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => user_service::startup::migrate(&settings).await?,
        Command::CheckConfig { print: false } => println!("configuration ok"),
        Command::CheckConfig { print: true } => {
            println!("{}", serde_json::to_string_pretty(&settings)?);
        }
        Command::Serve => {
            let shutdown = ferrybox::shutdown::on_signals();
            let app = Application::build(settings).await?;
            // Scripts and tests read this line to find the port.
            println!("listening on http://{}", app.local_addr()?);
            app.run(shutdown).await?;
        }
        Command::Relay => ops::relay(&settings, ferrybox::shutdown::on_signals()).await?,
        Command::Snapshot { out } => ops::export_snapshot(&settings, &out, cli.json).await?,
        Command::Outbox {
            action: Outbox::Status,
        } => {
            if ops::status(&settings, cli.json)
                .await?
                .unpublished_with_errors
                > 0
            {
                return Ok(ExitCode::from(3));
            }
        }
        Command::Outbox {
            action:
                Outbox::Reshard {
                    shards,
                    timeout_secs,
                },
        } => {
            ops::reshard(
                &settings,
                shards,
                std::time::Duration::from_secs(timeout_secs),
                cli.json,
            )
            .await?;
        }
        Command::Outbox {
            action: Outbox::Replay(args),
        } => {
            let selection = ReplaySelection {
                topic: args.topic,
                key: args.key,
                published_from: args.since,
                published_until: args.until,
                from_position: args.from_position,
                to_position: args.to_position,
            };
            let options = ReplayOptions {
                rate_per_second: args.rate,
                dry_run: args.dry_run,
            };
            if ops::replay(&settings, &selection, options, cli.json)
                .await?
                .failed
                > 0
            {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
