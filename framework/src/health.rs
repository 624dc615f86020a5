//! Liveness and readiness endpoints: `GET /health/live` answers while the process serves
//! HTTP; `GET /health/ready` answers 200 only when the service's dependencies answer (its
//! database and, as configured, the Kafka cluster or the producer's event feed), 503
//! otherwise, with each check's result:
//!
//! ```json
//! {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
//! ```
//!
//! A service's long-running loops (consumer, relay, reconciler) run under [`supervise`]: one
//! that ends while the service is serving (an error, a panic, a halt) turns readiness 503
//! with its reason and stops the service, so the process exits non-zero and its orchestrator
//! restarts it. Never a live process that no longer consumes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use diesel_async::RunQueryDsl;
use rdkafka::consumer::{BaseConsumer, Consumer};
use secrecy::SecretString;
use serde::Serialize;

use crate::config::{ClientKind, KafkaConfig};
use crate::db::{self, PgPool};
use crate::http::Json;

/// How long each check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/health/ready` checks.
#[derive(Clone)]
pub struct Readiness {
    pool: PgPool,
    broker: Option<Arc<BaseConsumer>>,
    feed: Option<Feed>,
    client: reqwest::Client,
    /// Supervised loops that stopped, with why.
    stopped: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

#[derive(Clone)]
struct Feed {
    url: String,
    token: Option<SecretString>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("broker", &self.broker.is_some())
            .field("feed", &self.feed.as_ref().map(|f| &f.url))
            .finish_non_exhaustive()
    }
}

/// The answer of `/health/ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReadinessReport {
    /// `ready` or `not_ready`.
    #[schema(value_type = String, example = "ready")]
    pub status: &'static str,
    /// Each check (`database`, `broker`, `feed`, and each loop that stopped): `ok` or what
    /// went wrong.
    #[schema(value_type = BTreeMap<String, String>)]
    pub checks: BTreeMap<&'static str, String>,
}

impl Readiness {
    /// Checks the database behind `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            broker: None,
            feed: None,
            client: reqwest::Client::builder()
                .timeout(CHECK_TIMEOUT)
                .build()
                .unwrap_or_default(),
            stopped: Arc::default(),
        }
    }

    /// Records that loop `name` stopped for `reason`: readiness fails from now on, with the
    /// reason as that check's result.
    pub fn loop_stopped(&self, name: &'static str, reason: impl Into<String>) {
        self.stopped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name, format!("stopped: {}", reason.into()));
    }

    /// Also checks that the Kafka cluster answers a metadata request (with an admin client:
    /// `settings` and `admin_settings`).
    pub fn with_broker(mut self, kafka: &KafkaConfig) -> crate::Result<Self> {
        let client: BaseConsumer = kafka.client_config(ClientKind::Admin).create()?;
        self.broker = Some(Arc::new(client));
        Ok(self)
    }

    /// Also checks that the producer's event feed at `url` answers (with `token`, if any).
    #[must_use]
    pub fn with_feed(mut self, url: &str, token: Option<SecretString>) -> Self {
        self.feed = Some(Feed {
            url: url.to_owned(),
            token,
        });
        self
    }

    /// `GET /health/live` and `GET /health/ready`. Merge it into the service's router, and
    /// give the whole router [`crate::http::json_errors`] so that its 405s are JSON too.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .with_state(self.clone())
    }

    /// Runs every check.
    pub async fn check(&self) -> ReadinessReport {
        let mut checks = BTreeMap::new();
        checks.insert("database", outcome(self.database().await));
        if let Some(broker) = &self.broker {
            let broker = Arc::clone(broker);
            let answered = tokio::task::spawn_blocking(move || {
                broker
                    .fetch_metadata(None, CHECK_TIMEOUT)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            checks.insert("broker", outcome(answered));
        }
        if let Some(feed) = &self.feed {
            checks.insert("feed", outcome(self.feed(feed).await));
        }
        checks.extend(
            self.stopped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .map(|(name, reason)| (*name, reason.clone())),
        );
        let ready = checks.values().all(|c| c == "ok");
        ReadinessReport {
            status: if ready { "ready" } else { "not_ready" },
            checks,
        }
    }

    async fn database(&self) -> Result<(), String> {
        let check = async {
            let mut conn = db::connection(&self.pool)
                .await
                .map_err(|e| e.to_string())?;
            diesel::sql_query("SELECT 1")
                .execute(&mut conn)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        tokio::time::timeout(CHECK_TIMEOUT, check)
            .await
            .map_err(|_| format!("no answer within {CHECK_TIMEOUT:?}"))?
    }

    async fn feed(&self, feed: &Feed) -> Result<(), String> {
        let url =
            crate::feed::page_url(&feed.url, 0, 1, Duration::ZERO).map_err(|e| e.to_string())?;
        let response = crate::http::get_with_token(&self.client, url, feed.token.as_ref())
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        match response.status() {
            // 410: the feed answers; only position 0 has expired.
            s if s.is_success() || s == StatusCode::GONE => Ok(()),
            s => Err(format!("the feed answered {s}")),
        }
    }
}

fn outcome(result: Result<(), String>) -> String {
    result.map_or_else(|e| e, |()| "ok".to_owned())
}

/// Liveness: the process answers (it says nothing of its dependencies).
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "health",
    responses((status = 200, description = "The process is up.", body = String, content_type = "text/plain", example = "ok"))
)]
async fn live() -> &'static str {
    "ok"
}

