//! End-to-end: enrollment follows the manifests while the agents run.

use std::time::Duration;

use mesh_tests::sim::{host::scaled, ClusterSpec, PodSpec, SimCluster};

const OUTBOUND_LISTENER: &str = "127.0.0.1:15001";
const WITHIN: Duration = Duration::from_secs(1);

/// Whether a fresh connection from `pod` to the server is redirected right now.
fn redirected(cluster: &SimCluster, pod: &str) -> bool {
    let dst = cluster.pod("server").addr4(8080);
    let report = cluster.transfer(pod, dst, 8).expect("transfer runs");
    assert!(
        report.ok,
        "connection must work whether redirected or not: {report:?}"
    );
    report.peer.as_deref() == Some(OUTBOUND_LISTENER)
}

#[test]
fn labelling_a_namespace_enrolls_and_unenrolls_its_pods_within_a_second() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    assert!(redirected(&cluster, "client"));
    let agent_pid = cluster.agent_pid("a");

    cluster.set_namespace_enrolled("apps", false).unwrap();
    let took = cluster.eventually(Duration::from_secs(5), || !redirected(&cluster, "client"));
    let took = took.expect("un-enrolling never took effect");
    eprintln!("un-enrolling took effect after {took:?}");
    assert!(took < scaled(WITHIN), "un-enrolling took {took:?}");

    cluster.set_namespace_enrolled("plain", true).unwrap();
    let took = cluster.eventually(Duration::from_secs(5), || redirected(&cluster, "bystander"));
    let took = took.expect("enrolling never took effect");
    eprintln!("enrolling took effect after {took:?}");
    assert!(took < scaled(WITHIN), "enrolling took {took:?}");
    assert!(!redirected(&cluster, "client"), "apps stays out");

    cluster.set_namespace_enrolled("apps", true).unwrap();
    let took = cluster.eventually(Duration::from_secs(5), || redirected(&cluster, "client"));
    assert!(took.expect("re-enrolling never took effect") < scaled(WITHIN));
    assert_eq!(cluster.agent_pid("a"), agent_pid, "no restart involved");
    let workloads = cluster.admin("a", "/workloads").unwrap();
    let enrolled: Vec<&str> = workloads
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["enrolled"] == true)
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(enrolled.len(), 2, "{workloads:#}");
}

#[test]
fn existing_connections_survive_unenrollment() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    // A long transfer that is still running while the namespace is unlabelled.
    let started = std::thread::scope(|s| {
        let transfer = s.spawn(|| cluster.transfer("client", dst, 256 * 1024 * 1024));
        // Established end to end: the echo is flowing back (a connection still setting
        // up its tunnel is not an existing connection yet).
        let live = cluster.eventually(Duration::from_secs(5), || {
            cluster
                .admin("a", "/connections")
                .map(|v| {
                    v["live"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|c| c["bytes_to_client"].as_u64().unwrap_or(0) > 0)
                })
                .unwrap_or(false)
        });
        assert!(live.is_some(), "the transfer never showed up as live");
        cluster.set_namespace_enrolled("apps", false).unwrap();
        transfer.join().unwrap().unwrap()
    });
    assert!(started.ok, "the transfer was cut: {started:?}");
    assert_eq!(started.peer.as_deref(), Some(OUTBOUND_LISTENER));
}

#[test]
fn a_vanished_pod_namespace_is_cleaned_up_and_other_pods_keep_working() {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("worker", "apps", "a"));
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let before = cluster.map_entries("a").unwrap();
    assert_eq!(before["NM_ENROLLED"], 2);
    assert_eq!(before["NM_INBOUND_PODS"], 4, "two pods, IPv4 and IPv6 each");

    cluster.destroy_pod_netns("worker").unwrap();
    let gone = cluster.eventually(Duration::from_secs(3), || {
        let w = cluster.admin("a", "/workloads").unwrap();
        w.as_array().unwrap().iter().any(|w| {
            w["name"] == "worker"
                && w["enrolled"] == false
                && w["reason"].as_str().unwrap_or("").contains("vanished")
        })
    });
    assert!(
        gone.is_some(),
        "agent did not notice; log:\n{}",
        cluster.agent_log("a")
    );
    let after = cluster.map_entries("a").unwrap();
    assert_eq!(after["NM_ENROLLED"], 1);
    assert_eq!(after["NM_INBOUND_PODS"], 2);
    assert!(cluster.agent_log("a").contains("vanished"));
    assert!(
        redirected(&cluster, "client"),
        "the other pod keeps working"
    );
}

#[test]
fn malformed_manifests_are_reported_and_the_last_good_state_stays() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    // A broken edit of the namespace file (which enrolls `apps`) and a garbage file.
    cluster
        .write_manifest(
            "namespaces.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: [oops\n",
        )
        .unwrap();
    cluster
        .write_manifest("garbage.yaml", "\u{0}\u{1}not yaml: [")
        .unwrap();
    let reported = cluster.eventually(Duration::from_secs(3), || {
        let log = cluster.agent_log("a");
        log.contains("namespaces.yaml") && log.contains("garbage.yaml")
    });
    assert!(reported.is_some(), "log:\n{}", cluster.agent_log("a"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        redirected(&cluster, "client"),
        "the last good namespace labels stay in effect"
    );
    let (status, metrics) = cluster.admin_raw("a", "GET", "/stats/prometheus").unwrap();
    assert_eq!(status, 200);
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nodemesh_manifest_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(errors >= 2.0, "{metrics}");
}

#[test]
fn pod_namespaces_are_found_by_kubelet_style_cgroup_paths() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    // Node a lays pods out like kubelet's systemd driver, node b like cgroupfs.
    for (node, pod, layout) in [
        ("a", "client", "kubepods-besteffort-pod"),
        ("b", "server", "kubepods/besteffort/pod"),
    ] {
        let workloads = cluster.admin(node, "/workloads").unwrap();
        let w = workloads
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == pod)
            .cloned()
            .unwrap();
        assert_eq!(w["enrolled"], true, "{w:#}");
        let netns = w["netns"].as_str().unwrap();
        let pid = netns
            .strip_prefix("/proc/")
            .and_then(|rest| rest.strip_suffix("/ns/net"))
            .unwrap_or_else(|| panic!("{pod}: not located through a process: {netns}"));
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(cgroup.contains(layout), "{pod}: {cgroup}");
        let found = std::fs::metadata(netns)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        let expected = std::fs::metadata(&cluster.pod(pod).netns)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        assert_eq!(found, expected, "{pod}: the located namespace is the pod's");
    }
}
