//! Identities under faults: an agent restarted while the CA is down keeps serving the
//! identities it served, certificate renewal resumes within seconds of the CA answering
//! again, readiness says which identities still wait for a certificate, a pod's
//! identity stays while connections that started under it are still opening, and the
//! destination's view of who may talk to it decides, whatever the source node knows.

use std::{
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use mesh_tests::{
    report::TransferReport,
    sim::{host, ClusterSpec, PodSpec, ServiceSpec, SimCluster},
};
use serde_json::Value;

const SERVER_ID: &str = "spiffe://cluster.local/ns/apps/sa/server";
const OUTBOUND_LISTENER: &str = "127.0.0.1:15001";

/// The node's `/certs` entry for `identity`.
fn certificate(cluster: &SimCluster, node: &str, identity: &str) -> Option<Value> {
    cluster
        .admin(node, "/certs")
        .ok()?
        .as_array()?
        .iter()
        .find(|c| c["identity"] == identity)
        .cloned()
}

fn counter(cluster: &SimCluster, node: &str, name: &str) -> f64 {
    let Ok((_, text)) = cluster.admin_raw(node, "GET", "/stats/prometheus") else {
        return 0.0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Kills the node's agent and starts it again, the CA staying down, and waits until
/// it is ready (`start_agent` would start the CA first).
fn restart_without_ca(cluster: &SimCluster, node: &str) {
    cluster.kill_agent(node).unwrap();
    cluster.spawn_agent(node).unwrap();
    cluster.wait_ready(node, Duration::from_secs(20)).unwrap();
}

/// Inbound mutual-TLS connections node `node` recorded from `source`.
fn inbound_mtls_from(cluster: &SimCluster, node: &str, source: &str) -> usize {
    cluster
        .closed_connections(node)
        .unwrap_or_default()
        .iter()
        .filter(|c| {
            c["direction"] == "inbound"
                && c["security"] == "mutual_tls"
                && c["source_identity"] == source
                && c["result"] == "completed"
        })
        .count()
}

#[test]
fn an_agent_restarted_while_the_ca_is_down_keeps_serving_its_pods() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    assert!(cluster.transfer("client", dst, 1024).unwrap().ok);
    let before = certificate(&cluster, "b", SERVER_ID).expect("node b serves the server");
    assert_eq!(before["state"], "valid", "{before}");

    cluster.stop_ca().unwrap();
    let restarted = Instant::now();
    restart_without_ca(&cluster, "b");
    let ready_after = restarted.elapsed();
    // Measured from just after the restart, from a client on the other node: every
    // meshed connection to b's pod works (one first: without a certificate each would
    // hang for seconds).
    let first = cluster.transfer("client", dst, 1024).unwrap();
    assert!(
        first.ok,
        "the first connection after the restart failed: {first:?}"
    );
    let churn = cluster.churn("client", dst, 100).unwrap();
    let measured_for = restarted.elapsed();
    eprintln!(
        "restart with the CA down: ready after {ready_after:?}; {} of {} connections in \
         the {measured_for:?} after the restart succeeded",
        churn.succeeded,
        churn.succeeded + churn.failed
    );
    assert_eq!(
        (churn.succeeded, churn.failed),
        (100, 0),
        "meshed connections failed after the restart: {churn:?}\nnode b's log:\n{}",
        cluster.agent_log("b")
    );
    let after = certificate(&cluster, "b", SERVER_ID).expect("identity still served");
    assert_eq!(after["state"], "valid", "{after}");
    assert_eq!(
        after["serial"], before["serial"],
        "the certificate held before the restart serves (the CA is down)"
    );
    // Node b records a connection once both of its sides have closed, a moment after
    // the client is done with it: wait for the last ones.
    let client = "spiffe://cluster.local/ns/apps/sa/client";
    let recorded = host::wait_for(Duration::from_secs(2), || {
        let n = inbound_mtls_from(&cluster, "b", client);
        (n >= 101).then_some(n)
    });
    assert!(
        recorded.is_some(),
        "the connections crossed as mutual TLS into the restarted agent: {} of 101 recorded",
        inbound_mtls_from(&cluster, "b", client)
    );
    assert!(
        ready_after < Duration::from_secs(5),
        "ready after {ready_after:?}"
    );
}

#[test]
fn a_restarted_agent_without_certificates_is_unready_naming_them_until_the_ca_answers() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    assert!(cluster.transfer("client", dst, 1024).unwrap().ok);

    cluster.stop_ca().unwrap();
    cluster.kill_agent("b").unwrap();
    // Nothing kept from before (e.g. the node rebooted): the agent has no certificate.
    cluster.clear_cert_cache("b").unwrap();
    cluster.spawn_agent("b").unwrap();
    let unready = |cluster: &SimCluster| {
        cluster
            .admin_raw("b", "GET", "/healthz/ready")
            .is_ok_and(|(status, body)| status == 503 && body.contains(SERVER_ID))
    };
    let named = cluster.eventually(Duration::from_secs(10), || unready(&cluster));
    assert!(
        named.is_some(),
        "readiness must fail naming the pending identity: {:?}",
        cluster.admin_raw("b", "GET", "/healthz/ready")
    );
    // It stays so while the CA is down (several attempts fail meanwhile).
    let attempts = cluster.eventually(Duration::from_secs(15), || {
        counter(&cluster, "b", "nodemesh_certificate_errors_total") >= 4.0
    });
    assert!(attempts.is_some(), "the agent stopped asking the CA");
    assert!(unready(&cluster), "ready without a certificate");

    cluster.start_ca().unwrap();
    let back = Instant::now();
    cluster.wait_ready("b", Duration::from_secs(20)).unwrap();
    let took = back.elapsed();
    eprintln!("ready {took:?} after the CA answered again");
    assert!(took < Duration::from_secs(6), "ready only after {took:?}");
    let churn = cluster.churn("client", dst, 20).unwrap();
    assert_eq!(churn.failed, 0, "{churn:?}");
}

#[test]
fn renewals_resume_within_seconds_once_the_ca_answers_again() {
    let mut spec = ClusterSpec::two_nodes();
    spec.cert_ttl = Some("60s".into());
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    assert!(cluster.transfer("client", dst, 1024).unwrap().ok);
    let before = certificate(&cluster, "b", SERVER_ID).expect("node b serves the server");

    cluster.stop_ca().unwrap();
    restart_without_ca(&cluster, "b");
    // The renewal falls due at half-life and fails for as long as the CA is down: six
    // failures, by when a doubling backoff would wait 16 s and more for the next try.
    let failing = cluster.eventually(Duration::from_secs(50), || {
        counter(&cluster, "b", "nodemesh_certificate_errors_total") >= 6.0
    });
    assert!(
        failing.is_some(),
        "the renewal never failed: {:?}",
        certificate(&cluster, "b", SERVER_ID)
    );
    let held = certificate(&cluster, "b", SERVER_ID).expect("identity still served");
    assert_eq!(
        (&held["state"], &held["serial"]),
        (&Value::from("valid"), &before["serial"]),
        "the current certificate keeps serving: {held}"
    );
    assert!(cluster.transfer("client", dst, 1024).unwrap().ok);

    cluster.start_ca().unwrap();
    let back = Instant::now();
    let renewed = cluster.eventually(Duration::from_secs(40), || {
        certificate(&cluster, "b", SERVER_ID).is_some_and(|c| {
            c["serial"] != before["serial"] && c["state"] == "valid" && c["last_error"].is_null()
        })
    });
    let renewed = renewed.unwrap_or_else(|| {
        panic!(
            "never renewed after the CA came back: {:?}",
            certificate(&cluster, "b", SERVER_ID)
        )
    });
    eprintln!(
        "renewed {renewed:?} after the CA answered again ({:?} since it started)",
        back.elapsed()
    );
    assert!(
        renewed < Duration::from_secs(6),
        "renewal resumed only after {renewed:?}"
    );
    assert!(cluster.transfer("client", dst, 1024).unwrap().ok);
}

#[test]
fn unenrolling_a_namespace_while_fifty_clients_connect_cuts_none() {
    const CLIENTS: usize = 50;
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    assert!(cluster.transfer("client", dst, 1024).unwrap().ok);
    let before = ["a", "b"].map(|n| cluster.agent_usage(n).unwrap());

    let stop = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let unenrolled_at = std::thread::scope(|s| {
        let workers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(|| {
                    let mut reports: Vec<TransferReport> = Vec::new();
                    while !stop.load(Ordering::Relaxed) && reports.len() < 200 {
                        reports.push(cluster.transfer("client", dst, 64 * 1024).unwrap());
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    reports
                })
            })
            .collect();
        // Every client is connecting in a loop; unlabel the namespace under them (both
        // ends leave: the client on node a, the server on node b).
        let going = cluster.eventually(Duration::from_secs(20), || {
            done.load(Ordering::Relaxed) >= CLIENTS
        });
        assert!(going.is_some(), "the clients never got going");
        cluster.set_namespace_enrolled("apps", false).unwrap();
        let at = done.load(Ordering::Relaxed);
        // Until both agents have let the pods go, and as many transfers again after.
        let left = cluster.eventually(Duration::from_secs(10), || {
            ["a", "b"].iter().all(|n| {
                cluster.admin(n, "/workloads").is_ok_and(|w| {
                    w.as_array()
                        .into_iter()
                        .flatten()
                        .all(|w| w["enrolled"] == false)
                })
            })
        });
        let after = cluster.eventually(Duration::from_secs(20), || {
            done.load(Ordering::Relaxed) >= at + 2 * CLIENTS
        });
        stop.store(true, Ordering::Relaxed);
        let reports: Vec<TransferReport> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        assert!(left.is_some(), "the pods never left the mesh");
        assert!(
            after.is_some(),
            "the clients stalled after the unenrollment"
        );
        (at, reports)
    });
    let (at, reports) = unenrolled_at;
    let cut: Vec<&TransferReport> = reports.iter().filter(|r| !r.ok).collect();
    let meshed = reports
        .iter()
        .filter(|r| r.peer.as_deref() == Some(OUTBOUND_LISTENER))
        .count();
    eprintln!(
        "{} transfers ({at} before the unenrollment was written): {meshed} through the mesh, \
         {} cut",
        reports.len(),
        cut.len()
    );
    assert!(
        cut.is_empty(),
        "{} of {} transfers were cut, e.g. {:?}\nnode a:\n{}\nnode b:\n{}",
        cut.len(),
        reports.len(),
        cut.first(),
        tail(&cluster.agent_log("a")),
        tail(&cluster.agent_log("b"))
    );
    assert!(
        meshed > 0 && meshed < reports.len(),
        "the transfers must span the unenrollment: {meshed} of {} meshed",
        reports.len()
    );
    // The drained listeners close: each agent ends below where it started (the pods'
    // listeners are gone), nothing left behind by the storm.
    let during = ["a", "b"].map(|n| cluster.agent_usage(n).unwrap());
    let back = cluster.eventually(Duration::from_secs(20), || {
        ["a", "b"]
            .iter()
            .zip(&before)
            .all(|(n, b)| cluster.agent_usage(n).is_ok_and(|u| u.fds < b.fds))
    });
    let after = ["a", "b"].map(|n| cluster.agent_usage(n).unwrap());
    eprintln!(
        "agent a: {} before, {} just after, {} after the drain; agent b: {} / {} / {} \
         (back below the baseline after {back:?})",
        before[0], during[0], after[0], before[1], during[1], after[1]
    );
    assert!(
        back.is_some(),
        "the drained listeners never closed: {after:?} vs {before:?}"
    );
}

