//! HTTP helpers for services built on Ferrybox: one JSON error shape and a JSON extractor that
//! turns every malformed request into a clean 4xx with that shape.
//!
//! Errors look like `{"error": {"code": "invalid_email", "message": "..."}}`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

/// An error answered to an HTTP client: a status, a stable machine-readable code and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable code clients can match on (`not_found`, `invalid_email`, ...).
    pub code: &'static str,
    /// A human-readable explanation. Never contains secrets.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 404 with code `not_found`.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    /// 422 with the given code: the request was well-formed but its content is not acceptable.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 500 with code `internal`. The detail is logged, not sent: it may name internals.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    /// 503 with code `unavailable`, for dependencies that are down; the detail is logged.
    pub fn unavailable(detail: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %detail, "dependency unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "a dependency is unavailable; try again",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        if e.is_retryable() {
            Self::unavailable(e)
        } else {
            Self::internal(e)
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let (code, status) = match &rejection {
            JsonRejection::JsonDataError(_) => ("invalid_body", StatusCode::UNPROCESSABLE_ENTITY),
            JsonRejection::JsonSyntaxError(_) => ("malformed_json", StatusCode::BAD_REQUEST),
            JsonRejection::MissingJsonContentType(_) => {
                ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            JsonRejection::BytesRejection(_) => ("body_unreadable", rejection.status()),
            _ => ("bad_request", rejection.status()),
        };
        let status = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            status
        };
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            code
        };
        Self::new(status, code, rejection.body_text())
    }
}

/// Like [`axum::Json`], but a rejected body becomes an [`ApiError`].
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// The answer for routes that do not exist.
pub async fn not_found_fallback(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

/// The token of an `Authorization: Bearer <token>` header, trimmed.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// A secret token kept as its SHA-256 digest: a presented token is compared digest to digest,
/// so the comparison's timing tells nothing about the secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// The digest of `token`.
    pub fn of(token: &secrecy::SecretString) -> Self {
        use secrecy::ExposeSecret;
        Self::of_presented(token.expose_secret())
    }

    fn of_presented(token: &str) -> Self {
        use sha2::{Digest, Sha256};
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Whether `presented` is the token.
    pub fn matches(&self, presented: &str) -> bool {
        *self == Self::of_presented(presented)
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenDigest([redacted])")
    }
}

/// Requires `Authorization: Bearer <token>` on every route of `router` when `token` is set
/// (the endpoints other services call: a snapshot, the event feed); without a token the router
/// is returned unchanged. A missing or wrong token is a `401 unauthorized`.
pub fn require_bearer(router: axum::Router, token: Option<&secrecy::SecretString>) -> axum::Router {
    let Some(token) = token else {
        return router;
    };
    let expected = TokenDigest::of(token);
    router.route_layer(axum::middleware::from_fn(
        move |request: Request, next: axum::middleware::Next| async move {
            if bearer_token(request.headers()).is_some_and(|t| expected.matches(t)) {
                next.run(request).await
            } else {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this endpoint needs the internal bearer token",
                )
                .into_response()
            }
        },
    ))
}

/// A GET of `url` carrying `Authorization: Bearer <token>` when a token is given (how Ferrybox
/// calls another service's internal endpoints).
pub(crate) fn get_with_token(
    client: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    token: Option<&secrecy::SecretString>,
) -> reqwest::RequestBuilder {
    use secrecy::ExposeSecret;
    let request = client.get(url);
    match token {
        Some(token) => request.bearer_auth(token.expose_secret()),
        None => request,
    }
}
