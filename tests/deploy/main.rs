//! The docker-compose environment, proved without a Docker engine: the file is valid by the
//! Compose Specification (checked by `check-jsonschema` from PyPI, with the compose-spec
//! schema it ships), every variable given to a service is one its configuration reads, every
//! Dockerfile builds a binary the workspace defines, and every topic the services use is
//! created with durable settings.
//!
//! Runs the service binaries from the workspace's target directory: `make test` builds them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use ferrybox_e2e::monitoring::{self, root};
use serde_json::Value;

fn compose_file() -> PathBuf {
    root().join("deploy/docker-compose.yml")
}

/// Runs `command`, which must succeed; its output.
fn run_ok(command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The validator, installed by the project's own script on first use (once per test run).
fn validator() -> &'static Path {
    static VALIDATOR: OnceLock<PathBuf> = OnceLock::new();
    VALIDATOR.get_or_init(|| monitoring::tool("validator"))
}

fn validate(file: &Path) -> (bool, String) {
    let out = Command::new(validator())
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(file)
        .output()
        .expect("run check-jsonschema");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The compose file as JSON, read by the validator's own YAML parser (ruamel.yaml), with
/// anchors and merge keys resolved (once per test run).
fn compose() -> &'static Value {
    static COMPOSE: OnceLock<Value> = OnceLock::new();
    COMPOSE.get_or_init(|| {
        let out = run_ok(
            Command::new(validator().with_file_name("python"))
                .args([
                    "-c",
                    "import json, sys; from ruamel.yaml import YAML; \
                     print(json.dumps(YAML(typ='safe').load(open(sys.argv[1]))))",
                ])
                .arg(compose_file()),
        );
        serde_json::from_slice(&out.stdout).expect("compose as JSON")
    })
}

/// Compose's `${NAME:-default}` interpolation, with nothing set in the environment.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closing brace") + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, default)| default));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A service's environment, interpolated.
fn environment(compose: &Value, service: &str) -> BTreeMap<String, String> {
    let env = &compose["services"][service]["environment"];
    env.as_object()
        .unwrap_or_else(|| panic!("{service} has an environment map"))
        .iter()
        .map(|(k, v)| {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            (k.clone(), interpolate(&v))
        })
        .collect()
}

#[test]
fn the_compose_file_is_valid_by_the_compose_specification() {
    let (valid, output) = validate(&compose_file());
    assert!(valid, "{output}");
    // The check bites: a misspelt key is refused.
    let broken = std::env::temp_dir().join(format!(
        "ferrybox-broken-compose-{}.yml",
        std::process::id()
    ));
    let text = std::fs::read_to_string(compose_file()).unwrap();
    std::fs::write(
        &broken,
        text.replacen("    healthcheck:", "    healthchek:", 1),
    )
    .unwrap();
    let (valid, output) = validate(&broken);
    std::fs::remove_file(&broken).unwrap();
    assert!(!valid, "a misspelt key passed: {output}");
}

#[test]
fn every_variable_given_to_a_service_is_one_its_configuration_reads() {
    let compose = compose();
    for (service, prefix) in [
        ("user-service", "USER_SERVICE_"),
        ("auth-service", "AUTH_SERVICE_"),
    ] {
        let env = environment(compose, service);
        for key in env.keys() {
            assert!(
                key.starts_with(prefix) || key.starts_with("OTEL_") || key == "RUST_LOG",
                "{service}: {key} is read by nothing"
            );
        }
        // The binary refuses unknown keys (serde `deny_unknown_fields`) and bad values.
        run_ok(
            Command::new(ferrybox_e2e::workspace_binary(service))
                .arg("check-config")
                .env_clear()
                .envs(&env),
        );
        // ...which this check relies on: a misspelt variable is an error.
        let mut misspelt = env.clone();
        misspelt.insert(format!("{prefix}KAFKA__STRICT_DURABLITY"), "true".into());
        let out = Command::new(ferrybox_e2e::workspace_binary(service))
            .arg("check-config")
            .env_clear()
            .envs(&misspelt)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{service} accepted a misspelt variable"
        );
        assert_eq!(
            env.get(&format!("{prefix}KAFKA__STRICT_DURABILITY"))
                .map(String::as_str),
            Some("true"),
            "{service} runs with strict durability"
        );
    }
}

