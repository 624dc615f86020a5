//! User accounts: validation, and each change written together with its event.
//!
//! Every change runs in one transaction that updates the `users` row, bumps its version and
//! enqueues the matching event in the outbox. The version is the row's own counter, so a
//! consumer can always tell a newer state from an older one.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::{AsyncConnection, RunQueryDsl};
use ferrybox::http::ApiError;
use ferrybox::{AvroCodec, Event, Outbox};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::{UserDeleted, UserRegistered, UserSuspended, UserUpdated};
use crate::schema::{deleted_users, users};

/// A user as the API shows it (never the password hash).
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Queryable, Selectable, utoipa::ToSchema,
)]
#[diesel(table_name = users)]
pub struct User {
    /// The user's id.
    pub id: Uuid,
    /// Email address.
    pub email: String,
    /// Display name.
    pub name: String,
    /// `active` or `suspended`.
    pub status: String,
    /// Increases with every change.
    pub version: i64,
    /// When the account was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Preferred locale (BCP 47), when given.
    pub locale: Option<String>,
}

/// `POST /users`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"email": "ada@example.com", "name": "Ada Lovelace", "password": "analytical-engine"}))]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Email address.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Plain-text password; hashed before it touches the database.
    #[schema(format = Password)]
    pub password: String,
    /// Preferred locale (BCP 47), optional.
    #[serde(default)]
    pub locale: Option<String>,
}

/// `PATCH /users/{id}`: only the fields given change.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// New email address.
    pub email: Option<String>,
    /// New display name.
    pub name: Option<String>,
    /// New password.
    #[schema(format = Password)]
    pub password: Option<String>,
}

/// `POST /users/{id}/suspend`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Suspension {
    /// Why, for the record.
    pub reason: Option<String>,
}

/// Checks an email address; returns it trimmed.
pub fn valid_email(email: &str) -> Result<String, ApiError> {
    let email = email.trim();
    if email.len() > 254 || !email_address::EmailAddress::is_valid(email) {
        return Err(ApiError::invalid(
            "invalid_email",
            "email is not a valid address",
        ));
    }
    Ok(email.to_owned())
}

/// Checks a display name; returns it trimmed.
pub fn valid_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid(
            "invalid_name",
            "name must be 1 to 200 characters",
        ));
    }
    Ok(name.to_owned())
}

/// Checks a locale tag's shape (BCP 47 subtags: letters and digits separated by '-').
pub fn valid_locale(locale: &str) -> Result<String, ApiError> {
    let locale = locale.trim();
    let well_formed = (2..=35).contains(&locale.len())
        && locale.split('-').all(|part| {
            !part.is_empty() && part.len() <= 8 && part.chars().all(|c| c.is_ascii_alphanumeric())
        });
    if !well_formed {
        return Err(ApiError::invalid(
            "invalid_locale",
            "locale must be a BCP 47 tag such as en or fr-CA",
        ));
    }
    Ok(locale.to_owned())
}

/// Checks a password's length.
pub fn valid_password(password: &str) -> Result<(), ApiError> {
    let n = password.chars().count();
    if !(8..=256).contains(&n) {
        return Err(ApiError::invalid(
            "invalid_password",
            "password must be 8 to 256 characters",
        ));
    }
    Ok(())
}

/// Everything a change needs: the pool, the outbox, the codec and the topic.
#[derive(Clone)]
pub struct Users {
    pub(crate) pool: ferrybox::db::PgPool,
    pub(crate) outbox: Outbox,
    pub(crate) codec: AvroCodec,
    pub(crate) topic: String,
    pub(crate) auth: std::sync::Arc<crate::auth::Authenticator>,
}

/// An error inside a change transaction.
#[derive(Debug)]
enum TxError {
    Api(ApiError),
    Db(DieselError),
    Ferrybox(ferrybox::Error),
}

impl From<DieselError> for TxError {
    fn from(e: DieselError) -> Self {
        TxError::Db(e)
    }
}

