//! Reconciliation: the consumer compares its cache with the producer's full snapshot and
//! repairs what messages failed to bring.
//!
//! **The snapshot** ([`snapshot`]) is NDJSON, read in one consistent transaction:
//!
//! ```text
//! {"snapshot": {"format": "ferrybox-snapshot/1", "source": "user-service", "taken_at": "…", "watermark": 1234}}
//! {"entry": {"key": "…", "version": 7, "deleted": false, "state": {…}}}
//! {"entry": {"key": "…", "version": 3, "deleted": true, "state": null}}
//! {"end": {"entities": 2}}
//! ```
//!
//! Every entity comes with its per-entity version; deleted ones come as tombstones, which is
//! how a snapshot *proves* a deletion. The `watermark` is a feed position: every message at or
//! below it is already contained in the snapshot (a feed consumer can start there). A stream
//! without its `end` line is incomplete and is refused.
//!
//! **The rules** ([`Reconciler`]), for each entity:
//!
//! | cache | snapshot | action |
//! |---|---|---|
//! | missing | live or tombstone | repair (write it) |
//! | older version | newer version | repair (write it, only if still older at write time) |
//! | same version | same version | in sync |
//! | newer version | older version | skip: a message applied after the snapshot was taken |
//! | present | absent, changed after the snapshot | skip: created after the snapshot |
//! | present, deleted | absent | in sync |
//! | present | absent, unchanged since before the snapshot | **unresolved**, alert |
//!
//! A cached entity is removed (made a tombstone) only by a snapshot tombstone at least as new,
//! never because it is absent: absence cannot tell a deletion from a creation after the
//! snapshot. Repairs are written by the consumer's [`Cache`], which compares versions at write
//! time, so a message applied concurrently is never overwritten by older snapshot data.
//! Unresolved differences raise an [`Alert`](crate::alert::Alert).

mod reconciler;
pub mod snapshot;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use reconciler::{Cache, CachedEntry, ReconcileConfig, Reconciler, Repair, Report, Unresolved};
pub use snapshot::SnapshotSource;

/// The `format` every snapshot header carries.
pub const FORMAT: &str = "ferrybox-snapshot/1";

/// The first line of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// Always [`FORMAT`].
    pub format: String,
    /// The producer.
    pub source: String,
    /// The moment the snapshot shows (the producer's clock).
    pub taken_at: DateTime<Utc>,
    /// Every message with a feed position at or below this is contained in the snapshot.
    pub watermark: i64,
}

/// One entity in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// The entity's key (the message key of its events).
    pub key: String,
    /// Its per-entity version (the one its events carry).
    pub version: i64,
    /// A tombstone: the entity was deleted at `version`.
    #[serde(default)]
    pub deleted: bool,
    /// The entity's state (null for a tombstone), in the producer's own JSON shape.
    #[serde(default)]
    pub state: serde_json::Value,
}

/// One line of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotLine {
    /// The header.
    Snapshot(SnapshotHeader),
    /// An entity.
    Entry(SnapshotEntry),
    /// The end, with the number of entities sent.
    End {
        /// How many `entry` lines came before.
        entities: u64,
    },
}