#[test]
fn every_dockerfile_builds_a_binary_the_workspace_defines() {
    let compose = compose();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let metadata = run_ok(
        Command::new(cargo)
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(root()),
    );
    let metadata: Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let bins: Vec<(String, String)> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let package = p["name"].as_str().unwrap().to_owned();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
                .map(move |t| (package.clone(), t["name"].as_str().unwrap().to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();

    let mut built = Vec::new();
    for (name, service) in compose["services"].as_object().unwrap() {
        let Some(build) = service.get("build") else {
            continue;
        };
        let context = compose_file()
            .parent()
            .unwrap()
            .join(build["context"].as_str().unwrap());
        let dockerfile = context.join(build["dockerfile"].as_str().unwrap());
        let text = std::fs::read_to_string(&dockerfile)
            .unwrap_or_else(|e| panic!("{name}: {}: {e}", dockerfile.display()));
        let words: Vec<&str> = text
            .lines()
            .find(|l| l.contains("cargo build"))
            .unwrap_or_else(|| panic!("{name}: no cargo build in {}", dockerfile.display()))
            .split_whitespace()
            .collect();
        let after = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .and_then(|i| words.get(i + 1))
                .map(|w| (*w).to_owned())
                .unwrap_or_else(|| panic!("{name}: cargo build without {flag}"))
        };
        let (package, bin) = (after("-p"), after("--bin"));
        assert!(
            bins.contains(&(package.clone(), bin.clone())),
            "{name}: the workspace has no binary {bin} in package {package}"
        );
        assert!(words.contains(&"--release") && words.contains(&"--locked"));
        assert!(
            text.contains(&format!("target/release/{bin} ")),
            "{name}: the image copies a different binary"
        );
        assert!(
            text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{bin}\"]")),
            "{name}: the image runs a different binary"
        );
        assert!(
            text.lines().filter(|l| l.starts_with("FROM ")).count() >= 2,
            "{name}: a multi-stage build"
        );
        built.push(bin);
    }
    built.sort();
    assert_eq!(built, ["auth-service", "user-service"]);
}

#[test]
fn every_topic_the_services_use_is_created_with_durable_settings() {
    let compose = compose();
    let init = compose["services"]["kafka-init"]["command"][0]
        .as_str()
        .expect("kafka-init's script");
    for setting in [
        "--replication-factor 3",
        "--config min.insync.replicas=2",
        "--config unclean.leader.election.enable=false",
    ] {
        assert!(init.contains(setting), "topics are created with {setting}");
    }
    let created: BTreeMap<&str, &str> = init
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("create")).then(|| (words.next().unwrap(), words.next().unwrap()))
        })
        .collect();

    let user = environment(compose, "user-service");
    let auth = environment(compose, "auth-service");
    let users_topic = &user["USER_SERVICE_USERS_TOPIC__NAME"];
    assert_eq!(&auth["AUTH_SERVICE_USERS_TOPIC__NAME"], users_topic);
    assert_eq!(
        created.get(users_topic.as_str()).copied(),
        Some(user["USER_SERVICE_USERS_TOPIC__PARTITIONS"].as_str()),
        "the users topic is created with the partitions the services expect"
    );
    let dlq = &auth["AUTH_SERVICE_INBOX__DEAD_LETTER_TOPIC"];
    assert!(
        created.contains_key(dlq.as_str()),
        "the dead-letter topic {dlq} is created"
    );

    for broker in ["kafka-1", "kafka-2", "kafka-3"] {
        let env = &compose["services"][broker]["environment"];
        assert_eq!(env["KAFKA_DEFAULT_REPLICATION_FACTOR"], "3", "{broker}");
        assert_eq!(env["KAFKA_MIN_INSYNC_REPLICAS"], "2", "{broker}");
        assert_eq!(
            env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"], "false",
            "{broker}"
        );
        assert_eq!(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"], "false", "{broker}");
        assert_eq!(
            env["KAFKA_PROCESS_ROLES"], "broker,controller",
            "{broker}: KRaft"
        );
    }
}

