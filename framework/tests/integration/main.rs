//! Integration tests against the real broker, schema registry and PostgreSQL. Each test gets its
//! own database and topic.

mod dead_letters;
mod faults;
mod feed;
mod inbox;
mod log_relay;
mod outbox;
mod relay;
mod shards;
mod support;
