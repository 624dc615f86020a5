//! How the inbox consumer reads, retries, dead-letters and cleans up, and what it counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::apply::Dedup;
use crate::config::{Backoff, duration_ms};
use crate::error::{Error, Result};

/// How the inbox consumer reads and retries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    /// The Kafka consumer group.
    pub group_id: String,
    /// Topics to read.
    pub topics: Vec<String>,
    /// The name this consumer's rows carry in the inbox table; defaults to the group id.
    pub consumer_name: Option<String>,
    /// Static group membership (`group.instance.id`, on by default): a restarted instance
    /// takes its own place in the group back at once, with no rebalance, instead of waiting
    /// for its dead predecessor to be evicted (on Apache Kafka after `session.timeout.ms`; on
    /// the local tansu broker, never). Failure modes: two live processes with one instance id
    /// fence each other (the newer one wins; the older one's client fails for good, its
    /// consumer stops, and a supervised service fails readiness and exits); an
    /// instance that never comes back keeps its partitions until `session.timeout.ms` passes
    /// (on Kafka) and is not evicted at all on tansu. Turn it off for short-lived consumers.
    pub static_membership: bool,
    /// This instance's id in the group when `static_membership` is on; defaults to the
    /// consumer name and the host name (`auth-service-<host>`), which is stable across
    /// restarts of one pod of a StatefulSet, or of one machine, and distinct between them.
    /// Set it when several instances share a host.
    pub instance_id: Option<String>,
    /// The consumer's version, recorded on dead letters (which code failed).
    pub consumer_version: Option<String>,
    /// The most messages applied in one database transaction.
    pub batch_size: usize,
    /// How long to wait for more messages before applying a batch that is not full.
    #[serde(with = "duration_ms", rename = "batch_linger_ms")]
    pub batch_linger: Duration,
    /// Attempts for a retryable failure before the message is dead-lettered.
    pub max_attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// The longest a handler may run before its attempt counts as a retryable failure; keeps a
    /// slow handler from pushing the consumer out of its group. Past it, the statement the
    /// handler runs is cancelled on the server and the handler gets 5 s more to return before
    /// it is dropped (what still runs then is cancelled too).
    #[serde(with = "duration_ms", rename = "handler_timeout_ms")]
    pub handler_timeout: Duration,
    /// Where dead letters are also published (with their origin in headers); none when unset.
    pub dead_letter_topic: Option<String>,
    /// How long applied message ids are kept for deduplication, at least. An id goes only
    /// once the consumer committed past it (the group's offsets on the broker, or the feed
    /// position) and once the topic's `retention.ms`, when longer, has passed too; a topic
    /// that keeps messages forever keeps its ids forever. Where the broker does not tell a
    /// topic's retention, this stands for it: keep it longer than the topics' retention.
    #[serde(with = "duration_ms", rename = "retention_ms")]
    pub retention: Duration,
    /// How often expired inbox rows are deleted (in small batches).
    #[serde(with = "duration_ms", rename = "cleanup_interval_ms")]
    pub cleanup_interval: Duration,
    /// How duplicates are found: `sequence` (the default: by the producer's numbers where
    /// messages carry them, by id otherwise) or `id`.
    pub dedup: Dedup,
    /// Where a gap in a topic's numbers is repaired from: per topic, the URL of its producer's
    /// repair endpoint (`/events/numbered` of a Ferrybox service). A topic without one waits
    /// for an operator ([`crate::inbox::Gaps`]; `auth-service gaps list`, `gaps skip`).
    pub repair_urls: std::collections::BTreeMap<String, String>,
    /// Sent to the repair endpoints as `Authorization: Bearer <token>` (the producer's
    /// internal token). Never logged.
    #[serde(serialize_with = "crate::config::secret::serialize_option")]
    pub repair_token: Option<secrecy::SecretString>,
    /// How often a halted partition's gap is tried again (repaired, or found skipped).
    #[serde(with = "duration_ms", rename = "repair_interval_ms")]
    pub repair_interval: Duration,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            group_id: String::new(),
            topics: Vec::new(),
            consumer_name: None,
            static_membership: true,
            instance_id: None,
            consumer_version: None,
            batch_size: 500,
            batch_linger: Duration::from_millis(5),
            max_attempts: 10,
            backoff: Backoff::default(),
            handler_timeout: Duration::from_secs(30),
            dead_letter_topic: None,
            // Kafka's default retention is 7 days; keep ids a week longer.
            retention: Duration::from_secs(14 * 24 * 3600),
            cleanup_interval: Duration::from_secs(300),
            dedup: Dedup::Sequence,
            repair_urls: std::collections::BTreeMap::new(),
            repair_token: None,
            repair_interval: Duration::from_secs(5),
        }
    }
}