/// promtool, unpacked from Debian's prometheus package by the project's own script (once per
/// machine).
fn promtool() -> &'static Path {
    static PROMTOOL: OnceLock<PathBuf> = OnceLock::new();
    PROMTOOL.get_or_init(|| monitoring::tool("promtool"))
}

fn prometheus_dir() -> PathBuf {
    root().join("deploy/prometheus")
}

#[test]
fn the_prometheus_rules_pass_promtool_and_every_alert_has_a_runbook_and_unit_tests() {
    let dir = prometheus_dir();
    // The compose demo's configuration, and the rules it loads.
    run_ok(
        Command::new(promtool())
            .args(["check", "config"])
            .arg(dir.join("prometheus.yml")),
    );
    run_ok(
        Command::new(promtool())
            .args(["test", "rules"])
            .arg(dir.join("ferrybox.rules.test.yml")),
    );

    let rules = monitoring::rules();
    let alerts: Vec<&Value> = rules.iter().filter(|r| r["alert"].is_string()).collect();
    let names: Vec<&str> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    // What the README's "Alert on" paragraph names, each has its alert.
    for wanted in [
        "FerryboxOutboxStalled",
        "FerryboxOutboxRefused",
        "FerryboxRelaySlotLagGrowing",
        "FerryboxDeadLetters",
        "FerryboxParkedMessages",
        "FerryboxReconcileUnresolved",
        "FerryboxConsumerLagGrowing",
        "FerryboxFeedLagGrowing",
        "FerryboxInboxGap",
    ] {
        assert!(names.contains(&wanted), "no alert {wanted}");
    }
    for alert in &alerts {
        let name = alert["alert"].as_str().unwrap();
        for annotation in ["summary", "description", "runbook"] {
            assert!(
                alert["annotations"][annotation]
                    .as_str()
                    .is_some_and(|t| !t.trim().is_empty()),
                "{name} has no {annotation}"
            );
        }
        assert!(
            ["critical", "warning"].contains(&alert["labels"]["severity"].as_str().unwrap_or("")),
            "{name} has no severity"
        );
    }

    // Every alert has a case where it fires and one where it does not; every recording rule
    // has its value checked.
    let tests = monitoring::yaml_as_json(&dir.join("ferrybox.rules.test.yml"));
    let groups = tests["tests"].as_array().expect("test groups");
    let cases: Vec<&Value> = groups
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    for name in &names {
        let fired = |fires: bool| {
            cases.iter().any(|c| {
                c["alertname"] == *name
                    && c["exp_alerts"]
                        .as_array()
                        .is_some_and(|a| a.is_empty() != fires)
            })
        };
        assert!(fired(true), "no test case where {name} fires");
        assert!(fired(false), "no test case where {name} stays quiet");
    }
    let checked: Vec<&str> = groups
        .iter()
        .flat_map(|t| t["promql_expr_test"].as_array().into_iter().flatten())
        .filter_map(|c| c["expr"].as_str())
        .collect();
    for recorded in monitoring::recorded_names() {
        assert!(
            checked.contains(&recorded.as_str()),
            "the recording rule {recorded} has no test"
        );
    }

    // The unit tests bite: the rules with one threshold changed fail them.
    let scratch = std::env::temp_dir().join(format!("ferrybox-rules-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let text = std::fs::read_to_string(monitoring::rules_file()).unwrap();
    let changed = text.replacen(
        "ferrybox_outbox_oldest_age_seconds > 60",
        "ferrybox_outbox_oldest_age_seconds > 600",
        1,
    );
    assert_ne!(changed, text, "the threshold to change is in the rules");
    std::fs::write(scratch.join("ferrybox.rules.yml"), changed).unwrap();
    std::fs::copy(
        dir.join("ferrybox.rules.test.yml"),
        scratch.join("ferrybox.rules.test.yml"),
    )
    .unwrap();
    let out = Command::new(promtool())
        .args(["test", "rules"])
        .arg(scratch.join("ferrybox.rules.test.yml"))
        .output()
        .unwrap();
    std::fs::remove_dir_all(&scratch).unwrap();
    assert!(
        !out.status.success(),
        "the unit tests passed a changed threshold"
    );
}

#[test]
fn every_expression_of_the_rules_and_the_dashboard_is_promql_reading_ferrybox_metrics() {
    let recorded = monitoring::recorded_names();
    let expressions = monitoring::expressions();
    assert!(
        expressions
            .iter()
            .filter(|(w, _)| w.starts_with("panel"))
            .count()
            >= 12,
        "the dashboard has its panels"
    );
    for (place, expr) in &expressions {
        let names = monitoring::metrics_read_by(expr)
            .unwrap_or_else(|e| panic!("{place}: {expr} is not PromQL: {e}"));
        assert!(!names.is_empty(), "{place}: {expr} reads no metric");
        for name in names {
            if name.contains(':') {
                assert!(recorded.contains(&name), "{place}: nothing records {name}");
            } else {
                assert!(
                    name.starts_with("ferrybox_") || name.starts_with("messaging_"),
                    "{place}: {name} is not a Ferrybox metric"
                );
            }
        }
    }
}

#[test]
fn the_compose_prometheus_scrapes_both_services_and_grafana_shows_the_dashboard() {
    let compose = compose();
    let deploy = compose_file().parent().unwrap().to_path_buf();
    // Every file the compose file mounts is in the repository.
    for (name, service) in compose["services"].as_object().unwrap() {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let volume = volume.as_str().expect("short volume syntax");
            if let Some(source) = volume.strip_prefix("./") {
                let source = source.split(':').next().unwrap();
                assert!(
                    deploy.join(source).exists(),
                    "{name} mounts {source}, which is not in deploy/"
                );
            }
        }
    }

    // Prometheus scrapes each service where it listens.
    let prometheus = monitoring::yaml_as_json(&prometheus_dir().join("prometheus.yml"));
    let targets: Vec<&str> = prometheus["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["static_configs"].as_array().unwrap())
        .flat_map(|s| s["targets"].as_array().unwrap())
        .map(|t| t.as_str().unwrap())
        .collect();
    for (service, prefix) in [
        ("user-service", "USER_SERVICE_"),
        ("auth-service", "AUTH_SERVICE_"),
    ] {
        let listen = &environment(compose, service)[&format!("{prefix}LISTEN")];
        let port = listen.rsplit(':').next().unwrap();
        assert!(
            targets.contains(&format!("{service}:{port}").as_str()),
            "Prometheus does not scrape {service}:{port} ({targets:?})"
        );
    }
    assert!(
        compose["services"]["prometheus"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "./prometheus:/etc/prometheus:ro"),
        "Prometheus gets deploy/prometheus/ (its configuration and the rules)"
    );

    // Grafana's data source is the one every panel names, and its home is the dashboard.
    let datasource =
        monitoring::yaml_as_json(&deploy.join("grafana/provisioning/datasources/prometheus.yml"));
    let source = &datasource["datasources"][0];
    assert_eq!(source["url"], "http://prometheus:9090");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring::dashboard_file()).unwrap())
            .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], source["uid"],
                "panel {} names another data source",
                panel["title"]
            );
        }
    }
    let grafana = environment(compose, "grafana");
    assert_eq!(
        grafana["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"],
        "/var/lib/grafana/dashboards/ferrybox.json"
    );
    let provider =
        monitoring::yaml_as_json(&deploy.join("grafana/provisioning/dashboards/ferrybox.yml"));
    assert_eq!(
        provider["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards"
    );
}

