//! Building and running the service: migrations, topic, inbox consumer and HTTP server.

use std::net::SocketAddr;

use anyhow::Context;
use ferrybox::{AvroCodec, CancellationToken, InboxConsumer, db};
use tokio::net::TcpListener;

use crate::cache::UserEvents;
use crate::config::Settings;
use crate::routes::AppState;

/// The service's own tables.
pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("migrations");

/// A built service, bound to its port, ready to run.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    consumer: InboxConsumer<UserEvents>,
    max_body_bytes: usize,
}

/// Creates the service's tables and the framework's (inbox, dead letters) in its database.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    db::migrate_service(&db::pool(&settings.database)?, MIGRATIONS)
        .await
        .context("database migrations")
}

impl Application {
    /// Migrates the database, makes sure the topic exists, subscribes and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let pool = db::pool(&settings.database)?;
        db::migrate_service(&pool, MIGRATIONS)
            .await
            .context("database migrations")?;
        // The users topic and the dead-letter topic: tansu, like a locked-down Kafka, does not
        // create topics on first use, and a dead letter that cannot be published holds the offset.
        ferrybox::kafka::ensure_topics(&settings.kafka, &settings.topics())
            .await
            .context("topics")?;
        let codec = AvroCodec::new(&settings.schema_registry_url);
        let consumer = InboxConsumer::new(
            pool.clone(),
            &settings.kafka,
            codec,
            UserEvents,
            settings.inbox.clone(),
        )?;
        let state = AppState {
            dead_letters: ferrybox::inbox::DeadLetters::new(
                pool.clone(),
                settings.inbox.consumer_name(),
            ),
            pool,
            stats: consumer.stats(),
            session_ttl: chrono::Duration::seconds(settings.session_ttl_secs),
        };
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("bind {}", settings.listen))?;
        Ok(Self {
            listener,
            state,
            consumer,
            max_body_bytes: settings.max_body_bytes,
        })
    }

    /// The address the HTTP server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves HTTP and consumes until `shutdown`, then drains both.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let consumer_task = tokio::spawn(self.consumer.run(shutdown.child_token()));
        let app = crate::routes::router(self.state, self.max_body_bytes);
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown({
                let shutdown = shutdown.clone();
                async move { shutdown.cancelled().await }
            })
            .await;
        shutdown.cancel();
        let consumed = consumer_task.await.context("inbox consumer task")?;
        served.context("http server")?;
        consumed.context("inbox consumer")?;
        Ok(())
    }
}
