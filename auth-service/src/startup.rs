//! Building and running the service: migrations, the consumer (Kafka or the pulled feed), the
//! reconciler and the HTTP server.

use std::net::SocketAddr;

use anyhow::Context;
use ferrybox::alert::Alerter;
use ferrybox::reconcile::Reconciler;
use ferrybox::{AvroCodec, CancellationToken, FeedConsumer, InboxConsumer, db};
use tokio::net::TcpListener;

use crate::cache::{UserCache, UserEvents};
use crate::config::{Settings, Transport};
use crate::routes::AppState;

/// The service's own tables.
pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("migrations");

/// How user events arrive.
enum Consumer {
    Kafka(InboxConsumer<UserEvents>),
    Feed(FeedConsumer<UserEvents>),
}

/// A built service, bound to its port, ready to run.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    consumer: Consumer,
    reconciler: Reconciler<UserCache>,
    vacuum_guard: ferrybox::vacuum::VacuumGuard,
    readiness: ferrybox::health::Readiness,
    max_body_bytes: usize,
}

/// Creates the service's tables and the framework's (inbox, dead letters) in its database.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    db::migrate_service(&db::pool(&settings.database)?, MIGRATIONS)
        .await
        .context("database migrations")
}

/// The reconciler of the user cache against user-service's snapshot.
pub fn reconciler(
    settings: &Settings,
    pool: db::PgPool,
    alerter: Alerter,
) -> anyhow::Result<Reconciler<UserCache>> {
    Ok(Reconciler::new(
        pool,
        UserCache,
        settings.inbox.consumer_name(),
        settings.reconcile.clone(),
        alerter,
    )?)
}

impl Application {
    /// Migrates the database, sets up the consumer for the configured transport (with Kafka,
    /// makes sure the topics exist) and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let pool = db::pool(&settings.database)?;
        db::migrate_service(&pool, MIGRATIONS)
            .await
            .context("database migrations")?;
        if let Err(e) = ferrybox::metrics::install() {
            tracing::warn!(error = %e, "metrics are off");
        }
        let readiness = ferrybox::health::Readiness::new(pool.clone());
        let readiness = match settings.transport {
            Transport::Kafka => readiness.with_broker(&settings.kafka)?,
            Transport::Feed => readiness.with_feed(&settings.feed.url, settings.feed.token.clone()),
        };
        let codec = AvroCodec::new(&settings.schema_registry_url);
        let contract = crate::events::CONTRACT
            .contract()
            .context("the service's contract")?;
        let readers = ferrybox::contract::ReaderSchemas::from_contract(&contract);
        let alerter = Alerter::new(&settings.alert)?;
        let consumer = match settings.transport {
            Transport::Kafka => {
                // The users topic is user-service's: it must exist (this service never creates
                // it with its own guess at the partitions). The dead-letter topic is this
                // service's own: created here (tansu, like a locked-down Kafka, does not create
                // topics on first use, and a dead letter that cannot be published holds the
                // offset).
                ferrybox::kafka::check_consumed(
                    &settings.kafka,
                    &[settings.users_topic.name.as_str()],
                    "user-service",
                )
                .await
                .context("the users topic")?;
                ferrybox::kafka::ensure_topics(&settings.kafka, &settings.own_topics())
                    .await
                    .context("topics")?;
                Consumer::Kafka(
                    InboxConsumer::new(
                        pool.clone(),
                        &settings.kafka,
                        codec,
                        UserEvents,
                        settings.inbox(),
                    )?
                    // The contract's `users` is this deployment's users topic.
                    .with_contract_as(&contract, &settings.users_topic.name)?
                    .with_alerter(alerter.clone()),
                )
            }
            Transport::Feed => Consumer::Feed(
                FeedConsumer::new(
                    pool.clone(),
                    codec,
                    UserEvents,
                    settings.inbox.clone(),
                    settings.feed.clone(),
                    alerter.clone(),
                )?
                .with_reader_schemas(readers),
            ),
        };
        let vacuum_guard = ferrybox::vacuum::VacuumGuard::new(
            settings.vacuum_guard.clone(),
            pool.clone(),
            alerter.clone(),
            "auth-service",
        )?;
        let reconciler = reconciler(&settings, pool.clone(), alerter)?;
        let state = AppState {
            dead_letters: ferrybox::inbox::DeadLetters::new(
                pool.clone(),
                settings.inbox.consumer_name(),
            ),
            pool,
            stats: match &consumer {
                Consumer::Kafka(c) => c.stats(),
                Consumer::Feed(c) => c.stats(),
            },
            reconcile: reconciler.last_report(),
            limiter: std::sync::Arc::new(crate::limits::LoginLimiter::new(settings.login_limits)),
            tokens: match &settings.token_secret {
                Some(secret) => ferrybox::token::TokenKey::new(secret, crate::login::TOKEN_ISSUER)?,
                None => {
                    tracing::warn!(
                        "token_secret is not set: session tokens use a random key, die with this process, and no other service can verify them"
                    );
                    ferrybox::token::TokenKey::ephemeral(crate::login::TOKEN_ISSUER)
                }
            },
            session_ttl: chrono::Duration::seconds(settings.session_ttl_secs),
        };
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("bind {}", settings.listen))?;
        Ok(Self {
            listener,
            state,
            consumer,
            reconciler,
            vacuum_guard,
            readiness,
            max_body_bytes: settings.max_body_bytes,
        })
    }

    /// The address the HTTP server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves HTTP, consumes and reconciles on schedule until `shutdown`, then drains all.
    ///
    /// The consumer and the reconciler are supervised ([`ferrybox::health::supervise`]): if
    /// either stops while the service serves (an error, a panic, a feed that halted on data it
    /// cannot apply), readiness answers 503 with the reason, the service drains, and this
    /// returns the error, so the process exits non-zero and is restarted.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        use ferrybox::health::supervise;
        let consumer = self.consumer;
        let consumer_shutdown = shutdown.child_token();
        let consumer_task = supervise("consumer", &self.readiness, &shutdown, async move {
            match consumer {
                Consumer::Kafka(c) => c.run(consumer_shutdown).await,
                Consumer::Feed(c) => c.run(consumer_shutdown).await,
            }
        });
        let reconciler = self.reconciler;
        let reconcile_shutdown = shutdown.child_token();
        let reconcile_task = supervise("reconciler", &self.readiness, &shutdown, async move {
            // It returns at once when reconciliation is off: that is not a stop.
            reconciler.run_on_schedule(reconcile_shutdown.clone()).await;
            reconcile_shutdown.cancelled().await;
            Ok(())
        });
        let guard = self.vacuum_guard;
        let guard_shutdown = shutdown.child_token();
        let guard_task = supervise("vacuum guard", &self.readiness, &shutdown, async move {
            guard.run(guard_shutdown).await
        });
        let app = crate::routes::router(self.state, &self.readiness, self.max_body_bytes);
        // Client addresses feed the login rate limit.
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown({
                let shutdown = shutdown.clone();
                async move { shutdown.cancelled().await }
            })
            .await;
        shutdown.cancel();
        let consumed = consumer_task.await.context("consumer task")?;
        let reconciled = reconcile_task.await.context("reconciler task")?;
        let guarded = guard_task.await.context("vacuum guard task")?;
        served.context("http server")?;
        consumed.context("consumer")?;
        reconciled.context("reconciler")?;
        guarded.context("vacuum guard")?;
        Ok(())
    }
}
