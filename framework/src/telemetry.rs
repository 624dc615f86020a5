//! Logs and traces for binaries, and the trace context that travels with every message.
//!
//! **Logs**: `tracing` with an env filter (`RUST_LOG`, default `info`), as text or JSON lines.
//!
//! **Traces** (OpenTelemetry): off by default, and then free: no span is made for a message.
//! They are on when the standard variables ask for them: `OTEL_TRACES_EXPORTER=otlp`, or an
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (and not
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`). Spans go over OTLP/HTTP
//! (protobuf); the exporter reads the other `OTEL_EXPORTER_OTLP_*` variables itself, and
//! `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the service.
//!
//! **One trace per message journey**: [`Outbox::enqueue`](crate::Outbox::enqueue) stores the
//! current trace context (W3C `traceparent`/`tracestate`) with the message; it travels in the
//! Kafka headers and on the feed. The relay's publish span links every message of its batch;
//! the consumer's span for each message ([`message_span`]) is a child of the context the
//! message carries, and the handler's work runs inside it. A service's HTTP requests start or
//! continue a trace ([`http_span`]), so one request that changes data yields one trace that
//! reaches the consumer's handler.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Whether spans are being exported. When false, Ferrybox makes no per-message span.
static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether traces are on in this process.
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Installs the global subscriber: JSON lines when `json` is true, text otherwise. The filter
/// comes from `RUST_LOG`, defaulting to `info`. Calling it twice keeps the first. Traces stay
/// off; binaries use [`init`].
pub fn init_logging(json: bool) {
    install(None, json);
}

/// What [`init`] set up. Keep it until the process ends: dropping it flushes the spans still
/// buffered and stops the exporter.
#[derive(Debug, Default)]
#[must_use = "dropping it stops trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
        }
    }
}

/// Logging, plus OTLP trace export when the `OTEL_*` variables ask for it (see the module
/// documentation). `service` is the service name unless `OTEL_SERVICE_NAME` gives one. A trace
/// exporter that cannot be built is reported and traces stay off: telemetry never stops a
/// service.
pub fn init(service: &str, json: bool) -> Telemetry {
    let provider = if otlp_requested(|name| std::env::var(name).ok()) {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => {
                let mut resource = opentelemetry_sdk::Resource::builder();
                if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
                    resource = resource.with_service_name(service.to_owned());
                }
                Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource.build())
                        .build(),
                )
            }
            Err(e) => {
                eprintln!("OTLP trace exporter not started ({e}); traces stay off");
                None
            }
        }
    } else {
        None
    };
    install(provider.clone(), json);
    if provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry { provider }
}

/// Whether the standard variables ask for OTLP traces.
fn otlp_requested(var: impl Fn(&str) -> Option<String>) -> bool {
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    match var("OTEL_TRACES_EXPORTER").as_deref() {
        Some("none") => false,
        Some(list) if list.split(',').any(|e| e.trim() == "otlp") => true,
        _ => {
            var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        }
    }
}

/// Installs the global subscriber with logs, and with traces sent to `provider` when given
/// (tests pass one with an in-memory exporter). Calling it twice keeps the first.
pub fn install(provider: Option<SdkTracerProvider>, json: bool) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter())
    });
    let lines = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter())
    });
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("ferrybox"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let installed = tracing_subscriber::registry()
        .with(text)
        .with(lines)
        .with(traces)
        .try_init();
    if installed.is_err() {
        tracing::debug!("logging was already initialised");
        return;
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if let Some(provider) = provider {
        opentelemetry::global::set_tracer_provider(provider);
        TRACING.store(true, Ordering::Relaxed);
    }
}

struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a BTreeMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct HttpExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

/// Adds the current span's trace context to `headers` (`traceparent`, `tracestate`), unless
/// they carry one already (a replayed message keeps its own). Nothing when traces are off.
pub fn inject_current(headers: &mut BTreeMap<String, String>) {
    if !tracing_enabled() || headers.contains_key("traceparent") {
        return;
    }
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MapInjector(headers));
    });
}

/// The trace context `headers` carry (empty when they carry none).
pub fn context_from(headers: &BTreeMap<String, String>) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MapExtractor(headers)))
}

/// The span a consumer processes one message in: a child of the context the message carries.
/// [`Span::none`](tracing::Span::none) when traces are off.
pub fn message_span(
    message_type: &str,
    topic: &str,
    message_id: &str,
    headers: &BTreeMap<String, String>,
) -> tracing::Span {
    if !tracing_enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "process",
        otel.name = format!("process {message_type}"),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = topic,
        messaging.message.id = message_id,
    );
    // A message without a usable context gets a trace of its own.
    let _ = span.set_parent(context_from(headers));
    span
}

/// A span for work on a batch of messages (the relay's publish, a batch handler), linked to
/// each message's trace. [`Span::none`](tracing::Span::none) when traces are off.
pub fn batch_span<'a>(
    name: &'static str,
    kind: &'static str,
    headers: impl IntoIterator<Item = &'a BTreeMap<String, String>>,
) -> tracing::Span {
    if !tracing_enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("batch", otel.name = name, otel.kind = kind);
    for h in headers {
        let cx = context_from(h);
        let linked = cx.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
    span
}

/// The span of one HTTP request (for `tower_http::trace::TraceLayer::make_span_with`): it
/// continues the caller's trace when the request carries a `traceparent`, and is named after
/// the method and path. [`Span::none`](tracing::Span::none) when traces are off.
pub fn http_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    if !tracing_enabled() {
        return tracing::Span::none();
    }
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(
            || request.uri().path().to_owned(),
            |p| p.as_str().to_owned(),
        );
    let span = tracing::info_span!(
        "request",
        otel.name = format!("{} {route}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = route,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HttpExtractor(request.headers()))
    });
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_is_on_only_when_the_standard_variables_ask() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(!otlp_requested(env(&[])));
        assert!(otlp_requested(env(&[("OTEL_TRACES_EXPORTER", "otlp")])));
        assert!(otlp_requested(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector:4318"
        )])));
        assert!(!otlp_requested(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])));
        assert!(!otlp_requested(env(&[
            ("OTEL_TRACES_EXPORTER", "otlp"),
            ("OTEL_SDK_DISABLED", "true"),
        ])));
    }

    #[test]
    fn with_traces_off_nothing_is_added_and_no_span_is_made() {
        let mut headers = BTreeMap::new();
        inject_current(&mut headers);
        assert!(headers.is_empty());
        assert!(message_span("t", "topic", "id", &headers).is_none());
    }
}
