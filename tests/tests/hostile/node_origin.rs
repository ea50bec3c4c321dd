//! What comes from the node itself against what only looks like it. On bridge CNIs (the
//! bridge plugin, flannel) the node reaches its pods from the bridge's address, not from
//! its own (`status.hostIP`); and kube-proxy masquerades NodePort/hostPort traffic to
//! that same bridge address. kubelet's probes must be answered in STRICT and under an
//! ALLOW policy that admits nobody else; NodePort traffic must still be captured and
//! judged. The difference is the socket (the node's own, or a forwarded packet), never
//! the address.

use std::{net::SocketAddr, time::Duration};

use mesh_tests::{
    report::{HttpReport, TransferReport},
    sim::{ClusterSpec, SimCluster},
};
use serde_json::Value;

/// kubelet-style probes per address family and phase.
const PROBES: usize = 10;
const NODE_PORT: u16 = 30080;

#[derive(Debug, Default)]
struct Probes {
    answered: usize,
    failed: Vec<String>,
    /// The probe's source address as the app saw it.
    peers: Vec<String>,
    slowest_ms: u64,
}

/// `count` HTTP probes to `dst` as kubelet sends them: a process in the node's own
/// network namespace and cgroup, a fresh connection each.
fn probe(cluster: &SimCluster, node: &str, dst: SocketAddr, count: usize) -> Probes {
    let placement = cluster.node_placement(node);
    let dst = dst.to_string();
    let mut result = Probes::default();
    for _ in 0..count {
        let args = [
            "http",
            "--connect",
            &dst,
            "--host",
            &dst,
            "--path",
            "/healthz",
            "-H",
            "user-agent: kube-probe/1.36",
            "--timeout-ms",
            "3000",
        ];
        match cluster.testapp_report::<HttpReport>(&placement, &args) {
            Ok(r) if r.statuses.get(&200) == Some(&1) => {
                result.answered += 1;
                result.slowest_ms = result.slowest_ms.max(r.elapsed_ms);
                if let Some(s) = r.samples.first() {
                    result
                        .peers
                        .push(s.echo()["peer"].as_str().unwrap_or("").into());
                }
            }
            Ok(r) => result.failed.push(format!("{r:?}")),
            Err(e) => result.failed.push(e.to_string()),
        }
    }
    result
}

fn ip_of(addr: &str) -> String {
    addr.parse::<SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

/// `count` probes to each family of the server; checks each was answered by the app
/// itself, from the bridge's address, without passing through the proxy. Returns the
/// slowest probe's time.
fn probes_answered(cluster: &SimCluster, phase: &str, count: usize) -> u64 {
    let node = cluster.node("b");
    let server = cluster.pod("server");
    // Connections the proxy recorded from the bridge's addresses (other connections,
    // e.g. the client's of an earlier phase, may be recorded at any moment).
    let from_bridge = || {
        let bridge = [node.ipv4.to_string(), node.ipv6.to_string()];
        cluster
            .closed_connections("b")
            .unwrap()
            .iter()
            .filter(|c| bridge.contains(&ip_of(c["src"].as_str().unwrap_or_default())))
            .count()
    };
    let before = from_bridge();
    let mut slowest = 0;
    for (dst, bridge) in [
        (server.addr4(8080), node.ipv4.to_string()),
        (server.addr6(8080), node.ipv6.to_string()),
    ] {
        let p = probe(cluster, "b", dst, count);
        eprintln!(
            "{phase}: probes to {dst}: {}/{count} answered 200 (slowest {} ms), from {:?}",
            p.answered,
            p.slowest_ms,
            p.peers.first()
        );
        slowest = slowest.max(p.slowest_ms);
        assert_eq!(
            p.answered, count,
            "{phase}: probes to {dst}: {:?}",
            p.failed
        );
        assert!(
            p.peers.iter().all(|peer| ip_of(peer) == bridge),
            "{phase}: probes must come from the bridge's address {bridge}: {:?}",
            p.peers
        );
    }
    assert_eq!(
        from_bridge(),
        before,
        "{phase}: probes must reach the app without the proxy"
    );
    slowest
}

fn allow_only_client(cluster: &SimCluster) {
    let policy = "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n\
        metadata: {name: only-client, namespace: apps}\nspec:\n  selector: {matchLabels: {app: server}}\n  \
        action: ALLOW\n  rules:\n  - from: [{principals: [\"spiffe://cluster.local/ns/apps/sa/client\"]}]\n";
    cluster.write_manifest("policy.yaml", policy).unwrap();
}

fn transfer(cluster: &SimCluster, from: &str, dst: SocketAddr) -> TransferReport {
    cluster.transfer(from, dst, 1024).unwrap()
}

/// One HTTP request from a pod: answered 200?
fn http_ok(cluster: &SimCluster, from: &str, dst: SocketAddr) -> bool {
    cluster
        .http(from, dst, "server", "/", &["--timeout-ms", "2000"])
        .is_ok_and(|r| r.statuses.get(&200) == Some(&1))
}

#[test]
fn kubelet_probes_from_the_bridge_address_are_answered_in_strict_and_under_an_allow_policy() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.http_serve("server", &[8080]).unwrap();
    let node = cluster.node("b");
    assert_ne!(
        node.ipv4, node.host_ipv4,
        "the bridge's address is not the node's"
    );
    let dst = cluster.pod("server").addr4(8080);

    assert!(http_ok(&cluster, "bystander", dst), "PERMISSIVE, no policy");
    cluster.set_namespace_strict("apps", true).unwrap();
    let strict = cluster.eventually(Duration::from_secs(3), || {
        !http_ok(&cluster, "bystander", dst)
    });
    assert!(strict.is_some(), "STRICT never refused plaintext");
    probes_answered(&cluster, "STRICT", PROBES);

    cluster.set_namespace_strict("apps", false).unwrap();
    allow_only_client(&cluster);
    let denied = cluster.eventually(Duration::from_secs(3), || {
        !http_ok(&cluster, "bystander", dst)
    });
    assert!(
        denied.is_some(),
        "the ALLOW policy never refused the bystander"
    );
    assert!(
        http_ok(&cluster, "client", dst),
        "the admitted client connects"
    );
    probes_answered(&cluster, "ALLOW policy admitting only apps/client", PROBES);

    // A probe whose first SYN is lost is answered on the retransmit (a second later):
    // the node's record of it lasts until the handshake is done, not one lookup.
    cluster.drop_first_syn("server", 8080).unwrap();
    let slowest = probes_answered(&cluster, "first SYN lost, ALLOW policy", 2);
    assert!(slowest >= 900, "the first SYN was not lost ({slowest} ms)");
    // A probe that gives up before its handshake completes leaves no entry behind.
    let abandoned = cluster
        .testapp_report::<TransferReport>(
            &cluster.node_placement("b"),
            &[
                "transfer",
                "--connect",
                &dst.to_string(),
                "--bytes",
                "8",
                "--timeout-ms",
                "300",
            ],
        )
        .unwrap();
    assert!(
        !abandoned.ok,
        "the handshake was meant to be cut short: {abandoned:?}"
    );
    let cleared = cluster.eventually(Duration::from_secs(2), || {
        cluster.map_entries("b").unwrap()["NM_NODE_FLOWS"] == 0
    });
    assert!(cleared.is_some(), "an abandoned handshake's entry stayed");
    assert_eq!(
        cluster.refused_count("b", "ebpf_node_flows_full").unwrap(),
        0,
        "every probe was recorded"
    );
    let flows = cluster.map_entries("b").unwrap()["NM_NODE_FLOWS"];
    assert_eq!(flows, 0, "entries go once the probes' handshakes are done");
}

