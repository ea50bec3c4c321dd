//! The observability assets under deploy/observability agree with the agent: every
//! metric a Grafana dashboard queries is one the agent exports (its catalog, filled as
//! the metrics register), with the labels the query uses; every variable a query uses
//! is defined; and both scrape configurations (the PodMonitor and the plain Prometheus
//! job in the README) reach the DaemonSet's metrics port.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};
use mesh_node::catalog::{histogram_families, metrics_catalog};
use regex::Regex;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn observability_dir() -> PathBuf {
    deploy_dir().join("observability")
}

fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"))
}

/// What the agent exports, and the labels a scrape adds to every series.
struct Exported {
    families: BTreeMap<String, Vec<String>>,
    histograms: BTreeSet<String>,
    target_labels: BTreeSet<String>,
}

impl Exported {
    fn new(target_labels: BTreeSet<String>) -> Exported {
        Exported {
            families: metrics_catalog(),
            histograms: histogram_families(),
            target_labels,
        }
    }

    /// The labels of a series name as Prometheus stores it: a family's, or a
    /// histogram's `_bucket` (with `le`), `_sum` or `_count`. None: not exported.
    fn labels(&self, series: &str) -> Option<BTreeSet<String>> {
        if let Some(labels) = self.families.get(series) {
            return Some(labels.iter().cloned().collect());
        }
        for (suffix, extra) in [("_bucket", Some("le")), ("_sum", None), ("_count", None)] {
            let Some(family) = series.strip_suffix(suffix) else {
                continue;
            };
            if self.histograms.contains(family) {
                let mut labels: BTreeSet<String> = self.families[family].iter().cloned().collect();
                labels.extend(extra.map(String::from));
                return Some(labels);
            }
        }
        None
    }
}

/// `expr` with the contents of its string literals blanked out (same length, quotes
/// kept), so that label values and regexes are not read as names.
fn blank_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            None => {
                if matches!(c, '"' | '\'' | '`') {
                    quote = Some(c);
                }
                out.push(c);
            }
            Some(q) => {
                if escaped {
                    escaped = false;
                    out.extend(std::iter::repeat_n(' ', c.len_utf8()));
                } else if c == '\\' && q != '`' {
                    escaped = true;
                    out.push(' ');
                } else if c == q {
                    quote = None;
                    out.push(c);
                } else {
                    out.extend(std::iter::repeat_n(' ', c.len_utf8()));
                }
            }
        }
    }
    out
}

