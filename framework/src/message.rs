//! The message envelope: ids, the typed [`Event`] trait, and the CloudEvents headers every
//! Ferrybox message carries on Kafka.
//!
//! Headers follow the CloudEvents Kafka protocol binding in binary mode, so any
//! CloudEvents-aware tool understands a Ferrybox message: `ce_specversion`, `ce_id`, `ce_type`,
//! `ce_source`, `ce_time`, `ce_subject` (the key), `content-type`, plus the extension
//! `ce_entityversion` holding the per-entity version.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// CloudEvents header names used on Kafka records.
pub mod headers {
    /// CloudEvents spec version (always `1.0`).
    pub const SPEC_VERSION: &str = "ce_specversion";
    /// The message id: stable across republishing and replays.
    pub const ID: &str = "ce_id";
    /// The message type: the Avro record's full name.
    pub const TYPE: &str = "ce_type";
    /// The producing service.
    pub const SOURCE: &str = "ce_source";
    /// When the change happened (RFC 3339).
    pub const TIME: &str = "ce_time";
    /// The entity key.
    pub const SUBJECT: &str = "ce_subject";
    /// Ferrybox extension: the entity's version after this change.
    pub const ENTITY_VERSION: &str = "ce_entityversion";
    /// The payload's content type.
    pub const CONTENT_TYPE: &str = "content-type";
    /// Payloads are Avro in the Confluent wire format.
    pub const AVRO_CONTENT_TYPE: &str = "application/avro";
}

/// The current time at the precision PostgreSQL and the headers keep (microseconds), so a
/// time survives the round trip through the outbox unchanged.
pub fn now() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}

/// A message's identity: a UUIDv7, so ids sort roughly by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub Uuid);

impl MessageId {
    /// A fresh id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// A typed message a service publishes, tied to its Avro schema.
///
/// ```
/// use ferrybox::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct AccountOpened { account_id: String, version: i64 }
///
/// impl Event for AccountOpened {
///     const MESSAGE_TYPE: &'static str = "com.example.AccountOpened";
///     const SCHEMA: &'static str = r#"{"type":"record","name":"AccountOpened","namespace":"com.example",
///         "fields":[{"name":"account_id","type":"string"},{"name":"version","type":"long"}]}"#;
///     fn key(&self) -> String { self.account_id.clone() }
///     fn entity_version(&self) -> i64 { self.version }
/// }
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + Sync {
    /// The Avro record's full name; also the CloudEvents `type`.
    const MESSAGE_TYPE: &'static str;
    /// The Avro schema (`.avsc` JSON) the event is written with.
    const SCHEMA: &'static str;
    /// The entity key: the Kafka record key, so one entity's messages stay in one partition.
    fn key(&self) -> String;
    /// The entity's version after this change; consumers never apply an older one over a newer.
    fn entity_version(&self) -> i64;
}

/// Implements [`Event`] for a struct: its message type, its schema (written once, usually
/// `include_str!` of its `.avsc` under `schemas/`) and the fields holding its key and its
/// entity version.
///
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct AccountOpened { account_id: String, version: i64 }
///
/// ferrybox::event!(AccountOpened {
///     message_type: "com.example.AccountOpened",
///     schema: r#"{"type":"record","name":"AccountOpened","namespace":"com.example",
///         "fields":[{"name":"account_id","type":"string"},{"name":"version","type":"long"}]}"#,
///     key: account_id,
///     version: version,
/// });
///
/// use ferrybox::Event;
/// let opened = AccountOpened { account_id: "a-1".into(), version: 1 };
/// assert_eq!((opened.key(), opened.entity_version()), ("a-1".to_owned(), 1));
/// ```
///
/// A unit test with [`crate::contract::check_event`] then proves the type and the schema agree.
#[macro_export]
macro_rules! event {
    ($ty:ty { message_type: $message_type:expr, schema: $schema:expr, key: $key:ident, version: $version:ident $(,)? }) => {
        impl $crate::Event for $ty {
            const MESSAGE_TYPE: &'static str = $message_type;
            const SCHEMA: &'static str = $schema;
            fn key(&self) -> ::std::string::String {
                ::std::string::ToString::to_string(&self.$key)
            }
            fn entity_version(&self) -> i64 {
                self.$version
            }
        }
    };
}

/// A message ready for the outbox: encoded payload plus envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    /// The message id.
    pub id: MessageId,
    /// The topic it goes to.
    pub topic: String,
    /// The entity key.
    pub key: String,
    /// The message type (Avro full name).
    pub message_type: String,
    /// The entity's version after this change.
    pub entity_version: i64,
    /// When the change happened.
    pub occurred_at: DateTime<Utc>,
    /// Avro in the Confluent wire format.
    pub payload: Vec<u8>,
    /// Extra headers to send along (tracing context, ...). CloudEvents headers are added by
    /// the outbox.
    pub headers: BTreeMap<String, String>,
}

