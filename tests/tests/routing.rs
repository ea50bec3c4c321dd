//! End-to-end: Services, EndpointSlices and TCPRoutes (GAMMA) on the node proxy.
//! Where each connection landed is read from the destination node's inbound records
//! (which pod's proxy saw it), independently of the source proxy's own claims.

use std::{collections::HashMap, time::Duration};

use mesh_tests::sim::{host::scaled, ClusterSpec, PodSpec, RouteSpec, ServiceSpec, SimCluster};
use serde_json::Value;

const CONNECTIONS: u64 = 2000;

fn spec_with_versions() -> ClusterSpec {
    let mut spec = ClusterSpec::two_nodes();
    for v in ["v1", "v2", "v3"] {
        spec.pods
            .push(PodSpec::new(&format!("server-{v}"), "apps", "b"));
    }
    spec.services = vec![
        ServiceSpec::new("web", "apps", 80, 8080, &["server-v1"]),
        ServiceSpec::new("web-v1", "apps", 80, 8080, &["server-v1"]),
        ServiceSpec::new("web-v2", "apps", 80, 8080, &["server-v2"]),
        ServiceSpec::new("web-v3", "apps", 80, 8080, &["server-v3"]),
    ];
    spec
}

fn split(weights: &[(&str, u32)]) -> Vec<RouteSpec> {
    vec![RouteSpec {
        name: "web-split".into(),
        namespace: "apps".into(),
        parent: "web".into(),
        port: 80,
        backends: weights.iter().map(|(s, w)| (s.to_string(), *w)).collect(),
    }]
}

