//! An AsyncAPI 3.0 document of the topics and messages, generated from what the repository
//! already declares: the producers' `schemas/` (every version of every message type, and the
//! topic's compatibility level) and each consumer's contract (the messages it reads and its
//! reader schemas). `ferrybox-contracts asyncapi` writes it; `make contracts` checks that the
//! committed one is current.
//!
//! Each published version is a message of the topic's channel (old versions still reach
//! consumers through replays, redrives and the sent log), with the CloudEvents headers every
//! Ferrybox message carries, the producer-sequence headers, the record key, and its Avro schema
//! in the Confluent wire format (Kafka binding: schema id in the payload, topic-record-name
//! subjects). The producer sends the latest version of each type; each consumer receives every
//! version of the types its contract names, and its reader schemas are kept under
//! `components.schemas` (`x-ferrybox-reader-schemas` on its operation names them).

use serde_json::{Map, Value, json};

use super::{ConsumerContract, ProducerCatalog};
use crate::message::headers;
use crate::outbox::{SEQ_HEADER, SOURCE_HEADER};

/// The AsyncAPI schema format of Avro schemas (what `@asyncapi/avro-schema-parser` reads).
const AVRO_FORMAT: &str = "application/vnd.apache.avro+json;version=1.9.0";

/// The Kafka bindings' version this document follows.
const KAFKA_BINDING: &str = "0.5.0";

/// The id of one version of a message under `components.messages`.
fn message_id(message_type: &str, version: u32) -> String {
    format!("{message_type}.v{version}")
}

/// The id of a consumer's reader schema under `components.schemas`.
fn reader_id(consumer: &str, message_type: &str) -> String {
    format!("{consumer}.{message_type}")
}

/// A path as written in the document: relative, with `/` separators.
fn shown(path: &std::path::Path) -> String {
    let text = path.to_string_lossy().replace('\\', "/");
    text.trim_start_matches("./").to_owned()
}

/// The headers of every Ferrybox message on Kafka, as a JSON Schema.
fn headers_schema() -> Value {
    let text = |description: &str| json!({"type": "string", "description": description});
    json!({
        "type": "object",
        "description": "CloudEvents 1.0 Kafka protocol binding, binary mode, plus Ferrybox's \
                        extensions. Any other header (W3C `traceparent`, `tracestate`) is the \
                        trace context the producer's request ran in.",
        "required": [
            headers::SPEC_VERSION,
            headers::ID,
            headers::TYPE,
            headers::SOURCE,
            headers::TIME,
            headers::SUBJECT,
            headers::ENTITY_VERSION,
            headers::CONTENT_TYPE,
        ],
        "properties": {
            headers::SPEC_VERSION: {"type": "string", "const": "1.0", "description": "CloudEvents spec version."},
            headers::ID: {"type": "string", "format": "uuid", "description": "The message id (a UUIDv7): the same when the message is sent again (relay restart, replay, redrive); consumers without a producer sequence deduplicate by it."},
            headers::TYPE: text("The message type: the Avro record's full name (the message's `name` here)."),
            headers::SOURCE: text("The producing service."),
            headers::TIME: {"type": "string", "format": "date-time", "description": "When the change happened (RFC 3339, microseconds)."},
            headers::SUBJECT: text("The entity key (also the record key)."),
            headers::ENTITY_VERSION: {"type": "string", "pattern": "^[0-9]+$", "description": "The entity's version after this change (decimal); consumers never apply an older version over a newer one."},
            headers::CONTENT_TYPE: {"type": "string", "const": headers::AVRO_CONTENT_TYPE, "description": "Avro in the Confluent wire format."},
            SOURCE_HEADER: text("The producer sequence's source: the producing service's outbox. Set by a relay that numbers its messages (the log relay)."),
            SEQ_HEADER: {"type": "string", "pattern": "^[1-9][0-9]*$", "description": "The message's number within its source, topic and partition (decimal): contiguous from 1, the same when sent again. A consumer skips numbers it applied and halts the partition on a gap until it is repaired from the producer's sent log."},
            "traceparent": text("W3C trace context of the change that produced the message."),
            "tracestate": text("W3C trace state."),
        },
    })
}

