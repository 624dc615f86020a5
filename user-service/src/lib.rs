//! # user-service
//!
//! The reference producer. It owns user accounts and publishes every change through the
//! Ferrybox outbox, so a change and its event commit together or not at all.
//!
//! - [`routes`]: the HTTP API (`POST /users`, `GET|PATCH|DELETE /users/{id}`,
//!   `POST /users/{id}/suspend`).
//! - [`users`]: validation and the change transactions (row + event).
//! - [`events`]: the published events, tied to their schema files in `schemas/`.
//! - [`snapshot`]: every user and tombstone with its version, for consumers' reconciliation;
//!   the pulled event feed (`GET /events`) comes with the framework's `FeedServer`.
//! - [`startup`]: migrations, topic, schema registration, relay and server.
//! - [`ops`]: operator commands: the relay on its own, `outbox status` and `outbox replay`.
//! - [`config`]: settings from a file and `USER_SERVICE_*` variables.

pub mod auth;
pub mod config;
pub mod events;
pub mod ops;
mod password;
pub mod routes;
mod schema;
pub mod snapshot;
pub mod startup;
pub mod users;

pub use config::Settings;
pub use startup::Application;
