//! End-to-end: `meshctl node` against running agents with mTLS traffic, `trace`
//! predictions checked against what real traffic then does, the Prometheus metrics
//! and the access log of a known transfer, and meshctl's failure on a dead address.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::sim::{host, ClusterSpec, PodSpec, RouteSpec, ServiceSpec, SimCluster};
use prometheus_parse::{Sample, Scrape, Value as Metric};
use serde_json::Value;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/apps/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/apps/sa/server";
const SERVER_V2_ID: &str = "spiffe://cluster.local/ns/apps/sa/server-v2";

const DENY_INTRUDER: &str = "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n\
    metadata: {name: deny-intruder, namespace: apps}\n\
    spec: {action: DENY, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/apps/sa/intruder\"]}]}]}\n";

/// Two nodes: node a has client and intruder (apps, enrolled) and bystander (plain);
/// node b has server and server-v2 (apps) and outsider (plain). `web` is split 50/50
/// between web-v1 (server) and web-v2 (server-v2) by a TCPRoute; `echo` is server.
/// A DENY policy refuses the intruder's identity in apps.
fn cluster() -> SimCluster {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("intruder", "apps", "a"));
    spec.pods.push(PodSpec::new("server-v2", "apps", "b"));
    spec.services = vec![
        ServiceSpec::new("web", "apps", 80, 8080, &["server"]),
        ServiceSpec::new("web-v1", "apps", 80, 8080, &["server"]),
        ServiceSpec::new("web-v2", "apps", 80, 8080, &["server-v2"]),
        ServiceSpec::new("echo", "apps", 80, 8080, &["server"]),
    ];
    spec.routes = vec![RouteSpec {
        name: "web-split".into(),
        namespace: "apps".into(),
        parent: "web".into(),
        port: 80,
        backends: vec![("web-v1".into(), 50), ("web-v2".into(), 50)],
    }];
    let cluster = SimCluster::create(spec).unwrap();
    cluster
        .write_manifest("policies.yaml", DENY_INTRUDER)
        .unwrap();
    cluster.start_agents().unwrap();
    cluster
}

fn rows(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn find<'a>(rows: &'a [Value], field: &str, value: &str) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r.pointer(field).and_then(Value::as_str) == Some(value))
}

/// The live outbound connection from client to `dst`, as `meshctl node connections` shows it.
fn live_to(cluster: &SimCluster, dst: SocketAddr) -> Option<Value> {
    let live = rows(&cluster.meshctl_json("a", &["connections"]).unwrap());
    find(&live, "/original_dst", &dst.to_string()).cloned()
}

fn wait_certificates(cluster: &SimCluster, node: &str, n: usize) {
    let ok = cluster.eventually(Duration::from_secs(15), || {
        rows(&cluster.meshctl_json(node, &["certs"]).unwrap())
            .iter()
            .filter(|c| c["state"] == "valid")
            .count()
            >= n
    });
    assert!(ok.is_some(), "certificates never became valid on {node}");
}

