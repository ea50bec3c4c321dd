//! End-to-end: identities, the CA, HBONE mTLS between nodes, STRICT mode, policy.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use mesh_node::{
    hbone::tls::static_client_config, identity::ca::authority::new_csr,
    identity::ca::authority::CertificateAuthority, identity::ca::client::CaClient,
    identity::ca::client::CaClientError, identity::spiffe::TrustBundle, identity::Identity,
};
use mesh_tests::sim::{capture, host, ClusterSpec, PodSpec, SimCluster};
use rustls::pki_types::ServerName;

const MARKER: &str = "NODEMESH-PLAINTEXT-MARKER-";

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
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

fn counter(cluster: &SimCluster, node: &str, name: &str) -> f64 {
    let (_, text) = cluster.admin_raw(node, "GET", "/stats/prometheus").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs `f` on a tokio runtime inside node `node`'s network namespace.
fn in_node<T: Send + 'static>(
    cluster: &SimCluster,
    node: &str,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> + Send + 'static,
) -> T {
    host::in_netns(&cluster.node(node).netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(f()))
    })
    .unwrap()
}

#[test]
fn cross_node_traffic_between_meshed_pods_is_encrypted_on_the_wire() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let _outsider = cluster.serve("outsider", 9090).unwrap();

    let wire = capture::Capture::start(&cluster.fabric).unwrap();
    let report = cluster
        .transfer_marked("client", cluster.pod("server").addr4(8080), 1 << 20, MARKER)
        .unwrap();
    assert!(report.ok, "{report:?}");
    let frames = wire.finish().unwrap();
    assert!(
        frames.len() > 1 << 20,
        "the capture saw the transfer ({} bytes)",
        frames.len()
    );
    assert!(
        !capture::contains(&frames, MARKER.as_bytes()),
        "the payload crossed the fabric in clear"
    );

    // Control: the same capture does see plaintext between two pods outside the mesh.
    let wire = capture::Capture::start(&cluster.fabric).unwrap();
    let report = cluster
        .transfer_marked(
            "bystander",
            cluster.pod("outsider").addr4(9090),
            64 * 1024,
            MARKER,
        )
        .unwrap();
    assert!(report.ok, "{report:?}");
    assert!(
        capture::contains(&wire.finish().unwrap(), MARKER.as_bytes()),
        "the capture works"
    );

    let dst = cluster.pod("server").addr4(8080).to_string();
    let inbound = cluster
        .closed_connections_with("b", |c| c["original_dst"] == dst)
        .unwrap();
    let rec = inbound.iter().find(|c| c["original_dst"] == dst).unwrap();
    assert_eq!(rec["source_identity"], id("apps", "client").to_string());
    assert_eq!(rec["security"], "mutual_tls");
}

