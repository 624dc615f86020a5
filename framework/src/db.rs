//! Database access: the connection pool type and the framework's embedded migrations.

use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::{AsyncMigrationHarness, AsyncPgConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use secrecy::ExposeSecret;

use crate::config::DatabaseConfig;
use crate::error::{Error, Result};

/// The pool every Ferrybox component takes connections from.
pub type PgPool = Pool<AsyncPgConnection>;

/// A connection borrowed from a [`PgPool`].
pub type PooledConnection = Object<AsyncPgConnection>;

/// The framework's own tables (outbox, inbox, dead letters). Their versions start with
/// `ferrybox-`, so they never collide with a service's own migrations in the same database.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Builds a pool; connections are opened lazily. A task that finds every connection taken
/// waits at most `config.pool_timeout`, then gets [`Error::Pool`] saying so: exhaustion is an
/// error to see, never a hang.
pub fn pool(config: &DatabaseConfig) -> Result<PgPool> {
    use diesel_async::pooled_connection::ManagerConfig;
    config.validate()?;
    let mut manager_config = ManagerConfig::default();
    manager_config.custom_setup = Box::new(|url| Box::pin(establish(url)));
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        config.url.expose_secret(),
        manager_config,
    );
    Pool::builder(manager)
        .max_size(config.max_connections)
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(Some(config.pool_timeout))
        .create_timeout(Some(config.pool_timeout))
        .recycle_timeout(Some(config.pool_timeout))
        .build()
        .map_err(|e| Error::Pool(e.to_string()))
}

/// Opens one connection to `url`, outside any pool, set up as pooled connections are.
///
/// The server is asked for its messages in English (`lc_messages = 'C'`) where the role may
/// set it: [`crate::error::sqlstate`] recovers the SQLSTATEs diesel-async drops from them.
/// Roles that may not keep the server's setting.
pub async fn establish(url: &str) -> diesel::ConnectionResult<AsyncPgConnection> {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    let mut conn = AsyncPgConnection::establish(url).await?;
    // Where the role may not set it, the server's setting stays (and nothing is logged).
    if let Err(e) = diesel::sql_query(
        "DO $$ BEGIN SET lc_messages TO 'C'; \
         EXCEPTION WHEN insufficient_privilege THEN NULL; END $$",
    )
    .execute(&mut conn)
    .await
    {
        tracing::debug!(error = %e, "lc_messages not set; server messages stay as configured");
    }
    Ok(conn)
}

/// Takes a connection from the pool, waiting at most the pool's timeout.
pub async fn connection(pool: &PgPool) -> Result<PooledConnection> {
    use deadpool::managed::PoolError;
    use deadpool::managed::TimeoutType;
    pool.get().await.map_err(|e| match e {
        PoolError::Timeout(TimeoutType::Wait) => Error::Pool(format!(
            "no database connection free within the pool timeout (all {} in use): raise \
             database.max_connections or database.pool_timeout_ms, or lower the load",
            pool.status().max_size
        )),
        other => Error::Pool(other.to_string()),
    })
}

/// Runs `migrations` (the framework's [`MIGRATIONS`] or a service's own) that have not run yet.
///
/// Several sets can share a database: each migration is recorded by its version, so the sets
/// only need distinct version names.
pub async fn run_migrations(pool: &PgPool, migrations: EmbeddedMigrations) -> Result<()> {
    let conn = connection(pool).await?;
    // The harness drives diesel's synchronous migration code; keep it off the async workers.
    tokio::task::spawn_blocking(move || {
        let mut harness = AsyncMigrationHarness::new(conn);
        harness
            .run_pending_migrations(migrations)
            .map(|_| ())
            .map_err(|e| Error::Migration(e.to_string()))
    })
    .await
    .map_err(|e| Error::Migration(e.to_string()))?
}

/// Runs the framework's migrations, then the service's own `migrations`, on `pool`'s
/// database: what a service's `migrate` command and start-up do.
pub async fn migrate_service(pool: &PgPool, migrations: EmbeddedMigrations) -> Result<()> {
    run_migrations(pool, MIGRATIONS).await?;
    run_migrations(pool, migrations).await
}

/// A hand-written statement (a [`diesel::sql_query`] with its binds) that the connection
/// prepares once and reuses, like the statements diesel builds from its DSL.
///
/// diesel never caches `sql_query` statements (their text could be anything), so each run costs
/// a parse, a plan and an extra round trip to prepare. Wrap fixed SQL on hot paths with
/// [`prepared`]: the connection keys its statement cache by the SQL text and bind types.
/// Only for SQL that is the same text every time (binds for the values, never formatted in).
#[derive(Debug, Clone, Copy)]
pub struct Prepared<Q>(Q);

/// Wraps `query` (fixed SQL with binds) so its statement is prepared once per connection.
pub fn prepared<Q>(query: Q) -> Prepared<Q> {
    Prepared(query)
}

impl<Q> diesel::query_builder::QueryId for Prepared<Q> {
    // No static id: the statement cache falls back to keying by SQL text and bind types.
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: diesel::query_builder::QueryFragment<diesel::pg::Pg>>
    diesel::query_builder::QueryFragment<diesel::pg::Pg> for Prepared<Q>
{
    fn walk_ast<'b>(
        &'b self,
        pass: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> diesel::QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &diesel::pg::Pg) -> diesel::QueryResult<bool> {
        Ok(true)
    }
}

impl<Q: diesel::query_builder::Query> diesel::query_builder::Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}