#[test]
fn a_kept_alive_tunnel_admitted_before_the_destination_learned_a_policy_ends_when_it_does() {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("echo-v1", "apps", "b"));
    spec.pods.push(PodSpec::new("intruder", "apps", "a"));
    spec.services = vec![ServiceSpec::new("echo", "apps", 80, 8080, &["echo-v1"])];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.http_serve("echo-v1", &[8080]).unwrap();
    let routed = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: echo, namespace: apps}\n\
        spec:\n  parentRefs: [{group: \"\", kind: Service, name: echo}]\n  rules:\n  - backendRefs: [{name: echo, port: 80}]\n";
    let policy = "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-client, namespace: apps}\n\
        spec:\n  selector: {matchLabels: {app: echo-v1}}\n  action: ALLOW\n  rules:\n  - from: [{serviceAccounts: [apps/client]}]\n";
    cluster.write_manifest("httproutes.yaml", routed).unwrap();
    let dst = cluster.service("echo").addr4();
    let status = |pod: &str| {
        cluster
            .http(pod, dst, "echo", "/", &[])
            .ok()
            .and_then(|r| r.statuses.keys().next().copied())
    };
    let knows_policy = |node: &str| {
        cluster.admin(node, "/policies").is_ok_and(|p| {
            p["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["policy"]["name"] == "only-client"))
        })
    };
    // Served through the HTTP route: node a's proxy keeps the upstream connection.
    let served = cluster.eventually(Duration::from_secs(5), || {
        status("intruder") == Some(200)
            && cluster.request_logs("a").iter().any(|l| {
                l["source_principal"] == "spiffe://cluster.local/ns/apps/sa/intruder"
                    && l["response_code"] == 200
            })
    });
    assert!(
        served.is_some(),
        "the intruder was never served before the policy"
    );

    // The destination's node learns of the policy late: node a knows it first, so the
    // intruder's next request opens a new tunnel, which b admits under what it knows.
    cluster.freeze_manifests("b").unwrap();
    cluster
        .write_manifest("httproutes.yaml", &format!("{routed}---\n{policy}"))
        .unwrap();
    let learned = cluster.eventually(Duration::from_secs(5), || knows_policy("a"));
    assert!(learned.is_some(), "node a never learned the policy");
    assert_eq!(
        status("intruder"),
        Some(200),
        "node b decides with what it knows, whatever node a knows"
    );
    assert!(!knows_policy("b"));

    cluster.thaw_manifests("b").unwrap();
    let learned = cluster.eventually(Duration::from_secs(5), || knows_policy("b"));
    assert!(learned.is_some(), "node b never learned the policy");
    // From then on the intruder is refused, though node a's kept-alive connection was
    // opened under the policy node a already knew.
    let refused = cluster.eventually(Duration::from_secs(5), || status("intruder") == Some(403));
    let revoked = counter_with(
        &cluster,
        "b",
        "nodemesh_connections_refused_total",
        "policy_revoked",
    );
    assert!(
        refused.is_some(),
        "the intruder was still served: {:?} (tunnels revoked on b: {revoked})",
        status("intruder")
    );
    eprintln!(
        "refused {refused:?} after node b learned the policy; tunnels revoked on b: {revoked}"
    );
    assert!(revoked >= 1.0, "the revocation is counted");
    assert_eq!(status("client"), Some(200));
}

fn counter_with(cluster: &SimCluster, node: &str, name: &str, reason: &str) -> f64 {
    counter(cluster, node, &format!("{name}{{reason=\"{reason}\"}}"))
}

/// The last lines of an agent log that say something is wrong.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("refused"))
        .collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
