//! What holds vacuum back. PostgreSQL cannot remove a dead row version while anything might
//! still see it: an open transaction (however idle), a prepared transaction nobody finished,
//! a replication slot nobody streams (its `xmin`, or for a logical slot its `catalog_xmin`,
//! and the WAL it keeps). Ferrybox's tables churn (every message is a row written and later
//! deleted), so one forgotten session makes them, and every other table, grow without bound.
//!
//! [`holds`] says what holds vacuum back now (`outbox status` shows it); a [`VacuumGuard`]
//! checks every `interval`, records it in the metrics and raises an [alert](crate::alert)
//! when something has held it back for longer than its limit.

use std::collections::HashMap;
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Double, Integer, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::duration_ms;
use crate::db::PgPool;
use crate::error::Result;

/// What holds vacuum back in the database, now.
#[derive(Debug, Clone, PartialEq, Serialize, QueryableByName)]
pub struct VacuumHolds {
    /// How long the oldest open transaction in this database (other than the caller's and
    /// replication senders') has been open, in seconds.
    #[diesel(sql_type = Nullable<Double>)]
    pub oldest_transaction_seconds: Option<f64>,
    /// Its backend's process id.
    #[diesel(sql_type = Nullable<Integer>)]
    pub oldest_transaction_pid: Option<i32>,
    /// Its `application_name` and state (`idle in transaction`, `active`, ...).
    #[diesel(sql_type = Nullable<Text>)]
    pub oldest_transaction_client: Option<String>,
    /// Transactions prepared (`PREPARE TRANSACTION`) and not yet committed or rolled back,
    /// in any database of the server.
    #[diesel(sql_type = BigInt)]
    pub prepared_transactions: i64,
    /// How long the oldest of them has waited, in seconds.
    #[diesel(sql_type = Nullable<Double>)]
    pub oldest_prepared_seconds: Option<f64>,
    /// Its global transaction id (for `COMMIT PREPARED` or `ROLLBACK PREPARED`).
    #[diesel(sql_type = Nullable<Text>)]
    pub oldest_prepared_gid: Option<String>,
    /// Replication slots of the server that nobody streams now.
    #[diesel(sql_type = Array<Text>)]
    pub inactive_slots: Vec<String>,
    /// The WAL the most retaining of them keeps, in bytes.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub inactive_slot_retained_bytes: Option<i64>,
    /// The replication slot of the server, streamed or not, that keeps the most WAL: the one
    /// whose consumer is furthest behind.
    #[diesel(sql_type = Nullable<Text>)]
    pub most_retaining_slot: Option<String>,
    /// The WAL it keeps, in bytes.
    #[diesel(sql_type = Nullable<BigInt>)]
    pub most_retained_bytes: Option<i64>,
    /// How long ago the oldest id generation of the inbox that is still kept was closed, in
    /// seconds (see [`crate::inbox::expire`]): its consumers have not all passed its ids.
    #[diesel(sql_type = Nullable<Double>)]
    pub oldest_kept_generation_seconds: Option<f64>,
    /// The consumers that keep it.
    #[diesel(sql_type = Array<Text>)]
    pub oldest_kept_generation_consumers: Vec<String>,
}

/// What holds vacuum back now, as the caller's connection sees it.
pub async fn holds(conn: &mut AsyncPgConnection) -> Result<VacuumHolds> {
    Ok(diesel::sql_query(
        "WITH oldest AS ( \
             SELECT pid, extract(epoch FROM now() - xact_start)::float8 AS seconds, \
                    coalesce(nullif(application_name, ''), usename::text, '?') || ' (' || \
                    coalesce(state, '?') || ')' AS client \
             FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND backend_type = 'client backend' AND xact_start IS NOT NULL \
               AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) \
             ORDER BY xact_start LIMIT 1), \
         prepared AS ( \
             SELECT gid, extract(epoch FROM now() - prepared)::float8 AS seconds \
             FROM pg_prepared_xacts ORDER BY prepared), \
         every_slot AS ( \
             SELECT slot_name, active, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained \
             FROM pg_replication_slots), \
         slots AS (SELECT slot_name, retained FROM every_slot WHERE NOT active), \
         most AS ( \
             SELECT slot_name, retained FROM every_slot WHERE retained IS NOT NULL \
             ORDER BY retained DESC LIMIT 1), \
         kept AS ( \
             SELECT g.generation, extract(epoch FROM now() - g.closed_at)::float8 AS seconds \
             FROM ferrybox_inbox_generations AS g \
             WHERE g.closed_at IS NOT NULL AND g.summarized \
               AND EXISTS (SELECT 1 FROM ferrybox_inbox_bounds AS b \
                           WHERE b.generation = g.generation AND NOT b.expired) \
             ORDER BY g.generation LIMIT 1) \
         SELECT (SELECT seconds FROM oldest) AS oldest_transaction_seconds, \
                (SELECT pid FROM oldest) AS oldest_transaction_pid, \
                (SELECT client FROM oldest) AS oldest_transaction_client, \
                (SELECT count(*) FROM prepared) AS prepared_transactions, \
                (SELECT max(seconds) FROM prepared) AS oldest_prepared_seconds, \
                (SELECT gid FROM prepared LIMIT 1) AS oldest_prepared_gid, \
                (SELECT coalesce(array_agg(slot_name::text ORDER BY slot_name), '{}') \
                    FROM slots) AS inactive_slots, \
                (SELECT max(retained) FROM slots) AS inactive_slot_retained_bytes, \
                (SELECT slot_name::text FROM most) AS most_retaining_slot, \
                (SELECT retained FROM most) AS most_retained_bytes, \
                (SELECT seconds FROM kept) AS oldest_kept_generation_seconds, \
                (SELECT coalesce(array_agg(DISTINCT b.consumer ORDER BY b.consumer), '{}') \
                    FROM ferrybox_inbox_bounds AS b JOIN kept USING (generation) \
                    WHERE NOT b.expired) AS oldest_kept_generation_consumers",
    )
    .get_result(conn)
    .await?)
}

