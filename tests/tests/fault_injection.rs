//! End-to-end: a VirtualService route's `fault` (abort and delay, by percentage) and
//! `mirror` (a copy of each request to another Service, its answer dropped) on the node
//! proxy. The client pod is on node a; `web` and its mirror `web-mirror` on node b.
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
