//! Liveness and readiness endpoints: `GET /health/live` answers while the process serves
//! HTTP; `GET /health/ready` answers 200 only when the service's dependencies answer (its
//! database and, as configured, the Kafka cluster or the producer's event feed), 503
//! otherwise, with each check's result:
//!
//! ```json
//! {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadinessReport {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// Each check: `ok` or what went wrong.
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
        }
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

    /// `GET /health/live` and `GET /health/ready`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/health/live", get(|| async { "ok" }))
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

async fn ready(State(readiness): State<Readiness>) -> (StatusCode, Json<ReadinessReport>) {
    let report = readiness.check().await;
    let status = if report.status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}
