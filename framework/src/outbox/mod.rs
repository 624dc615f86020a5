//! The producer side: [`Outbox::enqueue`] writes a message in the caller's transaction, and
//! the [`Relay`] publishes committed rows to Kafka.

mod enqueue;
mod relay;
pub(crate) mod schema;

pub use enqueue::Outbox;
pub(crate) use relay::sleep_or_shutdown;
pub use relay::{BatchOutcome, Relay, RelayConfig};
