//! Metrics through OpenTelemetry, scrapeable in Prometheus format at `GET /metrics`.
//!
//! A service calls [`install`] once at start-up and mounts [`router`]; until then nothing is
//! recorded (libraries and tests that never install pay nothing). Names follow OpenTelemetry's
//! semantic conventions for messaging where they exist; Prometheus sees them with dots as
//! underscores, units and `_total` appended:
//!
//! | instrument | Prometheus | what |
//! |---|---|---|
//! | `messaging.client.sent.messages` | `messaging_client_sent_messages_total` | relay sends, with `error.type` when the broker refused |
//! | `messaging.client.consumed.messages` | `messaging_client_consumed_messages_total` | messages finished by a consumer, by `ferrybox.outcome` (`applied`, `duplicate`, `dead_lettered`, `parked`) |
//! | `messaging.process.duration` | `messaging_process_duration_seconds` | handler time per batch (histogram) |
//! | `ferrybox.inbox.retries` | `ferrybox_inbox_retries_total` | handler attempts that will be retried |
//! | `ferrybox.outbox.backlog` | `ferrybox_outbox_backlog` | unpublished rows |
//! | `ferrybox.outbox.oldest_age` | `ferrybox_outbox_oldest_age_seconds` | age of the oldest unpublished row |
//! | `ferrybox.outbox.errors` | `ferrybox_outbox_errors` | unpublished rows the broker refused |
//! | `ferrybox.relay.slot_lag` | `ferrybox_relay_slot_lag_bytes` | WAL the log relay has yet to confirm |
//! | `ferrybox.relay.slot_retained` | `ferrybox_relay_slot_retained_bytes` | WAL the slot keeps on the server |
//! | `ferrybox.relay.slot_recoveries` | `ferrybox_relay_slot_recoveries_total` | lost slots recovered from the table |
//! | `ferrybox.outbox.replayed` | `ferrybox_outbox_replayed_total` | messages sent again by `replay` |
//! | `ferrybox.feed.position` / `ferrybox.feed.lag` | `ferrybox_feed_position`, `ferrybox_feed_lag` | a feed consumer's position and how far the head is ahead |
//! | `ferrybox.reconcile.entities` | `ferrybox_reconcile_entities` | the last reconciliation's counts, by `ferrybox.outcome` |
//! | `ferrybox.inbox.dead_letters` / `ferrybox.inbox.blocked_keys` | `ferrybox_inbox_dead_letters{ferrybox_status}`, `ferrybox_inbox_blocked_keys` | open dead letters and parked messages, keys held back (every 15 s) |
//! | `ferrybox.inbox.lag` | `ferrybox_inbox_lag` | Kafka consumer lag per partition (from librdkafka's statistics, every 5 s) |
//! | `ferrybox.inbox.gaps` | `ferrybox_inbox_gaps_total` | gaps found in producers' numbers |
//! | `ferrybox.inbox.open_gaps` | `ferrybox_inbox_open_gaps` | gaps not yet repaired or skipped, each halting its partition (every 15 s) |
//! | `ferrybox.db.oldest_transaction`, `ferrybox.db.prepared_transactions`, `ferrybox.db.inactive_slots` | `ferrybox_db_oldest_transaction_seconds`, `ferrybox_db_prepared_transactions`, `ferrybox_db_inactive_slots` | what holds back vacuum (the [vacuum guard](crate::vacuum), every minute) |
//!
//! `deploy/prometheus/` has recording and alerting rules for these, and `deploy/grafana/` a
//! dashboard.

use std::sync::OnceLock;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;

