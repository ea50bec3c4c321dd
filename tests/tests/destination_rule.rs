//! End-to-end: Istio's DestinationRule on the node proxy — outlier detection on HTTP
//! answers and on refused connections, its cap, load-balancing policies, and a broken
//! rule reported by name while the rest keeps working. The client is on node a; the
//! three `web` endpoints are on node b (requests cross the nodes over HBONE).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{
    report::HttpReport,
    sim::{ClusterSpec, PodSpec, Process, ServiceSpec, SimCluster},
};
use serde_json::Value;

const PODS: [&str; 3] = ["web-1", "web-2", "web-3"];

/// `web` (port 80 → 8080) over web-1..3 on node b, HTTP-routed (an HTTPRoute names
/// it, so each request is balanced); servers are started by each test.
fn cluster() -> SimCluster {
    let mut spec = ClusterSpec::two_nodes();
    for (i, p) in PODS.iter().enumerate() {
        let mut pod = PodSpec::new(p, "apps", "b");
        pod.labels.push(("version".into(), format!("v{}", i + 1)));
        spec.pods.push(pod);
    }
    spec.services = vec![ServiceSpec::new("web", "apps", 80, 8080, &PODS)];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    cluster
}

const HTTP_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
    metadata: {name: web, namespace: apps}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  \
    rules: [{backendRefs: [{name: web, port: 80}]}]\n";

fn vip(cluster: &SimCluster) -> SocketAddr {
    cluster.service("web").addr4()
}

/// `count` requests from the client on one kept-alive connection.
fn requests(cluster: &SimCluster, count: u64) -> HttpReport {
    let count = count.to_string();
    cluster
        .http("client", vip(cluster), "web", "/", &["--count", &count])
        .unwrap()
}

/// The admin view of web:80's backend on node a: (endpoint → its outlier state).
fn outliers(cluster: &SimCluster) -> BTreeMap<String, Value> {
    let services = cluster.admin("a", "/services").unwrap();
    let web = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"]["name"] == "web" && s["port"] == 80)
        .cloned()
        .unwrap();
    let backend = &web["resolution"]["backends"][0];
    backend["outliers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|o| (o["endpoint"].as_str().unwrap().to_string(), o))
        .collect()
}

fn endpoint(cluster: &SimCluster, pod: &str) -> String {
    cluster.pod(pod).addr4(8080).to_string()
}

fn served(report: &HttpReport, pod: &str) -> u64 {
    report.pods.get(pod).copied().unwrap_or(0)
}

/// Milliseconds from now until the endpoint's ejection ends (None: not ejected).
fn ejected_for_ms(o: &Value) -> Option<i64> {
    if o["ejected"] != true {
        return None;
    }
    let until = o["ejected_until_unix_ms"].as_i64()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    Some(until - now)
}

fn servers(cluster: &SimCluster, failing: &[&str]) -> Vec<Process> {
    PODS.iter()
        .map(|p| {
            if failing.contains(p) {
                cluster.http_serve_status(p, 8080, 500).unwrap()
            } else {
                cluster.http_serve(p, &[8080]).unwrap()
            }
        })
        .collect()
}

/// The seeds' circuit breaker, with times short enough for a test.
fn outlier_rule(base: &str, max_percent: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {{name: web-outliers, namespace: apps}}\n\
         spec:\n  host: web\n  trafficPolicy:\n    outlierDetection: {{consecutive5xxErrors: 3, interval: 1s, \
         baseEjectionTime: {base}, maxEjectionPercent: {max_percent}}}\n"
    )
}

/// Waits until the agent on node a shows web's outlier policy in force.
fn wait_for_policy(cluster: &SimCluster) {
    let applied = cluster.eventually(Duration::from_secs(5), || {
        let services = cluster.admin("a", "/services").unwrap();
        services.as_array().unwrap().iter().any(|s| {
            s["service"]["name"] == "web"
                && !s["resolution"]["backends"][0]["outlier_detection"].is_null()
        })
    });
    assert!(applied.is_some(), "the DestinationRule never applied");
}