/// The official AsyncAPI parser, installed by the project's own script (once per machine).
fn asyncapi_validator(files: &[&Path]) -> (bool, String) {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    let modules = MODULES.get_or_init(|| monitoring::tool("asyncapi-validator"));
    let out = Command::new("node")
        .arg(root().join("deploy/local/asyncapi/validate.cjs"))
        .arg(modules)
        .args(files)
        .output()
        .expect("run node");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_asyncapi_document_is_current_and_valid_by_the_official_parser() {
    use ferrybox::contract::{ConsumerContract, ProducerCatalog};
    let file = root().join("schemas/asyncapi.json");
    let committed = std::fs::read_to_string(&file).unwrap();
    // Current: what schemas/ and every consumer's contracts say now (make contracts checks the
    // same with `ferrybox-contracts asyncapi --check`).
    let catalog = ProducerCatalog::load(&root().join("schemas")).unwrap();
    let mut contracts = Vec::new();
    for service in ["auth-service", "user-service"] {
        let dir = root().join(service).join("contracts");
        if dir.is_dir() {
            contracts.extend(ConsumerContract::load_dir(&dir).unwrap());
        }
    }
    assert!(!contracts.is_empty());
    // The document shows paths relative to the root, as the CLI run there writes them.
    for contract in &mut contracts {
        contract.path = contract.path.strip_prefix(root()).unwrap().to_path_buf();
    }
    let mut catalog = catalog;
    for topic in &mut catalog.topics {
        for history in &mut topic.messages {
            for version in &mut history.versions {
                version.path = version.path.strip_prefix(root()).unwrap().to_path_buf();
            }
        }
    }
    assert!(
        ferrybox::contract::asyncapi_text(&catalog, &contracts) == committed,
        "schemas/asyncapi.json is out of date: run `cargo run -p ferrybox --features cli --bin \
         ferrybox-contracts -- asyncapi`"
    );

    // What it says: every published version, and what each consumer reads.
    let doc: Value = serde_json::from_str(&committed).unwrap();
    for topic in &catalog.topics {
        for history in &topic.messages {
            for version in &history.versions {
                let id = format!("{}.v{}", history.message_type, version.version);
                assert!(
                    doc["channels"][&topic.topic]["messages"][&id].is_object(),
                    "{id} is not on {}",
                    topic.topic
                );
            }
        }
    }
    for contract in &contracts {
        let op = &doc["operations"][format!("{}.receive.{}", contract.consumer, contract.topic)];
        assert_eq!(op["action"], "receive");
        for message_type in contract.readers.keys() {
            assert!(
                op["x-ferrybox-reader-schemas"][message_type].is_object(),
                "{}: no reader schema for {message_type}",
                contract.consumer
            );
        }
    }

    let (valid, output) = asyncapi_validator(&[&file]);
    assert!(valid, "{output}");
    assert!(output.contains("valid AsyncAPI 3.0.0"), "{output}");
    // The parser bites: a reference to a message that does not exist is refused.
    let broken =
        std::env::temp_dir().join(format!("ferrybox-asyncapi-{}.json", std::process::id()));
    std::fs::write(
        &broken,
        committed.replacen(
            "\"$ref\": \"#/channels/users/messages/",
            "\"$ref\": \"#/channels/users/messages/missing.",
            1,
        ),
    )
    .unwrap();
    let (valid, output) = asyncapi_validator(&[&broken]);
    std::fs::remove_file(&broken).unwrap();
    assert!(!valid, "a broken reference passed: {output}");
}
