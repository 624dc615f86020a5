//! Applying user events to the cache, inside the inbox transaction.
//!
//! Every write is conditional on the event's version being newer than the cached one, so a
//! stale event (a redrive, a replay, a reconciliation race) never overwrites a newer state.

use diesel::sql_types::{BigInt, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ferrybox::inbox::{Handler, HandlerError, ReceivedMessage};
use ferrybox::reconcile::{Cache, CachedEntry, Repair, SnapshotEntry};
use uuid::Uuid;

use crate::events::{UserRef, UserState, UserUpdate, types};

/// The inbox handler for user events.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserEvents;

fn user_id(raw: &str) -> Result<Uuid, HandlerError> {
    Uuid::parse_str(raw)
        .map_err(|e| HandlerError::permanent(format!("user_id {raw:?} is not a UUID: {e}")))
}

/// What one user event asks of the cache: the user's new status and version, and, for an
/// event that carries them, their details.
#[derive(Debug, Clone)]
struct CacheWrite {
    id: Uuid,
    version: i64,
    status: String,
    details: Option<UserState>,
}

impl CacheWrite {
    fn of(message: &ReceivedMessage) -> Result<Self, HandlerError> {
        let (state, status) = match message.envelope.message_type.as_str() {
            types::REGISTERED => {
                let state: UserState = message.body()?;
                (Ok(state), "active".to_owned())
            }
            types::UPDATED => {
                let UserUpdate { state, status } = message.body()?;
                if !matches!(status.as_str(), "active" | "suspended") {
                    return Err(HandlerError::permanent(format!(
                        "unknown user status {status:?}"
                    )));
                }
                (Ok(state), status)
            }
            types::SUSPENDED => (Err(message.body::<UserRef>()?), "suspended".to_owned()),
            types::DELETED => (Err(message.body::<UserRef>()?), "deleted".to_owned()),
            other => {
                return Err(HandlerError::permanent(format!(
                    "unknown message type {other}"
                )));
            }
        };
        Ok(match state {
            Ok(state) => Self {
                id: user_id(&state.user_id)?,
                version: state.version,
                status,
                details: Some(state),
            },
            Err(r) => Self {
                id: user_id(&r.user_id)?,
                version: r.version,
                status,
                details: None,
            },
        })
    }
}

impl Handler for UserEvents {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        message: &ReceivedMessage,
    ) -> Result<(), HandlerError> {
        upsert(conn, CacheWrite::of(message)?).await.map(drop)
    }

    /// The whole batch in one statement ([`upsert_batch`]). A message that does not decode
    /// fails the batch, and the consumer applies its messages one by one to set it apart.
    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        messages: &[&ReceivedMessage],
    ) -> Result<(), HandlerError> {
        let writes = messages
            .iter()
            .map(|m| CacheWrite::of(m))
            .collect::<Result<Vec<_>, _>>()?;
        // Each message's spans (its consumer span, with the write of its user inside) are
        // open while the statement writes them all: a request's trace still reaches the write
        // its event caused, as with a statement per message.
        let spans: Vec<(tracing::Span, tracing::Span)> = messages
            .iter()
            .zip(&writes)
            .map(|(message, write)| {
                let process = message.span();
                let upsert =
                    tracing::info_span!(parent: &process, "cache upsert", user_id = %write.id);
                (process, upsert)
            })
            .collect();
        let written = upsert_batch(conn, &writes).await;
        drop(spans);
        written.map(drop)
    }
}