#[test]
fn destination_rule_a_failing_endpoint_is_ejected_gets_nothing_and_comes_back_for_twice_as_long() {
    let cluster = cluster();
    let _servers = servers(&cluster, &["web-3"]);
    cluster
        .write_manifest(
            "web.yaml",
            &format!("{HTTP_ROUTE}---\n{}", outlier_rule("2s", 100)),
        )
        .unwrap();
    wait_for_policy(&cluster);
    let web3 = endpoint(&cluster, "web-3");

    // Round-robin over 3: web-3 answers 500 to its 3rd request of 9, and is ejected.
    let started = Instant::now();
    let first = requests(&cluster, 9);
    assert_eq!(served(&first, "web-3"), 3, "{first:?}");
    let ejected_at = Instant::now();
    // The figure: what clients saw between web-3's first failure and its ejection.
    assert_eq!(first.statuses.get(&500), Some(&3), "{first:?}");
    eprintln!(
        "web-3 ejected after {} failed requests, within {:?} of the first request",
        first.statuses.get(&500).unwrap_or(&0),
        ejected_at - started
    );
    let state = outliers(&cluster);
    let left = ejected_for_ms(&state[&web3]).expect("web-3 is ejected");
    assert!((1000..=2100).contains(&left), "ejected for {left}ms more");
    assert_eq!(state[&web3]["ejections"], 1);

    // While ejected: no requests at all, and every answer is a 200.
    let during = requests(&cluster, 60);
    assert_eq!(served(&during, "web-3"), 0, "{during:?}");
    assert_eq!(during.statuses.get(&200), Some(&60), "{during:?}");
    let metrics = cluster.scrape_metrics("a").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nodemesh_outlier_ejections_total{")
                && l.contains("reason=\"consecutive_5xx\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );

    // It comes back after baseEjectionTime: its answers reach the client again.
    let back = cluster.eventually(Duration::from_secs(6), || {
        served(&requests(&cluster, 3), "web-3") > 0
    });
    assert!(back.is_some(), "web-3 never came back");
    let away = ejected_at.elapsed();
    assert!(away >= Duration::from_millis(1900), "back after {away:?}");

    // Failing again, it is ejected again, now for 2 × 2s.
    let again = cluster.eventually(Duration::from_secs(5), || {
        requests(&cluster, 3);
        outliers(&cluster)[&web3]["ejections"] == 2
    });
    assert!(
        again.is_some(),
        "no second ejection: {:?}",
        outliers(&cluster)
    );
    let second_at = Instant::now();
    let left = ejected_for_ms(&outliers(&cluster)[&web3]).expect("ejected again");
    assert!(
        (3000..=4100).contains(&left),
        "second ejection: {left}ms more"
    );
    // Still nothing for web-3 past the first ejection's length.
    while second_at.elapsed() < Duration::from_millis(2500) {
        let r = requests(&cluster, 6);
        assert_eq!(served(&r, "web-3"), 0, "{r:?}");
    }
}

#[test]
fn destination_rule_max_ejection_percent_caps_ejections_when_two_of_three_fail() {
    let cluster = cluster();
    let _servers = servers(&cluster, &["web-2", "web-3"]);
    cluster
        .write_manifest(
            "web.yaml",
            &format!("{HTTP_ROUTE}---\n{}", outlier_rule("30s", 50)),
        )
        .unwrap();
    wait_for_policy(&cluster);
    let report = requests(&cluster, 60);
    let state = outliers(&cluster);
    let ejected: Vec<&String> = state
        .iter()
        .filter(|(_, o)| o["ejected"] == true)
        .map(|(e, _)| e)
        .collect();
    assert_eq!(
        ejected.len(),
        1,
        "50% of 3 endpoints: one at a time: {state:?}"
    );
    // The one failing endpoint left in rotation keeps getting its share.
    let failing_served = served(&report, "web-2") + served(&report, "web-3");
    assert!(failing_served > 10, "{report:?}");
}

#[test]
fn destination_rule_an_endpoint_that_refuses_connections_is_ejected_for_tcp_traffic() {
    let cluster = cluster();
    // web-3 has no server: its connections are refused (no HTTPRoute: plain L4).
    let _servers: Vec<Process> = ["web-1", "web-2"]
        .iter()
        .map(|p| cluster.serve(p, 8080).unwrap())
        .collect();
    cluster
        .write_manifest(
            "web.yaml",
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: apps}\n\
             spec:\n  host: web.apps.svc.cluster.local\n  trafficPolicy:\n    outlierDetection: \
             {consecutiveLocalOriginFailures: 2, baseEjectionTime: 60s, maxEjectionPercent: 100}\n",
        )
        .unwrap();
    wait_for_policy(&cluster);
    let web3 = endpoint(&cluster, "web-3");
    // Connections round-robin; after web-3 refused two, it gets no more.
    let churn = cluster.churn("client", vip(&cluster), 12).unwrap();
    let state = outliers(&cluster);
    assert_eq!(state[&web3]["ejected"], true, "{state:?} {churn:?}");
    assert_eq!(
        state[&web3]["last_reason"],
        "consecutive_local_origin_failure"
    );
    let after = cluster.churn("client", vip(&cluster), 30).unwrap();
    assert_eq!(
        after.failed, 0,
        "no connection fails once web-3 is ejected: {after:?}"
    );
}

#[test]
fn destination_rule_random_and_least_request_pick_plausibly() {
    let cluster = cluster();
    let mut servers = servers(&cluster, &[]);
    let rule = |simple: &str| {
        format!(
            "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {{name: web, namespace: apps}}\n\
             spec:\n  host: web.apps\n  trafficPolicy:\n    loadBalancer: {{simple: {simple}}}\n"
        )
    };
    cluster
        .write_manifest("web.yaml", &format!("{HTTP_ROUTE}---\n{}", rule("RANDOM")))
        .unwrap();
    let random = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .admin("a", "/services")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|s| {
                s["service"]["name"] == "web"
                    && s["resolution"]["backends"][0]["load_balancer"] == "RANDOM"
            })
    });
    assert!(random.is_some());
    let report = requests(&cluster, 600);
    for p in PODS {
        let n = served(&report, p);
        assert!((120..=280).contains(&n), "{p}: {n} of 600: {report:?}");
    }

    // LEAST_CONN (= LEAST_REQUEST): a slow endpoint (web-3 now takes 150ms per
    // answer) gets clearly fewer of many concurrent requests than the fast ones.
    drop(servers.pop());
    servers.push(cluster.http_serve_slow("web-3", 8080, 150).unwrap());
    cluster
        .write_manifest(
            "web.yaml",
            &format!("{HTTP_ROUTE}---\n{}", rule("LEAST_CONN")),
        )
        .unwrap();
    let least = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .admin("a", "/services")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|s| {
                s["service"]["name"] == "web"
                    && s["resolution"]["backends"][0]["load_balancer"] == "LEAST_REQUEST"
            })
    });
    assert!(least.is_some());
    // 6 clients at once, 40 requests each: round-robin would give web-3 a third.
    let reports: Vec<HttpReport> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| scope.spawn(|| requests(&cluster, 40)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: u64 = reports.iter().map(|r| r.requests).sum();
    let slow: u64 = reports.iter().map(|r| served(r, "web-3")).sum();
    assert_eq!(total, 240);
    assert!(
        slow * 100 < total * 20,
        "the slow endpoint got {slow} of {total}: {reports:?}"
    );
}

