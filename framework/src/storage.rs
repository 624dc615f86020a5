//! Storage that never bloats: the outbox tables are partitioned by creation time, and the
//! sent log's retention drops whole partitions instead of deleting rows.
//!
//! Deleting expired rows one by one leaves dead tuples for vacuum to reclaim, and a table whose
//! vacuum falls behind (a long transaction, an idle slot) grows without bound; its cleanup costs
//! more as it grows. Dropping a partition frees its space at once, writes no WAL per row and
//! costs the same whatever the table holds.
//!
//! `ferrybox_messages` (the log relay's outbox) and `ferrybox_outbox` (the polling relay's)
//! are `PARTITION BY RANGE (created_at)` (migration `ferrybox-0010`). [`maintain`], run by the
//! relay on every cleanup pass:
//!
//! - keeps [`AHEAD`] ranges of one [`span_for`] each ready past the current time, so an insert
//!   always finds its partition. A range is named by its bounds in seconds since the epoch,
//!   `<table>_p<from>_<to>`;
//! - drops a range once its upper bound is older than the retention: every row in it is too.
//!   In the polling table a range goes only once every row in it was published, and published
//!   longer ago than the retention: an unpublished row is never deleted, however old;
//! - deletes expired rows, in small batches and at most [`DEFAULT_BATCHES_PER_PASS`] of them
//!   per pass, from the DEFAULT partition, which takes the rows no
//!   range covers (written while no relay kept ranges ahead, or with an explicit creation time
//!   from the past: the relay copies a row's time when it moves it between the tables). It is
//!   empty in steady state. Rows are never moved out of it: moving them would stream them to
//!   the log relay as new inserts. A new range starts after its newest row instead.
//!
//! Layout changes go through functions the migration made (`ferrybox_create_range`,
//! `ferrybox_drop_range`), which run as the tables' owner: the relay's role needs no right to
//! change tables. Every change of the partition layout takes a lock on the table for a moment; maintenance
//! waits at most [`LOCK_TIMEOUT`] for it, so business writes never queue behind it for
//! longer, and tries again on the next pass. Several relays may run it at once: one does it.

use std::time::Duration;

use diesel::sql_types::{BigInt, Bool, Interval, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use serde::Serialize;

use crate::error::{Error, Result};

/// How many ranges past the current one are kept ready.
pub const AHEAD: i64 = 3;

/// How long a layout change waits for the table's lock before giving up until the next pass.
pub const LOCK_TIMEOUT: &str = "500ms";

/// Rows deleted per statement from a DEFAULT partition.
pub const DEFAULT_BATCH: i64 = 1_000;

/// Statements of [`DEFAULT_BATCH`] rows a pass deletes from a DEFAULT partition at most: the
/// log relay runs its pass between its stream's steps, so a full DEFAULT partition (a relay
/// down for days) is worked off over several passes, never in one long stall.
pub const DEFAULT_BATCHES_PER_PASS: u32 = 10;

/// A partitioned outbox table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    name: &'static str,
    /// Whether rows carry their publication (`published_at`): a range goes only once all were
    /// published and left the retention.
    tracks_publication: bool,
}

/// The log relay's append-only outbox: every row is its sent log, from its creation.
pub const MESSAGES: Table = Table {
    name: "ferrybox_messages",
    tracks_publication: false,
};

/// The polling relay's outbox: published rows are its sent log, from their publication.
pub const OUTBOX: Table = Table {
    name: "ferrybox_outbox",
    tracks_publication: true,
};

impl Table {
    /// The table's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn default_partition(&self) -> String {
        format!("{}_default", self.name)
    }
}

/// How long one range covers: a seventh of the retention (so the sent log keeps at most a
/// seventh more than it must), at least a second and at most a day, in whole seconds.
pub fn span_for(retention: Duration) -> Duration {
    let seventh = retention.as_secs() / 7;
    Duration::from_secs(seventh.clamp(1, 24 * 3600))
}

/// What one [`maintain`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Maintained {
    /// Ranges made ahead.
    pub created: u64,
    /// Ranges dropped.
    pub dropped: u64,
    /// Rows they held (as the planner's statistics estimate them: counting would read them).
    pub dropped_rows: u64,
    /// Rows deleted from the DEFAULT partition.
    pub deleted_from_default: u64,
    /// Layout changes given up for this pass (the lock was not free within [`LOCK_TIMEOUT`],
    /// another relay was at it).
    pub deferred: u64,
}

