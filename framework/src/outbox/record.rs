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
    pub(crate) headers: StoredHeaders,
    pub(crate) payload: Vec<u8>,
}

/// A row's `headers` column as the JSON text the database holds, read as it is: the relay
/// sends the headers from it without building a JSON value first (see
/// [`OutboxRecord::kafka_headers`]); [`StoredHeaders::value`] parses it where a value is
/// wanted.
#[derive(Debug, Clone, PartialEq, Eq, diesel::deserialize::FromSqlRow)]
pub(crate) struct StoredHeaders(pub(crate) String);

impl StoredHeaders {
    /// The headers as a JSON value (`null` when the text is not JSON, which jsonb never
    /// holds).
    pub(crate) fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }

    /// The headers as (name, value) pairs borrowed from the text where it has no escapes;
    /// `None` unless it is an object whose every value is text.
    fn text_pairs(&self) -> Option<Pairs<'_>> {
        plain_text_pairs(&self.0).or_else(|| {
            serde_json::from_str::<TextPairs<'_>>(&self.0)
                .ok()
                .map(|pairs| pairs.0)
        })
    }

    /// From jsonb's binary form (a version byte, 1, and the JSON text), as queries and the
    /// replication stream both deliver it.
    pub(crate) fn from_jsonb(bytes: &[u8]) -> std::result::Result<Self, String> {
        match bytes {
            [1, json @ ..] => std::str::from_utf8(json)
                .map(|text| Self(text.to_owned()))
                .map_err(|e| format!("headers that are not text ({e})")),
            _ => Err("headers in an unknown jsonb format".to_owned()),
        }
    }
}

impl From<serde_json::Value> for StoredHeaders {
    fn from(value: serde_json::Value) -> Self {
        Self(value.to_string())
    }
}

impl diesel::deserialize::FromSql<diesel::sql_types::Jsonb, diesel::pg::Pg> for StoredHeaders {
    fn from_sql(value: diesel::pg::PgValue<'_>) -> diesel::deserialize::Result<Self> {
        Ok(Self::from_jsonb(value.as_bytes())?)
    }
}

/// The relay's hot path: an object of text values without a backslash, as PostgreSQL writes a
/// jsonb object (`{"name": "value", ...}`), read as borrowed pairs by finding each string's
/// closing quote. `None` for anything else (an escape, a number, a nested value, another
/// spacing), which serde_json reads instead: this is only quicker, never different (a test
/// compares the two).
fn plain_text_pairs(json: &str) -> Option<Pairs<'_>> {
    /// A string without escapes at the start of `s`, and what follows it.
    fn string(s: &str) -> Option<(&str, &str)> {
        let s = s.strip_prefix('"')?;
        let end = memchr::memchr2(b'"', b'\\', s.as_bytes())?;
        // A quote is one byte, so `end` and `end + 1` are character boundaries.
        (s.as_bytes()[end] == b'"').then(|| (&s[..end], &s[end + 1..]))
    }
    let mut pairs = Vec::with_capacity(16);
    let mut rest = json.trim_ascii().strip_prefix('{')?.trim_ascii_start();
    if rest == "}" {
        return Some(pairs);
    }
    loop {
        let (name, after) = string(rest)?;
        let (value, after) = string(
            after
                .trim_ascii_start()
                .strip_prefix(':')?
                .trim_ascii_start(),
        )?;
        pairs.push((name.into(), value.into()));
        let after = after.trim_ascii_start();
        match after.strip_prefix(',') {
            Some(next) => rest = next.trim_ascii_start(),
            None => return (after == "}").then_some(pairs),
        }
    }
}

/// Header (name, value) pairs, borrowed from the stored text where they can be.
type Pairs<'a> = Vec<(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>;

/// A JSON object of text values, as borrowed (name, value) pairs.
struct TextPairs<'a>(Pairs<'a>);

