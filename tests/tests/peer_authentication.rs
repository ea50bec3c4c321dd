//! End-to-end: Istio's PeerAuthentication decides, per pod and port, whether plaintext
//! from outside the mesh gets in — mesh-wide (root namespace), namespace-wide and by
//! workload, with a port override — while meshed clients always get in over HBONE;
//! and a plaintext connection admitted under PERMISSIVE is closed once its port turns
//! STRICT.

use std::time::{Duration, Instant};

use mesh_tests::sim::{host, ClusterSpec, PodSpec, SimCluster};

/// The counter value of `nodemesh_connections_refused_total{reason=...}` on a node.
fn refused(cluster: &SimCluster, node: &str, reason: &str) -> f64 {
    let (_, text) = cluster.admin_raw(node, "GET", "/stats/prometheus").unwrap();
    let prefix = format!("nodemesh_connections_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn peer_authentication(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

/// The layering: mesh STRICT (in the root namespace), namespace `apps`
/// PERMISSIVE, workload `server` STRICT with port 9090 DISABLE.
fn layered() -> Vec<String> {
    vec![
        peer_authentication("nodemesh-system", "default", "  mtls:\n    mode: STRICT\n"),
        peer_authentication("apps", "default", "  mtls:\n    mode: PERMISSIVE\n"),
        peer_authentication(
            "apps",
            "server",
            "  selector:\n    matchLabels:\n      app: server\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    9090:\n      mode: DISABLE\n",
        ),
    ]
}

/// Two nodes: the clients on a (`client` meshed, `bystander` not), the servers on b:
/// `server` and `web` in `apps`, `vault` in `secure` (enrolled, no policy of its own).
fn cluster() -> SimCluster {
    let mut spec = ClusterSpec::two_nodes();
    spec.namespaces.push(("secure".into(), true));
    spec.namespaces.push(("nodemesh-system".into(), false));
    spec.pods.push(PodSpec::new("web", "apps", "b"));
    spec.pods.push(PodSpec::new("vault", "secure", "b"));
    SimCluster::create(spec).unwrap()
}

#[test]
fn plaintext_follows_the_workload_namespace_and_mesh_modes_and_mtls_always_passes() {
    let cluster = cluster();
    cluster.start_agents().unwrap();
    let _servers = [
        cluster.serve("server", 8080).unwrap(),
        cluster.serve("server", 9090).unwrap(),
        cluster.serve("web", 8080).unwrap(),
        cluster.serve("vault", 8080).unwrap(),
    ];
    let server = cluster.pod("server").addr4(8080);
    let server_disabled = cluster.pod("server").addr4(9090);
    let web = cluster.pod("web").addr4(8080);
    let vault = cluster.pod("vault").addr4(8080);
    // No policy: everything is PERMISSIVE.
    for dst in [server, server_disabled, web, vault] {
        assert!(
            cluster.transfer("bystander", dst, 64).unwrap().ok,
            "{dst}: plaintext refused without any policy"
        );
    }

    cluster
        .write_manifest("peer-authentication.yaml", &layered().join("---\n"))
        .unwrap();
    let applied = cluster.eventually(Duration::from_secs(5), || {
        !cluster.transfer("bystander", vault, 16).unwrap().ok
            && !cluster.transfer("bystander", server, 16).unwrap().ok
    });
    assert!(applied.is_some(), "the STRICT policies never applied");

    // What Istio documents: the workload's port-level mode, else the workload's, else
    // the namespace's, else the mesh's.
    let plaintext = [
        (server, false, "workload STRICT"),
        (server_disabled, true, "portLevelMtls DISABLE"),
        (web, true, "namespace PERMISSIVE"),
        (vault, false, "mesh STRICT"),
    ];
    for (dst, served, why) in plaintext {
        let r = cluster.transfer("bystander", dst, 4096).unwrap();
        assert_eq!(r.ok, served, "plaintext to {dst} ({why}): {r:?}");
        let r = cluster.transfer("client", dst, 4096).unwrap();
        assert!(r.ok, "mTLS to {dst} ({why}) must pass: {r:?}");
    }
    assert!(refused(&cluster, "b", "strict_mtls_plaintext") >= 2.0);

    // The node's view names the deciding policy per workload and port.
    let policies = cluster.admin("b", "/policies").unwrap();
    let workload = |name: &str| {
        policies["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["pod"]["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no workload {name}: {policies:#}"))
    };
    let s = workload("server");
    assert_eq!(s["mode"], "STRICT", "{s:#}");
    assert_eq!(s["decided_by"], "PeerAuthentication apps/server (workload)");
    assert_eq!(s["ports"][0]["port"], 9090);
    assert_eq!(s["ports"][0]["mode"], "DISABLE");
    let v = workload("vault");
    assert_eq!(
        v["decided_by"],
        "PeerAuthentication nodemesh-system/default (mesh-wide)"
    );
    assert_eq!(workload("web")["mode"], "PERMISSIVE");
}

#[test]
fn a_plaintext_connection_is_closed_within_a_second_of_its_port_turning_strict() {
    let cluster = cluster();
    cluster.start_agents().unwrap();
    let _web = cluster.serve("web", 8080).unwrap();
    let web = cluster.pod("web").addr4(8080);
    cluster
        .write_manifest("peer-authentication.yaml", &layered().join("---\n"))
        .unwrap();
    let applied = cluster.eventually(Duration::from_secs(5), || {
        !cluster
            .transfer("bystander", cluster.pod("vault").addr4(8080), 16)
            .unwrap()
            .ok
    });
    assert!(applied.is_some(), "the mesh-wide policy never applied");

    // A long-lived plaintext connection, admitted under the namespace's PERMISSIVE.
    let hold = cluster.hold("bystander", web, 30).unwrap();
    let established = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .admin("b", "/connections")
            .unwrap()
            .to_string()
            .contains(&web.to_string())
    });
    assert!(established.is_some(), "the held connection never reached b");
    std::thread::sleep(Duration::from_secs(1));
    let before = refused(&cluster, "b", "strict_mtls_revoked");

    let mut policies = layered();
    policies.push(peer_authentication(
        "apps",
        "web",
        "  selector:\n    matchLabels:\n      app: web\n  mtls:\n    mode: STRICT\n",
    ));
    cluster
        .write_manifest("peer-authentication.yaml", &policies.join("---\n"))
        .unwrap();
    let written = Instant::now();
    let closed = cluster.eventually(Duration::from_secs(5), || {
        refused(&cluster, "b", "strict_mtls_revoked") > before
    });
    let limit = Duration::from_secs_f64(host::time_scale());
    let took = closed.expect("the plaintext connection was never closed");
    assert!(
        took <= limit,
        "closed {took:?} after the STRICT policy was written (limit {limit:?})"
    );
    let out = hold.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["failed"], 1,
        "the client saw its connection end: {report}"
    );
    assert!(
        written.elapsed() < Duration::from_secs(20),
        "the client noticed the close long before its 30 s ran out: {report}"
    );
    let revoked = |c: &serde_json::Value| {
        c["original_dst"] == web.to_string()
            && c["result"]
                .as_str()
                .is_some_and(|r| r.starts_with("revoked"))
    };
    let records = cluster.closed_connections_with("b", revoked).unwrap();
    let rec = records
        .iter()
        .find(|c| revoked(c))
        .expect("no revoked record on b");
    assert_eq!(rec["result"], "revoked: apps/web");
    assert_eq!(rec["security"], "none");
    // A new plaintext connection is refused; mTLS still passes.
    assert!(!cluster.transfer("bystander", web, 16).unwrap().ok);
    assert!(cluster.transfer("client", web, 16).unwrap().ok);
}
