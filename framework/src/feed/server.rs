//! The producer's side of the feed: an `events` endpoint over the sent log.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use base64::Engine;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{FeedEvent, FeedPage, NOTIFY_CHANNEL};
use crate::config::{Backoff, DatabaseConfig, duration_ms};
use crate::db::{self, PgPool};
use crate::error::{Error, Result};
use crate::http::{ApiError, Json};
use crate::outbox::schema::ferrybox_outbox as outbox;

/// Limits of the `events` endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedServerConfig {
    /// Events per page when the request names no limit.
    pub default_limit: i64,
    /// The most events one page may hold.
    pub max_limit: i64,
    /// The longest a request may wait for new events.
    #[serde(with = "duration_ms", rename = "max_wait_ms")]
    pub max_wait: Duration,
    /// How often a waiting request looks again when no notification came (the fallback).
    #[serde(with = "duration_ms", rename = "poll_interval_ms")]
    pub poll_interval: Duration,
}

impl Default for FeedServerConfig {
    fn default() -> Self {
        Self {
            default_limit: 500,
            max_limit: 5_000,
            max_wait: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
        }
    }
}

impl FeedServerConfig {
    /// Checks the limits make sense.
    pub fn validate(&self) -> Result<()> {
        if self.default_limit < 1 || self.max_limit < self.default_limit {
            return Err(Error::Config(
                "feed: default_limit must be at least 1 and at most max_limit".into(),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::Config(
                "feed.poll_interval_ms must be above zero".into(),
            ));
        }
        Ok(())
    }
}

/// Serves the sent log as a feed. Clone it freely; clones share one listener.
#[derive(Clone)]
pub struct FeedServer {
    pool: PgPool,
    /// Woken (all waiters) when the relay gives out new positions.
    new_events: Arc<Notify>,
    config: FeedServerConfig,
    /// The notification listener, stopped by the `shutdown` given to [`FeedServer::start`].
    tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for FeedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// `GET /events` parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// The position to read after (0, the default, reads from the start).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// At most this many events (the server's `default_limit` when absent, up to its
    /// `max_limit`).
    #[param(minimum = 1)]
    limit: Option<i64>,
    /// How long to wait for the first event when there is none yet, in milliseconds (at most
    /// the server's `max_wait`).
    wait_ms: Option<u64>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = outbox)]
struct FeedRow {
    id: i64,
    feed_position: Option<i64>,
    message_id: uuid::Uuid,
    topic: String,
    message_key: String,
    message_type: String,
    entity_version: i64,
    occurred_at: chrono::DateTime<chrono::Utc>,
    headers: serde_json::Value,
    payload: Vec<u8>,
}

impl FeedRow {
    fn into_event(self) -> FeedEvent {
        // The same headers the relay sends to Kafka: a damaged row still carries its envelope.
        let headers = crate::outbox::envelope_headers(
            &self.headers,
            self.id,
            self.message_id,
            &self.message_type,
            &self.message_key,
            self.entity_version,
            self.occurred_at,
        );
        FeedEvent {
            position: self.feed_position.unwrap_or_default(),
            id: self.message_id,
            topic: self.topic,
            key: self.message_key,
            message_type: self.message_type,
            headers,
            payload: base64::engine::general_purpose::STANDARD.encode(self.payload),
        }
    }
}

impl FeedServer {
    /// Waits until the listener has stopped (after the `shutdown` given to
    /// [`FeedServer::start`] was cancelled).
    pub async fn stopped(&self) {
        self.tasks.wait().await;
    }

    /// A feed over the outbox in `pool`'s database. Listens for the relay's notifications on
    /// its own connection (to `database`) until `shutdown`.
    pub fn start(
        pool: PgPool,
        database: &DatabaseConfig,
        config: FeedServerConfig,
        shutdown: &CancellationToken,
    ) -> Result<Self> {
        config.validate()?;
        let new_events = Arc::new(Notify::new());
        let wake = Arc::clone(&new_events);
        let url = database.url.expose_secret().to_owned();
        let stop = shutdown.child_token();
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(crate::outbox::listen(
            url,
            NOTIFY_CHANNEL,
            move || wake.notify_waiters(),
            Backoff::default(),
            stop,
        ));
        tasks.close();
        Ok(Self {
            pool,
            new_events,
            config,
            tasks,
        })
    }

