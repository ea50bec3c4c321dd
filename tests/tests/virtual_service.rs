//! End-to-end: Istio's VirtualService on the node proxy — the seeds' canary shape by
//! host destinations (two Services), matches, a broken VirtualService reported by name
//! while the rest works, and an HTTPRoute winning the same Service port. The client
//! pod is on node a, the echo servers on node b (`x-served-by: <pod>`).

use std::{net::SocketAddr, time::Duration};

use mesh_tests::{
    report::HttpReport,
    sim::{ClusterSpec, PodSpec, Process, ServiceSpec, SimCluster},
};

/// reviews → v1 only; reviews-v1 / reviews-v2 → one each (namespace `apps`).
fn cluster() -> (SimCluster, Vec<Process>) {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("reviews-v1", "apps", "b"));
    spec.pods.push(PodSpec::new("reviews-v2", "apps", "b"));
    spec.services = vec![
        ServiceSpec::new("reviews", "apps", 80, 8080, &["reviews-v1"]),
        ServiceSpec::new("reviews-v1", "apps", 80, 8080, &["reviews-v1"]),
        ServiceSpec::new("reviews-v2", "apps", 80, 8080, &["reviews-v2"]),
    ];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let servers = ["reviews-v1", "reviews-v2"]
        .iter()
        .map(|p| cluster.http_serve(p, &[8080]).unwrap())
        .collect();
    (cluster, servers)
}

fn vip(cluster: &SimCluster) -> SocketAddr {
    cluster.service("reviews").addr4()
}

fn get(cluster: &SimCluster, path: &str, extra: &[&str]) -> HttpReport {
    cluster
        .http("client", vip(cluster), "reviews", path, extra)
        .unwrap()
}

/// The seeds' canary with host destinations, as Istio's docs write it (v1alpha3).
fn canary(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {{name: reviews-route, namespace: apps}}\n\
         spec:\n  hosts: [reviews.apps.svc.cluster.local]\n  http:\n  - route:\n\
         \x20   - destination: {{host: reviews-v1.apps.svc.cluster.local}}\n      weight: {v1}\n\
         \x20   - destination: {{host: reviews-v2.apps.svc.cluster.local}}\n      weight: {v2}\n"
    )
}

fn share(r: &HttpReport, pod: &str) -> f64 {
    *r.pods.get(pod).unwrap_or(&0) as f64 / r.requests.max(1) as f64
}

#[test]
fn the_seeds_canary_splits_90_10_80_20_and_99_1_within_two_points() {
    let (cluster, _servers) = cluster();
    for (v1, v2) in [(90, 10), (80, 20), (99, 1)] {
        cluster
            .write_manifest("reviews-vs.yaml", &canary(v1, v2))
            .unwrap();
        // Applied once 100 requests of one connection split exactly as asked.
        let applied = cluster.eventually(Duration::from_secs(5), || {
            let r = get(&cluster, "/", &["--count", "100"]);
            r.pods.get("reviews-v1") == Some(&u64::from(v1))
        });
        assert!(
            applied.is_some(),
            "the {v1}/{v2} VirtualService never applied"
        );
        let r = get(&cluster, "/", &["--count", "2000"]);
        assert_eq!(r.errors, 0, "{r:?}");
        let (got1, got2) = (share(&r, "reviews-v1"), share(&r, "reviews-v2"));
        eprintln!(
            "{v1}/{v2} over 2000 requests: {:.1}% / {:.1}%",
            got1 * 100.0,
            got2 * 100.0
        );
        assert!(
            (got1 - f64::from(v1) / 100.0).abs() <= 0.02
                && (got2 - f64::from(v2) / 100.0).abs() <= 0.02,
            "{r:?}"
        );
    }
}

/// The seeds' canary by subset, verbatim but for the namespace: a DestinationRule
/// defines subsets v1 and v2 of `reviews` by the pods' `version` label, and the
/// VirtualService splits between them.
fn subset_canary(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {{name: reviews-route, namespace: apps}}\n\
         spec:\n  hosts: [reviews.apps.svc.cluster.local]\n  http:\n  - route:\n\
         \x20   - destination: {{host: reviews.apps.svc.cluster.local, subset: v1}}\n      weight: {v1}\n\
         \x20   - destination: {{host: reviews.apps.svc.cluster.local, subset: v2}}\n      weight: {v2}\n\
         ---\napiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {{name: reviews-destination, namespace: apps}}\n\
         spec:\n  host: reviews.apps.svc.cluster.local\n  subsets:\n\
         \x20 - name: v1\n    labels: {{version: v1}}\n\
         \x20 - name: v2\n    labels: {{version: v2}}\n"
    )
}