#[test]
fn every_node_subcommand_shows_the_live_state() {
    let cluster = cluster();
    let _servers = [
        cluster.serve("server", 8080).unwrap(),
        cluster.serve("server-v2", 8080).unwrap(),
    ];
    wait_certificates(&cluster, "a", 2);
    let server = cluster.pod("server").addr4(8080);
    let mut hold = cluster.hold("client", server, 30).unwrap();

    let status = cluster.meshctl_json("a", &["status"]).unwrap();
    assert_eq!(status["node"], "a");
    assert_eq!(status["ready"], true);
    assert_eq!(status["mtls"], true);
    assert_eq!(status["workloads"]["enrolled"], 2, "{status}");
    assert!(status["state"]["updates"].as_u64() >= Some(1));

    let workloads = rows(&cluster.meshctl_json("a", &["workloads"]).unwrap());
    let client = find(&workloads, "/name", "client").unwrap();
    assert_eq!(client["enrolled"], true);
    assert_eq!(client["service_account"], "client");
    assert!(client["listeners"].to_string().contains(":15001"));
    let bystander = find(&workloads, "/name", "bystander").unwrap();
    assert_eq!(bystander["enrolled"], false);
    assert_eq!(bystander["reason"], "namespace_not_enrolled");
    let plain = rows(
        &cluster
            .meshctl_json("a", &["workloads", "-n", "plain"])
            .unwrap(),
    );
    assert_eq!(plain.len(), 1, "-n filters: {plain:?}");
    let one = rows(
        &cluster
            .meshctl_json("a", &["workloads", "--pod", "client"])
            .unwrap(),
    );
    assert_eq!(one.len(), 1, "--pod filters: {one:?}");

    let services = rows(&cluster.meshctl_json("a", &["services"]).unwrap());
    let web = find(&services, "/service/name", "web").unwrap();
    assert_eq!(web["resolution"]["route"]["name"], "web-split");

    let churn = cluster
        .churn("client", cluster.service("web").addr4(), 20)
        .unwrap();
    assert_eq!(churn.failed, 0, "{churn:?}");
    let routes = rows(&cluster.meshctl_json("a", &["routes"]).unwrap());
    let split = find(&routes, "/route/name", "web-split").unwrap();
    assert_eq!(split["kind"], "TCPRoute");
    let backends = rows(&split["rules"][0]["backends"]);
    let weights: Vec<u64> = backends
        .iter()
        .filter_map(|b| b["weight"].as_u64())
        .collect();
    assert_eq!(weights, [50, 50]);
    let picks: Vec<u64> = backends
        .iter()
        .filter_map(|b| b["picks"].as_u64())
        .collect();
    assert_eq!(picks, [10, 10], "smooth weighted round-robin: {backends:?}");
    assert_eq!(backends[0]["observed_share"], 0.5);

    let certs = rows(&cluster.meshctl_json("a", &["certs"]).unwrap());
    let cert = find(&certs, "/identity", CLIENT_ID).unwrap();
    assert_eq!(cert["state"], "valid");
    assert!(cert["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(cert["not_after_unix"].as_u64() > cert["not_before_unix"].as_u64());

    let policies = cluster.meshctl_json("a", &["policies"]).unwrap();
    let deny = find(
        &rows(&policies["policies"]),
        "/policy/name",
        "deny-intruder",
    )
    .cloned()
    .unwrap();
    assert_eq!(deny["action"], "DENY");
    let selected: Vec<String> = rows(&deny["selects_on_this_node"])
        .iter()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    assert_eq!(selected, ["client", "intruder"]);
    let apps = find(&rows(&policies["namespaces"]), "/namespace", "apps").cloned();
    assert_eq!(apps.unwrap()["mode"], "PERMISSIVE");

    // The held connection: live, both SPIFFE IDs, bytes growing while it pings.
    let first = cluster
        .eventually(Duration::from_secs(5), || {
            live_to(&cluster, server).is_some()
        })
        .and_then(|_| live_to(&cluster, server))
        .expect("the held connection is listed");
    assert_eq!(first["direction"], "outbound");
    assert_eq!(first["security"], "mutual_tls");
    assert_eq!(first["source_identity"], CLIENT_ID);
    assert_eq!(first["destination_identity"], SERVER_ID);
    assert_eq!(first["result"], "open");
    std::thread::sleep(Duration::from_millis(1200));
    let second = live_to(&cluster, server).expect("still live");
    assert_eq!(second["id"], first["id"]);
    assert!(
        second["bytes_to_server"].as_u64() > first["bytes_to_server"].as_u64(),
        "{first} then {second}"
    );
    assert!(second["duration_ms"].as_u64() > first["duration_ms"].as_u64());

    let bpf = cluster.meshctl_json("a", &["bpf"]).unwrap();
    let connect4 = find(&rows(&bpf["programs"]), "/attach", "cgroup/connect4").cloned();
    assert!(connect4.unwrap()["program_id"].as_u64() > Some(0));
    let enrolled = find(&rows(&bpf["maps"]), "/name", "NM_ENROLLED").cloned();
    assert_eq!(enrolled.unwrap()["entries"], 2);
    assert_eq!(rows(&bpf["enrolled_netns_cookies"]).len(), 2);

    // Log level: set, read back, refuse nonsense with the reason.
    let set = cluster.meshctl_json("a", &["log-level", "debug"]).unwrap();
    assert_eq!(set["level"], "debug");
    assert_eq!(
        cluster.meshctl_json("a", &["log-level"]).unwrap()["level"],
        "debug"
    );
    let bad = cluster
        .meshctl("a", &["log-level", "nodemesh=loud"])
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid level"));
    cluster.meshctl_json("a", &["log-level", "info"]).unwrap();

    // YAML parses to the same document as JSON.
    let yaml = cluster.meshctl("a", &["workloads", "-o", "yaml"]).unwrap();
    let parsed: Value = serde_yaml::from_slice(&yaml.stdout).unwrap();
    assert_eq!(parsed.as_array().map(Vec::len), Some(workloads.len()));

    // Tables: every subcommand, readable in 100 columns, showing the rows above.
    for (args, expected) in [
        (&["status"][..], &["ready", "yes", "2 enrolled of 3"][..]),
        (
            &["workloads"],
            &["client", "namespace_not_enrolled", "15001"],
        ),
        (&["services"], &["apps/web", "apps/web-split"]),
        (&["routes"], &["TCPRoute", "apps/web-v2", "50.0%"]),
        (&["certs"], &[CLIENT_ID, "valid"]),
        (&["policies"], &["apps/deny-intruder", "DENY", "PERMISSIVE"]),
        (&["connections"], &[CLIENT_ID, SERVER_ID, "open"]),
        (&["bpf"], &["cgroup/connect4", "NM_ENROLLED"]),
        (&["log-level"], &["log level: info"]),
        (
            &["trace", "apps/client", "web:80"],
            &["cgroup/connect4", "ALLOW"],
        ),
    ] {
        let out = cluster.meshctl("a", args).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        println!("$ meshctl node {}\n{text}", args.join(" "));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for e in expected {
            assert!(text.contains(e), "{args:?}: `{e}` missing in\n{text}");
        }
        for line in text.lines() {
            assert!(
                line.chars().count() <= 100,
                "{args:?}: line too wide:\n{line}"
            );
        }
    }
    let _ = hold.kill();
    let _ = hold.wait();
}

/// Inbound connections node b recorded after `after` (an id), by destination pod.
fn inbound_since(cluster: &SimCluster, after: u64) -> Vec<Value> {
    cluster
        .closed_connections("b")
        .unwrap()
        .into_iter()
        .filter(|c| c["direction"] == "inbound" && c["id"].as_u64() > Some(after))
        .collect()
}

fn last_id(cluster: &SimCluster, node: &str) -> u64 {
    cluster
        .closed_connections(node)
        .unwrap()
        .iter()
        .filter_map(|c| c["id"].as_u64())
        .max()
        .unwrap_or(0)
}

fn trace(cluster: &SimCluster, pod: &str, to: &str) -> Value {
    cluster.meshctl_json("a", &["trace", pod, to]).unwrap()
}

fn endpoints(t: &Value) -> BTreeSet<String> {
    rows(&t["candidates"])
        .iter()
        .filter_map(|c| c["endpoint"].as_str().map(String::from))
        .collect()
}

#[test]
fn trace_predicts_what_traffic_then_does() {
    let cluster = cluster();
    let _servers = [
        cluster.serve("server", 8080).unwrap(),
        cluster.serve("server-v2", 8080).unwrap(),
        cluster.serve("outsider", 9090).unwrap(),
    ];
    wait_certificates(&cluster, "a", 2);
    let server = cluster.pod("server").addr4(8080);
    let server_v2 = cluster.pod("server-v2").addr4(8080);

    // Allowed: through the split Service, over mTLS, to exactly the two backends.
    let t = trace(&cluster, "apps/client", "web.apps:80");
    assert_eq!(t["outcome"], "ALLOW", "{t}");
    assert_eq!(t["redirect"]["redirected"], true);
    assert_eq!(t["resolution"]["route"]["name"], "web-split");
    let predicted = endpoints(&t);
    assert_eq!(
        predicted,
        BTreeSet::from([server.to_string(), server_v2.to_string()])
    );
    for c in rows(&t["candidates"]) {
        assert_eq!(c["transport"], "hbone_mtls");
        assert_eq!(c["presented_identity"], CLIENT_ID);
    }
    let expected_ids: BTreeSet<String> = rows(&t["candidates"])
        .iter()
        .filter_map(|c| c["expected_identity"].as_str().map(String::from))
        .collect();
    assert_eq!(
        expected_ids,
        BTreeSet::from([SERVER_ID.to_string(), SERVER_V2_ID.to_string()])
    );
    let before = last_id(&cluster, "b");
    let churn = cluster
        .churn("client", cluster.service("web").addr4(), 20)
        .unwrap();
    assert_eq!(churn.failed, 0, "{churn:?}");
    assert!(cluster
        .eventually(Duration::from_secs(5), || inbound_since(&cluster, before)
            .len()
            >= 20)
        .is_some());
    let landed = inbound_since(&cluster, before);
    let reached: BTreeSet<String> = landed
        .iter()
        .filter_map(|c| c["original_dst"].as_str().map(String::from))
        .collect();
    assert_eq!(
        reached, predicted,
        "traffic reached what the trace predicted"
    );
    assert!(landed.iter().all(|c| c["source_identity"] == CLIENT_ID));
    let presented: BTreeSet<String> = landed
        .iter()
        .filter_map(|c| c["destination_identity"].as_str().map(String::from))
        .collect();
    assert_eq!(
        presented.len(),
        2,
        "both identities presented: {presented:?}"
    );

    // Denied: the intruder's identity meets the DENY policy.
    let t = trace(&cluster, "apps/intruder", &server.to_string());
    assert_eq!(t["outcome"], "DENY", "{t}");
    let admission = &t["candidates"][0]["inbound"]["admission"];
    assert_eq!(admission["reason"], "policy_denied");
    assert_eq!(admission["policy"], "apps/deny-intruder");
    let before = last_id(&cluster, "b");
    let r = cluster.transfer("intruder", server, 1024).unwrap();
    assert!(!r.ok, "the intruder got through: {r:?}");
    assert!(cluster
        .eventually(Duration::from_secs(3), || {
            inbound_since(&cluster, before)
                .iter()
                .any(|c| c["result"] == "denied: apps/deny-intruder")
        })
        .is_some());

    // Not enrolled on either side: no redirect, no policy, nothing recorded.
    let outsider = cluster.pod("outsider").addr4(9090);
    let t = trace(&cluster, "plain/bystander", &outsider.to_string());
    assert_eq!(t["outcome"], "ALLOW", "{t}");
    assert_eq!(t["redirect"]["redirected"], false);
    let c = &t["candidates"][0];
    assert_eq!(c["transport"], "plaintext");
    assert_eq!(c["inbound"]["handled_by_mesh"], false);
    let r = cluster.transfer("bystander", outsider, 1024).unwrap();
    assert!(r.ok, "{r:?}");
    for node in ["a", "b"] {
        let seen = cluster.closed_connections(node).unwrap();
        assert!(
            find(&seen, "/original_dst", &outsider.to_string()).is_none(),
            "node {node} proxied a connection the trace said it would not"
        );
    }

    // Plaintext into the mesh: captured on 15006, allowed while PERMISSIVE...
    let t = trace(&cluster, "plain/bystander", &server.to_string());
    assert_eq!(t["outcome"], "ALLOW", "{t}");
    let c = &t["candidates"][0];
    assert_eq!(c["inbound"]["listener"], 15006);
    assert_eq!(c["inbound"]["mode"], "PERMISSIVE");
    let before = last_id(&cluster, "b");
    let r = cluster.transfer("bystander", server, 1024).unwrap();
    assert!(r.ok, "{r:?}");
    assert!(cluster
        .eventually(Duration::from_secs(3), || {
            inbound_since(&cluster, before)
                .iter()
                .any(|c| c["security"] == "none" && c["result"] == "completed")
        })
        .is_some());

    // ...and refused once the namespace is STRICT, while mTLS keeps working.
    cluster.set_namespace_strict("apps", true).unwrap();
    let strict = cluster.eventually(Duration::from_secs(5), || {
        trace(&cluster, "plain/bystander", &server.to_string())["outcome"] == "DENY"
            && cluster.meshctl_json("b", &["policies"]).unwrap()["namespaces"]
                .to_string()
                .contains("STRICT")
    });
    assert!(strict.is_some(), "STRICT never applied");
    let t = trace(&cluster, "plain/bystander", &server.to_string());
    assert_eq!(
        t["candidates"][0]["inbound"]["admission"]["reason"],
        "strict_mtls_plaintext"
    );
    let r = cluster.transfer("bystander", server, 1024).unwrap();
    assert!(!r.ok, "plaintext got through a STRICT namespace: {r:?}");
    assert_eq!(trace(&cluster, "apps/client", "web:80")["outcome"], "ALLOW");
    let r = cluster
        .transfer("client", cluster.service("web").addr4(), 1024)
        .unwrap();
    assert!(r.ok, "{r:?}");

    // A Service port that does not exist is refused by the source's proxy.
    let t = trace(&cluster, "apps/client", "web:81");
    assert_eq!(t["outcome"], "REFUSED");
    let r = cluster
        .transfer(
            "client",
            SocketAddr::new(cluster.service("web").vip4.into(), 81),
            16,
        )
        .unwrap();
    assert!(!r.ok);
}

fn sample<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, name, labels).map(|s| &s.value) {
        Some(Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v)) => *v,
        _ => 0.0,
    }
}

