use std::path::PathBuf;

use auth_service::{Application, Settings};
use clap::{Parser, Subcommand};

/// auth-service: caches users from their events and logs them in.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// A TOML settings file; `AUTH_SERVICE_*` variables override it.
    #[arg(long, global = true, env = "AUTH_SERVICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and run the inbox consumer (the default).
    Serve,
    /// Create or update the database tables, then exit.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref())?;
    ferrybox::telemetry::init_logging(settings.log_json);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => auth_service::startup::migrate(&settings).await,
        Command::Serve => {
            let shutdown = ferrybox::shutdown::on_signals();
            let app = Application::build(settings).await?;
            // Scripts and tests read this line to find the port.
            println!("listening on http://{}", app.local_addr()?);
            app.run(shutdown).await
        }
    }
}
