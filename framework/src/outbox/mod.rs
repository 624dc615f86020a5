//! The producer side: [`Outbox::enqueue`] writes a message in the caller's transaction, the
//! [`Relay`] publishes committed rows to Kafka, and the [`sent_log`] keeps published rows for
//! `status` and `replay`.
//!
//! The relay learns of committed rows in one of two ways ([`RelayMode`]): `log` streams them
//! from the write-ahead log (`log/`: the stream, `pgoutput` decoding, the slot and its
//! checkpoint), `table` polls `ferrybox_outbox` (`poll.rs`); `relay.rs` makes an instance active (per shard)
//! and dispatches to its mode. What both do to the polling table
//! is in `table.rs`; the record and how it is sent in `record.rs` and `publish.rs`; the
//! settings in `settings.rs`; the `LISTEN` wake-up in `wake.rs`.

mod enqueue;
mod log;
mod poll;
mod publish;
mod record;
mod relay;
pub(crate) mod schema;
pub mod sent_log;
mod settings;
mod table;
mod wake;

pub use enqueue::{Outbox, RELAY_WAITING_LOCK};
pub use log::shards::{Layout, MAX_SHARDS, ReshardReport, reshard};
pub use log::slot::SlotStatus;
pub(crate) use record::envelope_headers;
pub use relay::Relay;
pub use sent_log::{OutboxStatus, ReplayOptions, ReplayReport, ReplaySelection};
pub use settings::{RelayConfig, RelayMode};
pub use table::BatchOutcome;
pub(crate) use wake::{listen, sleep_or_shutdown};
