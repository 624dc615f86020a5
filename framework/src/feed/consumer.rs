//! The consumer's side of the feed: pull pages in order, apply them through the inbox, keep the
//! position in the same transaction.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{FEED_PARTITION, FeedPage};
use crate::alert::{Alert, Alerter};
use crate::codec::AvroCodec;
use crate::config::{Backoff, duration_ms};
use crate::contract::ReaderSchemas;
use crate::db::{self, PgPool};
use crate::error::{Error, Result};
use crate::inbox::apply::Record;
use crate::inbox::pipeline::{OnPermanent, Pipeline, Progress, Transport};
use crate::inbox::{Handler, InboxConfig, InboxStats};
use crate::outbox::sleep_or_shutdown;

/// What a feed consumer does with a message it can never apply (undecodable, unknown type, a
/// handler's permanent error, retries exhausted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUndecodable {
    /// Stop before it and raise an alert: nothing after it is applied until an operator
    /// deploys a fix (the consumer then resumes at the same message) or moves the position.
    #[default]
    Halt,
    /// Dead-letter it, park its key's later messages behind it, and go on (as the Kafka
    /// consumer does).
    DeadLetter,
}

/// Where and how a feed consumer pulls.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    /// The producer's `events` endpoint, e.g. `http://user-service:8080/events`.
    pub url: String,
    /// The name the position is stored under; keep it when the URL changes.
    pub name: String,
    /// Events asked for per request (and applied per transaction, at most).
    pub limit: usize,
    /// How long the producer may hold a request open when there is nothing new.
    #[serde(with = "duration_ms", rename = "wait_ms")]
    pub wait: Duration,
    /// What to do with a message that cannot be applied.
    pub on_undecodable: OnUndecodable,
    /// Delays between attempts when the producer cannot be reached.
    pub backoff: Backoff,
    /// Sent as `Authorization: Bearer <token>` (the producer's internal token). Never logged.
    #[serde(serialize_with = "crate::config::secret::serialize_option")]
    pub token: Option<SecretString>,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            name: "feed".into(),
            limit: 500,
            wait: Duration::from_secs(20),
            on_undecodable: OnUndecodable::Halt,
            backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(10),
            },
            token: None,
        }
    }
}

impl FeedConfig {
    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(Error::Config(
                "feed.url must be the producer's http(s) events endpoint".into(),
            ));
        }
        if self.name.is_empty() {
            return Err(Error::Config("feed.name is empty".into()));
        }
        if self.limit == 0 {
            return Err(Error::Config("feed.limit must be at least 1".into()));
        }
        Ok(())
    }
}

/// Pulls a producer's event feed and applies it through the inbox. See the
/// [module documentation](super) for the guarantees.
pub struct FeedConsumer<H> {
    pipeline: Pipeline<H>,
    config: FeedConfig,
    client: reqwest::Client,
    alerter: Alerter,
}

impl<H> std::fmt::Debug for FeedConsumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedConsumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> FeedConsumer<H> {
    /// A consumer of `feed` for the inbox consumer `inbox` describes (its name, version,
    /// retries, time limits and retention; events of topics not in `inbox.topics` are
    /// passed over). Dead letters are kept in the database only: there is no broker.
    pub fn new(
        pool: PgPool,
        codec: AvroCodec,
        handler: H,
        inbox: InboxConfig,
        feed: FeedConfig,
        alerter: Alerter,
    ) -> Result<Self> {
        inbox.validate()?;
        feed.validate()?;
        let client = reqwest::Client::builder()
            .timeout(feed.wait + Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Config(format!("feed http client: {e}")))?;
        let transport = Transport::Feed(feed.name.clone());
        let mut pipeline = Pipeline::new(pool, codec, handler, inbox, transport, None);
        pipeline.on_permanent = match feed.on_undecodable {
            OnUndecodable::Halt => OnPermanent::Halt,
            OnUndecodable::DeadLetter => OnPermanent::DeadLetter,
        };
        pipeline.alerter = alerter.clone();
        Ok(Self {
            pipeline,
            config: feed,
            client,
            alerter,
        })
    }

