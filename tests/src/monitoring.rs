//! The monitoring files under `deploy/` (Prometheus rules, the Grafana dashboard), read for
//! the tests that check them: their YAML as JSON, their PromQL expressions, and the metrics
//! each expression reads.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// The workspace's root directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// Runs `deploy/local/infra.sh <verb>`, which prints a tool's path (installing it once per
/// machine); that path.
pub fn tool(verb: &str) -> PathBuf {
    let out = Command::new(root().join("deploy/local/infra.sh"))
        .arg(verb)
        .output()
        .unwrap_or_else(|e| panic!("infra.sh {verb}: {e}"));
    assert!(
        out.status.success(),
        "infra.sh {verb} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The Python of the compose validator's environment, which has a YAML parser (ruamel.yaml).
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| tool("validator").with_file_name("python"))
}

/// A YAML file as JSON, anchors and merge keys resolved.
pub fn yaml_as_json(path: &Path) -> Value {
    let out = Command::new(python())
        .args([
            "-c",
            "import json, sys; from ruamel.yaml import YAML; \
             print(json.dumps(YAML(typ='safe').load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .expect("run the YAML parser");
    assert!(
        out.status.success(),
        "{} is not YAML: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("YAML as JSON")
}

/// The Prometheus rules file.
pub fn rules_file() -> PathBuf {
    root().join("deploy/prometheus/ferrybox.rules.yml")
}

/// The Grafana dashboard.
pub fn dashboard_file() -> PathBuf {
    root().join("deploy/grafana/dashboards/ferrybox.json")
}

/// Every rule of the rules file (recording and alerting), as written.
pub fn rules() -> Vec<Value> {
    yaml_as_json(&rules_file())["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

/// The names the recording rules record.
pub fn recorded_names() -> BTreeSet<String> {
    rules()
        .iter()
        .filter_map(|r| r["record"].as_str().map(str::to_owned))
        .collect()
}

/// Every PromQL expression of the rules and the dashboard, each with where it is (a rule's or
/// a panel's name).
pub fn expressions() -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = rules()
        .iter()
        .map(|r| {
            let name = r["record"].as_str().or(r["alert"].as_str()).unwrap_or("?");
            (
                format!("rule {name}"),
                r["expr"].as_str().expect("a rule's expr").to_owned(),
            )
        })
        .collect();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard_file()).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            all.push((
                format!("panel {}", panel["title"]),
                target["expr"].as_str().expect("a target's expr").to_owned(),
            ));
        }
    }
    all
}

/// The metric names `expr` reads (by its parsed syntax tree, so a label or a function name is
/// never taken for one); an error when it is not valid PromQL.
pub fn metrics_read_by(expr: &str) -> Result<BTreeSet<String>, String> {
    use promql_parser::parser::Expr;
    use promql_parser::util::{ExprVisitor, walk_expr};

    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = String;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
            let selector = match expr {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(vs) = selector {
                match &vs.name {
                    Some(name) => {
                        self.0.insert(name.clone());
                    }
                    None => return Err(format!("a selector without a metric name: {vs}")),
                }
            }
            Ok(true)
        }
    }
    let parsed = promql_parser::parser::parse(expr)?;
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, &parsed)?;
    Ok(names.0)
}

/// The metric names in a scrape in Prometheus' text format (histograms as their `_bucket`,
/// `_sum` and `_count` series).
pub fn exported_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_come_from_selectors_only() {
        let names = metrics_read_by(
            "sum by (job, le) (rate(a_total{error_type!=\"\"}[5m])) > 3 and deriv(b:rec[10m]) > 0 \
             or histogram_quantile(0.99, c_bucket)",
        )
        .unwrap();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["a_total", "b:rec", "c_bucket"]
        );
        assert!(metrics_read_by("sum(").is_err());
        assert!(metrics_read_by("{job=\"x\"}").is_err());
    }

    #[test]
    fn a_scrape_names_its_series() {
        let scrape = "# HELP x_total X\n# TYPE x_total counter\nx_total{a=\"1\"} 3\n\
                      y_bucket{le=\"+Inf\"} 1\ny_count 1\n";
        assert_eq!(
            exported_names(scrape).into_iter().collect::<Vec<_>>(),
            ["x_total", "y_bucket", "y_count"]
        );
    }
}
