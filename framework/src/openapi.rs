//! OpenAPI documents of a service's HTTP API, generated from its handlers with
//! [utoipa](https://docs.rs/utoipa), so the document cannot drift from the routes.
//!
//! A service documents its own handlers with `#[utoipa::path]` (registering them through
//! `utoipa_axum::router::OpenApiRouter`, which adds each route and its document together),
//! merges the documents of the framework routers it mounts ([`health`], [`metrics`],
//! [`events`], [`numbered`]), then [`finish`]es it and serves it with [`router`] at
//! `GET /openapi.json`:
//!
//! ```
//! use ferrybox::openapi;
//!
//! let doc = openapi::finish(
//!     openapi::document("my-service", "What my service does."),
//!     [openapi::health(), openapi::metrics()],
//! );
//! let routes = axum::Router::new().merge(openapi::router(doc));
//! # drop(routes);
//! ```

use axum::Router;
use axum::routing::get;
use utoipa::OpenApi as _;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, RefOr, Response, ResponseBuilder,
};

use crate::http::{ErrorBody, ErrorDetail};

/// The security scheme of routes behind the internal bearer token (`/events`, `/snapshot`, ...).
pub const INTERNAL_TOKEN: &str = "internal_token";

/// An empty document for `service`: its title, description and the crate's version.
pub fn document(service: &str, description: &str) -> OpenApi {
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title(service)
                .description(Some(description))
                .version(env!("CARGO_PKG_VERSION"))
                .build(),
        )
        .build()
}

/// `doc` with the framework documents `parts` merged in, the error schema, the internal token's
/// security scheme, and on every operation a `default` response: the JSON error (with a code)
/// the framework answers for anything the operation does not list (a malformed body, a
/// method not allowed, a body too large, a dependency down, an internal error).
pub fn finish(mut doc: OpenApi, parts: impl IntoIterator<Item = OpenApi>) -> OpenApi {
    for part in parts {
        doc.merge(part);
    }
    doc.merge(ErrorSchemas::openapi());
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        INTERNAL_TOKEN,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "The internal bearer token other services call with (`internal_token`).",
                ))
                .build(),
        ),
    );
    let default = error_response("Any other error: JSON with a stable code.");
    for item in doc.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            operation
                .responses
                .responses
                .entry("default".into())
                .or_insert_with(|| RefOr::T(default.clone()));
        }
    }
    doc
}

/// The security scheme of a service's own bearer tokens (sessions, service credentials).
pub const BEARER: &str = "bearer";

/// `doc` with the [`BEARER`] security scheme, described by `description` (which tokens it
/// takes); operations name it with `security(("bearer" = []))`.
pub fn with_bearer(mut doc: OpenApi, description: &str) -> OpenApi {
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            ),
        );
    doc
}

/// A response whose body is the JSON error.
pub fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// `GET /openapi.json`, answering `doc`.
pub fn router(doc: OpenApi) -> Router {
    let doc = std::sync::Arc::new(doc);
    Router::new().route(
        "/openapi.json",
        get(move || {
            let doc = std::sync::Arc::clone(&doc);
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    )
}

#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(ErrorBody, ErrorDetail)))]
struct ErrorSchemas;

/// The document of [`crate::health::Readiness::router`]: `/health/live`, `/health/ready`.
pub fn health() -> OpenApi {
    crate::health::HealthApi::openapi()
}

/// The document of [`crate::metrics::router`]: `/metrics`.
pub fn metrics() -> OpenApi {
    crate::metrics::MetricsApi::openapi()
}

/// The document of [`crate::FeedServer::router`]: `/events`.
pub fn events() -> OpenApi {
    crate::feed::EventsApi::openapi()
}

/// The document of [`crate::feed::numbered_router`]: `/events/numbered`.
pub fn numbered() -> OpenApi {
    crate::feed::NumberedApi::openapi()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_gets_the_json_error_as_its_default_response() {
        let doc = finish(
            document("t", "test"),
            [health(), metrics(), events(), numbered()],
        );
        let json = serde_json::to_value(&doc).unwrap();
        for path in [
            "/health/live",
            "/health/ready",
            "/metrics",
            "/events",
            "/events/numbered",
        ] {
            let get = &json["paths"][path]["get"];
            assert!(get.is_object(), "{path} is documented");
            assert_eq!(
                get["responses"]["default"]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{path}"
            );
        }
        assert!(json["components"]["schemas"]["ErrorBody"].is_object());
        assert_eq!(
            json["components"]["securitySchemes"][INTERNAL_TOKEN]["scheme"],
            "bearer"
        );
    }
}
