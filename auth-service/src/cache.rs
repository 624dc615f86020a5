//! Applying user events to the cache, inside the inbox transaction.
//!
//! Every write is conditional on the event's version being newer than the cached one, so a
//! stale event (a redrive, a replay, a reconciliation race) never overwrites a newer state.

use diesel::sql_types::{BigInt, Nullable, Text, Uuid as SqlUuid};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ferrybox::inbox::{Handler, HandlerError, ReceivedMessage};
use uuid::Uuid;

use crate::events::{UserRef, UserState, UserUpdate, types};
use crate::schema::sessions;

/// The inbox handler for user events.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserEvents;

fn user_id(raw: &str) -> Result<Uuid, HandlerError> {
    Uuid::parse_str(raw)
        .map_err(|e| HandlerError::permanent(format!("user_id {raw:?} is not a UUID: {e}")))
}

impl Handler for UserEvents {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        message: &ReceivedMessage,
    ) -> Result<(), HandlerError> {
        match message.envelope.message_type.as_str() {
            types::REGISTERED => {
                let state: UserState = message.body()?;
                upsert(
                    conn,
                    user_id(&state.user_id)?,
                    state.version,
                    "active",
                    Some(&state),
                )
                .await
            }
            types::UPDATED => {
                let UserUpdate { state, status } = message.body()?;
                if !matches!(status.as_str(), "active" | "suspended") {
                    return Err(HandlerError::permanent(format!(
                        "unknown user status {status:?}"
                    )));
                }
                upsert(
                    conn,
                    user_id(&state.user_id)?,
                    state.version,
                    &status,
                    Some(&state),
                )
                .await
            }
            types::SUSPENDED => {
                let r: UserRef = message.body()?;
                upsert(conn, user_id(&r.user_id)?, r.version, "suspended", None).await
            }
            types::DELETED => {
                let r: UserRef = message.body()?;
                upsert(conn, user_id(&r.user_id)?, r.version, "deleted", None).await
            }
            other => Err(HandlerError::permanent(format!(
                "unknown message type {other}"
            ))),
        }
    }
}

/// Writes the user's new state if `version` is newer than the cached one. Without `details`,
/// only status and version change; a deleted user's details are cleared. A user who is no
/// longer active loses their sessions in the same transaction.
async fn upsert(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    version: i64,
    status: &str,
    details: Option<&UserState>,
) -> Result<(), HandlerError> {
    let written = diesel::sql_query(
        "INSERT INTO cached_users (id, email, name, password_hash, status, version) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (id) DO UPDATE SET \
             email = CASE WHEN EXCLUDED.status = 'deleted' THEN NULL \
                          ELSE COALESCE(EXCLUDED.email, cached_users.email) END, \
             name = CASE WHEN EXCLUDED.status = 'deleted' THEN NULL \
                         ELSE COALESCE(EXCLUDED.name, cached_users.name) END, \
             password_hash = CASE WHEN EXCLUDED.status = 'deleted' THEN NULL \
                                  ELSE COALESCE(EXCLUDED.password_hash, cached_users.password_hash) END, \
             status = EXCLUDED.status, \
             version = EXCLUDED.version, \
             updated_at = now() \
         WHERE cached_users.version < EXCLUDED.version",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<Nullable<Text>, _>(details.map(|d| d.email.as_str()))
    .bind::<Nullable<Text>, _>(details.map(|d| d.name.as_str()))
    .bind::<Nullable<Text>, _>(details.map(|d| d.password_hash.as_str()))
    .bind::<Text, _>(status)
    .bind::<BigInt, _>(version)
    .execute(conn)
    .await?;
    if written == 0 {
        tracing::debug!(%id, version, "cached user is newer; event skipped");
        return Ok(());
    }
    if status != "active" {
        diesel::delete(sessions::table.filter(sessions::user_id.eq(id)))
            .execute(conn)
            .await?;
    }
    Ok(())
}
