//! End-to-end tests: both reference services against the real broker, schema registry and
//! PostgreSQL, driven through their HTTP APIs.

mod bad_input;
mod consumer_crash;
mod evolution;
mod flow;
mod observability;
mod openapi;
mod reconcile;
mod replay;
mod security;
