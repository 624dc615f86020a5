//! The relay: publishes committed outbox rows to Kafka and marks them published only after the
//! broker acknowledged them.
//!
//! One relay is active per outbox at a time: an instance becomes active by taking a PostgreSQL
//! advisory lock on a connection it keeps, and stays active while that connection lives. Other
//! instances (in the same process or others) wait on standby and take over within
//! `standby_interval` when it dies; a killed process's connection closes and its lock goes with
//! it. A row is marked published only after the broker acknowledged it (true whichever
//! connection writes it): the active relay records one batch on a second connection while it
//! sends the next, except after a failed batch, which is recorded before anything else is sent.
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

use std::collections::BTreeMap;
use std::sync::Arc;

use diesel::prelude::*;
use diesel::sql_types::{Bool, Integer};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use rdkafka::producer::FutureProducer;
use secrecy::ExposeSecret;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::enqueue::{NOTIFY_CHANNEL, RELAY_WAITING_LOCK};
use super::log::shards::{self, Balance, Shard};
use super::publish::KafkaPublisher;
use super::record::{OutboxRecord, send_all};
use super::schema::ferrybox_outbox;
use super::sent_log;
use super::settings::{RelayConfig, RelayMode};
use super::table::{
    BACKLOG_GAUGE_INTERVAL, BatchOutcome, Sent, mark_read, record_backlog, record_failures,
};
use super::wake::{listen, sleep_or_shutdown};
use crate::config::{DatabaseConfig, KafkaConfig};
use crate::error::{Error, Result};

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

/// Publishes the outbox to Kafka. See the module documentation for the guarantees.
pub struct Relay {
    database: DatabaseConfig,
    /// `None` for a feed-only relay.
    kafka: Option<KafkaPublisher>,
    config: RelayConfig,
    /// Messages this relay published (acknowledged) since it was made.
    published: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay for the outbox in `database`, publishing with a durable producer.
    pub fn new(database: DatabaseConfig, kafka: &KafkaConfig, config: RelayConfig) -> Result<Self> {
        database.validate()?;
        kafka.validate()?;
        config.validate()?;
        Ok(Self {
            database,
            kafka: Some(KafkaPublisher::new(kafka)?),
            config,
            published: tokio::sync::watch::Sender::new(0),
        })
    }

