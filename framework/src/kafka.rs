//! Kafka clients with Ferrybox's settings, and topic administration.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{KafkaConfig, TopicConfig};
use crate::error::{Error, Result};

/// Settings a durable producer needs; a pass-through setting may not weaken them.
const DURABLE_PRODUCER: &[(&str, &str)] = &[("acks", "all"), ("enable.idempotence", "true")];

/// An idempotent producer with `acks=all`.
///
/// Refuses pass-through settings that would weaken durability (`acks` other than `all`/`-1`,
/// `enable.idempotence=false`).
pub fn durable_producer(config: &KafkaConfig) -> Result<FutureProducer> {
    for (key, required) in DURABLE_PRODUCER {
        if let Some(value) = config.setting(key) {
            let ok = value == *required || (*key == "acks" && value == "-1");
            if !ok {
                return Err(Error::Config(format!(
                    "kafka setting {key}={value} weakens durability; Ferrybox needs {key}={required}"
                )));
            }
        }
    }
    let mut client =
        config.client_config_with_defaults(&[("message.timeout.ms", "30000"), ("linger.ms", "5")]);
    for (key, value) in DURABLE_PRODUCER {
        client.set(*key, *value);
    }
    Ok(client.create()?)
}

/// Creates each topic that does not exist yet, then checks every one has the configured
/// partition count.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[TopicConfig]) -> Result<()> {
    for topic in topics {
        topic.validate()?;
    }
    let admin: AdminClient<DefaultClientContext> = config.client_config().create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(t.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Topic {
                    topic,
                    reason: format!("could not be created: {code}"),
                });
            }
        }
    }
    for topic in topics {
        let partitions = partition_count(config, &topic.name).await?;
        if partitions != topic.partitions {
            return Err(Error::Topic {
                topic: topic.name.clone(),
                reason: format!(
                    "has {partitions} partitions, configuration says {}",
                    topic.partitions
                ),
            });
        }
    }
    Ok(())
}

/// The number of partitions a topic has, from the broker's metadata.
pub async fn partition_count(config: &KafkaConfig, topic: &str) -> Result<i32> {
    let client = config.client_config();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client.create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty());
        match found {
            Some(t) => Ok(i32::try_from(t.partitions().len()).unwrap_or(i32::MAX)),
            None => Err(Error::Topic {
                topic,
                reason: "does not exist".into(),
            }),
        }
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))?
}

/// A record's headers as text (values that are not UTF-8 are kept lossily).
pub fn headers_map(
    message: &impl rdkafka::message::Message,
) -> std::collections::BTreeMap<String, String> {
    use rdkafka::message::Headers;
    message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        h.value
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Kafka record headers from text (the inverse of [`headers_map`]).
pub fn owned_headers(
    headers: &std::collections::BTreeMap<String, String>,
) -> rdkafka::message::OwnedHeaders {
    headers
        .iter()
        .fold(rdkafka::message::OwnedHeaders::new(), |h, (key, value)| {
            h.insert(rdkafka::message::Header {
                key,
                value: Some(value.as_bytes()),
            })
        })
}
