//! The log relay: committed outbox rows arrive through PostgreSQL logical replication, in
//! commit order, and are published as they arrive; the replication slot's confirmed position
//! moves only past transactions whose every message the broker acknowledged. Nothing is
//! written back per message: progress is the slot's position, plus a checkpoint row written
//! once a second (for recovering a lost slot).
//!
//! Reading, sending and acknowledging overlap: a change is handed to the producer as soon as
//! it is decoded, and acknowledgements are taken in stream order, up to `batch_size` messages
//! in flight. A delivery that fails and may pass (the broker away) ends the stream: the relay
//! starts a new producer and a new stream, which resumes at the confirmed position, so what
//! was not acknowledged is sent again (a duplicate at worst, never a loss). A message the
//! broker refuses for good (too large, say) is written to the polling table with its error,
//! where `outbox status` shows it and the relay retries it, and the stream goes on.
//!
//! A slot that does not exist yet, was dropped, or was invalidated (`max_slot_wal_keep_size`)
//! is made again with an exported snapshot: every row committed before it that may not have
//! been acknowledged (its transaction id at or above the checkpoint's bound, or all of them
//! the first time) is published from the table, then the stream starts at the new slot's
//! consistent point. Nothing committed is lost; what the lost slot had already delivered may
//! be sent again.

mod decode;
pub(crate) mod shards;
pub(crate) mod slot;

use std::collections::VecDeque;
use std::task::Poll;
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use self::decode::{Change, Decoder};
use self::shards::Shard;
use super::active::Active;
use super::publish::{Ack, Delivery, Publisher, Refusal, send_all};
use super::record::{Origin, OutboxRecord};
use super::sequence::{Sequence, Sequencer};
use super::settings::RelayConfig;
use crate::error::{Error, Result};

/// How often the checkpoint row is written and the slot's lag measured.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Acknowledged rows of the polling table marked per statement at most, while busy.
const MARK_BATCH: usize = 1_000;

/// How long a streamed row may stay invisible before the stream gives up on it (and starts
/// again from the confirmed position): see [`super::table::mark_streamed`].
const PATIENCE: Duration = Duration::from_secs(30);

/// The same when the stream is stopping: what is not marked by then is sent again next time.
const PATIENCE_STOPPING: Duration = Duration::from_secs(5);

/// Rows read per query while publishing a new slot's snapshot.
const SNAPSHOT_BATCH: i64 = 5_000;

/// One step of the stream, taken in stream order once everything before it is done.
enum Step {
    /// A message and what the publisher said.
    Delivered {
        origin: Origin,
        record: Box<OutboxRecord>,
        sequence: Option<Sequence>,
        result: std::result::Result<Ack, Refusal>,
    },
    /// The end of a transaction: everything in it was acknowledged (or recorded as refused).
    Committed(Lsn),
}

/// What the stream handed over and has not taken yet, in stream order: messages with their
/// pending answers, and the ends of their transactions.
enum Pending {
    Message {
        origin: Origin,
        record: Box<OutboxRecord>,
        sequence: Option<Sequence>,
        delivery: Delivery,
    },
    Committed(Lsn),
}

/// The stream's window: steps are taken in stream order, so only the oldest message's answer
/// is awaited (polled); the answers behind it complete on their own, and are found ready when
/// their turn comes. (A set of futures polled as each wakes costs a task and a wake-up per
/// message, and this order is the only one the stream can use.)
#[derive(Default)]
struct InFlight {
    pending: VecDeque<Pending>,
    messages: usize,
}

