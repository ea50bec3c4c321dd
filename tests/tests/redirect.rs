//! End-to-end: the eBPF redirection path on a two-node simulated cluster, with real
//! agents, real clients and servers in pod network namespaces.

use std::{net::SocketAddr, time::Duration};

use mesh_tests::sim::{ClusterSpec, PodSpec, SimCluster};
use serde_json::Value;

const MIB: u64 = 1024 * 1024;
const OUTBOUND_LISTENER: &str = "127.0.0.1:15001";

fn find<'a>(records: &'a [Value], direction: &str, dst: SocketAddr) -> Option<&'a Value> {
    records
        .iter()
        .find(|c| c["direction"] == direction && c["original_dst"] == dst.to_string())
}

/// Waits (up to 2 s, scaled) until `node` has recorded the closed connection: the
/// agent records it once both of its sides are closed, just after the client is done.
fn await_record(cluster: &SimCluster, node: &str, direction: &str, dst: SocketAddr) {
    let recorded = cluster.eventually(Duration::from_secs(2), || {
        cluster
            .closed_connections(node)
            .is_ok_and(|records| find(&records, direction, dst).is_some())
    });
    assert!(
        recorded.is_some(),
        "node {node} recorded no {direction} connection to {dst}: {:#?}",
        cluster.closed_connections(node)
    );
}

fn ip_of(addr: &Value) -> String {
    let text = addr.as_str().unwrap_or_default();
    text.parse::<SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

#[test]
fn enrolled_pod_to_pod_on_another_node_goes_through_both_proxies() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);

    let report = cluster.transfer("client", dst, MIB).unwrap();
    assert!(
        report.ok,
        "{report:?}\nnode a: {:#?}\nnode b log:\n{}",
        cluster.closed_connections("a").unwrap(),
        cluster.agent_log("b")
    );
    assert_eq!(report.received, MIB);
    // The kernel connected the client to its in-pod outbound listener.
    assert_eq!(
        report.peer.as_deref(),
        Some(OUTBOUND_LISTENER),
        "{report:?}"
    );

    await_record(&cluster, "a", "outbound", dst);
    let out = cluster.closed_connections("a").unwrap();
    let rec = find(&out, "outbound", dst)
        .unwrap_or_else(|| panic!("node a recorded no outbound connection to {dst}: {out:#?}"));
    assert_eq!(rec["pod"]["name"], "client");
    assert_eq!(rec["peer"]["name"], "server");
    assert_eq!(rec["bytes_to_server"], MIB);
    assert_eq!(rec["bytes_to_client"], MIB);
    assert_eq!(rec["result"], "completed");
    assert_eq!(
        rec["security"],
        "mutual_tls",
        "meshed to meshed crosses the network as mTLS; agent log:\n{}",
        cluster.agent_log("a")
    );
    assert_eq!(
        rec["source_identity"],
        "spiffe://cluster.local/ns/apps/sa/client"
    );
    assert_eq!(
        rec["destination_identity"],
        "spiffe://cluster.local/ns/apps/sa/server"
    );

    await_record(&cluster, "b", "inbound", dst);
    let inbound = cluster.closed_connections("b").unwrap();
    let rec = find(&inbound, "inbound", dst)
        .unwrap_or_else(|| panic!("node b recorded no inbound connection: {inbound:#?}"));
    assert_eq!(
        ip_of(&rec["src"]),
        cluster.pod("client").ipv4.to_string(),
        "pod IP is the source"
    );
    assert_eq!(rec["pod"]["name"], "server");
    assert_eq!(rec["bytes_to_server"], MIB);
    assert_eq!(rec["bytes_to_client"], MIB);
    assert_eq!(rec["security"], "mutual_tls");
    assert_eq!(
        rec["source_identity"], "spiffe://cluster.local/ns/apps/sa/client",
        "the server side verified the client"
    );
}

#[test]
fn ipv6_and_v4_mapped_destinations_are_redirected() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let server = cluster.pod("server");

    let v6 = server.addr6(8080);
    let report = cluster.transfer("client", v6, MIB).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.peer.as_deref(), Some("[::1]:15001"), "{report:?}");
    await_record(&cluster, "a", "outbound", v6);
    let rec = find(&cluster.closed_connections("a").unwrap(), "outbound", v6).cloned();
    let rec = rec.unwrap_or_else(|| panic!("no IPv6 outbound record on node a"));
    assert_eq!(rec["bytes_to_server"], MIB);
    await_record(&cluster, "b", "inbound", v6);
    let inbound = cluster.closed_connections("b").unwrap();
    let rec = find(&inbound, "inbound", v6)
        .unwrap_or_else(|| panic!("no IPv6 inbound record: {inbound:#?}"));
    assert_eq!(ip_of(&rec["src"]), cluster.pod("client").ipv6.to_string());

    // An IPv6 socket connecting to a v4-mapped address travels as IPv4.
    let mapped: SocketAddr = format!("[::ffff:{}]:8080", server.ipv4).parse().unwrap();
    let report = cluster.transfer("client", mapped, 64 * 1024).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(
        report.peer.as_deref(),
        Some("[::ffff:127.0.0.1]:15001"),
        "{report:?}"
    );
    let v4 = server.addr4(8080);
    await_record(&cluster, "a", "outbound", v4);
    let rec = find(&cluster.closed_connections("a").unwrap(), "outbound", v4).cloned();
    assert!(
        rec.is_some(),
        "v4-mapped connect recorded with its IPv4 destination"
    );
}

