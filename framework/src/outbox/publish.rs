//! The Kafka publisher both relay modes and replay send through: the durable producer, and
//! a fresh one after a failure.

use std::sync::Mutex;

use rdkafka::producer::{FutureProducer, Producer};

use crate::config::KafkaConfig;
use crate::error::Result;

/// A durable producer that can be replaced (see [`KafkaPublisher::renew`]).
pub(crate) struct KafkaPublisher {
    config: KafkaConfig,
    producer: Mutex<FutureProducer>,
}

impl KafkaPublisher {
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self> {
        Ok(Self {
            config: config.clone(),
            producer: Mutex::new(crate::kafka::durable_producer(config)?),
        })
    }

    /// The current producer (a cheap handle).
    pub(crate) fn producer(&self) -> FutureProducer {
        self.producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Starts a new producer after a failed send. The idempotent producer's state (producer
    /// id, sequence numbers) may no longer match the broker's: after a fatal error it refuses
    /// every message, and a broker that restarted or failed over can keep refusing an old
    /// producer's sequence. Whatever was not acknowledged is sent again, so nothing is lost,
    /// and a fresh producer costs only a connection.
    pub(crate) fn renew(&self, old: &FutureProducer) -> Result<()> {
        match old.client().fatal_error() {
            Some((code, reason)) => {
                tracing::error!(%code, %reason, "kafka producer hit a fatal error; starting a new one");
            }
            None => tracing::info!("starting a new kafka producer after a failed send"),
        }
        let renewed = crate::kafka::durable_producer(&self.config)?;
        *self
            .producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = renewed;
        Ok(())
    }
}