/// The names a PromQL expression uses.
#[derive(Debug, Default)]
struct Names {
    /// Metric names (`nodemesh_` identifiers).
    metrics: BTreeSet<String>,
    /// (metric, label) of each matcher of a selector.
    matchers: Vec<(String, String)>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`.
    grouping: BTreeSet<String>,
    /// Selectors that name no `nodemesh_` metric (the agent exports nothing else).
    foreign_selectors: Vec<String>,
}

fn names(expr: &str) -> Names {
    static METRIC: OnceLock<Regex> = OnceLock::new();
    static MATCHER: OnceLock<Regex> = OnceLock::new();
    static GROUPING: OnceLock<Regex> = OnceLock::new();
    let metric = METRIC.get_or_init(|| regex(r"\bnodemesh_[A-Za-z0-9_:]*"));
    let matcher =
        MATCHER.get_or_init(|| regex(r#"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"\s*"\s*$"#));
    let grouping = GROUPING
        .get_or_init(|| regex(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)"));
    let text = blank_strings(expr);
    let mut out = Names {
        metrics: metric
            .find_iter(&text)
            .map(|m| m.as_str().to_string())
            .collect(),
        ..Names::default()
    };
    for caps in grouping.captures_iter(&text) {
        out.grouping.extend(
            caps[2]
                .split(',')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    let mut rest = 0;
    while let Some(open) = text[rest..].find('{').map(|i| i + rest) {
        let close = text[open..]
            .find('}')
            .map(|i| i + open)
            .unwrap_or_else(|| panic!("`{expr}`: unclosed selector"));
        let before = text[..open].trim_end();
        let name_start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(0, |i| i + 1);
        let name = &before[name_start..];
        if name.starts_with("nodemesh_") {
            for part in text[open + 1..close].split(',') {
                if part.trim().is_empty() {
                    continue;
                }
                match matcher.captures(part) {
                    Some(caps) => out.matchers.push((name.to_string(), caps[1].to_string())),
                    None => out
                        .foreign_selectors
                        .push(format!("unreadable matcher `{}`", part.trim())),
                }
            }
        } else {
            out.foreign_selectors
                .push(expr[name_start..=close].to_string());
        }
        rest = close + 1;
    }
    out
}

/// What is wrong with one PromQL expression, against what the agent exports.
fn check_expr(expr: &str, exported: &Exported) -> Vec<String> {
    let mut problems = Vec::new();
    let found = names(expr);
    if found.metrics.is_empty() {
        problems.push("queries no nodemesh_ metric".to_string());
    }
    for selector in &found.foreign_selectors {
        problems.push(format!("selector {selector} is not of a nodemesh_ metric"));
    }
    let mut any_labels: BTreeSet<String> = exported.target_labels.clone();
    for metric in &found.metrics {
        match exported.labels(metric) {
            Some(labels) => any_labels.extend(labels),
            None => problems.push(format!("{metric} is not a metric the agent exports")),
        }
    }
    for (metric, label) in &found.matchers {
        let Some(labels) = exported.labels(metric) else {
            continue;
        };
        if !labels.contains(label) && !exported.target_labels.contains(label) {
            problems.push(format!(
                "{metric} has no label {label} (it has {labels:?}; the scrape adds {:?})",
                exported.target_labels
            ));
        }
    }
    for label in &found.grouping {
        if !any_labels.contains(label) {
            problems.push(format!(
                "grouping label {label} is a label of none of {:?}",
                found.metrics
            ));
        }
    }
    problems
}

/// The labels a legend may name: those kept by the aggregation, or (none) every label
/// of the expression's metrics.
fn legend_problems(expr: &str, legend: &str, exported: &Exported) -> Vec<String> {
    static LEGEND: OnceLock<Regex> = OnceLock::new();
    let legend_label = LEGEND.get_or_init(|| regex(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}"));
    let found = names(expr);
    let available: BTreeSet<String> = if found.grouping.is_empty() {
        found
            .metrics
            .iter()
            .filter_map(|m| exported.labels(m))
            .flatten()
            .chain(exported.target_labels.iter().cloned())
            .collect()
    } else {
        found.grouping.clone()
    };
    legend_label
        .captures_iter(legend)
        .map(|c| c[1].to_string())
        .filter(|l| !available.contains(l))
        .map(|l| format!("legend `{legend}` names {l}, which the query does not keep"))
        .collect()
}

/// Every panel of a dashboard, rows' nested panels included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    fn walk<'a>(list: &'a Json, out: &mut Vec<&'a Json>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    // Dashboards of the old schema keep panels in rows.
    for row in dashboard["rows"].as_array().into_iter().flatten() {
        walk(&row["panels"], &mut out);
    }
    out
}

/// A query variable's query text (the old schema has a string, the new an object).
fn variable_query(variable: &Json) -> Option<&str> {
    variable["query"]
        .as_str()
        .or_else(|| variable["query"]["query"].as_str())
}

/// Grafana's own variables, usable in any query.
const GRAFANA_VARIABLES: [&str; 5] = [
    "__rate_interval",
    "__interval",
    "__range",
    "__interval_ms",
    "__range_s",
];

/// The variables (`$name`, `${name}`, `${name:format}`, `[[name]]`) a text uses.
fn variables_used(text: &str) -> BTreeSet<String> {
    static VARIABLE: OnceLock<Regex> = OnceLock::new();
    let variable = VARIABLE.get_or_init(|| {
        regex(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_]+)\]\]")
    });
    variable
        .captures_iter(text)
        .filter_map(|c| c.get(1).or(c.get(2)).or(c.get(3)))
        .map(|m| m.as_str().to_string())
        .collect()
}

/// What is wrong with one dashboard.
fn check_dashboard(dashboard: &Json, exported: &Exported) -> Vec<String> {
    static LABEL_VALUES: OnceLock<Regex> = OnceLock::new();
    let label_values = LABEL_VALUES.get_or_init(|| {
        regex(r"^\s*label_values\(\s*(.+)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")
    });
    let mut problems = Vec::new();
    let variables = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut defined: BTreeSet<String> = GRAFANA_VARIABLES.iter().map(|v| v.to_string()).collect();
    defined.extend(
        variables
            .iter()
            .filter_map(|v| v["name"].as_str())
            .map(String::from),
    );
    // The data source is chosen on import: a variable of Prometheus data sources.
    if !variables.iter().any(|v| {
        v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"
    }) {
        problems.push("no `datasource` variable of type prometheus".to_string());
    }
    let datasource_ok = |d: &Json| d["uid"] == "${datasource}" && d["type"] == "prometheus";
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let name = variable["name"].as_str().unwrap_or("?");
        let at = format!("variable {name}");
        if !datasource_ok(&variable["datasource"]) {
            problems.push(format!("{at}: data source is not ${{datasource}}"));
        }
        let Some(query) = variable_query(variable) else {
            problems.push(format!("{at}: no query"));
            continue;
        };
        if let Some(definition) = variable["definition"].as_str() {
            if definition != query {
                problems.push(format!(
                    "{at}: definition `{definition}` is not its query `{query}`"
                ));
            }
        }
        let Some(caps) = label_values.captures(query) else {
            problems.push(format!(
                "{at}: `{query}` is not label_values(<metric selector>, <label>)"
            ));
            continue;
        };
        let (selector, label) = (&caps[1], &caps[2]);
        problems.extend(
            check_expr(selector, exported)
                .into_iter()
                .map(|p| format!("{at}: `{query}`: {p}")),
        );
        let found = names(selector);
        for metric in &found.metrics {
            if let Some(labels) = exported.labels(metric) {
                if !labels.contains(label) && !exported.target_labels.contains(label) {
                    problems.push(format!("{at}: {metric} has no label {label}"));
                }
            }
        }
        for used in variables_used(query) {
            if !defined.contains(&used) {
                problems.push(format!("{at}: ${used} is not a variable"));
            }
        }
    }
    let mut ids = BTreeSet::new();
    let mut exprs = 0;
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        if let Some(id) = panel["id"].as_u64() {
            if !ids.insert(id) {
                problems.push(format!("panel {title}: id {id} is used twice"));
            }
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if panel["type"] != "row" && targets.is_empty() {
            problems.push(format!("panel {title}: no queries"));
        }
        if !targets.is_empty() && !datasource_ok(&panel["datasource"]) {
            problems.push(format!("panel {title}: data source is not ${{datasource}}"));
        }
        for target in &targets {
            let at = format!("panel {title} query {}", target["refId"]);
            if !datasource_ok(&target["datasource"]) {
                problems.push(format!("{at}: data source is not ${{datasource}}"));
            }
            let Some(expr) = target["expr"].as_str().filter(|e| !e.trim().is_empty()) else {
                problems.push(format!("{at}: no expr"));
                continue;
            };
            exprs += 1;
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            problems.extend(
                check_expr(expr, exported)
                    .into_iter()
                    .chain(legend_problems(expr, legend, exported))
                    .map(|p| format!("{at}: `{expr}`: {p}")),
            );
            for used in variables_used(expr) {
                if !defined.contains(&used) {
                    problems.push(format!("{at}: ${used} is not a variable"));
                }
            }
        }
    }
    if exprs == 0 {
        problems.push("no queries at all".to_string());
    }
    problems
}

fn dashboard_files() -> Vec<PathBuf> {
    let dir = observability_dir().join("grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn load_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load_yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn podmonitor() -> Yaml {
    load_yaml(&observability_dir().join("podmonitor.yaml"))
}

/// The plain Prometheus `scrape_configs` snippet of deploy/observability/README.md.
fn scrape_config() -> Yaml {
    let path = observability_dir().join("README.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let blocks: Vec<&str> = text
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("\n```").next())
        .filter(|b| b.contains("scrape_configs:"))
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "one ```yaml block with scrape_configs in the README"
    );
    serde_yaml::from_str(blocks[0]).unwrap_or_else(|e| panic!("the README's scrape config: {e}"))
}

