//! End-to-end: a weighted split holds for each client, not only for the node. Two
//! client pods on node a take turns (one connection or request each, strictly
//! alternating, the worst case for state shared by the node: a 90/10 or 50/50 cycle
//! has an even period, so one client would always land on the same phase of it) and
//! each client's own share must match the weights. L4 (TCPRoute) and L7 (HTTPRoute).

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use mesh_tests::sim::{ClusterSpec, PodSpec, Process, RouteSpec, ServiceSpec, SimCluster};

/// Connections or requests per client and split.
const PER_CLIENT: u64 = 200;
/// How far a client's share may be from the weight (points).
const TOLERANCE: f64 = 0.03;
const CLIENTS: [&str; 2] = ["client", "client2"];

/// Node a: `client`, `client2`. Node b: `server-v1`, `server-v2`, each a TCP server on
/// 8080 and an HTTP echo server on 9090. `web*` route to 8080, `echo*` to 9090.
fn cluster() -> (SimCluster, Vec<Process>) {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("client2", "apps", "a"));
    for v in ["server-v1", "server-v2"] {
        spec.pods.push(PodSpec::new(v, "apps", "b"));
    }
    spec.services = vec![
        ServiceSpec::new("web", "apps", 80, 8080, &["server-v1"]),
        ServiceSpec::new("web-v1", "apps", 80, 8080, &["server-v1"]),
        ServiceSpec::new("web-v2", "apps", 80, 8080, &["server-v2"]),
        ServiceSpec::new("echo", "apps", 80, 9090, &["server-v1"]),
        ServiceSpec::new("echo-v1", "apps", 80, 9090, &["server-v1"]),
        ServiceSpec::new("echo-v2", "apps", 80, 9090, &["server-v2"]),
    ];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let mut servers = Vec::new();
    for p in ["server-v1", "server-v2"] {
        servers.push(cluster.serve(p, 8080).unwrap());
        servers.push(cluster.http_serve(p, &[9090]).unwrap());
    }
    (cluster, servers)
}

fn tcp_split(v1: u32, v2: u32) -> Vec<RouteSpec> {
    vec![RouteSpec {
        name: "web-split".into(),
        namespace: "apps".into(),
        parent: "web".into(),
        port: 80,
        backends: vec![("web-v1".into(), v1), ("web-v2".into(), v2)],
    }]
}

fn http_split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: echo-split\n  namespace: apps\n\
         spec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: echo\n  rules:\n  - backendRefs:\n\
         \x20   - {{name: echo-v1, port: 80, weight: {v1}}}\n    - {{name: echo-v2, port: 80, weight: {v2}}}\n"
    )
}

/// Outbound connections node a recorded to `vip`, by (client pod, server pod), read
/// from where each connection was actually sent (its upstream address).
fn tcp_landed(cluster: &SimCluster, vip: SocketAddr) -> HashMap<(String, String), u64> {
    let servers: HashMap<String, &str> = ["server-v1", "server-v2"]
        .iter()
        .map(|p| (cluster.pod(p).addr4(8080).to_string(), *p))
        .collect();
    let mut counts = HashMap::new();
    for c in cluster.closed_connections("a").unwrap() {
        if c["direction"] != "outbound" || c["original_dst"] != vip.to_string() {
            continue;
        }
        let client = c["pod"]["name"].as_str().unwrap_or("").to_string();
        let server = c["upstream"]
            .as_str()
            .and_then(|u| servers.get(u))
            .unwrap_or(&"?")
            .to_string();
        *counts.entry((client, server)).or_default() += 1;
    }
    counts
}

/// Backend weights node a currently resolves for `service` port 80.
fn resolved_weights(cluster: &SimCluster, service: &str) -> Vec<(String, u64)> {
    let services = cluster.admin("a", "/services").unwrap();
    let entry = services
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"]["name"] == service && s["port"] == 80)
        .cloned()
        .unwrap_or_default();
    entry["resolution"]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let name = b["service"]["name"].as_str().unwrap_or("").to_string();
            (name, b["weight"].as_u64().unwrap_or(0))
        })
        .collect()
}

