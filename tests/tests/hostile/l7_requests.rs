//! Hostile requests to a pod whose policies make its node's agent parse HTTP: malformed
//! and huge tokens, header floods, a forged claim header. Each gets a clear answer (401,
//! 431, 403), the refusals are logged a few times at most, the agent's memory and
//! descriptors stay bounded, and ordinary requests keep being served.

use std::time::Duration;

use mesh_tests::sim::{ClusterSpec, SimCluster};

/// A RequestAuthentication with an inline key (RFC 7517's example P-256 key) and a
/// policy that allows any request: tokens are checked when present, none is required.
const POLICIES: &str = r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: apps}
spec:
  selector: {matchLabels: {app: server}}
  jwtRules:
  - issuer: "https://issuer.nodemesh.test"
    jwks: '{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","kid":"1"}]}'
    outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admin-only, namespace: apps}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/admin"]}
    when:
    - {key: "request.headers[x-jwt-sub]", notValues: [admin]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: any-path, namespace: apps}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - to:
    - operation: {paths: ["/*"]}
"#;

fn statuses(cluster: &SimCluster, headers: &[String], count: u64) -> Vec<(u16, u64)> {
    statuses_of(cluster, "/", headers, count)
}

fn statuses_of(
    cluster: &SimCluster,
    path: &str,
    headers: &[String],
    count: u64,
) -> Vec<(u16, u64)> {
    let dst = cluster.pod("server").addr4(8080);
    let count = count.to_string();
    let mut extra = vec!["--count", count.as_str()];
    for h in headers {
        extra.extend(["-H", h.as_str()]);
    }
    let r = cluster.http("client", dst, "server", path, &extra).unwrap();
    r.statuses.into_iter().collect()
}

#[test]
fn malformed_and_huge_tokens_and_header_floods_get_clear_answers_and_bounded_cost() {
    let cluster = SimCluster::create(ClusterSpec::two_nodes()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.http_serve("server", &[8080]).unwrap();
    cluster.write_manifest("policies.yaml", POLICIES).unwrap();
    let bearer = |t: &str| format!("authorization: Bearer {t}");
    // The policies apply once a malformed token is refused.
    let applied = cluster.eventually(Duration::from_secs(5), || {
        statuses(&cluster, &[bearer("not.a.jwt")], 1) == vec![(401, 1)]
    });
    assert!(applied.is_some(), "the RequestAuthentication never applied");
    assert_eq!(
        statuses(&cluster, &[], 1),
        vec![(200, 1)],
        "no token passes"
    );
    // The header a verified token's `sub` is copied into cannot be sent by the client:
    // a forged one is dropped before policies (and the application) see the request.
    assert_eq!(
        statuses_of(&cluster, "/admin", &[], 1),
        vec![(403, 1)],
        "/admin without a subject"
    );
    assert_eq!(
        statuses_of(&cluster, "/admin", &["x-jwt-sub: admin".to_string()], 1),
        vec![(403, 1)],
        "/admin with a forged claim header"
    );

    let before = cluster.agent_usage("b").unwrap();
    let huge_token = format!("{}.{}.{}", "e".repeat(6_000), "p".repeat(6_000), "s");
    let cases: Vec<(&str, Vec<String>, u16)> = vec![
        ("a malformed token", vec![bearer("not.a.jwt")], 401),
        (
            "a token that is not base64",
            vec![bearer("@@@.###.$$$")],
            401,
        ),
        ("a 12 KB token", vec![bearer(&huge_token)], 401),
        ("two tokens", vec![bearer("a.b.c"), bearer("d.e.f")], 401),
        (
            "a 100 KB header",
            vec![format!("x-flood: {}", "f".repeat(100_000))],
            431,
        ),
        (
            "300 headers",
            (0..300).map(|i| format!("x-h{i}: {i}")).collect(),
            431,
        ),
    ];
    for (what, headers, want) in &cases {
        let got = statuses(&cluster, headers, 1);
        assert_eq!(got, vec![(*want, 1)], "{what}");
    }
    // Many more of the same: answered, and the agent's cost stays bounded.
    for _ in 0..10 {
        assert_eq!(
            statuses(&cluster, &[bearer("not.a.jwt")], 50),
            vec![(401, 50)]
        );
        assert_eq!(
            statuses(&cluster, &[format!("x-flood: {}", "f".repeat(100_000))], 1),
            vec![(431, 1)]
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = cluster.agent_usage("b").unwrap();
    assert!(
        after.rss_kib < before.rss_kib + 20 * 1024,
        "agent memory grew from {before} to {after}"
    );
    assert!(
        after.fds <= before.fds + 4,
        "agent descriptors grew from {before} to {after}"
    );
    let lines = cluster
        .agent_log("b")
        .lines()
        .filter(|l| l.contains("JWT failed verification"))
        .count();
    assert!(
        lines < 60,
        "{lines} log lines for ~510 refused tokens: not rate-limited"
    );
    // Ordinary requests are still served.
    assert_eq!(statuses(&cluster, &[], 20), vec![(200, 20)]);
}
