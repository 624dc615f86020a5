//! Integration tests against the real broker, schema registry and PostgreSQL. Each test gets its
//! own database and topic.

// First, so its macro (`in_every_mode!`) is in scope in the others.
#[macro_use]
mod support;

mod dead_letters;
mod faults;
mod feed;
mod inbox;
mod log_relay;
mod outbox;
mod relay;
mod sequences;
mod shards;
mod vacuum;
