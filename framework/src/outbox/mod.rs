//! The producer side: [`Outbox::enqueue`] writes a message in the caller's transaction, the
//! [`Relay`] publishes committed rows to Kafka, and the [`sent_log`] keeps published rows for
//! `status` and `replay`.

mod enqueue;
mod relay;
pub(crate) mod schema;
pub mod sent_log;

pub use enqueue::{Outbox, RELAY_WAITING_LOCK};
pub use relay::{BatchOutcome, Relay, RelayConfig};
pub(crate) use relay::{envelope_headers, listen, sleep_or_shutdown};
pub use sent_log::{OutboxStatus, ReplayOptions, ReplayReport, ReplaySelection};