/// A client certificate for `identity` from `ca`, valid in [not_before, not_after).
fn client_cert(
    ca: &CertificateAuthority,
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> (String, String) {
    let (key, csr) = new_csr(identity).unwrap();
    let cert = ca
        .sign_with_validity(&csr, identity, not_before, not_after)
        .unwrap();
    (cert, key.serialize_pem())
}

/// One CONNECT through the server pod's 15008 from node a with a chosen client
/// certificate; Ok when the echo came back.
fn probe(
    cluster: &SimCluster,
    root: &str,
    certificate: Option<(String, String)>,
) -> Result<(), String> {
    let server = cluster.pod("server");
    let hbone: SocketAddr = SocketAddr::new(server.ipv4.into(), 15008);
    let target = server.addr4(8080);
    let trust = TrustBundle::from_pem(root).unwrap();
    in_node(cluster, "a", move || {
        Box::pin(async move {
            let config = static_client_config(
                certificate.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
                &trust,
                id("apps", "server"),
            )?;
            let tcp = tokio::net::TcpStream::connect(hbone)
                .await
                .map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::IpAddress(hbone.ip().into()), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let (mut sender, conn) = h2::client::handshake(tls)
                .await
                .map_err(|e| format!("h2: {e}"))?;
            tokio::spawn(conn);
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(target.to_string())
                .body(())
                .map_err(|e| e.to_string())?;
            let (resp, mut send) = sender
                .send_request(req, false)
                .map_err(|e| format!("CONNECT: {e}"))?;
            let resp = resp.await.map_err(|e| format!("CONNECT: {e}"))?;
            if resp.status() != 200 {
                return Err(format!("HTTP {}", resp.status()));
            }
            send.send_data(Bytes::from_static(b"hello"), true)
                .map_err(|e| e.to_string())?;
            let mut body = resp.into_body();
            let mut echoed = Vec::new();
            while let Some(chunk) = body.data().await {
                echoed.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
            }
            (echoed == b"hello")
                .then_some(())
                .ok_or_else(|| format!("echo was {echoed:?}"))
        })
    })
}

fn cluster_ca(cluster: &SimCluster, trust_domain: &str) -> (CertificateAuthority, String) {
    let dir = cluster.ca_dir().join("root");
    let root = std::fs::read_to_string(dir.join("root.pem")).unwrap();
    let key = std::fs::read_to_string(dir.join("root-key.pem")).unwrap();
    (
        CertificateAuthority::from_pem(&root, &key, trust_domain, Duration::from_secs(3600))
            .unwrap(),
        root,
    )
}

#[test]
fn hbone_refuses_foreign_expired_missing_and_other_domain_certificates() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let (real, root) = cluster_ca(&cluster, "cluster.local");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let client = id("apps", "client");

    // Control: a certificate from the mesh CA gets through, so the probe itself works.
    probe(
        &cluster,
        &root,
        Some(client_cert(&real, &client, now - hour, now + hour)),
    )
    .unwrap();

    let foreign = CertificateAuthority::generate("cluster.local", hour).unwrap();
    let (evil_ca, _) = cluster_ca(&cluster, "evil.local");
    let cases = [
        (
            "another CA",
            Some(client_cert(&foreign, &client, now - hour, now + hour)),
        ),
        (
            "expired",
            Some(client_cert(&real, &client, now - 2 * hour, now - hour)),
        ),
        ("no certificate", None),
        (
            "another trust domain",
            Some(client_cert(
                &evil_ca,
                &Identity::new("evil.local", "apps", "client"),
                now - hour,
                now + hour,
            )),
        ),
    ];
    for (what, cert) in cases {
        let result = probe(&cluster, &root, cert);
        assert!(result.is_err(), "{what}: the tunnel was opened");
    }
    assert!(refused(&cluster, "b", "hbone_handshake_failed") >= 3.0);
    assert!(refused(&cluster, "b", "hbone_wrong_trust_domain") >= 1.0);
}

#[test]
fn the_ca_refuses_identities_without_a_pod_on_the_node_and_mismatched_csrs() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_ca().unwrap();
    let root = std::fs::read_to_string(cluster.ca_dir().join("root/root.pem")).unwrap();
    let token = std::fs::read_to_string(cluster.node_token_file("a").unwrap()).unwrap();
    let addr = cluster.ca_addr();
    let results = in_node(&cluster, "a", move || {
        Box::pin(async move {
            let ca = CaClient::new(addr, None, &root, &token).unwrap();
            let wrong_token = CaClient::new(addr, None, &root, "not-a-valid-token-at-all").unwrap();
            async fn sign(
                ca: &CaClient,
                identity: Identity,
                csr_for: Identity,
            ) -> Result<(String, String), CaClientError> {
                let (_key, csr) = new_csr(&csr_for).unwrap();
                ca.sign(&identity, &csr).await
            }
            vec![
                sign(&ca, id("apps", "client"), id("apps", "client")).await,
                sign(&ca, id("apps", "server"), id("apps", "server")).await,
                sign(&ca, id("apps", "client"), id("apps", "admin")).await,
                sign(&wrong_token, id("apps", "client"), id("apps", "client")).await,
            ]
        })
    });
    assert!(
        results[0].is_ok(),
        "a pod of apps/client runs on node a: {:?}",
        results[0]
    );
    let status = |r: &Result<(String, String), CaClientError>| match r {
        Err(CaClientError::Refused { status, .. }) => *status,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(status(&results[1]), 403, "apps/server has no pod on node a");
    assert_eq!(
        status(&results[2]),
        400,
        "CSR SAN does not match the identity asked for"
    );
    assert_eq!(status(&results[3]), 401, "unknown node credential");
}