/// When a [`VacuumGuard`] raises an alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VacuumGuardConfig {
    /// How often it looks.
    #[serde(with = "duration_ms", rename = "interval_ms")]
    pub interval: Duration,
    /// A transaction open longer than this.
    #[serde(with = "duration_ms", rename = "max_transaction_age_ms")]
    pub max_transaction_age: Duration,
    /// A prepared transaction waiting longer than this.
    #[serde(with = "duration_ms", rename = "max_prepared_age_ms")]
    pub max_prepared_age: Duration,
    /// A replication slot nobody has streamed for this long (a relay that failed over takes
    /// its slot back within seconds).
    #[serde(with = "duration_ms", rename = "max_slot_idle_ms")]
    pub max_slot_idle: Duration,
    /// A replication slot, streamed or not, keeping more WAL than this many bytes: its
    /// consumer (a log relay, say) is that far behind. Set it well below the server's
    /// `max_slot_wal_keep_size`, past which the slot is invalidated.
    pub max_slot_retained_bytes: u64,
    /// An id generation of the inbox still kept this long after it closed: a consumer with ids
    /// in it has not passed them (one that stopped for good keeps it forever). Keep it above
    /// the inbox's and the topics' retention, which a generation outlives by design.
    #[serde(with = "duration_ms", rename = "max_generation_kept_ms")]
    pub max_generation_kept: Duration,
}

impl Default for VacuumGuardConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            max_transaction_age: Duration::from_secs(15 * 60),
            max_prepared_age: Duration::from_secs(5 * 60),
            max_slot_idle: Duration::from_secs(10 * 60),
            max_slot_retained_bytes: 1 << 30,
            max_generation_kept: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl VacuumGuardConfig {
    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if self.interval.is_zero() {
            return Err(crate::Error::Config(
                "vacuum_guard.interval_ms must be above 0".into(),
            ));
        }
        Ok(())
    }
}

/// Something that has held vacuum back past its limit.
#[derive(Debug, Clone, PartialEq)]
pub struct VacuumFinding {
    /// `long_transaction`, `prepared_transaction`, `idle_slot`, `slot_lag` or
    /// `kept_generation`.
    pub kind: &'static str,
    /// What to look at, and what to do.
    pub summary: String,
}

/// What of the holds is past its limit, remembering how long each slot has been idle.
#[derive(Debug)]
struct Limits {
    config: VacuumGuardConfig,
    /// When each inactive slot was first seen inactive (PostgreSQL 15 does not say).
    idle_since: HashMap<String, tokio::time::Instant>,
}

impl Limits {
    fn new(config: VacuumGuardConfig) -> Self {
        Self {
            config,
            idle_since: HashMap::new(),
        }
    }