fn strings(value: &Yaml) -> Vec<String> {
    value
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

/// The labels the scrape adds to every series: Prometheus's `job` and `instance`, and
/// those both scrape configurations set by relabeling (a dashboard may use them).
fn target_labels() -> BTreeSet<String> {
    let from_podmonitor: BTreeSet<String> = podmonitor()["spec"]["podMetricsEndpoints"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|e| e["relabelings"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|r| r["targetLabel"].as_str().map(String::from))
        .collect();
    let from_scrape_config: BTreeSet<String> = scrape_config()["scrape_configs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|j| {
            j["relabel_configs"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|r| r["target_label"].as_str().map(String::from))
        .collect();
    let mut labels: BTreeSet<String> = ["job", "instance"].map(String::from).into();
    labels.extend(from_podmonitor.intersection(&from_scrape_config).cloned());
    labels
}

#[test]
fn every_dashboard_queries_only_exported_metrics_with_their_labels() {
    let exported = Exported::new(target_labels());
    assert!(
        exported.families.contains_key("nodemesh_requests_total"),
        "{:?}",
        exported.families.keys()
    );
    let files = dashboard_files();
    let names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
    assert!(
        names.contains(&std::ffi::OsStr::new("nodemesh-workloads.json"))
            && names.contains(&std::ffi::OsStr::new("nodemesh-agent.json")),
        "{names:?}"
    );
    let mut uids = BTreeSet::new();
    let mut problems = Vec::new();
    for file in &files {
        let dashboard = load_json(file);
        let uid = dashboard["uid"].as_str().unwrap_or_default().to_string();
        assert!(
            !uid.is_empty() && uids.insert(uid),
            "{}: a uid of its own",
            file.display()
        );
        assert!(
            dashboard["schemaVersion"].as_u64() >= Some(36),
            "{}: schemaVersion",
            file.display()
        );
        problems.extend(
            check_dashboard(&dashboard, &exported)
                .into_iter()
                .map(|p| format!("{}: {p}", file.display())),
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_dashboards_show_the_golden_signals_and_the_agents_health() {
    let exprs = |file: &str| -> String {
        let dashboard = load_json(&observability_dir().join("grafana").join(file));
        panels(&dashboard)
            .into_iter()
            .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t["expr"].as_str().map(String::from))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let workloads = exprs("nodemesh-workloads.json");
    for wanted in [
        "nodemesh_requests_total",
        "response_code!~\"5..\"",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.9,",
        "histogram_quantile(0.99,",
        "nodemesh_request_duration_milliseconds_bucket",
        "nodemesh_tcp_sent_bytes_total",
        "nodemesh_tcp_received_bytes_total",
        "nodemesh_tcp_connections_opened_total",
        "nodemesh_tcp_connections_closed_total",
        "connection_security_policy=\"mutual_tls\"",
        "reporter=\"destination\"",
        "reporter=\"source\"",
    ] {
        assert!(
            workloads.contains(wanted),
            "nodemesh-workloads.json: {wanted}"
        );
    }
    let agent = exprs("nodemesh-agent.json");
    for wanted in [
        "nodemesh_bpf_map_entries",
        "nodemesh_bpf_map_capacity",
        "nodemesh_certificate_expiry_seconds",
        "nodemesh_discovery_stale_seconds",
        "nodemesh_state_age_seconds",
        "nodemesh_connections_refused_total",
        "nodemesh_listener_refused_total",
        "nodemesh_outlier_ejections_total",
        "nodemesh_outlier_ejected_endpoints",
        "nodemesh_config_problems_total",
        "nodemesh_spans_dropped_total",
        "nodemesh_spans_exported_total",
        "nodemesh_spans_queued",
        "nodemesh_access_log_dropped_total",
    ] {
        assert!(agent.contains(wanted), "nodemesh-agent.json: {wanted}");
    }
}

#[test]
fn the_checks_catch_what_they_are_for() {
    let exported = Exported::new(["job", "instance", "node"].map(String::from).into());
    let ok = |expr: &str| check_expr(expr, &exported);
    assert_eq!(
        ok(
            r#"histogram_quantile(0.99, sum by (le, destination_workload) (rate(nodemesh_request_duration_milliseconds_bucket{reporter="destination", destination_workload=~"$workload"}[$__rate_interval])))"#
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        ok(
            r#"sum by (node) (nodemesh_request_duration_milliseconds_count{response_code="200"}) / nodemesh_request_duration_milliseconds_sum"#
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        ok(r#"nodemesh_spans_dropped_total{provider="a,b}", reason=~"x|y"}"#),
        Vec::<String>::new(),
        "commas and braces inside values"
    );
    let bad = [
        r#"rate(nodemesh_request_total[5m])"#,
        r#"nodemesh_requests_total_bucket"#,
        r#"nodemesh_requests_total{destination_app="x"}"#,
        r#"nodemesh_request_duration_milliseconds_count{le="1"}"#,
        r#"sum by (pod_name) (nodemesh_requests_total)"#,
        r#"sum without (provider) (nodemesh_state_age_seconds)"#,
        r#"nodemesh_requests_total / on (cluster) nodemesh_tcp_sent_bytes_total"#,
        r#"{__name__="nodemesh_requests_total"}"#,
        r#"up{job="nodemesh"}"#,
        r#"vector(1)"#,
    ];
    for expr in bad {
        assert_ne!(ok(expr), Vec::<String>::new(), "{expr}");
    }
    assert_eq!(
        legend_problems(
            "sum by (destination_service) (rate(nodemesh_requests_total[5m]))",
            "{{destination_workload}}",
            &exported
        )
        .len(),
        1
    );
    assert_eq!(
        variables_used("a{b=~\"$x\", c=\"${y:regex}\"}[$__rate_interval] [[z]]"),
        ["__rate_interval", "x", "y", "z"].map(String::from).into()
    );
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod spec");
    spec.containers
        .iter()
        .find(|c| c.name == "mesh-node")
        .expect("the mesh-node container")
}

fn daemon_set() -> DaemonSet {
    let path = deploy_dir().join("daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The DaemonSet's namespace, pod labels and metrics port (name, number).
fn agent_pods() -> (String, BTreeMap<String, String>, (String, i32)) {
    let ds = daemon_set();
    let namespace = ds.metadata.namespace.clone().expect("a namespace");
    let labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    let port = agent_container(&ds)
        .ports
        .iter()
        .flatten()
        .find(|p| p.container_port == 15020)
        .expect("container port 15020 (--metrics-addr)");
    let name = port.name.clone().expect("the metrics port has a name");
    (namespace, labels, (name, port.container_port))
}

#[test]
fn the_pod_monitor_scrapes_the_agents_metrics_port() {
    let (namespace, labels, (port_name, _)) = agent_pods();
    let pm = podmonitor();
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pm["kind"], "PodMonitor");
    assert_eq!(
        pm["metadata"]["namespace"].as_str(),
        Some(namespace.as_str())
    );
    let spec = &pm["spec"];
    let selector: BTreeMap<String, String> =
        serde_yaml::from_value(spec["selector"]["matchLabels"].clone()).expect("matchLabels");
    assert!(!selector.is_empty());
    for (k, v) in &selector {
        assert_eq!(labels.get(k), Some(v), "the agents' pods carry {k}={v}");
    }
    assert_eq!(
        strings(&spec["namespaceSelector"]["matchNames"]),
        [namespace]
    );
    let endpoints = spec["podMetricsEndpoints"]
        .as_sequence()
        .expect("podMetricsEndpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(
        endpoints[0]["port"].as_str(),
        Some(port_name.as_str()),
        "the DaemonSet's container port name"
    );
    assert_eq!(endpoints[0]["path"], "/metrics");
    assert_eq!(endpoints[0]["interval"], "15s");
    assert!(
        target_labels().contains("node"),
        "both scrapes label the node"
    );
}

#[test]
fn the_readme_scrape_config_scrapes_the_agents_metrics_port() {
    let (namespace, labels, (_, port)) = agent_pods();
    let config = scrape_config();
    let jobs = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job["metrics_path"], "/metrics");
    let sd = job["kubernetes_sd_configs"]
        .as_sequence()
        .expect("kubernetes_sd_configs");
    assert_eq!(sd.len(), 1);
    assert_eq!(sd[0]["role"], "pod");
    assert_eq!(strings(&sd[0]["namespaces"]["names"]), [namespace]);
    let keeps: BTreeMap<String, String> = job["relabel_configs"]
        .as_sequence()
        .expect("relabel_configs")
        .iter()
        .filter(|r| r["action"] == "keep")
        .map(|r| {
            let source = strings(&r["source_labels"]);
            assert_eq!(source.len(), 1, "{r:?}");
            let regex = r["regex"].as_str().expect("a keep has a regex").to_string();
            (source[0].clone(), regex)
        })
        .collect();
    assert_eq!(
        keeps.get("__meta_kubernetes_pod_label_app_kubernetes_io_name"),
        labels.get("app.kubernetes.io/name"),
        "keeps the agents' pods"
    );
    assert_eq!(
        keeps.get("__meta_kubernetes_pod_container_port_number"),
        Some(&port.to_string()),
        "keeps the metrics port"
    );
    assert_eq!(port, 15020);
}
