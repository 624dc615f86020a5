//! Applying user events to the cache, inside the inbox transaction.
//!
//! Every write is conditional on the event's version being newer than the cached one, so a
//! stale event (a redrive, a replay, a reconciliation race) never overwrites a newer state.

use diesel::sql_types::{BigInt, Nullable, Text, Uuid as SqlUuid};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ferrybox::inbox::{Handler, HandlerError, ReceivedMessage};
use ferrybox::reconcile::{Cache, CachedEntry, Repair, SnapshotEntry};
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
                .map(drop)
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
                .map(drop)
            }
            types::SUSPENDED => {
                let r: UserRef = message.body()?;
                upsert(conn, user_id(&r.user_id)?, r.version, "suspended", None)
                    .await
                    .map(drop)
            }
            types::DELETED => {
                let r: UserRef = message.body()?;
                upsert(conn, user_id(&r.user_id)?, r.version, "deleted", None)
                    .await
                    .map(drop)
            }
            other => Err(HandlerError::permanent(format!(
                "unknown message type {other}"
            ))),
        }
    }
}

/// Writes the user's new state if `version` is newer than the cached one. Without `details`,
/// only status and version change; a deleted user's details are cleared. A user who is no
/// longer active loses their sessions in the same transaction. True when it wrote.
#[tracing::instrument(name = "cache upsert", skip(conn, details), fields(user_id = %id))]
async fn upsert(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    version: i64,
    status: &str,
    details: Option<&UserState>,
) -> Result<bool, HandlerError> {
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
        return Ok(false);
    }
    if status != "active" {
        diesel::delete(sessions::table.filter(sessions::user_id.eq(id)))
            .execute(conn)
            .await?;
    }
    Ok(true)
}

/// The cache as reconciliation sees it: every cached user's version, repaired from user-service's
/// snapshot with the same version-guarded write the events use.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserCache;

#[derive(diesel::QueryableByName)]
struct CachedRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    deleted: bool,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    updated_at: chrono::DateTime<chrono::Utc>,
}

impl Cache for UserCache {
    async fn entries(
        &self,
        conn: &mut AsyncPgConnection,
    ) -> Result<Vec<CachedEntry>, diesel::result::Error> {
        let rows: Vec<CachedRow> = diesel::sql_query(
            "SELECT id, version, status = 'deleted' AS deleted, updated_at FROM cached_users",
        )
        .load(conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| CachedEntry {
                key: r.id.to_string(),
                version: r.version,
                deleted: r.deleted,
                updated_at: r.updated_at,
            })
            .collect())
    }

    async fn repair(
        &self,
        conn: &mut AsyncPgConnection,
        entry: &SnapshotEntry,
    ) -> Result<Repair, HandlerError> {
        let id = user_id(&entry.key)?;
        let written = if entry.deleted {
            upsert(conn, id, entry.version, "deleted", None).await?
        } else {
            let UserUpdate { state, status } = serde_json::from_value(entry.state.clone())
                .map_err(|e| {
                    HandlerError::permanent(format!("snapshot state of {id} does not fit: {e}"))
                })?;
            if state.user_id != entry.key || state.version != entry.version {
                return Err(HandlerError::permanent(format!(
                    "snapshot state of {id} names user {} version {}",
                    state.user_id, state.version
                )));
            }
            if !matches!(status.as_str(), "active" | "suspended") {
                return Err(HandlerError::permanent(format!(
                    "unknown user status {status:?}"
                )));
            }
            upsert(conn, id, entry.version, &status, Some(&state)).await?
        };
        Ok(if written {
            Repair::Written
        } else {
            Repair::Newer
        })
    }
}
