//! The full snapshot of users for reconciliation: every live user with its state and version,
//! and every deleted one as a tombstone, in id order.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Jsonb, Nullable, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ferrybox::reconcile::{SnapshotEntry, SnapshotSource};
use uuid::Uuid;

/// The name the snapshot carries.
pub const SOURCE: &str = crate::startup::SOURCE;

/// Serves `users` and `deleted_users` as a snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserSnapshot;

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Bool)]
    deleted: bool,
    #[diesel(sql_type = Nullable<Jsonb>)]
    state: Option<serde_json::Value>,
}

impl SnapshotSource for UserSnapshot {
    async fn page(
        &self,
        conn: &mut AsyncPgConnection,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SnapshotEntry>, diesel::result::Error> {
        // Keys are the ids as text; PostgreSQL orders uuids as their lowercase text sorts.
        let after = after.and_then(|a| Uuid::parse_str(a).ok());
        // The state has the fields of `UserUpdated` (the full state and the status).
        let rows: Vec<Row> = diesel::sql_query(
            "SELECT id, version, deleted, state FROM ( \
                 SELECT id, version, false AS deleted, jsonb_build_object( \
                     'user_id', id, 'version', version, 'email', email, 'name', name, \
                     'password_hash', password_hash, 'status', status, 'locale', locale) AS state \
                 FROM users WHERE $1::uuid IS NULL OR id > $1 \
                 UNION ALL \
                 SELECT id, version, true, NULL FROM deleted_users WHERE $1::uuid IS NULL OR id > $1 \
             ) AS entities ORDER BY id LIMIT $2",
        )
        .bind::<Nullable<SqlUuid>, _>(after)
        .bind::<BigInt, _>(limit)
        .load(conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| SnapshotEntry {
                key: r.id.to_string(),
                version: r.version,
                deleted: r.deleted,
                state: r.state.unwrap_or(serde_json::Value::Null),
            })
            .collect())
    }
}
