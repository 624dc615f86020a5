//! The contract check: producer evolution and consumer readability.

use std::fmt;

use super::compat::explain;
use super::load::{ConsumerContract, ProducerCatalog};

/// One problem the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// A producer's new version breaks its own compatibility level.
    IncompatibleVersion {
        /// The producer.
        producer: String,
        /// `<topic>/<message type>`.
        message: String,
        /// The offending version.
        version: u32,
        /// What is wrong.
        problem: String,
    },
    /// A consumer cannot read a version the producer publishes.
    BreaksConsumer {
        /// The producer.
        producer: String,
        /// The consumer.
        consumer: String,
        /// `<topic>/<message type>`.
        message: String,
        /// The version the consumer cannot read.
        version: u32,
        /// What is wrong.
        problem: String,
    },
    /// A consumer reads a message nobody publishes on that topic.
    UnknownMessage {
        /// The consumer.
        consumer: String,
        /// `<topic>/<message type>`.
        message: String,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::IncompatibleVersion {
                producer,
                message,
                version,
                problem,
            } => {
                write!(
                    f,
                    "INCOMPATIBLE {producer}: {message} v{version}: {problem}"
                )
            }
            Finding::BreaksConsumer {
                producer,
                consumer,
                message,
                version,
                problem,
            } => {
                write!(
                    f,
                    "BREAKING {producer} -> {consumer}: {message} v{version}: {problem}"
                )
            }
            Finding::UnknownMessage { consumer, message } => {
                write!(
                    f,
                    "UNKNOWN {consumer} reads {message}, which no producer's schemas define"
                )
            }
        }
    }
}

/// Checks every producer version against the earlier ones under its topic's level, and every
/// consumer's reader schemas against every published version. Empty when all is well.
pub fn check(catalog: &ProducerCatalog, contracts: &[ConsumerContract]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for topic in &catalog.topics {
        for history in &topic.messages {
            let message = format!("{}/{}", topic.topic, history.message_type);
            for (i, new) in history.versions.iter().enumerate().skip(1) {
                for existing in &history.versions[topic.compatibility.checked_against(i)] {
                    for problem in topic.compatibility.violations(
                        &new.schema,
                        &existing.schema,
                        existing.version,
                    ) {
                        findings.push(Finding::IncompatibleVersion {
                            producer: topic.producer.clone(),
                            message: message.clone(),
                            version: new.version,
                            problem: format!("{problem} (under {})", topic.compatibility),
                        });
                    }
                }
            }
        }
    }
    for contract in contracts {
        for (message_type, reader) in &contract.readers {
            let message = format!("{}/{message_type}", contract.topic);
            let Some((topic, history)) = catalog.find(&contract.topic, message_type) else {
                findings.push(Finding::UnknownMessage {
                    consumer: contract.consumer.clone(),
                    message,
                });
                continue;
            };
            for written in &history.versions {
                for problem in explain(&written.schema, reader) {
                    findings.push(Finding::BreaksConsumer {
                        producer: topic.producer.clone(),
                        consumer: contract.consumer.clone(),
                        message: message.clone(),
                        version: written.version,
                        problem,
                    });
                }
            }
        }
    }
    findings
}
