//! The registry's storage in PostgreSQL.

use diesel::sql_types::{Bool, Integer, Text};
use diesel::{OptionalExtension, QueryableByName};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::error::ApiError;
use ferrybox::contract::Level;

/// One version of a subject.
#[derive(Debug, Clone, QueryableByName)]
pub struct SubjectVersion {
    /// The subject.
    #[diesel(sql_type = Text)]
    pub subject: String,
    /// Its version number.
    #[diesel(sql_type = Integer)]
    pub version: i32,
    /// The global schema id.
    #[diesel(sql_type = Integer)]
    pub id: i32,
    /// The schema text.
    #[diesel(sql_type = Text)]
    pub schema: String,
    /// AVRO, JSON or PROTOBUF.
    #[diesel(sql_type = Text)]
    pub schema_type: String,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Num {
    #[diesel(sql_type = Integer)]
    n: i32,
}

#[derive(QueryableByName)]
struct SchemaText {
    #[diesel(sql_type = Text)]
    schema: String,
    #[diesel(sql_type = Text)]
    schema_type: String,
}

/// One version of a subject with its soft-delete mark.
#[derive(Debug, Clone, QueryableByName)]
struct VersionRow {
    #[diesel(sql_type = Integer)]
    version: i32,
    #[diesel(sql_type = Integer)]
    schema_id: i32,
    #[diesel(sql_type = Bool)]
    deleted: bool,
}

const VERSION_SELECT: &str = "SELECT v.subject, v.version, s.id, s.schema, s.schema_type \
     FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id";

/// Which subject versions a read sees: Confluent's `deleted` and `deletedOnly` parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Include {
    /// Live versions only (the default).
    #[default]
    Live,
    /// Live and soft-deleted versions (`deleted=true`).
    WithDeleted,
    /// Soft-deleted versions only (`deletedOnly=true`).
    DeletedOnly,
}

impl Include {
    /// From the two query parameters; `deletedOnly` wins, as in Confluent's registry.
    pub fn from_flags(deleted: bool, deleted_only: bool) -> Self {
        match (deleted, deleted_only) {
            (_, true) => Include::DeletedOnly,
            (true, false) => Include::WithDeleted,
            (false, false) => Include::Live,
        }
    }

    /// The SQL condition on `registry_subject_versions` aliased `v`.
    fn condition(self) -> &'static str {
        match self {
            Include::Live => "NOT v.deleted",
            Include::WithDeleted => "true",
            Include::DeletedOnly => "v.deleted",
        }
    }
}

/// The subjects with a version `include` sees; with [`Include::DeletedOnly`], the subjects
/// that were soft-deleted (that have versions, none of them live).
pub async fn subjects(
    conn: &mut AsyncPgConnection,
    include: Include,
) -> Result<Vec<String>, ApiError> {
    let having = match include {
        Include::Live => "bool_or(NOT v.deleted)",
        Include::WithDeleted => "true",
        Include::DeletedOnly => "bool_and(v.deleted)",
    };
    let rows: Vec<Name> = diesel::sql_query(format!(
        "SELECT v.subject AS name FROM registry_subject_versions v \
         GROUP BY v.subject HAVING {having} ORDER BY 1"
    ))
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.name).collect())
}

/// A subject's live versions, oldest first; 40401 when it has none.
pub async fn versions(
    conn: &mut AsyncPgConnection,
    subject: &str,
) -> Result<Vec<SubjectVersion>, ApiError> {
    versions_including(conn, subject, Include::Live).await
}

/// A subject's versions that `include` sees, oldest first; 40401 when there are none.
pub async fn versions_including(
    conn: &mut AsyncPgConnection,
    subject: &str,
    include: Include,
) -> Result<Vec<SubjectVersion>, ApiError> {
    let rows: Vec<SubjectVersion> = diesel::sql_query(format!(
        "{VERSION_SELECT} WHERE v.subject = $1 AND {} ORDER BY v.version",
        include.condition()
    ))
    .bind::<Text, _>(subject)
    .load(conn)
    .await?;
    if rows.is_empty() {
        return Err(ApiError::subject_not_found(subject));
    }
    Ok(rows)
}

