//! The Confluent Schema Registry REST API: the subset Ferrybox and its users' tools call.

use apache_avro::Schema;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{
    ApiError, INCOMPATIBLE_SCHEMA, INVALID_COMPATIBILITY_LEVEL, INVALID_VERSION,
    SUBJECT_LEVEL_NOT_CONFIGURED,
};
use crate::store::{self, SubjectVersion};
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

/// The routes, over a pool of connections to the registry's database.
pub fn router(pool: PgPool) -> Router {
    Router::new()
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
        .route("/subjects/{subject}/versions/{version}", get(get_version))
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema),
        )
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
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, 404, "HTTP 404 Not Found") })
        .with_state(pool)
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

async fn list_subjects(State(pool): State<PgPool>) -> Result<Response, ApiError> {
    ok(&json!(store::subjects(&mut *conn(&pool).await?).await?))
}

async fn list_versions(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
) -> Result<Response, ApiError> {
    let versions = store::versions(&mut *conn(&pool).await?, &subject).await?;
    ok(&json!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>()
    ))
}

async fn get_version(
    State(pool): State<PgPool>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let v = store::version(&mut *conn(&pool).await?, &subject, parse_version(&version)?).await?;
    ok(&version_json(&v))
}

async fn get_version_schema(
    State(pool): State<PgPool>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let v = store::version(&mut *conn(&pool).await?, &subject, parse_version(&version)?).await?;
    Ok(registry_json(
        StatusCode::OK,
        &serde_json::from_str(&v.schema).map_err(ApiError::internal)?,
    ))
}

async fn register(
    State(pool): State<PgPool>,
    Path(subject): Path<String>,
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
    body: Bytes,
) -> Result<Response, ApiError> {
    let submitted = parse_body(&body)?;
    let mut conn = conn(&pool).await?;
    match store::lookup(&mut conn, &subject, &submitted.text).await? {
        Some(v) => ok(&version_json(&v)),
        None => {
            // Confluent says which of the two is missing.
            store::versions(&mut conn, &subject).await?;
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
) -> Result<Response, ApiError> {
    ok(&json!(
        store::delete_subject(&mut *conn(&pool).await?, &subject).await?
    ))
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
) -> Result<Response, ApiError> {
    let mut subjects: Vec<String> = store::usages(&mut *conn(&pool).await?, id)
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
) -> Result<Response, ApiError> {
    let usages = store::usages(&mut *conn(&pool).await?, id).await?;
    ok(&json!(
        usages
            .iter()
            .map(|v| json!({ "subject": v.subject, "version": v.version }))
            .collect::<Vec<_>>()
    ))
}

#[derive(Deserialize)]
struct CompatQuery {
    #[serde(default)]
    verbose: bool,
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
    let existing = store::version(&mut conn, &subject, parse_version(&version)?).await?;
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
    #[serde(default)]
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
