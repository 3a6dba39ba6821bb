//! The chart's alerts (`prometheusRule.enabled`) and dashboard (`dashboards.enabled`),
//! as `helm template` renders them, against what ships: every alert fires and stays quiet
//! where it should under `promtool test rules` (Prometheus's own rule engine, built from
//! its Go module), and every series an alert or a dashboard query reads is one a real
//! agent exports on `/metrics` (scraped with a reader's token, like Prometheus).

use std::{collections::BTreeSet, process::Command, sync::Arc, time::Duration};

use portassign::{agent::probe::SocketProbe, checker::get_with};
use portassign_testkit::{Cluster, World, chart, eventually, port_block, restricted::Restricted, tool};
use serde_json::Value;

/// The groups of the rendered PrometheusRule.
fn rendered_rules() -> Value {
    let rendered = chart::render("monitoring", &["prometheusRule.enabled=true"]).expect("helm template");
    let rules: Vec<&Value> = chart::of_kind(&rendered, "PrometheusRule").collect();
    assert_eq!(rules.len(), 1, "the chart renders one PrometheusRule");
    rules[0]["spec"].clone()
}

/// Every alerting rule of `spec`.
fn alerts(spec: &Value) -> Vec<&Value> {
    spec["groups"].as_array().expect("groups").iter().flat_map(|g| g["rules"].as_array().expect("rules")).collect()
}

/// The rendered dashboard's JSON.
fn rendered_dashboard() -> Value {
    let rendered = chart::render("monitoring", &["dashboards.enabled=true"]).expect("helm template");
    let maps: Vec<&Value> =
        chart::of_kind(&rendered, "ConfigMap").filter(|m| m["data"].get("portassign.json").is_some()).collect();
    assert_eq!(maps.len(), 1, "the chart renders one dashboard ConfigMap");
    assert_eq!(maps[0]["metadata"]["labels"]["grafana_dashboard"], "1", "labelled for the Grafana sidecar");
    serde_json::from_str(maps[0]["data"]["portassign.json"].as_str().expect("text")).expect("the dashboard is JSON")
}

/// Every PromQL expression of the dashboard: its panels' targets and its variables' queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let targets = panel["targets"].as_array().expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {} queries nothing", panel["title"]);
        out.extend(targets.iter().map(|t| t["expr"].as_str().expect("expr").to_owned()));
    }
    for variable in dashboard["templating"]["list"].as_array().expect("variables") {
        if let Some(query) = variable["query"]["query"].as_str() {
            // label_values(SELECTOR, LABEL): the selector is a query.
            let inner = query.trim_start_matches("label_values(").rsplit_once(',').expect("label_values").0;
            out.push(inner.to_owned());
        }
    }
    out
}

/// The series names an expression reads: `portassign_*` identifiers, and any other
/// identifier directly followed by a selector (`up{...}`).
fn series_of(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    let mut depth_braces = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c == '{' {
            depth_braces += 1;
        } else if c == '}' {
            depth_braces -= 1;
        } else if depth_braces == 0 && (c.is_ascii_alphabetic() || c == '_') {
            let start = i;
            while i < bytes.len()
                && ((bytes[i] as char).is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':')
            {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("portassign_") || expr[i..].starts_with('{') {
                out.insert(word.to_owned());
            }
            continue;
        }
        i += 1;
    }
    out
}

