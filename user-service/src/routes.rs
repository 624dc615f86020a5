//! The HTTP API.

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ferrybox::FeedServer;
use ferrybox::health::Readiness;
use ferrybox::http::{ApiError, ErrorBody, Json};
use ferrybox::openapi;
use secrecy::SecretString;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
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
    // Each route is registered with its document (utoipa-axum), so the two cannot differ.
    let (api, api_doc) = OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(get_user, update, delete))
        .routes(routes!(suspend))
        .routes(routes!(health))
        .split_for_parts();
    let (snapshot_route, snapshot_doc) = OpenApiRouter::new()
        .routes(routes!(snapshot))
        .split_for_parts();
    // The repair endpoint serves the sent log by the relay's numbers, with or without a feed.
    let mut internal = snapshot_route
        .with_state(users.clone())
        .merge(ferrybox::feed::numbered_router(users.pool.clone()));
    let mut framework = vec![
        snapshot_doc,
        openapi::numbered(),
        openapi::health(),
        openapi::metrics(),
    ];
    if let Some(feed) = feed {
        internal = internal.merge(feed.router());
        framework.push(openapi::events());
    }
    let mut doc = openapi::document(
        "user-service",
        "Owns users: registers, changes, suspends and deletes them, and publishes every change \
         through its transactional outbox. Other services read the snapshot, the pulled feed \
         and the repair endpoint with the internal token.",
    );
    doc.merge(api_doc);
    let doc = openapi::with_bearer(
        openapi::finish(doc, framework),
        "A session token from auth-service's `POST /login` (the user themselves), or the \
         service credential (`service_token`).",
    );
    let routes = api
        .fallback(ferrybox::http::not_found_fallback)
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(users)
        .merge(ferrybox::http::require_bearer(internal, internal_token))
        .merge(readiness.router())
        .merge(ferrybox::metrics::router())
        .merge(openapi::router(doc))
        // Each request starts (or continues) the trace its events carry to consumers.
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(ferrybox::telemetry::http_span::<axum::body::Body>),
        );
    ferrybox::http::json_errors(routes)
}

/// The user-service API's liveness (the same as `/health/live`).
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses((status = 200, description = "The process is up.", body = String, content_type = "text/plain", example = "ok"))
)]
async fn health() -> &'static str {
    "ok"
}

/// Streams the snapshot as NDJSON (see `ferrybox::reconcile`).
#[utoipa::path(
    get,
    path = "/snapshot",
    tag = "internal",
    security(("internal_token" = [])),
    responses(
        (status = 200, description = "Every user, as NDJSON: a header line (source, when taken, the feed watermark), then one line per user (key, version, state).", body = String, content_type = "application/x-ndjson"),
        (status = 401, description = "No or the wrong internal token.", body = ErrorBody),
    )
)]
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
#[utoipa::path(
    post,
    path = "/users",
    tag = "users",
    request_body = NewUser,
    security((), ("bearer" = [])),
    responses(
        (status = 201, description = "Registered; `UserRegistered` is published.", body = User),
        (status = 400, description = "`malformed_json`.", body = ErrorBody),
        (status = 401, description = "Registration is closed and no valid token was sent.", body = ErrorBody),
        (status = 403, description = "The token is not the service credential.", body = ErrorBody),
        (status = 409, description = "`email_taken`.", body = ErrorBody),
        (status = 415, description = "Not `application/json`.", body = ErrorBody),
        (status = 422, description = "`invalid_email`, `invalid_name`, `invalid_password`, `invalid_locale` or `invalid_body`.", body = ErrorBody),
    )
)]
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

/// One user.
#[utoipa::path(
    get,
    path = "/users/{id}",
    tag = "users",
    params(("id" = String, Path, description = "The user's id (a UUID).")),
    responses(
        (status = 200, description = "The user.", body = User),
        (status = 404, description = "No such user (or not a UUID).", body = ErrorBody),
    )
)]
async fn get_user(
    State(users): State<Users>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<User>, ApiError> {
    Ok(Json(users.get(user_id(id)?).await?))
}

/// The user themselves, or the service.
#[utoipa::path(
    patch,
    path = "/users/{id}",
    tag = "users",
    params(("id" = String, Path, description = "The user's id (a UUID).")),
    request_body = UserPatch,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Changed; `UserUpdated` is published.", body = User),
        (status = 400, description = "`malformed_json`.", body = ErrorBody),
        (status = 401, description = "No valid token.", body = ErrorBody),
        (status = 403, description = "Neither the user themselves nor the service.", body = ErrorBody),
        (status = 404, description = "No such user.", body = ErrorBody),
        (status = 409, description = "`email_taken`.", body = ErrorBody),
        (status = 415, description = "Not `application/json`.", body = ErrorBody),
        (status = 422, description = "An invalid field, or `invalid_body`.", body = ErrorBody),
    )
)]
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
#[utoipa::path(
    post,
    path = "/users/{id}/suspend",
    tag = "users",
    params(("id" = String, Path, description = "The user's id (a UUID).")),
    request_body(content = Option<Suspension>, description = "Why (optional; an empty body gives no reason)."),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Suspended; `UserSuspended` is published.", body = User),
        (status = 400, description = "`malformed_json`.", body = ErrorBody),
        (status = 401, description = "No valid token.", body = ErrorBody),
        (status = 403, description = "Not the service credential.", body = ErrorBody),
        (status = 404, description = "No such user.", body = ErrorBody),
        (status = 422, description = "An invalid reason.", body = ErrorBody),
    )
)]
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
#[utoipa::path(
    delete,
    path = "/users/{id}",
    tag = "users",
    params(("id" = String, Path, description = "The user's id (a UUID).")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted; `UserDeleted` is published."),
        (status = 401, description = "No valid token.", body = ErrorBody),
        (status = 403, description = "Neither the user themselves nor the service.", body = ErrorBody),
        (status = 404, description = "No such user.", body = ErrorBody),
    )
)]
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
