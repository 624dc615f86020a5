//! Metrics and health endpoints of both services, against the real broker and database.

use ferrybox::testing::{self, wait_until};
use ferrybox_e2e::{Api, CONVERGE, Stack};

/// The values of the samples of `metric` whose labels contain every one of `labels`.
async fn samples(url: &str, metric: &str, labels: &[String]) -> Vec<f64> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect()
}

/// Their sum.
async fn sample(url: &str, metric: &str, labels: &[String]) -> f64 {
    samples(url, metric, labels).await.into_iter().sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_counters_move_as_messages_flow_and_readiness_reports_the_dependencies() {
    let stack = Stack::start().await.unwrap();
    let api = Api::default();
    let topic = format!("messaging_destination_name=\"{}\"", stack.topic);
    let applied = [topic.clone(), "ferrybox_outcome=\"applied\"".to_owned()];
    let sent = "messaging_client_sent_messages_total";
    let consumed = "messaging_client_consumed_messages_total";

    for (n, email) in ["first@example.com", "second@example.com"]
        .iter()
        .enumerate()
    {
        stack
            .register_cached(email, "Metered", "metered-password")
            .await
            .unwrap();
        let expected = f64::from(u32::try_from(n + 1).unwrap());
        wait_until(CONVERGE, "the counters count each message", || async {
            sample(&stack.user_url, sent, std::slice::from_ref(&topic)).await == expected
                && sample(&stack.auth_url, consumed, &applied).await == expected
        })
        .await;
    }
    // This test's consumer only: every test of this binary shares the process's metrics.
    let group = format!("messaging_consumer_group_name=\"{}\"", stack.auth_group);
    assert!(
        sample(
            &stack.auth_url,
            "messaging_process_duration_seconds_count",
            std::slice::from_ref(&group)
        )
        .await
            >= 2.0,
        "handler durations recorded"
    );
    wait_until(CONVERGE, "the relay reports its backlog", || async {
        !samples(&stack.user_url, "ferrybox_outbox_backlog", &[])
            .await
            .is_empty()
    })
    .await;
    wait_until(
        CONVERGE,
        "the consumer reports its lag per partition",
        || async {
            let lag = samples(
                &stack.auth_url,
                "ferrybox_inbox_lag",
                &[topic.clone(), group.clone()],
            )
            .await;
            !lag.is_empty() && lag.iter().all(|l| *l >= 0.0)
        },
    )
    .await;
    // No dead letter here: the gauges say zero (they are measured every 15 s).
    wait_until(CONVERGE, "the dead-letter gauges are reported", || async {
        samples(
            &stack.auth_url,
            "ferrybox_inbox_blocked_keys",
            std::slice::from_ref(&group),
        )
        .await
            == [0.0]
    })
    .await;

    for url in [&stack.user_url, &stack.auth_url] {
        let live = api.get(&format!("{url}/health/live")).await.unwrap();
        assert_eq!(live.status, 200);
        let ready = api.get(&format!("{url}/health/ready")).await.unwrap();
        assert_eq!(ready.status, 200, "{:?}", ready.body);
        assert_eq!(ready.body["checks"]["database"], "ok");
        assert_eq!(ready.body["checks"]["broker"], "ok");
    }
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_says_which_dependency_is_down() {
    let db = testing::TestDatabase::create().await;
    let mut gone = db.config();
    // A database that does not exist, and a port nothing listens on.
    gone.url = db
        .url()
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{}", testing::unique("no_such_db")))
        .unwrap()
        .into();
    let pool = ferrybox::db::pool(&gone).unwrap();
    let readiness = ferrybox::health::Readiness::new(pool)
        .with_broker(&ferrybox::KafkaConfig::new("127.0.0.1:9"))
        .unwrap();
    let report = readiness.check().await;
    assert_eq!(report.status, "not_ready");
    assert_ne!(report.checks["database"], "ok", "{report:?}");
    assert_ne!(report.checks["broker"], "ok", "{report:?}");
    let healthy = ferrybox::health::Readiness::new(db.pool())
        .with_broker(&testing::kafka())
        .unwrap()
        .check()
        .await;
    assert_eq!(healthy.status, "ready", "{healthy:?}");
}

/// The rules under `deploy/prometheus/` and the dashboard under `deploy/grafana/` read only
/// metrics the services really export: both services run (auth-service from Kafka, and a second
/// pair with auth-service on the pulled feed), a user flows through, a reconciliation runs, and
/// the scrapes must name every metric the expressions read. (Every service of this process
/// shares one registry, so the union of the scrapes is what the code records.)
#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_rules_and_the_dashboard_read_is_one_the_services_export() {
    use ferrybox_e2e::monitoring;
    let wanted: std::collections::BTreeSet<String> = monitoring::expressions()
        .iter()
        .flat_map(|(place, expr)| {
            monitoring::metrics_read_by(expr).unwrap_or_else(|e| panic!("{place}: {e}"))
        })
        .filter(|name| !name.contains(':'))
        .collect();
    assert!(wanted.len() >= 15, "{wanted:?}");

    let kafka = Stack::start().await.unwrap();
    let feed = Stack::start_with(auth_service::config::Transport::Feed)
        .await
        .unwrap();
    for stack in [&kafka, &feed] {
        stack
            .register_cached(
                &format!("{}@example.com", stack.auth_group),
                "Ruled",
                "ruled-password",
            )
            .await
            .unwrap();
    }
    let mut settings = ferrybox_e2e::auth_settings(&kafka.auth_db, &kafka.topic);
    ferrybox_e2e::point_at_user_service(&mut settings, &kafka.user_url);
    auth_service::ops::reconcile(&settings, None, true)
        .await
        .unwrap();

    let http = reqwest::Client::new();
    let scraped = || async {
        let mut names = std::collections::BTreeSet::new();
        for url in [
            &kafka.user_url,
            &kafka.auth_url,
            &feed.user_url,
            &feed.auth_url,
        ] {
            let text = http
                .get(format!("{url}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            names.extend(monitoring::exported_names(&text));
        }
        names
    };
    // The gauges are sampled (every 5 to 60 s): wait for every one to be measured once.
    let deadline = tokio::time::Instant::now() + CONVERGE + CONVERGE;
    let missing = loop {
        let exported = scraped().await;
        let missing: Vec<&String> = wanted.iter().filter(|n| !exported.contains(*n)).collect();
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<String>>();
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "the rules or the dashboard read metrics nothing exports: {missing:?}"
    );
    kafka.stop().await.unwrap();
    feed.stop().await.unwrap();
}