impl InFlight {
    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Hands `record` to the publisher, with its number when it has one.
    fn send(
        &mut self,
        publisher: &dyn Publisher,
        origin: Origin,
        record: Box<OutboxRecord>,
        sequence: Option<Sequence>,
    ) {
        // With tracing on, each message's publish span links the trace of the request that
        // made it, as the polling relay's batch span links its batch's.
        let delivery: Delivery = if crate::telemetry::tracing_enabled() {
            let span = crate::telemetry::batch_span("publish", "producer", [&record.headers()]);
            let delivery = span.in_scope(|| publisher.send(&record, origin, sequence.as_ref()));
            Box::pin(tracing::Instrument::instrument(delivery, span))
        } else {
            publisher.send(&record, origin, sequence.as_ref())
        };
        self.messages += 1;
        self.pending.push_back(Pending::Message {
            origin,
            record,
            sequence,
            delivery,
        });
    }

    fn committed(&mut self, end: Lsn) {
        self.pending.push_back(Pending::Committed(end));
    }

    /// The oldest step, once it is done (cancel-safe: nothing is taken until it is).
    fn next(&mut self) -> impl Future<Output = Option<Step>> + '_ {
        std::future::poll_fn(move |cx| {
            let step = match self.pending.front_mut() {
                None => return Poll::Ready(None),
                Some(Pending::Committed(end)) => Step::Committed(*end),
                Some(Pending::Message { delivery, .. }) => {
                    let Poll::Ready(result) = delivery.as_mut().poll(cx) else {
                        return Poll::Pending;
                    };
                    let Some(Pending::Message {
                        origin,
                        record,
                        sequence,
                        ..
                    }) = self.pending.pop_front()
                    else {
                        unreachable!("the front was a message");
                    };
                    self.messages -= 1;
                    return Poll::Ready(Some(Step::Delivered {
                        origin,
                        record,
                        sequence,
                        result,
                    }));
                }
            };
            self.pending.pop_front();
            Poll::Ready(Some(step))
        })
    }
}

/// The log source: runs the log relay for `shard` while this instance holds its lock on `control`, until
/// `shutdown` or an error (after which [`super::Relay::run`] starts again).
pub(crate) async fn run(
    active: &Active<'_>,
    shard: Shard,
    control: &mut AsyncPgConnection,
    shutdown: &CancellationToken,
) -> Result<()> {
    let Active {
        config, publisher, ..
    } = *active;
    let url = active.database.url.expose_secret();
    // The database's setup was checked when the mode resolved (`RelayMode::resolve`).
    shards::check_publication(control, shard).await?;
    let slot_name = shard.slot(&slot::name(config.slot_name.as_deref(), control).await?);
    let state = slot::state(control, &slot_name).await?;
    // The stream starts at the slot's confirmed position or the checkpoint's, whichever is
    // later (the server's rule): the last position a stopping relay confirmed may not have
    // reached the server before it let go, but it reached the checkpoint.
    let replication = slot::replication_config(url, &slot_name, &shard.publication())?
        .with_start_lsn(state.confirmed_lsn.unwrap_or(Lsn::ZERO));
    let mut client = ReplicationClient::connect_gated(replication)
        .await
        .map_err(|e| Error::Replication(format!("connecting for replication: {e}")))?;
    if let Some(why) = state.needs_new_slot() {
        if state.lost() {
            tracing::error!(slot = %slot_name, reason = why,
                "replication slot lost; making it again and publishing from the table what it may not have delivered");
            if let Some(m) = crate::metrics::instruments() {
                m.relay_slot_recoveries.add(1, &[]);
            }
        } else {
            tracing::info!(slot = %slot_name, reason = why, "creating the replication slot");
        }
        slot::begin_new_slot(control, &mut client, &slot_name, state.exists()).await?;
        let snapshot = slot::create(&mut client, &slot_name).await?;
        let recover_from = state.recover_from_xid.clone();
        let count =
            publish_snapshot(url, &snapshot.name, recover_from, shard, publisher, control).await?;
        active.count_published(count);
        slot::snapshot_done(control, &slot_name, snapshot.consistent_point).await?;
        tracing::info!(slot = %slot_name, published = count, consistent_point = %snapshot.consistent_point,
            "replication slot ready; rows committed before it published");
    }
    client
        .start()
        .await
        .map_err(|e| Error::Replication(format!("starting replication: {e}")))?;
    client
        .wait_started()
        .await
        .map_err(|e| Error::Replication(format!("starting replication: {e}")))?;
    tracing::info!(slot = %slot_name, shard = shard.index, shards = shard.of,
        from = %state.confirmed_lsn.unwrap_or(Lsn::ZERO), "relay is streaming the write-ahead log");
    let streaming = Streaming {
        active,
        shard,
        slot_name: &slot_name,
    };
    let streamed = stream(&mut client, &streaming, control, shutdown).await;
    let stopped = client.shutdown().await;
    streamed?;
    stopped.map_err(|e| Error::Replication(format!("stopping replication: {e}")))?;
    Ok(())
}

