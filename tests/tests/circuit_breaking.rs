//! End-to-end: a DestinationRule's `connectionPool` (Istio's circuit breaking) on the
//! node proxy. The client is on node a, the backend `web-1` on node b (requests cross
//! the nodes over HBONE); the limits are node a's proxy's.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{
    report::HttpReport,
    sim::{ClusterSpec, PodSpec, ServiceSpec, SimCluster},
};
use serde_json::Value;

/// `web` (port 80 → 8080) over web-1 on node b; servers are started by each test.
fn cluster() -> SimCluster {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("web-1", "apps", "b"));
    spec.services = vec![ServiceSpec::new("web", "apps", 80, 8080, &["web-1"])];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    cluster
}

const HTTP_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
    metadata: {name: web, namespace: apps}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  \
    rules: [{backendRefs: [{name: web, port: 80}]}]\n";

fn pool_rule(pool: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web-pool, namespace: apps}}\n\
         spec:\n  host: web\n  trafficPolicy:\n    connectionPool: {pool}\n"
    )
}

fn vip(cluster: &SimCluster) -> SocketAddr {
    cluster.service("web").addr4()
}

/// web:80's backend as node a's admin API shows it.
fn backend_view(cluster: &SimCluster) -> Value {
    let services = cluster.admin("a", "/services").unwrap();
    services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"]["name"] == "web" && s["port"] == 80)
        .map(|s| s["resolution"]["backends"][0].clone())
        .unwrap_or(Value::Null)
}

/// Waits until node a's proxy has the connection pool `check` recognises in force.
fn wait_for_pool(cluster: &SimCluster, check: impl Fn(&Value) -> bool) {
    let applied = cluster.eventually(Duration::from_secs(5), || {
        check(&backend_view(cluster)["connection_pool"])
    });
    assert!(
        applied.is_some(),
        "the connection pool never applied: {}",
        backend_view(cluster)
    );
}

