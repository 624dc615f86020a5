//! The relay: publishes committed outbox rows to Kafka and marks them published only after the
//! broker acknowledged them.
//!
//! One relay is active per outbox (per shard of it, see [`super::reshard`]) at a time: an
//! instance becomes active by taking a PostgreSQL advisory lock on a connection it keeps, and
//! stays active while that connection lives. Other instances (in the same process or others)
//! wait on standby and take over within `standby_interval` when it dies; a killed process's
//! connection closes and its lock goes with it. Where the active relay learns of committed
//! rows is its mode: the write-ahead log (`log/`) or polling the table (`poll.rs`).

use diesel::prelude::*;
use diesel::sql_types::{Bool, Integer};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio_util::sync::CancellationToken;

use super::active::Active;
use super::log::shards::{self, Balance, Shard};
use super::publish::{FeedPublisher, KafkaPublisher, Publisher};
use super::settings::{RelayConfig, RelayMode};
use super::table::BatchOutcome;
use super::wake::sleep_or_shutdown;
use crate::config::{DatabaseConfig, KafkaConfig};
use crate::error::{Error, Result};

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

/// Publishes the outbox to Kafka. See the module documentation for the guarantees.
pub struct Relay {
    pub(super) database: DatabaseConfig,
    /// Kafka, or the feed only.
    pub(super) publisher: Box<dyn Publisher>,
    pub(super) config: RelayConfig,
    /// Messages this relay published (acknowledged) since it was made.
    pub(super) published: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("publisher", &self.publisher.name())
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
            publisher: Box::new(KafkaPublisher::new(kafka)?),
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
            publisher: Box::new(FeedPublisher),
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
                Err(e) => {
                    if self.back_off(e, &mut failures, None, &shutdown).await? {
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
            if let Err(e) = result
                && self
                    .back_off(e, &mut failures, Some(shard.index), stop)
                    .await?
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// After a failed attempt: a setup error is returned (the database must be changed
    /// first: the relay says what, and stops); any other is logged and waited out with the
    /// backoff. True when `stop` came meanwhile.
    async fn back_off(
        &self,
        e: Error,
        failures: &mut u32,
        shard: Option<u32>,
        stop: &CancellationToken,
    ) -> Result<bool> {
        if let Error::ReplicationSetup(_) = e {
            return Err(e);
        }
        *failures += 1;
        let delay = self.config.backoff.delay(*failures);
        tracing::warn!(error = %e, ?delay, ?shard, "relay lost its database connection; retrying");
        Ok(sleep_or_shutdown(delay, stop).await)
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

    /// Publishes one batch of unpublished rows, in id order: sends them all, awaits every
    /// delivery report, then marks the acknowledged rows published (with partition and offset)
    /// in one statement and records attempts and the error on the others.
    ///
    /// Call it from the active relay only (or in tests); [`Relay::run`] takes care of that.
    pub async fn publish_batch(&self, conn: &mut AsyncPgConnection) -> Result<BatchOutcome> {
        super::poll::publish_batch(&self.active(), conn).await
    }

    /// How many messages this relay has published (the broker acknowledged) since it was
    /// made, in either mode: for tools, benchmarks and tests that wait on the relay without
    /// reading the broker.
    pub fn published(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Publishes while this instance is the active relay for `shard`, from the source the
    /// mode resolves to on this database: the log (`log/`) or the table (`poll.rs`).
    async fn publish_as_active(
        &self,
        conn: &mut AsyncPgConnection,
        shard: Shard,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let mode = self.config.mode.resolve(conn).await?;
        let active = self.active();
        let publisher = self.publisher.name();
        match mode {
            RelayMode::Log => {
                tracing::info!(
                    shard = shard.index,
                    shards = shard.of,
                    publisher,
                    "relay is active (reading the write-ahead log)"
                );
                super::log::run(&active, shard, conn, shutdown).await
            }
            _ if shard.of > 1 => Err(Error::ReplicationSetup(format!(
                "the outbox is split into {} relay shards (`outbox reshard`), which only the log \
                 relay runs, and this relay polls the table (relay.mode {:?}): let it read the \
                 log, or run `outbox reshard 1`",
                shard.of, self.config.mode,
            ))),
            _ => {
                tracing::info!(publisher, "relay is active (polling the outbox table)");
                super::poll::run(&active, conn, shutdown).await
            }
        }
    }

    /// What this relay publishes with once active.
    fn active(&self) -> Active<'_> {
        Active {
            database: &self.database,
            config: &self.config,
            publisher: self.publisher.as_ref(),
            published: &self.published,
        }
    }

    async fn connect(&self) -> Result<AsyncPgConnection> {
        super::active::connect(&self.database).await
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
}

impl RelayMode {
    /// The mode this relay runs in on the database `conn` is connected to: `auto` becomes
    /// `log` or `table`; `log` fails with what to change when the database cannot serve it.
    /// Either mode publishes to Kafka or, without a broker, to the feed.
    pub async fn resolve(self, conn: &mut AsyncPgConnection) -> Result<Self> {
        match self {
            RelayMode::Table => Ok(RelayMode::Table),
            RelayMode::Log => {
                super::log::slot::check_setup(conn).await?;
                Ok(RelayMode::Log)
            }
            RelayMode::Auto => match super::log::slot::unsupported(conn).await? {
                None => Ok(RelayMode::Log),
                Some(reason) => {
                    tracing::info!(%reason, "the relay polls the outbox table: the database does not allow reading its log");
                    Ok(RelayMode::Table)
                }
            },
        }
    }
}
