//! Avro payloads in the Confluent wire format, with schemas kept in a Confluent-API schema
//! registry.
//!
//! Subjects use the *topic-record-name* strategy (`<topic>-<record full name>`): several event
//! types share one topic, and each type evolves under its own subject and compatibility rules.

use std::collections::BTreeMap;

use apache_avro::types::Value;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

use apache_avro::reader::datum::GenericDatumReader;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::easy_avro::EasyAvroEncoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use serde::de::DeserializeOwned;

use crate::message::{Event, MessageId, OutgoingMessage};

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The schema registry refused or failed a request (unknown schema id, incompatible schema,
    /// unreachable registry, ...).
    #[error("schema registry: {message}")]
    Registry {
        /// The registry client's description.
        message: String,
        /// Whether trying again may help (the registry was unreachable, say).
        retryable: bool,
    },
    /// The value does not fit its schema, or the bytes are not Avro of the writer's schema.
    #[error("avro: {0}")]
    Avro(String),
}

impl CodecError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CodecError::Registry {
                retryable: true,
                ..
            }
        )
    }
}

impl From<SRCError> for CodecError {
    fn from(e: SRCError) -> Self {
        let message = match &e.cause {
            Some(cause) => format!("{}: {cause}", e.error),
            None => e.error.clone(),
        };
        CodecError::Registry {
            message,
            retryable: e.retriable,
        }
    }
}

/// A decoded payload: the writer's record name and the Avro value.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The writer schema's full name, when it is a named type.
    pub name: Option<String>,
    /// The value, as written.
    pub value: Value,
}

impl Decoded {
    /// Deserializes the value into a Rust type.
    pub fn into_typed<T: DeserializeOwned>(self) -> Result<T, CodecError> {
        apache_avro::from_value::<T>(&self.value).map_err(|e| CodecError::Avro(e.to_string()))
    }
}

/// Encodes events and decodes payloads against a schema registry. Cheap to clone; caches
/// schemas and ids, so only the first use of a schema talks to the registry.
#[derive(Clone, Debug)]
pub struct AvroCodec {
    encoder: EasyAvroEncoder,
    decoder: Arc<AvroDecoder>,
    /// The writer schemas met so far, by registry id, ready to read a payload with.
    readers: Arc<RwLock<HashMap<u32, &'static WriterReader>>>,
}

/// Reads payloads written with one writer schema: built once per schema, not per message.
struct WriterReader {
    reader: GenericDatumReader<'static>,
    /// The writer schema's full name, when it is a named type.
    name: Option<String>,
}

impl std::fmt::Debug for WriterReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterReader")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Every writer schema this process has read with, by its full parsed form (logical types and
/// all; not the registered text, which leaves out the schemas it references): each one's
/// reader is built once and kept for the life of the process (a reader borrows its schema, so
/// both live as long as the process; a process meets a bounded number of schemas).
static WRITER_READERS: LazyLock<RwLock<HashMap<String, &'static WriterReader>>> =
    LazyLock::new(RwLock::default);

/// The reader for `schema`, built the first time this process meets it.
fn writer_reader(schema: &apache_avro::Schema) -> Result<&'static WriterReader, CodecError> {
    let form = serde_json::to_string(schema)
        .map_err(|e| CodecError::Avro(format!("writer schema: {e}")))?;
    if let Some(reader) = WRITER_READERS
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&form)
    {
        return Ok(reader);
    }
    let mut readers = WRITER_READERS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(reader) = readers.get(&form) {
        return Ok(reader);
    }
    // Checked before anything is kept: a schema no reader can be built for is refused each
    // time, never kept.
    GenericDatumReader::builder(schema)
        .build()
        .map_err(|e| CodecError::Avro(format!("writer schema: {e}")))?;
    let schema: &'static apache_avro::Schema = Box::leak(Box::new(schema.clone()));
    let reader = GenericDatumReader::builder(schema)
        .build()
        .map_err(|e| CodecError::Avro(format!("writer schema: {e}")))?;
    let name = match schema {
        apache_avro::Schema::Record(record) => Some(record.name.fullname(None)),
        _ => None,
    };
    let reader: &'static WriterReader = Box::leak(Box::new(WriterReader { reader, name }));
    readers.insert(form, reader);
    Ok(reader)
}