    /// The routes: `GET /events`. Merge it into the service's router, and give the whole
    /// router [`crate::http::json_errors`] so that what axum answers here by itself (a 405
    /// for `POST /events`) is JSON too.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/events", get(events))
            .with_state(self.clone())
    }

    /// The events after `after`, at most `limit`, waiting up to `wait` for the first one.
    pub async fn page(
        &self,
        after: i64,
        limit: i64,
        wait: Duration,
    ) -> std::result::Result<FeedPage, ApiError> {
        if after < 0 {
            return Err(ApiError::invalid(
                "invalid_position",
                "after must be 0 or more",
            ));
        }
        if !(1..=self.config.max_limit).contains(&limit) {
            return Err(ApiError::invalid(
                "invalid_limit",
                format!("limit must be 1 to {}", self.config.max_limit),
            ));
        }
        let deadline = tokio::time::Instant::now() + wait.min(self.config.max_wait);
        loop {
            // Registered before reading, so a notification that comes in between still wakes us.
            let notified = self.new_events.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let (head, events) = {
                let mut conn = db::connection(&self.pool).await?;
                read(&mut conn, after, limit).await?
            };
            if after > head {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "position_ahead",
                    format!(
                        "position {after} is beyond the newest position {head}: was the producer's database restored from an older backup?"
                    ),
                ));
            }
            match events.as_slice().first() {
                Some(first) if first.position != after + 1 => return Err(expired(after, head)),
                None if after < head => return Err(expired(after, head)),
                Some(_) => {
                    let next = events.last().map_or(after, |e| e.position);
                    return Ok(FeedPage {
                        events,
                        next,
                        head: head.max(next),
                    });
                }
                None => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(FeedPage {
                    events,
                    next: after,
                    head,
                });
            }
            let nap = (deadline - now).min(self.config.poll_interval);
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }
}

fn expired(after: i64, head: i64) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "position_expired",
        format!(
            "events after position {after} are no longer in the sent log (its retention removed them; newest is {head}): reconcile, then set the position"
        ),
    )
}

/// The newest position given out, and up to `limit` events after `after`.
async fn read(
    conn: &mut AsyncPgConnection,
    after: i64,
    limit: i64,
) -> Result<(i64, Vec<FeedEvent>)> {
    let head: i64 = diesel::sql_query("SELECT last FROM ferrybox_feed_sequence")
        .get_result::<Head>(conn)
        .await?
        .last;
    let rows: Vec<FeedRow> = outbox::table
        .filter(outbox::feed_position.gt(after))
        .order(outbox::feed_position.asc())
        .limit(limit)
        .select(FeedRow::as_select())
        .load(conn)
        .await?;
    Ok((head, rows.into_iter().map(FeedRow::into_event).collect()))
}

#[derive(QueryableByName)]
struct Head {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    last: i64,
}

/// The pulled event feed: the events after a position, in order and with no gap, long-polling
/// for the first one.
#[utoipa::path(
    get,
    path = "/events",
    tag = "feed",
    params(EventsQuery),
    security(("internal_token" = [])),
    responses(
        (status = 200, description = "The events after `after` (none when the wait ran out).", body = FeedPage),
        (status = 401, description = "No or the wrong bearer token.", body = crate::http::ErrorBody),
        (status = 409, description = "`position_ahead`: the position is beyond the newest one.", body = crate::http::ErrorBody),
        (status = 410, description = "`position_expired`: the sent log no longer has those events.", body = crate::http::ErrorBody),
        (status = 422, description = "`invalid_query`, `invalid_position` or `invalid_limit`.", body = crate::http::ErrorBody),
    )
)]
async fn events(
    State(feed): State<FeedServer>,
    query: std::result::Result<Query<EventsQuery>, QueryRejection>,
) -> std::result::Result<Json<FeedPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid("invalid_query", e.body_text()))?;
    let page = feed
        .page(
            query.after.unwrap_or(0),
            query.limit.unwrap_or(feed.config.default_limit),
            Duration::from_millis(query.wait_ms.unwrap_or(0)),
        )
        .await?;
    Ok(Json(page))
}

/// The OpenAPI document of [`FeedServer::router`] (see [`crate::openapi::events`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(events))]
pub(crate) struct EventsApi;