impl From<ferrybox::Error> for TxError {
    fn from(e: ferrybox::Error) -> Self {
        TxError::Ferrybox(e)
    }
}

impl From<ApiError> for TxError {
    fn from(e: ApiError) -> Self {
        TxError::Api(e)
    }
}

impl From<TxError> for ApiError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::Api(e) => e,
            TxError::Db(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
                ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    "email_taken",
                    "a user with this email exists",
                )
            }
            TxError::Db(e) => ferrybox::Error::from(e).into(),
            TxError::Ferrybox(e) => e.into(),
        }
    }
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("no user {id}"))
}

impl Users {
    async fn conn(&self) -> Result<ferrybox::db::PooledConnection, ApiError> {
        Ok(ferrybox::db::connection(&self.pool).await?)
    }

    async fn encode<E: Event>(&self, event: &E) -> Result<ferrybox::OutgoingMessage, TxError> {
        self.codec
            .message(&self.topic, event)
            .await
            .map_err(|e| TxError::Ferrybox(ferrybox::Error::Codec(e)))
    }

    /// Reads one user.
    pub async fn get(&self, id: Uuid) -> Result<User, ApiError> {
        let mut conn = self.conn().await?;
        users::table
            .find(id)
            .select(User::as_select())
            .first(&mut conn)
            .await
            .optional()
            .map_err(|e| ApiError::from(ferrybox::Error::from(e)))?
            .ok_or_else(|| not_found(id))
    }

    /// Creates a user and publishes `UserRegistered`.
    pub async fn register(&self, input: NewUser) -> Result<User, ApiError> {
        let email = valid_email(&input.email)?;
        let name = valid_name(&input.name)?;
        valid_password(&input.password)?;
        let locale = input.locale.as_deref().map(valid_locale).transpose()?;
        let password_hash = crate::password::hash(input.password)
            .await
            .map_err(ApiError::internal)?;
        let id = Uuid::now_v7();
        let event = UserRegistered {
            user_id: id.to_string(),
            version: 1,
            email: email.clone(),
            name: name.clone(),
            password_hash: password_hash.clone(),
            locale: locale.clone(),
        };
        let message = self.encode(&event).await?;
        let mut conn = self.conn().await?;
        let outbox = &self.outbox;
        let user = conn
            .transaction::<_, TxError, _>(async |tx| {
                let user = diesel::insert_into(users::table)
                    .values((
                        users::id.eq(id),
                        users::email.eq(&email),
                        users::name.eq(&name),
                        users::password_hash.eq(&password_hash),
                        users::status.eq("active"),
                        users::version.eq(1),
                        users::locale.eq(&locale),
                    ))
                    .returning(User::as_returning())
                    .get_result(tx)
                    .await?;
                outbox.enqueue(tx, &message).await?;
                Ok(user)
            })
            .await?;
        Ok(user)
    }

    /// Changes a user's details and publishes `UserUpdated` with the full new state.
    pub async fn update(&self, id: Uuid, patch: UserPatch) -> Result<User, ApiError> {
        let email = patch.email.as_deref().map(valid_email).transpose()?;
        let name = patch.name.as_deref().map(valid_name).transpose()?;
        if let Some(p) = &patch.password {
            valid_password(p)?;
        }
        if email.is_none() && name.is_none() && patch.password.is_none() {
            return Err(ApiError::invalid(
                "empty_patch",
                "give at least one of email, name, password",
            ));
        }
        let new_hash = match patch.password {
            Some(p) => Some(crate::password::hash(p).await.map_err(ApiError::internal)?),
            None => None,
        };
        let mut conn = self.conn().await?;
        let user = conn
            .transaction::<_, TxError, _>(async |tx| {
                // The row lock orders concurrent changes to one user, so versions and events
                // follow commit order.
                let (current_hash,): (String,) = users::table
                    .find(id)
                    .select((users::password_hash,))
                    .for_update()
                    .first(tx)
                    .await
                    .optional()?
                    .ok_or_else(|| not_found(id))?;
                let password_hash = new_hash.unwrap_or(current_hash);
                let user: User = diesel::update(users::table.find(id))
                    .set((
                        email.as_ref().map(|e| users::email.eq(e)),
                        name.as_ref().map(|n| users::name.eq(n)),
                        users::password_hash.eq(&password_hash),
                        users::version.eq(users::version + 1),
                        users::updated_at.eq(diesel::dsl::now),
                    ))
                    .returning(User::as_returning())
                    .get_result(tx)
                    .await?;
                let event = UserUpdated {
                    user_id: id.to_string(),
                    version: user.version,
                    email: user.email.clone(),
                    name: user.name.clone(),
                    password_hash,
                    status: user.status.clone(),
                };
                self.outbox.enqueue(tx, &self.encode(&event).await?).await?;
                Ok(user)
            })
            .await?;
        Ok(user)
    }

