//! The consumer's side: read a snapshot, compare, repair, report, alert.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::{FORMAT, SnapshotEntry, SnapshotHeader, SnapshotLine};
use crate::alert::{Alert, Alerter};
use crate::config::duration_ms;
use crate::db::{self, PgPool};
use crate::error::{Error, Result};
use crate::inbox::HandlerError;
use crate::outbox::sleep_or_shutdown;

/// One cached entity, as the consumer knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedEntry {
    /// Its key.
    pub key: String,
    /// The version of the last change applied.
    pub version: i64,
    /// Whether it is a tombstone.
    pub deleted: bool,
    /// When the consumer last changed it (the consumer's clock).
    pub updated_at: DateTime<Utc>,
}

/// What a repair did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// The snapshot's state was written.
    Written,
    /// Nothing was written: the cached version was already as new (a message got there first).
    Newer,
}

/// What a consumer implements to be reconciled.
pub trait Cache: Send + Sync + 'static {
    /// Every cached entity's key, version and tombstone flag.
    fn entries(
        &self,
        conn: &mut AsyncPgConnection,
    ) -> impl Future<Output = std::result::Result<Vec<CachedEntry>, diesel::result::Error>> + Send;

    /// Writes `entry` (a live state or a tombstone) if, at write time, it is newer than the
    /// cached version; runs in its own transaction. A permanent error marks the entity
    /// unresolved (the snapshot's state does not fit the cache).
    fn repair(
        &self,
        conn: &mut AsyncPgConnection,
        entry: &SnapshotEntry,
    ) -> impl Future<Output = std::result::Result<Repair, HandlerError>> + Send;
}

/// When and against what the reconciler runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// The producer's snapshot endpoint, e.g. `http://user-service:8080/snapshot`.
    pub snapshot_url: Option<String>,
    /// Time between scheduled runs; 0 runs only on demand.
    #[serde(with = "duration_ms", rename = "interval_ms")]
    pub interval: Duration,
    /// A cached entity absent from the snapshot but changed less than this before the
    /// snapshot was taken counts as created after it (covers clock skew between the services
    /// and the delay between a commit and its message being applied).
    #[serde(with = "duration_ms", rename = "newer_margin_ms")]
    pub newer_margin: Duration,
    /// How long fetching the whole snapshot may take.
    #[serde(with = "duration_ms", rename = "timeout_ms")]
    pub timeout: Duration,
    /// Sent as `Authorization: Bearer <token>` (the producer's internal token). Never logged.
    #[serde(serialize_with = "crate::config::secret::serialize_option")]
    pub token: Option<SecretString>,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            snapshot_url: None,
            interval: Duration::from_secs(3600),
            newer_margin: Duration::from_secs(60),
            timeout: Duration::from_secs(600),
            token: None,
        }
    }
}

impl ReconcileConfig {
    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if let Some(url) = &self.snapshot_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(Error::Config(
                "reconcile.snapshot_url must be an http(s) URL".into(),
            ));
        }
        Ok(())
    }
}

/// An entity the reconciler could not bring in line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Unresolved {
    /// Its key.
    pub key: String,
    /// Why.
    pub reason: String,
}

/// What one run found and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    /// The producer that served the snapshot.
    pub source: String,
    /// When the snapshot was taken (the producer's clock).
    pub snapshot_taken_at: DateTime<Utc>,
    /// The snapshot's feed watermark.
    pub watermark: i64,
    /// Entities compared (snapshot and cache together, each once).
    pub checked: u64,
    /// Already equal.
    pub in_sync: u64,
    /// Missing or older in the cache, written from the snapshot.
    pub repaired: u64,
    /// Newer in the cache than in the snapshot, or created after it: left alone.
    pub skipped_newer: u64,
    /// Differences the reconciler could not repair.
    pub unresolved: u64,
    /// The first of them (at most 100), for the alert and the output.
    pub unresolved_entities: Vec<Unresolved>,
    /// How long the run took.
    pub duration_ms: u64,
}

/// How many unresolved entities a report lists by name.
const LISTED: usize = 100;

impl Report {
    fn new(header: &SnapshotHeader) -> Self {
        Self {
            source: header.source.clone(),
            snapshot_taken_at: header.taken_at,
            watermark: header.watermark,
            checked: 0,
            in_sync: 0,
            repaired: 0,
            skipped_newer: 0,
            unresolved: 0,
            unresolved_entities: Vec::new(),
            duration_ms: 0,
        }
    }

