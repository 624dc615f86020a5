//! An outbox message as the relay, replay and the feed send it, and which table it came from.

use std::collections::BTreeMap;

use diesel::prelude::*;
use serde::Deserialize;

use super::schema::ferrybox_outbox;

/// Which outbox table a message was written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `ferrybox_messages`, append-only (an outbox made for the log relay): nothing to
    /// write back.
    Messages,
    /// `ferrybox_outbox`, the polling table: its rows are marked published (which gives
    /// them their feed positions).
    Outbox,
}

/// An outbox row as the relay (and replay) sends it.
#[derive(Debug, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = ferrybox_outbox)]
pub(crate) struct OutboxRecord {
    pub(crate) id: i64,
    pub(crate) message_id: uuid::Uuid,
    pub(crate) topic: String,
    pub(crate) message_key: String,
    pub(crate) message_type: String,
    pub(crate) entity_version: i64,
    pub(crate) occurred_at: chrono::DateTime<chrono::Utc>,
    pub(crate) headers: serde_json::Value,
    pub(crate) payload: Vec<u8>,
}

impl OutboxRecord {
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// The headers the record is sent with (see [`envelope_headers`]).
    pub(crate) fn headers(&self) -> BTreeMap<String, String> {
        envelope_headers(
            &self.headers,
            self.id,
            self.message_id,
            &self.message_type,
            &self.message_key,
            self.entity_version,
            self.occurred_at,
        )
    }
}

/// The headers an outbox row goes out with, on Kafka and on the feed: the stored ones, with
/// the CloudEvents headers the row's own columns determine (id, type, subject, time, entity
/// version) filled in from those columns where they are missing. Stored headers that are not a JSON object of text
/// are read leniently (numbers and booleans as text, the rest left out, with a warning), so a
/// damaged row still carries what a consumer needs to deduplicate and decode it.
pub(crate) fn envelope_headers(
    stored: &serde_json::Value,
    row: i64,
    message_id: uuid::Uuid,
    message_type: &str,
    key: &str,
    entity_version: i64,
    occurred_at: chrono::DateTime<chrono::Utc>,
) -> BTreeMap<String, String> {
    use crate::message::headers as h;
    let mut map = BTreeMap::<String, String>::deserialize(stored).unwrap_or_else(|e| {
        tracing::warn!(id = row, %message_id, error = %e,
            "stored headers are not a map of text; sending what can be read and the row's own envelope");
        lenient_headers(stored)
    });
    // `enqueue` stored these from the same columns: an intact row costs no formatting here.
    let mut fill = |name: &str, value: &dyn Fn() -> String| {
        if !map.contains_key(name) {
            map.insert(name.to_owned(), value());
        }
    };
    fill(h::ID, &|| message_id.to_string());
    fill(h::TYPE, &|| message_type.to_owned());
    fill(h::SUBJECT, &|| key.to_owned());
    fill(h::ENTITY_VERSION, &|| entity_version.to_string());
    fill(h::TIME, &|| {
        occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    });
    fill(h::SPEC_VERSION, &|| "1.0".to_owned());
    fill(h::CONTENT_TYPE, &|| h::AVRO_CONTENT_TYPE.to_owned());
    map
}

/// The text, number and boolean entries of a JSON object; nothing from anything else.
fn lenient_headers(stored: &serde_json::Value) -> BTreeMap<String, String> {
    let Some(object) = stored.as_object() else {
        return BTreeMap::new();
    };
    object
        .iter()
        .filter_map(|(name, value)| {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            Some((name.clone(), text))
        })
        .collect()
}
