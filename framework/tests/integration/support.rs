use std::time::Duration;

use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, RunQueryDsl};
use ferrybox::testing::{self, TestDatabase};
use ferrybox::{AvroCodec, CancellationToken, Event, Outbox, OutgoingMessage, Relay, RelayConfig};
use serde::{Deserialize, Serialize};

/// Tests every relay mode passes, each run once per mode (as one suite is run against every
/// backend): `in_every_mode!(name, ...)` runs `async fn name(mode: RelayMode)` as
/// `name::polling_the_table` and `name::reading_the_log`.
macro_rules! in_every_mode {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread")]
            async fn polling_the_table() {
                super::$name(ferrybox::RelayMode::Table).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn reading_the_log() {
                super::$name(ferrybox::RelayMode::Log).await;
            }
        }
    )*};
}

pub(crate) const TIMEOUT: Duration = Duration::from_secs(60);

/// A small event for tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ThingChanged {
    pub(crate) thing_id: String,
    pub(crate) version: i64,
    pub(crate) label: String,
}

impl Event for ThingChanged {
    const MESSAGE_TYPE: &'static str = "com.ferrybox.test.ThingChanged";
    const SCHEMA: &'static str = r#"{"type":"record","name":"ThingChanged","namespace":"com.ferrybox.test",
        "fields":[{"name":"thing_id","type":"string"},{"name":"version","type":"long"},{"name":"label","type":"string"}]}"#;
    fn key(&self) -> String {
        self.thing_id.clone()
    }
    fn entity_version(&self) -> i64 {
        self.version
    }
}

/// A database with the framework's tables and a business table `things`, a topic, a codec.
pub(crate) struct Fixture {
    pub(crate) db: TestDatabase,
    pub(crate) pool: ferrybox::db::PgPool,
    pub(crate) topic: String,
    pub(crate) codec: AvroCodec,
    pub(crate) outbox: Outbox,
}

impl Fixture {
    pub(crate) async fn new(partitions: i32) -> Self {
        Self::on(TestDatabase::with_framework_tables().await, partitions).await
    }