/// The Confluent wire format's prefix: a zero byte, then the schema id (4 bytes, big-endian).
fn schema_id(payload: &[u8]) -> Option<(u32, &[u8])> {
    match payload {
        [0, a, b, c, d, datum @ ..] => Some((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        _ => None,
    }
}

impl AvroCodec {
    /// A codec for the registry at `registry_url`.
    pub fn new(registry_url: &str) -> Self {
        let settings = SrSettings::new(registry_url.trim_end_matches('/').to_owned());
        Self {
            encoder: EasyAvroEncoder::new(settings.clone()),
            decoder: Arc::new(AvroDecoder::new(settings)),
            readers: Arc::default(),
        }
    }

    /// The subject an event type is registered under for `topic`.
    pub fn subject<E: Event>(topic: &str) -> String {
        format!("{topic}-{}", E::MESSAGE_TYPE)
    }

    fn strategy<E: Event>(topic: &str) -> SubjectNameStrategy {
        SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
            topic.to_owned(),
            SuppliedSchema::new(
                Some(E::MESSAGE_TYPE.to_owned()),
                SchemaType::Avro,
                E::SCHEMA.to_owned(),
            ),
        )
    }

    /// Registers `E`'s schema for `topic` (or finds it registered) and returns its id.
    /// Producers call this at start-up, so an incompatible schema stops them there.
    pub async fn register<E: Event>(&self, topic: &str) -> Result<u32, CodecError> {
        let schema = self
            .encoder
            .get_schema_and_id(&Self::subject::<E>(topic), Self::strategy::<E>(topic))
            .await?;
        Ok(schema.id)
    }

    /// Encodes an event into Avro in the Confluent wire format.
    pub async fn encode<E: Event>(&self, topic: &str, event: &E) -> Result<Vec<u8>, CodecError> {
        Ok(self
            .encoder
            .encode_struct(event, &Self::strategy::<E>(topic))
            .await?)
    }

    /// Encodes an event and wraps it in an envelope for the outbox.
    pub async fn message<E: Event>(
        &self,
        topic: &str,
        event: &E,
    ) -> Result<OutgoingMessage, CodecError> {
        Ok(OutgoingMessage {
            id: MessageId::new(),
            topic: topic.to_owned(),
            key: event.key(),
            message_type: E::MESSAGE_TYPE.to_owned(),
            entity_version: event.entity_version(),
            occurred_at: crate::message::now(),
            payload: self.encode(topic, event).await?,
            headers: BTreeMap::new(),
        })
    }

    /// Decodes a Confluent wire-format payload with the writer's schema from the registry.
    pub async fn decode(&self, payload: &[u8]) -> Result<Decoded, CodecError> {
        let Some((id, datum)) = schema_id(payload) else {
            // Not the wire format: the registry client says why.
            let decoded = self.decoder.decode(Some(payload)).await?;
            return Ok(Decoded {
                name: decoded.name.map(|n| n.fullname(None)),
                value: decoded.value,
            });
        };
        let known = self
            .readers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .copied();
        let reader = match known {
            Some(reader) => reader,
            None => {
                let schema = self.decoder.get_schema(id).await?;
                let reader = writer_reader(&schema.parsed)?;
                self.readers
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(id, reader);
                reader
            }
        };
        let value = reader
            .reader
            .read_value(&mut std::io::Cursor::new(datum))
            .map_err(|e| CodecError::Avro(format!("payload of schema {id}: {e}")))?;
        Ok(Decoded {
            name: reader.name.clone(),
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> apache_avro::Schema {
        apache_avro::Schema::parse_str(text).expect("a valid schema")
    }

    #[test]
    fn a_writer_schema_gets_one_reader_whatever_its_text_looks_like() {
        let a = parse(
            r#"{"type":"record","name":"R","namespace":"x.codec1","fields":[{"name":"id","type":"string"}]}"#,
        );
        let b = parse(
            r#"{ "type": "record", "namespace": "x.codec1", "name": "R",
                 "fields": [ { "name": "id", "type": "string" } ] }"#,
        );
        let (a, b) = (writer_reader(&a).unwrap(), writer_reader(&b).unwrap());
        assert!(std::ptr::eq(a, b));
        assert_eq!(a.name.as_deref(), Some("x.codec1.R"));
    }

    #[test]
    fn schemas_that_read_differently_get_readers_of_their_own() {
        // The same fields, one with a logical type: the values read differ.
        let plain = parse(
            r#"{"type":"record","name":"R","namespace":"x.codec2","fields":[{"name":"id","type":"string"}]}"#,
        );
        let uuid = parse(
            r#"{"type":"record","name":"R","namespace":"x.codec2","fields":[{"name":"id","type":{"type":"string","logicalType":"uuid"}}]}"#,
        );
        let (plain, uuid) = (
            writer_reader(&plain).unwrap(),
            writer_reader(&uuid).unwrap(),
        );
        assert!(!std::ptr::eq(plain, uuid));
        let id = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        let mut datum = vec![u8::try_from(id.len() * 2).unwrap()];
        datum.extend_from_slice(id.as_bytes());
        let read = |r: &WriterReader| {
            r.reader
                .read_value(&mut std::io::Cursor::new(&datum))
                .unwrap()
        };
        assert_eq!(
            read(plain),
            Value::Record(vec![("id".into(), Value::String(id.into()))])
        );
        assert_eq!(
            read(uuid),
            Value::Record(vec![("id".into(), Value::Uuid(id.parse().unwrap()))])
        );
    }

    #[test]
    fn a_payload_not_in_the_wire_format_has_no_schema_id() {
        assert_eq!(schema_id(&[0, 0, 0, 0, 7, 1]), Some((7, &[1u8][..])));
        assert_eq!(schema_id(&[0, 0, 0, 0, 7]), Some((7, &[][..])));
        assert_eq!(schema_id(&[1, 0, 0, 0, 7, 1]), None);
        assert_eq!(schema_id(&[0, 0, 0]), None);
    }
}