    /// What in `holds`, seen at `now`, is past its limit.
    fn findings(&mut self, holds: &VacuumHolds, now: tokio::time::Instant) -> Vec<VacuumFinding> {
        let mut found = Vec::new();
        let limit = self.config.max_transaction_age.as_secs_f64();
        if let Some(seconds) = holds.oldest_transaction_seconds.filter(|s| *s > limit) {
            let pid = holds.oldest_transaction_pid.unwrap_or_default();
            found.push(VacuumFinding {
                kind: "long_transaction",
                summary: format!(
                    "a transaction has been open for {seconds:.0} s (pid {pid}, {}): no row \
                     version dead since it began can be vacuumed; end it, or \
                     SELECT pg_terminate_backend({pid})",
                    holds.oldest_transaction_client.as_deref().unwrap_or("?"),
                ),
            });
        }
        let limit = self.config.max_prepared_age.as_secs_f64();
        if let Some(seconds) = holds.oldest_prepared_seconds.filter(|s| *s > limit) {
            found.push(VacuumFinding {
                kind: "prepared_transaction",
                summary: format!(
                    "{} prepared transaction(s), the oldest ('{}') {seconds:.0} s old, hold \
                     vacuum back and keep their locks: COMMIT PREPARED or ROLLBACK PREPARED it",
                    holds.prepared_transactions,
                    holds.oldest_prepared_gid.as_deref().unwrap_or("?"),
                ),
            });
        }
        let inactive = &holds.inactive_slots;
        self.idle_since.retain(|slot, _| inactive.contains(slot));
        for slot in inactive {
            let since = *self.idle_since.entry(slot.clone()).or_insert(now);
            if now.duration_since(since) > self.config.max_slot_idle {
                found.push(VacuumFinding {
                    kind: "idle_slot",
                    summary: format!(
                        "replication slot {slot} has not been streamed for over {:?}; the \
                         inactive slots keep up to {} bytes of WAL and their horizons: start \
                         its consumer, or SELECT pg_drop_replication_slot('{slot}') (a Ferrybox \
                         relay makes its own slot again and recovers from the table)",
                        self.config.max_slot_idle,
                        holds.inactive_slot_retained_bytes.unwrap_or_default(),
                    ),
                });
            }
        }
        let limit = i64::try_from(self.config.max_slot_retained_bytes).unwrap_or(i64::MAX);
        if let (Some(slot), Some(bytes)) = (&holds.most_retaining_slot, holds.most_retained_bytes)
            && bytes > limit
        {
            found.push(VacuumFinding {
                kind: "slot_lag",
                summary: format!(
                    "replication slot {slot} keeps {bytes} bytes of WAL (the limit is \
                     {limit}): its consumer is that far behind, stuck or slower than the \
                     writes (for a Ferrybox log relay: its log and `outbox status`); past the \
                     server's max_slot_wal_keep_size the slot is invalidated, and a Ferrybox \
                     relay then recovers from the table, sending its last messages again"
                ),
            });
        }
        let limit = self.config.max_generation_kept.as_secs_f64();
        if let Some(seconds) = holds.oldest_kept_generation_seconds.filter(|s| *s > limit) {
            found.push(VacuumFinding {
                kind: "kept_generation",
                summary: format!(
                    "an id generation of the inbox closed {:.1} days ago is still kept, by {}: \
                     their groups have not committed past its ids (a consumer that stopped for \
                     good keeps it forever: `generations` shows it; delete its ids from \
                     ferrybox_inbox to let the generation go)",
                    seconds / 86_400.0,
                    holds.oldest_kept_generation_consumers.join(", "),
                ),
            });
        }
        found
    }
}

/// Watches what holds vacuum back in one database (see the module documentation).
pub struct VacuumGuard {
    limits: Limits,
    pool: PgPool,
    alerter: crate::alert::Alerter,
    /// The alerts' source: the service.
    component: String,
}

impl std::fmt::Debug for VacuumGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VacuumGuard")
            .field("config", &self.limits.config)
            .field("component", &self.component)
            .finish_non_exhaustive()
    }
}

