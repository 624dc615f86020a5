//! Where the relay's messages go: a [`Publisher`]. Both relay modes (the log stream and the
//! table poller), a new slot's snapshot, the drain of refused rows and replay send through
//! one, and none of them knows which it is.
//!
//! - [`KafkaPublisher`]: a durable (idempotent, `acks=all`) producer; a message is published
//!   when the broker acknowledged it, at a partition and offset.
//! - [`FeedPublisher`]: a service without a broker; a message is published when its row of
//!   the polling table is marked, which gives it its [feed](crate::feed) position, so sending
//!   is only agreeing to it.
//!
//! What happens after the answer (rows marked, the slot confirmed) is the caller's
//! checkpoint, the same for every publisher.

use std::sync::Mutex;

use futures::future::BoxFuture;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::record::{Origin, OutboxRecord};
use super::sequence::{SEQ_HEADER, SOURCE_HEADER, Sequence};
use crate::config::KafkaConfig;
use crate::error::Result;

/// Where a published message is: its partition and offset on the broker, or nowhere (the
/// feed gives it a position when its row is marked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Ack {
    pub(crate) partition: Option<i32>,
    pub(crate) offset: Option<i64>,
}

/// Why a message was not published.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    /// What the publisher said, for the row's `last_error` and the logs.
    pub(crate) reason: String,
    /// The publisher refused this message itself (too large, invalid, a topic it will not
    /// take), so sending it again as it is cannot help; otherwise the trouble may pass (an
    /// outage, a failed producer) once the publisher [recovers](Publisher::recover).
    pub(crate) for_good: bool,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The publisher's answer for one message.
pub(crate) type Delivery = BoxFuture<'static, std::result::Result<Ack, Refusal>>;

/// Publishes outbox messages. `send` hands a message over at once (in call order, so a key's
/// messages keep their order) and returns its answer as a future of its own, so that many can
/// be in flight.
pub(crate) trait Publisher: Send + Sync {
    /// Hands one message over; `origin` is the table it was written to. With a `sequence`
    /// it goes to that partition and carries its source and number (see
    /// [`super::sequence`]).
    fn send(&self, record: &OutboxRecord, origin: Origin, sequence: Option<&Sequence>) -> Delivery;

    /// How many partitions `topic` has, for a publisher that numbers its messages per
    /// partition; `None` for one that does not (the feed has positions of its own).
    fn partitions(&self, topic: &str) -> BoxFuture<'static, Result<Option<i32>>>;

    /// Starts over after a failure that may pass (for Kafka, a new producer).
    fn recover(&self) -> Result<()>;

    /// For the logs: `kafka` or `feed`.
    fn name(&self) -> &'static str;
}

/// Hands every record to `publisher`, then awaits each answer, in the records' order; a
/// record whose id `numbers` holds is sent with that number (see [`super::sequence`]). With
/// tracing on, the batch has a publish span linking each record's trace (whatever sends it:
/// the polling relay, a new slot's snapshot, a drain, a replay).
pub(crate) async fn send_all(
    publisher: &dyn Publisher,
    records: &[OutboxRecord],
    origin: Origin,
    numbers: &std::collections::HashMap<i64, Sequence>,
) -> Vec<std::result::Result<Ack, Refusal>> {
    let sending = async {
        let in_flight: Vec<Delivery> = records
            .iter()
            .map(|record| publisher.send(record, origin, numbers.get(&record.id)))
            .collect();
        futures::future::join_all(in_flight).await
    };
    if crate::telemetry::tracing_enabled() {
        let headers: Vec<_> = records.iter().map(OutboxRecord::headers).collect();
        let span = crate::telemetry::batch_span("publish", "producer", &headers);
        tracing::Instrument::instrument(sending, span).await
    } else {
        sending.await
    }
}

/// Counts one send for the metrics, acknowledged or refused.
pub(crate) fn count_sent(publisher: &dyn Publisher, topic: &str, acked: bool) {
    count_sends(publisher, topic, u64::from(acked), u64::from(!acked));
}

