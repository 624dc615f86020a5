//! Kafka clients with Ferrybox's settings, and topic administration.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{ClientKind, KafkaConfig, TopicConfig};
use crate::error::{Error, Result};

/// Settings a durable producer needs; a pass-through setting may not weaken them.
const DURABLE_PRODUCER: &[(&str, &str)] = &[("acks", "all"), ("enable.idempotence", "true")];

/// An idempotent producer with `acks=all`.
///
/// Gets `settings` and `producer_settings`. Refuses pass-through settings that would weaken
/// durability (`acks` other than `all`/`-1`, `enable.idempotence=false`, in either map) unless
/// `allow_weak_durability` is set, which is logged.
/// `message.timeout.ms` defaults to 30 s, so a relay notices a broker outage and backs off
/// instead of waiting librdkafka's default five minutes.
pub fn durable_producer(config: &KafkaConfig) -> Result<FutureProducer> {
    let mut weakened = Vec::new();
    for (key, required) in DURABLE_PRODUCER {
        if let Some(value) = config.setting(ClientKind::Producer, key) {
            let ok = value == *required || (*key == "acks" && value == "-1");
            if !ok && !config.allow_weak_durability {
                return Err(Error::Config(format!(
                    "kafka setting {key}={value} weakens durability; Ferrybox needs \
                     {key}={required} (or kafka.allow_weak_durability=true, for experiments)"
                )));
            }
            if !ok {
                tracing::warn!(
                    setting = key,
                    value,
                    "producer durability weakened on request"
                );
                weakened.push(*key);
            }
        }
    }
    let mut client = config.client_config_with_defaults(
        ClientKind::Producer,
        &[("message.timeout.ms", "30000"), ("linger.ms", "5")],
    );
    for (key, value) in DURABLE_PRODUCER {
        if !weakened.contains(key) {
            client.set(*key, *value);
        }
    }
    Ok(client.create()?)
}

/// How durably a topic stores what it is sent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicDurability {
    /// The topic.
    pub topic: String,
    /// Partitions it has.
    pub partitions: i32,
    /// Replicas of its least replicated partition.
    pub replication_factor: i32,
    /// Its `min.insync.replicas`, when the broker tells.
    pub min_insync_replicas: Option<i32>,
}

impl TopicDurability {
    /// What falls short of production durability (replication factor 3,
    /// `min.insync.replicas` 2); empty when nothing does.
    pub fn shortcomings(&self) -> Vec<String> {
        let mut found = Vec::new();
        if self.replication_factor < 3 {
            found.push(format!(
                "replication factor {} is below 3",
                self.replication_factor
            ));
        }
        match self.min_insync_replicas {
            Some(n) if n < 2 => found.push(format!("min.insync.replicas {n} is below 2")),
            Some(_) => {}
            None => found.push("min.insync.replicas is unknown (the broker did not say)".into()),
        }
        found
    }
}

/// Reads each topic's partition count, replication factor and `min.insync.replicas`, checks
/// the partition count matches the configuration, and reports durability below production
/// level: a warning, or an error when `strict_durability` is on.
pub async fn check_durability(
    config: &KafkaConfig,
    topics: &[TopicConfig],
) -> Result<Vec<TopicDurability>> {
    let mut report = Vec::with_capacity(topics.len());
    for topic in topics {
        let found = topic_durability(config, &topic.name).await?;
        if found.partitions != topic.partitions {
            return Err(Error::Topic {
                topic: topic.name.clone(),
                reason: format!(
                    "has {} partitions, configuration says {}",
                    found.partitions, topic.partitions
                ),
            });
        }
        report.push(judge_durability(config, found)?);
    }
    Ok(report)
}

/// A consumer's check of the topics it reads: each must exist, since its producer creates it
/// (a consumer that started first would otherwise create the producer's topic with its own
/// guess at the partitions), and its durability is reported as [`check_durability`] does. The
/// partition count is the producer's to choose: any is accepted. A missing topic is an
/// [`Error::Topic`] that names `producer`.
pub async fn check_consumed(
    config: &KafkaConfig,
    topics: &[&str],
    producer: &str,
) -> Result<Vec<TopicDurability>> {
    let mut report = Vec::with_capacity(topics.len());
    for topic in topics {
        let found = match topic_durability(config, topic).await {
            Err(Error::Topic { topic, reason }) if reason == "does not exist" => {
                return Err(Error::Topic {
                    topic,
                    reason: format!(
                        "does not exist: {producer} creates it (a consumer never does); start \
                         it first, or create the topic"
                    ),
                });
            }
            other => other?,
        };
        report.push(judge_durability(config, found)?);
    }
    Ok(report)
}