impl OutgoingMessage {
    /// The CloudEvents headers for this message, from `source`, plus its extra headers.
    pub fn kafka_headers(&self, source: &str) -> BTreeMap<String, String> {
        let mut h = self.headers.clone();
        h.insert(headers::SPEC_VERSION.into(), "1.0".into());
        h.insert(headers::ID.into(), self.id.to_string());
        h.insert(headers::TYPE.into(), self.message_type.clone());
        h.insert(headers::SOURCE.into(), source.into());
        h.insert(
            headers::TIME.into(),
            self.occurred_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        );
        h.insert(headers::SUBJECT.into(), self.key.clone());
        h.insert(
            headers::ENTITY_VERSION.into(),
            self.entity_version.to_string(),
        );
        h.insert(
            headers::CONTENT_TYPE.into(),
            headers::AVRO_CONTENT_TYPE.into(),
        );
        h
    }
}

/// Why a Kafka record is not a valid Ferrybox message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is present but unreadable.
    #[error("invalid header {name}: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The record has no payload.
    #[error("record has no payload")]
    MissingPayload,
}

/// A message as a consumer receives it, before its payload is decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingMessage {
    /// The message id.
    pub id: MessageId,
    /// The message type (CloudEvents `type`).
    pub message_type: String,
    /// The entity key.
    pub key: String,
    /// The entity's version after this change.
    pub entity_version: i64,
    /// When the change happened.
    pub occurred_at: DateTime<Utc>,
    /// The topic it came from.
    pub topic: String,
    /// The partition it came from.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
    /// All headers, as UTF-8 text where they are.
    pub headers: BTreeMap<String, String>,
    /// The raw payload.
    pub payload: Vec<u8>,
}

impl IncomingMessage {
    /// Reads the envelope from a record's parts.
    pub fn from_parts(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        headers: BTreeMap<String, String>,
        payload: Option<&[u8]>,
    ) -> Result<Self, EnvelopeError> {
        Self::from_owned_parts(
            topic,
            partition,
            offset,
            key,
            headers,
            payload.map(<[u8]>::to_vec),
        )
        .map_err(|refused| refused.0)
    }

    /// [`IncomingMessage::from_parts`], taking the headers and the payload as they are (no
    /// copy); when the envelope is not valid, they are handed back with the reason.
    pub(crate) fn from_owned_parts(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        headers: BTreeMap<String, String>,
        payload: Option<Vec<u8>>,
    ) -> Result<Self, Refused> {
        let fields = match Self::fields(&headers, key) {
            Ok(fields) => fields,
            Err(e) => return Err(Refused(e, headers, payload)),
        };
        let Some(payload) = payload else {
            return Err(Refused(EnvelopeError::MissingPayload, headers, None));
        };
        let (id, message_type, entity_version, occurred_at, key) = fields;
        Ok(Self {
            id,
            message_type,
            key,
            entity_version,
            occurred_at,
            topic: topic.to_owned(),
            partition,
            offset,
            headers,
            payload,
        })
    }