fn nodeport_record(cluster: &SimCluster, dst: SocketAddr) -> Option<Value> {
    cluster
        .closed_connections("b")
        .unwrap()
        .into_iter()
        .rev()
        .find(|c| c["direction"] == "inbound" && c["original_dst"] == dst.to_string())
}

/// Once the agent refuses NodePort traffic for `reason`, one connection per family:
/// each must be refused and counted under `reason`. Returns how many were counted.
fn refused_nodeports(
    cluster: &SimCluster,
    nodeports: &[(SocketAddr, SocketAddr, String)],
    reason: &str,
) -> u64 {
    let count = || cluster.refused_count("b", reason).unwrap();
    let before = count();
    let applied = cluster.eventually(Duration::from_secs(3), || {
        let _ = transfer(cluster, "bystander", nodeports[0].0);
        count() > before
    });
    assert!(
        applied.is_some(),
        "NodePort traffic never refused for {reason}"
    );
    let before = count();
    for (nodeport, _, _) in nodeports {
        let r = transfer(cluster, "bystander", *nodeport);
        assert!(
            !r.ok,
            "NodePort {nodeport} admitted despite {reason}: {r:?}"
        );
    }
    let counted = count() - before;
    assert_eq!(
        counted,
        nodeports.len() as u64,
        "refusals counted under {reason}"
    );
    counted
}

#[test]
fn nodeport_traffic_masqueraded_to_the_bridge_address_is_still_captured_and_judged() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let _http = cluster.http_serve("server", &[8081]).unwrap();
    cluster.node_port("b", NODE_PORT, "server", 8080).unwrap();
    let node = cluster.node("b").clone();
    let server = cluster.pod("server").clone();
    let nodeports = [
        (
            SocketAddr::new(node.host_ipv4.into(), NODE_PORT),
            server.addr4(8080),
            node.ipv4.to_string(),
        ),
        (
            SocketAddr::new(node.host_ipv6.into(), NODE_PORT),
            server.addr6(8080),
            node.ipv6.to_string(),
        ),
    ];

    // PERMISSIVE, no policy: a client outside the mesh reaches the pod through the
    // NodePort, and the pod's inbound capture takes it (it is plaintext from outside),
    // arriving from the bridge's address, the very address probes leave from.
    for (nodeport, pod_dst, bridge) in &nodeports {
        let report = transfer(&cluster, "bystander", *nodeport);
        assert!(report.ok, "NodePort {nodeport}: {report:?}");
        let rec = nodeport_record(&cluster, *pod_dst)
            .unwrap_or_else(|| panic!("NodePort traffic to {pod_dst} was not captured"));
        assert_eq!(ip_of(rec["src"].as_str().unwrap_or("")), *bridge, "{rec:#}");
    }

    // STRICT: refused, counted; probes from the same address still answered.
    cluster.set_namespace_strict("apps", true).unwrap();
    let counted = refused_nodeports(&cluster, &nodeports, "strict_mtls_plaintext");
    eprintln!("STRICT: NodePort connections refused and counted: {counted}/2");
    let probe_dst = server.addr4(8081);
    let p = probe(&cluster, "b", probe_dst, PROBES);
    assert_eq!(p.answered, PROBES, "STRICT: probes {:?}", p.failed);

    // An ALLOW policy admitting only apps/client: NodePort traffic is denied by policy.
    cluster.set_namespace_strict("apps", false).unwrap();
    allow_only_client(&cluster);
    let counted = refused_nodeports(&cluster, &nodeports, "policy_denied");
    eprintln!("ALLOW policy: NodePort connections refused and counted: {counted}/2");
    let p = probe(&cluster, "b", probe_dst, PROBES);
    assert_eq!(p.answered, PROBES, "ALLOW policy: probes {:?}", p.failed);
    assert!(transfer(&cluster, "client", server.addr4(8080)).ok);
}
