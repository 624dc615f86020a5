//! The polling relay (`relay.mode = table`): claims the outbox table's unpublished rows in id
//! order, sends a batch, and marks the acknowledged rows published.
//!
//! A row is marked published only after the broker acknowledged it (true whichever connection
//! writes it): the active relay records one batch on a second connection while it sends the
//! next, except after a failed batch, which is recorded before anything else is sent.
//!
//! The relay never reads `WHERE id > last_seen`: it claims *unpublished* rows in id order, so
//! a row whose transaction commits late is published on the next pass instead of being skipped.
//! [`Outbox::enqueue`](super::Outbox::enqueue) serializes transactions per key, so for one key
//! id order is commit order.
//!
//! The active relay wakes on `LISTEN/NOTIFY` and also polls every `poll_interval`, so a lost
//! notification (or an outbox written without notify) only costs latency. Writers notify only
//! while a relay waits for work: before it waits, the relay takes the waiting lock (see
//! `RELAY_WAITING_LOCK` in the enqueue module) and looks once more; busy, it costs writers
//! nothing.

use std::sync::Arc;

use diesel::prelude::*;
use diesel::sql_types::Integer;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use secrecy::ExposeSecret;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::active::Active;
use super::enqueue::{NOTIFY_CHANNEL, RELAY_WAITING_LOCK};
use super::publish::send_all;
use super::record::{Origin, OutboxRecord};
use super::schema::ferrybox_outbox;
use super::table::{
    BACKLOG_GAUGE_INTERVAL, BatchOutcome, Sent, mark_read, record_backlog, record_failures,
};
use super::wake::{listen, sleep_or_shutdown};
use crate::error::Result;

/// The polling source: publishes the table's rows while this instance is the active relay,
/// until `shutdown`.
pub(super) async fn run(
    active: &Active<'_>,
    conn: &mut AsyncPgConnection,
    shutdown: &CancellationToken,
) -> Result<()> {
    active.publish_until_shutdown(conn, shutdown).await
}