/// The AsyncAPI 3.0 document of `catalog`'s topics and `contracts`' consumers.
pub fn asyncapi(catalog: &ProducerCatalog, contracts: &[ConsumerContract]) -> Value {
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    let mut schemas = Map::new();
    schemas.insert("ferrybox-headers".into(), headers_schema());

    for topic in &catalog.topics {
        let channel_ref = format!("#/channels/{}", topic.topic);
        let mut channel_messages = Map::new();
        let mut latest = Vec::new();
        for history in &topic.messages {
            for version in &history.versions {
                let id = message_id(&history.message_type, version.version);
                let short = history
                    .message_type
                    .rsplit('.')
                    .next()
                    .unwrap_or(&history.message_type);
                messages.insert(
                    id.clone(),
                    json!({
                        "name": history.message_type,
                        "title": format!("{short} v{}", version.version),
                        "summary": format!(
                            "{} version {} of {}, published by {} on {}.",
                            history.message_type,
                            version.version,
                            history.versions.len(),
                            topic.producer,
                            topic.topic
                        ),
                        "contentType": headers::AVRO_CONTENT_TYPE,
                        "headers": {"$ref": "#/components/schemas/ferrybox-headers"},
                        "payload": {
                            "schemaFormat": AVRO_FORMAT,
                            "schema": serde_json::to_value(&version.schema).unwrap_or(Value::Null),
                        },
                        "bindings": {"kafka": {
                            "key": {"type": "string", "description": "The entity key: one entity's messages stay in order on one partition."},
                            "schemaIdLocation": "payload",
                            "schemaIdPayloadEncoding": "confluent",
                            "schemaLookupStrategy": "TopicRecordNameStrategy",
                            "bindingVersion": KAFKA_BINDING,
                        }},
                        "x-ferrybox-schema-file": shown(&version.path),
                        "x-ferrybox-subject": format!("{}-{}", topic.topic, history.message_type),
                    }),
                );
                channel_messages.insert(
                    id.clone(),
                    json!({"$ref": format!("#/components/messages/{id}")}),
                );
            }
            if let Some(last) = history.versions.last() {
                latest.push(json!({"$ref": format!(
                    "{channel_ref}/messages/{}",
                    message_id(&history.message_type, last.version)
                )}));
            }
        }
        channels.insert(
            topic.topic.clone(),
            json!({
                "address": topic.topic,
                "title": topic.topic,
                "description": format!(
                    "Produced by {} through its transactional outbox and relay (acks=all, \
                     idempotent). Every message type evolves under {}: `make contracts` refuses \
                     a version that breaks it or any consumer contract below.",
                    topic.producer, topic.compatibility
                ),
                "messages": channel_messages,
                "bindings": {"kafka": {"topic": topic.topic, "bindingVersion": KAFKA_BINDING}},
                "x-ferrybox-compatibility": topic.compatibility.to_string(),
            }),
        );
        operations.insert(
            format!("{}.send.{}", topic.producer, topic.topic),
            json!({
                "action": "send",
                "channel": {"$ref": channel_ref},
                "title": format!("{} publishes to {}", topic.producer, topic.topic),
                "description": "The latest version of each message type. Sent at least once \
                                (the same id and number when sent again); one entity's \
                                messages in the order its changes committed.",
                "messages": latest,
            }),
        );
        for contract in contracts.iter().filter(|c| c.topic == topic.topic) {
            let mut received = Vec::new();
            let mut readers = Map::new();
            for (message_type, reader) in &contract.readers {
                let Some(history) = topic
                    .messages
                    .iter()
                    .find(|h| &h.message_type == message_type)
                else {
                    // `make contracts` reports a contract naming a message nobody publishes.
                    continue;
                };
                received.extend(history.versions.iter().map(|v| {
                    json!({"$ref": format!(
                        "{channel_ref}/messages/{}",
                        message_id(message_type, v.version)
                    )})
                }));
                let id = reader_id(&contract.consumer, message_type);
                schemas.insert(
                    id.clone(),
                    json!({
                        "schemaFormat": AVRO_FORMAT,
                        "schema": serde_json::to_value(reader).unwrap_or(Value::Null),
                    }),
                );
                readers.insert(
                    message_type.clone(),
                    json!({"$ref": format!("#/components/schemas/{id}")}),
                );
            }
            operations.insert(
                format!("{}.receive.{}", contract.consumer, topic.topic),
                json!({
                    "action": "receive",
                    "channel": {"$ref": channel_ref},
                    "title": format!("{} consumes {}", contract.consumer, topic.topic),
                    "description": format!(
                        "Its consumer-driven contract ({}): every published version of these \
                         types, decoded into its reader schemas. Applied exactly once per \
                         message (deduplicated by producer sequence, or by id), in order per \
                         key; offsets committed after the local transaction.",
                        shown(&contract.path)
                    ),
                    "messages": received,
                    "x-ferrybox-contract": shown(&contract.path),
                    "x-ferrybox-reader-schemas": readers,
                }),
            );
        }
    }

    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Ferrybox messages",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every topic, message type and version the services publish, and what \
                            each consumer reads, generated by `ferrybox-contracts asyncapi` from \
                            `schemas/` and the consumers' `contracts/` (do not edit by hand).",
        },
        "defaultContentType": headers::AVRO_CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    })
}