/// Counts sends to one topic for the metrics: acknowledged and refused.
pub(crate) fn count_sends(publisher: &dyn Publisher, topic: &str, acked: u64, refused: u64) {
    let Some(m) = crate::metrics::instruments() else {
        return;
    };
    let attrs = crate::metrics::messaging_attrs(publisher.name(), topic);
    if acked > 0 {
        m.sent.add(acked, &attrs);
    }
    if refused > 0 {
        let mut failed = attrs.to_vec();
        failed.push(opentelemetry::KeyValue::new(
            "error.type",
            "delivery_failed",
        ));
        m.sent.add(refused, &failed);
    }
}

/// Publishes to Kafka with a durable producer that is replaced after a failure (see
/// [`Publisher::recover`]).
pub(crate) struct KafkaPublisher {
    /// `None` for a producer the caller made (replay): it is not replaced.
    config: Option<KafkaConfig>,
    producer: Mutex<FutureProducer>,
}

impl KafkaPublisher {
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self> {
        Ok(Self {
            config: Some(config.clone()),
            producer: Mutex::new(crate::kafka::durable_producer(config)?),
        })
    }

    /// Sends through a producer the caller made and keeps.
    pub(crate) fn with_producer(producer: &FutureProducer) -> Self {
        Self {
            config: None,
            producer: Mutex::new(producer.clone()),
        }
    }

    /// The current producer (a cheap handle).
    fn producer(&self) -> FutureProducer {
        self.producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Publisher for KafkaPublisher {
    fn send(&self, row: &OutboxRecord, _origin: Origin, sequence: Option<&Sequence>) -> Delivery {
        let mut headers = row.kafka_headers();
        let mut record = FutureRecord::to(&row.topic)
            .key(&row.message_key)
            .payload(&row.payload);
        if let Some(sequence) = sequence {
            let seq = sequence.seq.to_string();
            headers = headers
                .insert(rdkafka::message::Header {
                    key: SOURCE_HEADER,
                    value: Some(sequence.source.as_bytes()),
                })
                .insert(rdkafka::message::Header {
                    key: SEQ_HEADER,
                    value: Some(seq.as_bytes()),
                });
            record = record.partition(sequence.partition);
        }
        match self.producer().send_result(record.headers(headers)) {
            Ok(delivery) => Box::pin(async move {
                match delivery.await {
                    Ok(Ok(d)) => Ok(Ack {
                        partition: Some(d.partition),
                        offset: Some(d.offset),
                    }),
                    Ok(Err((e, _))) => Err(kafka_refusal(&e)),
                    Err(_) => Err(kafka_refusal(&rdkafka::error::KafkaError::Canceled)),
                }
            }),
            Err((e, _)) => Box::pin(std::future::ready(Err(kafka_refusal(&e)))),
        }
    }

    /// Starts a new producer. The idempotent producer's state (producer id, sequence numbers)
    /// may no longer match the broker's: after a fatal error it refuses every message, and a
    /// broker that restarted or failed over can keep refusing an old producer's sequence.
    /// Whatever was not acknowledged is sent again, so nothing is lost, and a fresh producer
    /// costs only a connection.
    fn recover(&self) -> Result<()> {
        let Some(config) = &self.config else {
            return Ok(());
        };
        match self.producer().client().fatal_error() {
            Some((code, reason)) => {
                tracing::error!(%code, %reason, "kafka producer hit a fatal error; starting a new one");
            }
            None => tracing::info!("starting a new kafka producer after a failed send"),
        }
        let renewed = crate::kafka::durable_producer(config)?;
        *self
            .producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = renewed;
        Ok(())
    }

    fn partitions(&self, topic: &str) -> BoxFuture<'static, Result<Option<i32>>> {
        let producer = self.producer();
        let topic = topic.to_owned();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let metadata = producer
                    .client()
                    .fetch_metadata(Some(&topic), std::time::Duration::from_secs(10))?;
                match metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
                    .filter(|n| *n > 0)
                {
                    Some(n) => Ok(Some(i32::try_from(n).unwrap_or(i32::MAX))),
                    None => Err(crate::Error::Topic {
                        topic,
                        reason: "has no partitions the relay can see (does it exist?)".into(),
                    }),
                }
            })
            .await
            .map_err(|e| crate::Error::Task(e.to_string()))?
        })
    }

    fn name(&self) -> &'static str {
        "kafka"
    }
}

