//! The sent log: published outbox rows kept for a retention window, so that what was sent can
//! be inspected ([`status`]) and sent again after broker data loss ([`replay`]). Retention
//! drops its partitions ([`crate::storage`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Interval, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use rdkafka::producer::FutureProducer;
use serde::Serialize;

use super::publish::{KafkaPublisher, send_all};
use super::record::{Origin, OutboxRecord};
use super::schema::{ferrybox_messages, ferrybox_outbox};
use crate::error::{Error, Result};

/// Number runs deleted per statement by the relay's cleanup.
pub const CLEANUP_BATCH: i64 = 1_000;

/// Deletes up to `batch` of the log relay's number runs (which rows got which numbers, see
/// [`super::sequence`]) older than `retention`, the sent log's: the rows they name are gone
/// by then. The counters stay, one row per source and partition.
pub(crate) async fn delete_expired_runs(
    conn: &mut AsyncPgConnection,
    retention: Duration,
    batch: i64,
) -> Result<u64> {
    let deleted = diesel::sql_query(
        "DELETE FROM ferrybox_sequence_runs WHERE ctid IN ( \
             SELECT ctid FROM ferrybox_sequence_runs WHERE created_at < now() - $1 \
             ORDER BY created_at LIMIT $2)",
    )
    .bind::<Interval, _>(interval(retention))
    .bind::<BigInt, _>(batch)
    .execute(conn)
    .await?;
    Ok(u64::try_from(deleted).unwrap_or(0))
}

use crate::storage::interval;

/// What the outbox holds right now: `outbox status`.
#[derive(Debug, Clone, PartialEq, Serialize, QueryableByName)]
pub struct OutboxStatus {
    /// Committed rows not yet acknowledged by the broker.
    #[diesel(sql_type = BigInt)]
    pub unpublished: i64,
    /// Age of the oldest of them, in seconds.
    #[diesel(sql_type = Nullable<Double>)]
    pub oldest_unpublished_age_seconds: Option<f64>,
    /// Unpublished rows the broker refused at least once.
    #[diesel(sql_type = BigInt)]
    pub unpublished_with_errors: i64,
    /// The most recent of their errors.
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    /// Published rows kept in the sent log.
    #[diesel(sql_type = BigInt)]
    pub sent_log_rows: i64,
    /// When the oldest of them was published.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub sent_log_oldest: Option<DateTime<Utc>>,
    /// Messages in the log relay's append-only table (its sent log: all of them, published or
    /// not, until retention).
    #[diesel(sql_type = BigInt)]
    pub log_messages: i64,
    /// When the oldest of them was written.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub log_oldest: Option<DateTime<Utc>>,
    /// How many shards the relay runs as (see [`crate::outbox::reshard`]).
    #[diesel(sql_type = BigInt)]
    pub relay_shards: i64,
    /// The log relay's replication slots in this database (one per shard), comma-separated,
    /// if there are any: their state and lag (how many WAL bytes they have yet to confirm,
    /// and keep on the server), the worst of them.
    #[diesel(sql_type = Nullable<Text>)]
    pub slot_name: Option<String>,
    /// The slots' `wal_status` (`lost`: invalidated; the relay recovers from the table),
    /// each distinct one, comma-separated.
    #[diesel(sql_type = Nullable<Text>)]
    pub slot_wal_status: Option<String>,
    /// Whether a relay streams every slot now.
    #[diesel(sql_type = Nullable<diesel::sql_types::Bool>)]
    pub slot_active: Option<bool>,
    /// WAL between a slot's confirmed position and the current one, in bytes (the most).
    #[diesel(sql_type = Nullable<BigInt>)]
    pub slot_lag_bytes: Option<i64>,
    /// WAL the slots keep on the server, in bytes (the most).
    #[diesel(sql_type = Nullable<BigInt>)]
    pub slot_retained_bytes: Option<i64>,
}

/// The unpublished backlog alone (cheap: it reads only unpublished rows): (rows, age of the
/// oldest in seconds, rows with errors).
pub(crate) async fn backlog(conn: &mut AsyncPgConnection) -> Result<(i64, f64, i64)> {
    #[derive(QueryableByName)]
    struct Backlog {
        #[diesel(sql_type = BigInt)]
        rows: i64,
        #[diesel(sql_type = Double)]
        age: f64,
        #[diesel(sql_type = BigInt)]
        errors: i64,
    }
    let b: Backlog = diesel::sql_query(
        "SELECT count(*) AS rows, \
                coalesce(extract(epoch FROM now() - min(created_at))::float8, 0) AS age, \
                count(*) FILTER (WHERE last_error IS NOT NULL) AS errors \
         FROM ferrybox_outbox WHERE published_at IS NULL",
    )
    .get_result(conn)
    .await?;
    Ok((b.rows, b.age, b.errors))
}

