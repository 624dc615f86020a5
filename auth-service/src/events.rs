//! What auth-service reads from user events: only the fields it needs. Extra fields the
//! producer adds are ignored, so compatible producer changes do not touch this service.

use serde::Deserialize;

/// The message types this service understands.
pub mod types {
    /// A user was registered.
    pub const REGISTERED: &str = "com.ferrybox.user.UserRegistered";
    /// A user's details changed.
    pub const UPDATED: &str = "com.ferrybox.user.UserUpdated";
    /// A user was suspended.
    pub const SUSPENDED: &str = "com.ferrybox.user.UserSuspended";
    /// A user was deleted.
    pub const DELETED: &str = "com.ferrybox.user.UserDeleted";
}

/// The full state carried by `UserRegistered` (always active) and `UserUpdated`.
#[derive(Debug, Clone, Deserialize)]
pub struct UserState {
    /// The user's id.
    pub user_id: String,
    /// The account's version.
    pub version: i64,
    /// Email address.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Argon2id PHC string.
    pub password_hash: String,
}

/// `UserUpdated`: the full state plus the status.
#[derive(Debug, Clone, Deserialize)]
pub struct UserUpdate {
    /// The state after the change.
    #[serde(flatten)]
    pub state: UserState,
    /// `active` or `suspended`.
    pub status: String,
}

/// `UserSuspended` and `UserDeleted`: only the id and the version matter here.
#[derive(Debug, Clone, Deserialize)]
pub struct UserRef {
    /// The user's id.
    pub user_id: String,
    /// The account's version.
    pub version: i64,
}
