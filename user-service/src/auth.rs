//! Who is calling: a user with a session token from auth-service, or another service with the
//! service credential. Every change needs one or the other (registration too, unless
//! `open_registration` is on).

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use ferrybox::http::{ApiError, TokenDigest, bearer_token};
use ferrybox::token::TokenKey;
use secrecy::SecretString;
use uuid::Uuid;

use crate::schema::users;
use crate::users::Users;

/// The service whose session tokens this one accepts (the `iss` they must name): auth-service
/// logs users in.
pub const TOKEN_ISSUER: &str = "auth-service";

/// An authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Another service, with the service credential: may change any user.
    Service,
    /// A logged-in, active user: may change only themselves.
    User(Uuid),
}

impl Caller {
    /// Allowed to change `user`: the service, or that user.
    pub fn may_change(self, user: Uuid) -> Result<(), ApiError> {
        match self {
            Caller::Service => Ok(()),
            Caller::User(me) if me == user => Ok(()),
            Caller::User(_) => Err(forbidden()),
        }
    }

    /// Only the service may do this.
    pub fn must_be_service(self) -> Result<(), ApiError> {
        match self {
            Caller::Service => Ok(()),
            Caller::User(_) => Err(forbidden()),
        }
    }
}

fn forbidden() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "this token may not do that",
    )
}

fn unauthorized() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send Authorization: Bearer <a session token from auth-service, or the service credential>",
    )
}

/// What tokens are accepted.
pub struct Authenticator {
    /// The service credential.
    service: Option<TokenDigest>,
    /// Verifies auth-service's session tokens.
    tokens: Option<TokenKey>,
    /// Registration without a token.
    pub(crate) open_registration: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("service_credential", &self.service.is_some())
            .field("user_tokens", &self.tokens.is_some())
            .field("open_registration", &self.open_registration)
            .finish()
    }
}

impl Authenticator {
    /// Accepts `service_token` as the service credential and tokens signed with
    /// `token_secret` as users'.
    pub fn new(
        service_token: Option<&SecretString>,
        token_secret: Option<&SecretString>,
        open_registration: bool,
    ) -> ferrybox::Result<Self> {
        Ok(Self {
            service: service_token.map(TokenDigest::of),
            tokens: token_secret
                .map(|secret| TokenKey::new(secret, TOKEN_ISSUER))
                .transpose()?,
            open_registration,
        })
    }

    /// The caller a bearer token names; 401 when it names nobody we accept (no token, a
    /// forged or expired one, or a user who is suspended or deleted).
    pub async fn caller(&self, bearer: Option<&str>, users: &Users) -> Result<Caller, ApiError> {
        let token = bearer.ok_or_else(unauthorized)?;
        if self.service.is_some_and(|s| s.matches(token)) {
            return Ok(Caller::Service);
        }
        let claims = self
            .tokens
            .as_ref()
            .ok_or_else(unauthorized)?
            .verify(token)
            .map_err(|_| unauthorized())?;
        // The token may be valid and its user suspended or deleted since: this service owns
        // the users, so it asks its own table, not a cache.
        let mut conn = ferrybox::db::connection(&users.pool).await?;
        let active: bool = diesel::select(diesel::dsl::exists(
            users::table
                .filter(users::id.eq(claims.sub))
                .filter(users::status.eq("active")),
        ))
        .get_result(&mut conn)
        .await
        .map_err(ferrybox::Error::from)?;
        if active {
            Ok(Caller::User(claims.sub))
        } else {
            Err(unauthorized())
        }
    }
}

/// The authenticated caller of a request (rejects with 401).
impl FromRequestParts<Users> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, users: &Users) -> Result<Self, ApiError> {
        users.auth.caller(bearer_token(&parts.headers), users).await
    }
}
