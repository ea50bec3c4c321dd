//! Authentication with inline keys: every algorithm, every way a token fails, where
//! tokens are found and how the request is rewritten, which pods a policy selects.

use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use super::{test_keys::*, *};
use crate::discovery::{files::parse_manifest, problem::ProblemReason};

pub(super) const ISS: &str = "https://issuer.test";

fn pod(ns: &str, name: &str, labels: Value) -> String {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]}})
    .to_string()
}

fn ra(ns: &str, name: &str, spec: Value) -> String {
    json!({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
    .to_string()
}

fn state(docs: &[String]) -> ClusterState {
    let mut all = vec![
        pod("apps", "backend", json!({"app": "backend"})),
        pod("apps", "other", json!({"app": "other"})),
        pod("team", "api", json!({"app": "api"})),
    ];
    all.extend(docs.iter().cloned());
    ClusterState::from_objects(parse_manifest(&all.join("\n---\n")).unwrap())
}

/// Whether a RequestAuthentication selects `pod` (its traffic is then served as HTTP).
fn selects(s: &ClusterState, pod: &ObjectKey) -> bool {
    !s.request_authentications_for(pod).is_empty()
}

pub(super) fn backend() -> ObjectKey {
    ObjectKey::new("apps", "backend")
}

pub(super) fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

pub(super) fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A backend policy trusting `keys` for ISS with audience `api`, plus `extra` rule fields.
pub(super) fn policy(keys: &[&TestKey], extra: Value) -> ClusterState {
    let mut rule = json!({"issuer": ISS, "audiences": ["api"], "jwks": jwks(keys)});
    if let (Some(r), Some(e)) = (rule.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    state(&[ra(
        "apps",
        "jwt",
        json!({"selector": {"matchLabels": {"app": "backend"}}, "jwtRules": [rule]}),
    )])
}

fn auth(s: &ClusterState, p: &mut http::request::Parts) -> Authentication {
    JwtAuthenticator::new().authenticate(s, &backend(), p)
}

pub(super) fn invalid(a: Authentication) -> String {
    match a {
        Authentication::Invalid(why) => why,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn tokens_of_every_algorithm_pass_and_say_who() {
    let keys = [
        TestKey::rsa("rs256", Algorithm::RS256),
        TestKey::rsa("rs384", Algorithm::RS384),
        TestKey::rsa("rs512", Algorithm::RS512),
        TestKey::rsa("ps256", Algorithm::PS256),
        TestKey::ec("es256", Algorithm::ES256),
        TestKey::ec("es384", Algorithm::ES384),
        TestKey::ed25519("ed"),
    ];
    let s = policy(&keys.iter().collect::<Vec<_>>(), json!({}));
    for key in &keys {
        let mut c = claims(ISS, "alice", "api");
        c["azp"] = json!("frontend");
        c["groups"] = json!({"team": "payments"});
        let mut p = parts("/", &[("authorization", &bearer(&key.sign(&c)))]);
        match auth(&s, &mut p) {
            Authentication::Valid(a) => {
                assert_eq!(a.principal, format!("{ISS}/alice"), "{:?}", key.alg);
                assert_eq!(a.audiences, ["api"]);
                assert_eq!(a.presenter.as_deref(), Some("frontend"));
                assert_eq!(a.claims["groups"]["team"], "payments");
            }
            other => panic!("{:?}: {other:?}", key.alg),
        }
        // The token does not go on to the application by default.
        assert!(p.headers.get("authorization").is_none());
    }
}

#[test]
fn a_token_without_kid_is_tried_with_every_key_of_the_issuer() {
    let (a, b) = (
        TestKey::ec("a", Algorithm::ES256),
        TestKey::ec("b", Algorithm::ES256),
    );
    let s = policy(&[&a, &b], json!({}));
    let token = b.sign_with_kid(&claims(ISS, "bob", "api"), false);
    let mut p = parts("/", &[("authorization", &bearer(&token))]);
    assert!(matches!(auth(&s, &mut p), Authentication::Valid(_)));
}

#[test]
fn bad_tokens_are_invalid_with_a_reason() {
    let key = TestKey::rsa("k1", Algorithm::RS256);
    let impostor = TestKey::rsa("k1", Algorithm::RS256);
    let s = policy(&[&key], json!({}));
    let now = now();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            key.sign(&json!({"iss": ISS, "sub": "a", "aud": "api", "exp": now - 3600})),
            "expired",
        ),
        (
            "not yet valid",
            key.sign(&json!({"iss": ISS, "sub": "a", "aud": "api", "nbf": now + 3600, "exp": now + 7200})),
            "not valid yet",
        ),
        (
            "wrong issuer",
            key.sign(&claims("https://evil.test", "a", "api")),
            "issuer",
        ),
        (
            "wrong audience",
            key.sign(&claims(ISS, "a", "other")),
            "audiences",
        ),
        (
            "no audience",
            key.sign(&json!({"iss": ISS, "sub": "a", "exp": now + 60})),
            "audiences",
        ),
        (
            "bad signature",
            impostor.sign(&claims(ISS, "a", "api")),
            "signature",
        ),
        ("malformed", "abc.def".into(), "malformed"),
        ("not base64", "a!.b!.c!".into(), "malformed"),
        (
            "huge",
            key.sign(&json!({"iss": ISS, "aud": "api", "exp": now + 60, "pad": "x".repeat(9000)})),
            "limit",
        ),
    ];
    for (name, token, says) in cases {
        let mut p = parts("/", &[("authorization", &bearer(&token))]);
        let why = invalid(auth(&s, &mut p));
        assert!(why.contains(says), "{name}: {why}");
    }
    // Two different tokens at once.
    let t1 = key.sign(&claims(ISS, "a", "api"));
    let t2 = key.sign(&claims(ISS, "b", "api"));
    let mut p = parts(
        &format!("/?access_token={t2}"),
        &[("authorization", &bearer(&t1))],
    );
    assert!(invalid(auth(&s, &mut p)).contains("different tokens"));
}

#[test]
fn no_token_or_an_unselected_pod_is_no_token() {
    let key = TestKey::ed25519("k");
    let s = policy(&[&key], json!({}));
    let jwt = JwtAuthenticator::new();
    assert_eq!(auth(&s, &mut parts("/", &[])), Authentication::NoToken);
    // A header without the Bearer prefix holds no token.
    let mut p = parts("/", &[("authorization", "Basic dXNlcjpwYXNz")]);
    assert_eq!(auth(&s, &mut p), Authentication::NoToken);
    // The other pod is not selected: its token is not looked at.
    let other = ObjectKey::new("apps", "other");
    let mut p = parts("/", &[("authorization", "Bearer garbage")]);
    assert_eq!(
        jwt.authenticate(&s, &other, &mut p),
        Authentication::NoToken
    );
    assert!(selects(&s, &backend()));
    assert!(!selects(&s, &other));
}

#[test]
fn the_access_token_parameter_is_read_and_removed() {
    let key = TestKey::ec("k", Algorithm::ES384);
    let s = policy(&[&key], json!({}));
    let token = key.sign(&claims(ISS, "carol", "api"));
    let mut p = parts(&format!("/path?a=1&access_token={token}&b=2"), &[]);
    assert!(matches!(auth(&s, &mut p), Authentication::Valid(_)));
    assert_eq!(p.uri.to_string(), "/path?a=1&b=2");
}

#[test]
fn configured_locations_replace_the_defaults_and_outputs_are_set() {
    let key = TestKey::rsa("k", Algorithm::PS256);
    let s = policy(
        &[&key],
        json!({
            "fromHeaders": [{"name": "x-jwt", "prefix": "Token "}],
            "fromCookies": ["session"],
            "forwardOriginalToken": true,
            "outputPayloadToHeader": "x-jwt-payload",
            "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}, {"header": "x-team", "claim": "org.team"}],
        }),
    );
    let mut c = claims(ISS, "dave", "api");
    c["org"] = json!({"team": "core"});
    let token = key.sign(&c);
    // The default header is not a location any more.
    let mut p = parts("/", &[("authorization", &bearer(&token))]);
    assert_eq!(auth(&s, &mut p), Authentication::NoToken);
    let mut p = parts(
        "/",
        &[("x-jwt", &format!("Token {token}")), ("x-sub", "spoofed")],
    );
    assert!(matches!(auth(&s, &mut p), Authentication::Valid(_)));
    assert_eq!(
        p.headers["x-jwt"],
        format!("Token {token}").as_str(),
        "forwardOriginalToken"
    );
    assert_eq!(p.headers["x-sub"], "dave");
    assert_eq!(p.headers["x-team"], "core");
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(p.headers["x-jwt-payload"].as_bytes())
        .unwrap();
    let payload: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(payload["sub"], "dave");
    // From a cookie.
    let mut p = parts("/", &[("cookie", &format!("a=b; session={token}"))]);
    assert!(matches!(auth(&s, &mut p), Authentication::Valid(_)));
}

#[test]
fn a_clients_own_output_headers_never_pass_with_or_without_a_token() {
    let key = TestKey::ec("k", Algorithm::ES256);
    let s = policy(
        &[&key],
        json!({
            "outputPayloadToHeader": "x-jwt-payload",
            "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}, {"header": "x-team", "claim": "org.team"}],
        }),
    );
    let forged = [
        ("x-sub", "admin"),
        ("x-team", "root"),
        ("x-jwt-payload", "e30"),
    ];
    // No token at all: the forged headers are dropped, not passed on as if verified.
    let mut p = parts("/", &forged);
    assert_eq!(auth(&s, &mut p), Authentication::NoToken);
    for (h, _) in forged {
        assert!(p.headers.get(h).is_none(), "{h} kept without a token");
    }
    // A valid token without the nested claim: x-sub is the token's, x-team is absent.
    let token = key.sign(&claims(ISS, "erin", "api"));
    let mut with_token = forged.to_vec();
    let b = bearer(&token);
    with_token.push(("authorization", &b));
    let mut p = parts("/", &with_token);
    assert!(matches!(auth(&s, &mut p), Authentication::Valid(_)));
    assert_eq!(p.headers["x-sub"], "erin");
    assert!(
        p.headers.get("x-team").is_none(),
        "a forged claim the token lacks"
    );
    assert_ne!(p.headers["x-jwt-payload"], "e30");
}

#[test]
fn a_broken_inline_jwks_is_reported_and_refuses_its_issuers_tokens() {
    let key = TestKey::rsa("k", Algorithm::RS256);
    let s = state(&[ra(
        "apps",
        "broken",
        json!({"jwtRules": [{"issuer": ISS, "jwks": "{not json"},
                            {"issuer": "https://other.test", "jwksUri": "ftp://keys"}]}),
    )]);
    let compiled = &s.request_authentication.compiled[&ObjectKey::new("apps", "broken")];
    let fields: Vec<(&str, ProblemReason)> = compiled
        .problems
        .iter()
        .map(|p| (p.field.as_str(), p.reason))
        .collect();
    assert_eq!(
        fields,
        [
            ("jwtRules[0].jwks", ProblemReason::BadValue),
            ("jwtRules[1].jwksUri", ProblemReason::BadValue)
        ]
    );
    let mut p = parts(
        "/",
        &[("authorization", &bearer(&key.sign(&claims(ISS, "a", "x"))))],
    );
    assert!(invalid(auth(&s, &mut p)).contains("cannot be used"));
    // Counted once under its kind.
    let metrics = crate::telemetry::metrics::Metrics::new();
    crate::discovery::problems::ProblemReporter::new().report(&s, &metrics);
    let n = metrics
        .config_problems
        .with_label_values(&["RequestAuthentication", "bad_value"])
        .get();
    assert_eq!(n, 2);
}

#[test]
fn selection_follows_istio_namespace_root_and_target_refs() {
    let key = TestKey::ed25519("k");
    let rule = json!([{"issuer": ISS, "jwks": jwks(&[&key])}]);
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api-svc", "namespace": "team"},
        "spec": {"selector": {"app": "api"}, "ports": [{"port": 80}]}})
    .to_string();
    // Namespace-wide: every pod of apps, none of team.
    let s = state(&[ra("apps", "ns", json!({"jwtRules": rule}))]);
    assert!(selects(&s, &ObjectKey::new("apps", "other")));
    assert!(!selects(&s, &ObjectKey::new("team", "api")));
    // Root namespace: mesh-wide.
    let s = state(&[ra("nodemesh-system", "mesh", json!({"jwtRules": rule}))]);
    assert!(selects(&s, &ObjectKey::new("team", "api")));
    assert!(selects(&s, &backend()));
    // targetRefs: the pods the Service selects.
    let s = state(&[
        service,
        ra(
            "team",
            "svc",
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "api-svc"}], "jwtRules": rule}),
        ),
    ]);
    assert!(selects(&s, &ObjectKey::new("team", "api")));
    assert!(!selects(&s, &backend()));
}