/// What one stream runs with: the active relay, its shard and the shard's slot.
struct Streaming<'a> {
    active: &'a Active<'a>,
    shard: Shard,
    slot_name: &'a str,
}

/// The stream loop: decode, send, confirm in order.
async fn stream(
    client: &mut ReplicationClient,
    streaming: &Streaming<'_>,
    control: &mut AsyncPgConnection,
    shutdown: &CancellationToken,
) -> Result<()> {
    let Streaming {
        active,
        shard,
        slot_name,
    } = *streaming;
    let Active {
        config, publisher, ..
    } = *active;
    let window = usize::try_from(config.batch_size)
        .unwrap_or(usize::MAX)
        .max(1);
    let mut decoder = Decoder::default();
    let mut sequencer = Sequencer::load(control, slot_name).await?;
    let mut in_flight = InFlight::default();
    let mut in_transaction = false;
    let mut checkpoint = Checkpoint::default();
    let mut progress = Progress::default();
    let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_cleanup = tokio::time::Instant::now();
    let mut next_gauges = tokio::time::Instant::now();
    // A transaction whose messages were sent but whose end was not read yet is not confirmed:
    // stopping inside it would have the next relay send them again. Shutdown waits for the
    // end of the open transaction (the server streams only committed ones, so it follows),
    // or `PATIENCE_STOPPING` for a very large one.
    let stop_inside_transaction = async {
        shutdown.cancelled().await;
        tokio::time::sleep(PATIENCE_STOPPING).await;
    };
    tokio::pin!(stop_inside_transaction);
    let outcome = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled(), if !in_transaction => break Ok(()),
            () = &mut stop_inside_transaction, if in_transaction => break Ok(()),
            _ = tick.tick() => {
                progress.flush(control, PATIENCE).await?;
                checkpoint.write(control, slot_name, progress.confirmed, &mut sequencer).await?;
                checkpoint.confirm(client);
                slot::record_lag(control, slot_name).await?;
                if crate::metrics::instruments().is_some() && tokio::time::Instant::now() >= next_gauges {
                    super::table::record_backlog(control).await?;
                    next_gauges = tokio::time::Instant::now() + super::table::BACKLOG_GAUGE_INTERVAL;
                }
                // Shard 0 keeps the sent logs and retries refused rows (of every shard: a
                // refused row is out of its key's order already).
                if shard.index == 0 && tokio::time::Instant::now() >= next_cleanup {
                    // Both tables' sent logs (by partition) and the number runs.
                    crate::storage::maintain_outboxes(control, config.retention).await?;
                    super::sent_log::delete_expired_runs(control, config.retention, super::sent_log::CLEANUP_BATCH).await?;
                    drain_table(publisher, control, config, true).await?;
                    next_cleanup = tokio::time::Instant::now() + config.cleanup_interval;
                }
            }
            Some(step) = in_flight.next(), if !in_flight.is_empty() => {
                // Caught up (nothing else in flight): rows of the polling table are marked
                // now, so their feed positions do not wait for the tick.
                let caught_up = in_flight.is_empty();
                if let Err(e) = take(step, &mut progress, &mut sequencer, caught_up, active, control).await {
                    if let Error::NotPublished { .. } = e {
                        tracing::warn!(error = %e, "a message was not published; resending from the confirmed position");
                        publisher.recover()?;
                    }
                    break Err(e);
                }
            }
            event = client.recv(), if in_flight.messages < window => {
                let event = event.map_err(|e| Error::Replication(e.to_string()))?;
                match event {
                    None => break Err(Error::Replication("the server ended the stream".into())),
                    Some(ReplicationEvent::Begin { .. }) => in_transaction = true,
                    Some(ReplicationEvent::XLogData { data, .. }) => {
                        if let Change::Message(origin, record) = decoder.decode(&data)? {
                            let sequence = number(&mut sequencer, publisher, &record).await?;
                            in_flight.send(publisher, origin, record, sequence);
                        }
                    }
                    Some(ReplicationEvent::Commit { end_lsn, .. }) => {
                        in_transaction = false;
                        in_flight.committed(end_lsn);
                    }
                    Some(ReplicationEvent::KeepAlive { wal_end, .. }) => {
                        // Nothing of ours is in flight or open: the server may forget what it
                        // decoded up to here (other databases' and tables' changes), or the
                        // slot would hold WAL while the outbox is idle.
                        if in_flight.is_empty()
                            && !in_transaction
                            && let Some(lsn) = progress.idle_at(wal_end)
                            && !sequencer.has_unwritten()
                        {
                            // Nothing numbered waits for the checkpoint either.
                            checkpoint.confirmable(lsn);
                            checkpoint.confirm(client);
                        }
                    }
                    Some(ReplicationEvent::Message { .. }) => {}
                    Some(ReplicationEvent::StoppedAt { .. }) => {
                        break Err(Error::Replication("the stream stopped".into()));
                    }
                }
            },
        }
    };
    // Whatever ended the stream, what was sent is awaited and confirmed before letting go
    // (on an error, up to the first failure).
    if outcome.is_ok() {
        while let Some(step) = in_flight.next().await {
            if take(step, &mut progress, &mut sequencer, false, active, control)
                .await
                .is_err()
            {
                break;
            }
        }
    }
    active.count_published(std::mem::take(&mut progress.published));
    progress.flush(control, PATIENCE_STOPPING).await?;
    checkpoint
        .write(control, slot_name, progress.confirmed, &mut sequencer)
        .await?;
    checkpoint.confirm(client);
    outcome
}

