//! The producer side: [`Outbox::enqueue`] writes a message in the caller's transaction, the
//! [`Relay`] publishes committed rows to Kafka, and the [`sent_log`] keeps published rows for
//! `status` and `replay`.
//!
//! The relay is made of three seams:
//!
//! - **Leadership** (`relay.rs`): an instance becomes active per shard by holding its advisory
//!   lock, and hands the active relay (`active.rs`) to the source its mode resolves to.
//! - **Sources** of committed messages, each with its own checkpoint (how progress is made
//!   durable): `log/` streams them from the write-ahead log (`pgoutput` decoding, the slot
//!   and its checkpoint: progress is the slot's confirmed position); `poll.rs` claims the
//!   polling table's unpublished rows (progress is rows marked published).
//! - **Publishers** (`publish.rs`): Kafka, or the feed for a service without a broker. Every
//!   source, a new slot's snapshot, the drain of refused rows and replay send through one.
//!
//! What every source does to the polling table (marks, refusals, the drain, the backlog
//! gauge) is in `table.rs`; the record and its origin table in `record.rs`; the settings in
//! `settings.rs`; the `LISTEN` wake-up in `wake.rs`.

mod active;
mod adopt;
mod enqueue;
mod log;
mod poll;
mod publish;
pub(crate) mod record;
mod relay;
pub(crate) mod schema;
pub mod sent_log;
pub(crate) mod sequence;
mod settings;
mod table;
mod wake;

pub use enqueue::{Outbox, RELAY_WAITING_LOCK};
pub use log::shards::{Layout, MAX_SHARDS, ReshardReport, reshard};
pub use log::slot::SlotStatus;
pub(crate) use record::envelope_headers;
pub use relay::Relay;
pub use sent_log::{OutboxStatus, ReplayOptions, ReplayReport, ReplaySelection};
pub use sequence::{SEQ_HEADER, SOURCE_HEADER};
pub use settings::{RelayConfig, RelayMode};
pub use table::BatchOutcome;
pub(crate) use wake::{listen, sleep_or_shutdown};
