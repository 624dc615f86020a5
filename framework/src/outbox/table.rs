//! What both relay modes do to the polling table (`ferrybox_outbox`): mark acknowledged rows
//! published (with their feed positions), record the broker's refusals, drain the unpublished
//! rows, and measure the backlog.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::publish::{Ack, Publisher, Refusal, send_all};
use super::record::{Origin, OutboxRecord};
use super::schema::ferrybox_outbox;
use super::sent_log;
use crate::error::Result;

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows acknowledged by the broker and marked published.
    pub published: usize,
    /// Rows the broker did not acknowledge; they stay unpublished with the error recorded.
    pub failed: usize,
}

/// How often the active relay measures the backlog for the metrics (when they are on).
pub(super) const BACKLOG_GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// Puts the polling table's backlog in the metrics (when they are on): unpublished rows, the
/// oldest one's age, those the broker refused.
pub(super) async fn record_backlog(conn: &mut AsyncPgConnection) -> Result<()> {
    if let Some(m) = crate::metrics::instruments() {
        let (rows, age, errors) = sent_log::backlog(conn).await?;
        m.outbox_backlog
            .record(u64::try_from(rows).unwrap_or(0), &[]);
        m.outbox_oldest_age.record(age, &[]);
        m.outbox_errors
            .record(u64::try_from(errors).unwrap_or(0), &[]);
    }
    Ok(())
}

#[derive(QueryableByName)]
struct Missing {
    #[diesel(sql_type = Array<BigInt>)]
    ids: Vec<i64>,
}

/// Marks rows of the polling table published, with their partitions and offsets, and gives
/// them their feed positions (see the `ferrybox-0005_feed` migration). Returns the ids it
/// could not mark because they are not visible (yet): see the `ferrybox-0007_mark_visible`
/// migration.
pub(super) async fn mark_published(
    conn: &mut AsyncPgConnection,
    ids: &[i64],
    partitions: &[Option<i32>],
    offsets: &[Option<i64>],
) -> Result<Vec<i64>> {
    let missing: Missing = crate::db::prepared(
        diesel::sql_query("SELECT ferrybox_mark_published($1, $2, $3) AS ids")
            .bind::<Array<BigInt>, _>(ids)
            .bind::<Array<Nullable<Integer>>, _>(partitions)
            .bind::<Array<Nullable<BigInt>>, _>(offsets),
    )
    .get_result(conn)
    .await?;
    Ok(missing.ids)
}

/// Marks rows this relay read from the table (so they were visible): any it cannot mark were
/// deleted in the meantime, which is logged.
pub(super) async fn mark_read(
    conn: &mut AsyncPgConnection,
    ids: &[i64],
    partitions: &[Option<i32>],
    offsets: &[Option<i64>],
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let missing = mark_published(conn, ids, partitions, offsets).await?;
    if !missing.is_empty() {
        tracing::warn!(
            ?missing,
            "published rows were deleted from the outbox before they were marked"
        );
    }
    Ok(())
}

/// Waiting for a streamed row to become visible to this session: tries [`Backoff`] apart,
/// from 1 ms to 100 ms, for up to a patience.
///
/// [`Backoff`]: crate::config::Backoff
pub(super) struct UntilVisible {
    backoff: crate::config::Backoff,
    tries: u32,
    deadline: tokio::time::Instant,
}

impl UntilVisible {
    pub(super) fn new(patience: Duration) -> Self {
        Self {
            backoff: crate::config::Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(100),
            },
            tries: 0,
            deadline: tokio::time::Instant::now() + patience,
        }
    }

    /// Waits before the next try; false when the patience is spent.
    pub(super) async fn again(&mut self) -> bool {
        if tokio::time::Instant::now() >= self.deadline {
            return false;
        }
        self.tries += 1;
        tokio::time::sleep(self.backoff.delay(self.tries)).await;
        true
    }
}

/// Marks rows the log relay streamed. A transaction is streamed from its commit record, a
/// moment before it becomes visible to other sessions: rows not visible yet are marked again
/// (1 ms, 2 ms, ... up to 100 ms apart) until they are, for up to `patience`, after which
/// this fails (and the relay does not confirm past them).
pub(super) async fn mark_streamed(
    conn: &mut AsyncPgConnection,
    ids: &[i64],
    partitions: &[Option<i32>],
    offsets: &[Option<i64>],
    patience: Duration,
) -> Result<()> {
    let mut wait = UntilVisible::new(patience);
    let mut missing = mark_published(conn, ids, partitions, offsets).await?;
    let at: std::collections::HashMap<i64, usize> =
        ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    while !missing.is_empty() {
        tracing::debug!(
            ?missing,
            "streamed rows not visible yet; marking them again"
        );
        if !wait.again().await {
            return Err(crate::error::Error::Replication(format!(
                "{} streamed outbox row(s) still not visible after {patience:?} (ids {:?}): \
                 their transaction committed in the log but has not finished (waiting for a \
                 synchronous standby?); the relay does not confirm past them",
                missing.len(),
                &missing[..missing.len().min(10)]
            )));
        }
        let (p, o): (Vec<_>, Vec<_>) = missing
            .iter()
            .filter_map(|id| at.get(id).map(|&i| (partitions[i], offsets[i])))
            .unzip();
        missing = mark_published(conn, &missing, &p, &o).await?;
    }
    Ok(())
}