    /// Decodes into the consumer's own reader schemas, as
    /// [`InboxConsumer::with_reader_schemas`](crate::InboxConsumer::with_reader_schemas).
    #[must_use]
    pub fn with_reader_schemas(mut self, readers: ReaderSchemas) -> Self {
        self.pipeline.applier.readers = Some(readers);
        self
    }

    /// Shared counters, readable while the consumer runs.
    pub fn stats(&self) -> Arc<InboxStats> {
        Arc::clone(&self.pipeline.stats)
    }

    /// The stored position.
    pub async fn position(&self) -> Result<i64> {
        let mut conn = db::connection(&self.pipeline.applier.pool).await?;
        super::position(&mut conn, self.consumer(), &self.config.name).await
    }

    fn consumer(&self) -> &str {
        self.pipeline.config.consumer_name()
    }

    /// Pulls and applies until `shutdown` (then `Ok`), or until it halts
    /// ([`Error::FeedHalted`], after raising an alert). A message being applied when shutdown
    /// comes is either committed with its position or left for the next run.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let cleaner = self.pipeline.spawn_cleaner(&shutdown);
        let result = self.pull_until_shutdown(&shutdown).await;
        shutdown.cancel();
        if let Err(e) = cleaner.await {
            tracing::warn!(error = %e, "inbox cleaner task failed");
        }
        if let Err(Error::FeedHalted { position, reason }) = &result {
            self.alerter
                .raise(&Alert::new(
                    format!("{} feed consumer", self.consumer()),
                    "feed_halted",
                    format!("feed {} halted after position {position}", self.config.name),
                    serde_json::json!({
                        "feed": self.config.name,
                        "url": self.config.url,
                        "consumer": self.consumer(),
                        "position": position,
                        "reason": reason,
                    }),
                ))
                .await;
        }
        result
    }

    async fn pull_until_shutdown(&self, shutdown: &CancellationToken) -> Result<()> {
        let mut failures = 0u32;
        let mut position = loop {
            match self.position().await {
                Ok(p) => break p,
                Err(e) if e.is_retryable() => {
                    failures += 1;
                    tracing::warn!(error = %e, "cannot read the feed position; retrying");
                    if sleep_or_shutdown(self.config.backoff.delay(failures), shutdown).await {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        };
        failures = 0;
        while !shutdown.is_cancelled() {
            let page = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                page = self.fetch(position) => page,
            };
            let page = match page {
                Ok(page) => {
                    failures = 0;
                    page
                }
                Err(e) if e.is_retryable() => {
                    failures += 1;
                    let delay = self.config.backoff.delay(failures);
                    tracing::warn!(error = %e, ?delay, "feed unreachable; retrying");
                    if sleep_or_shutdown(delay, shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let records = records(position, &page)?;
            let Some(advanced) = self.apply(position, &records, shutdown).await? else {
                return Ok(());
            };
            position = advanced;
            if let Some(m) = crate::metrics::instruments() {
                let attrs = [opentelemetry::KeyValue::new(
                    "ferrybox.feed",
                    self.config.name.clone(),
                )];
                m.feed_position.record(position, &attrs);
                m.feed_lag
                    .record(page.head.max(position) - position, &attrs);
            }
        }
        Ok(())
    }

    /// Applies `records` (which follow `position` without a gap); returns the new position,
    /// or `None` on shutdown.
    async fn apply(
        &self,
        mut position: i64,
        records: &[Record],
        shutdown: &CancellationToken,
    ) -> Result<Option<i64>> {
        let topics = &self.pipeline.config.topics;
        let mut next = 0;
        while next < records.len() {
            let rest = &records[next..];
            // Events of topics this consumer does not read only move the position.
            let foreign = rest
                .iter()
                .take_while(|r| !topics.contains(&r.topic))
                .count();
            let (done, by_applier) = if foreign > 0 {
                (foreign, false)
            } else {
                let ours = rest
                    .iter()
                    .take_while(|r| topics.contains(&r.topic))
                    .count();
                match self
                    .pipeline
                    .process_from(&rest[..ours], None, shutdown)
                    .await
                {
                    Progress::Done { count, by_applier } => (count, by_applier),
                    Progress::Shutdown => return Ok(None),
                    Progress::Gap(gap) => {
                        // Feed events carry positions, not producer numbers: a numbered one
                        // out of order is the producer's bug.
                        return Err(Error::FeedHalted {
                            position,
                            reason: format!(
                                "message at position {} is numbered past the next number of \
                                 {} on {}/{} (missing {}..={})",
                                rest[0].offset,
                                gap.source,
                                gap.topic,
                                gap.partition,
                                gap.from_seq,
                                gap.to_seq
                            ),
                        });
                    }
                    Progress::Halted(failure) => {
                        return Err(Error::FeedHalted {
                            position,
                            reason: format!(
                                "message at position {} ({}): {}",
                                rest[0].offset, failure.kind, failure.error
                            ),
                        });
                    }
                }
            };
            position = rest[done - 1].offset;
            next += done;
            // Applied messages moved the position in their own transaction; parked,
            // dead-lettered and foreign ones move it here.
            if !by_applier {
                self.store(position).await?;
            }
        }
        Ok(Some(position))
    }

    async fn store(&self, position: i64) -> Result<()> {
        let mut conn = db::connection(&self.pipeline.applier.pool).await?;
        super::store_position(&mut conn, self.consumer(), &self.config.name, position).await?;
        Ok(())
    }

    async fn fetch(&self, after: i64) -> Result<FeedPage> {
        let url = super::page_url(&self.config.url, after, self.config.limit, self.config.wait)?;
        let response = crate::http::get_with_token(&self.client, url, self.config.token.as_ref())
            .send()
            .await
            .map_err(|e| Error::Http(e.without_url().to_string()))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| Error::Http(e.without_url().to_string()))?;
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(Error::Http(format!("feed answered {status}")));
        }
        if !status.is_success() {
            // 409 position_ahead, 410 position_expired, 4xx: not something a retry fixes.
            return Err(Error::FeedHalted {
                position: after,
                reason: format!(
                    "the feed answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ),
            });
        }
        serde_json::from_slice(&body).map_err(|e| Error::FeedHalted {
            position: after,
            reason: format!("the feed answered something that is not a feed page: {e}"),
        })
    }
}

/// Turns a page into inbox records, checking it follows `position` without a gap.
fn records(position: i64, page: &FeedPage) -> Result<Vec<Record>> {
    let mut records = Vec::with_capacity(page.events.len());
    for (expected, event) in (position + 1..).zip(&page.events) {
        if event.position != expected {
            return Err(Error::FeedHalted {
                position,
                reason: format!(
                    "gap in the feed: expected position {expected}, got {}",
                    event.position
                ),
            });
        }
        // Payload bytes that are not base64 go on as they are: decoding them fails, and the
        // failure is handled like any undecodable message (halt, or dead letter with the bytes).
        let payload = base64::engine::general_purpose::STANDARD
            .decode(&event.payload)
            .unwrap_or_else(|_| event.payload.as_bytes().to_vec());
        records.push(Record::new(
            event.topic.clone(),
            FEED_PARTITION,
            event.position,
            Some(event.key.as_bytes().to_vec()),
            event.headers.clone(),
            Some(payload),
        ));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::FeedEvent;

    fn event(position: i64, payload: &str) -> FeedEvent {
        FeedEvent {
            position,
            id: uuid::Uuid::nil(),
            topic: "t".into(),
            key: "k".into(),
            message_type: "x".into(),
            headers: std::collections::BTreeMap::new(),
            payload: payload.into(),
        }
    }

    #[test]
    fn a_page_must_follow_the_position_without_a_gap() {
        let page = FeedPage {
            events: vec![event(4, "AAE="), event(5, "AAE=")],
            next: 5,
            head: 9,
        };
        let read = records(3, &page).unwrap();
        assert_eq!(read.iter().map(|r| r.offset).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(read[0].payload(), Some(&[0u8, 1][..]));
        assert_eq!(read[0].partition, FEED_PARTITION);
        let gap = records(2, &page).unwrap_err();
        assert!(
            matches!(gap, Error::FeedHalted { position: 2, ref reason } if reason.contains("expected position 3")),
            "{gap}"
        );
    }

    #[test]
    fn bytes_that_are_not_base64_are_kept_as_they_are() {
        let page = FeedPage {
            events: vec![event(1, "not base64!")],
            next: 1,
            head: 1,
        };
        assert_eq!(
            records(0, &page).unwrap()[0].payload(),
            Some(&b"not base64!"[..])
        );
    }
}