fn scrape(cluster: &SimCluster, node: &str) -> Scrape {
    let text = cluster.scrape_metrics(node).unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

#[test]
fn metrics_and_access_log_count_a_known_mtls_transfer() {
    let cluster = cluster();
    let _server = cluster.serve("server", 8080).unwrap();
    wait_certificates(&cluster, "a", 2);
    const SENT: u64 = 3 << 20;
    let labels = [
        ("source_workload", "client"),
        ("source_workload_namespace", "apps"),
        ("source_principal", CLIENT_ID),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "apps"),
        ("destination_principal", SERVER_ID),
        ("destination_service", "echo.apps.svc.cluster.local"),
        ("destination_service_name", "echo"),
        ("destination_service_namespace", "apps"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let source: Vec<(&str, &str)> = [&labels[..], &[("reporter", "source")]].concat();
    let closed_ok: Vec<(&str, &str)> = [&source[..], &[("response_flags", "-")]].concat();
    let before = scrape(&cluster, "a");
    let r = cluster
        .transfer("client", cluster.service("echo").addr4(), SENT)
        .unwrap();
    assert!(r.ok, "{r:?}");
    let after = scrape(&cluster, "a");
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(delta("nodemesh_tcp_connections_opened_total", &source), 1.0);
    assert_eq!(
        delta("nodemesh_tcp_connections_closed_total", &closed_ok),
        1.0
    );
    for name in [
        "nodemesh_tcp_sent_bytes_total",
        "nodemesh_tcp_received_bytes_total",
    ] {
        let bytes = delta(name, &closed_ok);
        assert!(
            (bytes - SENT as f64).abs() <= SENT as f64 * 0.01,
            "{name}: {bytes} for {SENT} sent"
        );
    }
    // The destination's agent reports the same connection from its side.
    let b = cluster.eventually(Duration::from_secs(3), || {
        let s = scrape(&cluster, "b");
        value(
            &s,
            "nodemesh_tcp_received_bytes_total",
            &[
                ("reporter", "destination"),
                ("source_principal", CLIENT_ID),
                ("destination_principal", SERVER_ID),
                ("connection_security_policy", "mutual_tls"),
            ],
        ) >= SENT as f64 * 0.99
    });
    assert!(b.is_some(), "node b never reported the transfer");

    // Bounded cardinality: more connections between the same workloads add no series.
    let series = |s: &Scrape| {
        s.samples
            .iter()
            .filter(|x| x.metric.starts_with("nodemesh_tcp_"))
            .count()
    };
    cluster
        .churn("client", cluster.service("echo").addr4(), 5)
        .unwrap();
    let first = series(&scrape(&cluster, "a"));
    cluster
        .churn("client", cluster.service("echo").addr4(), 50)
        .unwrap();
    assert_eq!(
        series(&scrape(&cluster, "a")),
        first,
        "a series per connection"
    );

    // A refusal is counted by reason and flagged.
    let r = cluster
        .transfer("intruder", cluster.pod("server").addr4(8080), 16)
        .unwrap();
    assert!(!r.ok);
    let denied = cluster.eventually(Duration::from_secs(3), || {
        let s = scrape(&cluster, "b");
        value(
            &s,
            "nodemesh_connections_refused_total",
            &[("reason", "policy_denied")],
        ) >= 1.0
            && value(
                &s,
                "nodemesh_tcp_connections_closed_total",
                &[
                    ("response_flags", "RBAC"),
                    (
                        "source_principal",
                        "spiffe://cluster.local/ns/apps/sa/intruder",
                    ),
                ],
            ) >= 1.0
    });
    assert!(denied.is_some(), "denial not counted");

    // Agent health.
    let health = scrape(&cluster, "a");
    assert_eq!(
        value(
            &health,
            "nodemesh_bpf_map_entries",
            &[("map", "NM_ENROLLED")]
        ),
        2.0
    );
    assert!(
        value(
            &health,
            "nodemesh_bpf_map_capacity",
            &[("map", "NM_ENROLLED")]
        ) > 2.0
    );
    let expiry = value(
        &health,
        "nodemesh_certificate_expiry_seconds",
        &[("identity", CLIENT_ID)],
    );
    assert!(expiry > 3600.0 && expiry <= 24.0 * 3600.0, "{expiry}");
    assert!(value(&health, "nodemesh_state_updates_total", &[]) >= 1.0);
    assert!(value(&health, "nodemesh_state_last_update_timestamp_seconds", &[]) > 1.6e9);
    assert_eq!(
        value(&health, "nodemesh_workloads", &[("state", "enrolled")]),
        2.0
    );
    assert_eq!(
        value(&health, "nodemesh_workloads", &[("state", "not_enrolled")]),
        1.0
    );

    // The access log: one JSON line for the transfer, named like the metric labels.
    let log = cluster.access_log("a");
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["log"] == "access")
        .collect();
    let entry = lines
        .iter()
        .find(|v| v["sent_bytes"] == SENT)
        .unwrap_or_else(|| panic!("no access log line for the transfer in\n{log}"));
    for (k, v) in &closed_ok {
        assert_eq!(entry[*k], *v, "{k} in {entry}");
    }
    assert_eq!(entry["kind"], "tcp");
    assert_eq!(entry["received_bytes"], SENT);
    assert_eq!(entry["result"], "completed");
    assert!(entry["destination_address"]
        .as_str()
        .is_some_and(|d| d.ends_with(":80")));
}

#[test]
fn meshctl_against_a_dead_admin_address_fails_fast_and_says_what_to_check() {
    let meshctl = host::target_bin("meshctl").unwrap();
    let started = Instant::now();
    let out = std::process::Command::new(&meshctl)
        .args(["node", "status", "--admin-addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    for expected in [
        "127.0.0.1:1",
        "node ",
        "(local)",
        "check that mesh-node runs",
        "--admin-addr",
    ] {
        assert!(err.contains(expected), "`{expected}` missing in: {err}");
    }
    assert!(out.stdout.is_empty());

    // A listener that never answers: the timeout is honoured and named.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let started = Instant::now();
    let out = std::process::Command::new(&meshctl)
        .args(["node", "workloads", "--timeout", "1", "--admin-addr", &addr])
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        err.contains("no answer within 1s") && err.contains(&addr),
        "{err}"
    );
}
