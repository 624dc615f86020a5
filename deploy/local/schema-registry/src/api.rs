//! The Confluent Schema Registry REST API: the subset Ferrybox and its users' tools call.

use apache_avro::Schema;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use crate::error::{
    ApiError, INCOMPATIBLE_SCHEMA, INVALID_COMPATIBILITY_LEVEL, INVALID_VERSION,
    SUBJECT_LEVEL_NOT_CONFIGURED,
};
use crate::store::{self, Include, SubjectVersion};
use ferrybox::contract::Level;
use ferrybox::db::{self, PgPool, PooledConnection};

/// Confluent's media type; every answer carries it.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A JSON response with the registry's media type.
pub fn registry_json(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

/// Parses a JSON request body; a malformed one is Confluent's 422.
fn read_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            422,
            format!("Unprocessable entity: {e}"),
        )
    })
}

fn ok(body: &Value) -> Result<Response, ApiError> {
    Ok(registry_json(StatusCode::OK, body))
}

/// [`axum::extract::Query`] whose rejection is Confluent's JSON (400, error code 400).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
struct Query<T>(T);

/// [`axum::extract::Path`] whose rejection is Confluent's JSON (404, error code 404).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
struct Path<T>(T);

/// A boolean query parameter as Confluent's registry reads it: `true` or `false` in any case
/// (its Python client sends `True` and `False`). Anything else is a 400, not a silent false:
/// `permanent=yes` must not quietly become a soft delete.
fn query_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
    if text.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if text.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(serde::de::Error::custom(format!(
            "'{text}' is not a boolean: use true or false"
        )))
    }
}

/// `?deleted=` and `?deletedOnly=` (also spelt `deleted_only`, as Confluent's Python client
/// does), for the reads that can see soft-deleted versions.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeletedQuery {
    #[serde(default, deserialize_with = "query_bool")]
    deleted: bool,
    #[serde(default, alias = "deleted_only", deserialize_with = "query_bool")]
    deleted_only: bool,
}

impl DeletedQuery {
    fn include(&self) -> Include {
        Include::from_flags(self.deleted, self.deleted_only)
    }
}

/// `?offset=` and `?limit=` (a negative limit: no limit), for the lists.
#[derive(Deserialize)]
struct PageQuery {
    #[serde(default)]
    offset: usize,
    #[serde(default = "no_limit")]
    limit: i64,
}

fn no_limit() -> i64 {
    -1
}

impl PageQuery {
    fn page<T>(&self, items: Vec<T>) -> Vec<T> {
        let taken = items.into_iter().skip(self.offset);
        match usize::try_from(self.limit) {
            Ok(limit) => taken.take(limit).collect(),
            Err(_) => taken.collect(),
        }
    }
}

/// `?permanent=`, for the deletes.
#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default, deserialize_with = "query_bool")]
    permanent: bool,
}

/// `?normalize=` (and `?deleted=` for a lookup). The registry always stores a schema in one
/// normal JSON form, so `normalize` is read (a bad value is still a 400) but changes nothing.
#[derive(Deserialize)]
struct SchemaQuery {
    #[serde(default, deserialize_with = "query_bool")]
    #[expect(
        dead_code,
        reason = "accepted for Confluent's clients; stored schemas are normal"
    )]
    normalize: bool,
    #[serde(default, deserialize_with = "query_bool")]
    deleted: bool,
}

/// Confluent's shape for the errors axum answers by itself.
fn confluent_error(status: StatusCode, message: String) -> Response {
    ApiError::http(status, message).into_response()
}

