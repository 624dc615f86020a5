//! A consumer process for the crash tests: an inbox consumer whose handler appends each
//! application to the `applied` table. Configured by `WORKER_DATABASE_URL`, `WORKER_TOPIC` and
//! `WORKER_GROUP` (and optionally `WORKER_NAME`); stops cleanly on SIGTERM; prints `ready` once consuming.
//! With `WORKER_FEED_URL` it pulls that event feed instead of Kafka; `WORKER_HANDLER_DELAY_MS`
//! slows each batch down (so a kill lands inside one).

use diesel::sql_types::{Array, BigInt, Text, Uuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ferrybox::alert::Alerter;
use ferrybox::feed::FeedConfig;
use ferrybox::inbox::{Handler, HandlerError, ReceivedMessage};
use ferrybox::{
    AvroCodec, DatabaseConfig, FeedConsumer, InboxConfig, InboxConsumer, KafkaConfig, db,
};
use ferrybox_e2e::Tick;

/// Appends each application to `applied`, with the worker's name.
struct Append {
    worker: String,
    delay: std::time::Duration,
}

impl Handler for Append {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        message: &ReceivedMessage,
    ) -> Result<(), HandlerError> {
        self.handle_batch(conn, &[message]).await
    }

    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        messages: &[&ReceivedMessage],
    ) -> Result<(), HandlerError> {
        let mut ids = Vec::with_capacity(messages.len());
        let mut keys = Vec::with_capacity(messages.len());
        let mut versions = Vec::with_capacity(messages.len());
        for m in messages {
            let tick: Tick = m.body()?;
            ids.push(m.envelope.id.0);
            keys.push(tick.key);
            versions.push(tick.version);
        }
        diesel::sql_query(
            "INSERT INTO applied (message_id, key, version, worker) \
             SELECT *, $4 FROM unnest($1::uuid[], $2::text[], $3::bigint[])",
        )
        .bind::<Array<Uuid>, _>(ids)
        .bind::<Array<Text>, _>(keys)
        .bind::<Array<BigInt>, _>(versions)
        .bind::<Text, _>(&self.worker)
        .execute(conn)
        .await?;
        tokio::time::sleep(self.delay).await;
        Ok(())
    }
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferrybox::telemetry::init_logging(false);
    let shutdown = ferrybox::shutdown::on_signals();
    let pool = db::pool(&DatabaseConfig::new(env("WORKER_DATABASE_URL")?))?;
    let delay = std::time::Duration::from_millis(
        std::env::var("WORKER_HANDLER_DELAY_MS").map_or(Ok(0), |v| v.parse())?,
    );
    let mut kafka = KafkaConfig::new(env("WORKER_BOOTSTRAP_SERVERS")?);
    // A killed member never says goodbye: let the group notice within seconds.
    kafka
        .consumer_settings
        .insert("session.timeout.ms".into(), "6000".into());
    if let Ok(debug) = std::env::var("WORKER_KAFKA_DEBUG") {
        kafka.settings.insert("debug".into(), debug);
    }
    let config = InboxConfig {
        group_id: env("WORKER_GROUP")?,
        topics: vec![env("WORKER_TOPIC")?],
        batch_size: 50,
        ..InboxConfig::default()
    };
    let codec = AvroCodec::new(&env("WORKER_REGISTRY_URL")?);
    let worker = std::env::var("WORKER_NAME").unwrap_or_else(|_| "worker".into());
    let handler = Append { worker, delay };
    if let Ok(url) = std::env::var("WORKER_FEED_URL") {
        let feed = FeedConfig {
            url,
            name: "crash-test".into(),
            limit: 50,
            ..FeedConfig::default()
        };
        let consumer = FeedConsumer::new(pool, codec, handler, config, feed, Alerter::log_only())?;
        println!("ready");
        consumer.run(shutdown).await?;
        return Ok(());
    }
    let consumer = InboxConsumer::new(pool, &kafka, codec, handler, config)?;
    println!("ready");
    consumer.run(shutdown).await?;
    Ok(())
}