/// Takes one step, in stream order; `Err` ends the stream. `caught_up` marks the polling
/// table's acknowledged rows at the end of this transaction rather than at the next tick.
async fn take(
    step: Step,
    progress: &mut Progress,
    sequencer: &mut Sequencer,
    caught_up: bool,
    active: &Active<'_>,
    control: &mut AsyncPgConnection,
) -> Result<()> {
    match step {
        Step::Delivered {
            origin,
            record,
            sequence,
            result,
        } => {
            super::publish::count_sent(active.publisher, record.topic(), result.is_ok());
            delivered(origin, &record, result, progress, control).await?;
            // Acknowledged, or kept as refused for good: either way its number is used (a
            // consumer finds the refused one in the sent log when it repairs the gap).
            if let Some(sequence) = sequence {
                sequencer.taken(record.topic(), &sequence, origin, record.id);
            }
            Ok(())
        }
        Step::Committed(end) => {
            // Counted per transaction, not per message (the count's watchers wake on each).
            active.count_published(std::mem::take(&mut progress.published));
            sequencer.committed(end);
            if progress.committed(end).is_none() && (caught_up || progress.pending() >= MARK_BATCH)
            {
                progress.flush(control, PATIENCE).await?;
            }
            Ok(())
        }
    }
}

/// The number `record` is sent with: from `sequencer`, once the publisher told the topic's
/// partition count (read the first time the source publishes to the topic); `None` for a
/// publisher that does not number messages.
async fn number(
    sequencer: &mut Sequencer,
    publisher: &dyn Publisher,
    record: &OutboxRecord,
) -> Result<Option<Sequence>> {
    if sequencer.partitions(record.topic()).is_none() {
        match publisher.partitions(record.topic()).await? {
            Some(count) => sequencer.set_partitions(record.topic(), count),
            None => return Ok(None),
        }
    }
    Ok(sequencer.assign(record.topic(), record.message_key.as_bytes()))
}

