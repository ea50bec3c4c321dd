//! End-to-end: Istio's AuthorizationPolicy with methods and paths, enforced per request
//! by the destination node's agent (no waypoint): the policy verbatim (names
//! adapted to the test app) over HTTP/1.1 and HTTP/2, meshed and plaintext; DENY wins
//! over ALLOW; AUDIT only logs; CUSTOM fails closed; bytes that are not HTTP are
//! refused on a port such a policy covers; and a kept-alive connection opened before an
//! HTTP policy is closed once one selects its port.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::sim::{ClusterSpec, PodSpec, SimCluster};

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: apps\nspec:\n{spec}"
    )
}

/// The issue's `service-mesh-policy`, for the test app: `server` instead of `frontend`,
/// the `apps/client` service account instead of `default/frontend-service-account`.
fn service_mesh_policy() -> String {
    policy(
        "service-mesh-policy",
        "  selector: {matchLabels: {app: server}}\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/apps/sa/client\"]}\n    to:\n    - operation: {methods: [\"GET\", \"POST\"], paths: [\"/api/*\"]}\n",
    )
}

/// The counter value of `nodemesh_connections_refused_total{reason=...}` on a node.
fn refused(cluster: &SimCluster, node: &str, reason: &str) -> f64 {
    let (_, text) = cluster.admin_raw(node, "GET", "/stats/prometheus").unwrap();
    let prefix = format!("nodemesh_connections_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Two nodes: `client` and `other` (both meshed, in `apps`) and `bystander` (not
/// meshed) on a; `server` on b.
fn cluster() -> SimCluster {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("other", "apps", "a"));
    SimCluster::create(spec).unwrap()
}

/// The status of one request from `pod` (`extra`: more `mesh-testapp http` flags).
fn status(cluster: &SimCluster, pod: &str, dst: SocketAddr, method: &str, path: &str) -> u16 {
    status_with(cluster, pod, dst, method, path, &[])
}

fn status_with(
    cluster: &SimCluster,
    pod: &str,
    dst: SocketAddr,
    method: &str,
    path: &str,
    extra: &[&str],
) -> u16 {
    let mut args = vec!["--method", method];
    args.extend(extra);
    let r = cluster.http(pod, dst, "server", path, &args).unwrap();
    assert_eq!(r.errors, 0, "{pod} {method} {path}: {r:?}");
    let (status, _) = r.statuses.iter().next().expect("one answer");
    if *status == 403 {
        assert_eq!(r.samples[0].body, "RBAC: access denied", "{r:?}");
    }
    *status
}

fn wait_for(cluster: &SimCluster, what: &str, check: impl FnMut() -> bool) {
    assert!(
        cluster.eventually(Duration::from_secs(5), check).is_some(),
        "{what} never happened"
    );
}

#[test]
fn methods_paths_and_principals_are_judged_per_request_at_the_destination() {
    let cluster = cluster();
    cluster.start_agents().unwrap();
    let _server = cluster.http_serve("server", &[8080]).unwrap();
    let server = cluster.pod("server").addr4(8080);
    assert_eq!(status(&cluster, "other", server, "DELETE", "/other"), 200);

    cluster
        .write_manifest("authz.yaml", &service_mesh_policy())
        .unwrap();
    wait_for(&cluster, "the policy applying", || {
        status(&cluster, "other", server, "GET", "/api/x") == 403
    });

    // Principal × method × path, over HTTP/1.1 and HTTP/2.
    let matrix = [
        ("client", "GET", "/api/x", 200),
        ("client", "POST", "/api/x", 200),
        ("client", "GET", "/api/", 200),
        ("client", "DELETE", "/api/x", 403),
        ("client", "GET", "/apix", 403),
        ("client", "GET", "/other", 403),
        ("other", "GET", "/api/x", 403),
        ("other", "POST", "/api/x", 403),
        // Plaintext from outside the mesh (PERMISSIVE): no principal, so denied.
        ("bystander", "GET", "/api/x", 403),
    ];
    for http2 in [false, true] {
        let extra: &[&str] = if http2 { &["--http2"] } else { &[] };
        for (pod, method, path, want) in matrix {
            assert_eq!(
                status_with(&cluster, pod, server, method, path, extra),
                want,
                "{pod} {method} {path} (HTTP/2: {http2})"
            );
        }
    }
    // The query is not part of the path policies match.
    assert_eq!(status(&cluster, "client", server, "GET", "/api/x?a=1"), 200);
    // Ten requests on one kept-alive connection: each is judged.
    let r = cluster
        .http("client", server, "server", "/api/x", &["--count", "10"])
        .unwrap();
    assert_eq!(r.statuses.get(&200), Some(&10), "{r:?}");

    // Bytes that are not HTTP to the covered port are refused, not relayed.
    let before = refused(&cluster, "b", "not_http");
    let t = cluster.transfer("client", server, 4096).unwrap();
    assert!(!t.ok, "raw bytes reached the app: {t:?}");
    wait_for(&cluster, "not_http being counted", || {
        refused(&cluster, "b", "not_http") > before
    });

    // The destination reports each request it judged, with the deciding policy.
    let logs = cluster.request_logs("b");
    let denied = logs
        .iter()
        .find(|l| l["reporter"] == "destination" && l["response_code"] == 403)
        .unwrap_or_else(|| panic!("no 403 logged by the destination: {logs:#?}"));
    assert_eq!(denied["response_flags"], "RBAC", "{denied:#}");
    let allowed = logs
        .iter()
        .find(|l| l["reporter"] == "destination" && l["response_code"] == 200)
        .unwrap_or_else(|| panic!("no 200 logged by the destination: {logs:#?}"));
    assert_eq!(allowed["policy"], "apps/service-mesh-policy", "{allowed:#}");
    assert_eq!(
        allowed["source_principal"],
        "spiffe://cluster.local/ns/apps/sa/client"
    );
}

#[test]
fn deny_wins_audit_only_logs_and_custom_fails_closed() {
    let cluster = cluster();
    cluster.start_agents().unwrap();
    let _server = cluster.http_serve("server", &[8080]).unwrap();
    let server = cluster.pod("server").addr4(8080);
    let allow_apps = policy(
        "allow-apps",
        "  selector: {matchLabels: {app: server}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {namespaces: [apps]}\n",
    );
    let deny_delete = policy(
        "deny-delete",
        "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [DELETE]}\n",
    );
    let audit = policy(
        "audit-admin",
        "  action: AUDIT\n  rules:\n  - to:\n    - operation: {paths: [\"/admin/*\"]}\n",
    );
    cluster
        .write_manifest(
            "authz.yaml",
            &[allow_apps, deny_delete, audit].join("---\n"),
        )
        .unwrap();
    wait_for(&cluster, "the DENY policy applying", || {
        status(&cluster, "client", server, "DELETE", "/x") == 403
    });
    assert_eq!(status(&cluster, "client", server, "GET", "/x"), 200);
    assert_eq!(status(&cluster, "other", server, "POST", "/x"), 200);
    assert_eq!(status(&cluster, "bystander", server, "GET", "/x"), 403);
    // AUDIT never decides: the request is allowed by ALLOW and its log names the audit.
    assert_eq!(
        status(&cluster, "client", server, "GET", "/admin/users"),
        200
    );
    let logs = cluster.request_logs("b");
    let audited = logs
        .iter()
        .find(|l| l["path"] == "/admin/users" && l["reporter"] == "destination")
        .unwrap_or_else(|| panic!("no log of the audited request: {logs:#?}"));
    assert_eq!(audited["audited"][0], "apps/audit-admin", "{audited:#}");

    // CUSTOM (external authorization) is not supported: the workload it selects fails
    // closed (its node refuses every connection to it, whatever the request), and the
    // node says why.
    let custom = policy(
        "ext-authz",
        "  selector: {matchLabels: {app: server}}\n  action: CUSTOM\n  provider: {name: my-ext-authz}\n  rules:\n  - to:\n    - operation: {paths: [\"/x\"]}\n",
    );
    let answered = |path: &str| {
        let r = cluster.http("client", server, "server", path, &[]).unwrap();
        r.statuses.keys().next().copied()
    };
    let denied_before = refused(&cluster, "b", "policy_denied");
    cluster.write_manifest("custom.yaml", &custom).unwrap();
    wait_for(&cluster, "the CUSTOM policy failing closed", || {
        answered("/x").is_none()
    });
    assert_eq!(answered("/y"), None, "a path the CUSTOM rule does not name");
    assert!(refused(&cluster, "b", "policy_denied") >= denied_before + 2.0);
    let (_, text) = cluster.admin_raw("b", "GET", "/stats/prometheus").unwrap();
    assert!(
        text.lines().any(|l| l.starts_with(
            "nodemesh_config_problems_total{kind=\"AuthorizationPolicy.security.istio.io\""
        ) && !l.ends_with(" 0")),
        "the CUSTOM policy was not reported as a config problem"
    );
    let records = cluster
        .closed_connections_with("b", |c| {
            c["result"]
                .as_str()
                .is_some_and(|r| r == "denied: apps/ext-authz")
        })
        .unwrap();
    assert!(
        !records.is_empty(),
        "no connection refused by the CUSTOM policy"
    );
}

#[test]
fn a_held_connection_is_closed_within_a_second_once_an_http_policy_covers_its_port() {
    let cluster = cluster();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let server = cluster.pod("server").addr4(8080);
    // A long-lived mTLS connection, relayed at L4 while no policy selects the server.
    let hold = cluster.hold("client", server, 30).unwrap();
    wait_for(&cluster, "the held connection reaching b", || {
        cluster
            .admin("b", "/connections")
            .unwrap()
            .to_string()
            .contains(&server.to_string())
    });
    std::thread::sleep(Duration::from_secs(1));
    let before = refused(&cluster, "b", "policy_revoked");
    // A relayed byte stream cannot be judged per request: the destination closes it
    // (the source node's state plays no part), and the client's next connection is
    // served as HTTP.
    cluster
        .write_manifest("authz.yaml", &service_mesh_policy())
        .unwrap();
    let closed = cluster.eventually(Duration::from_secs(5), || {
        refused(&cluster, "b", "policy_revoked") > before
    });
    let limit = Duration::from_secs_f64(mesh_tests::sim::host::time_scale());
    let took = closed.expect("the held connection was never closed");
    assert!(
        took <= limit,
        "closed {took:?} after the policy was written"
    );
    let written = Instant::now();
    let out = hold.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["failed"], 1,
        "the client saw its connection end: {report}"
    );
    assert!(written.elapsed() < Duration::from_secs(20), "{report}");
}
