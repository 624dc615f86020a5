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

    /// The headers as Kafka sends them, the same as [`Self::headers`], written straight
    /// into librdkafka's list: the relay's hot path, where building the map first (a copy of
    /// every name and value, then another into librdkafka) was most of its allocations.
    pub(crate) fn kafka_headers(&self) -> rdkafka::message::OwnedHeaders {
        use rdkafka::message::{Header, OwnedHeaders};
        let stored = match self.headers.as_object() {
            Some(stored) if stored.values().all(serde_json::Value::is_string) => stored,
            // Damaged headers: the lenient reading, with its warning.
            _ => return crate::kafka::owned_headers(&self.headers()),
        };
        let mut headers = OwnedHeaders::new_with_capacity(stored.len() + ENVELOPE_HEADERS);
        for (key, value) in stored {
            headers = headers.insert(Header {
                key,
                value: value.as_str().map(str::as_bytes),
            });
        }
        fill_envelope(
            |name| stored.contains_key(name),
            |name, value| {
                headers = std::mem::replace(&mut headers, OwnedHeaders::new()).insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            },
            self.message_id,
            &self.message_type,
            &self.message_key,
            self.entity_version,
            self.occurred_at,
        );
        headers
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
    let mut map = BTreeMap::<String, String>::deserialize(stored).unwrap_or_else(|e| {
        tracing::warn!(id = row, %message_id, error = %e,
            "stored headers are not a map of text; sending what can be read and the row's own envelope");
        lenient_headers(stored)
    });
    // `enqueue` stored these from the same columns: an intact row costs no formatting here.
    let mut missing = Vec::new();
    fill_envelope(
        |name| map.contains_key(name),
        |name, value| missing.push((name.to_owned(), value)),
        message_id,
        message_type,
        key,
        entity_version,
        occurred_at,
    );
    map.extend(missing);
    map
}

/// How many headers the envelope itself determines (see [`fill_envelope`]).
const ENVELOPE_HEADERS: usize = 7;

/// Hands `add` each CloudEvents header the row's own columns determine (id, type, subject,
/// entity version, time, spec version, content type) that `present` says is missing.
fn fill_envelope(
    present: impl Fn(&str) -> bool,
    mut add: impl FnMut(&str, String),
    message_id: uuid::Uuid,
    message_type: &str,
    key: &str,
    entity_version: i64,
    occurred_at: chrono::DateTime<chrono::Utc>,
) {
    use crate::message::headers as h;
    let envelope: [(&str, &dyn Fn() -> String); ENVELOPE_HEADERS] = [
        (h::ID, &|| message_id.to_string()),
        (h::TYPE, &|| message_type.to_owned()),
        (h::SUBJECT, &|| key.to_owned()),
        (h::ENTITY_VERSION, &|| entity_version.to_string()),
        (h::TIME, &|| {
            occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        }),
        (h::SPEC_VERSION, &|| "1.0".to_owned()),
        (h::CONTENT_TYPE, &|| h::AVRO_CONTENT_TYPE.to_owned()),
    ];
    for (name, value) in envelope {
        if !present(name) {
            add(name, value());
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: serde_json::Value) -> OutboxRecord {
        OutboxRecord {
            id: 1,
            message_id: uuid::Uuid::now_v7(),
            topic: "t".into(),
            message_key: "k".into(),
            message_type: "x.Changed".into(),
            entity_version: 3,
            occurred_at: chrono::Utc::now(),
            headers,
            payload: vec![],
        }
    }

    fn as_map(headers: &rdkafka::message::OwnedHeaders) -> BTreeMap<String, String> {
        use rdkafka::message::Headers;
        headers
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8(h.value.unwrap_or_default().to_vec()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn kafka_headers_are_the_envelope_headers_whatever_the_row_stored() {
        for stored in [
            serde_json::json!({}),
            serde_json::json!({"ce_id": "stored-id", "traceparent": "00-abc-def-01", "ce_type": "x.Changed"}),
            // Damaged: the lenient reading.
            serde_json::json!({"n": 5, "ok": true, "nested": {"a": 1}}),
            serde_json::json!("not an object"),
        ] {
            let row = record(stored.clone());
            let kafka = as_map(&row.kafka_headers());
            assert_eq!(kafka, row.headers(), "{stored}");
            assert_eq!(kafka["ce_subject"], "k");
            assert_eq!(kafka["ce_entityversion"], "3");
        }
    }
}