/// Takes one delivery's outcome: an acknowledged row of the polling table is marked (in the
/// next flush); a permanent refusal is recorded in the polling table; anything else ends the
/// stream (`Err`), which is then resent from the confirmed position.
async fn delivered(
    origin: Origin,
    record: &OutboxRecord,
    result: std::result::Result<Ack, Refusal>,
    progress: &mut Progress,
    control: &mut AsyncPgConnection,
) -> Result<()> {
    match result {
        Ok(ack) => {
            if origin == Origin::Outbox {
                progress.delivered(record.id, ack);
            }
            progress.published += 1;
            Ok(())
        }
        Err(refusal) if !refusal.for_good => Err(not_published(record, refusal)),
        Err(refusal) => refused(control, origin, record, &refusal).await,
    }
}

fn not_published(record: &OutboxRecord, refusal: Refusal) -> Error {
    Error::NotPublished {
        topic: record.topic.clone(),
        reason: refusal.reason,
    }
}

/// Keeps a message refused for good (logged): a row of the polling table gets the error; a row of
/// the append-only table is copied into the polling table with it (same message id), where
/// `outbox status` counts it and the relay retries it.
async fn refused(
    control: &mut AsyncPgConnection,
    origin: Origin,
    record: &OutboxRecord,
    refusal: &Refusal,
) -> Result<()> {
    tracing::error!(id = record.id, message_id = %record.message_id, topic = record.topic(), error = %refusal,
        "a message was refused for good; it is kept in the outbox with its error");
    let sql = match origin {
        Origin::Outbox => {
            "UPDATE ferrybox_outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1"
        }
        Origin::Messages => {
            "INSERT INTO ferrybox_outbox \
             (message_id, topic, message_key, message_type, entity_version, headers, payload, \
              occurred_at, created_at, attempts, last_error) \
             SELECT message_id, topic, message_key, message_type, entity_version, headers, \
                    payload, occurred_at, created_at, 1, $2 \
             FROM ferrybox_messages WHERE id = $1 \
             ON CONFLICT (message_id, created_at) DO UPDATE SET attempts = ferrybox_outbox.attempts + 1, \
                last_error = EXCLUDED.last_error"
        }
    };
    // The row's transaction may not be visible yet (see `super::table::mark_streamed`).
    let mut wait = super::table::UntilVisible::new(PATIENCE);
    loop {
        let recorded = diesel::sql_query(sql)
            .bind::<BigInt, _>(record.id)
            .bind::<Text, _>(&refusal.reason)
            .execute(control)
            .await?;
        if recorded > 0 {
            return Ok(());
        }
        if !wait.again().await {
            return Err(Error::Replication(format!(
                "outbox row {} streamed but still not visible after {PATIENCE:?}; its refusal \
                 is not recorded, and the relay does not confirm past it",
                record.id
            )));
        }
    }
}

/// What the stream may confirm, and when. The slot is confirmed past a transaction only once
/// every message in it is acknowledged and its rows of the polling table are marked published:
/// a crash between the two leaves those rows to the next stream, never unmarked behind the
/// confirmed position (where nothing would send them again, and the feed would never show
/// them).
#[derive(Default)]
struct Progress {
    /// Acknowledged rows of the polling table, marked published in batches.
    ids: Vec<i64>,
    partitions: Vec<Option<i32>>,
    offsets: Vec<Option<i64>>,
    /// How far everything is acknowledged: the end of the last transaction taken, or an idle
    /// keepalive's position.
    acknowledged: Lsn,
    /// The position last handed to the server as confirmed.
    confirmed: Lsn,
    /// Messages acknowledged since the count was last given to [`Active::count_published`].
    published: u64,
}