/// A metric's value on node a for web's pool (`kind` when the metric has it).
fn pool_metric(cluster: &SimCluster, name: &str, kind: Option<&str>) -> u64 {
    let text = cluster.scrape_metrics("a").unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| l.contains("destination_service_name=\"web\""))
        .filter(|l| kind.is_none_or(|k| l.contains(&format!("kind=\"{k}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// `count` clients at once, one request each, to `path`.
fn concurrent(cluster: &SimCluster, count: usize, path: &str) -> Vec<HttpReport> {
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..count)
            .map(|_| {
                s.spawn(|| {
                    cluster
                        .http(
                            "client",
                            vip(cluster),
                            "web",
                            path,
                            &["--timeout-ms", "15000"],
                        )
                        .unwrap()
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

fn status_of(r: &HttpReport) -> u16 {
    assert_eq!(r.requests, 1, "{r:?}");
    r.statuses.keys().next().copied().unwrap_or(0)
}

/// The answers' latencies by status, sorted (ms).
fn latencies(reports: &[HttpReport], status: u16) -> Vec<f64> {
    let mut v: Vec<f64> = reports
        .iter()
        .filter(|r| status_of(r) == status)
        .map(|r| r.p50_us as f64 / 1000.0)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The 503s answered by the proxy for a full pool: within this bound of the request
/// being sent (measured: 0.3 to 5 ms on a busy 2-core machine, the 10 ms; the
/// bound leaves room for a loaded CI runner, and is far from the backend's 2 s).
const OVERFLOW_BOUND_MS: f64 = 50.0;

#[test]
fn circuit_breaking_http1_max_pending_requests_answers_the_excess_503_uo_at_once() {
    const N: usize = 3;
    let cluster = cluster();
    let _server = cluster.http_serve("web-1", &[8080]).unwrap();
    let rule = pool_rule(&format!(
        "{{tcp: {{maxConnections: {N}}}, http: {{http1MaxPendingRequests: {N}}}}}"
    ));
    cluster
        .write_manifest("web.yaml", &format!("{HTTP_ROUTE}---\n{rule}"))
        .unwrap();
    wait_for_pool(&cluster, |p| p["max_pending_requests"] == N);

    // 3N at once to a backend that answers after 2 s: N on a connection, N waiting
    // for one, and N answered 503 UO by the proxy at once.
    let reports = concurrent(&cluster, 3 * N, "/?delay_ms=2000");
    let ok = latencies(&reports, 200);
    let overflowed = latencies(&reports, 503);
    eprintln!("200 after {ok:?} ms; 503 after {overflowed:?} ms");
    assert_eq!(ok.len(), 2 * N, "{reports:?}");
    assert_eq!(overflowed.len(), N, "{reports:?}");
    assert!(
        overflowed.iter().all(|ms| *ms < OVERFLOW_BOUND_MS),
        "503s after {overflowed:?} ms"
    );
    // The waiting ones were served after the first ones' 2 s.
    assert!(ok.iter().filter(|ms| **ms >= 3500.0).count() >= N, "{ok:?}");
    let body = reports
        .iter()
        .filter(|r| status_of(r) == 503)
        .flat_map(|r| r.samples.iter())
        .map(|s| s.body.clone())
        .next()
        .unwrap_or_default();
    assert!(body.contains("http1MaxPendingRequests (3)"), "{body}");

    assert_eq!(
        pool_metric(&cluster, "nodemesh_pool_overflows_total", Some("pending")),
        N as u64
    );
    let flagged = cluster
        .request_logs("a")
        .into_iter()
        .filter(|l| l["response_flags"] == "UO" && l["response_code"] == 503)
        .count();
    assert_eq!(flagged, N);
    let uo_requests = cluster
        .scrape_metrics("a")
        .unwrap()
        .lines()
        .filter(|l| {
            l.starts_with("nodemesh_requests_total{") && l.contains("response_flags=\"UO\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert_eq!(uo_requests as usize, N);
    // Everything given back: nothing in use, nothing waiting.
    let pool = &backend_view(&cluster)["pool"];
    assert_eq!(pool["active_requests"], 0, "{pool}");
    assert_eq!(pool["active_connections"], 0, "{pool}");
    assert_eq!(pool["pending_requests"], 0, "{pool}");
    assert_eq!(pool["overflows"]["pending"], N, "{pool}");
    assert_eq!(
        pool_metric(&cluster, "nodemesh_pool_pending_requests", None),
        0
    );
}

#[test]
fn circuit_breaking_http2_max_requests_bounds_requests_in_flight() {
    const N: usize = 2;
    let cluster = cluster();
    let _server = cluster.http_serve("web-1", &[8080]).unwrap();
    let rule = pool_rule(&format!("{{http: {{http2MaxRequests: {N}}}}}"));
    cluster
        .write_manifest("web.yaml", &format!("{HTTP_ROUTE}---\n{rule}"))
        .unwrap();
    wait_for_pool(&cluster, |p| p["max_requests"] == N);
    let reports = concurrent(&cluster, 3 * N, "/?delay_ms=2000");
    let overflowed = latencies(&reports, 503);
    eprintln!("503 after {overflowed:?} ms");
    assert_eq!(latencies(&reports, 200).len(), N, "{reports:?}");
    assert_eq!(overflowed.len(), 2 * N, "{reports:?}");
    assert!(overflowed.iter().all(|ms| *ms < OVERFLOW_BOUND_MS));
    assert_eq!(
        pool_metric(&cluster, "nodemesh_pool_overflows_total", Some("requests")),
        2 * N as u64
    );
    // Once they are done, the full capacity is back.
    let again = concurrent(&cluster, N, "/");
    assert!(again.iter().all(|r| status_of(r) == 200), "{again:?}");
}

#[test]
fn circuit_breaking_max_requests_per_connection_gives_the_backend_a_new_connection_every_n() {
    let cluster = cluster();
    let _server = cluster.http_serve("web-1", &[8080]).unwrap();
    cluster.write_manifest("web.yaml", HTTP_ROUTE).unwrap();
    let routed = cluster.eventually(Duration::from_secs(5), || {
        !backend_view(&cluster).is_null()
            && cluster
                .http("client", vip(&cluster), "web", "/", &[])
                .is_ok_and(|r| r.statuses.get(&200) == Some(&1))
    });
    assert!(routed.is_some());
    let run = || {
        cluster
            .http("client", vip(&cluster), "web", "/", &["--count", "100"])
            .unwrap()
    };
    // Without a limit the proxy keeps one upstream connection alive for all of them.
    let kept = run();
    assert_eq!(kept.statuses.get(&200), Some(&100), "{kept:?}");
    assert!(kept.peers.len() <= 2, "{:?}", kept.peers);

    let rule = pool_rule("{http: {maxRequestsPerConnection: 10}}");
    cluster
        .write_manifest("web.yaml", &format!("{HTTP_ROUTE}---\n{rule}"))
        .unwrap();
    wait_for_pool(&cluster, |p| p["max_requests_per_connection"] == 10);
    let limited = run();
    assert_eq!(limited.statuses.get(&200), Some(&100), "{limited:?}");
    // The backend saw a new connection every 10 requests (the first may still be
    // one kept from before the rule).
    let per_connection: Vec<u64> = limited.peers.values().copied().collect();
    assert!(
        (10..=11).contains(&limited.peers.len()),
        "{:?}",
        limited.peers
    );
    assert!(
        per_connection.iter().all(|n| *n <= 10),
        "{per_connection:?}"
    );
}

#[test]
fn circuit_breaking_tcp_max_connections_refuses_the_excess_and_counts_it() {
    const N: usize = 2;
    let cluster = cluster();
    let _server = cluster.serve("web-1", 8080).unwrap();
    cluster
        .write_manifest(
            "web.yaml",
            &pool_rule(&format!("{{tcp: {{maxConnections: {N}}}}}")),
        )
        .unwrap();
    wait_for_pool(&cluster, |p| p["max_connections"] == N);
    let active = || pool_metric(&cluster, "nodemesh_pool_active", Some("connections"));
    let mut held: Vec<_> = (0..N)
        .map(|_| cluster.hold("client", vip(&cluster), 60).unwrap())
        .collect();
    let open = cluster.eventually(Duration::from_secs(5), || active() == N as u64);
    assert!(open.is_some(), "{} connections open", active());

    // The N+1th is refused (reset), counted, and logged with UO.
    let started = Instant::now();
    let refused = cluster.transfer("client", vip(&cluster), 1000).unwrap();
    assert!(!refused.ok, "{refused:?}");
    eprintln!("refused after {:?}", started.elapsed());
    assert_eq!(
        cluster
            .refused_count("a", "connection_pool_overflow")
            .unwrap(),
        1
    );
    assert_eq!(
        pool_metric(
            &cluster,
            "nodemesh_pool_overflows_total",
            Some("connections")
        ),
        1
    );
    let closed = cluster.closed_connections("a").unwrap();
    assert!(
        closed
            .iter()
            .any(|c| c["result"] == "refused: connection_pool_overflow"),
        "{closed:?}"
    );
    assert_eq!(
        backend_view(&cluster)["pool"]["overflows"]["connections"],
        1
    );

    // One closes: a new connection is accepted.
    let mut first = held.remove(0);
    let _ = first.kill();
    let _ = first.wait();
    let freed = cluster.eventually(Duration::from_secs(5), || active() == N as u64 - 1);
    assert!(freed.is_some(), "{} connections open", active());
    let accepted = cluster.transfer("client", vip(&cluster), 1000).unwrap();
    assert!(accepted.ok, "{accepted:?}");
    for mut h in held {
        let _ = h.kill();
        let _ = h.wait();
    }
}

/// Istio's pairing for retries: a VirtualService retrying 5xx.
const RETRYING_ROUTE: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: apps}\n\
    spec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    retries: {attempts: 3, retryOn: 5xx}\n";

/// What web-1 has served through the Service (`GET /__seen`, asked of the pod directly).
fn served_by_web(cluster: &SimCluster) -> u64 {
    let r = cluster
        .http(
            "client",
            cluster.pod("web-1").addr4(8080),
            "probe",
            "/__seen",
            &[],
        )
        .unwrap();
    let sample = r.samples.first().map(|s| s.echo()).unwrap_or_default();
    let hosts: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(sample["hosts"].clone()).unwrap_or_default();
    hosts
        .iter()
        .filter(|(host, _)| host.as_str() != "probe")
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn circuit_breaking_max_retries_bounds_retries_outstanding_and_the_rest_get_the_last_answer() {
    const N: u64 = 6;
    let cluster = cluster();
    // Every answer is a 503, after 300 ms: each request would be tried 1 + 3 times.
    let _server = cluster
        .http_serve_status_slow("web-1", 8080, 503, 300)
        .unwrap();
    let rule = pool_rule("{http: {maxRetries: 1}}");
    cluster
        .write_manifest("web.yaml", &format!("{RETRYING_ROUTE}---\n{rule}"))
        .unwrap();
    wait_for_pool(&cluster, |p| p["max_retries"] == 1);

    let reports = concurrent(&cluster, N as usize, "/");
    assert!(reports.iter().all(|r| status_of(r) == 503), "{reports:?}");
    // The N first attempts were all in flight at once; of their retries only one may be
    // outstanding at a time, so one request retries (3 times, about 1 s) while the
    // others get their first answer. Without the bound the backend would see 4N.
    let seen = served_by_web(&cluster);
    let retried = cluster
        .scrape_metrics("a")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("nodemesh_request_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    let overflowed = pool_metric(&cluster, "nodemesh_pool_overflows_total", Some("retries"));
    eprintln!("backend saw {seen}; retries made {retried}, not made {overflowed}");
    assert_eq!(seen, N + retried, "every attempt reached the backend");
    assert!(
        seen <= N + 6,
        "{seen} attempts for {N} requests (4N = {})",
        4 * N
    );
    assert!(retried >= 1, "the bound leaves room for one retry");
    // Each request not retried was turned away once, counted and flagged UO.
    assert!(overflowed >= N - 2, "{overflowed} retries not made");
    let logs = cluster.request_logs("a");
    let flagged: Vec<_> = logs
        .iter()
        .filter(|l| l["response_flags"] == "UO" && l["response_code"] == 503)
        .collect();
    assert_eq!(flagged.len() as u64, overflowed, "{logs:?}");
    // The request that retried ran out of attempts (URX), not into the bound.
    assert!(
        logs.iter()
            .any(|l| l["response_flags"] == "URX" && l["retries"] == 3),
        "{logs:?}"
    );
    // Everything given back.
    let pool = &backend_view(&cluster)["pool"];
    assert_eq!(pool["active_retries"], 0, "{pool}");
    assert_eq!(pool["overflows"]["retries"], overflowed, "{pool}");
    assert_eq!(
        pool_metric(&cluster, "nodemesh_pool_active", Some("retries")),
        0
    );
}

#[test]
fn circuit_breaking_tcp_connect_timeout_applies_to_l4_tunnels() {
    let cluster = cluster();
    let _server = cluster.serve("web-1", 8080).unwrap();
    cluster
        .write_manifest("web.yaml", &pool_rule("{tcp: {connectTimeout: 50ms}}"))
        .unwrap();
    wait_for_pool(&cluster, |p| p["connect_timeout_ms"] == 50);
    // web-1's node goes dark for tunnels: SYNs to its HBONE port are lost, so the
    // tunnel's connect hangs (the agent's own connect timeout is 5 s).
    cluster.drop_syns("web-1", 15008).unwrap();
    let started = Instant::now();
    let failed = cluster.transfer("client", vip(&cluster), 1000).unwrap();
    let took = started.elapsed();
    eprintln!("failed after {took:?}: {failed:?}");
    assert!(!failed.ok, "{failed:?}");
    assert!(took < Duration::from_secs(1), "failed after {took:?}");
    let closed = cluster.closed_connections("a").unwrap();
    assert!(
        closed.iter().any(|c| c["result"]
            .as_str()
            .is_some_and(|r| r.starts_with("hbone_failed") && r.contains("timed out after 50ms"))),
        "{closed:?}"
    );
}

#[test]
fn circuit_breaking_max_concurrent_streams_spreads_http2_requests_over_connections() {
    const N: usize = 4;
    let cluster = cluster();
    let _server = cluster.http_serve("web-1", &[8080]).unwrap();
    let rule = pool_rule("{http: {maxConcurrentStreams: 2}}");
    cluster
        .write_manifest("web.yaml", &format!("{HTTP_ROUTE}---\n{rule}"))
        .unwrap();
    wait_for_pool(&cluster, |p| p["max_concurrent_streams"] == 2);
    // N HTTP/2 requests in flight at once (1 s each): the proxy multiplexes at most 2
    // on one upstream connection. Each upstream connection reaches web-1 as a tunnel
    // of its own, so the server's peers count them.
    let reports: Vec<HttpReport> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..N)
            .map(|_| {
                s.spawn(|| {
                    cluster
                        .http(
                            "client",
                            vip(&cluster),
                            "web",
                            "/?delay_ms=1000",
                            &["--http2", "--timeout-ms", "15000"],
                        )
                        .unwrap()
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert!(reports.iter().all(|r| status_of(r) == 200), "{reports:?}");
    let mut per_connection = std::collections::BTreeMap::<String, u64>::new();
    for r in &reports {
        for (peer, n) in &r.peers {
            *per_connection.entry(peer.clone()).or_default() += n;
        }
    }
    eprintln!("answers by upstream connection: {per_connection:?}");
    assert_eq!(per_connection.values().sum::<u64>(), N as u64);
    assert!(per_connection.len() >= N / 2, "{per_connection:?}");
    assert!(
        per_connection.values().all(|n| *n <= 2),
        "{per_connection:?}"
    );
}