#[test]
fn strict_namespaces_refuse_plaintext_permissive_ones_pass_it_and_probes_always_pass() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    assert!(
        cluster.transfer("bystander", dst, 1024).unwrap().ok,
        "permissive passes plaintext"
    );

    cluster.set_namespace_strict("apps", true).unwrap();
    // Refused at accept, and counted so. (A transfer that straddles the change is
    // admitted and then closed when STRICT applies: counted as `strict_mtls_revoked`,
    // so a failed transfer alone does not prove the refusal this asserts.)
    let strict = cluster.eventually(Duration::from_secs(3), || {
        !cluster.transfer("bystander", dst, 16).unwrap().ok
            && refused(&cluster, "b", "strict_mtls_plaintext") >= 1.0
    });
    assert!(
        strict.is_some(),
        "STRICT never refused plaintext at accept (strict_mtls_plaintext: {}, strict_mtls_revoked: {})",
        refused(&cluster, "b", "strict_mtls_plaintext"),
        refused(&cluster, "b", "strict_mtls_revoked")
    );
    assert!(
        cluster.transfer("client", dst, 1024).unwrap().ok,
        "mTLS still passes"
    );
    let probe = cluster
        .transfer_from(&cluster.node_placement("b"), dst, 16)
        .unwrap();
    assert!(probe.ok, "kubelet probes pass in STRICT: {probe:?}");

    cluster.set_namespace_strict("apps", false).unwrap();
    let permissive = cluster.eventually(Duration::from_secs(3), || {
        cluster.transfer("bystander", dst, 16).unwrap().ok
    });
    assert!(permissive.is_some());
}

fn policy(name: &str, action: &str, principal: &str) -> String {
    format!(
        "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: apps}}\n\
         spec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: {action}\n  rules:\n  - from: [{{principals: [\"{principal}\"]}}]\n    to: [{{ports: [8080]}}]\n"
    )
}

#[test]
fn authorization_policy_allows_the_named_principal_denies_others_and_deny_wins() {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("intruder", "apps", "a"));
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    assert!(
        cluster.transfer("intruder", dst, 16).unwrap().ok,
        "no policy: allowed"
    );

    cluster
        .write_manifest(
            "policy.yaml",
            &policy("allow-client", "ALLOW", &id("apps", "client").to_string()),
        )
        .unwrap();
    // A transfer that began just before the policy reached node b is revoked (counted
    // as policy_revoked), not denied: wait for a connection the policy refused.
    let denied = cluster.eventually(Duration::from_secs(3), || {
        !cluster.transfer("intruder", dst, 16).unwrap().ok
            && refused(&cluster, "b", "policy_denied") >= 1.0
    });
    assert!(denied.is_some(), "the intruder was never denied");
    assert!(
        cluster.transfer("client", dst, 4096).unwrap().ok,
        "the allowed principal connects"
    );
    assert!(
        !cluster.transfer("bystander", dst, 16).unwrap().ok,
        "plaintext cannot match a principal"
    );
    assert!(refused(&cluster, "b", "policy_denied") >= 2.0);
    let intruder = id("apps", "intruder").to_string();
    let rec = cluster
        .closed_connections_with("b", |c| c["source_identity"] == intruder)
        .unwrap()
        .into_iter()
        .rev()
        .find(|c| c["source_identity"] == intruder)
        .unwrap();
    assert_eq!(
        rec["result"],
        "denied: ALLOW policies select this workload and none matched"
    );

    let both = [
        policy("allow-client", "ALLOW", &id("apps", "client").to_string()),
        policy("deny-client", "DENY", &id("apps", "client").to_string()),
    ]
    .join("---\n");
    cluster.write_manifest("policy.yaml", &both).unwrap();
    let deny_wins = cluster.eventually(Duration::from_secs(3), || {
        !cluster.transfer("client", dst, 16).unwrap().ok
    });
    assert!(deny_wins.is_some(), "DENY did not beat ALLOW");
}