impl Progress {
    /// Acknowledged rows waiting to be marked.
    fn pending(&self) -> usize {
        self.ids.len()
    }

    /// A row of the polling table the publisher acknowledged.
    fn delivered(&mut self, id: i64, ack: Ack) {
        self.ids.push(id);
        self.partitions.push(ack.partition);
        self.offsets.push(ack.offset);
    }

    /// The end of a transaction whose every message is acknowledged: the position to confirm
    /// now, unless rows wait to be marked first.
    fn committed(&mut self, end: Lsn) -> Option<Lsn> {
        self.acknowledged = self.acknowledged.max(end);
        if self.ids.is_empty() {
            self.advance()
        } else {
            None
        }
    }

    /// A keepalive at `wal_end` while nothing of ours is in flight or open: the position to
    /// confirm, unless acknowledged rows still wait to be marked.
    fn idle_at(&mut self, wal_end: Lsn) -> Option<Lsn> {
        if !self.ids.is_empty() {
            return None;
        }
        self.acknowledged = self.acknowledged.max(wal_end);
        self.advance()
    }

    /// The waiting rows were marked: the position to confirm, if it moved.
    fn marked(&mut self) -> Option<Lsn> {
        self.ids.clear();
        self.partitions.clear();
        self.offsets.clear();
        self.advance()
    }

    fn advance(&mut self) -> Option<Lsn> {
        (self.acknowledged > self.confirmed).then(|| {
            self.confirmed = self.acknowledged;
            self.confirmed
        })
    }

    /// Marks the waiting rows published, which lets the confirmable position move (it is
    /// confirmed with the next checkpoint).
    async fn flush(&mut self, conn: &mut AsyncPgConnection, patience: Duration) -> Result<()> {
        if !self.ids.is_empty() {
            super::table::mark_streamed(conn, &self.ids, &self.partitions, &self.offsets, patience)
                .await?;
        }
        self.marked();
        Ok(())
    }
}

/// The confirmed position, the recovery bound and the numbers given out, written once per
/// tick when they moved; the slot is confirmed only up to what was written (see
/// [`super::sequence`]).
#[derive(Default)]
struct Checkpoint {
    written: Lsn,
    /// What may be confirmed to the server (written, or idle past nothing numbered), and what
    /// was.
    confirmable: Lsn,
    confirmed: Lsn,
    /// (transaction-id horizon, WAL position) samples: the horizon holds as a recovery bound
    /// once the confirmed position is past the WAL position taken after it.
    samples: VecDeque<(String, Lsn)>,
    bound: Option<String>,
}

#[derive(QueryableByName)]
struct Horizon {
    #[diesel(sql_type = Text)]
    xid: String,
}

#[derive(QueryableByName)]
struct WalPosition {
    #[diesel(sql_type = Text)]
    lsn: String,
}

impl Checkpoint {
    /// `lsn` may be confirmed to the server.
    fn confirmable(&mut self, lsn: Lsn) {
        self.confirmable = self.confirmable.max(lsn);
    }

    /// Confirms to the server what may be, if it moved.
    fn confirm(&mut self, client: &ReplicationClient) {
        if self.confirmable > self.confirmed {
            self.confirmed = self.confirmable;
            client.update_applied_lsn(self.confirmed);
        }
    }