/// Inbound connections node b recorded, by destination pod.
fn landed(cluster: &SimCluster) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for c in cluster.closed_connections("b").unwrap() {
        if c["direction"] == "inbound" {
            *counts
                .entry(c["pod"]["name"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
    }
    counts
}

fn delta(after: &HashMap<String, u64>, before: &HashMap<String, u64>, pod: &str) -> u64 {
    after.get(pod).copied().unwrap_or(0) - before.get(pod).copied().unwrap_or(0)
}

/// `landed` once node b has recorded at least `connections` more than in `before`
/// (polled for up to 3 s, scaled): it writes a record when its side closes, a moment
/// after the client's, so a count read at once may miss the last ones.
fn landed_since(
    cluster: &SimCluster,
    before: &HashMap<String, u64>,
    connections: u64,
) -> HashMap<String, u64> {
    let more =
        |after: &HashMap<String, u64>| after.values().sum::<u64>() - before.values().sum::<u64>();
    let after = cluster.eventually(Duration::from_secs(3), || {
        more(&landed(cluster)) >= connections
    });
    let after_all = landed(cluster);
    assert!(
        after.is_some(),
        "node b recorded {} of {connections} connections",
        more(&after_all)
    );
    after_all
}

/// Backend weights node a currently resolves for `service` port 80.
fn resolved_weights(cluster: &SimCluster, service: &str) -> Vec<(String, u64)> {
    let services = cluster.admin("a", "/services").unwrap();
    let entry = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"]["name"] == service && s["port"] == 80)
        .cloned()
        .unwrap_or(Value::Null);
    entry["resolution"]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["service"]["name"].as_str().unwrap_or("").to_string(),
                b["weight"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn serve_versions(cluster: &SimCluster) -> Vec<mesh_tests::sim::Process> {
    ["server-v1", "server-v2", "server-v3"]
        .iter()
        .map(|p| cluster.serve(p, 8080).unwrap())
        .collect()
}

#[test]
fn weighted_splits_land_within_two_points_and_zero_weight_gets_nothing() {
    let mut spec = spec_with_versions();
    spec.routes = split(&[("web-v1", 90), ("web-v2", 10), ("web-v3", 0)]);
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _servers = serve_versions(&cluster);
    let vip = cluster.service("web").addr4();

    for (weights, v1_share) in [
        (&[("web-v1", 90), ("web-v2", 10), ("web-v3", 0)][..], 0.90),
        (&[("web-v1", 99), ("web-v2", 1), ("web-v3", 0)][..], 0.99),
    ] {
        cluster.set_routes(split(weights)).unwrap();
        let expected: Vec<(String, u64)> = weights
            .iter()
            .map(|(s, w)| (s.to_string(), u64::from(*w)))
            .collect();
        let applied = cluster.eventually(Duration::from_secs(3), || {
            resolved_weights(&cluster, "web") == expected
        });
        assert!(
            applied.is_some(),
            "route never applied: {:?}",
            resolved_weights(&cluster, "web")
        );

        let before = landed(&cluster);
        let churn = cluster.churn("client", vip, CONNECTIONS).unwrap();
        assert_eq!(churn.failed, 0, "{churn:?}");
        // Node b writes a record when its side closes, a moment after the client's.
        let total = |after: &HashMap<String, u64>| {
            ["server-v1", "server-v2", "server-v3"]
                .iter()
                .map(|p| delta(after, &before, p))
                .sum::<u64>()
        };
        let all_closed = cluster.eventually(Duration::from_secs(3), || {
            total(&landed(&cluster)) == CONNECTIONS
        });
        assert!(
            all_closed.is_some(),
            "node b recorded {} of {CONNECTIONS}",
            total(&landed(&cluster))
        );
        let after = landed(&cluster);
        let (v1, v2, v3) = (
            delta(&after, &before, "server-v1"),
            delta(&after, &before, "server-v2"),
            delta(&after, &before, "server-v3"),
        );
        assert_eq!(
            v1 + v2 + v3,
            CONNECTIONS,
            "every connection reached a backend"
        );
        let share = v1 as f64 / CONNECTIONS as f64;
        assert!(
            (share - v1_share).abs() <= 0.02,
            "v1 got {share:.3}, wanted {v1_share} ± 0.02 (v1 {v1}, v2 {v2})"
        );
        assert_eq!(v3, 0, "a 0-weight backend gets nothing");
    }
}

#[test]
fn an_endpoint_turning_unready_gets_no_new_connections_within_a_second() {
    let mut spec = spec_with_versions();
    spec.routes = split(&[("web-v1", 50), ("web-v2", 50)]);
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _servers = serve_versions(&cluster);
    let vip = cluster.service("web").addr4();
    let before = landed(&cluster);
    assert_eq!(cluster.churn("client", vip, 20).unwrap().failed, 0);
    assert!(
        delta(&landed_since(&cluster, &before, 20), &before, "server-v2") > 0,
        "v2 serves while ready"
    );

    cluster
        .set_endpoint_ready("web-v2", "server-v2", false)
        .unwrap();
    let took = cluster.eventually(Duration::from_secs(5), || {
        let before = landed(&cluster);
        let churn = cluster.churn("client", vip, 10).unwrap();
        churn.failed == 0 && delta(&landed_since(&cluster, &before, 10), &before, "server-v2") == 0
    });
    let took = took.expect("the unready endpoint kept getting connections");
    eprintln!("unready endpoint stopped receiving after {took:?}");
    assert!(took < scaled(Duration::from_secs(1)), "took {took:?}");

    // With no ready endpoint left, connections are refused at once and counted.
    cluster
        .set_endpoint_ready("web-v1", "server-v1", false)
        .unwrap();
    let refused = cluster.eventually(Duration::from_secs(3), || {
        let r = cluster.transfer("client", vip, 16).unwrap();
        !r.ok && Duration::from_micros(r.elapsed_us) < scaled(Duration::from_secs(1))
    });
    assert!(
        refused.is_some(),
        "not refused quickly without ready endpoints"
    );
    let (_, metrics) = cluster.admin_raw("a", "GET", "/stats/prometheus").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("nodemesh_connections_refused_total{reason=\"no_ready_endpoint\"}")),
        "{metrics}"
    );
}

#[test]
fn a_removed_service_is_refused_quickly_and_pod_ips_never_take_a_route() {
    let mut spec = spec_with_versions();
    spec.routes = split(&[("web-v2", 1)]);
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _servers = serve_versions(&cluster);

    // The route sends the Service to v2 — over IPv6 too — but the pod IP of v1 is v1.
    for vip in [
        cluster.service("web").addr4(),
        cluster.service("web").addr6(),
    ] {
        let r = cluster.transfer("client", vip, 4096).unwrap();
        assert!(r.ok, "{r:?}");
    }
    let direct = cluster.pod("server-v1").addr4(8080);
    let before = landed(&cluster);
    assert!(cluster.transfer("client", direct, 4096).unwrap().ok);
    assert_eq!(
        delta(&landed_since(&cluster, &before, 1), &before, "server-v1"),
        1,
        "pod IP reached that pod"
    );
    let out = cluster
        .closed_connections_with("a", |c| c["original_dst"] == direct.to_string())
        .unwrap();
    let rec = out
        .iter()
        .rev()
        .find(|c| c["original_dst"] == direct.to_string())
        .unwrap();
    assert!(rec["service"].is_null(), "{rec:#}");
    let v6 = out
        .iter()
        .find(|c| c["original_dst"] == cluster.service("web").addr6().to_string())
        .expect("IPv6 VIP recorded");
    assert_eq!(v6["backend"], "apps/web-v2");
    assert_eq!(
        v6["upstream"],
        cluster.pod("server-v2").addr6(8080).to_string()
    );

    let solo = cluster.service("web-v3").addr4();
    assert!(cluster.transfer("client", solo, 16).unwrap().ok);
    cluster.remove_service("web-v3").unwrap();
    let refused = cluster.eventually(Duration::from_secs(3), || {
        let r = cluster.transfer("client", solo, 16).unwrap();
        !r.ok && Duration::from_micros(r.elapsed_us) < scaled(Duration::from_secs(1))
    });
    assert!(
        refused.is_some(),
        "the removed Service's VIP was not refused quickly"
    );
    // The client can see its connection fail a moment before the agent has recorded
    // the refusal: wait for a record of this VIP that did not complete (the earlier,
    // completed one is in the list too), then say what it was.
    let not_completed =
        |c: &Value| c["original_dst"] == solo.to_string() && c["result"] != "completed";
    let rec = cluster
        .closed_connections_with("a", not_completed)
        .unwrap()
        .into_iter()
        .rev()
        .find(not_completed)
        .unwrap();
    assert_eq!(rec["result"], "refused: unknown_service", "{rec:#}");
}