/// One version (`None` for the latest) of a subject, among those `include` sees.
pub async fn version(
    conn: &mut AsyncPgConnection,
    subject: &str,
    version: Option<i32>,
    include: Include,
) -> Result<SubjectVersion, ApiError> {
    let all = versions_including(conn, subject, include).await?;
    match version {
        None => Ok(all
            .into_iter()
            .last()
            .ok_or_else(|| ApiError::subject_not_found(subject))?),
        Some(v) => all
            .into_iter()
            .find(|row| row.version == v)
            .ok_or_else(|| ApiError::version_not_found(v)),
    }
}

/// A schema by its global id.
pub async fn schema_by_id(
    conn: &mut AsyncPgConnection,
    id: i32,
) -> Result<(String, String), ApiError> {
    let row: Option<SchemaText> =
        diesel::sql_query("SELECT schema, schema_type FROM registry_schemas WHERE id = $1")
            .bind::<Integer, _>(id)
            .get_result(conn)
            .await
            .optional()?;
    row.map(|r| (r.schema, r.schema_type))
        .ok_or_else(|| ApiError::schema_not_found(id))
}

/// The subject versions `include` sees that use a schema id.
pub async fn usages(
    conn: &mut AsyncPgConnection,
    id: i32,
    include: Include,
) -> Result<Vec<SubjectVersion>, ApiError> {
    schema_by_id(conn, id).await?;
    Ok(diesel::sql_query(format!(
        "{VERSION_SELECT} WHERE s.id = $1 AND {} ORDER BY v.subject, v.version",
        include.condition()
    ))
    .bind::<Integer, _>(id)
    .load(conn)
    .await?)
}

/// The version of `subject` holding exactly `schema` among those `include` sees, if any.
pub async fn lookup(
    conn: &mut AsyncPgConnection,
    subject: &str,
    schema: &str,
    include: Include,
) -> Result<Option<SubjectVersion>, ApiError> {
    Ok(diesel::sql_query(format!(
        "{VERSION_SELECT} WHERE v.subject = $1 AND s.schema = $2 AND {} ORDER BY v.version LIMIT 1",
        include.condition()
    ))
    .bind::<Text, _>(subject)
    .bind::<Text, _>(schema)
    .get_result(conn)
    .await
    .optional()?)
}

/// A subject's own level (`Some(subject)`) or the global one (`None`); `None` when unset.
pub async fn level(
    conn: &mut AsyncPgConnection,
    subject: Option<&str>,
) -> Result<Option<Level>, ApiError> {
    let row: Option<Name> =
        diesel::sql_query("SELECT compatibility AS name FROM registry_config WHERE subject = $1")
            .bind::<Text, _>(subject.unwrap_or(""))
            .get_result(conn)
            .await
            .optional()?;
    row.map(|r| r.name.parse::<Level>().map_err(ApiError::internal))
        .transpose()
}

/// The level that applies to `subject`: its own, else the global one.
pub async fn effective_level(
    conn: &mut AsyncPgConnection,
    subject: &str,
) -> Result<Level, ApiError> {
    match level(conn, Some(subject)).await? {
        Some(l) => Ok(l),
        None => Ok(level(conn, None).await?.unwrap_or(Level::Backward)),
    }
}

