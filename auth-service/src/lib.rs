//! # auth-service
//!
//! The reference consumer. It keeps a cache of users fed by user-service's events through the
//! Ferrybox inbox (each event applied once, never an older version over a newer one) and logs
//! users in against that cache.
//!
//! - [`cache`]: the inbox handler that applies user events.
//! - [`events`]: the fields this service reads from each event.
//! - [`login`]: credentials, sessions and tokens.
//! - [`routes`]: the HTTP API (`POST /login`, `GET /session`, `GET /users/{id}`,
//!   `GET /inbox/stats`).
//! - [`startup`]: migrations, topic, consumer and server.
//! - [`config`]: settings from a file and `AUTH_SERVICE_*` variables.

pub mod cache;
pub mod config;
pub mod events;
pub mod limits;
pub mod login;
pub mod ops;
pub mod routes;
mod schema;
pub mod startup;

pub use config::Settings;
pub use startup::Application;