/// The series names an OpenMetrics exposition makes in Prometheus: each sample's name, and
/// for every declared family the names its type gives (so a labelled family with no
/// sample yet still counts).
fn exported(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            out.insert(name.to_owned());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_series_the_alerts_and_the_dashboard_read_is_exported_by_a_real_agent() {
    // An agent whose status writes are refused (the chart's ClusterRole less that one
    // permission), so that the families labelled by error appear in its scrape as well.
    let w = World::new("monitoring").await;
    let refused = Restricted::new(Cluster::shared().await, "portassignments/status").await.expect("identity");
    let config = w.agent_config(&w.node, port_block(8));
    let agent = w.agent_as(&refused.identity, config, Arc::new(SocketProbe::detect())).await;
    w.create("pool", &["a", "b"]).await;
    let url = format!("http://{}/metrics", agent.http_addr);
    let text = eventually("the agent counts a refused write", Duration::from_secs(30), || async {
        let (code, text) = get_with(&url, Some(&w.reader_identity.token())).await.ok()?;
        (code == 200 && text.contains("portassign_write_failures_total{")).then_some(text)
    })
    .await;
    let exported = exported(&text);
    assert!(exported.contains("portassign_ports_free"), "the scrape is the agent's: {exported:?}");

    let spec = rendered_rules();
    let mut queries: Vec<(String, String)> = alerts(&spec)
        .iter()
        .map(|r| (format!("alert {}", r["alert"]), r["expr"].as_str().expect("expr").to_owned()))
        .collect();
    queries.extend(dashboard_queries(&rendered_dashboard()).into_iter().map(|q| ("dashboard".to_owned(), q)));
    // Prometheus makes `up` for every target itself.
    let made_by_prometheus = ["up"];
    let mut missing = Vec::new();
    for (what, expr) in &queries {
        let series = series_of(expr);
        assert!(!series.is_empty(), "{what} reads no series: {expr}");
        for name in series {
            if !exported.contains(&name) && !made_by_prometheus.contains(&name.as_str()) {
                missing.push(format!("{what}: {name} (in {expr})"));
            }
        }
    }
    assert!(missing.is_empty(), "series the agent does not export:\n{}\nexported: {exported:?}", missing.join("\n"));
    println!("{} queries, every series exported", queries.len());
    agent.stop().await.unwrap();
    refused.remove().await;
    w.cleanup().await;
}

#[test]
fn series_of_finds_the_series_and_skips_functions_and_labels() {
    let expr =
        r#"max by (node) (portassign_a{job=~"$job"} / portassign_b unless on (instance) (up{x="portassign_c"} == 1))"#;
    assert_eq!(series_of(expr), BTreeSet::from(["portassign_a".into(), "portassign_b".into(), "up".into()]));
    assert_eq!(
        exported("# TYPE portassign_errors counter\n# TYPE portassign_d histogram\nportassign_free 3\n"),
        BTreeSet::from([
            "portassign_errors_total".into(),
            "portassign_d_bucket".into(),
            "portassign_d_sum".into(),
            "portassign_d_count".into(),
            "portassign_free".into()
        ])
    );
}

/// Runs `promtool ARGS FILE` and fails with what it printed unless it succeeds.
fn promtool_ok(promtool: &std::path::Path, args: &[&str], file: &std::path::Path) {
    let output = Command::new(promtool).args(args).arg(file).output().expect("run promtool");
    assert!(
        output.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_fires_each_alert_where_it_should_and_nowhere_else() {
    let spec = rendered_rules();
    let promtool = tool("promtool").expect("promtool (hack/build-tools.sh promtool)");
    let dir = std::env::temp_dir().join(portassign_testkit::unique("promtool"));
    std::fs::create_dir_all(&dir).unwrap();

    // The rules as shipped: `check rules` parses every expression and annotation template.
    let mut names = Vec::new();
    for rule in alerts(&spec) {
        let summary = rule["annotations"]["summary"].as_str().unwrap_or_default();
        let description = rule["annotations"]["description"].as_str().unwrap_or_default();
        assert!(!summary.is_empty() && !description.is_empty(), "{} says what and what to do", rule["alert"]);
        names.push(rule["alert"].as_str().expect("alert").to_owned());
    }
    std::fs::write(dir.join("shipped.yaml"), spec.to_string()).unwrap();
    promtool_ok(&promtool, &["check", "rules"], &dir.join("shipped.yaml"));

    // The unit tests compare labels; annotations are left out (promtool compares them verbatim).
    let mut bare = spec.clone();
    for group in bare["groups"].as_array_mut().unwrap() {
        for rule in group["rules"].as_array_mut().unwrap() {
            rule.as_object_mut().unwrap().remove("annotations");
        }
    }
    std::fs::write(dir.join("rules.yaml"), bare.to_string()).unwrap();
    let tests = portassign_testkit::repo_root().join("charts/portassign/tests/promtool/alerts.yaml");
    std::fs::copy(&tests, dir.join("alerts.yaml")).unwrap();
    promtool_ok(&promtool, &["test", "rules"], &dir.join("alerts.yaml"));

    // Each alert has a case where it fires and one where it stays quiet.
    let text = std::fs::read_to_string(&tests).unwrap();
    let suite: Value = serde_saphyr::from_str(&text).expect("alerts.yaml");
    for name in &names {
        let cases: Vec<&Value> = suite["tests"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
            .filter(|c| c["alertname"] == name.as_str())
            .collect();
        let firing = cases.iter().any(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()));
        let quiet = cases.iter().any(|c| c["exp_alerts"].as_array().is_some_and(|a| a.is_empty()));
        assert!(firing && quiet, "{name}: a firing case {firing}, a quiet case {quiet}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
