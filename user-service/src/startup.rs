//! Building and running the service: migrations, topic, schemas, relay and HTTP server.

use std::net::SocketAddr;

use anyhow::Context;
use ferrybox::{AvroCodec, CancellationToken, FeedServer, Outbox, Relay, db};
use tokio::net::TcpListener;

use crate::config::Settings;
use crate::events::{UserDeleted, UserRegistered, UserSuspended, UserUpdated};
use crate::users::Users;

/// The service's own tables.
pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("migrations");

/// The CloudEvents source of every message this service publishes.
pub const SOURCE: &str = "user-service";

/// A built service, bound to its port, ready to run.
pub struct Application {
    listener: TcpListener,
    users: Users,
    relay: Relay,
    /// The pulled feed, unless `serve_feed` is off.
    feed: Option<FeedServer>,
    readiness: ferrybox::health::Readiness,
    /// Stops the feed's listener when the service stops.
    feed_stop: CancellationToken,
    vacuum_guard: ferrybox::vacuum::VacuumGuard,
    settings: Settings,
}

/// Creates the service's tables and the framework's (outbox) in its database.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    db::migrate_service(&db::pool(&settings.database)?, MIGRATIONS)
        .await
        .context("database migrations")
}

impl Application {
    /// Migrates the database, makes sure the topic exists, registers the event schemas (an
    /// incompatible one stops start-up here) and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let pool = db::pool(&settings.database)?;
        db::migrate_service(&pool, MIGRATIONS)
            .await
            .context("database migrations")?;
        ferrybox::kafka::ensure_topics(
            &settings.kafka,
            std::slice::from_ref(&settings.users_topic),
        )
        .await
        .context("users topic")?;
        let codec = AvroCodec::new(&settings.schema_registry_url);
        let topic = settings.users_topic.name.clone();
        let registering = "registering event schemas with the schema registry";
        codec
            .register::<UserRegistered>(&topic)
            .await
            .context(registering)?;
        codec
            .register::<UserUpdated>(&topic)
            .await
            .context(registering)?;
        codec
            .register::<UserSuspended>(&topic)
            .await
            .context(registering)?;
        codec
            .register::<UserDeleted>(&topic)
            .await
            .context(registering)?;
        if let Err(e) = ferrybox::metrics::install() {
            tracing::warn!(error = %e, "metrics are off");
        }
        let readiness =
            ferrybox::health::Readiness::new(pool.clone()).with_broker(&settings.kafka)?;
        let feed_stop = CancellationToken::new();
        // The feed's positions are given as the relay marks rows of the polling table, so a
        // service that serves it writes there; one that does not writes where its relay reads.
        let (feed, outbox) = if settings.serve_feed {
            let feed = FeedServer::start(
                pool.clone(),
                &settings.database,
                settings.feed.clone(),
                &feed_stop,
            )?;
            (Some(feed), Outbox::new(SOURCE))
        } else {
            let mut conn = db::connection(&pool).await?;
            let mode = settings
                .relay
                .mode
                .resolve(&mut conn)
                .await
                .context("relay mode")?;
            tracing::info!(
                ?mode,
                "no pulled feed: events are written for the relay's mode"
            );
            (None, Outbox::new(SOURCE).for_mode(mode))
        };
        let auth = crate::auth::Authenticator::new(
            settings.service_token.as_ref(),
            settings.token_secret.as_ref(),
            settings.open_registration,
        )?;
        let users = Users {
            auth: std::sync::Arc::new(auth),
            pool,
            outbox,
            codec,
            topic,
        };
        let relay = Relay::new(
            settings.database.clone(),
            &settings.kafka,
            settings.relay.clone(),
        )?;
        let vacuum_guard = ferrybox::vacuum::VacuumGuard::new(
            settings.vacuum_guard.clone(),
            users.pool.clone(),
            ferrybox::alert::Alerter::new(&settings.alert)?,
            "user-service",
        )?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("bind {}", settings.listen))?;
        Ok(Self {
            listener,
            users,
            relay,
            feed,
            readiness,
            feed_stop,
            vacuum_guard,
            settings,
        })
    }

    /// The address the HTTP server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves HTTP and runs the relay until `shutdown`, then drains both. The relay is
    /// supervised ([`ferrybox::health::supervise`]): if it stops while the service serves,
    /// readiness answers 503 with the reason, the service drains, and this returns the error.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let relay = self.relay;
        let relay_shutdown = shutdown.child_token();
        let relay_task =
            ferrybox::health::supervise("relay", &self.readiness, &shutdown, async move {
                relay.run(relay_shutdown).await
            });
        let guard = self.vacuum_guard;
        let guard_shutdown = shutdown.child_token();
        let guard_task =
            ferrybox::health::supervise("vacuum guard", &self.readiness, &shutdown, async move {
                guard.run(guard_shutdown).await
            });
        let app = crate::routes::router(
            self.users,
            self.feed.as_ref(),
            &self.readiness,
            self.settings.internal_token.as_ref(),
            self.settings.max_body_bytes,
        );
        let http = axum::serve(self.listener, app).with_graceful_shutdown({
            let shutdown = shutdown.clone();
            async move { shutdown.cancelled().await }
        });
        let served = http.await;
        // However the server ended, stop and drain the relay.
        shutdown.cancel();
        self.feed_stop.cancel();
        if let Some(feed) = &self.feed {
            feed.stopped().await;
        }
        let relayed = relay_task.await.context("relay task")?;
        let guarded = guard_task.await.context("vacuum guard task")?;
        served.context("http server")?;
        relayed.context("relay")?;
        guarded.context("vacuum guard")?;
        Ok(())
    }
}
