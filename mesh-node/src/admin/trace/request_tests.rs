//! The trace's verdict on one request where the destination judges each request: the
//! same decision the destination's agent takes (policy and rule named), a failed token
//! answered 401, and a hint when no request was described.

use super::tests::{run_with, state, Maps};
use crate::admin::trace::*;

const L7_POLICY: &str = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-readers, namespace: apps}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/apps/sa/client"]}
    to:
    - operation: {methods: ["GET"], paths: ["/api/*"]}
"#;

const INLINE_JWT: &str = r#"---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: apps}
spec:
  selector: {matchLabels: {app: server}}
  jwtRules:
  - issuer: "https://issuer.nodemesh.test"
    jwks: '{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","kid":"1"}]}'
"#;

fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> HttpAttributes {
    HttpAttributes {
        method: Some(method.into()),
        path: Some(path.into()),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn verdict(t: &Trace) -> (bool, Option<u16>, Option<String>) {
    let c = &t.candidates[0];
    let r = c.inbound.request.as_ref().expect("a request verdict");
    (
        c.allowed,
        r.status,
        r.verdict.as_ref().and_then(|v| v.policy.clone()),
    )
}

#[test]
fn the_request_verdict_names_the_policy_and_rule_that_decide() {
    let s = state(L7_POLICY);
    let jwt = crate::identity::jwt::JwtAuthenticator::new();
    let trace = |from: &str, req: Option<HttpAttributes>| {
        run_with(&s, ("apps", from), "web:80", req, Some(&jwt), &Maps)
    };
    // Without a request described, the trace says the connection is judged per request.
    let t = trace("client", None);
    assert!(
        matches!(
            t.candidates[0].inbound.admission,
            Some(crate::identity::authz::Admission::Http { .. })
        ),
        "{:?}",
        t.candidates[0].inbound
    );
    assert!(t.candidates[0].inbound.note.contains("--method"));
    let t = trace("client", Some(request("GET", "/api/users", &[])));
    assert_eq!(verdict(&t), (true, None, Some("apps/api-readers".into())));
    assert_eq!(
        t.candidates[0]
            .inbound
            .request
            .as_ref()
            .unwrap()
            .verdict
            .as_ref()
            .unwrap()
            .rule,
        Some(0)
    );
    for (from, method, path) in [
        ("client", "DELETE", "/api/users"),
        ("client", "GET", "/apix"),
        ("intruder", "GET", "/api/users"),
    ] {
        let t = trace(from, Some(request(method, path, &[])));
        let (allowed, status, _) = verdict(&t);
        assert!(!allowed, "{from} {method} {path}");
        assert_eq!(status, Some(403), "{from} {method} {path}");
    }
}

#[test]
fn a_token_that_fails_is_a_401_in_the_trace() {
    let s = state(&format!("{L7_POLICY}{INLINE_JWT}"));
    let jwt = crate::identity::jwt::JwtAuthenticator::new();
    let t = run_with(
        &s,
        ("apps", "client"),
        "web:80",
        Some(request(
            "GET",
            "/api/users",
            &[("authorization", "Bearer not.a.jwt")],
        )),
        Some(&jwt),
        &Maps,
    );
    let r = t.candidates[0].inbound.request.as_ref().unwrap();
    assert_eq!(r.status, Some(401), "{r:?}");
    assert!(r.authentication.starts_with("invalid: "), "{r:?}");
    assert!(!t.candidates[0].allowed);
    // No token: authentication passes, the policy decides.
    let t = run_with(
        &s,
        ("apps", "client"),
        "web:80",
        Some(request("GET", "/api/users", &[])),
        Some(&jwt),
        &Maps,
    );
    let r = t.candidates[0].inbound.request.as_ref().unwrap();
    assert_eq!((r.status, r.authentication.as_str()), (None, "no token"));
}

#[test]
fn the_trace_and_the_listeners_agree_on_a_pod_only_a_request_authentication_selects() {
    let s = state(INLINE_JWT);
    let jwt = crate::identity::jwt::JwtAuthenticator::new();
    let t = run_with(&s, ("apps", "client"), "web:80", None, Some(&jwt), &Maps);
    let admission = t.candidates[0].inbound.admission.clone();
    // What the destination's listeners decide (`inbound_http::admission` asks `admit`).
    let facts = crate::identity::authz::ConnectionFacts {
        source_ip: "10.1.0.2".parse().unwrap(),
        peer: Some(crate::identity::Identity::new(
            "cluster.local",
            "apps",
            "client",
        )),
        destination: "10.2.0.2:8080".parse().unwrap(),
    };
    let listeners =
        crate::identity::authz::admit(&s, &crate::keys::ObjectKey::new("apps", "server"), &facts);
    assert_eq!(admission.as_ref(), Some(&listeners));
    assert_eq!(
        listeners,
        crate::identity::authz::Admission::Http {
            policies: vec!["RequestAuthentication apps/jwt".into()]
        },
        "no AuthorizationPolicy, but the tokens are checked per request"
    );
    // So a request with a bad token is answered 401 in the trace, as by the proxy.
    let t = run_with(
        &s,
        ("apps", "client"),
        "web:80",
        Some(request(
            "GET",
            "/",
            &[("authorization", "Bearer not.a.jwt")],
        )),
        Some(&jwt),
        &Maps,
    );
    let r = t.candidates[0].inbound.request.as_ref().expect("judged");
    assert_eq!(r.status, Some(401), "{r:?}");
    assert!(!t.candidates[0].allowed);
}