#[test]
fn pods_outside_the_mesh_are_not_redirected_but_their_inbound_to_meshed_pods_is() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let _outsider = cluster.serve("outsider", 9090).unwrap();
    let dst = cluster.pod("server").addr4(8080);

    // bystander (namespace `plain`, node a) talks straight to the server...
    let report = cluster.transfer("bystander", dst, 256 * 1024).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(
        report.peer.as_deref(),
        Some(dst.to_string().as_str()),
        "not redirected"
    );
    let by_bystander = cluster
        .closed_connections("a")
        .unwrap()
        .into_iter()
        .filter(|c| c["pod"]["name"] == "bystander")
        .count();
    assert_eq!(by_bystander, 0, "node a must not proxy a non-enrolled pod");
    // ...but the server is meshed: its inbound side passes 15006 in PERMISSIVE mode.
    await_record(&cluster, "b", "inbound", dst);
    let inbound = cluster.closed_connections("b").unwrap();
    let rec =
        find(&inbound, "inbound", dst).unwrap_or_else(|| panic!("no inbound record: {inbound:#?}"));
    assert_eq!(
        ip_of(&rec["src"]),
        cluster.pod("bystander").ipv4.to_string()
    );
    assert_eq!(rec["bytes_to_server"], 256 * 1024);

    // An enrolled client reaching a non-meshed server: outbound proxied, no inbound capture.
    let plain_dst = cluster.pod("outsider").addr4(9090);
    let report = cluster.transfer("client", plain_dst, 4096).unwrap();
    assert!(report.ok, "{report:?}");
    await_record(&cluster, "a", "outbound", plain_dst);
    assert!(find(
        &cluster.closed_connections("a").unwrap(),
        "outbound",
        plain_dst
    )
    .is_some());
    assert!(find(
        &cluster.closed_connections("b").unwrap(),
        "inbound",
        plain_dst
    )
    .is_none());
}

#[test]
fn plaintext_inbound_on_the_same_node_passes_15006_and_probes_from_the_node_bypass_it() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);

    // outsider is on the same node as the server, not in the mesh.
    let report = cluster.transfer("outsider", dst, 128 * 1024).unwrap();
    assert!(report.ok, "{report:?}");
    await_record(&cluster, "b", "inbound", dst);
    let inbound = cluster.closed_connections("b").unwrap();
    let rec =
        find(&inbound, "inbound", dst).unwrap_or_else(|| panic!("no inbound record: {inbound:#?}"));
    assert_eq!(ip_of(&rec["src"]), cluster.pod("outsider").ipv4.to_string());
    assert_eq!(
        rec["bytes_to_client"],
        128 * 1024,
        "the app's echo came back through 15006"
    );

    // A kubelet-style probe from the node's own address reaches the app directly.
    let before = cluster.closed_connections("b").unwrap().len();
    for probe_dst in [dst, cluster.pod("server").addr6(8080)] {
        let probe = cluster
            .transfer_from(&cluster.node_placement("b"), probe_dst, 16)
            .unwrap();
        assert!(probe.ok, "probe to {probe_dst} failed: {probe:?}");
        assert_eq!(probe.peer.as_deref(), Some(probe_dst.to_string().as_str()));
    }
    assert_eq!(
        cluster.closed_connections("b").unwrap().len(),
        before,
        "probes from the node must not pass through the proxy"
    );
}

#[test]
fn excluded_outbound_ports_and_inbound_ports_are_left_alone() {
    let mut spec = ClusterSpec::two_nodes();
    let mut client = PodSpec::new("client", "apps", "a");
    client.annotations = vec![("nodemesh.io/exclude-outbound-ports".into(), "5432".into())];
    let mut server = PodSpec::new("server", "apps", "b");
    server.annotations = vec![("nodemesh.io/exclude-inbound-ports".into(), "9100".into())];
    spec.pods = vec![client, server];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _db = cluster.serve("server", 5432).unwrap();
    let _metrics = cluster.serve("server", 9100).unwrap();
    let _app = cluster.serve("server", 8080).unwrap();

    let db = cluster.pod("server").addr4(5432);
    let report = cluster.transfer("client", db, 1024).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(
        report.peer.as_deref(),
        Some(db.to_string().as_str()),
        "excluded port not redirected"
    );
    // The destination's inbound capture still applies to 5432.
    await_record(&cluster, "b", "inbound", db);
    assert!(find(&cluster.closed_connections("b").unwrap(), "inbound", db).is_some());

    // The inbound exclusion stops capture of plaintext: a non-meshed scraper reaches
    // the app directly. A meshed client still tunnels to it over mTLS.
    let scrape = cluster.pod("server").addr4(9100);
    let report = cluster
        .transfer_from(&cluster.node_placement("a"), scrape, 1024)
        .unwrap();
    assert!(report.ok, "{report:?}");
    assert!(
        find(&cluster.closed_connections("b").unwrap(), "inbound", scrape).is_none(),
        "inbound-excluded port must reach the app without the proxy"
    );
    let report = cluster.transfer("client", scrape, 1024).unwrap();
    assert!(report.ok, "{report:?}");
    await_record(&cluster, "b", "inbound", scrape);
    let rec = find(&cluster.closed_connections("b").unwrap(), "inbound", scrape).cloned();
    assert_eq!(
        rec.map(|r| r["security"].clone()),
        Some("mutual_tls".into())
    );
}
