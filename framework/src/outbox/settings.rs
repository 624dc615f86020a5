//! The relay's settings, and the mode it runs in.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Backoff, duration_ms};
use crate::error::{Error, Result};

/// How the relay batches, waits and keeps the sent log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Where the relay learns of committed messages: `log` (PostgreSQL's write-ahead log,
    /// through logical replication), `table` (polling the outbox table), or `auto` (the log
    /// where the database allows it, the table otherwise).
    pub mode: RelayMode,
    /// The log relay's replication slot; `ferrybox_<database>` by default (slot names are
    /// unique per server: two services on one server need two names).
    pub slot_name: Option<String>,
    /// Rows claimed and sent per batch by the polling relay; messages in flight at once for
    /// the log relay. Also bounds the relay's memory.
    pub batch_size: i64,
    /// Wake on the outbox's `NOTIFY` as well as by polling.
    pub listen: bool,
    /// How long to wait before looking again when the outbox is empty (the fallback when
    /// listening, the only wake-up otherwise).
    #[serde(with = "duration_ms", rename = "poll_interval_ms")]
    pub poll_interval: Duration,
    /// How often a standby instance tries to become the active relay: the longest a dead
    /// instance's work waits for another one.
    #[serde(with = "duration_ms", rename = "standby_interval_ms")]
    pub standby_interval: Duration,
    /// Delay between attempts after a failed batch (broker or database trouble).
    pub backoff: Backoff,
    /// How long published rows stay in the sent log (for `replay`).
    #[serde(with = "duration_ms", rename = "retention_ms")]
    pub retention: Duration,
    /// How often the active relay deletes expired rows.
    #[serde(with = "duration_ms", rename = "cleanup_interval_ms")]
    pub cleanup_interval: Duration,
}

/// Where the relay learns of committed messages (see [`RelayConfig::mode`]); `auto` by
/// default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayMode {
    /// The log where the database allows it (`wal_level = logical`, a role that may
    /// replicate, the publication), the table otherwise.
    #[default]
    Auto,
    /// Read the write-ahead log; fail with what to change when the database does not allow it.
    Log,
    /// Poll the outbox table.
    Table,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            mode: RelayMode::Auto,
            slot_name: None,
            batch_size: 5_000,
            listen: true,
            poll_interval: Duration::from_millis(500),
            standby_interval: Duration::from_secs(1),
            backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(10),
            },
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(60),
        }
    }
}

impl RelayConfig {
    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size < 1 {
            return Err(Error::Config("relay.batch_size must be at least 1".into()));
        }
        if self.poll_interval.is_zero()
            || self.standby_interval.is_zero()
            || self.cleanup_interval.is_zero()
        {
            return Err(Error::Config("relay intervals must be above zero".into()));
        }
        if self.retention.is_zero() {
            return Err(Error::Config(
                "relay.retention_ms must be above zero: the sent log is what replay reads".into(),
            ));
        }
        if let Some(name) = &self.slot_name {
            super::log::slot::validate_name(name)?;
        }
        Ok(())
    }
}
