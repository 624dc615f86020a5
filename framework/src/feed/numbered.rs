//! The producer's repair endpoint: `GET /events/numbered?source=S&topic=T&partition=P&from=A&to=B`
//! answers the messages the log relay published numbered `A..=B` in source `S`, topic `T`,
//! partition `P` (see [`crate::outbox::SEQ_HEADER`]), from the sent log, in number order:
//!
//! ```json
//! {"events": [{"position": 41, "id": "…", "topic": "users", "key": "…", "type": "…",
//!              "headers": {"ce_id": "…", "ferrybox_source": "…", "ferrybox_seq": "41"},
//!              "payload": "<base64 of the Avro bytes>"}]}
//! ```
//!
//! `position` is the number. A consumer that found a gap asks for exactly what it misses
//! (see [`crate::inbox::Gaps`]). Numbers the sent log no longer has (retention removed them)
//! answer `410 numbers_expired`, naming the first one missing.

use std::collections::HashMap;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use base64::Engine;
use diesel::sql_types::{Array, BigInt};
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};

use super::FeedEvent;
use crate::db::{self, PgPool};
use crate::http::{ApiError, Json};
use crate::outbox::record::OutboxRecord;
use crate::outbox::sequence::rows_numbered;

/// The most numbers one request may ask for.
pub const MAX_NUMBERS: i64 = 5_000;

/// `GET /events/numbered` parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct NumberedQuery {
    /// The producer sequence's source (the `ferrybox_source` header).
    source: String,
    /// The topic.
    topic: String,
    /// The partition.
    partition: i32,
    /// The first number wanted (1 or more).
    #[param(minimum = 1)]
    from: i64,
    /// The last number wanted (at least `from`, at most 5,000 numbers in all).
    to: i64,
}

/// The answer: the events numbered `from..=to`, in number order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct NumberedPage {
    /// The events, `position` being each one's number.
    events: Vec<FeedEvent>,
}

/// The repair endpoint's route, `GET /events/numbered`, over the sent log in `pool`'s
/// database. Merge it into the service's router behind the same authentication as `/events`.
pub fn numbered_router(pool: PgPool) -> Router {
    Router::new()
        .route("/events/numbered", get(numbered))
        .with_state(pool)
}

/// The messages the log relay numbered `from..=to` in a source, topic and partition, from the
/// sent log: what a consumer that found a gap asks for.
#[utoipa::path(
    get,
    path = "/events/numbered",
    tag = "feed",
    params(NumberedQuery),
    security(("internal_token" = [])),
    responses(
        (status = 200, description = "Every number asked for, in order.", body = NumberedPage),
        (status = 401, description = "No or the wrong bearer token.", body = crate::http::ErrorBody),
        (status = 410, description = "`numbers_expired`: the sent log no longer has a number asked for.", body = crate::http::ErrorBody),
        (status = 422, description = "`invalid_query` or `invalid_range`.", body = crate::http::ErrorBody),
    )
)]
async fn numbered(
    State(pool): State<PgPool>,
    query: std::result::Result<Query<NumberedQuery>, QueryRejection>,
) -> std::result::Result<Json<NumberedPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("invalid_query", e.body_text()))?;
    if q.from < 1 || q.to < q.from || q.to - q.from >= MAX_NUMBERS {
        return Err(ApiError::invalid(
            "invalid_range",
            format!("from must be 1 or more, to at least from, and at most {MAX_NUMBERS} numbers"),
        ));
    }
    let mut conn = db::connection(&pool).await?;
    let numbered = rows_numbered(&mut conn, &q.source, &q.topic, q.partition, q.from, q.to).await?;
    let mut ids: HashMap<&str, Vec<i64>> = HashMap::new();
    for row in &numbered {
        ids.entry(row.origin.as_str()).or_default().push(row.row_id);
    }
    let mut rows: HashMap<(&str, i64), OutboxRecord> = HashMap::new();
    for (origin, ids) in &ids {
        let table = match *origin {
            "messages" => "ferrybox_messages",
            _ => "ferrybox_outbox",
        };
        let found: Vec<OutboxRecord> = diesel::sql_query(format!(
            "SELECT id, message_id, topic, message_key, message_type, entity_version, \
                    occurred_at, headers, payload FROM {table} WHERE id = ANY($1)"
        ))
        .bind::<Array<BigInt>, _>(ids)
        .load(&mut conn)
        .await
        .map_err(crate::Error::from)?;
        rows.extend(found.into_iter().map(|r| ((*origin, r.id), r)));
    }
    let mut events = Vec::with_capacity(numbered.len());
    for (expected, row) in
        (q.from..=q.to).zip(numbered.iter().map(Some).chain(std::iter::repeat(None)))
    {
        let record = row
            .filter(|r| r.seq == expected)
            .and_then(|r| rows.get(&(r.origin.as_str(), r.row_id)));
        let Some(record) = record else {
            return Err(ApiError::new(
                StatusCode::GONE,
                "numbers_expired",
                format!(
                    "number {expected} of {} on {}/{} is no longer in the sent log (its retention removed it, or it was never numbered): skip the gap, then reconcile",
                    q.source, q.topic, q.partition
                ),
            ));
        };
        let mut headers = record.headers();
        headers.insert(crate::outbox::SOURCE_HEADER.to_owned(), q.source.clone());
        headers.insert(crate::outbox::SEQ_HEADER.to_owned(), expected.to_string());
        events.push(FeedEvent {
            position: expected,
            id: record.message_id,
            topic: record.topic.clone(),
            key: record.message_key.clone(),
            message_type: record.message_type.clone(),
            headers,
            payload: base64::engine::general_purpose::STANDARD.encode(&record.payload),
        });
    }
    Ok(Json(NumberedPage { events }))
}

/// The OpenAPI document of [`numbered_router`] (see [`crate::openapi::numbered`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(numbered))]
pub(crate) struct NumberedApi;