/// The routes, over a pool of connections to the registry's database. Every error is
/// Confluent's JSON, the rejections of axum itself included (405 keeps its `Allow` header).
pub fn router(pool: PgPool) -> Router {
    let routes = Router::new()
        .route(
            "/",
            get(|| async { registry_json(StatusCode::OK, &json!({})) }),
        )
        .route("/subjects", get(list_subjects))
        .route(
            "/subjects/{subject}",
            post(lookup_schema).delete(delete_subject),
        )
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register),
        )
        .route(
            "/subjects/{subject}/versions/{version}",
            get(get_version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema),
        )
        .route("/schemas/types", get(schema_types))
        .route("/schemas/ids/{id}", get(get_schema))
        .route("/schemas/ids/{id}/schema", get(get_raw_schema))
        .route("/schemas/ids/{id}/subjects", get(get_schema_subjects))
        .route("/schemas/ids/{id}/versions", get(get_schema_versions))
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(test_against_all),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(test_against_version),
        )
        .route("/config", get(get_global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .fallback(|| async { ApiError::http(StatusCode::NOT_FOUND, "HTTP 404 Not Found") })
        .with_state(pool);
    ferrybox::http::json_errors_with(routes, confluent_error)
}

async fn conn(pool: &PgPool) -> Result<PooledConnection, ApiError> {
    Ok(db::connection(pool).await?)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaBody {
    schema: String,
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Value>,
}

/// A schema as submitted: parsed, checked and in the normalized text the registry stores.
struct Submitted {
    text: String,
    parsed: Schema,
}

fn parse_body(body: &Bytes) -> Result<Submitted, ApiError> {
    let body: SchemaBody = read_json(body)?;
    if let Some(t) = body.schema_type.as_deref()
        && !t.eq_ignore_ascii_case("AVRO")
    {
        {
            return Err(ApiError::invalid_schema(format!(
                "schema type {t} is not supported here; only AVRO"
            )));
        }
    }
    if !body.references.is_empty() {
        return Err(ApiError::invalid_schema(
            "schema references are not supported here",
        ));
    }
    parse_schema(&body.schema)
}

fn parse_schema(text: &str) -> Result<Submitted, ApiError> {
    let json: Value = serde_json::from_str(text).map_err(ApiError::invalid_schema)?;
    let text = json.to_string();
    let parsed = Schema::parse_str(&text).map_err(ApiError::invalid_schema)?;
    Ok(Submitted { text, parsed })
}

fn parse_stored(v: &SubjectVersion) -> Result<Schema, ApiError> {
    Schema::parse_str(&v.schema).map_err(ApiError::internal)
}

fn parse_version(version: &str) -> Result<Option<i32>, ApiError> {
    match version {
        "latest" | "-1" => Ok(None),
        v => match v.parse::<i32>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                INVALID_VERSION,
                format!(
                    "The specified version '{v}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
                ),
            )),
        },
    }
}

fn version_json(v: &SubjectVersion) -> Value {
    let mut body =
        json!({ "subject": v.subject, "version": v.version, "id": v.id, "schema": v.schema });
    if v.schema_type != "AVRO" {
        body["schemaType"] = json!(v.schema_type);
    }
    body
}

fn violations(
    level: Level,
    new: &Schema,
    against: &[SubjectVersion],
) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for existing in against {
        out.extend(level.violations(
            new,
            &parse_stored(existing)?,
            u32::try_from(existing.version).unwrap_or(0),
        ));
    }
    Ok(out)
}

