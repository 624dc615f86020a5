//! Logging in against the cached users, and the sessions that follow.

use std::sync::LazyLock;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use ferrybox::http::ApiError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::schema::{cached_users, sessions};

/// The issuer the session tokens name (`iss`); services that verify them expect it.
pub const TOKEN_ISSUER: &str = "auth-service";

/// `POST /login`.
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"email": "ada@example.com", "password": "analytical-engine"}))]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Email address.
    pub email: String,
    /// Password.
    #[schema(format = Password)]
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("email", &self.email)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// A session issued by a successful login.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Session {
    /// The bearer token. Shown once; only its hash is stored.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// The logged-in user.
    pub user_id: Uuid,
    /// When the token stops working.
    pub expires_at: DateTime<Utc>,
}

/// Who a valid token belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionInfo {
    /// The logged-in user.
    pub user_id: Uuid,
    /// When the token stops working.
    pub expires_at: DateTime<Utc>,
}

diesel::define_sql_function! {
    /// SQL `lower()`: emails compare case-insensitively, matching the index.
    fn lower(x: diesel::sql_types::Nullable<diesel::sql_types::Text>) -> diesel::sql_types::Nullable<diesel::sql_types::Text>;
}

fn invalid_credentials() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNAUTHORIZED,
        "invalid_credentials",
        "email or password is wrong, or the account is not active",
    )
}

/// A hash to verify against when the user does not exist, so that case takes as long as a
/// wrong password.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    let salt = SaltString::encode_b64(b"ferrybox-dummy-salt").expect("static salt");
    Argon2::default()
        .hash_password(b"no such user", &salt)
        .map(|h| h.to_string())
        .unwrap_or_default()
});

/// The hash an unknown account is checked against. Its algorithm, version and parameters are
/// user-service's, so a login for an account that does not exist costs what a wrong password
/// costs.
pub fn dummy_hash() -> &'static str {
    &DUMMY_HASH
}

async fn verify(password: String, hash: Option<String>) -> bool {
    tokio::task::spawn_blocking(move || {
        let exists = hash.is_some();
        let hash = hash.unwrap_or_else(|| DUMMY_HASH.clone());
        let ok = PasswordHash::new(&hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false);
        ok && exists
    })
    .await
    .unwrap_or(false)
}

fn token_hash(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

/// Checks the credentials against an active cached user and opens a session: a signed token
/// (see `ferrybox::token`) whose hash is stored, so suspending or deleting the user revokes it.
pub async fn login(
    pool: &ferrybox::db::PgPool,
    credentials: Credentials,
    ttl: chrono::Duration,
    key: &ferrybox::token::TokenKey,
) -> Result<Session, ApiError> {
    let mut conn = ferrybox::db::connection(pool).await?;
    let email = credentials.email.trim().to_lowercase();
    let found: Option<(Uuid, Option<String>)> = cached_users::table
        .filter(lower(cached_users::email).eq(&email))
        .filter(cached_users::status.eq("active"))
        .order(cached_users::version.desc())
        .select((cached_users::id, cached_users::password_hash))
        .first(&mut conn)
        .await
        .optional()
        .map_err(ferrybox::Error::from)?;
    let (user_id, hash) = match found {
        Some((id, hash)) => (Some(id), hash),
        None => (None, None),
    };
    if !verify(credentials.password, hash).await {
        return Err(invalid_credentials());
    }
    let user_id = user_id.ok_or_else(invalid_credentials)?;
    let expires_at = Utc::now() + ttl;
    let token = key.issue(user_id, Uuid::now_v7(), expires_at)?;
    diesel::insert_into(sessions::table)
        .values((
            sessions::token_hash.eq(token_hash(&token)),
            sessions::user_id.eq(user_id),
            sessions::expires_at.eq(expires_at),
        ))
        .execute(&mut conn)
        .await
        .map_err(ferrybox::Error::from)?;
    Ok(Session {
        token,
        token_type: "Bearer".into(),
        user_id,
        expires_at,
    })
}

/// The session a bearer token opens, if its signature and expiry check out, its session was not
/// revoked and its user is still active.
pub async fn session(
    pool: &ferrybox::db::PgPool,
    token: &str,
    key: &ferrybox::token::TokenKey,
) -> Result<SessionInfo, ApiError> {
    let invalid = || {
        ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the token is unknown, expired or revoked",
        )
    };
    // A forged or expired token is refused before the database is asked.
    key.verify(token).map_err(|_| invalid())?;
    let mut conn = ferrybox::db::connection(pool).await?;
    let found: Option<(Uuid, DateTime<Utc>)> = sessions::table
        .inner_join(cached_users::table.on(cached_users::id.eq(sessions::user_id)))
        .filter(sessions::token_hash.eq(token_hash(token)))
        .filter(sessions::expires_at.gt(diesel::dsl::now))
        .filter(cached_users::status.eq("active"))
        .select((sessions::user_id, sessions::expires_at))
        .first(&mut conn)
        .await
        .optional()
        .map_err(ferrybox::Error::from)?;
    found
        .map(|(user_id, expires_at)| SessionInfo {
            user_id,
            expires_at,
        })
        .ok_or_else(invalid)
}