/// Publishes the polling table's unpublished rows through `publisher` until none is left or
/// a batch fails (for the log relay: rows written before its slot existed, or refused).
/// With `only_refused`, only rows the broker refused before (the others may be in flight on
/// the stream).
pub(super) async fn drain_table(
    publisher: &dyn Publisher,
    conn: &mut AsyncPgConnection,
    batch_size: i64,
    only_refused: bool,
) -> Result<BatchOutcome> {
    let mut total = BatchOutcome::default();
    loop {
        let mut query = ferrybox_outbox::table
            .filter(ferrybox_outbox::published_at.is_null())
            .into_boxed();
        if only_refused {
            query = query.filter(ferrybox_outbox::last_error.is_not_null());
        }
        let rows: Vec<OutboxRecord> = query
            .order(ferrybox_outbox::id.asc())
            .limit(batch_size)
            .select(OutboxRecord::as_select())
            .load(conn)
            .await?;
        if rows.is_empty() {
            return Ok(total);
        }
        let numbers = super::sequence::numbers_for(conn, Origin::Outbox, &rows).await?;
        let results = send_all(publisher, &rows, Origin::Outbox, &numbers).await;
        let sent = Sent::of(publisher, &rows, results);
        if !sent.acked.is_empty() {
            mark_read(conn, &sent.acked, &sent.partitions, &sent.offsets).await?;
        }
        total.published += sent.acked.len();
        total.failed += sent.failed.len();
        if !sent.failed.is_empty() {
            record_failures(conn, &sent).await?;
            publisher.recover()?;
            return Ok(total);
        }
    }
}

/// Records attempts and the error on rows the broker did not acknowledge.
pub(super) async fn record_failures(conn: &mut AsyncPgConnection, sent: &Sent) -> Result<()> {
    tracing::warn!(
        failed = sent.failed.len(),
        first_error = %sent.errors[0],
        "broker did not acknowledge messages; they stay unpublished"
    );
    diesel::sql_query(
        "UPDATE ferrybox_outbox AS o \
         SET attempts = o.attempts + 1, last_error = u.e \
         FROM unnest($1::bigint[], $2::text[]) AS u(id, e) \
         WHERE o.id = u.id AND o.id = ANY($1)",
    )
    .bind::<Array<BigInt>, _>(&sent.failed)
    .bind::<Array<Text>, _>(&sent.errors)
    .execute(conn)
    .await?;
    Ok(())
}

/// What a sent batch came back with: acknowledged rows with their positions, and failed rows
/// with their errors.
#[derive(Default)]
pub(super) struct Sent {
    pub(super) acked: Vec<i64>,
    /// `None` where the publisher has no partitions (the feed).
    pub(super) partitions: Vec<Option<i32>>,
    pub(super) offsets: Vec<Option<i64>>,
    pub(super) failed: Vec<i64>,
    pub(super) errors: Vec<String>,
}

impl Sent {
    /// What the publisher answered for each of `rows` (in their order), split into
    /// acknowledged rows with their positions and refused rows with their errors; counted
    /// per topic in the metrics as `publisher`'s sends.
    pub(super) fn of(
        publisher: &dyn Publisher,
        rows: &[OutboxRecord],
        results: Vec<std::result::Result<Ack, Refusal>>,
    ) -> Self {
        let mut sent = Self::default();
        let mut counts: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
        for (row, result) in rows.iter().zip(results) {
            let count = counts.entry(row.topic()).or_default();
            match result {
                Ok(ack) => {
                    count.0 += 1;
                    sent.acked.push(row.id);
                    sent.partitions.push(ack.partition);
                    sent.offsets.push(ack.offset);
                }
                Err(refusal) => {
                    count.1 += 1;
                    sent.failed.push(row.id);
                    sent.errors.push(refusal.reason);
                }
            }
        }
        for (topic, (acked, refused)) in counts {
            super::publish::count_sends(publisher, topic, acked, refused);
        }
        sent
    }

    pub(super) fn is_empty(&self) -> bool {
        self.acked.is_empty() && self.failed.is_empty()
    }
}