/// Readiness: the database, the broker and the producer's feed (where the service uses them)
/// answer, and no long-running loop has stopped.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "health",
    responses(
        (status = 200, description = "Every check is `ok`.", body = ReadinessReport),
        (status = 503, description = "A check failed; each says why.", body = ReadinessReport),
    )
)]
async fn ready(State(readiness): State<Readiness>) -> (StatusCode, Json<ReadinessReport>) {
    let report = readiness.check().await;
    let status = if report.status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}

/// The OpenAPI document of [`Readiness::router`] (see [`crate::openapi::health`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(live, ready))]
pub(crate) struct HealthApi;

/// Runs one of a service's long-running loops (`name`: `consumer`, `relay`, ...) as a task.
///
/// When it ends before `shutdown` (with an error, by panicking, or returning early) it is a
/// stopped service: readiness answers 503 with the reason, `shutdown` is cancelled so the
/// service drains, and the task's result is [`crate::Error::Task`] with the reason, for the
/// binary to exit non-zero. A loop that ends because of `shutdown` gives its own result.
pub fn supervise<F>(
    name: &'static str,
    readiness: &Readiness,
    shutdown: &tokio_util::sync::CancellationToken,
    work: F,
) -> tokio::task::JoinHandle<crate::Result<()>>
where
    F: std::future::Future<Output = crate::Result<()>> + Send + 'static,
{
    let readiness = readiness.clone();
    let shutdown = shutdown.clone();
    let task = tokio::spawn(work);
    tokio::spawn(async move {
        let outcome = task.await;
        let reason = match outcome {
            Ok(result) if shutdown.is_cancelled() => return result,
            Ok(Ok(())) => "it ended while the service was serving".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(e) if e.is_panic() => {
                format!("it panicked: {}", panic_text(e.into_panic().as_ref()))
            }
            Err(e) => format!("it was cancelled: {e}"),
        };
        tracing::error!(
            task = name,
            reason,
            "a service loop stopped; the service is not ready and stops"
        );
        readiness.loop_stopped(name, &reason);
        shutdown.cancel();
        Err(crate::Error::Task(format!("{name} stopped: {reason}")))
    })
}

/// The message a panic carried.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    fn readiness() -> Readiness {
        let config = crate::DatabaseConfig::new("postgres://postgres@127.0.0.1:1/none");
        Readiness::new(crate::db::pool(&config).unwrap())
    }

    #[tokio::test]
    async fn a_loop_that_ends_while_serving_fails_readiness_and_stops_the_service() {
        let readiness = readiness();
        let shutdown = CancellationToken::new();
        let ended = supervise("consumer", &readiness, &shutdown, async {
            Err(crate::Error::Config("boom".into()))
        })
        .await
        .unwrap();
        assert!(
            matches!(&ended, Err(crate::Error::Task(r)) if r.contains("boom")),
            "{ended:?}"
        );
        assert!(shutdown.is_cancelled());
        let report = readiness.check().await;
        assert_eq!(report.status, "not_ready");
        assert!(report.checks["consumer"].contains("boom"), "{report:?}");

        let panicked = supervise("relay", &readiness, &CancellationToken::new(), async {
            panic!("handler bug");
        })
        .await
        .unwrap();
        assert!(matches!(&panicked, Err(crate::Error::Task(r)) if r.contains("handler bug")));
        assert!(readiness.check().await.checks["relay"].contains("panicked"));
    }

    #[tokio::test]
    async fn a_loop_that_ends_on_shutdown_is_not_a_failure() {
        let readiness = readiness();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let ended = supervise("consumer", &readiness, &shutdown, async { Ok(()) })
            .await
            .unwrap();
        assert!(ended.is_ok());
        assert!(!readiness.check().await.checks.contains_key("consumer"));
    }
}
