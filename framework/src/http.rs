//! HTTP helpers for services built on Ferrybox: one JSON error shape, a JSON extractor that
//! turns every malformed request into a clean 4xx with that shape, and [`json_errors`], which
//! gives the same shape to the errors axum and tower-http answer by themselves (unknown route,
//! method not allowed, body too large, ...).
//!
//! Errors look like `{"error": {"code": "invalid_email", "message": "..."}}`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

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

/// The body of every error a Ferrybox service answers (its OpenAPI schema `ErrorBody`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable code clients can match on (`not_found`, `invalid_email`, ...).
    #[schema(example = "not_found")]
    pub code: String,
    /// A human-readable explanation; never contains secrets.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
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

/// The answer for routes that do not exist (with a message naming the method and path; a
/// router without a fallback of its own gets the same from [`json_errors`]).
pub async fn not_found_fallback(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

/// The stable code of an error answered with `status` when nothing more specific is known
/// (the answers of axum and tower-http themselves: an unknown route, a method the route does
/// not have, a body over the limit, ...).
pub fn status_code_name(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::NOT_ACCEPTABLE => "not_acceptable",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::CONFLICT => "conflict",
        StatusCode::GONE => "gone",
        StatusCode::LENGTH_REQUIRED => "length_required",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable_entity",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        StatusCode::NOT_IMPLEMENTED => "not_implemented",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        s if s.is_server_error() => "internal",
        _ => "client_error",
    }
}

/// Renders an error found by [`json_errors_with`]: its status and a message for the client.
pub type ErrorRenderer = fn(StatusCode, String) -> Response;

/// Every error `router` answers becomes JSON in [`ApiError`]'s shape, with a code named after
/// the status ([`status_code_name`]), whoever produced it: the handlers' own errors already
/// are; this catches the ones axum and tower-http answer by themselves, as plain text or with
/// no body at all — 404 for an unknown route, 405 for a method the route does not have (the
/// `Allow` header stays), 413 for a body over the limit, 400/415/422 from an extractor a
/// handler did not map. Apply it last, to the whole merged router with its state given: it
/// wraps the router as it is, so routes added to the result afterwards are not covered.
pub fn json_errors(router: axum::Router) -> axum::Router {
    json_errors_with(router, |status, message| {
        ApiError::new(status, status_code_name(status), message).into_response()
    })
}

/// Like [`json_errors`], but in another JSON shape: `render` makes the response from the
/// status and a message (the local schema registry answers Confluent's
/// `{"error_code", "message"}`). Responses that are already JSON (`application/json` or any
/// `+json` type) and successes pass through untouched.
pub fn json_errors_with(router: axum::Router, render: ErrorRenderer) -> axum::Router {
    // Around the whole router, not layered onto each route: axum adds a 405's `Allow` header
    // outside a route's layers, and the message names the allowed methods.
    axum::Router::new()
        .fallback_service(router)
        .layer(axum::middleware::from_fn(
            move |request: Request, next: axum::middleware::Next| {
                as_json_error(request, next, render)
            },
        ))
}

/// The most of a plain error body that is read to quote it.
const PLAIN_ERROR_LIMIT: usize = 8 * 1024;

async fn as_json_error(
    request: Request,
    next: axum::middleware::Next,
    render: ErrorRenderer,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let request = request.map(|body| axum::body::Body::new(Lingering::new(body)));
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(response.headers()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, PLAIN_ERROR_LIMIT).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = if status.is_server_error() {
        // A server error's text may name internals: it is logged, not sent.
        if !text.is_empty() {
            tracing::error!(%status, error = %text, "internal error");
        }
        status
            .canonical_reason()
            .unwrap_or("internal error")
            .to_lowercase()
    } else if !text.is_empty() {
        text
    } else if status == StatusCode::METHOD_NOT_ALLOWED {
        let allowed = parts
            .headers
            .get(axum::http::header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty());
        match allowed {
            Some(allowed) => format!("{method} is not allowed on {path}; allowed: {allowed}"),
            None => format!("{method} is not allowed on {path}"),
        }
    } else if status == StatusCode::NOT_FOUND {
        format!("no route for {method} {path}")
    } else {
        status
            .canonical_reason()
            .unwrap_or("request rejected")
            .to_lowercase()
    };
    let (rendered, body) = render(status, message).into_parts();
    // The original headers (Allow, Retry-After, ...) stay; the body's own are the new body's.
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    parts.headers.extend(rendered.headers);
    Response::from_parts(parts, body)
}

/// The most of a request body a rejected request is still read for after its answer, and for
/// how long (see [`Lingering`]).
const LINGER_BYTES: usize = 4 * 1024 * 1024;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// A request body that, when dropped unread (a 413 from the body limit, a 401 answered before
/// the body was looked at), goes on reading and discarding what the client still sends, up to
/// [`LINGER_BYTES`] or [`LINGER_TIME`]. Without it the server closes a socket that holds
/// unread data, the kernel answers with a reset, and a client still writing its body loses
/// the response it was sent ("broken pipe", "incomplete message"): nginx's lingering close.
struct Lingering {
    inner: Option<axum::body::Body>,
}

