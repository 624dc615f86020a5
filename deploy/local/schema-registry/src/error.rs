//! Errors in Confluent's shape: an HTTP status plus `{"error_code": N, "message": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Subject not found.
pub const SUBJECT_NOT_FOUND: u32 = 40401;
/// Version not found.
pub const VERSION_NOT_FOUND: u32 = 40402;
/// Schema not found.
pub const SCHEMA_NOT_FOUND: u32 = 40403;
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