    fn unresolved(&mut self, key: &str, reason: impl Into<String>) {
        self.unresolved += 1;
        if self.unresolved_entities.len() < LISTED {
            self.unresolved_entities.push(Unresolved {
                key: key.to_owned(),
                reason: reason.into(),
            });
        }
    }
}

/// Reconciles a consumer's [`Cache`] with a producer's snapshot. See the
/// [module documentation](super) for the rules.
pub struct Reconciler<C> {
    pool: PgPool,
    cache: C,
    config: ReconcileConfig,
    alerter: Alerter,
    client: reqwest::Client,
    /// The consumer's name, in alerts and logs.
    name: String,
    last: Arc<Mutex<Option<Report>>>,
}

impl<C> std::fmt::Debug for Reconciler<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<C: Cache> Reconciler<C> {
    /// A reconciler of `cache` in `pool`'s database, for the consumer called `name`;
    /// unresolved differences go to `alerter`.
    pub fn new(
        pool: PgPool,
        cache: C,
        name: impl Into<String>,
        config: ReconcileConfig,
        alerter: Alerter,
    ) -> Result<Self> {
        config.validate()?;
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| Error::Config(format!("snapshot http client: {e}")))?;
        Ok(Self {
            pool,
            cache,
            alerter,
            config,
            client,
            name: name.into(),
            last: Arc::default(),
        })
    }

    /// The last run's report (shared, so a metrics endpoint can read it while the schedule
    /// runs).
    pub fn last_report(&self) -> Arc<Mutex<Option<Report>>> {
        Arc::clone(&self.last)
    }

    /// One run against the configured snapshot URL.
    pub async fn run_once(&self) -> Result<Report> {
        let Some(url) = &self.config.snapshot_url else {
            return Err(Error::Config(
                "reconcile.snapshot_url is not set: nothing to reconcile with".into(),
            ));
        };
        let response = crate::http::get_with_token(&self.client, url, self.config.token.as_ref())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| Error::Http(format!("snapshot: {}", e.without_url())))?;
        self.run(Lines::Http {
            response,
            buffer: Vec::new(),
        })
        .await
    }

    /// One run against an exported snapshot file.
    pub async fn run_file(&self, path: &Path) -> Result<Report> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::Snapshot(format!("{}: {e}", path.display())))?;
        self.run(Lines::File(BufReader::new(file))).await
    }

    /// Runs every `interval` until `shutdown`, the first time one interval after the start
    /// (services usually start together, and messages catch up on their own first). Failed
    /// runs are logged and tried again at the next turn.
    pub async fn run_on_schedule(self, shutdown: CancellationToken) {
        if self.config.interval.is_zero() || self.config.snapshot_url.is_none() {
            return;
        }
        while !sleep_or_shutdown(self.config.interval, &shutdown).await {
            if let Err(e) = self.run_once().await {
                tracing::warn!(error = %e, "reconciliation run failed; trying again at the next turn");
            }
        }
    }

    async fn run(&self, mut lines: Lines) -> Result<Report> {
        let started = Instant::now();
        let mut conn = db::connection(&self.pool).await?;
        let header = match lines.next_line().await? {
            Some(SnapshotLine::Snapshot(header)) if header.format == FORMAT => header,
            Some(SnapshotLine::Snapshot(header)) => {
                return Err(Error::Snapshot(format!(
                    "unknown snapshot format {:?} (expected {FORMAT})",
                    header.format
                )));
            }
            _ => return Err(Error::Snapshot("no snapshot header".into())),
        };
        // Read after the snapshot was taken, so every entity changed since shows as newer.
        let mut cached: HashMap<String, CachedEntry> = self
            .cache
            .entries(&mut conn)
            .await?
            .into_iter()
            .map(|e| (e.key.clone(), e))
            .collect();
        let mut report = Report::new(&header);
        let mut entities = 0u64;
        loop {
            match lines.next_line().await? {
                Some(SnapshotLine::Entry(entry)) => {
                    entities += 1;
                    report.checked += 1;
                    let local = cached.remove(&entry.key);
                    self.compare(&mut conn, local.as_ref(), &entry, &mut report)
                        .await;
                }
                Some(SnapshotLine::End { entities: sent }) if sent == entities => break,
                Some(SnapshotLine::End { entities: sent }) => {
                    return Err(Error::Snapshot(format!(
                        "the snapshot says it sent {sent} entities, {entities} arrived"
                    )));
                }
                Some(SnapshotLine::Snapshot(_)) => {
                    return Err(Error::Snapshot("a second snapshot header".into()));
                }
                None => {
                    return Err(Error::Snapshot(
                        "the snapshot ended early (no end line): repairs so far stand, nothing is judged missing".into(),
                    ));
                }
            }
        }
        // What the cache has and the snapshot does not.
        let margin = chrono::Duration::from_std(self.config.newer_margin).unwrap_or_default();
        let mut absent: Vec<CachedEntry> = cached.into_values().collect();
        absent.sort_by(|a, b| a.key.cmp(&b.key));
        for entry in absent {
            report.checked += 1;
            if entry.deleted {
                report.in_sync += 1;
            } else if entry.updated_at > header.taken_at - margin {
                report.skipped_newer += 1;
            } else {
                report.unresolved(
                    &entry.key,
                    format!(
                        "cached at version {} but absent from the snapshot, with no deletion recorded",
                        entry.version
                    ),
                );
            }
        }
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.finish(&report).await;
        Ok(report)
    }

    async fn compare(
        &self,
        conn: &mut AsyncPgConnection,
        local: Option<&CachedEntry>,
        entry: &SnapshotEntry,
        report: &mut Report,
    ) {
        match local {
            Some(local) if local.version == entry.version => {
                report.in_sync += 1;
                return;
            }
            Some(local) if local.version > entry.version => {
                report.skipped_newer += 1;
                return;
            }
            _ => {}
        }
        let cache = &self.cache;
        let repaired = conn
            .transaction::<_, HandlerError, _>(async |tx| cache.repair(tx, entry).await)
            .await;
        match repaired {
            Ok(Repair::Written) => {
                tracing::info!(
                    key = entry.key,
                    version = entry.version,
                    deleted = entry.deleted,
                    cached_version = local.map(|l| l.version),
                    "reconciliation repaired an entity"
                );
                report.repaired += 1;
            }
            Ok(Repair::Newer) => report.skipped_newer += 1,
            Err(e) => report.unresolved(&entry.key, format!("repair failed: {e}")),
        }
    }

    async fn finish(&self, report: &Report) {
        tracing::info!(
            consumer = self.name,
            source = report.source,
            checked = report.checked,
            in_sync = report.in_sync,
            repaired = report.repaired,
            skipped_newer = report.skipped_newer,
            unresolved = report.unresolved,
            duration_ms = report.duration_ms,
            "reconciliation finished"
        );
        if let Some(m) = crate::metrics::instruments() {
            for (outcome, n) in [
                ("checked", report.checked),
                ("in_sync", report.in_sync),
                ("repaired", report.repaired),
                ("skipped_newer", report.skipped_newer),
                ("unresolved", report.unresolved),
            ] {
                m.reconcile_entities.record(
                    n,
                    &[
                        opentelemetry::KeyValue::new("ferrybox.outcome", outcome),
                        opentelemetry::KeyValue::new(
                            "ferrybox.reconcile.source",
                            report.source.clone(),
                        ),
                    ],
                );
            }
        }
        if report.unresolved > 0 {
            self.alerter
                .raise(&Alert::new(
                    format!("{} reconciler", self.name),
                    "reconcile_unresolved",
                    format!(
                        "{} entities differ from {}'s snapshot and could not be repaired",
                        report.unresolved, report.source
                    ),
                    serde_json::to_value(report).unwrap_or_default(),
                ))
                .await;
        }
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(report.clone());
    }
}

/// Where snapshot lines come from.
enum Lines {
    Http {
        response: reqwest::Response,
        buffer: Vec<u8>,
    },
    File(BufReader<tokio::fs::File>),
}

impl Lines {
    async fn next_line(&mut self) -> Result<Option<SnapshotLine>> {
        loop {
            let Some(raw) = self.next_raw().await? else {
                return Ok(None);
            };
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| Error::Snapshot(format!("unreadable line: {e}")));
        }
    }

    async fn next_raw(&mut self) -> Result<Option<Vec<u8>>> {
        match self {
            Lines::File(reader) => {
                let mut line = Vec::new();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .await
                    .map_err(|e| Error::Snapshot(e.to_string()))?;
                Ok((n > 0).then_some(line))
            }
            Lines::Http { response, buffer } => loop {
                if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    return Ok(Some(buffer.drain(..=end).collect()));
                }
                match response
                    .chunk()
                    .await
                    .map_err(|e| Error::Http(format!("snapshot: {}", e.without_url())))?
                {
                    Some(chunk) => buffer.extend_from_slice(&chunk),
                    None if buffer.is_empty() => return Ok(None),
                    None => return Ok(Some(std::mem::take(buffer))),
                }
            },
        }
    }
}