/// The backlog, its age, rows with errors and what the sent log holds.
pub async fn status(conn: &mut AsyncPgConnection) -> Result<OutboxStatus> {
    Ok(diesel::sql_query(
        "SELECT \
           (SELECT count(*) FROM ferrybox_outbox WHERE published_at IS NULL) AS unpublished, \
           (SELECT extract(epoch FROM now() - min(created_at))::float8 FROM ferrybox_outbox \
              WHERE published_at IS NULL) AS oldest_unpublished_age_seconds, \
           (SELECT count(*) FROM ferrybox_outbox \
              WHERE published_at IS NULL AND last_error IS NOT NULL) AS unpublished_with_errors, \
           (SELECT last_error FROM ferrybox_outbox \
              WHERE published_at IS NULL AND last_error IS NOT NULL \
              ORDER BY id DESC LIMIT 1) AS last_error, \
           (SELECT count(*) FROM ferrybox_outbox WHERE published_at IS NOT NULL) AS sent_log_rows, \
           (SELECT min(published_at) FROM ferrybox_outbox \
              WHERE published_at IS NOT NULL) AS sent_log_oldest, \
           (SELECT count(*) FROM ferrybox_messages) AS log_messages, \
           (SELECT created_at FROM ferrybox_messages ORDER BY id LIMIT 1) AS log_oldest, \
           coalesce((SELECT shards FROM ferrybox_relay_layout), 1)::bigint AS relay_shards, \
           s.slot_name, s.slot_wal_status, s.slot_active, s.slot_lag_bytes, \
           s.slot_retained_bytes \
         FROM ( \
           SELECT string_agg(slot_name::text, ',' ORDER BY slot_name) AS slot_name, \
                  string_agg(DISTINCT wal_status, ',') AS slot_wal_status, \
                  bool_and(active) AS slot_active, \
                  max(pg_current_wal_lsn() - confirmed_flush_lsn)::bigint AS slot_lag_bytes, \
                  max(pg_current_wal_lsn() - restart_lsn)::bigint AS slot_retained_bytes \
           FROM pg_replication_slots \
           WHERE database = current_database() AND plugin = 'pgoutput') AS s",
    )
    .get_result(conn)
    .await?)
}

/// Which published rows to replay. Every given bound applies; none selects the whole sent log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplaySelection {
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this message key.
    pub key: Option<String>,
    /// Published at or after this time (for the log relay's messages: written at or after).
    pub published_from: Option<DateTime<Utc>>,
    /// Published before this time (for the log relay's messages: written before).
    pub published_until: Option<DateTime<Utc>>,
    /// Outbox positions (ids, in either table) from this one, inclusive.
    pub from_position: Option<i64>,
    /// Outbox positions up to this one, inclusive.
    pub to_position: Option<i64>,
}

/// What a replay did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Rows the selection matched.
    pub matched: u64,
    /// Rows sent and acknowledged by the broker (0 in a dry run).
    pub sent: u64,
    /// Rows the broker did not acknowledge.
    pub failed: u64,
    /// The first delivery error, if any.
    pub first_error: Option<String>,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// How a replay runs.
#[derive(Debug, Clone, Copy)]
pub struct ReplayOptions {
    /// Messages per second at most.
    pub rate_per_second: u32,
    /// Only count what would be sent.
    pub dry_run: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            rate_per_second: 1_000,
            dry_run: false,
        }
    }
}

/// `$query` (a boxed query of `$table`) narrowed to `$selection`, with `$time` as the time
/// a row was sent.
macro_rules! filtered {
    ($query:expr, $table:ident, $time:ident, $selection:expr) => {{
        use $table::dsl;
        let selection: &ReplaySelection = $selection;
        let mut query = $query;
        if let Some(topic) = &selection.topic {
            query = query.filter(dsl::topic.eq(topic));
        }
        if let Some(key) = &selection.key {
            query = query.filter(dsl::message_key.eq(key));
        }
        if let Some(from) = selection.published_from {
            query = query.filter(dsl::$time.ge(from));
        }
        if let Some(until) = selection.published_until {
            query = query.filter(dsl::$time.lt(until));
        }
        if let Some(from) = selection.from_position {
            query = query.filter(dsl::id.ge(from));
        }
        if let Some(to) = selection.to_position {
            query = query.filter(dsl::id.le(to));
        }
        query
    }};
}