    /// Suspends a user and publishes `UserSuspended`. Suspending a suspended user changes
    /// nothing and publishes nothing.
    pub async fn suspend(&self, id: Uuid, suspension: Suspension) -> Result<User, ApiError> {
        let reason = suspension
            .reason
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty());
        if reason.as_ref().is_some_and(|r| r.chars().count() > 500) {
            return Err(ApiError::invalid(
                "invalid_reason",
                "reason must be at most 500 characters",
            ));
        }
        let mut conn = self.conn().await?;
        let user = conn
            .transaction::<_, TxError, _>(async |tx| {
                let current: User = users::table
                    .find(id)
                    .select(User::as_select())
                    .for_update()
                    .first(tx)
                    .await
                    .optional()?
                    .ok_or_else(|| not_found(id))?;
                if current.status == "suspended" {
                    return Ok(current);
                }
                let user: User = diesel::update(users::table.find(id))
                    .set((
                        users::status.eq("suspended"),
                        users::version.eq(users::version + 1),
                        users::updated_at.eq(diesel::dsl::now),
                    ))
                    .returning(User::as_returning())
                    .get_result(tx)
                    .await?;
                let event = UserSuspended {
                    user_id: id.to_string(),
                    version: user.version,
                    reason: reason.clone(),
                };
                self.outbox.enqueue(tx, &self.encode(&event).await?).await?;
                Ok(user)
            })
            .await?;
        Ok(user)
    }

    /// Deletes a user and publishes `UserDeleted`.
    pub async fn delete(&self, id: Uuid) -> Result<(), ApiError> {
        let mut conn = self.conn().await?;
        conn.transaction::<_, TxError, _>(async |tx| {
            let version: i64 = diesel::delete(users::table.find(id))
                .returning(users::version)
                .get_result(tx)
                .await
                .optional()?
                .ok_or_else(|| not_found(id))?;
            diesel::insert_into(deleted_users::table)
                .values((
                    deleted_users::id.eq(id),
                    deleted_users::version.eq(version + 1),
                ))
                .execute(tx)
                .await?;
            let event = UserDeleted {
                user_id: id.to_string(),
                version: version + 1,
            };
            self.outbox.enqueue(tx, &self.encode(&event).await?).await?;
            Ok(())
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_accepts_good_input_and_names_the_problem() {
        assert_eq!(
            valid_email("  ada@example.com ").unwrap(),
            "ada@example.com"
        );
        assert_eq!(
            valid_email("not-an-email").unwrap_err().code,
            "invalid_email"
        );
        assert_eq!(
            valid_email(&format!("{}@example.com", "a".repeat(250)))
                .unwrap_err()
                .code,
            "invalid_email"
        );
        assert_eq!(valid_name(" Ada ").unwrap(), "Ada");
        assert_eq!(valid_name("   ").unwrap_err().code, "invalid_name");
        assert!(valid_password("correct horse").is_ok());
        assert_eq!(
            valid_password("short").unwrap_err().code,
            "invalid_password"
        );
    }
}