#[test]
fn destination_rule_a_broken_destination_rule_is_reported_by_name_and_the_rest_keeps_working() {
    let cluster = cluster();
    let _servers = servers(&cluster, &[]);
    // The broken rule sits in the same file as the route: the file still applies.
    let broken = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
        metadata: {name: web-broken, namespace: apps}\nspec:\n  host: web\n  trafficPolicy:\n    \
        loadBalancer: {simple: FASTEST}\n    outlierDetection: {interval: 10 seconds}\n";
    cluster
        .write_manifest("web.yaml", &format!("{HTTP_ROUTE}---\n{broken}"))
        .unwrap();
    let reported = cluster.eventually(Duration::from_secs(5), || {
        cluster.agent_log("a").contains("apps/web-broken")
    });
    assert!(reported.is_some(), "{}", cluster.agent_log("a"));
    let log = cluster.agent_log("a");
    assert!(
        log.contains("FASTEST") && log.contains("unknown_value"),
        "{log}"
    );

    let services = cluster.admin("a", "/services").unwrap();
    let web = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"]["name"] == "web" && s["port"] == 80)
        .cloned()
        .unwrap();
    let dr = &web["destination_rule"];
    assert_eq!(dr["rule"]["name"], "web-broken");
    assert_eq!(dr["applied"], false, "{dr}");
    let reasons: Vec<&str> = dr["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["reason"].as_str())
        .collect();
    assert_eq!(reasons, ["unknown_value", "bad_duration"], "{dr}");
    let metrics = cluster.scrape_metrics("a").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nodemesh_config_problems_total{")
                && l.contains("kind=\"DestinationRule\"")
                && l.contains("reason=\"bad_duration\"")),
        "{metrics}"
    );

    // The Service keeps working under its default policy (round-robin), the route too.
    let report = requests(&cluster, 30);
    assert_eq!(report.statuses.get(&200), Some(&30), "{report:?}");
    for p in PODS {
        assert_eq!(served(&report, p), 10, "{report:?}");
    }
    let out = cluster.meshctl("a", &["services"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // (The table wraps long cells.)
    assert!(
        text.contains("DestinationRule apps/web-broken") && text.contains("(not applied)"),
        "{text}"
    );
}

#[test]
fn destination_rule_with_retries_clients_see_no_errors_while_a_failing_endpoint_is_ejected() {
    let cluster = cluster();
    let _servers = servers(&cluster, &["web-3"]);
    // Istio's pairing: a VirtualService retries 5xx, the DestinationRule ejects.
    let retries = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: apps}\n\
        spec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    retries: {attempts: 2, retryOn: 5xx}\n";
    cluster
        .write_manifest(
            "web.yaml",
            &format!("{retries}---\n{}", outlier_rule("30s", 100)),
        )
        .unwrap();
    wait_for_policy(&cluster);
    // Both in force before the first request (a request would start the ejection).
    let routed = cluster.eventually(Duration::from_secs(5), || {
        let routes = cluster.meshctl_json("a", &["routes"]).unwrap_or_default();
        routes.as_array().into_iter().flatten().any(|r| {
            r["kind"] == "VirtualService"
                && r["route"]["name"] == "web"
                && r["not_applied"].as_array().is_none_or(|n| n.is_empty())
        })
    });
    assert!(routed.is_some(), "the VirtualService never applied");
    let r = requests(&cluster, 300);
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(
        r.statuses.get(&200),
        Some(&300),
        "clients saw errors: {r:?}"
    );
    assert_eq!(served(&r, "web-3"), 0, "a 500 reached the client: {r:?}");
    // The failing endpoint was ejected, and retries hid its failures meanwhile.
    let state = outliers(&cluster);
    let web3 = endpoint(&cluster, "web-3");
    assert!(ejected_for_ms(&state[&web3]).is_some(), "{state:?}");
    let metrics = cluster.scrape_metrics("a").unwrap();
    let retried: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("nodemesh_request_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        (1.0..=10.0).contains(&retried),
        "retries: {retried} (each of web-3's failures before its ejection is retried once)"
    );
}
