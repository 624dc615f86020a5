//! One trace per message journey: spans exported to an in-memory exporter show that one
//! user-service HTTP request yields one trace that reaches auth-service's handler, through
//! Kafka and through the pulled feed. (Its own test binary: it installs the process's global
//! tracing subscriber.)

use std::sync::OnceLock;

use auth_service::config::Transport;
use ferrybox_e2e::Stack;
use opentelemetry::trace::{SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};

/// The exporter every span of this process goes to.
fn exporter() -> &'static (InMemorySpanExporter, SdkTracerProvider) {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        ferrybox::telemetry::install(Some(provider.clone()), false);
        assert!(ferrybox::telemetry::tracing_enabled());
        (exporter, provider)
    })
}

fn spans() -> Vec<SpanData> {
    let (exporter, provider) = exporter();
    provider.force_flush().unwrap();
    exporter.get_finished_spans().unwrap()
}

/// Registers one user and follows its trace to auth-service's cache.
async fn one_request_one_trace(transport: Transport) {
    exporter();
    let stack = Stack::start_with(transport).await.unwrap();
    let email = format!("{}@example.com", ferrybox::testing::unique("traced"));
    let id = stack
        .register_cached(&email, "Traced", "traced-password")
        .await
        .unwrap();

    // The span of that request, from its `user_id` attribute-free name and the upsert that
    // names the user on the other side.
    let all = spans();
    let upsert = all
        .iter()
        .find(|s| {
            s.name == "cache upsert"
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "user_id" && kv.value.as_str() == id.as_str())
        })
        .expect("auth-service's handler span for the user");
    let trace: TraceId = upsert.span_context.trace_id();
    let in_trace: Vec<&SpanData> = all
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect();
    let names: Vec<&str> = in_trace.iter().map(|s| s.name.as_ref()).collect();
    let request = in_trace
        .iter()
        .find(|s| s.name == "POST /users")
        .unwrap_or_else(|| panic!("the HTTP request is in the handler's trace: {names:?}"));
    assert_eq!(request.span_kind, SpanKind::Server);
    let process = in_trace
        .iter()
        .find(|s| s.name == "process com.ferrybox.user.UserRegistered")
        .unwrap_or_else(|| panic!("the consumer's span is in the trace: {names:?}"));
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(
        upsert.parent_span_id,
        process.span_context.span_id(),
        "the handler's work runs inside the consumer's span"
    );
    assert_eq!(
        in_trace
            .iter()
            .filter(|s| s.parent_span_id == opentelemetry::trace::SpanId::INVALID)
            .count(),
        1,
        "one root: the request ({names:?})"
    );
    // The relay's publish span links the message's trace. It ends when the relay has the
    // broker's acknowledgement, which can come after the consumer has the message: wait for it.
    ferrybox::testing::wait_until(
        std::time::Duration::from_secs(30),
        "a relay publish span that links the trace",
        || async {
            spans().iter().any(|s| {
                s.name == "publish" && s.links.iter().any(|l| l.span_context.trace_id() == trace)
            })
        },
    )
    .await;
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_is_one_trace_through_kafka_to_the_consumers_handler() {
    one_request_one_trace(Transport::Kafka).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_is_one_trace_through_the_pulled_feed_too() {
    one_request_one_trace(Transport::Feed).await;
}
