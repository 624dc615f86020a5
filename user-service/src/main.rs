use std::path::PathBuf;

use clap::{Parser, Subcommand};
use user_service::{Application, Settings};

/// user-service: owns user accounts and publishes their changes through the outbox.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// A TOML settings file; `USER_SERVICE_*` variables override it.
    #[arg(long, global = true, env = "USER_SERVICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and run the relay (the default).
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
        Command::Migrate => user_service::startup::migrate(&settings).await,
        Command::Serve => {
            let shutdown = ferrybox::shutdown::on_signals();
            let app = Application::build(settings).await?;
            // Scripts and tests read this line to find the port.
            println!("listening on http://{}", app.local_addr()?);
            app.run(shutdown).await
        }
    }
}