type Selected<'a> = ferrybox_outbox::BoxedQuery<'a, Pg>;

fn selected(selection: &ReplaySelection) -> Selected<'_> {
    let published = ferrybox_outbox::table
        .filter(ferrybox_outbox::published_at.is_not_null())
        .into_boxed();
    filtered!(published, ferrybox_outbox, published_at, selection)
}

type SelectedMessages<'a> = ferrybox_messages::BoxedQuery<'a, Pg>;

/// The same selection in the log relay's append-only table (every row there was committed;
/// its time is when it was written).
fn selected_messages(selection: &ReplaySelection) -> SelectedMessages<'_> {
    let all = ferrybox_messages::table.into_boxed();
    filtered!(all, ferrybox_messages, created_at, selection)
}

/// Rows read and sent per round trip.
const REPLAY_CHUNK: i64 = 500;

/// Publishes the selected rows of the sent log again, in outbox order, with their original
/// message ids, keys and headers, at most `options.rate_per_second` messages a second, and
/// waits for every acknowledgement. Consumers deduplicate by message id, so replaying what a
/// consumer already applied is harmless.
pub async fn replay(
    conn: &mut AsyncPgConnection,
    producer: &FutureProducer,
    selection: &ReplaySelection,
    options: ReplayOptions,
) -> Result<ReplayReport> {
    if options.rate_per_second == 0 {
        return Err(Error::Config(
            "replay rate must be at least 1 message a second".into(),
        ));
    }
    let matched: i64 = selected(selection).count().get_result(conn).await?;
    let matched_log: i64 = selected_messages(selection)
        .count()
        .get_result(conn)
        .await?;
    let matched = matched + matched_log;
    let mut report = ReplayReport {
        matched: u64::try_from(matched).unwrap_or(0),
        dry_run: options.dry_run,
        ..ReplayReport::default()
    };
    if options.dry_run {
        return Ok(report);
    }
    let started = tokio::time::Instant::now();
    let per_message = Duration::from_secs(1) / options.rate_per_second;
    // Chunks of at most one second's worth, each sent when the rate allows it.
    let chunk = REPLAY_CHUNK.min(i64::from(options.rate_per_second));
    let mut queued = 0u32;
    let publisher = KafkaPublisher::with_producer(producer);
    // The polling table's sent log, then the log relay's (a service writes one of them).
    for log in [false, true] {
        let origin = if log {
            Origin::Messages
        } else {
            Origin::Outbox
        };
        let mut after = i64::MIN;
        loop {
            let rows: Vec<OutboxRecord> = if log {
                use ferrybox_messages::dsl;
                selected_messages(selection)
                    .filter(dsl::id.gt(after))
                    .order(dsl::id.asc())
                    .limit(chunk)
                    .select((
                        dsl::id,
                        dsl::message_id,
                        dsl::topic,
                        dsl::message_key,
                        dsl::message_type,
                        dsl::entity_version,
                        dsl::occurred_at,
                        dsl::headers,
                        dsl::payload,
                    ))
                    .load(conn)
                    .await?
            } else {
                selected(selection)
                    .filter(ferrybox_outbox::id.gt(after))
                    .order(ferrybox_outbox::id.asc())
                    .limit(chunk)
                    .select(OutboxRecord::as_select())
                    .load(conn)
                    .await?
            };
            let Some(last) = rows.last() else {
                break;
            };
            after = last.id;
            tokio::time::sleep_until(started + per_message * queued).await;
            queued = queued.saturating_add(u32::try_from(rows.len()).unwrap_or(u32::MAX));
            // Each row goes with the number it was first published with, where it had one.
            let numbers = super::sequence::numbers_for(conn, origin, &rows).await?;
            let results = send_all(&publisher, &rows, origin, &numbers).await;
            for (row, result) in rows.iter().zip(results) {
                match result {
                    Ok(_) => {
                        report.sent += 1;
                        if let Some(m) = crate::metrics::instruments() {
                            m.replayed.add(1, &crate::metrics::kafka_attrs(row.topic()));
                        }
                    }
                    Err(e) => {
                        report.failed += 1;
                        report.first_error.get_or_insert(e.reason);
                    }
                }
            }
        }
    }
    tracing::info!(
        matched = report.matched,
        sent = report.sent,
        failed = report.failed,
        "replay finished"
    );
    Ok(report)
}