fn assert_share(kind: &str, client: &str, v1: u64, v2: u64, want: f64) {
    let share = v1 as f64 / (v1 + v2) as f64;
    eprintln!(
        "{kind} {client}: v1 {v1}, v2 {v2} ({:.1}% v1)",
        share * 100.0
    );
    assert!(
        (share - want).abs() <= TOLERANCE,
        "{kind}: {client} got {:.1}% v1 (v1 {v1}, v2 {v2}), wanted {:.0}% ± {:.0} points",
        share * 100.0,
        want * 100.0,
        TOLERANCE * 100.0
    );
}

#[test]
fn each_client_on_a_node_gets_the_weighted_share_over_l4_and_l7() {
    let (cluster, _servers) = cluster();

    // L4: TCPRoute, one connection per client in turn.
    let web = cluster.service("web").addr4();
    for (v1w, v2w) in [(90, 10), (50, 50)] {
        cluster.set_routes(tcp_split(v1w, v2w)).unwrap();
        let want = vec![
            ("web-v1".to_string(), u64::from(v1w)),
            ("web-v2".to_string(), u64::from(v2w)),
        ];
        let applied = cluster.eventually(Duration::from_secs(5), || {
            resolved_weights(&cluster, "web") == want
        });
        assert!(applied.is_some(), "the {v1w}/{v2w} TCPRoute never applied");
        let before = tcp_landed(&cluster, web);
        for _ in 0..PER_CLIENT {
            for client in CLIENTS {
                let churn = cluster.churn(client, web, 1).unwrap();
                assert_eq!(churn.failed, 0, "{client}: {churn:?}");
            }
        }
        let total = PER_CLIENT * CLIENTS.len() as u64;
        let recorded = |m: &HashMap<(String, String), u64>| m.values().sum::<u64>();
        let all = cluster.eventually(Duration::from_secs(3), || {
            recorded(&tcp_landed(&cluster, web)) >= recorded(&before) + total
        });
        let after = tcp_landed(&cluster, web);
        assert!(
            all.is_some(),
            "node a recorded {} of {total} connections",
            recorded(&after) - recorded(&before)
        );
        let delta = |client: &str, server: &str| {
            let k = (client.to_string(), server.to_string());
            after.get(&k).copied().unwrap_or(0) - before.get(&k).copied().unwrap_or(0)
        };
        for client in CLIENTS {
            let (v1, v2) = (delta(client, "server-v1"), delta(client, "server-v2"));
            assert_eq!(v1 + v2, PER_CLIENT, "{client}: every connection landed");
            assert_share("L4", client, v1, v2, f64::from(v1w) / 100.0);
        }
    }

    // L7: HTTPRoute, one request (on its own connection) per client in turn.
    let echo = cluster.service("echo").addr4();
    for (v1w, v2w) in [(90, 10), (50, 50)] {
        cluster
            .write_manifest("httproutes.yaml", &http_split(v1w, v2w))
            .unwrap();
        let want_v1 = u64::from(v1w) * 20 / 100;
        let applied = cluster.eventually(Duration::from_secs(5), || {
            let r = cluster
                .http("client", echo, "echo", "/", &["--count", "20"])
                .unwrap();
            r.pods.get("server-v1") == Some(&want_v1)
        });
        assert!(applied.is_some(), "the {v1w}/{v2w} HTTPRoute never applied");
        let mut served: HashMap<(&str, String), u64> = HashMap::new();
        for _ in 0..PER_CLIENT {
            for client in CLIENTS {
                let r = cluster
                    .http(client, echo, "echo", "/", &["--count", "1"])
                    .unwrap();
                assert_eq!(r.errors, 0, "{client}: {r:?}");
                for (pod, n) in r.pods {
                    *served.entry((client, pod)).or_default() += n;
                }
            }
        }
        for client in CLIENTS {
            let get = |p: &str| served.get(&(client, p.to_string())).copied().unwrap_or(0);
            let (v1, v2) = (get("server-v1"), get("server-v2"));
            assert_eq!(v1 + v2, PER_CLIENT, "{client}: {served:?}");
            assert_share("L7", client, v1, v2, f64::from(v1w) / 100.0);
        }
    }
}