/// [`asyncapi`] as the text `ferrybox-contracts asyncapi` writes (pretty JSON, a final newline).
pub fn asyncapi_text(catalog: &ProducerCatalog, contracts: &[ConsumerContract]) -> String {
    let mut text = serde_json::to_string_pretty(&asyncapi(catalog, contracts))
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn fixture() -> Value {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/contracts");
        let catalog = ProducerCatalog::load(&root.join("compatible/schemas")).unwrap();
        let contracts = ConsumerContract::load_dir(&root.join("consumer/contracts")).unwrap();
        asyncapi(&catalog, &contracts)
    }

    #[test]
    fn every_version_is_a_message_the_producer_sends_the_latest_and_the_consumer_reads_all() {
        let doc = fixture();
        assert_eq!(doc["asyncapi"], "3.0.0");
        let channel = &doc["channels"]["t"];
        assert_eq!(channel["address"], "t");
        let versions: Vec<&String> = channel["messages"].as_object().unwrap().keys().collect();
        assert_eq!(versions, ["x.User.v1", "x.User.v2"]);
        for id in versions {
            let message = &doc["components"]["messages"][id];
            assert_eq!(message["name"], "x.User");
            assert_eq!(message["payload"]["schemaFormat"], AVRO_FORMAT);
            assert_eq!(message["payload"]["schema"]["type"], "record");
            assert_eq!(
                message["bindings"]["kafka"]["schemaLookupStrategy"],
                "TopicRecordNameStrategy"
            );
            assert_eq!(message["x-ferrybox-subject"], "t-x.User");
        }
        let producer = channel["x-ferrybox-compatibility"].as_str().unwrap();
        assert!(!producer.is_empty());
        let refs = |op: &str| -> Vec<String> {
            doc["operations"][op]["messages"]
                .as_array()
                .unwrap_or_else(|| panic!("no operation {op}"))
                .iter()
                .map(|m| m["$ref"].as_str().unwrap().to_owned())
                .collect()
        };
        let send = doc["operations"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, op)| op["action"] == "send")
            .map(|(name, _)| name.clone())
            .unwrap();
        assert_eq!(refs(&send), ["#/channels/t/messages/x.User.v2"]);
        assert_eq!(
            refs("c.receive.t"),
            [
                "#/channels/t/messages/x.User.v1",
                "#/channels/t/messages/x.User.v2"
            ]
        );
        let reader = &doc["operations"]["c.receive.t"]["x-ferrybox-reader-schemas"]["x.User"];
        assert_eq!(reader["$ref"], "#/components/schemas/c.x.User");
        assert_eq!(
            doc["components"]["schemas"]["c.x.User"]["schema"]["name"],
            "User"
        );
    }

    #[test]
    fn the_headers_are_the_cloudevents_binding_and_the_producer_sequence() {
        let doc = fixture();
        let headers = &doc["components"]["schemas"]["ferrybox-headers"];
        for name in [headers::ID, headers::TYPE, headers::ENTITY_VERSION] {
            assert!(
                headers["required"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(name)),
                "{name} is required"
            );
        }
        assert!(headers["properties"][SEQ_HEADER].is_object());
        assert!(headers["properties"][SOURCE_HEADER].is_object());
    }
}