impl Lingering {
    fn new(body: axum::body::Body) -> Self {
        Self { inner: Some(body) }
    }
}

impl http_body::Body for Lingering {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let frame = std::pin::Pin::new(inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = frame {
            self.inner = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            http_body::Body::size_hint,
        )
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if http_body::Body::is_end_stream(&body) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            use futures::StreamExt;
            let mut stream = body.into_data_stream();
            let mut read = 0;
            let _ = tokio::time::timeout(LINGER_TIME, async {
                while let Some(Ok(chunk)) = stream.next().await {
                    read += chunk.len();
                    if read > LINGER_BYTES {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

/// Whether a response's body is JSON.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| v == "application/json" || v.ends_with("+json"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use axum::routing::get;
    use serde_json::{Value, json};

    /// Serves `router` on a free port; its base URL.
    async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }

    fn app() -> axum::Router {
        #[derive(serde::Deserialize)]
        struct Page {
            #[expect(dead_code, reason = "only its parsing matters")]
            limit: u32,
        }
        axum::Router::new()
            .route(
                "/items",
                get(|| async { "items" }).post(|_: Bytes| async { "stored" }),
            )
            .route(
                "/page",
                get(|_: axum::extract::Query<Page>| async { "a page" }),
            )
            .route(
                "/teapot",
                get(|| async { (StatusCode::IM_A_TEAPOT, axum::Json(json!({ "tea": true }))) }),
            )
            .route(
                "/boom",
                get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "password=hunter2") }),
            )
            .layer(axum::extract::DefaultBodyLimit::max(16))
    }

    async fn call(
        method: reqwest::Method,
        url: String,
        body: &'static str,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = reqwest::Client::new()
            .request(method, url)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (
            status,
            headers,
            response.json().await.unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn errors_axum_answers_by_itself_become_json_with_a_code() {
        let url = serve(json_errors(app())).await;
        let error = |body: &Value| {
            (
                body["error"]["code"].as_str().map(str::to_owned),
                body["error"]["message"].as_str().map(str::to_owned),
            )
        };

        // A method the route does not have: 405, the Allow header kept and named.
        let (status, headers, body) = call(reqwest::Method::PUT, format!("{url}/items"), "").await;
        assert_eq!(status, 405);
        assert_eq!(headers["allow"], "GET,HEAD,POST");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(
            error(&body),
            (
                Some("method_not_allowed".into()),
                Some("PUT is not allowed on /items; allowed: GET,HEAD,POST".into())
            )
        );
        // No route at all.
        let (status, _, body) = call(reqwest::Method::GET, format!("{url}/nowhere"), "").await;
        assert_eq!(
            (status, error(&body)),
            (
                404,
                (
                    Some("not_found".into()),
                    Some("no route for GET /nowhere".into())
                )
            )
        );
        // A body over the limit, read by a handler that maps no rejection.
        let (status, _, body) = call(
            reqwest::Method::POST,
            format!("{url}/items"),
            "more than sixteen bytes",
        )
        .await;
        assert_eq!(status, 413);
        assert_eq!(body["error"]["code"], "payload_too_large");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("length limit")),
            "{body}"
        );
        // A query the extractor rejects.
        let (status, _, body) =
            call(reqwest::Method::GET, format!("{url}/page?limit=many"), "").await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("bad_request"))
        );
        // A server error's text is not sent: it may name internals.
        let (status, _, body) = call(reqwest::Method::GET, format!("{url}/boom"), "").await;
        assert_eq!(
            (status, error(&body)),
            (
                500,
                (
                    Some("internal".into()),
                    Some("internal server error".into())
                )
            )
        );
    }

    #[tokio::test]
    async fn json_answers_and_successes_pass_through() {
        let url = serve(json_errors(app())).await;
        let (status, _, body) = call(reqwest::Method::GET, format!("{url}/teapot"), "").await;
        assert_eq!((status, body), (418, json!({ "tea": true })));
        let response = reqwest::get(format!("{url}/items")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "items");
    }

    #[tokio::test]
    async fn another_shape_can_be_rendered() {
        let confluent = |status: StatusCode, message: String| {
            axum::Json(json!({ "error_code": status.as_u16(), "message": message })).into_response()
        };
        let url = serve(json_errors_with(app(), confluent)).await;
        let (status, headers, body) =
            call(reqwest::Method::DELETE, format!("{url}/items"), "").await;
        assert_eq!(status, 405);
        assert_eq!(headers["allow"], "GET,HEAD,POST");
        assert_eq!(body["error_code"], 405);
    }

    /// A client that sends a body far over the limit reads the 413, every time: the rest of
    /// the body is read and thrown away (up to a bound) instead of the connection being reset
    /// under the client while it is still writing.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_body_far_over_the_limit_gets_its_answer_not_a_reset() {
        let url = serve(json_errors(app())).await;
        let http = reqwest::Client::new();
        let huge = vec![b'x'; 64 * 1024];
        for attempt in 0..500 {
            let response = http
                .post(format!("{url}/items"))
                .body(huge.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("attempt {attempt}: {e:?}"));
            assert_eq!(response.status(), 413, "attempt {attempt}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "payload_too_large");
        }
    }
}