    /// The same in a database with the framework's tables that the test made itself.
    pub(crate) async fn on(
        (db, pool): (TestDatabase, ferrybox::db::PgPool),
        partitions: i32,
    ) -> Self {
        let mut conn = ferrybox::db::connection(&pool).await.unwrap();
        diesel::sql_query("CREATE TABLE things (id TEXT PRIMARY KEY, label TEXT NOT NULL)")
            .execute(&mut *conn)
            .await
            .unwrap();
        diesel::sql_query(
            "CREATE TABLE applied (message_id UUID PRIMARY KEY, thing_id TEXT NOT NULL, version BIGINT NOT NULL, seq BIGSERIAL)",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        let topic = testing::create_topic(partitions).await;
        let codec = AvroCodec::new(&testing::registry_url());
        codec.register::<ThingChanged>(&topic).await.unwrap();
        Self {
            db,
            pool,
            topic,
            codec,
            outbox: Outbox::new("integration-test"),
        }
    }

    /// The event of `thing_id` at `version` on the fixture's topic (label `v{version}`).
    pub(crate) async fn message(&self, thing_id: &str, version: i64) -> OutgoingMessage {
        let event = ThingChanged {
            thing_id: thing_id.into(),
            version,
            label: format!("v{version}"),
        };
        self.codec.message(&self.topic, &event).await.unwrap()
    }

    /// Commits one business change and its event.
    pub(crate) async fn change(&self, thing_id: &str, version: i64) -> ferrybox::MessageId {
        self.change_labelled(thing_id, version, &format!("v{version}"))
            .await
    }

    /// The same with the label `label` (a large one makes a message the broker refuses).
    pub(crate) async fn change_labelled(
        &self,
        thing_id: &str,
        version: i64,
        label: &str,
    ) -> ferrybox::MessageId {
        let event = ThingChanged {
            thing_id: thing_id.into(),
            version,
            label: label.to_owned(),
        };
        let message = self.codec.message(&self.topic, &event).await.unwrap();
        let mut conn = ferrybox::db::connection(&self.pool).await.unwrap();
        let outbox = self.outbox.clone();
        let id = message.id;
        conn.transaction::<_, ferrybox::Error, _>(async |tx| {
            diesel::sql_query(
                "INSERT INTO things (id, label) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET label = EXCLUDED.label",
            )
            .bind::<Text, _>(thing_id)
            .bind::<Text, _>(label)
            .execute(tx)
            .await?;
            outbox.enqueue(tx, &message).await
        })
        .await
        .unwrap();
        id
    }

    /// The relay's defaults (the log relay where the database allows it), polling fast.
    pub(crate) fn relay_config() -> RelayConfig {
        RelayConfig {
            poll_interval: Duration::from_millis(20),
            ..RelayConfig::default()
        }
    }

    /// [`Fixture::relay_config`] in one mode: for tests of one mode's own mechanics, and the
    /// tests every mode must pass.
    pub(crate) fn relay_config_in(mode: ferrybox::RelayMode) -> RelayConfig {
        RelayConfig {
            mode,
            ..Self::relay_config()
        }
    }

    pub(crate) async fn count(&self, sql: &str) -> i64 {
        testing::count(self.db.url(), sql).await
    }

    /// This fixture writing as a service does for relay mode `mode`: the append-only table
    /// for the log relay, the polling table otherwise.
    pub(crate) fn writing_for(mut self, mode: ferrybox::RelayMode) -> Self {
        self.outbox = self.outbox.for_mode(mode);
        self
    }

    /// A number that grows as the relay makes progress, whatever its mode: rows marked
    /// published (polling), or the bytes of WAL its slot has confirmed (log).
    pub(crate) async fn progress(&self) -> i64 {
        if self.outbox.writes_for_log() {
            self.count(
                "SELECT coalesce((SELECT (confirmed_flush_lsn - '0/0')::bigint \
                 FROM pg_replication_slots WHERE database = current_database()), 0) AS n",
            )
            .await
        } else {
            self.published().await
        }
    }

    /// Outbox rows marked published.
    pub(crate) async fn published(&self) -> i64 {
        self.count("SELECT count(*) AS n FROM ferrybox_outbox WHERE published_at IS NOT NULL")
            .await
    }
}

/// A relay running in the background (`Relay::run`) until stopped.
pub(crate) struct RunningRelay {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<ferrybox::Result<()>>,
}

impl RunningRelay {
    pub(crate) fn start(relay: Relay) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { relay.run(stop).await }
        });
        Self { stop, task }
    }

    /// Kills it: its task is dropped where it stands, its connections closed, as when its
    /// process dies.
    pub(crate) fn kill(self) {
        self.task.abort();
    }

    /// Fails the test with the relay's error if it has stopped on its own.
    pub(crate) async fn assert_running(&mut self) {
        if self.task.is_finished() {
            let ended = (&mut self.task).await.unwrap();
            panic!("the relay stopped on its own: {ended:?}");
        }
    }

    /// Cancels it and waits for it to drain; it must end without error.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Reads `n` records from the start of `topic` with a plain consumer: (partition, offset, ce_id).
pub(crate) async fn read_records(topic: &str, n: usize) -> Vec<(i32, i64, String)> {
    testing::read_topic(topic, n, TIMEOUT)
        .await
        .into_iter()
        .map(|r| {
            (
                r.partition,
                r.offset,
                r.headers.get("ce_id").cloned().unwrap_or_default(),
            )
        })
        .collect()
}

/// A log relay on `fx`'s database with the test defaults, standing by 50 ms at a time.
pub(crate) fn log_relay(fx: &Fixture) -> ferrybox::Relay {
    ferrybox::Relay::new(
        fx.db.config(),
        &testing::kafka(),
        RelayConfig {
            standby_interval: Duration::from_millis(50),
            ..Fixture::relay_config_in(ferrybox::RelayMode::Log)
        },
    )
    .unwrap()
}
