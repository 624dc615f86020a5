//! # Ferrybox
//!
//! Move data between services through Kafka with nothing lost and nothing applied twice.
//!
//! The pieces, in the order a message meets them:
//!
//! - [`message`]: the envelope. Every message has a stable [`MessageId`] (UUIDv7), a type, an
//!   entity key and a per-entity version, and travels with CloudEvents headers. Typed messages
//!   implement [`Event`].
//! - [`codec`]: Avro payloads in the Confluent wire format, schemas in a Confluent-API schema
//!   registry ([`AvroCodec`]).
//! - [`outbox`]: the producer side. [`Outbox::enqueue`] writes the message in the caller's
//!   business transaction; the [`Relay`] publishes committed rows with an idempotent,
//!   `acks=all` producer, reading them from PostgreSQL's write-ahead log (confirming its
//!   replication slot only past what the broker acknowledged) or polling the outbox table
//!   (marking rows published only after the broker acknowledged them) — [`RelayMode`].
//!   Rows stay for a retention window as the [`outbox::sent_log`], which can be replayed after
//!   broker data loss.
//! - [`inbox`]: the consumer side. An [`InboxConsumer`] deduplicates by message id, runs the
//!   [`Handler`] in the same database transaction, and stores Kafka offsets only after that
//!   transaction committed. Failures are retried or dead-lettered, never dropped.
//! - [`feed`]: the broker-less path. A [`FeedServer`] serves the sent log at an `events`
//!   endpoint by gap-free positions that only move past committed rows; a [`FeedConsumer`]
//!   pulls it in order through the same inbox, keeping its position in the same transaction.
//! - [`reconcile`]: the consumer compares its cache with the producer's full snapshot, repairs
//!   what is missing or older, never overwrites newer data, and [`alert`]s on the rest.
//! - [`contract`](mod@contract): consumer-driven contracts: producers' published schemas, consumers' reader
//!   schemas, and the check that an incompatible change breaks the build.
//! - [`db`], [`kafka`], [`config`], [`error`]: the plumbing: connection pool and embedded
//!   migrations, durable Kafka clients and topic creation, layered configuration, typed errors.
//! - [`vacuum`]: what holds vacuum back (long and prepared transactions, idle replication
//!   slots), in `status`, the metrics and alerts.
//! - [`http`], [`health`], [`metrics`], [`openapi`], [`telemetry`]: what a service serves and
//!   exports: one JSON error shape, liveness and readiness, Prometheus metrics (with alerting
//!   rules and a dashboard under `deploy/`), OpenAPI documents generated from the handlers,
//!   and traces across the hop.
//! - [`contract::asyncapi`]: the AsyncAPI 3.0 document of the topics, messages and contracts.
//! - [`token`]: signed, expiring session tokens (JWT) one service issues and others verify.
//! - [`storage`]: how Ferrybox's tables age: partitions dropped whole, never rows deleted.
//! - [`shutdown`]: SIGTERM and Ctrl-C as a cancellation token for binaries.
//! - `testing` (feature `test-util`): isolated databases and topics for tests against the real
//!   PostgreSQL and broker.
//!
//! Every long-running piece takes a [`CancellationToken`] and drains before it returns.

#![warn(missing_docs)]

pub mod alert;
pub mod codec;
pub mod config;
pub mod contract;
pub mod db;
pub mod error;
pub mod feed;
pub mod health;
pub mod http;
pub mod inbox;
pub mod kafka;
pub mod message;
pub mod metrics;
pub mod openapi;
pub mod outbox;
pub mod reconcile;
pub mod shutdown;
pub mod storage;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod token;
pub mod vacuum;

pub use codec::AvroCodec;
pub use config::{ClientKind, DatabaseConfig, KafkaConfig, TopicConfig};
pub use error::{Error, Result};
pub use feed::{FeedConsumer, FeedServer};
pub use inbox::{Handler, HandlerError, InboxConfig, InboxConsumer, ReceivedMessage};
pub use message::{Event, IncomingMessage, MessageId, OutgoingMessage};
pub use outbox::{
    Outbox, OutboxStatus, Relay, RelayConfig, RelayMode, ReplayOptions, ReplaySelection,
};
pub use tokio_util::sync::CancellationToken;

/// A consumer's contract and every reader schema it names, embedded at compile time from the
/// contract file (each `.avsc` is named once, there):
///
/// ```ignore
/// let contract = ferrybox::contract!("contracts/users.toml").contract()?;
/// let consumer = InboxConsumer::new(/* ... */)?.with_contract(contract)?;
/// ```
///
/// The path is relative to the calling crate's `Cargo.toml`; a contract that is not valid TOML
/// or names a schema file that is not there fails the build. Expands to a
/// [`contract::EmbeddedContract`].
pub use ferrybox_macros::contract;

// Re-exported so services use the same versions the framework was built with.
pub use apache_avro;
pub use diesel;
pub use diesel_async;