/// The versions a new schema is checked against under `level`.
fn checked_against(level: Level, existing: &[SubjectVersion]) -> &[SubjectVersion] {
    &existing[level.checked_against(existing.len())]
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubjectsQuery {
    #[serde(default)]
    subject_prefix: String,
}

async fn list_subjects(
    State(pool): State<PgPool>,
    Query(q): Query<SubjectsQuery>,
    Query(deleted): Query<DeletedQuery>,
    Query(page): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let mut subjects = store::subjects(&mut *conn(&pool).await?, deleted.include()).await?;
    subjects.retain(|s| s.starts_with(&q.subject_prefix));
    ok(&json!(page.page(subjects)))
}

async fn list_versions(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
    Query(deleted): Query<DeletedQuery>,
    Query(page): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let versions =
        store::versions_including(&mut *conn(&pool).await?, &subject, deleted.include()).await?;
    ok(&json!(page.page(
        versions.iter().map(|v| v.version).collect::<Vec<_>>()
    )))
}

/// The versions `deleted=true` lets a single-version read see.
fn single_include(deleted: &DeletedQuery) -> Include {
    if deleted.deleted {
        Include::WithDeleted
    } else {
        Include::Live
    }
}

async fn get_version(
    State(pool): State<PgPool>,
    Path((subject, version)): Path<(String, String)>,
    Query(deleted): Query<DeletedQuery>,
) -> Result<Response, ApiError> {
    let version = parse_version(&version)?;
    let v = store::version(
        &mut *conn(&pool).await?,
        &subject,
        version,
        single_include(&deleted),
    )
    .await?;
    ok(&version_json(&v))
}

async fn get_version_schema(
    State(pool): State<PgPool>,
    Path((subject, version)): Path<(String, String)>,
    Query(deleted): Query<DeletedQuery>,
) -> Result<Response, ApiError> {
    let version = parse_version(&version)?;
    let v = store::version(
        &mut *conn(&pool).await?,
        &subject,
        version,
        single_include(&deleted),
    )
    .await?;
    Ok(registry_json(
        StatusCode::OK,
        &serde_json::from_str(&v.schema).map_err(ApiError::internal)?,
    ))
}

async fn register(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
    Query(_): Query<SchemaQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let submitted = parse_body(&body)?;
    let new = submitted.parsed.clone();
    let subject_name = subject.clone();
    let id = store::register(&mut *conn(&pool).await?, &subject, &submitted.text, "AVRO", move |level, existing| {
        let problems = violations(level, &new, checked_against(level, existing))?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                INCOMPATIBLE_SCHEMA,
                format!(
                    "Schema being registered is incompatible with an earlier schema for subject \"{subject_name}\" under {level}: {}",
                    problems.join("; ")
                ),
            ))
        }
    })
    .await?;
    ok(&json!({ "id": id }))
}

async fn lookup_schema(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
    Query(q): Query<SchemaQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let submitted = parse_body(&body)?;
    let include = if q.deleted {
        Include::WithDeleted
    } else {
        Include::Live
    };
    let mut conn = conn(&pool).await?;
    match store::lookup(&mut conn, &subject, &submitted.text, include).await? {
        Some(v) => ok(&version_json(&v)),
        None => {
            // Confluent says which of the two is missing.
            store::versions_including(&mut conn, &subject, include).await?;
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                crate::error::SCHEMA_NOT_FOUND,
                "Schema not found",
            ))
        }
    }
}

async fn delete_subject(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    ok(&json!(
        store::delete_subject(&mut *conn(&pool).await?, &subject, q.permanent).await?
    ))
}

async fn delete_version(
    State(pool): State<PgPool>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    let version = parse_version(&version)?;
    ok(&json!(
        store::delete_version(&mut *conn(&pool).await?, &subject, version, q.permanent).await?
    ))
}

/// Only Avro: the other types are refused at registration.
async fn schema_types() -> Response {
    registry_json(StatusCode::OK, &json!(["AVRO"]))
}

async fn get_schema(State(pool): State<PgPool>, Path(id): Path<i32>) -> Result<Response, ApiError> {
    let (schema, schema_type) = store::schema_by_id(&mut *conn(&pool).await?, id).await?;
    let mut body = json!({ "schema": schema });
    if schema_type != "AVRO" {
        body["schemaType"] = json!(schema_type);
    }
    ok(&body)
}

async fn get_raw_schema(
    State(pool): State<PgPool>,
    Path(id): Path<i32>,
) -> Result<Response, ApiError> {
    let (schema, _) = store::schema_by_id(&mut *conn(&pool).await?, id).await?;
    ok(&serde_json::from_str(&schema).map_err(ApiError::internal)?)
}

async fn get_schema_subjects(
    State(pool): State<PgPool>,
    Path(id): Path<i32>,
    Query(deleted): Query<DeletedQuery>,
) -> Result<Response, ApiError> {
    let mut subjects: Vec<String> =
        store::usages(&mut *conn(&pool).await?, id, single_include(&deleted))
            .await?
            .into_iter()
            .map(|v| v.subject)
            .collect();
    subjects.dedup();
    ok(&json!(subjects))
}

