//! Applying user events to the cache, inside the inbox transaction.
//!
//! Every write is conditional on the event's version being newer than the cached one, so a
//! stale event (a redrive, a replay, a reconciliation race) never overwrites a newer state.

use diesel::ExpressionMethods;
use diesel::query_dsl::methods::FilterDsl;
use diesel::upsert::excluded;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ferrybox::inbox::{Handler, HandlerError, ReceivedMessage};
use uuid::Uuid;

use crate::events::{UserRef, UserState, UserUpdate, types};
use crate::schema::{cached_users, sessions};

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
/// only status and version change (and a deleted user's details are cleared). A user who is
/// no longer active loses their sessions in the same transaction.
async fn upsert(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    version: i64,
    status: &str,
    details: Option<&UserState>,
) -> Result<(), HandlerError> {
    let newer = cached_users::version.lt(excluded(cached_users::version));
    let written = match details {
        Some(d) => {
            diesel::insert_into(cached_users::table)
                .values((
                    cached_users::id.eq(id),
                    cached_users::email.eq(&d.email),
                    cached_users::name.eq(&d.name),
                    cached_users::password_hash.eq(&d.password_hash),
                    cached_users::status.eq(status),
                    cached_users::version.eq(version),
                ))
                .on_conflict(cached_users::id)
                .do_update()
                .set((
                    cached_users::email.eq(excluded(cached_users::email)),
                    cached_users::name.eq(excluded(cached_users::name)),
                    cached_users::password_hash.eq(excluded(cached_users::password_hash)),
                    cached_users::status.eq(excluded(cached_users::status)),
                    cached_users::version.eq(excluded(cached_users::version)),
                    cached_users::updated_at.eq(diesel::dsl::now),
                ))
                .filter(newer)
                .execute(conn)
                .await?
        }
        None if status == "deleted" => {
            diesel::insert_into(cached_users::table)
                .values((
                    cached_users::id.eq(id),
                    cached_users::status.eq(status),
                    cached_users::version.eq(version),
                ))
                .on_conflict(cached_users::id)
                .do_update()
                .set((
                    cached_users::email.eq(None::<String>),
                    cached_users::name.eq(None::<String>),
                    cached_users::password_hash.eq(None::<String>),
                    cached_users::status.eq(excluded(cached_users::status)),
                    cached_users::version.eq(excluded(cached_users::version)),
                    cached_users::updated_at.eq(diesel::dsl::now),
                ))
                .filter(newer)
                .execute(conn)
                .await?
        }
        None => {
            diesel::insert_into(cached_users::table)
                .values((
                    cached_users::id.eq(id),
                    cached_users::status.eq(status),
                    cached_users::version.eq(version),
                ))
                .on_conflict(cached_users::id)
                .do_update()
                .set((
                    cached_users::status.eq(excluded(cached_users::status)),
                    cached_users::version.eq(excluded(cached_users::version)),
                    cached_users::updated_at.eq(diesel::dsl::now),
                ))
                .filter(newer)
                .execute(conn)
                .await?
        }
    };
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