#[test]
fn a_hundred_connections_to_one_pod_cost_at_most_one_handshake() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let before = counter(&cluster, "a", "nodemesh_hbone_handshakes_total");
    let churn = cluster
        .churn("client", cluster.pod("server").addr4(8080), 100)
        .unwrap();
    assert_eq!(churn.failed, 0, "{churn:?}");
    let handshakes = counter(&cluster, "a", "nodemesh_hbone_handshakes_total") - before;
    assert!(
        handshakes <= 1.0,
        "{handshakes} handshakes for 100 connections"
    );
    assert!(handshakes >= 1.0, "the connections did use HBONE");
}

#[test]
fn certificates_rotate_while_a_connection_stays_up_and_new_ones_keep_working() {
    let mut spec = ClusterSpec::two_nodes();
    spec.cert_ttl = Some("20s".into());
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    let hold = cluster.hold("client", dst, 60).unwrap();
    let mut serials = std::collections::BTreeSet::new();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let r = cluster.transfer("client", dst, 4096).unwrap();
        assert!(
            r.ok,
            "a new connection failed at {:?}: {r:?}",
            started.elapsed()
        );
        for c in cluster.admin("a", "/certs").unwrap().as_array().unwrap() {
            if c["identity"] == id("apps", "client").to_string() {
                serials.insert(c["serial"].as_str().unwrap_or("").to_string());
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let out = hold.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["failed"], 0, "the long connection broke: {report}");
    // A ping every 500 ms plus its round trip: at least 100 in 60 s, fewer where the
    // machine is slower (NODEMESH_TIME_SCALE).
    let pings = (100.0 / mesh_tests::sim::host::time_scale()) as u64;
    assert!(report["succeeded"].as_u64().unwrap() >= pings, "{report}");
    assert!(
        serials.len() >= 4,
        "certificates rotated {} times in 60 s with a 20 s TTL",
        serials.len()
    );
}

#[test]
fn with_the_ca_down_existing_certificates_keep_serving_and_errors_are_visible() {
    let mut spec = ClusterSpec::two_nodes();
    spec.cert_ttl = Some("6s".into());
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    assert!(cluster.transfer("client", dst, 1024).unwrap().ok);

    cluster.stop_ca().unwrap();
    // A refresh (at half of the 6 s lifetime) fails while the certificate is still valid.
    let failing = cluster.eventually(Duration::from_secs(8), || {
        let certs = cluster.admin("a", "/certs").unwrap();
        certs.as_array().unwrap().iter().any(|c| {
            c["identity"] == id("apps", "client").to_string()
                && c["state"] == "valid"
                && !c["last_error"].is_null()
        })
    });
    assert!(
        failing.is_some(),
        "the failed refresh is not visible: {}",
        cluster.admin("a", "/certs").unwrap()
    );
    assert!(
        cluster.transfer("client", dst, 1024).unwrap().ok,
        "the pooled, still-valid mTLS keeps working"
    );
    assert!(counter(&cluster, "a", "nodemesh_certificate_errors_total") >= 1.0);

    cluster.start_ca().unwrap();
    let recovered = cluster.eventually(Duration::from_secs(40), || {
        let certs = cluster.admin("a", "/certs").unwrap();
        certs
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["state"] == "valid" && c["last_error"].is_null())
    });
    assert!(
        recovered.is_some(),
        "no recovery after the CA came back: {}",
        cluster.admin("a", "/certs").unwrap()
    );
    assert!(cluster.transfer("client", dst, 1024).unwrap().ok);
}
