use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use ferrybox::{DatabaseConfig, db};

/// A Confluent Schema Registry API server on PostgreSQL (for local development and tests).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "REGISTRY_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// PostgreSQL URL of the registry's database.
    #[arg(
        long,
        env = "REGISTRY_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/ferrybox_registry"
    )]
    database_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let pool = db::pool(&DatabaseConfig::new(args.database_url))?;
    db::run_migrations(&pool, schema_registry::MIGRATIONS)
        .await
        .context("registry migrations")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let shutdown = ferrybox::shutdown::on_signals();
    tracing::info!("listening on http://{}", listener.local_addr()?);
    schema_registry::serve(listener, pool, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