/// Sets a subject's level, or the global one.
pub async fn set_level(
    conn: &mut AsyncPgConnection,
    subject: Option<&str>,
    level: Level,
) -> Result<(), ApiError> {
    diesel::sql_query(
        "INSERT INTO registry_config (subject, compatibility) VALUES ($1, $2) \
         ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility",
    )
    .bind::<Text, _>(subject.unwrap_or(""))
    .bind::<Text, _>(level.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes a subject's own level, so the global one applies again.
pub async fn delete_level(conn: &mut AsyncPgConnection, subject: &str) -> Result<bool, ApiError> {
    let n = diesel::sql_query("DELETE FROM registry_config WHERE subject = $1 AND subject <> ''")
        .bind::<Text, _>(subject)
        .execute(conn)
        .await?;
    Ok(n > 0)
}

/// Takes the per-subject lock that serializes registrations and deletes, until `tx` ends.
async fn lock_subject(tx: &mut AsyncPgConnection, subject: &str) -> Result<(), ApiError> {
    diesel::sql_query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind::<Text, _>(subject)
        .execute(tx)
        .await?;
    Ok(())
}

/// Every version of a subject, soft-deleted or not, oldest first.
async fn version_rows(
    tx: &mut AsyncPgConnection,
    subject: &str,
) -> Result<Vec<VersionRow>, ApiError> {
    Ok(diesel::sql_query(
        "SELECT version, schema_id, deleted FROM registry_subject_versions \
         WHERE subject = $1 ORDER BY version",
    )
    .bind::<Text, _>(subject)
    .load(tx)
    .await?)
}

/// Removes the schemas among `ids` that no subject version uses any more: a hard delete
/// removes the schema id with its last use, as Confluent's does.
async fn drop_unused_schemas(tx: &mut AsyncPgConnection, ids: &[i32]) -> Result<(), ApiError> {
    diesel::sql_query(
        "DELETE FROM registry_schemas s WHERE s.id = ANY($1) \
         AND NOT EXISTS (SELECT 1 FROM registry_subject_versions v WHERE v.schema_id = s.id)",
    )
    .bind::<diesel::sql_types::Array<Integer>, _>(ids)
    .execute(tx)
    .await?;
    Ok(())
}

/// Deletes a subject and returns the numbers of the versions deleted, as Confluent's registry
/// does: a soft delete (`permanent` false) marks its live versions deleted and removes its
/// compatibility level (40404 when it was soft-deleted already); a hard delete removes the
/// versions a soft delete marked, and the schemas nothing else uses (40405 while any version
/// is live). 40401 when the subject has no versions at all.
pub async fn delete_subject(
    conn: &mut AsyncPgConnection,
    subject: &str,
    permanent: bool,
) -> Result<Vec<i32>, ApiError> {
    conn.transaction::<_, ApiError, _>(async |tx| {
        lock_subject(tx, subject).await?;
        let rows = version_rows(tx, subject).await?;
        if rows.is_empty() {
            return Err(ApiError::subject_not_found(subject));
        }
        let live: Vec<i32> = rows.iter().filter(|r| !r.deleted).map(|r| r.version).collect();
        if permanent {
            if !live.is_empty() {
                return Err(ApiError::subject_not_soft_deleted(subject));
            }
            diesel::sql_query("DELETE FROM registry_subject_versions WHERE subject = $1")
                .bind::<Text, _>(subject)
                .execute(tx)
                .await?;
            let ids: Vec<i32> = rows.iter().map(|r| r.schema_id).collect();
            drop_unused_schemas(tx, &ids).await?;
            delete_level(tx, subject).await?;
            return Ok(rows.into_iter().map(|r| r.version).collect());
        }
        if live.is_empty() {
            return Err(ApiError::subject_soft_deleted(subject));
        }
        diesel::sql_query(
            "UPDATE registry_subject_versions SET deleted = true WHERE subject = $1 AND NOT deleted",
        )
        .bind::<Text, _>(subject)
        .execute(tx)
        .await?;
        delete_level(tx, subject).await?;
        Ok(live)
    })
    .await
}

/// Deletes one version (`None`: the latest live one) of a subject and returns its number, as
/// Confluent's registry does: soft (40406 when it was soft-deleted already; deleting the last
/// live version removes the subject's compatibility level), or hard (40407 unless it was
/// soft-deleted first; the schema goes too when nothing else uses it). 40401 for a subject
/// with no versions, 40402 for a version it does not have.
pub async fn delete_version(
    conn: &mut AsyncPgConnection,
    subject: &str,
    version: Option<i32>,
    permanent: bool,
) -> Result<i32, ApiError> {
    conn.transaction::<_, ApiError, _>(async |tx| {
        lock_subject(tx, subject).await?;
        let rows = version_rows(tx, subject).await?;
        if rows.is_empty() {
            return Err(ApiError::subject_not_found(subject));
        }
        let row = match version {
            Some(v) => rows.iter().find(|r| r.version == v),
            None => rows.iter().rev().find(|r| !r.deleted),
        }
        .ok_or_else(|| ApiError::version_not_found(version.unwrap_or(-1)))?
        .clone();
        match (permanent, row.deleted) {
            (false, true) => return Err(ApiError::version_soft_deleted(subject, row.version)),
            (true, false) => return Err(ApiError::version_not_soft_deleted(subject, row.version)),
            (true, true) => {
                diesel::sql_query(
                    "DELETE FROM registry_subject_versions WHERE subject = $1 AND version = $2",
                )
                .bind::<Text, _>(subject)
                .bind::<Integer, _>(row.version)
                .execute(tx)
                .await?;
                drop_unused_schemas(tx, &[row.schema_id]).await?;
            }
            (false, false) => {
                diesel::sql_query(
                    "UPDATE registry_subject_versions SET deleted = true \
                     WHERE subject = $1 AND version = $2",
                )
                .bind::<Text, _>(subject)
                .bind::<Integer, _>(row.version)
                .execute(tx)
                .await?;
                if rows.iter().all(|r| r.deleted || r.version == row.version) {
                    delete_level(tx, subject).await?;
                }
            }
        }
        Ok(row.version)
    })
    .await
}

/// Registers `schema` under `subject` unless it is there already, after `check` accepted it
/// against the subject's live versions. Serialized per subject, so versions never collide.
pub async fn register<F>(
    conn: &mut AsyncPgConnection,
    subject: &str,
    schema: &str,
    schema_type: &str,
    check: F,
) -> Result<i32, ApiError>
where
    F: FnOnce(Level, &[SubjectVersion]) -> Result<(), ApiError> + Send,
{
    conn.transaction::<_, ApiError, _>(async |tx| {
        lock_subject(tx, subject).await?;
        if let Some(existing) = lookup(tx, subject, schema, Include::Live).await? {
            return Ok(existing.id);
        }
        let existing = match versions(tx, subject).await {
            Ok(v) => v,
            Err(e) if e.code == crate::error::SUBJECT_NOT_FOUND => Vec::new(),
            Err(e) => return Err(e),
        };
        let level = effective_level(tx, subject).await?;
        check(level, &existing)?;
        // DO UPDATE (not DO NOTHING) so the row comes back even when a concurrent
        // registration of the same text under another subject inserted it first.
        let id: Num = diesel::sql_query(
            "INSERT INTO registry_schemas (schema, schema_type) VALUES ($1, $2) \
             ON CONFLICT (md5(schema)) DO UPDATE SET schema_type = EXCLUDED.schema_type \
             RETURNING id AS n",
        )
        .bind::<Text, _>(schema)
        .bind::<Text, _>(schema_type)
        .get_result(tx)
        .await?;
        diesel::sql_query(
            "INSERT INTO registry_subject_versions (subject, version, schema_id) \
             SELECT $1, COALESCE(MAX(version), 0) + 1, $2 FROM registry_subject_versions WHERE subject = $1",
        )
        .bind::<Text, _>(subject)
        .bind::<Integer, _>(id.n)
        .execute(tx)
        .await?;
        Ok(id.n)
    })
    .await
}

/// Whether the registry's tables answer.
pub async fn ping(conn: &mut AsyncPgConnection) -> Result<bool, ApiError> {
    #[derive(QueryableByName)]
    struct One {
        #[diesel(sql_type = Bool)]
        ok: bool,
    }
    let one: One = diesel::sql_query("SELECT true AS ok")
        .get_result(conn)
        .await?;
    Ok(one.ok)
}
