//! The HTTP API.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use ferrybox::http::{ApiError, ErrorBody, Json};
use ferrybox::inbox::{InboxStats, InboxStatsSnapshot};
use ferrybox::openapi;
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::login::{self, Credentials, Session, SessionInfo};
use crate::schema::cached_users;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The service's database.
    pub pool: ferrybox::db::PgPool,
    /// The inbox consumer's counters.
    pub stats: Arc<InboxStats>,
    /// Session lifetime.
    pub session_ttl: chrono::Duration,
    /// The consumer's dead letters.
    pub dead_letters: ferrybox::inbox::DeadLetters,
    /// The last reconciliation's report.
    pub reconcile: Arc<std::sync::Mutex<Option<ferrybox::reconcile::Report>>>,
    /// Login attempts per account and per address.
    pub limiter: Arc<crate::limits::LoginLimiter>,
    /// Signs and verifies session tokens.
    pub tokens: ferrybox::token::TokenKey,
}

/// The service's routes, with `/health/live`, `/health/ready` and `/metrics`. Every error is
/// JSON with a code ([`ferrybox::http::json_errors`]), the 404s, 405s and 413s axum answers by
/// itself included.
pub fn router(
    state: AppState,
    readiness: &ferrybox::health::Readiness,
    max_body_bytes: usize,
) -> Router {
    // Each route is registered with its document (utoipa-axum), so the two cannot differ.
    let (api, api_doc) = OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(session))
        .routes(routes!(cached_user))
        .routes(routes!(inbox_stats))
        .routes(routes!(last_reconcile))
        .routes(routes!(health))
        .split_for_parts();
    let mut doc = openapi::document(
        "auth-service",
        "Caches users from user-service's events and logs them in: sessions, the cached users, \
         and what its consumer and reconciliation did.",
    );
    doc.merge(api_doc);
    let doc = openapi::with_bearer(
        openapi::finish(doc, [openapi::health(), openapi::metrics()]),
        "A session token from `POST /login`.",
    );
    let routes = api
        .fallback(ferrybox::http::not_found_fallback)
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
        .merge(readiness.router())
        .merge(ferrybox::metrics::router())
        .merge(openapi::router(doc))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(ferrybox::telemetry::http_span::<axum::body::Body>),
        );
    ferrybox::http::json_errors(routes)
}

/// The auth-service API's liveness (the same as `/health/live`).
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses((status = 200, description = "The process is up.", body = String, content_type = "text/plain", example = "ok"))
)]
async fn health() -> &'static str {
    "ok"
}

/// Rate-limited per account and per client address: `429 too_many_attempts` with
/// `Retry-After` once either budget is spent.
#[utoipa::path(
    post,
    path = "/login",
    tag = "sessions",
    request_body = Credentials,
    responses(
        (status = 200, description = "A new session; its token is shown once.", body = Session),
        (status = 400, description = "`malformed_json`.", body = ErrorBody),
        (status = 401, description = "`invalid_credentials`: the email or password is wrong, or the account is not active.", body = ErrorBody),
        (status = 415, description = "Not `application/json`.", body = ErrorBody),
        (status = 422, description = "`invalid_body`.", body = ErrorBody),
        (status = 429, description = "`too_many_attempts`, with `Retry-After`.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait."))),
    )
)]
async fn login(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(client): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Json(credentials): Json<Credentials>,
) -> Result<Json<Session>, axum::response::Response> {
    use axum::response::IntoResponse;
    if let Err(wait) = state.limiter.check(&credentials.email, client.ip()) {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let error = ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            format!("too many login attempts; try again in {seconds} s"),
        );
        return Err((
            [(axum::http::header::RETRY_AFTER, seconds.to_string())],
            error,
        )
            .into_response());
    }
    login::login(&state.pool, credentials, state.session_ttl, &state.tokens)
        .await
        .map(Json)
        .map_err(IntoResponse::into_response)
}

/// Who the session token belongs to.
#[utoipa::path(
    get,
    path = "/session",
    tag = "sessions",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The token is valid.", body = SessionInfo),
        (status = 401, description = "`missing_token`, or the token is invalid or expired.", body = ErrorBody),
    )
)]
async fn session(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<SessionInfo>, ApiError> {
    let token = ferrybox::http::bearer_token(&headers).ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "missing_token",
            "send Authorization: Bearer <token>",
        )
    })?;
    Ok(Json(
        login::session(&state.pool, token, &state.tokens).await?,
    ))
}

/// A cached user as this service sees it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Queryable, utoipa::ToSchema)]
pub struct CachedUser {
    /// The user's id.
    pub id: Uuid,
    /// Email address.
    pub email: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// `active` or `suspended`.
    pub status: String,
    /// The version of the last event applied.
    pub version: i64,
    /// When the cache last changed.
    pub updated_at: DateTime<Utc>,
}

/// A user as the cache holds it (deleted users are not found).
#[utoipa::path(
    get,
    path = "/users/{id}",
    tag = "cache",
    params(("id" = String, Path, description = "The user's id (a UUID).")),
    responses(
        (status = 200, description = "The cached user.", body = CachedUser),
        (status = 404, description = "Not in the cache (or not a UUID).", body = ErrorBody),
    )
)]
async fn cached_user(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CachedUser>, ApiError> {
    let Path(raw) = id.map_err(|e| ApiError::invalid("invalid_id", e.body_text()))?;
    let not_found = || ApiError::not_found(format!("no cached user {raw}"));
    let id = Uuid::parse_str(&raw).map_err(|_| not_found())?;
    let mut conn = ferrybox::db::connection(&state.pool).await?;
    let user: Option<CachedUser> = cached_users::table
        .find(id)
        .filter(cached_users::status.ne("deleted"))
        .select((
            cached_users::id,
            cached_users::email,
            cached_users::name,
            cached_users::status,
            cached_users::version,
            cached_users::updated_at,
        ))
        .first(&mut conn)
        .await
        .optional()
        .map_err(ferrybox::Error::from)?;
    user.map(Json).ok_or_else(not_found)
}

/// The consumer's counters since start, and the dead letters open in the database.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InboxStatus {
    /// Counters since this process started.
    #[serde(flatten)]
    pub counters: InboxStatsSnapshot,
    /// Dead letters by state, from the database.
    pub dead_letters: ferrybox::inbox::DeadLetterCounts,
}

/// The last reconciliation's report; 404 before the first run.
#[utoipa::path(
    get,
    path = "/reconcile/last",
    tag = "consumer",
    responses(
        (status = 200, description = "The last run's counts and what it could not repair.", body = ferrybox::reconcile::Report),
        (status = 404, description = "No reconciliation has run since the service started.", body = ErrorBody),
    )
)]
async fn last_reconcile(
    State(state): State<AppState>,
) -> Result<Json<ferrybox::reconcile::Report>, ApiError> {
    let last = state
        .reconcile
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    last.map(Json)
        .ok_or_else(|| ApiError::not_found("no reconciliation has run yet"))
}

/// The consumer's counters since start, and its dead letters.
#[utoipa::path(
    get,
    path = "/inbox/stats",
    tag = "consumer",
    responses((status = 200, description = "Counters and dead letters.", body = InboxStatus))
)]
async fn inbox_stats(State(state): State<AppState>) -> Result<Json<InboxStatus>, ApiError> {
    Ok(Json(InboxStatus {
        counters: state.stats.snapshot(),
        dead_letters: state.dead_letters.counts().await?,
    }))
}