    /// Writes the checkpoint at `confirmed` (everything before it acknowledged and marked),
    /// with the numbers given to what it covers, in one transaction.
    async fn write(
        &mut self,
        conn: &mut AsyncPgConnection,
        slot_name: &str,
        confirmed: Lsn,
        sequencer: &mut Sequencer,
    ) -> Result<()> {
        // The horizon first, the position after it: a transaction that commits after the
        // position was taken was running (or not begun) when the horizon was.
        let horizon: Horizon =
            diesel::sql_query("SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xid")
                .get_result(conn)
                .await?;
        let position: WalPosition = diesel::sql_query("SELECT pg_current_wal_lsn()::text AS lsn")
            .get_result(conn)
            .await?;
        let lsn = Lsn::parse(&position.lsn)
            .map_err(|e| Error::Replication(format!("a WAL position {}: {e}", position.lsn)))?;
        self.samples.push_back((horizon.xid, lsn));
        while let Some((_, at)) = self.samples.front() {
            if *at > confirmed {
                break;
            }
            self.bound = self.samples.pop_front().map(|(xid, _)| xid);
        }
        // Bounded: a relay confirming nothing for long keeps only its latest samples' worth.
        while self.samples.len() > 3_600 {
            self.samples.pop_front();
        }
        if confirmed == self.written || confirmed == Lsn::ZERO {
            return Ok(());
        }
        let bound = self.bound.as_deref();
        conn.transaction::<_, Error, _>(async |tx| {
            sequencer.write(tx, confirmed).await?;
            slot::write_checkpoint(tx, slot_name, confirmed, bound).await
        })
        .await?;
        self.written = confirmed;
        self.confirmable(confirmed);
        Ok(())
    }
}

/// Publishes what was committed before a new slot, as its exported snapshot shows it: the
/// polling table's unpublished rows (marked published on `control` once acknowledged), then,
/// in id order, the rows of `ferrybox_messages` whose transaction id is at or above
/// `recover_from` (all of them without it); waits for every answer. A message refused for
/// good is kept in the polling table with its error, as on the stream; any other failure
/// ends this (the slot stays unready, and the next try starts again). The count published.
async fn publish_snapshot(
    url: &str,
    snapshot: &str,
    recover_from: Option<String>,
    shard: Shard,
    publisher: &dyn Publisher,
    control: &mut AsyncPgConnection,
) -> Result<u64> {
    let mut conn = crate::db::establish(url)
        .await
        .map_err(|e| Error::Pool(e.to_string()))?;
    conn.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
        snapshot.replace('\'', "''")
    ))
    .await?;
    let mut published = 0u64;
    // The shard's condition is made of numbers only.
    let polling = format!(
        "SELECT id, message_id, topic, message_key, message_type, entity_version, \
                occurred_at, headers, payload \
         FROM ferrybox_outbox WHERE published_at IS NULL AND id > $1 AND ({}) \
         ORDER BY id LIMIT $2",
        shard.condition()
    );
    let mut after = 0i64;
    loop {
        let rows: Vec<OutboxRecord> = diesel::sql_query(&polling)
            .bind::<BigInt, _>(after)
            .bind::<BigInt, _>(SNAPSHOT_BATCH)
            .load(&mut conn)
            .await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.id;
        let numbers = super::sequence::numbers_for(control, Origin::Outbox, &rows).await?;
        let results = send_all(publisher, &rows, Origin::Outbox, &numbers).await;
        let passing = results
            .iter()
            .zip(&rows)
            .find_map(|(result, row)| match result {
                Err(refusal) if !refusal.for_good => Some(not_published(row, refusal.clone())),
                _ => None,
            });
        let sent = super::table::Sent::of(publisher, &rows, results);
        super::table::mark_read(control, &sent.acked, &sent.partitions, &sent.offsets).await?;
        if !sent.failed.is_empty() {
            super::table::record_failures(control, &sent).await?;
        }
        published += u64::try_from(sent.acked.len()).unwrap_or(0);
        if let Some(e) = passing {
            publisher.recover()?;
            return Err(e);
        }
    }
    let appended = format!(
        "SELECT id, message_id, topic, message_key, message_type, entity_version, \
                occurred_at, headers, payload \
         FROM ferrybox_messages \
         WHERE id > $1 AND {} AND ({}) \
         ORDER BY id LIMIT $3",
        slot::since_bound("$2::text"),
        shard.condition()
    );
    let mut after = 0i64;
    loop {
        let rows: Vec<OutboxRecord> = diesel::sql_query(&appended)
            .bind::<BigInt, _>(after)
            .bind::<Nullable<Text>, _>(recover_from.as_deref())
            .bind::<BigInt, _>(SNAPSHOT_BATCH)
            .load(&mut conn)
            .await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.id;
        let numbers = super::sequence::numbers_for(control, Origin::Messages, &rows).await?;
        let results = send_all(publisher, &rows, Origin::Messages, &numbers).await;
        for (row, result) in rows.iter().zip(results) {
            super::publish::count_sent(publisher, row.topic(), result.is_ok());
            match result {
                Ok(_) => published += 1,
                Err(refusal) if refusal.for_good => {
                    refused(control, Origin::Messages, row, &refusal).await?;
                }
                Err(refusal) => {
                    publisher.recover()?;
                    return Err(not_published(row, refusal));
                }
            }
        }
    }
    conn.batch_execute("COMMIT").await?;
    Ok(published)
}