#[test]
fn a_selector_beside_target_refs_selects_the_pods_of_both_and_is_reported() {
    let key = TestKey::ed25519("k");
    let rule = json!([{"issuer": ISS, "jwks": jwks(&[&key])}]);
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "backend-svc", "namespace": "apps"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"port": 80}]}})
    .to_string();
    let s = state(&[
        service,
        ra(
            "apps",
            "both",
            json!({"selector": {"matchLabels": {"app": "other"}},
                   "targetRefs": [{"kind": "Service", "name": "backend-svc"}], "jwtRules": rule}),
        ),
    ]);
    // Tokens are checked on the pods of both: the Service's and the selector's.
    assert!(selects(&s, &backend()), "the Service selects backend");
    assert!(
        selects(&s, &ObjectKey::new("apps", "other")),
        "the selector"
    );
    assert!(!selects(&s, &ObjectKey::new("team", "api")));
    let jwt = JwtAuthenticator::new();
    for pod in [backend(), ObjectKey::new("apps", "other")] {
        let mut p = parts("/", &[("authorization", "Bearer not.a.jwt")]);
        assert!(
            matches!(
                jwt.authenticate(&s, &pod, &mut p),
                Authentication::Invalid(_)
            ),
            "{pod}: a bad token is refused"
        );
    }
    let metrics = crate::telemetry::metrics::Metrics::new();
    crate::discovery::problems::ProblemReporter::new().report(&s, &metrics);
    let n = metrics
        .config_problems
        .with_label_values(&["RequestAuthentication", "exclusive_fields"])
        .get();
    assert_eq!(n, 1);
}
