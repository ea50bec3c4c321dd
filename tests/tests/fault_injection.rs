//! End-to-end: a VirtualService route's `fault` (abort and delay, by percentage) and
//! `mirror` (a copy of each request to another Service, its answer dropped) on the node
//! proxy, the copies bounded by the mirror's own DestinationRule connection pool. The
//! client pod is on node a; `web` and its mirror `web-mirror` on node b.
//! The echo server counts what it served by host (`GET /__seen`).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use mesh_tests::{
    report::HttpReport,
    sim::{ClusterSpec, PodSpec, Process, ServiceSpec, SimCluster},
};

fn cluster() -> (SimCluster, Vec<Process>) {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("web", "apps", "b"));
    spec.pods.push(PodSpec::new("web-copy", "apps", "b"));
    spec.services = vec![
        ServiceSpec::new("web", "apps", 80, 8080, &["web"]),
        ServiceSpec::new("web-mirror", "apps", 80, 8080, &["web-copy"]),
    ];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let servers = ["web", "web-copy"]
        .iter()
        .map(|p| cluster.http_serve(p, &[8080]).unwrap())
        .collect();
    (cluster, servers)
}

fn vip(cluster: &SimCluster) -> SocketAddr {
    cluster.service("web").addr4()
}

fn get(cluster: &SimCluster, count: u64) -> HttpReport {
    let count = count.to_string();
    cluster
        .http("client", vip(cluster), "web", "/", &["--count", &count])
        .unwrap()
}

fn route(extra: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: apps}}\n\
         spec:\n  hosts: [web]\n  http:\n  - route:\n    - destination: {{host: web}}\n{extra}"
    )
}

/// What the mirror's pod has served, by host.
fn seen_by_copy(cluster: &SimCluster) -> BTreeMap<String, u64> {
    let r = cluster
        .http(
            "client",
            cluster.pod("web-copy").addr4(8080),
            "probe",
            "/__seen",
            &[],
        )
        .unwrap();
    let sample = r.samples.first().map(|s| s.echo()).unwrap_or_default();
    serde_json::from_value(sample["hosts"].clone()).unwrap_or_default()
}

fn metric_lines(cluster: &SimCluster, name: &str) -> Vec<String> {
    let (_, text) = cluster.admin_raw("a", "GET", "/stats/prometheus").unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .map(String::from)
        .collect()
}

#[test]
fn fault_abort_answers_its_percentage_and_delay_adds_its_time() {
    let (cluster, _servers) = cluster();
    let abort = route("    fault: {abort: {httpStatus: 418, percentage: {value: 50}}}\n");
    cluster.write_manifest("web-vs.yaml", &abort).unwrap();
    let applied = cluster.eventually(Duration::from_secs(5), || {
        get(&cluster, 40).statuses.contains_key(&418)
    });
    assert!(applied.is_some(), "the abort never applied");
    let r = get(&cluster, 2000);
    assert_eq!(r.errors, 0, "{r:?}");
    let aborted = *r.statuses.get(&418).unwrap_or(&0) as f64 / r.requests as f64;
    let served = *r.statuses.get(&200).unwrap_or(&0);
    eprintln!(
        "abort 50%: {:.1}% of {} requests answered 418",
        aborted * 100.0,
        r.requests
    );
    assert!((aborted - 0.5).abs() <= 0.04, "{r:?}");
    assert_eq!(
        served + r.statuses.get(&418).unwrap_or(&0),
        r.requests,
        "{r:?}"
    );
    // The backend saw only the requests that were not aborted.
    assert_eq!(r.pods.get("web").copied().unwrap_or(0), served, "{r:?}");
    // The access log's flag is FI, counted under Istio's labels.
    assert!(
        metric_lines(&cluster, "nodemesh_requests_total")
            .iter()
            .any(|l| l.contains("response_code=\"418\"") && l.contains("response_flags=\"FI\"")),
        "no FI-flagged 418 in nodemesh_requests_total"
    );

    // A 300 ms delay for every request: each takes at least that, and no request fails.
    let delay = route("    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}\n");
    cluster.write_manifest("web-vs.yaml", &delay).unwrap();
    let applied = cluster.eventually(Duration::from_secs(5), || {
        let r = get(&cluster, 1);
        r.statuses.get(&200) == Some(&1) && r.p50_us >= 300_000
    });
    assert!(applied.is_some(), "the delay never applied");
    let r = get(&cluster, 10);
    eprintln!("delay 300ms: p50 {} µs, p99 {} µs", r.p50_us, r.p99_us);
    assert_eq!(r.statuses.get(&200), Some(&10), "{r:?}");
    assert!(r.p50_us >= 300_000 && r.p50_us < 1_300_000, "{r:?}");
    // Without the fault the same requests are fast again.
    cluster.write_manifest("web-vs.yaml", &route("")).unwrap();
    let fast = cluster.eventually(Duration::from_secs(5), || get(&cluster, 5).p99_us < 150_000);
    assert!(
        fast.is_some(),
        "requests stayed slow after the delay was removed"
    );
}