impl VacuumGuard {
    /// A guard of `pool`'s database with these limits, alerting through `alerter` as
    /// `component` (the service's name).
    pub fn new(
        config: VacuumGuardConfig,
        pool: PgPool,
        alerter: crate::alert::Alerter,
        component: impl Into<String>,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            limits: Limits::new(config),
            pool,
            alerter,
            component: component.into(),
        })
    }

    /// Looks once: records the holds in the metrics (when on), raises an alert for each
    /// finding past its limit, and returns them.
    pub async fn check(&mut self) -> Result<Vec<VacuumFinding>> {
        let mut conn = crate::db::connection(&self.pool).await?;
        let holds = holds(&mut conn).await?;
        drop(conn);
        if let Some(m) = crate::metrics::instruments() {
            m.vacuum_oldest_transaction
                .record(holds.oldest_transaction_seconds.unwrap_or(0.0), &[]);
            m.vacuum_prepared
                .record(u64::try_from(holds.prepared_transactions).unwrap_or(0), &[]);
            m.vacuum_inactive_slots
                .record(u64::try_from(holds.inactive_slots.len()).unwrap_or(0), &[]);
        }
        let findings = self.limits.findings(&holds, tokio::time::Instant::now());
        for finding in &findings {
            tracing::warn!(kind = finding.kind, "{}", finding.summary);
            self.alerter
                .raise(&crate::alert::Alert::new(
                    self.component.clone(),
                    finding.kind,
                    finding.summary.clone(),
                    serde_json::to_value(&holds).unwrap_or_default(),
                ))
                .await;
        }
        Ok(findings)
    }

    /// Looks every `interval` until `shutdown`; a failed look is logged and tried again.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        loop {
            if let Err(e) = self.check().await {
                tracing::warn!(error = %e, "vacuum guard could not look; trying again");
            }
            if crate::outbox::sleep_or_shutdown(self.limits.config.interval, &shutdown).await {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nothing() -> VacuumHolds {
        VacuumHolds {
            oldest_transaction_seconds: None,
            oldest_transaction_pid: None,
            oldest_transaction_client: None,
            prepared_transactions: 0,
            oldest_prepared_seconds: None,
            oldest_prepared_gid: None,
            inactive_slots: Vec::new(),
            inactive_slot_retained_bytes: None,
            most_retaining_slot: None,
            most_retained_bytes: None,
            oldest_kept_generation_seconds: None,
            oldest_kept_generation_consumers: Vec::new(),
        }
    }

    #[test]
    fn a_generation_kept_past_its_limit_is_alerted_with_the_consumers_that_keep_it() {
        let mut guard = Limits::new(VacuumGuardConfig::default());
        let now = tokio::time::Instant::now();
        let kept = |days: f64| VacuumHolds {
            oldest_kept_generation_seconds: Some(days * 86_400.0),
            oldest_kept_generation_consumers: vec!["gone-consumer".into()],
            ..nothing()
        };
        assert!(
            guard.findings(&kept(29.0), now).is_empty(),
            "within 30 days"
        );
        let found = guard.findings(&kept(31.0), now);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, "kept_generation");
        assert!(
            found[0].summary.contains("by gone-consumer"),
            "{}",
            found[0].summary
        );
    }

    #[test]
    fn a_slot_is_alerted_once_it_keeps_more_wal_than_its_limit() {
        let mut guard = Limits::new(VacuumGuardConfig::default());
        let now = tokio::time::Instant::now();
        let behind = |bytes| VacuumHolds {
            most_retaining_slot: Some("ferrybox_users".into()),
            most_retained_bytes: Some(bytes),
            ..nothing()
        };
        assert!(
            guard.findings(&behind(1 << 30), now).is_empty(),
            "at the limit"
        );
        let found = guard.findings(&behind((1 << 30) + 1), now);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, "slot_lag");
        assert!(
            found[0].summary.contains("ferrybox_users"),
            "{}",
            found[0].summary
        );
    }

    #[test]
    fn each_hold_is_found_only_past_its_limit() {
        let mut guard = Limits::new(VacuumGuardConfig::default());
        let now = tokio::time::Instant::now();
        assert!(guard.findings(&nothing(), now).is_empty());
        let young = VacuumHolds {
            oldest_transaction_seconds: Some(60.0),
            oldest_prepared_seconds: Some(10.0),
            prepared_transactions: 1,
            inactive_slots: vec!["a".into(), "b".into()],
            ..nothing()
        };
        assert!(guard.findings(&young, now).is_empty(), "all within limits");
        let old = VacuumHolds {
            oldest_transaction_seconds: Some(3_600.0),
            oldest_prepared_seconds: Some(3_600.0),
            ..young
        };
        let kinds: Vec<_> = guard
            .findings(&old, now + Duration::from_secs(11 * 60))
            .iter()
            .map(|f| f.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "long_transaction",
                "prepared_transaction",
                "idle_slot",
                "idle_slot"
            ]
        );
    }

    #[test]
    fn a_slot_streamed_again_starts_its_idle_time_over() {
        let mut guard = Limits::new(VacuumGuardConfig::default());
        let now = tokio::time::Instant::now();
        let idle = VacuumHolds {
            inactive_slots: vec!["a".into()],
            ..nothing()
        };
        assert!(guard.findings(&idle, now).is_empty());
        assert!(
            guard
                .findings(&nothing(), now + Duration::from_secs(60))
                .is_empty()
        );
        assert!(
            guard
                .findings(&idle, now + Duration::from_secs(11 * 60))
                .is_empty(),
            "inactive again only since now"
        );
        assert_eq!(
            guard
                .findings(&idle, now + Duration::from_secs(22 * 60))
                .len(),
            1
        );
    }
}