impl Active<'_> {
    async fn publish_until_shutdown(
        &self,
        conn: &mut AsyncPgConnection,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let wake = Arc::new(Notify::new());
        let listening = shutdown.child_token();
        // Stops the listener however this function ends, also when its future is dropped.
        let _stop_listening = listening.clone().drop_guard();
        let listener = tokio_util::task::TaskTracker::new();
        if self.config.listen {
            let url = self.database.url.expose_secret().to_owned();
            let wake = Arc::clone(&wake);
            let backoff = self.config.backoff;
            let wake_up = move || wake.notify_one();
            listener.spawn(listen(
                url,
                NOTIFY_CHANNEL,
                wake_up,
                backoff,
                listening.clone(),
            ));
        }
        listener.close();
        let published = self.publish_loop(conn, &wake, shutdown).await;
        // However publishing ended, the listener stops and is waited for.
        listening.cancel();
        listener.wait().await;
        published
    }

    /// Publishes batch after batch (woken by `wake` or polling) until `shutdown`.
    async fn publish_loop(
        &self,
        conn: &mut AsyncPgConnection,
        wake: &Notify,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        // Batches are recorded on a second connection while the next one is sent, so the
        // database work of one overlaps the broker round trip of the other. (Marking needs no
        // lock: a row marked after its acknowledgement is true whoever marks it.)
        let mut marker = self.connect().await?;
        let mut next_cleanup = tokio::time::Instant::now();
        let mut next_adoption = tokio::time::Instant::now();
        let mut next_gauges = tokio::time::Instant::now();
        let mut failed_batches = 0u32;
        // A batch sent and acknowledged (or failed) but not recorded yet.
        let mut sent = Sent::default();
        // Holding the waiting lock: writers notify.
        let mut waiting = false;
        while !shutdown.is_cancelled() {
            if tokio::time::Instant::now() >= next_adoption {
                super::adopt::adopt_appended(conn).await?;
                next_adoption = tokio::time::Instant::now() + self.config.cleanup_interval;
            }
            if tokio::time::Instant::now() >= next_cleanup {
                self.clean(conn).await?;
                next_cleanup = tokio::time::Instant::now() + self.config.cleanup_interval;
            }
            if crate::metrics::instruments().is_some() && tokio::time::Instant::now() >= next_gauges
            {
                record_backlog(conn).await?;
                next_gauges = tokio::time::Instant::now() + BACKLOG_GAUGE_INTERVAL;
            }
            if !sent.failed.is_empty() {
                // The broker is down or refusing: record it, then back off, ignoring wake-ups
                // meanwhile. Nothing else is sent before the failure is recorded.
                self.record(&mut marker, &std::mem::take(&mut sent)).await?;
                failed_batches += 1;
                let delay = self.config.backoff.delay(failed_batches);
                if sleep_or_shutdown(delay, shutdown).await {
                    break;
                }
                continue;
            }
            failed_batches = 0;
            if sent.is_empty() {
                sent = self.send_batch(conn, &[]).await?;
                if !sent.is_empty() {
                    if waiting {
                        waiting = false;
                        self.stop_waiting(conn).await?;
                    }
                    continue;
                }
                if self.config.listen && !waiting {
                    // Rows of writers that did not notify are committed once the lock is
                    // granted: look once more before waiting.
                    waiting = self.start_waiting(conn).await;
                    if waiting {
                        continue;
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                    () = wake.notified() => {}
                }
                continue;
            }
            let previous = std::mem::take(&mut sent);
            let (recorded, next) = tokio::join!(
                self.record(&mut marker, &previous),
                self.send_batch(conn, &previous.acked)
            );
            recorded?;
            sent = next?;
        }
        // Shutdown: what was sent is recorded before the relay lets go.
        self.record(&mut marker, &sent).await?;
        if waiting {
            self.stop_waiting(conn).await?;
        }
        Ok(())
    }

    /// Takes the waiting lock, so that writers notify from now on. Waits (up to
    /// `poll_interval`) for the transactions that hold it shared: those enqueued without
    /// notifying, and are committed (or gone) once it is granted. False when it was not
    /// granted in time (a long transaction holds it): the relay then polls this round.
    async fn start_waiting(&self, conn: &mut AsyncPgConnection) -> bool {
        let (class, object) = RELAY_WAITING_LOCK;
        let timeout_ms = self.config.poll_interval.as_millis().max(1);
        // One implicit transaction: the timeout is local to it, the lock is the session's.
        let sql = format!(
            "SET LOCAL lock_timeout = {timeout_ms}; SELECT pg_advisory_lock({class}, {object})"
        );
        match conn.batch_execute(&sql).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "relay waiting lock not granted in time; polling");
                false
            }
        }
    }

    /// Lets go of the waiting lock: the relay is busy, writers need not notify.
    async fn stop_waiting(&self, conn: &mut AsyncPgConnection) -> Result<()> {
        let (class, object) = RELAY_WAITING_LOCK;
        diesel::sql_query("SELECT pg_advisory_unlock($1, $2)")
            .bind::<Integer, _>(class)
            .bind::<Integer, _>(object)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Retention: drops the expired partitions of both outbox tables (the append-only
    /// table's rows left here are the log relay's acknowledged ones, see `adopt`: its sent log,
    /// which expires too) and makes the ones ahead (see [`crate::storage`]). A layout change
    /// it had to give up on is tried again on the next pass.
    async fn clean(&self, conn: &mut AsyncPgConnection) -> Result<()> {
        let done = crate::storage::maintain_outboxes(conn, self.config.retention).await?;
        tracing::debug!(?done, "sent log maintained");
        Ok(())
    }

    /// Claims the next batch of unpublished rows in id order (leaving out `in_flight`, rows
    /// sent but not yet recorded), sends them all, then awaits every delivery report.
    async fn send_batch(&self, conn: &mut AsyncPgConnection, in_flight: &[i64]) -> Result<Sent> {
        // The in-flight rows are left out here rather than in SQL (`id <> ALL($1)` compares
        // every row with every in-flight id): read that many more and drop them.
        let extra = i64::try_from(in_flight.len()).unwrap_or(i64::MAX);
        let mut rows: Vec<OutboxRecord> = ferrybox_outbox::table
            .filter(ferrybox_outbox::published_at.is_null())
            .order(ferrybox_outbox::id.asc())
            .limit(self.config.batch_size.saturating_add(extra))
            .select(OutboxRecord::as_select())
            .load(conn)
            .await?;
        if !in_flight.is_empty() {
            let skip: std::collections::HashSet<i64> = in_flight.iter().copied().collect();
            rows.retain(|row| !skip.contains(&row.id));
            rows.truncate(usize::try_from(self.config.batch_size).unwrap_or(usize::MAX));
        }
        // Send the whole batch, then wait. The idempotent producer keeps each partition's
        // order and retries without duplicating; when the broker stays away, messages time out
        // (`message.timeout.ms`) oldest first, so a key's later rows fail with its earlier ones
        // and are retried together.
        let publisher = self.publisher;
        // The polling relay does not number its messages (see `super::sequence`).
        let results = send_all(publisher, &rows, Origin::Outbox, &Default::default()).await;
        let sent = Sent::of(publisher, &rows, results);
        if !sent.failed.is_empty() {
            publisher.recover()?;
        }
        Ok(sent)
    }

    /// Marks the acknowledged rows published (with partition, offset and feed position) and
    /// records attempts and the error on the others, one statement each.
    async fn record(&self, conn: &mut AsyncPgConnection, sent: &Sent) -> Result<BatchOutcome> {
        self.count_published(u64::try_from(sent.acked.len()).unwrap_or(u64::MAX));
        let outcome = BatchOutcome {
            published: sent.acked.len(),
            failed: sent.failed.len(),
        };
        // One call marks the rows and hands out their feed positions in id order (see the
        // `ferrybox-0005_feed` migration). A row sent again (after a crash before its mark, or
        // by an instance that lost the lock mid-batch) keeps the position it had.
        if !sent.acked.is_empty() {
            mark_read(conn, &sent.acked, &sent.partitions, &sent.offsets).await?;
        }
        if !sent.failed.is_empty() {
            record_failures(conn, sent).await?;
        }
        Ok(outcome)
    }
}

/// Publishes one batch (see [`super::Relay::publish_batch`]).
pub(super) async fn publish_batch(
    active: &Active<'_>,
    conn: &mut AsyncPgConnection,
) -> Result<BatchOutcome> {
    let sent = active.send_batch(conn, &[]).await?;
    active.record(conn, &sent).await
}