impl<'de> Deserialize<'de> for TextPairs<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TextPairs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of text values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(pair) = map.next_entry::<Text<'de>, Text<'de>>()? {
                    pairs.push((pair.0.0, pair.1.0));
                }
                Ok(TextPairs(pairs))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Text borrowed from the JSON where it can be (no escapes), owned where it cannot. (Serde's
/// own `Cow<str>` always owns, except as a `#[serde(borrow)]` field, which a map's keys and
/// values are not.)
struct Text<'a>(std::borrow::Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("text")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(std::borrow::Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
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
        let Some(stored) = self.headers.text_pairs() else {
            // Damaged headers: the lenient reading, with its warning.
            return crate::kafka::owned_headers(&self.headers());
        };
        let mut headers = OwnedHeaders::new_with_capacity(stored.len() + ENVELOPE_HEADERS);
        let missing = missing_envelope(
            |name| stored.iter().any(|(key, _)| key == name),
            self.message_id,
            &self.message_type,
            &self.message_key,
            self.entity_version,
            self.occurred_at,
        );
        let stored = stored
            .iter()
            .map(|(key, value)| (key.as_ref(), value.as_ref()));
        let missing = missing.iter().map(|(key, value)| (*key, value.as_str()));
        for (key, value) in stored.chain(missing) {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        headers
    }

    /// The headers the record is sent with (see [`envelope_headers`]).
    pub(crate) fn headers(&self) -> BTreeMap<String, String> {
        envelope_headers(
            &self.headers.value(),
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
    let missing = missing_envelope(
        |name| map.contains_key(name),
        message_id,
        message_type,
        key,
        entity_version,
        occurred_at,
    );
    map.extend(
        missing
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value)),
    );
    map
}

/// How many headers the envelope itself determines (see [`missing_envelope`]).
const ENVELOPE_HEADERS: usize = 7;

/// The CloudEvents headers the row's own columns determine (id, type, subject, entity
/// version, time, spec version, content type) that `present` says are missing, with their
/// values.
fn missing_envelope(
    present: impl Fn(&str) -> bool,
    message_id: uuid::Uuid,
    message_type: &str,
    key: &str,
    entity_version: i64,
    occurred_at: chrono::DateTime<chrono::Utc>,
) -> Vec<(&'static str, String)> {
    use crate::message::headers as h;
    let envelope: [(&'static str, &dyn Fn() -> String); ENVELOPE_HEADERS] = [
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
    envelope
        .into_iter()
        .filter(|(name, _)| !present(name))
        .map(|(name, value)| (name, value()))
        .collect()
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
            headers: headers.into(),
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
    fn the_quick_reading_of_headers_is_serde_json_s_or_none() {
        fn serde(json: &str) -> Option<Pairs<'_>> {
            serde_json::from_str::<TextPairs<'_>>(json)
                .ok()
                .map(|pairs| pairs.0)
        }
        for json in [
            r#"{}"#,
            r#"{"a": "1"}"#,
            r#"{"ce_id": "x", "ce_type": "y.Changed", "traceparent": "00-ab-cd-01"}"#,
            r#"  {"a":"1","b" : "é ü"}  "#,
            r#"{"a": ""}"#,
            r#"{"a": "1", "a": "2"}"#,
        ] {
            let quick = plain_text_pairs(json);
            assert!(quick.is_some(), "{json}");
            assert_eq!(quick, serde(json), "{json}");
        }
        // Not for the quick reading: serde_json decides (escapes, other values, damage).
        for json in [
            r#"{"a": "x\"y"}"#,
            r#"{"a\n": "1"}"#,
            r#"{"a": 1}"#,
            r#"{"a": {"b": "c"}}"#,
            r#"{"a": "1",}"#,
            r#"{"a": "1"} x"#,
            r#"{"a" "1"}"#,
            r#"{"a": "1""#,
            r#""not an object""#,
            r#"[]"#,
            "",
        ] {
            assert_eq!(plain_text_pairs(json), None, "{json}");
        }
    }

    #[test]
    fn kafka_headers_are_the_envelope_headers_whatever_the_row_stored() {
        for stored in [
            serde_json::json!({}),
            serde_json::json!({"ce_id": "stored-id", "traceparent": "00-abc-def-01", "ce_type": "x.Changed"}),
            // Escapes: owned, not borrowed, text.
            serde_json::json!({"quoted": "a \"b\" \u{e9}", "ce_id": "x\ny"}),
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
