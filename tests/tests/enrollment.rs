//! End-to-end: enrollment follows the manifests while the agents run.

use std::time::Duration;

use mesh_tests::sim::{
    capture::{contains, Capture},
    host::scaled,
    ClusterSpec, PodSpec, SimCluster,
};

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
    assert_eq!(before["NM_INBOUND_POL"], 4, "two pods, IPv4 and IPv6 each");

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
    assert_eq!(after["NM_INBOUND_POL"], 2);
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

// ---- a pod's first connections ------------------------------------------------------

const MARKER: &str = "first-connection-must-not-leave-the-mesh";

/// The workload row of `pod` on `node`'s agent.
fn workload(cluster: &SimCluster, node: &str, pod: &str) -> serde_json::Value {
    cluster
        .admin(node, "/workloads")
        .unwrap()
        .as_array()
        .and_then(|rows| rows.iter().find(|w| w["name"] == pod).cloned())
        .unwrap_or_default()
}

/// Whether `node`'s agent has learnt that `ip` is `pod`'s (it traces to the pod).
fn state_knows_ip(cluster: &SimCluster, node: &str, ip: std::net::Ipv4Addr, pod: &str) -> bool {
    let path = format!("/trace?pod=apps/client&to={ip}:8080");
    cluster.admin(node, &path).is_ok_and(|t| {
        t["candidates"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["pod"]["name"] == pod))
    })
}

/// The app of a starting pod: connections from its very first instant (the process is
/// the pod's first when it has no sandbox yet), each carrying MARKER; then what the
/// fabric saw and what the server's agent recorded.
fn first_connections(
    cluster: &SimCluster,
    pod: &str,
) -> (
    mesh_tests::report::FirstConnectReport,
    bool,
    Vec<serde_json::Value>,
) {
    let dst = cluster.pod("server").addr4(8080).to_string();
    let capture = Capture::start(&cluster.fabric).unwrap();
    let report: mesh_tests::report::FirstConnectReport = cluster
        .testapp_report(
            &cluster.pod(pod).placement(),
            &[
                "first-connect",
                "--connect",
                &dst,
                "--marker",
                MARKER,
                "--after",
                "5",
            ],
        )
        .unwrap();
    let frames = capture.finish().unwrap();
    let src = cluster.pod(pod).ipv4.to_string();
    let from_pod = |c: &serde_json::Value| {
        c["direction"] == "inbound"
            && c["src"]
                .as_str()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                .is_some_and(|a| a.ip().to_string() == src)
    };
    // Node b records a connection a moment after the client is done with it.
    let inbound: Vec<serde_json::Value> = cluster
        .closed_connections_with("b", from_pod)
        .unwrap_or_default()
        .into_iter()
        .filter(from_pod)
        .collect();
    (report, contains(&frames, MARKER.as_bytes()), inbound)
}

/// Every attempt was either refused at connect (held) or meshed; none went out plain.
fn assert_meshed_or_refused(
    report: &mesh_tests::report::FirstConnectReport,
    on_wire: bool,
    inbound: &[serde_json::Value],
) -> usize {
    assert!(report.first_ok_ms.is_some(), "never connected: {report:#?}");
    let mut refused = 0;
    for (i, a) in report.attempts.iter().enumerate() {
        if a.ok {
            assert_eq!(
                a.peer.as_deref(),
                Some(OUTBOUND_LISTENER),
                "attempt {i} left the mesh: {a:?}"
            );
        } else {
            assert!(
                a.error
                    .as_deref()
                    .is_some_and(|e| e.contains("Operation not permitted")),
                "attempt {i} failed otherwise than being held: {a:?}"
            );
            refused += 1;
        }
    }
    assert!(!on_wire, "the marker crossed the fabric in plaintext");
    assert!(!inbound.is_empty(), "the server's agent saw none of them");
    for rec in inbound {
        assert_eq!(rec["security"], "mutual_tls", "{rec:#}");
    }
    refused
}

#[test]
fn a_pod_without_an_ip_in_its_status_is_enrolled_from_its_namespace_and_its_first_connect_is_meshed(
) {
    let mut spec = ClusterSpec::two_nodes();
    let mut newcomer = PodSpec::new("newcomer", "apps", "a");
    newcomer.ip_published = false;
    spec.pods.push(newcomer);
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let pod = cluster.pod("newcomer").clone();

    // The sandbox runs, the status has no IP: enrolled with the namespace's addresses.
    let row = workload(&cluster, "a", "newcomer");
    assert_eq!(row["enrolled"], true, "{row:#}");
    let ips: Vec<&str> = row["ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(ips, [pod.ipv4.to_string(), pod.ipv6.to_string()], "{row:#}");
    let cookie = row["netns_cookie"].clone();

    let (report, on_wire, inbound) = first_connections(&cluster, "newcomer");
    let refused = assert_meshed_or_refused(&report, on_wire, &inbound);
    eprintln!(
        "sandbox up, no IP published: {} connections, {refused} refused, first meshed after {:?} ms, {} seen by the server as mutual_tls",
        report.attempts.len(),
        report.first_ok_ms,
        inbound.len()
    );
    assert_eq!(
        refused, 0,
        "enrolled before the app started: nothing to hold"
    );

    // The kubelet publishes the IP: the same enrollment carries on.
    cluster.publish_pod_ip("newcomer").unwrap();
    let learnt = cluster.eventually(Duration::from_secs(3), || {
        state_knows_ip(&cluster, "a", pod.ipv4, "newcomer")
    });
    assert!(learnt.is_some(), "the agent never saw the published IP");
    assert!(redirected(&cluster, "newcomer"));
    let row = workload(&cluster, "a", "newcomer");
    assert_eq!(row["netns_cookie"], cookie, "not enrolled again: {row:#}");
    let enrollments = cluster
        .agent_log("a")
        .lines()
        .filter(|l| l.contains("pod enrolled") && l.contains("newcomer"))
        .count();
    assert_eq!(enrollments, 1);
}

#[test]
fn a_pod_whose_app_connects_before_its_sandbox_is_found_is_held_never_plaintext() {
    let mut spec = ClusterSpec::two_nodes();
    let mut latecomer = PodSpec::new("latecomer", "apps", "a");
    latecomer.sandbox = false;
    latecomer.ip_published = false;
    spec.pods.push(latecomer);
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();

    // kubelet has made its cgroup; no process, no IP yet: held.
    let held = cluster.eventually(Duration::from_secs(3), || {
        workload(&cluster, "a", "latecomer")["held"] == true
    });
    let row = workload(&cluster, "a", "latecomer");
    let before = cluster.refused_count("a", "ebpf_pod_not_enrolled").unwrap();

    // The app is the pod's first process, and connects at once.
    let (report, on_wire, inbound) = first_connections(&cluster, "latecomer");
    let refused = assert_meshed_or_refused(&report, on_wire, &inbound);
    assert!(held.is_some(), "never held: {row:#}");
    let counted = cluster.refused_count("a", "ebpf_pod_not_enrolled").unwrap() - before;
    eprintln!(
        "no sandbox, no IP: {} connections, {refused} refused while held (counted {counted}), first meshed after {:?} ms, {} seen by the server as mutual_tls",
        report.attempts.len(),
        report.first_ok_ms,
        inbound.len()
    );
    assert!(counted >= refused as u64, "every refusal counted");
    // (Its only process has exited since, so the pod may be held again by now.)
    assert!(cluster
        .agent_log("a")
        .lines()
        .any(|l| l.contains("pod enrolled") && l.contains("latecomer")));
}
