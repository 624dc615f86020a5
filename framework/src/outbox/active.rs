//! The active relay as its source sees it: what every source (`log/`, `poll.rs`) publishes
//! with once [`super::Relay`] made this instance active.

use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use secrecy::ExposeSecret;

use super::publish::Publisher;
use super::settings::RelayConfig;
use crate::config::DatabaseConfig;
use crate::error::{Error, Result};

/// What an active relay publishes with, whichever source it reads: the database (for the
/// connections a source opens besides the one holding the lock), the settings, the
/// publisher, and the count of what it published.
pub(crate) struct Active<'a> {
    pub(super) database: &'a DatabaseConfig,
    pub(super) config: &'a RelayConfig,
    pub(super) publisher: &'a dyn Publisher,
    pub(super) published: &'a tokio::sync::watch::Sender<u64>,
}

impl Active<'_> {
    /// A connection of the relay's own (see [`connect`]).
    pub(super) async fn connect(&self) -> Result<AsyncPgConnection> {
        connect(self.database).await
    }

    /// Counts messages published.
    pub(super) fn count_published(&self, n: u64) {
        if n > 0 {
            self.published.send_modify(|total| *total += n);
        }
    }
}

/// A connection of the relay's own, named so operators can see in `pg_stat_activity` which
/// process holds the relay lock.
pub(super) async fn connect(database: &DatabaseConfig) -> Result<AsyncPgConnection> {
    let mut conn = crate::db::establish(database.url.expose_secret())
        .await
        .map_err(|e| Error::Pool(e.to_string()))?;
    conn.batch_execute(&format!(
        "SET application_name = 'ferrybox relay (pid {})'",
        std::process::id()
    ))
    .await?;
    Ok(conn)
}