/// Publishes the polling table's unpublished rows, as the polling relay would.
async fn drain_table(
    publisher: &dyn Publisher,
    control: &mut AsyncPgConnection,
    config: &RelayConfig,
    only_refused: bool,
) -> Result<()> {
    let outcome =
        super::table::drain_table(publisher, control, config.batch_size, only_refused).await?;
    if outcome.published > 0 || outcome.failed > 0 {
        tracing::info!(
            published = outcome.published,
            failed = outcome.failed,
            "published the polling table's unpublished rows"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: u64) -> Lsn {
        Lsn::from(n)
    }

    fn ack(partition: i32, offset: i64) -> Ack {
        Ack {
            partition: Some(partition),
            offset: Some(offset),
        }
    }

    #[test]
    fn a_transaction_with_nothing_to_mark_is_confirmed_at_its_end() {
        let mut progress = Progress::default();
        assert_eq!(progress.committed(at(100)), Some(at(100)));
        assert_eq!(progress.committed(at(100)), None, "nothing new to confirm");
        assert_eq!(progress.committed(at(200)), Some(at(200)));
    }

    #[test]
    fn a_transaction_is_confirmed_only_once_its_rows_are_marked() {
        let mut progress = Progress::default();
        progress.delivered(1, ack(0, 10));
        assert_eq!(progress.committed(at(100)), None);
        progress.delivered(2, ack(0, 11));
        assert_eq!(progress.committed(at(200)), None);
        assert_eq!(progress.pending(), 2);
        assert_eq!(progress.marked(), Some(at(200)));
        assert_eq!(progress.pending(), 0);
        assert_eq!(progress.confirmed, at(200));
    }

    #[test]
    fn an_idle_keepalive_never_confirms_past_rows_waiting_to_be_marked() {
        // The fault test's lost rows: acknowledged, waiting for the tick's mark, and a
        // keepalive confirmed past them; a kill before the tick left them unmarked for good.
        let mut progress = Progress::default();
        progress.delivered(1, ack(0, 10));
        assert_eq!(progress.committed(at(100)), None);
        assert_eq!(progress.idle_at(at(500)), None);
        assert_eq!(progress.confirmed, Lsn::ZERO);
        assert_eq!(progress.marked(), Some(at(100)));
        assert_eq!(progress.idle_at(at(500)), Some(at(500)));
    }

    #[test]
    fn the_confirmed_position_never_moves_back() {
        let mut progress = Progress::default();
        assert_eq!(progress.idle_at(at(500)), Some(at(500)));
        assert_eq!(progress.committed(at(300)), None);
        assert_eq!(progress.idle_at(at(400)), None);
        assert_eq!(progress.confirmed, at(500));
    }
}