    /// A relay for a service without a broker: it records committed rows in the sent log and
    /// gives them their [feed](crate::feed) positions, with the same ordering, leadership and
    /// retention as a Kafka relay, and sends them nowhere.
    pub fn feed_only(database: DatabaseConfig, config: RelayConfig) -> Result<Self> {
        database.validate()?;
        config.validate()?;
        Ok(Self {
            database,
            kafka: None,
            config,
            published: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Runs until `shutdown` is cancelled: waits to become the active relay, then publishes
    /// batch after batch and keeps the sent log within its retention. A batch in flight when
    /// shutdown comes is finished (its delivery reports awaited and recorded) before this
    /// returns.
    ///
    /// An outbox split into shards ([`crate::outbox::reshard`]) runs a worker per shard: this
    /// instance takes at most its fair share of them (the shards divided by the running
    /// instances, rounded up), and lets one go when it holds more.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            match self.run_layout(&shutdown).await {
                // Shutdown, or the layout changed: run the new one.
                Ok(()) => failures = 0,
                // The database must be changed first: say what, and stop.
                Err(e @ Error::ReplicationSetup(_)) => return Err(e),
                Err(e) => {
                    failures += 1;
                    let delay = self.config.backoff.delay(failures);
                    tracing::warn!(error = %e, ?delay, "relay lost its database connection; retrying");
                    if sleep_or_shutdown(delay, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs the recorded layout's shards until shutdown or until the layout changes.
    async fn run_layout(&self, shutdown: &CancellationToken) -> Result<()> {
        let mut conn = self.connect().await?;
        shards::register(&mut conn).await?;
        let layout = shards::layout(&mut conn).await?;
        if let Some(to) = layout.resharding_to {
            tracing::info!(to, "the outbox is being resharded; waiting");
            sleep_or_shutdown(self.config.standby_interval, shutdown).await;
            return Ok(());
        }
        let instances = shards::live_instances(&mut conn).await?;
        let balance = Balance::new(shards::fair_share(layout.shards, instances));
        let stop = shutdown.child_token();
        let workers = futures::future::join_all(Shard::all(layout.shards).map(|shard| {
            let (balance, stop) = (&balance, &stop);
            async move {
                let worked = self.run_shard(shard, balance, stop).await;
                if worked.is_err() {
                    stop.cancel();
                }
                worked
            }
        }));
        let watch = async {
            let watched = self.watch_layout(&mut conn, layout, &balance, &stop).await;
            stop.cancel();
            watched
        };
        let (worked, watched) = tokio::join!(workers, watch);
        worked.into_iter().collect::<Result<Vec<()>>>()?;
        watched
    }

    /// Until `stop`: ends when the recorded layout is no longer `layout`, and keeps this
    /// instance's share of the shards fair as instances come and go.
    async fn watch_layout(
        &self,
        conn: &mut AsyncPgConnection,
        layout: shards::Layout,
        balance: &Balance,
        stop: &CancellationToken,
    ) -> Result<()> {
        loop {
            if sleep_or_shutdown(self.config.standby_interval, stop).await {
                return Ok(());
            }
            let now = shards::layout(conn).await?;
            if now != layout {
                tracing::info!(
                    shards = now.shards,
                    resharding_to = now.resharding_to,
                    "the outbox's relay layout changed; letting go of its shards"
                );
                return Ok(());
            }
            let instances = shards::live_instances(conn).await?;
            balance.set_share(shards::fair_share(layout.shards, instances));
            balance.shed();
        }
    }

    /// One shard's worker: waits to hold the shard (within this instance's share), publishes
    /// it until `stop` or until asked to let go, and starts again after errors.
    async fn run_shard(
        &self,
        shard: Shard,
        balance: &Balance,
        stop: &CancellationToken,
    ) -> Result<()> {
        let mut failures = 0u32;
        while !stop.is_cancelled() {
            let result = match self.become_active(shard, balance, stop).await {
                Ok(Some(mut conn)) => {
                    failures = 0;
                    let release = balance.took(shard.index, stop);
                    let published = self.publish_as_active(&mut conn, shard, &release).await;
                    balance.let_go(shard.index);
                    // Closing the connection lets the shard's lock go.
                    drop(conn);
                    if published.is_ok()
                        && release.is_cancelled()
                        && !stop.is_cancelled()
                        && sleep_or_shutdown(self.config.standby_interval * 2, stop).await
                    {
                        // Let go for balance: another instance takes it meanwhile.
                        return Ok(());
                    }
                    published
                }
                Ok(None) => return Ok(()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {}
                Err(e @ Error::ReplicationSetup(_)) => return Err(e),
                Err(e) => {
                    failures += 1;
                    let delay = self.config.backoff.delay(failures);
                    tracing::warn!(error = %e, ?delay, shard = shard.index,
                        "relay lost its database connection; retrying");
                    if sleep_or_shutdown(delay, stop).await {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// How many messages this relay has published (the broker acknowledged) since it was
    /// made, in either mode: for tools, benchmarks and tests that wait on the relay without
    /// reading the broker.
    pub fn published(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Publishes while this instance is the active relay, from the log or the table as the
    /// mode resolves on this database.
    async fn publish_as_active(
        &self,
        conn: &mut AsyncPgConnection,
        shard: Shard,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let mode = self.config.mode.resolve(conn, self.kafka.is_some()).await?;
        match (mode, &self.kafka) {
            (RelayMode::Log, Some(kafka)) => {
                tracing::info!(
                    shard = shard.index,
                    shards = shard.of,
                    "relay is active (reading the write-ahead log)"
                );
                super::log::run(
                    self.database.url.expose_secret(),
                    &self.config,
                    shard,
                    kafka,
                    &self.published,
                    conn,
                    shutdown,
                )
                .await
            }
            _ if shard.of > 1 => Err(Error::ReplicationSetup(format!(
                "the outbox is split into {} relay shards (`outbox reshard`), which only the log \
                 relay runs, and this relay polls the table (relay.mode {:?}{}): let it read the \
                 log, or run `outbox reshard 1`",
                shard.of,
                self.config.mode,
                if self.kafka.is_none() {
                    ", no broker"
                } else {
                    ""
                }
            ))),
            _ => {
                tracing::info!("relay is active (polling the outbox table)");
                self.publish_until_shutdown(conn, shutdown).await
            }
        }
    }

    /// A connection of the relay's own, named so operators can see in `pg_stat_activity`
    /// which process holds the relay lock.
    async fn connect(&self) -> Result<AsyncPgConnection> {
        let mut conn = crate::db::establish(self.database.url.expose_secret())
            .await
            .map_err(|e| Error::Pool(e.to_string()))?;
        conn.batch_execute(&format!(
            "SET application_name = 'ferrybox relay (pid {})'",
            std::process::id()
        ))
        .await?;
        Ok(conn)
    }

    /// Opens a dedicated connection and holds `shard`'s lock on it, once this instance may
    /// take one more shard and while the layout is still the shard's; `None` on shutdown.
    async fn become_active(
        &self,
        shard: Shard,
        balance: &Balance,
        shutdown: &CancellationToken,
    ) -> Result<Option<AsyncPgConnection>> {
        let mut conn = self.connect().await?;
        let (class, object) = shard.lock();
        loop {
            if balance.may_take() {
                let got: Locked =
                    diesel::sql_query("SELECT pg_try_advisory_lock($1, $2) AS locked")
                        .bind::<Integer, _>(class)
                        .bind::<Integer, _>(object)
                        .get_result(&mut conn)
                        .await?;
                if got.locked {
                    // Under the lock: a reshard that finished meanwhile made this shard
                    // another layout's.
                    let layout = shards::layout(&mut conn).await?;
                    if layout.shards == shard.of && layout.resharding_to.is_none() {
                        return Ok(Some(conn));
                    }
                    diesel::sql_query("SELECT pg_advisory_unlock($1, $2)")
                        .bind::<Integer, _>(class)
                        .bind::<Integer, _>(object)
                        .execute(&mut conn)
                        .await?;
                }
                tracing::debug!(shard = shard.index, "another relay is active; standing by");
            }
            if sleep_or_shutdown(self.config.standby_interval, shutdown).await {
                return Ok(None);
            }
        }
    }

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
        let mut next_gauges = tokio::time::Instant::now();
        let mut failed_batches = 0u32;
        // A batch sent and acknowledged (or failed) but not recorded yet.
        let mut sent = Sent::default();
        // Holding the waiting lock: writers notify.
        let mut waiting = false;
        while !shutdown.is_cancelled() {
            if tokio::time::Instant::now() >= next_cleanup && self.clean_some(conn).await? {
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

    /// Retention in short statements between batches, so publishing never waits long: at most
    /// one publishing batch's worth of rows per pass (enough to keep up with expiry while the
    /// relay publishes at full speed). True when nothing expired is left.
    async fn clean_some(&self, conn: &mut AsyncPgConnection) -> Result<bool> {
        let batch = sent_log::CLEANUP_BATCH;
        let statements = self.config.batch_size / batch + 1;
        let mut deleted = 0;
        for _ in 0..statements {
            let went = sent_log::delete_expired_batch(conn, self.config.retention, batch).await?;
            deleted += went;
            if went < u64::try_from(batch).unwrap_or(0) {
                tracing::debug!(deleted, "sent log: expired rows deleted");
                return Ok(true);
            }
        }
        tracing::debug!(deleted, "sent log: expired rows deleted; more to go");
        Ok(false)
    }

    /// Publishes batches until the outbox has no unpublished row left or a batch fails;
    /// returns the totals. For tools and tests; [`Relay::run`] is what services use.
    pub async fn publish_pending(&self, conn: &mut AsyncPgConnection) -> Result<BatchOutcome> {
        let mut total = BatchOutcome::default();
        loop {
            let outcome = self.publish_batch(conn).await?;
            total.published += outcome.published;
            total.failed += outcome.failed;
            if outcome.published == 0 || outcome.failed > 0 {
                return Ok(total);
            }
        }
    }

    fn producer(&self) -> Option<FutureProducer> {
        self.kafka.as_ref().map(KafkaPublisher::producer)
    }

    /// Publishes one batch of unpublished rows, in id order: sends them all, awaits every
    /// delivery report, then marks the acknowledged rows published (with partition and offset)
    /// in one statement and records attempts and the error on the others.
    ///
    /// Call it from the active relay only (or in tests); [`Relay::run`] takes care of that.
    pub async fn publish_batch(&self, conn: &mut AsyncPgConnection) -> Result<BatchOutcome> {
        let sent = self.send_batch(conn, &[]).await?;
        self.record(conn, &sent).await
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
        let Some(producer) = self.producer() else {
            return Ok(Sent {
                acked: rows.iter().map(|row| row.id).collect(),
                partitions: vec![None; rows.len()],
                offsets: vec![None; rows.len()],
                ..Sent::default()
            });
        };
        let results = if crate::telemetry::tracing_enabled() {
            let headers: Vec<BTreeMap<String, String>> =
                rows.iter().map(OutboxRecord::headers).collect();
            let span = crate::telemetry::batch_span("publish", "producer", &headers);
            tracing::Instrument::instrument(send_all(&producer, &rows), span).await
        } else {
            send_all(&producer, &rows).await
        };
        if let Some(m) = crate::metrics::instruments() {
            record_sent(m, &rows, &results);
        }
        let sent = Sent::of(&rows, results);
        if !sent.failed.is_empty()
            && let Some(kafka) = &self.kafka
        {
            kafka.renew(&producer)?;
        }
        Ok(sent)
    }

    /// Marks the acknowledged rows published (with partition, offset and feed position) and
    /// records attempts and the error on the others, one statement each.
    async fn record(&self, conn: &mut AsyncPgConnection, sent: &Sent) -> Result<BatchOutcome> {
        self.published
            .send_modify(|n| *n += u64::try_from(sent.acked.len()).unwrap_or(0));
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

/// Counts a batch's sends per topic, acknowledged and refused.
fn record_sent(
    m: &crate::metrics::Instruments,
    rows: &[OutboxRecord],
    results: &[std::result::Result<(i32, i64), String>],
) {
    let mut counts: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (row, result) in rows.iter().zip(results) {
        let c = counts.entry(row.topic.as_str()).or_default();
        if result.is_ok() {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    for (topic, (acked, refused)) in counts {
        let attrs = crate::metrics::kafka_attrs(topic);
        m.sent.add(acked, &attrs);
        if refused > 0 {
            let mut failed = attrs.to_vec();
            failed.push(opentelemetry::KeyValue::new(
                "error.type",
                "delivery_failed",
            ));
            m.sent.add(refused, &failed);
        }
    }
}