#[test]
fn mirror_copies_requests_to_another_service_and_the_client_sees_only_the_primary() {
    let (cluster, _servers) = cluster();
    let mirrored = route("    mirror: {host: web-mirror}\n    mirrorPercentage: {value: 100}\n");
    cluster.write_manifest("web-vs.yaml", &mirrored).unwrap();
    let shadow = |seen: &BTreeMap<String, u64>| -> u64 {
        seen.iter()
            .filter(|(host, _)| host.starts_with("web-shadow"))
            .map(|(_, n)| n)
            .sum()
    };
    let applied = cluster.eventually(Duration::from_secs(5), || {
        get(&cluster, 1);
        shadow(&seen_by_copy(&cluster)) > 0
    });
    assert!(applied.is_some(), "no copy ever reached the mirror");
    let before = shadow(&seen_by_copy(&cluster));
    let r = get(&cluster, 200);
    assert_eq!(r.errors, 0, "{r:?}");
    assert_eq!(r.statuses.get(&200), Some(&200), "{r:?}");
    assert_eq!(
        r.pods.get("web"),
        Some(&200),
        "answers come from the primary: {r:?}"
    );
    // Copies are sent in the background: wait for them all, then check none doubled.
    let mut copies = 0;
    cluster.eventually(Duration::from_secs(10), || {
        copies = shadow(&seen_by_copy(&cluster)) - before;
        copies >= 200
    });
    std::thread::sleep(Duration::from_millis(200));
    let copies_settled = shadow(&seen_by_copy(&cluster)) - before;
    assert_eq!(copies_settled, 200, "each request copied exactly once");
    let seen = seen_by_copy(&cluster);
    assert!(
        seen.keys()
            .all(|h| h.starts_with("web-shadow") || h.starts_with("probe")),
        "the mirror saw a request that was not a copy: {seen:?}"
    );

    // A quarter: 2,000 requests, 25 ± 4 % copied.
    let quarter = route("    mirror: {host: web-mirror}\n    mirrorPercentage: {value: 25}\n");
    cluster.write_manifest("web-vs.yaml", &quarter).unwrap();
    let applied = cluster.eventually(Duration::from_secs(5), || {
        let before = shadow(&seen_by_copy(&cluster));
        get(&cluster, 200);
        std::thread::sleep(Duration::from_millis(300));
        let got = shadow(&seen_by_copy(&cluster)) - before;
        got > 0 && got < 120
    });
    assert!(applied.is_some(), "the 25% mirror never applied");
    std::thread::sleep(Duration::from_millis(300));
    let before = shadow(&seen_by_copy(&cluster));
    let r = get(&cluster, 2000);
    assert_eq!(r.statuses.get(&200), Some(&2000), "{r:?}");
    let mut share = 0.0;
    cluster.eventually(Duration::from_secs(5), || {
        let got = shadow(&seen_by_copy(&cluster)) - before;
        share = got as f64 / 2000.0;
        (share - 0.25).abs() <= 0.04
    });
    eprintln!("mirror 25%: {:.1}% of 2000 requests copied", share * 100.0);
    assert!((share - 0.25).abs() <= 0.04, "copied {share}");
    assert!(
        metric_lines(&cluster, "nodemesh_mirrored_requests_total")
            .iter()
            .any(|l| l.contains("outcome=\"answered\"")),
        "copies not counted"
    );
}

#[test]
fn mirror_copies_are_bounded_by_the_mirror_backends_connection_pool() {
    let (cluster, _servers) = cluster();
    // The mirror admits 2 requests at once and queues 1: a burst of 20 slow requests
    // gets at most 3 copies through; the rest are dropped and counted, and the clients
    // see nothing of it.
    let manifest = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {{name: web-mirror, namespace: apps}}\n\
         spec:\n  host: web-mirror\n  trafficPolicy:\n    connectionPool:\n\
         \x20     http: {{http2MaxRequests: 2, http1MaxPendingRequests: 1}}\n",
        route("    mirror: {host: web-mirror}\n    mirrorPercentage: {value: 100}\n")
    );
    cluster.write_manifest("web-vs.yaml", &manifest).unwrap();
    let shadow = || -> u64 {
        seen_by_copy(&cluster)
            .iter()
            .filter(|(host, _)| host.starts_with("web-shadow"))
            .map(|(_, n)| n)
            .sum()
    };
    let pool_applied = || {
        let services = cluster.admin("a", "/services").unwrap_or_default();
        services.as_array().into_iter().flatten().any(|s| {
            s["service"]["name"] == "web-mirror"
                && s["resolution"]["backends"][0]["connection_pool"]["max_requests"] == 2
        })
    };
    let applied = cluster.eventually(Duration::from_secs(5), || {
        get(&cluster, 1);
        pool_applied() && shadow() > 0
    });
    assert!(applied.is_some(), "the mirror and its pool never applied");
    std::thread::sleep(Duration::from_millis(300));
    let before = shadow();
    let reports: Vec<HttpReport> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..20)
            .map(|_| {
                s.spawn(|| {
                    cluster
                        .http(
                            "client",
                            vip(&cluster),
                            "web",
                            "/?delay_ms=2000",
                            &["--timeout-ms", "15000"],
                        )
                        .unwrap()
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for r in &reports {
        assert_eq!(
            r.statuses.get(&200),
            Some(&1),
            "the client saw the mirror: {r:?}"
        );
    }
    // The admitted copies take 2 s each at the mirror: wait for them.
    std::thread::sleep(Duration::from_millis(4500));
    let copies = shadow() - before;
    eprintln!("20 concurrent requests: {copies} copies reached the mirror");
    assert!((1..=3).contains(&copies), "copies past the pool: {copies}");
    let dropped: u64 = metric_lines(&cluster, "nodemesh_mirrored_requests_total")
        .iter()
        .filter(|l| l.contains("outcome=\"pool_overflow\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum();
    assert_eq!(dropped, 20 - copies, "every copy is counted");
    assert!(
        metric_lines(&cluster, "nodemesh_pool_overflows_total")
            .iter()
            .any(|l| l.contains("web-mirror")),
        "the mirror's pool counts its overflows"
    );
}