#[test]
fn the_seeds_canary_by_subset_splits_90_10_80_20_and_99_1_within_two_points() {
    let mut spec = ClusterSpec::two_nodes();
    for (pod, version) in [("reviews-v1", "v1"), ("reviews-v2", "v2")] {
        let mut p = PodSpec::new(pod, "apps", "b");
        p.labels.push(("version".into(), version.into()));
        spec.pods.push(p);
    }
    // One Service over both versions: only the subsets tell them apart.
    spec.services = vec![ServiceSpec::new(
        "reviews",
        "apps",
        80,
        8080,
        &["reviews-v1", "reviews-v2"],
    )];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _servers: Vec<Process> = ["reviews-v1", "reviews-v2"]
        .iter()
        .map(|p| cluster.http_serve(p, &[8080]).unwrap())
        .collect();
    for (v1, v2) in [(90, 10), (80, 20), (99, 1)] {
        cluster
            .write_manifest("reviews-canary.yaml", &subset_canary(v1, v2))
            .unwrap();
        let applied = cluster.eventually(Duration::from_secs(5), || {
            let r = get(&cluster, "/", &["--count", "100"]);
            r.pods.get("reviews-v1") == Some(&u64::from(v1))
        });
        assert!(
            applied.is_some(),
            "the {v1}/{v2} subset canary never applied"
        );
        let r = get(&cluster, "/", &["--count", "2000"]);
        assert_eq!(r.errors, 0, "{r:?}");
        let (got1, got2) = (share(&r, "reviews-v1"), share(&r, "reviews-v2"));
        eprintln!(
            "subsets {v1}/{v2} over 2000 requests: {:.1}% / {:.1}%",
            got1 * 100.0,
            got2 * 100.0
        );
        assert!(
            (got1 - f64::from(v1) / 100.0).abs() <= 0.02
                && (got2 - f64::from(v2) / 100.0).abs() <= 0.02,
            "{r:?}"
        );
    }
    // meshctl shows each subset destination with the endpoints it resolves to.
    let routes = cluster.meshctl_json("a", &["routes"]).unwrap();
    let vs = routes
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["kind"] == "VirtualService" && r["route"]["name"] == "reviews-route")
        .unwrap_or_else(|| panic!("no VirtualService in {routes:#}"));
    let ready: Vec<u64> = vs["rules"][0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b["ready_endpoints"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(ready, [1, 1], "{vs:#}");
}

#[test]
fn matches_in_order_a_broken_route_reported_and_an_httproute_winning_the_port() {
    let (cluster, _servers) = cluster();
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: apps}\n\
        spec:\n  hosts: [reviews]\n  http:\n\
        \x20 - match: [{uri: {regex: \"(\"}}]\n    route: [{destination: {host: reviews-v2}}]\n\
        \x20 - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews-v2}}]\n\
        \x20   headers: {response: {set: {x-route: jason}}}\n\
        \x20 - match: [{uri: {prefix: /api}}]\n    rewrite: {uri: /v2}\n    route: [{destination: {host: reviews-v2}}]\n\
        \x20 - match: [{uri: {prefix: /broken}}]\n    timeout: soon\n    route: [{destination: {host: reviews-v2}}]\n\
        \x20 - match: [{uri: {prefix: /canary}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n\
        \x20 - route: [{destination: {host: reviews-v1}}]\n";
    cluster.write_manifest("reviews-vs.yaml", vs).unwrap();
    let applied = cluster.eventually(Duration::from_secs(5), || {
        let r = get(&cluster, "/", &["--header", "end-user: jason"]);
        r.pods.get("reviews-v2") == Some(&1)
    });
    assert!(applied.is_some(), "the VirtualService never applied");

    let jason = get(&cluster, "/", &["--header", "end-user: jason"]);
    assert_eq!(
        jason.samples[0].headers.get("x-route").map(String::as_str),
        Some("jason")
    );
    let other = get(&cluster, "/", &[]);
    assert_eq!(other.pods.get("reviews-v1"), Some(&1), "{other:?}");
    let api = get(&cluster, "/api/users", &[]);
    assert_eq!(api.pods.get("reviews-v2"), Some(&1), "{api:?}");
    assert_eq!(api.samples[0].echo()["path"], "/v2/users", "{api:?}");
    // The broken route answers 500; a subset fails closed with 503; the rest serves.
    assert_eq!(get(&cluster, "/broken", &[]).statuses.get(&500), Some(&1));
    assert_eq!(get(&cluster, "/canary", &[]).statuses.get(&503), Some(&1));
    let log = cluster.agent_log("a");
    for want in [
        "VirtualService apps/reviews http[0] match[0]",
        "VirtualService apps/reviews http[3]: timeout",
        "subset `v2`",
    ] {
        assert!(log.contains(want), "agent log lacks {want:?}");
    }
    let metrics = cluster.scrape_metrics("a").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nodemesh_route_config_problems_total") && !l.ends_with(" 0")),
        "problems not counted"
    );

    // An HTTPRoute on the same Service port wins; meshctl shows the VirtualService lost it.
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews-gamma, namespace: apps}\n\
        spec:\n  parentRefs: [{group: \"\", kind: Service, name: reviews, port: 80}]\n  rules:\n  - backendRefs: [{name: reviews-v2, port: 80}]\n";
    cluster.write_manifest("reviews-route.yaml", route).unwrap();
    let won = cluster.eventually(Duration::from_secs(5), || {
        get(&cluster, "/", &[]).pods.get("reviews-v2") == Some(&1)
    });
    assert!(won.is_some(), "the HTTPRoute did not take the port over");
    let routes = cluster.meshctl_json("a", &["routes"]).unwrap();
    let vs = routes
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["kind"] == "VirtualService" && r["route"]["name"] == "reviews")
        .unwrap_or_else(|| panic!("no VirtualService in {routes:#}"));
    assert!(
        vs["not_applied"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n == "apps/reviews:80: HTTPRoute apps/reviews-gamma wins"),
        "{vs:#}"
    );
    let out = cluster.meshctl("a", &["routes"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NOT APPLIED"), "{text}");
}

#[test]
fn tcp_routes_split_connections_by_weight() {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("db-v1", "apps", "b"));
    spec.pods.push(PodSpec::new("db-v2", "apps", "b"));
    spec.services = vec![
        ServiceSpec::new("db", "apps", 9000, 9000, &["db-v1"]),
        ServiceSpec::new("db-v1", "apps", 9000, 9000, &["db-v1"]),
        ServiceSpec::new("db-v2", "apps", 9000, 9000, &["db-v2"]),
    ];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _servers: Vec<Process> = ["db-v1", "db-v2"]
        .iter()
        .map(|p| cluster.serve(p, 9000).unwrap())
        .collect();
    let vs = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: db, namespace: apps}\n\
        spec:\n  hosts: [db.apps.svc.cluster.local]\n  tcp:\n  - match: [{port: 9000}]\n    route:\n\
        \x20   - {destination: {host: db-v1, port: {number: 9000}}, weight: 80}\n\
        \x20   - {destination: {host: db-v2, port: {number: 9000}}, weight: 20}\n";
    cluster.write_manifest("db-vs.yaml", vs).unwrap();
    let db = cluster.service("db").addr4();
    let v2_addr = cluster.pod("db-v2").addr4(9000).to_string();
    // Landed connections by server, from node a's records of where each one went.
    let landed = |pod_addr: &str| {
        cluster
            .closed_connections("a")
            .unwrap()
            .iter()
            .filter(|c| c["original_dst"] == db.to_string() && c["upstream"] == pod_addr)
            .count()
    };
    let mut probed = 0;
    let applied = cluster.eventually(Duration::from_secs(5), || {
        assert_eq!(cluster.churn("client", db, 10).unwrap().failed, 0);
        probed += 10;
        landed(&v2_addr) > 0
    });
    assert!(applied.is_some(), "the tcp route never applied");
    let v1_addr = cluster.pod("db-v1").addr4(9000).to_string();
    // Every probing connection recorded (a record comes just after its connection
    // ends) before the baseline is read, so that none lands in the measured ones.
    let settled = cluster.eventually(Duration::from_secs(2), || {
        landed(&v1_addr) + landed(&v2_addr) >= probed
    });
    assert!(
        settled.is_some(),
        "not every probing connection was recorded"
    );
    let (v1_before, v2_before) = (landed(&v1_addr), landed(&v2_addr));
    let churn = cluster.churn("client", db, 500).unwrap();
    assert_eq!(churn.failed, 0, "{churn:?}");
    let all = cluster.eventually(Duration::from_secs(3), || {
        landed(&v1_addr) + landed(&v2_addr) >= v1_before + v2_before + 500
    });
    assert!(all.is_some(), "not every connection was recorded");
    let (v1, v2) = (landed(&v1_addr) - v1_before, landed(&v2_addr) - v2_before);
    eprintln!("tcp 80/20 over 500 connections: v1 {v1}, v2 {v2}");
    let share = v1 as f64 / (v1 + v2) as f64;
    assert!((share - 0.8).abs() <= 0.02, "v1 {v1}, v2 {v2}");
}