impl InboxConfig {
    /// The defaults, consuming `topics` as consumer group `group_id` (both are required: the
    /// [`Default`] leaves them empty, which [`InboxConfig::validate`] refuses).
    pub fn new<T: Into<String>>(
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> Self {
        Self {
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if self.group_id.is_empty() {
            return Err(Error::Config("inbox.group_id is empty".into()));
        }
        if self.topics.is_empty() {
            return Err(Error::Config("inbox.topics is empty".into()));
        }
        if self.batch_size == 0 {
            return Err(Error::Config("inbox.batch_size must be at least 1".into()));
        }
        if self.max_attempts == 0 {
            return Err(Error::Config(
                "inbox.max_attempts must be at least 1".into(),
            ));
        }
        if self
            .dead_letter_topic
            .as_ref()
            .is_some_and(|t| self.topics.contains(t))
        {
            return Err(Error::Config(
                "inbox.dead_letter_topic must not be a topic the consumer reads".into(),
            ));
        }
        if self
            .instance_id
            .as_ref()
            .is_some_and(|id| id.trim().is_empty())
        {
            return Err(Error::Config(
                "inbox.instance_id is empty: leave it unset for the default".into(),
            ));
        }
        if self.repair_interval.is_zero() {
            return Err(Error::Config(
                "inbox.repair_interval_ms must be above zero".into(),
            ));
        }
        for (topic, url) in &self.repair_urls {
            reqwest::Url::parse(url).map_err(|e| {
                Error::Config(format!(
                    "inbox.repair_urls.{topic} is not a URL ({e}): {url}"
                ))
            })?;
        }
        if self.cleanup_interval.is_zero() {
            return Err(Error::Config(
                "inbox.cleanup_interval_ms must be above zero".into(),
            ));
        }
        Ok(())
    }

    /// The `group.instance.id` this consumer joins with, when static membership is on.
    pub fn instance_id(&self) -> Option<String> {
        if !self.static_membership {
            return None;
        }
        Some(match &self.instance_id {
            Some(id) => id.clone(),
            None => format!(
                "{}-{}",
                self.consumer_name(),
                gethostname::gethostname().to_string_lossy()
            ),
        })
    }

    /// The name this consumer's inbox and dead-letter rows carry.
    pub fn consumer_name(&self) -> &str {
        self.consumer_name.as_deref().unwrap_or(&self.group_id)
    }
}

/// Counters of what the consumer did since it started.
#[derive(Debug, Default)]
pub struct InboxStats {
    pub(crate) applied: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) parked: AtomicU64,
    pub(crate) cleaned: AtomicU64,
}

/// A point-in-time copy of [`InboxStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InboxStatsSnapshot {
    /// Messages whose handler ran and committed.
    pub applied: u64,
    /// Messages skipped because their id was already in the inbox.
    pub duplicates: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Messages recorded as dead letters.
    pub dead_lettered: u64,
    /// Messages parked behind a dead letter of the same key.
    pub parked: u64,
    /// Expired inbox rows deleted by retention.
    pub cleaned: u64,
}

impl InboxStats {
    /// The current counts.
    pub fn snapshot(&self) -> InboxStatsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        InboxStatsSnapshot {
            applied: load(&self.applied),
            duplicates: load(&self.duplicates),
            retries: load(&self.retries),
            dead_lettered: load(&self.dead_lettered),
            parked: load(&self.parked),
            cleaned: load(&self.cleaned),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_needs_its_group_and_topics_and_new_gives_them() {
        assert!(InboxConfig::default().validate().is_err());
        let config = InboxConfig::new("billing", ["invoices"]);
        config.validate().unwrap();
        assert_eq!(
            (config.group_id.as_str(), config.topics.as_slice()),
            ("billing", ["invoices".to_owned()].as_slice())
        );
        assert_eq!(config.batch_size, InboxConfig::default().batch_size);
    }
}
