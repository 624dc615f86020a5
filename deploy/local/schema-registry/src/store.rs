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

const VERSION_SELECT: &str = "SELECT v.subject, v.version, s.id, s.schema, s.schema_type \
     FROM registry_subject_versions v JOIN registry_schemas s ON s.id = v.schema_id";

/// Every subject with at least one live version.
pub async fn subjects(conn: &mut AsyncPgConnection) -> Result<Vec<String>, ApiError> {
    let rows: Vec<Name> = diesel::sql_query(
        "SELECT DISTINCT subject AS name FROM registry_subject_versions WHERE NOT deleted ORDER BY 1",
    )
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.name).collect())
}

/// A subject's live versions, oldest first; 40401 when it has none.
pub async fn versions(
    conn: &mut AsyncPgConnection,
    subject: &str,
) -> Result<Vec<SubjectVersion>, ApiError> {
    let rows: Vec<SubjectVersion> = diesel::sql_query(format!(
        "{VERSION_SELECT} WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version"
    ))
    .bind::<Text, _>(subject)
    .load(conn)
    .await?;
    if rows.is_empty() {
        return Err(ApiError::subject_not_found(subject));
    }
    Ok(rows)
}

/// One version (`None` for the latest) of a subject.
pub async fn version(
    conn: &mut AsyncPgConnection,
    subject: &str,
    version: Option<i32>,
) -> Result<SubjectVersion, ApiError> {
    let all = versions(conn, subject).await?;
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

/// The subject versions that use a schema id.
pub async fn usages(
    conn: &mut AsyncPgConnection,
    id: i32,
) -> Result<Vec<SubjectVersion>, ApiError> {
    schema_by_id(conn, id).await?;
    Ok(diesel::sql_query(format!(
        "{VERSION_SELECT} WHERE s.id = $1 AND NOT v.deleted ORDER BY v.subject, v.version"
    ))
    .bind::<Integer, _>(id)
    .load(conn)
    .await?)
}

/// The version of `subject` holding exactly `schema`, if any.
pub async fn lookup(
    conn: &mut AsyncPgConnection,
    subject: &str,
    schema: &str,
) -> Result<Option<SubjectVersion>, ApiError> {
    Ok(diesel::sql_query(format!(
        "{VERSION_SELECT} WHERE v.subject = $1 AND s.schema = $2 AND NOT v.deleted ORDER BY v.version LIMIT 1"
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

/// Soft-deletes every version of a subject and returns their numbers.
pub async fn delete_subject(
    conn: &mut AsyncPgConnection,
    subject: &str,
) -> Result<Vec<i32>, ApiError> {
    let rows: Vec<Num> = diesel::sql_query(
        "UPDATE registry_subject_versions SET deleted = true \
         WHERE subject = $1 AND NOT deleted RETURNING version AS n",
    )
    .bind::<Text, _>(subject)
    .load(conn)
    .await?;
    if rows.is_empty() {
        return Err(ApiError::subject_not_found(subject));
    }
    let mut versions: Vec<i32> = rows.into_iter().map(|r| r.n).collect();
    versions.sort_unstable();
    Ok(versions)
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
        diesel::sql_query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind::<Text, _>(subject)
            .execute(tx)
            .await?;
        if let Some(existing) = lookup(tx, subject, schema).await? {
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