async fn get_schema_versions(
    State(pool): State<PgPool>,
    Path(id): Path<i32>,
    Query(deleted): Query<DeletedQuery>,
) -> Result<Response, ApiError> {
    let usages = store::usages(&mut *conn(&pool).await?, id, single_include(&deleted)).await?;
    ok(&json!(
        usages
            .iter()
            .map(|v| json!({ "subject": v.subject, "version": v.version }))
            .collect::<Vec<_>>()
    ))
}

#[derive(Deserialize)]
struct CompatQuery {
    #[serde(default, deserialize_with = "query_bool")]
    verbose: bool,
    #[serde(default, deserialize_with = "query_bool")]
    #[expect(
        dead_code,
        reason = "accepted for Confluent's clients; stored schemas are normal"
    )]
    normalize: bool,
}

fn compat_answer(problems: &[String], verbose: bool) -> Result<Response, ApiError> {
    let mut body = json!({ "is_compatible": problems.is_empty() });
    if verbose {
        body["messages"] = json!(problems);
    }
    ok(&body)
}

async fn test_against_all(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
    Query(q): Query<CompatQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let submitted = parse_body(&body)?;
    let mut conn = conn(&pool).await?;
    let level = store::effective_level(&mut conn, &subject).await?;
    let existing = match store::versions(&mut conn, &subject).await {
        Ok(v) => v,
        Err(e) if e.code == crate::error::SUBJECT_NOT_FOUND => Vec::new(),
        Err(e) => return Err(e),
    };
    let problems = violations(level, &submitted.parsed, checked_against(level, &existing))?;
    compat_answer(&problems, q.verbose)
}

async fn test_against_version(
    State(pool): State<PgPool>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<CompatQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let submitted = parse_body(&body)?;
    let mut conn = conn(&pool).await?;
    let level = store::effective_level(&mut conn, &subject).await?;
    let existing =
        store::version(&mut conn, &subject, parse_version(&version)?, Include::Live).await?;
    let problems = violations(level, &submitted.parsed, std::slice::from_ref(&existing))?;
    compat_answer(&problems, q.verbose)
}

#[derive(Deserialize)]
struct ConfigBody {
    compatibility: String,
}

fn parse_level(body: &Bytes) -> Result<Level, ApiError> {
    let body: ConfigBody = read_json(body)?;
    body.compatibility.parse::<Level>().map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            INVALID_COMPATIBILITY_LEVEL,
            e,
        )
    })
}

async fn get_global_config(State(pool): State<PgPool>) -> Result<Response, ApiError> {
    let level = store::level(&mut *conn(&pool).await?, None)
        .await?
        .unwrap_or(Level::Backward);
    ok(&json!({ "compatibilityLevel": level.to_string() }))
}

async fn put_global_config(State(pool): State<PgPool>, body: Bytes) -> Result<Response, ApiError> {
    let level = parse_level(&body)?;
    store::set_level(&mut *conn(&pool).await?, None, level).await?;
    ok(&json!({ "compatibility": level.to_string() }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubjectConfigQuery {
    #[serde(default, deserialize_with = "query_bool")]
    default_to_global: bool,
}

async fn get_subject_config(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
    Query(q): Query<SubjectConfigQuery>,
) -> Result<Response, ApiError> {
    let mut conn = conn(&pool).await?;
    let level = match store::level(&mut conn, Some(&subject)).await? {
        Some(level) => level,
        None if q.default_to_global => store::effective_level(&mut conn, &subject).await?,
        None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                SUBJECT_LEVEL_NOT_CONFIGURED,
                format!("Subject '{subject}' does not have subject-level compatibility configured"),
            ));
        }
    };
    ok(&json!({ "compatibilityLevel": level.to_string() }))
}

async fn put_subject_config(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let level = parse_level(&body)?;
    store::set_level(&mut *conn(&pool).await?, Some(&subject), level).await?;
    ok(&json!({ "compatibility": level.to_string() }))
}

async fn delete_subject_config(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
) -> Result<Response, ApiError> {
    let mut conn = conn(&pool).await?;
    let level = store::effective_level(&mut conn, &subject).await?;
    if !store::delete_level(&mut conn, &subject).await? {
        return Err(ApiError::subject_not_found(&subject));
    }
    ok(&json!({ "compatibilityLevel": level.to_string() }))
}
