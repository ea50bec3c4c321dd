//! End-to-end: the eBPF redirection path on a two-node simulated cluster.

use std::time::Duration;

use mesh_tests::sim::{ClusterSpec, SimCluster};

const MIB: u64 = 1024 * 1024;

#[test]
fn enrolled_pod_to_pod_on_another_node_goes_through_both_proxies() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);

    let report = cluster.transfer("client", dst, MIB).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.received, MIB);
    // The kernel connected the client to its in-pod outbound listener.
    assert_eq!(report.peer.as_deref(), Some("127.0.0.1:15001"), "{report:?}");

    let out = cluster.closed_connections("a").unwrap();
    let rec = out
        .iter()
        .find(|c| c["direction"] == "outbound" && c["original_dst"] == dst.to_string())
        .unwrap_or_else(|| panic!("node a recorded no outbound connection to {dst}: {out:#?}"));
    assert_eq!(rec["pod"]["name"], "client");
    assert_eq!(rec["bytes_to_server"], MIB);
    assert_eq!(rec["bytes_to_client"], MIB);
    assert_eq!(rec["result"], "completed");

    let inbound = cluster.closed_connections("b").unwrap();
    let rec = inbound
        .iter()
        .find(|c| c["direction"] == "inbound" && c["original_dst"] == dst.to_string())
        .unwrap_or_else(|| panic!("node b recorded no inbound connection: {inbound:#?}"));
    assert_eq!(rec["src"].as_str().unwrap().split(':').next(), Some(cluster.pod("client").ipv4.to_string().as_str()));
    assert_eq!(rec["bytes_to_server"], MIB);
}