impl Maintained {
    /// Adds another table's pass.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self {
            created: self.created + other.created,
            dropped: self.dropped + other.dropped,
            dropped_rows: self.dropped_rows + other.dropped_rows,
            deleted_from_default: self.deleted_from_default + other.deleted_from_default,
            deferred: self.deferred + other.deferred,
        }
    }
}

/// One range partition, from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    name: String,
    from: i64,
    to: i64,
}

fn parse_range(table: &str, name: &str) -> Option<Range> {
    let bounds = name.strip_prefix(table)?.strip_prefix("_p")?;
    let (from, to) = bounds.split_once('_')?;
    Some(Range {
        name: name.to_owned(),
        from: from.parse().ok()?,
        to: to.parse().ok()?,
    })
}

/// The ranges to make so that `[now, now + AHEAD spans)` is covered, after the last range
/// (`last_to`) and after the DEFAULT partition's newest row (`default_after`, both in seconds
/// since the epoch), each ending on a multiple of `span`.
fn ranges_to_make(
    last_to: Option<i64>,
    default_after: Option<i64>,
    now: i64,
    span: i64,
) -> Vec<(i64, i64)> {
    let span = span.max(1);
    let mut from = last_to
        .into_iter()
        .chain(default_after)
        .max()
        .unwrap_or(now - now.rem_euclid(span));
    let until = now + AHEAD * span;
    let mut made = Vec::new();
    // After a long pause, one range up to the current span rather than one per span missed.
    let current = now - now.rem_euclid(span);
    if from < current {
        made.push((from, current));
        from = current;
    }
    while from < until {
        let to = from - from.rem_euclid(span) + span;
        made.push((from, to));
        from = to;
    }
    made
}

#[derive(diesel::QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(diesel::QueryableByName)]
struct Number {
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    n: Option<i64>,
}

/// Whether `e` is a layout change to try again on the next pass rather than a failure: the
/// lock was not free in time (55P03), another relay made the same range (42P07), or a row
/// came into the DEFAULT partition that the new range would have covered (23514).
fn deferrable(e: &Error) -> bool {
    let Error::Database(e) = e else {
        return false;
    };
    // diesel keeps no SQLSTATE for 42P07: its message tells.
    let exists = matches!(e, diesel::result::Error::DatabaseError(_, info)
        if info.message().starts_with("relation") && info.message().ends_with("already exists"));
    exists || crate::error::sqlstate(e).is_some_and(|s| matches!(s, "55P03" | "23514"))
}

