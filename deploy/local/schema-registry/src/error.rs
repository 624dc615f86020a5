//! Errors in Confluent's shape: an HTTP status plus `{"error_code": N, "message": "..."}`.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Subject not found.
pub const SUBJECT_NOT_FOUND: u32 = 40401;
/// Version not found.
pub const VERSION_NOT_FOUND: u32 = 40402;
/// Schema not found.
pub const SCHEMA_NOT_FOUND: u32 = 40403;
/// Subject was soft-deleted (and is soft-deleted again).
pub const SUBJECT_SOFT_DELETED: u32 = 40404;
/// Subject was not soft-deleted before a permanent delete.
pub const SUBJECT_NOT_SOFT_DELETED: u32 = 40405;
/// Version was soft-deleted (and is soft-deleted again).
pub const VERSION_SOFT_DELETED: u32 = 40406;
/// Version was not soft-deleted before a permanent delete.
pub const VERSION_NOT_SOFT_DELETED: u32 = 40407;
/// Subject has no compatibility level of its own.
pub const SUBJECT_LEVEL_NOT_CONFIGURED: u32 = 40408;
/// Incompatible schema.
pub const INCOMPATIBLE_SCHEMA: u32 = 409;
/// Invalid schema.
pub const INVALID_SCHEMA: u32 = 42201;
/// Invalid version.
pub const INVALID_VERSION: u32 = 42202;
/// Invalid compatibility level.
pub const INVALID_COMPATIBILITY_LEVEL: u32 = 42203;
/// Store error.
pub const STORE_ERROR: u32 = 50001;

/// A registry error.
#[derive(Debug, thiserror::Error)]
#[error("{message} (error code {code})")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Confluent's error code.
    pub code: u32,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 40401.
    pub fn subject_not_found(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            SUBJECT_NOT_FOUND,
            format!("Subject '{subject}' not found."),
        )
    }

    /// 40402.
    pub fn version_not_found(version: i32) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            VERSION_NOT_FOUND,
            format!("Version {version} not found."),
        )
    }

    /// 40403.
    pub fn schema_not_found(id: i32) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            SCHEMA_NOT_FOUND,
            format!("Schema {id} not found"),
        )
    }

    /// 40404.
    pub fn subject_soft_deleted(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            SUBJECT_SOFT_DELETED,
            format!(
                "Subject '{subject}' was soft deleted. Set permanent=true to delete permanently"
            ),
        )
    }

    /// 40405.
    pub fn subject_not_soft_deleted(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            SUBJECT_NOT_SOFT_DELETED,
            format!("Subject '{subject}' was not deleted first before being permanently deleted"),
        )
    }

    /// 40406.
    pub fn version_soft_deleted(subject: &str, version: i32) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            VERSION_SOFT_DELETED,
            format!(
                "Subject '{subject}' Version {version} was soft deleted. Set permanent=true to delete permanently"
            ),
        )
    }

    /// 40407.
    pub fn version_not_soft_deleted(subject: &str, version: i32) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            VERSION_NOT_SOFT_DELETED,
            format!(
                "Subject '{subject}' Version {version} was not deleted first before being permanently deleted"
            ),
        )
    }

    /// An error axum or tower-http answered by itself (an unknown route, a method the route
    /// does not have, a body over the limit): Confluent's REST layer uses the HTTP status as
    /// the error code for those.
    pub fn http(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, u32::from(status.as_u16()), message)
    }

    /// 42201.
    pub fn invalid_schema(reason: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            INVALID_SCHEMA,
            format!("Invalid schema: {reason}"),
        )
    }

    /// 50001.
    pub fn internal(reason: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            STORE_ERROR,
            format!("Error in the backend data store: {reason}"),
        )
    }
}

/// A query string the handler's parameters cannot be read from: 400, error code 400.
impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::http(StatusCode::BAD_REQUEST, rejection.body_text())
    }
}

/// A path parameter of the wrong type (`/schemas/ids/abc`): as in Confluent's JAX-RS, a route
/// that does not exist, 404 with error code 404.
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        match rejection {
            PathRejection::FailedToDeserializePathParams(e) => Self::http(
                StatusCode::NOT_FOUND,
                format!("HTTP 404 Not Found: {}", e.body_text()),
            ),
            other => Self::internal(other.body_text()),
        }
    }
}

impl From<diesel::result::Error> for ApiError {
    fn from(e: diesel::result::Error) -> Self {
        Self::internal(e)
    }
}

impl From<ferrybox::Error> for ApiError {
    fn from(e: ferrybox::Error) -> Self {
        Self::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error_code": self.code, "message": self.message });
        crate::api::registry_json(self.status, &body)
    }
}
