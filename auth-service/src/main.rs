use std::path::PathBuf;
use std::process::ExitCode;

use auth_service::config::Transport;
use auth_service::{Application, Settings, ops};
use clap::{Args, Parser, Subcommand};
use ferrybox::inbox::DeadLetterFilter;

/// mimalloc instead of the system allocator: the relay and the consumers allocate per message
/// (librdkafka's copies, decoded rows), and glibc's malloc was a quarter of the relay's
/// instructions per message (`make bench`; 26k to 21k per message with this). Replaces
/// `malloc` for librdkafka's C code too (the `override` feature).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// auth-service: caches users from their events and logs them in.
#[derive(Parser)]
#[command(
    version,
    after_help = "Exit status: 0 done; 1 failed, or `reconcile` left differences unresolved, or \
                  `dlq redrive` saw a message fail again; 2 usage error.\n\
                  Endpoints (serve): /login, /session, /users/{id}, /inbox/stats, \
                  /reconcile/last, /metrics, /health/live, /health/ready."
)]
struct Cli {
    /// A TOML settings file; `AUTH_SERVICE_*` variables override it.
    #[arg(long, global = true, env = "AUTH_SERVICE_CONFIG")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// How user events arrive (overrides the `transport` setting).
    #[arg(long, global = true, value_enum)]
    transport: Option<Transport>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and run the inbox consumer (the default).
    Serve,
    /// Create or update the database tables, then exit.
    Migrate,
    /// Check the configuration (file and `AUTH_SERVICE_*` variables) and exit: status 0 when
    /// it is valid, 1 with the reason otherwise. Connects to nothing.
    CheckConfig {
        /// Print the effective settings (defaults, then the file, then the environment) as
        /// JSON instead of `configuration ok`; secrets are printed as "[redacted]".
        #[arg(long)]
        print: bool,
    },
    /// Inspect and redrive dead letters. Exit status 1 when a redriven message fails again.
    Dlq {
        #[command(subcommand)]
        action: Dlq,
    },
    /// Compare the user cache with user-service's snapshot once and repair it; print the
    /// report. Exit status 1 when some difference could not be repaired (an alert is raised).
    Reconcile {
        /// Read an exported snapshot (`user-service snapshot --out`) instead of fetching it.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// The pulled event feed's stored position.
    Feed {
        #[command(subcommand)]
        action: Feed,
    },
    /// Gaps in user-service's numbers (messages the broker lost): each halts its partition
    /// until it is repaired from user-service (`repair_url`) or skipped here.
    Gaps {
        #[command(subcommand)]
        action: Gaps,
    },
    /// The id inbox's generations, oldest first: how many ids each holds and which consumers
    /// keep it (one that stopped for good keeps its generations until its ids are removed).
    Generations,
}

#[derive(Subcommand)]
enum Gaps {
    /// List the open gaps (with `--all`, the repaired and skipped ones too).
    List {
        /// Every gap, not only the open ones.
        #[arg(long)]
        all: bool,
    },
    /// Accept the loss of an open gap's messages: its partition goes on after it. Reconcile
    /// afterwards. Exit status 1 when no open gap has that id.
    Skip {
        /// The gap's id.
        id: i64,
        /// Why, for the record.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum Feed {
    /// Show the stored position (and, with `--set`, change it first: after a reconciliation,
    /// to skip a message the consumer halted on, or to start from a snapshot's watermark).
    Position {
        /// The new position (0 or more).
        #[arg(long, value_parser = clap::value_parser!(i64).range(0..))]
        set: Option<i64>,
    },
}

#[derive(Subcommand)]
enum Dlq {
    /// List open dead letters and the messages parked behind them.
    List(Select),
    /// Show one dead letter in full.
    Show {
        /// The dead letter's id.
        id: i64,
    },
    /// Run dead letters (and their parked followers) through the current handler, in order.
    Redrive(Select),
}

#[derive(Args)]
#[group(multiple = false)]
struct Select {
    /// Every open dead letter (the default).
    #[arg(long)]
    all: bool,
    /// One dead letter by id.
    #[arg(long)]
    id: Option<i64>,
    /// The dead letters of one key.
    #[arg(long)]
    key: Option<String>,
    /// The dead letters of one error kind (decode, handler, retries_exhausted, ...).
    #[arg(long)]
    kind: Option<String>,
}

impl Select {
    fn filter(self) -> DeadLetterFilter {
        match (self.id, self.key, self.kind) {
            (Some(id), _, _) => DeadLetterFilter::Id(id),
            (_, Some(key), _) => DeadLetterFilter::Key(key),
            (_, _, Some(kind)) => DeadLetterFilter::Kind(kind),
            _ => DeadLetterFilter::All,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(transport) = cli.transport {
        settings.transport = transport;
        settings.validate()?;
    }
    let _telemetry = ferrybox::telemetry::init("auth-service", settings.log_json);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => auth_service::startup::migrate(&settings).await?,
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
        Command::Reconcile { file } => {
            if ops::reconcile(&settings, file.as_deref(), cli.json)
                .await?
                .unresolved
                > 0
            {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Feed {
            action: Feed::Position { set },
        } => ops::feed_position(&settings, set, cli.json).await?,
        Command::Gaps {
            action: Gaps::List { all },
        } => ops::gaps(&settings, all, cli.json).await?,
        Command::Generations => ops::generations(&settings, cli.json).await?,
        Command::Gaps {
            action: Gaps::Skip { id, reason },
        } => {
            if !ops::skip_gap(&settings, id, &reason).await? {
                eprintln!("no open gap {id}");
                return Ok(ExitCode::from(1));
            }
        }
        Command::Dlq {
            action: Dlq::List(select),
        } => ops::list(&settings, &select.filter(), cli.json).await?,
        Command::Dlq {
            action: Dlq::Show { id },
        } => ops::show(&settings, id, cli.json).await?,
        Command::Dlq {
            action: Dlq::Redrive(select),
        } => {
            if ops::redrive(&settings, &select.filter(), cli.json)
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