/// Runs `ddl` (statements calling the migrations' partition functions, which run as the
/// tables' owner) in a short transaction that waits at most [`LOCK_TIMEOUT`] for locks, if no
/// other session is changing `table`'s layout; false when it was given up for this pass.
pub(crate) async fn change_layout(
    conn: &mut AsyncPgConnection,
    table: &str,
    ddl: String,
) -> Result<bool> {
    let table = table.to_owned();
    let done = conn
        .transaction::<bool, Error, _>(async |tx| {
            diesel::sql_query(format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
                .execute(tx)
                .await?;
            #[derive(diesel::QueryableByName)]
            struct Got {
                #[diesel(sql_type = Bool)]
                got: bool,
            }
            let got: Got = diesel::sql_query(
                "SELECT pg_try_advisory_xact_lock(hashtext('ferrybox_storage:' || $1)) AS got",
            )
            .bind::<Text, _>(&table)
            .get_result(tx)
            .await?;
            if !got.got {
                return Ok(false);
            }
            tx.batch_execute(&ddl).await?;
            Ok(true)
        })
        .await;
    match done {
        Ok(done) => Ok(done),
        Err(e) if deferrable(&e) => {
            tracing::debug!(error = %e, "partition change deferred to the next pass");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// One maintenance pass over `table` with the sent log's `retention`: makes the ranges ahead,
/// drops the expired ones and deletes expired rows from the DEFAULT partition.
pub async fn maintain(
    conn: &mut AsyncPgConnection,
    table: Table,
    retention: Duration,
) -> Result<Maintained> {
    let mut done = Maintained::default();
    let span = i64::try_from(span_for(retention).as_secs()).unwrap_or(24 * 3600);
    let retention_s = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX / 2);
    let mut ranges: Vec<Range> = diesel::sql_query(
        "SELECT c.relname::text AS name FROM pg_inherits AS i \
         JOIN pg_class AS c ON c.oid = i.inhrelid \
         WHERE i.inhparent = $1::regclass",
    )
    .bind::<Text, _>(table.name)
    .load::<Name>(conn)
    .await?
    .into_iter()
    .filter_map(|n| parse_range(table.name, &n.name))
    .collect();
    ranges.sort_by_key(|r| r.from);
    let now: Number = diesel::sql_query("SELECT extract(epoch FROM now())::bigint AS n")
        .get_result(conn)
        .await?;
    let now = now.n.unwrap_or(0);

    // Ahead. The DEFAULT partition is read only when a range is to be made (it is empty in
    // steady state, and its newest row bounds where the next range may start).
    let last_to = ranges.last().map(|r| r.to);
    if last_to.is_none_or(|to| to < now + AHEAD * span) {
        let newest: Number = diesel::sql_query(format!(
            "SELECT floor(extract(epoch FROM max(created_at)))::bigint + 1 AS n FROM {}",
            table.default_partition()
        ))
        .get_result(conn)
        .await?;
        for (from, to) in ranges_to_make(last_to, newest.n, now, span) {
            let ddl = format!(
                "SELECT ferrybox_create_range('{}', {from}, {to})",
                table.name
            );
            if change_layout(conn, table.name, ddl).await? {
                done.created += 1;
            } else {
                done.deferred += 1;
                break;
            }
        }
    }

    // Expired.
    for range in ranges.iter().filter(|r| r.to <= now - retention_s) {
        if table.tracks_publication {
            #[derive(diesel::QueryableByName)]
            struct Held {
                #[diesel(sql_type = Bool)]
                held: bool,
            }
            // Through the table, pruned to the range: rights on the table are enough.
            let held: Held = diesel::sql_query(format!(
                "SELECT EXISTS (SELECT 1 FROM {} \
                   WHERE created_at >= to_timestamp($2) AND created_at < to_timestamp($3) \
                     AND (published_at IS NULL OR published_at >= now() - $1)) AS held",
                table.name
            ))
            .bind::<Interval, _>(interval(retention))
            .bind::<BigInt, _>(range.from)
            .bind::<BigInt, _>(range.to)
            .get_result(conn)
            .await?;
            if held.held {
                continue;
            }
        }
        let rows: Number = diesel::sql_query(
            "SELECT greatest(reltuples, 0)::bigint AS n FROM pg_class WHERE oid = $1::regclass",
        )
        .bind::<Text, _>(&range.name)
        .get_result(conn)
        .await?;
        let ddl = format!(
            "SELECT ferrybox_drop_range('{}', '{}')",
            table.name, range.name
        );
        if change_layout(conn, table.name, ddl).await? {
            tracing::info!(
                partition = range.name,
                rows = rows.n,
                "sent log: expired partition dropped"
            );
            done.dropped += 1;
            done.dropped_rows += u64::try_from(rows.n.unwrap_or(0)).unwrap_or(0);
        } else {
            done.deferred += 1;
        }
    }

    // The DEFAULT partition, row by row, a bounded number of statements per pass.
    let expired = if table.tracks_publication {
        "published_at IS NOT NULL AND published_at < now() - $1"
    } else {
        "created_at < now() - $1"
    };
    for _ in 0..DEFAULT_BATCHES_PER_PASS {
        let deleted = diesel::sql_query(format!(
            "DELETE FROM {default} WHERE ctid IN ( \
                 SELECT ctid FROM {default} WHERE {expired} LIMIT $2)",
            default = table.default_partition()
        ))
        .bind::<Interval, _>(interval(retention))
        .bind::<BigInt, _>(DEFAULT_BATCH)
        .execute(conn)
        .await?;
        done.deleted_from_default += u64::try_from(deleted).unwrap_or(0);
        if i64::try_from(deleted).unwrap_or(0) < DEFAULT_BATCH {
            break;
        }
        tokio::task::yield_now().await;
    }
    Ok(done)
}

/// [`maintain`] for both outbox tables.
pub async fn maintain_outboxes(
    conn: &mut AsyncPgConnection,
    retention: Duration,
) -> Result<Maintained> {
    let messages = maintain(conn, MESSAGES, retention).await?;
    let outbox = maintain(conn, OUTBOX, retention).await?;
    Ok(messages.plus(outbox))
}

pub(crate) fn interval(d: Duration) -> diesel::data_types::PgInterval {
    diesel::data_types::PgInterval::from_microseconds(
        i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
    )
}

/// How a partitioned table stands: `outbox status` and the soak benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, diesel::QueryableByName)]
pub struct TableStorage {
    /// The table.
    #[diesel(sql_type = Text)]
    pub table: String,
    /// Its partitions, the DEFAULT one included.
    #[diesel(sql_type = BigInt)]
    pub partitions: i64,
    /// Bytes on disk, every partition with its indexes and TOAST.
    #[diesel(sql_type = BigInt)]
    pub bytes: i64,
    /// Rows in the DEFAULT partition (none in steady state): as estimated by the statistics
    /// from [`table_storage`], counted by [`outbox_storage`].
    #[diesel(sql_type = BigInt)]
    pub default_rows: i64,
}

/// How `table` (a partitioned table, or a plain one) stands now.
pub async fn table_storage(conn: &mut AsyncPgConnection, table: &str) -> Result<TableStorage> {
    Ok(diesel::sql_query(
        "SELECT $1 AS table, \
                count(*) FILTER (WHERE p.relid <> $1::regclass) AS partitions, \
                coalesce(sum(pg_total_relation_size(p.relid)), 0)::bigint AS bytes, \
                coalesce(max(c.reltuples) FILTER (WHERE c.relname::text = $1 || '_default' \
                                                  AND c.reltuples > 0), 0)::bigint AS default_rows \
         FROM pg_partition_tree($1::regclass) AS p JOIN pg_class AS c ON c.oid = p.relid \
         WHERE p.isleaf OR p.relid = $1::regclass",
    )
    .bind::<Text, _>(table)
    .get_result(conn)
    .await?)
}

/// How both outbox tables stand (`outbox status`): partitions, bytes and the rows in their
/// DEFAULT partitions, counted (none in steady state; some after a relay was down for longer
/// than the ranges made ahead).
pub async fn outbox_storage(conn: &mut AsyncPgConnection) -> Result<Vec<TableStorage>> {
    let mut tables = Vec::with_capacity(2);
    for table in [MESSAGES, OUTBOX] {
        let mut storage = table_storage(conn, table.name).await?;
        let outside: Number = diesel::sql_query(format!(
            "SELECT count(*)::bigint AS n FROM {}",
            table.default_partition()
        ))
        .get_result(conn)
        .await?;
        storage.default_rows = outside.n.unwrap_or(0);
        tables.push(storage);
    }
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_a_seventh_of_the_retention_within_a_second_and_a_day() {
        assert_eq!(
            span_for(Duration::from_secs(7 * 24 * 3600)),
            Duration::from_secs(24 * 3600)
        );
        assert_eq!(
            span_for(Duration::from_secs(30 * 24 * 3600)),
            Duration::from_secs(24 * 3600)
        );
        assert_eq!(
            span_for(Duration::from_secs(7 * 3600)),
            Duration::from_secs(3600)
        );
        assert_eq!(span_for(Duration::from_millis(1)), Duration::from_secs(1));
    }

    #[test]
    fn ranges_are_read_from_their_names_only() {
        assert_eq!(
            parse_range("ferrybox_outbox", "ferrybox_outbox_p0_1796223068"),
            Some(Range {
                name: "ferrybox_outbox_p0_1796223068".into(),
                from: 0,
                to: 1_796_223_068
            })
        );
        assert_eq!(
            parse_range("ferrybox_outbox", "ferrybox_outbox_default"),
            None
        );
        assert_eq!(
            parse_range("ferrybox_outbox", "ferrybox_messages_p0_1"),
            None
        );
    }

    #[test]
    fn ranges_cover_the_spans_ahead_from_the_last_one_on_span_boundaries() {
        // None yet: from the current span's start.
        assert_eq!(
            ranges_to_make(None, None, 1_005, 10),
            vec![
                (1_000, 1_010),
                (1_010, 1_020),
                (1_020, 1_030),
                (1_030, 1_040)
            ]
        );
        // After the last range (the legacy one ends off a boundary).
        assert_eq!(
            ranges_to_make(Some(1_017), None, 1_005, 10),
            vec![(1_017, 1_020), (1_020, 1_030), (1_030, 1_040)]
        );
        // Long after the last range: one range catches up to the current span.
        assert_eq!(
            ranges_to_make(Some(500), None, 1_005, 10),
            vec![
                (500, 1_000),
                (1_000, 1_010),
                (1_010, 1_020),
                (1_020, 1_030),
                (1_030, 1_040)
            ]
        );
        // Covered already.
        assert!(ranges_to_make(Some(1_040), None, 1_005, 10).is_empty());
        // Rows in the DEFAULT partition past the last range: the next one starts after them.
        assert_eq!(
            ranges_to_make(Some(990), Some(1_008), 1_005, 10),
            vec![
                (1_008, 1_010),
                (1_010, 1_020),
                (1_020, 1_030),
                (1_030, 1_040)
            ]
        );
    }
}