    /// The envelope's fields, read from the headers and the record key.
    fn fields(
        headers: &BTreeMap<String, String>,
        key: Option<&[u8]>,
    ) -> Result<(MessageId, String, i64, DateTime<Utc>, String), EnvelopeError> {
        let get = |name: &'static str| {
            headers
                .get(name)
                .map(String::as_str)
                .ok_or(EnvelopeError::MissingHeader(name))
        };
        let invalid =
            |name: &'static str, reason: String| EnvelopeError::InvalidHeader { name, reason };
        let id = get(headers::ID)?
            .parse::<MessageId>()
            .map_err(|e| invalid(headers::ID, e.to_string()))?;
        let message_type = get(headers::TYPE)?.to_owned();
        let entity_version = get(headers::ENTITY_VERSION)?
            .parse::<i64>()
            .map_err(|e| invalid(headers::ENTITY_VERSION, e.to_string()))?;
        let occurred_at = DateTime::parse_from_rfc3339(get(headers::TIME)?)
            .map_err(|e| invalid(headers::TIME, e.to_string()))?
            .with_timezone(&Utc);
        let key = match key {
            Some(k) => std::str::from_utf8(k)
                .map(str::to_owned)
                .map_err(|e| invalid(headers::SUBJECT, format!("record key: {e}")))?,
            None => get(headers::SUBJECT)?.to_owned(),
        };
        Ok((id, message_type, entity_version, occurred_at, key))
    }
}

/// An envelope that is not valid: why, and the headers and payload it was given back.
#[derive(Debug)]
pub(crate) struct Refused(
    pub(crate) EnvelopeError,
    pub(crate) BTreeMap<String, String>,
    pub(crate) Option<Vec<u8>>,
);

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing() -> OutgoingMessage {
        OutgoingMessage {
            id: MessageId::new(),
            topic: "t".into(),
            key: "k1".into(),
            message_type: "com.example.Thing".into(),
            entity_version: 7,
            occurred_at: now(),
            payload: vec![0, 0, 0, 0, 1, 2],
            headers: BTreeMap::from([("traceparent".into(), "00-abc".into())]),
        }
    }

    #[test]
    fn headers_round_trip_through_the_envelope() {
        let out = outgoing();
        let headers = out.kafka_headers("svc");
        assert_eq!(headers["ce_source"], "svc");
        assert_eq!(headers["traceparent"], "00-abc");
        let incoming =
            IncomingMessage::from_parts("t", 2, 40, Some(b"k1"), headers, Some(&out.payload))
                .unwrap();
        assert_eq!(incoming.id, out.id);
        assert_eq!(incoming.key, "k1");
        assert_eq!(incoming.entity_version, 7);
        assert_eq!(incoming.message_type, "com.example.Thing");
        assert_eq!(incoming.occurred_at, out.occurred_at);
        assert_eq!((incoming.partition, incoming.offset), (2, 40));
    }

    #[test]
    fn missing_or_bad_headers_are_typed_errors() {
        let out = outgoing();
        let mut headers = out.kafka_headers("svc");
        headers.remove("ce_id");
        assert_eq!(
            IncomingMessage::from_parts("t", 0, 0, None, headers.clone(), Some(b"x")),
            Err(EnvelopeError::MissingHeader("ce_id"))
        );
        headers.insert("ce_id".into(), "not-a-uuid".into());
        assert!(matches!(
            IncomingMessage::from_parts("t", 0, 0, None, headers, Some(b"x")),
            Err(EnvelopeError::InvalidHeader { name: "ce_id", .. })
        ));
        let headers = out.kafka_headers("svc");
        assert_eq!(
            IncomingMessage::from_parts("t", 0, 0, None, headers, None),
            Err(EnvelopeError::MissingPayload)
        );
    }

    #[test]
    fn message_ids_are_v7_and_ordered() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert_eq!(a.0.get_version_num(), 7);
        assert!(a < b);
    }
}