/// A delivery error as a refusal: for good when the broker refused the message itself, as
/// opposed to trouble a new producer or a later try gets past (an outage, a fenced or fatally
/// failed producer).
fn kafka_refusal(e: &rdkafka::error::KafkaError) -> Refusal {
    Refusal {
        reason: e.to_string(),
        for_good: !crate::error::kafka_error_is_retryable(e)
            && !crate::error::kafka_producer_failed(e),
    }
}

/// The feed's publisher: a row of the polling table is published by being marked (which gives
/// it its feed position), so it agrees to every such row at once. A message written to the
/// append-only table (an outbox made `for_mode(Log)`) has no row to mark: it is refused for
/// good, which copies it into the polling table with the reason, and from there it is
/// published like any other (later, and out of its key's order: the error says so).
pub(crate) struct FeedPublisher;

impl Publisher for FeedPublisher {
    fn send(&self, _record: &OutboxRecord, origin: Origin, _: Option<&Sequence>) -> Delivery {
        Box::pin(std::future::ready(match origin {
            Origin::Outbox => Ok(Ack::default()),
            Origin::Messages => Err(Refusal {
                reason: "a relay without a broker serves the feed from ferrybox_outbox, and this \
                         message was written to ferrybox_messages (an Outbox made for the log \
                         relay with a broker): it was copied into ferrybox_outbox and is served \
                         from there, after messages written later; write to ferrybox_outbox \
                         (Outbox::new) when the service has no broker"
                    .to_owned(),
                for_good: true,
            }),
        }))
    }

    fn recover(&self) -> Result<()> {
        Ok(())
    }

    fn partitions(&self, _topic: &str) -> BoxFuture<'static, Result<Option<i32>>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    fn name(&self) -> &'static str {
        "feed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> OutboxRecord {
        OutboxRecord {
            id: 1,
            message_id: uuid::Uuid::now_v7(),
            topic: "t".into(),
            message_key: "k".into(),
            message_type: "x".into(),
            entity_version: 1,
            occurred_at: chrono::Utc::now(),
            headers: serde_json::json!({}).into(),
            payload: vec![],
        }
    }

    #[tokio::test]
    async fn the_feed_agrees_to_the_polling_tables_rows_and_refuses_the_append_only_ones_for_good()
    {
        let feed = FeedPublisher;
        assert_eq!(
            feed.send(&record(), Origin::Outbox, None).await.unwrap(),
            Ack::default()
        );
        let refused = feed
            .send(&record(), Origin::Messages, None)
            .await
            .unwrap_err();
        assert!(refused.for_good, "{refused}");
        assert!(refused.reason.contains("ferrybox_outbox"), "{refused}");
    }

    #[test]
    fn a_broker_refusing_the_message_itself_is_for_good_an_outage_is_not() {
        use rdkafka::error::KafkaError as K;
        use rdkafka::types::RDKafkaErrorCode as C;
        assert!(kafka_refusal(&K::MessageProduction(C::MessageSizeTooLarge)).for_good);
        assert!(!kafka_refusal(&K::MessageProduction(C::MessageTimedOut)).for_good);
        assert!(!kafka_refusal(&K::MessageProduction(C::Fatal)).for_good);
        assert!(!kafka_refusal(&K::Canceled).for_good);
    }
}
