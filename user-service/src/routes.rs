//! The HTTP API.

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use ferrybox::FeedServer;
use ferrybox::health::Readiness;
use ferrybox::http::{ApiError, Json};
use secrecy::SecretString;
use uuid::Uuid;

use crate::auth::Caller;
use crate::snapshot::{SOURCE, UserSnapshot};
use crate::users::{NewUser, Suspension, User, UserPatch, Users};

/// The service's routes: the users API, and for other services `GET /snapshot` (every user,
/// for reconciliation), `GET /events` (the pulled event feed) and `GET /events/numbered`
/// (the sent log by the relay's numbers, for consumers repairing a gap), which need the
/// internal bearer token when one is set (no `/events` without a `feed`). Every error is JSON with a code
/// ([`ferrybox::http::json_errors`]), the 404s, 405s and 413s axum answers by itself included.
pub fn router(
    users: Users,
    feed: Option<&FeedServer>,
    readiness: &Readiness,
    internal_token: Option<&SecretString>,
    max_body_bytes: usize,
) -> Router {
    // The repair endpoint serves the sent log by the relay's numbers, with or without a feed.
    let mut internal = Router::new()
        .route("/snapshot", get(snapshot))
        .with_state(users.clone())
        .merge(ferrybox::feed::numbered_router(users.pool.clone()));
    if let Some(feed) = feed {
        internal = internal.merge(feed.router());
    }
    let routes = Router::new()
        .route("/users", post(register))
        .route("/users/{id}", get(get_user).patch(update).delete(delete))
        .route("/users/{id}/suspend", post(suspend))
        .route("/health", get(|| async { "ok" }))
        .fallback(ferrybox::http::not_found_fallback)
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(users)
        .merge(ferrybox::http::require_bearer(internal, internal_token))
        .merge(readiness.router())
        .merge(ferrybox::metrics::router())
        // Each request starts (or continues) the trace its events carry to consumers.
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(ferrybox::telemetry::http_span::<axum::body::Body>),
        );
    ferrybox::http::json_errors(routes)
}

/// Streams the snapshot as NDJSON (see `ferrybox::reconcile`).
async fn snapshot(State(users): State<Users>) -> axum::response::Response {
    ferrybox::reconcile::snapshot::response(
        users.pool,
        std::sync::Arc::new(UserSnapshot),
        SOURCE.to_owned(),
    )
}

fn user_id(path: Result<Path<String>, PathRejection>) -> Result<Uuid, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::invalid("invalid_id", e.body_text()))?;
    Uuid::parse_str(&raw).map_err(|_| ApiError::not_found(format!("no user {raw}")))
}

/// Open to anyone when `open_registration` is on (self sign-up); the service credential
/// otherwise.
async fn register(
    State(users): State<Users>,
    headers: axum::http::HeaderMap,
    Json(input): Json<NewUser>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    // Open sign-up looks at no token at all.
    if !users.auth.open_registration {
        users
            .auth
            .caller(ferrybox::http::bearer_token(&headers), &users)
            .await?
            .must_be_service()?;
    }
    Ok((StatusCode::CREATED, Json(users.register(input).await?)))
}

async fn get_user(
    State(users): State<Users>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<User>, ApiError> {
    Ok(Json(users.get(user_id(id)?).await?))
}

/// The user themselves, or the service.
async fn update(
    State(users): State<Users>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    Json(patch): Json<UserPatch>,
) -> Result<Json<User>, ApiError> {
    let id = user_id(id)?;
    caller.may_change(id)?;
    Ok(Json(users.update(id, patch).await?))
}

/// The service only. The body is optional: an empty one means no reason given.
async fn suspend(
    State(users): State<Users>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Json<User>, ApiError> {
    caller.must_be_service()?;
    let suspension: Suspension = if body.iter().all(u8::is_ascii_whitespace) {
        Suspension::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()))?
    };
    Ok(Json(users.suspend(user_id(id)?, suspension).await?))
}

/// The user themselves, or the service.
async fn delete(
    State(users): State<Users>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = user_id(id)?;
    caller.may_change(id)?;
    users.delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}