/// [`upsert`] for a whole batch, in one statement, with the same outcome as writing its events
/// one by one in order: per user, the newest event newer than the cache sets status and
/// version, the details are the newest of those newer events that carry them (kept otherwise,
/// cleared for a deleted user), and a user any of them leaves not active loses their sessions.
/// Returns how many users were written.
async fn upsert_batch(
    conn: &mut AsyncPgConnection,
    writes: &[CacheWrite],
) -> Result<usize, HandlerError> {
    use diesel::sql_types::Array;
    if writes.is_empty() {
        return Ok(0);
    }
    let detail = |f: fn(&UserState) -> &str| {
        writes
            .iter()
            .map(|w| w.details.as_ref().map(f))
            .collect::<Vec<_>>()
    };
    #[derive(diesel::QueryableByName)]
    struct Written {
        #[diesel(sql_type = BigInt)]
        written: i64,
    }
    let written: Written = ferrybox::db::prepared(
        diesel::sql_query(UPSERT_BATCH_SQL)
            .bind::<Array<SqlUuid>, _>(writes.iter().map(|w| w.id).collect::<Vec<_>>())
            .bind::<Array<Nullable<Text>>, _>(detail(|d| &d.email))
            .bind::<Array<Nullable<Text>>, _>(detail(|d| &d.name))
            .bind::<Array<Nullable<Text>>, _>(detail(|d| &d.password_hash))
            .bind::<Array<Text>, _>(writes.iter().map(|w| w.status.as_str()).collect::<Vec<_>>())
            .bind::<Array<BigInt>, _>(writes.iter().map(|w| w.version).collect::<Vec<_>>()),
    )
    .get_result(conn)
    .await?;
    Ok(usize::try_from(written.written).unwrap_or(0))
}

/// Every part of the statement reads the cache as it was before it (one snapshot), so `newer`
/// is each event newer than the cached user, as writing them in order would have found. (Of
/// two events of one user in the batch out of version order, the older is not skipped here:
/// its status can only end sessions, never keep one.)
const UPSERT_BATCH_SQL: &str = "\
    WITH input AS ( \
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                             $6::bigint[]) \
            AS u(id, email, name, password_hash, status, version)), \
    newer AS ( \
        SELECT i.* FROM input AS i LEFT JOIN cached_users AS c ON c.id = i.id \
        WHERE c.id IS NULL OR i.version > c.version), \
    latest AS ( \
        SELECT DISTINCT ON (id) id, status, version FROM newer ORDER BY id, version DESC), \
    details AS ( \
        SELECT DISTINCT ON (id) id, email, name, password_hash FROM newer \
        WHERE email IS NOT NULL ORDER BY id, version DESC), \
    written AS ( \
        INSERT INTO cached_users (id, email, name, password_hash, status, version) \
        SELECT l.id, CASE WHEN l.status = 'deleted' THEN NULL ELSE d.email END, \
               CASE WHEN l.status = 'deleted' THEN NULL ELSE d.name END, \
               CASE WHEN l.status = 'deleted' THEN NULL ELSE d.password_hash END, \
               l.status, l.version \
        FROM latest AS l LEFT JOIN details AS d ON d.id = l.id \
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
        WHERE cached_users.version < EXCLUDED.version \
        RETURNING 1), \
    ended AS ( \
        DELETE FROM sessions WHERE user_id IN (SELECT id FROM newer WHERE status <> 'active') \
        RETURNING 1) \
    SELECT (SELECT count(*) FROM written) AS written";

/// Writes the user's new state if its version is newer than the cached one. Without details,
/// only status and version change; a deleted user's details are cleared. A user who is no
/// longer active loses their sessions in the same transaction. True when it wrote. (The batch
/// statement, with one write: one statement says what a write does.)
#[tracing::instrument(name = "cache upsert", skip_all, fields(user_id = %write.id))]
async fn upsert(conn: &mut AsyncPgConnection, write: CacheWrite) -> Result<bool, HandlerError> {
    let (id, version) = (write.id, write.version);
    let written = upsert_batch(conn, std::slice::from_ref(&write)).await? > 0;
    if !written {
        tracing::debug!(%id, version, "cached user is newer; event skipped");
    }
    Ok(written)
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
            let write = CacheWrite {
                id,
                version: entry.version,
                status: "deleted".to_owned(),
                details: None,
            };
            upsert(conn, write).await?
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
            let write = CacheWrite {
                id,
                version: entry.version,
                status,
                details: Some(state),
            };
            upsert(conn, write).await?
        };
        Ok(if written {
            Repair::Written
        } else {
            Repair::Newer
        })
    }
}
