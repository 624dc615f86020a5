//! A small Confluent Schema Registry API server on PostgreSQL, for the local no-container
//! environment. It exists because no Confluent-compatible registry can be installed here; users
//! run Confluent's own, and nothing in Ferrybox depends on this one: the REST API is the
//! contract.
//!
//! It stores schemas and subject versions in PostgreSQL, answers with
//! `application/vnd.schemaregistry.v1+json` and Confluent's error codes, and enforces each
//! subject's compatibility level (BACKWARD by default) with the same checks `make contracts` uses
//! (`ferrybox::contract`).

pub mod api;
pub mod error;
pub mod store;

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use ferrybox::CancellationToken;
use ferrybox::db::PgPool;
use tokio::net::TcpListener;

/// The registry's tables.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Serves the API on `listener` until `shutdown` is cancelled, then finishes the requests in
/// flight.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, api::router(pool))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
