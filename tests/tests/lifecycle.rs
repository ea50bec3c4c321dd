//! End-to-end: map hygiene under churn, restarts, and failing clearly.

use std::{os::unix::process::CommandExt, path::Path, time::Duration};

use mesh_node::{capture::bpf_sys, capture::dataplane::cgroup_attachments};
use mesh_tests::sim::{host::scaled, ClusterSpec, SimCluster};

const OUTBOUND_LISTENER: &str = "127.0.0.1:15001";

#[test]
fn after_ten_thousand_short_connections_every_map_is_back_to_baseline() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let baseline_a = cluster.map_entries("a").unwrap();
    let baseline_b = cluster.map_entries("b").unwrap();

    let churn = cluster
        .churn("client", cluster.pod("server").addr4(8080), 10_000)
        .unwrap();
    assert_eq!(churn.failed, 0, "{churn:?}");
    assert_eq!(churn.succeeded, 10_000);

    for (node, baseline) in [("a", &baseline_a), ("b", &baseline_b)] {
        let settled = cluster.eventually(Duration::from_secs(3), || {
            cluster.map_entries(node).unwrap() == *baseline
        });
        assert!(
            settled.is_some(),
            "node {node}: maps {:?} did not return to {baseline:?}",
            cluster.map_entries(node).unwrap()
        );
    }
    let outbound = cluster
        .closed_connections("a")
        .unwrap()
        .iter()
        .filter(|c| c["direction"] == "outbound")
        .count();
    assert!(
        outbound >= 4000,
        "the proxy saw the churn ({outbound} kept in history)"
    );
}

fn pinned_map_id(pin_dir: &Path, map: &str) -> u32 {
    let fd = bpf_sys::obj_get(&pin_dir.join("maps").join(map)).expect("pinned map");
    bpf_sys::obj_id(&fd).expect("map id")
}

#[test]
fn a_killed_agent_restarts_on_its_pinned_state_with_one_attachment_per_program() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let node = cluster.node("a").clone();
    let dst = cluster.pod("server").addr4(8080);
    assert!(cluster.transfer("client", dst, 1024).unwrap().ok);

    let maps_before: Vec<u32> = ["NM_ENROLLED", "NM_ORIG_DST", "NM_PARKED"]
        .iter()
        .map(|m| pinned_map_id(&node.pin_dir, m))
        .collect();
    let attached_before = cgroup_attachments(&node.cgroup).unwrap();

    cluster.kill_agent("a").unwrap();
    // Redirection stays in the kernel while the agent is gone: connections fail closed
    // instead of bypassing the mesh.
    let down = cluster.transfer("client", dst, 1024).unwrap();
    assert!(
        !down.ok,
        "with the agent down the connection must not bypass it: {down:?}"
    );

    cluster.start_agent("a").unwrap();
    let took = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .transfer("client", dst, 1024)
            .map(|r| r.ok)
            .unwrap_or(false)
    });
    let took = took.expect("connections never worked again after the restart");
    eprintln!("first connection after ready succeeded after {took:?}");
    assert!(
        took < scaled(Duration::from_secs(1)),
        "took {took:?} after ready"
    );
    let report = cluster.transfer("client", dst, 1024).unwrap();
    assert_eq!(report.peer.as_deref(), Some(OUTBOUND_LISTENER));

    let maps_after: Vec<u32> = ["NM_ENROLLED", "NM_ORIG_DST", "NM_PARKED"]
        .iter()
        .map(|m| pinned_map_id(&node.pin_dir, m))
        .collect();
    assert_eq!(maps_before, maps_after, "the pinned maps were reused");
    let bpf = cluster.admin("a", "/bpf").unwrap();
    assert_eq!(bpf["reused_pins"], true);

    let attached_after = cgroup_attachments(&node.cgroup).unwrap();
    for ((attach, before), (_, after)) in attached_before.iter().zip(&attached_after) {
        assert_eq!(before.len(), 1, "{attach} before the restart: {before:?}");
        assert_eq!(after.len(), 1, "{attach} after the restart: {after:?}");
        assert_ne!(
            before, after,
            "{attach}: the new program was swapped into the link"
        );
    }
}

/// Starts mesh-node with the node's usual flags, some replaced by `overrides`, and
/// returns its stderr after checking it failed without panicking.
fn failing_start(cluster: &SimCluster, overrides: &[(&str, &str)], as_nobody: bool) -> String {
    let node = cluster.node("a");
    let mut flags = vec![
        ("--node-name", "a".to_string()),
        (
            "--manifests",
            cluster.manifests.to_string_lossy().into_owned(),
        ),
        ("--cgroup-root", node.cgroup.to_string_lossy().into_owned()),
        ("--pin-dir", node.pin_dir.to_string_lossy().into_owned()),
        ("--node-netns", node.netns.to_string_lossy().into_owned()),
    ];
    for (flag, value) in overrides {
        flags.retain(|(f, _)| f != flag);
        flags.push((flag, value.to_string()));
    }
    let mut full = vec!["agent"];
    for (flag, value) in &flags {
        full.push(flag);
        full.push(value);
    }
    let args = overrides;
    let mut cmd = if as_nobody {
        // std switches uid before pre_exec hooks run, so an unprivileged process cannot
        // join the node's cgroup; it fails its privilege check before touching anything.
        let mut cmd = std::process::Command::new(cluster.mesh_node_bin());
        cmd.args(&full).uid(65534).gid(65534);
        cmd
    } else {
        cluster.mesh_node_command(node, &full).unwrap()
    };
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "mesh-node {args:?} should fail; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn missing_privileges_bpffs_or_object_fail_with_one_clear_error() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();

    let err = failing_start(&cluster, &[], true);
    assert!(
        err.contains("must run as root") && err.contains("CAP_BPF"),
        "{err}"
    );

    let err = failing_start(&cluster, &[("--pin-dir", "/tmp/nodemesh-not-bpffs")], false);
    assert!(
        err.contains("not on a bpf filesystem") && err.contains("mount -t bpf"),
        "{err}"
    );

    let err = failing_start(
        &cluster,
        &[("--ebpf-object", "/nonexistent/mesh-ebpf.o")],
        false,
    );
    assert!(
        err.contains("cannot read the eBPF object") && err.contains("cargo xtask build"),
        "{err}"
    );

    let err = failing_start(&cluster, &[("--cgroup-root", "/nonexistent-cgroup")], false);
    assert!(err.contains("cgroup root"), "{err}");
}