/// The installed metrics: the Prometheus registry they are read from, and the instruments.
struct Installed {
    registry: prometheus::Registry,
    /// Kept alive: dropping it would stop collection.
    _provider: SdkMeterProvider,
    instruments: Instruments,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Starts recording metrics for this process (idempotent). Errors only when the exporter
/// cannot be built; metrics then stay off and the service runs on.
pub fn install() -> crate::Result<()> {
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
        .map_err(|e| crate::Error::Config(format!("prometheus exporter: {e}")))?;
    let provider = SdkMeterProvider::builder().with_reader(exporter).build();
    let instruments = Instruments::new(&provider);
    let _ = INSTALLED.set(Installed {
        registry,
        _provider: provider,
        instruments,
    });
    Ok(())
}

/// The metrics in Prometheus' text format (empty before [`install`]).
pub fn render() -> String {
    let Some(installed) = INSTALLED.get() else {
        return String::new();
    };
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = prometheus::Encoder::encode(&encoder, &installed.registry.gather(), &mut out) {
        tracing::warn!(error = %e, "metrics could not be encoded");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// `GET /metrics`, for a service's router: merge it in, and give the whole router
/// [`crate::http::json_errors`] so that its 405s are JSON too.
pub fn router() -> Router {
    Router::new().route("/metrics", get(scrape))
}

/// The metrics, for Prometheus.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "metrics",
    responses((status = 200, description = "Every metric in Prometheus' text format (0.0.4).", body = String, content_type = "text/plain"))
)]
async fn scrape() -> axum::response::Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        render(),
    )
        .into_response()
}

/// The OpenAPI document of [`router`] (see [`crate::openapi::metrics`]).
#[derive(utoipa::OpenApi)]
#[openapi(paths(scrape))]
pub(crate) struct MetricsApi;

/// The instruments, when metrics are installed.
pub(crate) fn instruments() -> Option<&'static Instruments> {
    INSTALLED.get().map(|i| &i.instruments)
}

pub(crate) struct Instruments {
    pub(crate) sent: Counter<u64>,
    pub(crate) consumed: Counter<u64>,
    pub(crate) gaps: Counter<u64>,
    pub(crate) process_duration: Histogram<f64>,
    pub(crate) retries: Counter<u64>,
    pub(crate) outbox_backlog: Gauge<u64>,
    pub(crate) outbox_oldest_age: Gauge<f64>,
    pub(crate) outbox_errors: Gauge<u64>,
    pub(crate) relay_slot_lag: Gauge<u64>,
    pub(crate) relay_slot_retained: Gauge<u64>,
    pub(crate) relay_slot_recoveries: Counter<u64>,
    pub(crate) replayed: Counter<u64>,
    pub(crate) feed_position: Gauge<i64>,
    pub(crate) feed_lag: Gauge<i64>,
    pub(crate) reconcile_entities: Gauge<u64>,
    pub(crate) consumer_lag: Gauge<i64>,
    pub(crate) dead_letters: Gauge<u64>,
    pub(crate) blocked_keys: Gauge<u64>,
    pub(crate) open_gaps: Gauge<u64>,
    pub(crate) vacuum_oldest_transaction: Gauge<f64>,
    pub(crate) vacuum_prepared: Gauge<u64>,
    pub(crate) vacuum_inactive_slots: Gauge<u64>,
}