/// Logs `found`'s durability, or refuses it when it is below production level in strict mode.
fn judge_durability(config: &KafkaConfig, found: TopicDurability) -> Result<TopicDurability> {
    let shortcomings = found.shortcomings();
    if shortcomings.is_empty() {
        tracing::info!(topic = %found.topic, replication_factor = found.replication_factor,
            min_insync_replicas = ?found.min_insync_replicas, "topic durability");
    } else if config.strict_durability {
        return Err(Error::Topic {
            topic: found.topic,
            reason: format!(
                "not durable enough for strict mode: {}",
                shortcomings.join("; ")
            ),
        });
    } else {
        tracing::warn!(topic = %found.topic, replication_factor = found.replication_factor,
            min_insync_replicas = ?found.min_insync_replicas,
            "topic is below production durability: {}", shortcomings.join("; "));
    }
    Ok(found)
}

/// A topic's partitions, replication factor and `min.insync.replicas`, from the broker.
pub async fn topic_durability(config: &KafkaConfig, topic: &str) -> Result<TopicDurability> {
    let (partitions, replication_factor) = topic_layout(config, topic).await?;
    let min_insync_replicas = topic_setting(config, topic, "min.insync.replicas")
        .await?
        .and_then(|value| value.parse().ok());
    Ok(TopicDurability {
        topic: topic.to_owned(),
        partitions,
        replication_factor,
        min_insync_replicas,
    })
}

/// One setting of a topic's configuration (`min.insync.replicas`, `retention.ms`, ...), when
/// the broker describes it (some, like tansu, do not: then `None`).
pub(crate) async fn topic_setting(
    config: &KafkaConfig,
    topic: &str,
    name: &str,
) -> Result<Option<String>> {
    let admin: AdminClient<DefaultClientContext> =
        config.client_config(ClientKind::Admin).create()?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    match admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &options)
        .await
    {
        Ok(results) => Ok(results
            .into_iter()
            .flatten()
            .find_map(|resource| resource.get(name).and_then(|entry| entry.value.clone()))),
        Err(e) => {
            tracing::debug!(topic, error = %e, "broker did not describe the topic's configuration");
            Ok(None)
        }
    }
}

/// Creates each topic that does not exist yet, then checks them all with
/// [`check_durability`]: the configured partition count, and replication below production
/// level (a warning, or an error in strict mode).
pub async fn ensure_topics(
    config: &KafkaConfig,
    topics: &[TopicConfig],
) -> Result<Vec<TopicDurability>> {
    if topics.is_empty() {
        return Ok(Vec::new());
    }
    for topic in topics {
        topic.validate()?;
    }
    let admin: AdminClient<DefaultClientContext> =
        config.client_config(ClientKind::Admin).create()?;
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
    check_durability(config, topics).await
}

/// The number of partitions a topic has, from the broker's metadata.
pub async fn partition_count(config: &KafkaConfig, topic: &str) -> Result<i32> {
    Ok(topic_layout(config, topic).await?.0)
}

/// A topic's partition count and the replica count of its least replicated partition.
async fn topic_layout(config: &KafkaConfig, topic: &str) -> Result<(i32, i32)> {
    let client = config.client_config(ClientKind::Admin);
    let name = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client.create()?;
        let metadata = consumer.fetch_metadata(Some(&name), Duration::from_secs(10))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty());
        match found {
            Some(t) => {
                let replicas = t
                    .partitions()
                    .iter()
                    .map(|p| i32::try_from(p.replicas().len()).unwrap_or(i32::MAX))
                    .min()
                    .unwrap_or(0);
                Ok((
                    i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                    replicas,
                ))
            }
            None => Err(Error::Topic {
                topic: name,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_durability_is_checked_in_the_settings_producers_get() {
        let weak = |configure: fn(&mut KafkaConfig)| {
            let mut kafka = KafkaConfig::new("127.0.0.1:1");
            configure(&mut kafka);
            durable_producer(&kafka).err().map(|e| e.to_string())
        };
        let err = weak(|k| {
            k.producer_settings.insert("acks".into(), "1".into());
        });
        assert!(err.is_some_and(|e| e.contains("acks=1")));
        let err = weak(|k| {
            k.settings
                .insert("enable_idempotence".into(), "false".into());
        });
        assert!(err.is_some_and(|e| e.contains("enable.idempotence=false")));
        // A kind's own value wins: the producer gets acks=all.
        assert_eq!(
            weak(|k| {
                k.settings.insert("acks".into(), "1".into());
                k.producer_settings.insert("acks".into(), "all".into());
            }),
            None
        );
        // Settings no producer gets do not concern it.
        assert_eq!(
            weak(|k| {
                k.consumer_settings.insert("acks".into(), "0".into());
                k.admin_settings.insert("acks".into(), "0".into());
            }),
            None
        );
    }
}