impl Instruments {
    fn new(provider: &SdkMeterProvider) -> Self {
        let meter = provider.meter("ferrybox");
        Self {
            sent: meter
                .u64_counter("messaging.client.sent.messages")
                .with_unit("{message}")
                .with_description("Messages the relay sent, acknowledged or refused")
                .build(),
            consumed: meter
                .u64_counter("messaging.client.consumed.messages")
                .with_unit("{message}")
                .with_description("Messages a consumer finished, by outcome")
                .build(),
            gaps: meter
                .u64_counter("ferrybox.inbox.gaps")
                .with_unit("{gap}")
                .with_description(
                    "Gaps found in producers' numbers (a partition halted until repaired)",
                )
                .build(),
            process_duration: meter
                .f64_histogram("messaging.process.duration")
                .with_unit("s")
                .with_description("Time the handler took per batch")
                .with_boundaries(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
                .build(),
            retries: meter
                .u64_counter("ferrybox.inbox.retries")
                .with_unit("{attempt}")
                .with_description("Handler attempts that failed and will be retried")
                .build(),
            outbox_backlog: meter
                .u64_gauge("ferrybox.outbox.backlog")
                .with_unit("{message}")
                .with_description("Unpublished outbox rows")
                .build(),
            outbox_oldest_age: meter
                .f64_gauge("ferrybox.outbox.oldest_age")
                .with_unit("s")
                .with_description("Age of the oldest unpublished outbox row")
                .build(),
            outbox_errors: meter
                .u64_gauge("ferrybox.outbox.errors")
                .with_unit("{message}")
                .with_description("Unpublished rows the broker refused so far")
                .build(),
            relay_slot_lag: meter
                .u64_gauge("ferrybox.relay.slot_lag")
                .with_unit("By")
                .with_description(
                    "WAL between the log relay's confirmed position and the current one",
                )
                .build(),
            relay_slot_retained: meter
                .u64_gauge("ferrybox.relay.slot_retained")
                .with_unit("By")
                .with_description("WAL the log relay's replication slot keeps on the server")
                .build(),
            relay_slot_recoveries: meter
                .u64_counter("ferrybox.relay.slot_recoveries")
                .with_unit("{recovery}")
                .with_description(
                    "Times the log relay found its slot lost and recovered from the table",
                )
                .build(),
            replayed: meter
                .u64_counter("ferrybox.outbox.replayed")
                .with_unit("{message}")
                .with_description("Messages sent again from the sent log")
                .build(),
            feed_position: meter
                .i64_gauge("ferrybox.feed.position")
                .with_description("A feed consumer's stored position")
                .build(),
            feed_lag: meter
                .i64_gauge("ferrybox.feed.lag")
                .with_unit("{message}")
                .with_description("Events between a feed consumer's position and the head")
                .build(),
            reconcile_entities: meter
                .u64_gauge("ferrybox.reconcile.entities")
                .with_unit("{entity}")
                .with_description("The last reconciliation's counts, by outcome")
                .build(),
            dead_letters: meter
                .u64_gauge("ferrybox.inbox.dead_letters")
                .with_unit("{message}")
                .with_description("Open dead letters, by status (dead, parked)")
                .build(),
            blocked_keys: meter
                .u64_gauge("ferrybox.inbox.blocked_keys")
                .with_unit("{key}")
                .with_description("Keys held back behind a dead letter")
                .build(),
            open_gaps: meter
                .u64_gauge("ferrybox.inbox.open_gaps")
                .with_unit("{gap}")
                .with_description(
                    "Gaps in producers' numbers not yet repaired or skipped (each halts its partition)",
                )
                .build(),
            vacuum_oldest_transaction: meter
                .f64_gauge("ferrybox.db.oldest_transaction")
                .with_unit("s")
                .with_description("How long the database's oldest open transaction has been open")
                .build(),
            vacuum_prepared: meter
                .u64_gauge("ferrybox.db.prepared_transactions")
                .with_unit("{transaction}")
                .with_description("Prepared transactions not yet committed or rolled back")
                .build(),
            vacuum_inactive_slots: meter
                .u64_gauge("ferrybox.db.inactive_slots")
                .with_unit("{slot}")
                .with_description("Replication slots nobody streams now")
                .build(),
            consumer_lag: meter
                .i64_gauge("ferrybox.inbox.lag")
                .with_unit("{message}")
                .with_description("Messages between a partition's committed position and its end")
                .build(),
        }
    }
}

/// `messaging.system` for Kafka-side instruments.
pub(crate) fn kafka_attrs(topic: &str) -> [KeyValue; 2] {
    messaging_attrs("kafka", topic)
}

/// The same for any messaging system (`feed` for a relay without a broker).
pub(crate) fn messaging_attrs(system: &'static str, topic: &str) -> [KeyValue; 2] {
    [
        KeyValue::new("messaging.system", system),
        KeyValue::new("messaging.destination.name", topic.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn recorded_values_show_up_in_the_prometheus_text() {
        super::install().unwrap();
        let m = super::instruments().unwrap();
        m.sent.add(3, &super::kafka_attrs("unit-test-topic"));
        m.feed_lag.record(7, &[]);
        let text = super::render();
        assert!(
            text.lines()
                .any(|l| l.starts_with("messaging_client_sent_messages_total")
                    && l.contains("unit-test-topic")
                    && l.ends_with(" 3")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("ferrybox_feed_lag") && l.ends_with(" 7")),
            "{text}"
        );
    }
}
