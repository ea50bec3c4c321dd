//! End-to-end: Istio's RequestAuthentication checks JSON Web Tokens at the destination
//! node, with the issuer's keys served by a meshed pod of the cluster and fetched by the
//! agent through the mesh (`jwksUri: http://keys.auth.svc.cluster.local:8080/...`).
//! With an AuthorizationPolicy requiring a request principal: a valid token → 200; an
//! expired one, a wrong issuer, a wrong audience, a bad signature → 401; no token →
//! 403. The JWKS server rotates to a new key: its tokens pass within the refresh
//! interval. The JWKS pod goes away: the last good keys keep working.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use jsonwebtoken::{jwk::Jwk, Algorithm, EncodingKey, Header};
use mesh_tests::sim::{services::ServiceSpec, ClusterSpec, PodSpec, SimCluster};
use serde_json::{json, Value};

const ISSUER: &str = "https://issuer.nodemesh.test";
const AUDIENCE: &str = "backend";
/// The agents' `--jwks-refresh`.
const REFRESH: Duration = Duration::from_secs(2);

struct Key {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl Key {
    fn new(alg: Algorithm, kid: &str) -> Key {
        let (which, make): (_, fn(&[u8]) -> EncodingKey) = match alg {
            Algorithm::EdDSA => (&rcgen::PKCS_ED25519, EncodingKey::from_ed_der),
            _ => (&rcgen::PKCS_ECDSA_P256_SHA256, EncodingKey::from_ec_der),
        };
        let pair = rcgen::KeyPair::generate_for(which).unwrap();
        let encoding = make(&pair.serialize_der());
        let jwk = if alg == Algorithm::EdDSA {
            // The crate reads Ed25519 JWKs only out of PKCS#8 v1 keys (aws-lc writes
            // v2): the public JWK from the raw public key.
            use base64::Engine;
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
            json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA"})
        } else {
            let mut jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
            jwk.common.key_id = Some(kid.into());
            serde_json::to_value(&jwk).unwrap()
        };
        Key {
            alg,
            kid: kid.into(),
            encoding,
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn claims(iss: &str, aud: &str, exp: i64) -> Value {
    json!({"iss": iss, "sub": "alice", "aud": aud, "iat": now(), "exp": exp})
}

fn jwks(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

const REQUEST_AUTHENTICATION: &str = r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: apps}
spec:
  selector: {matchLabels: {app: server}}
  jwtRules:
  - issuer: "https://issuer.nodemesh.test"
    audiences: [backend]
    jwksUri: http://keys.auth.svc.cluster.local:8080/jwks.json
"#;

const REQUIRE_PRINCIPAL: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: apps}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from:
    - source: {requestPrincipals: ["*"]}
"#;

/// Two nodes: `client` on a; `server` (the backend) on b; the JWKS server `jwks` in
/// its own meshed namespace `auth` on a, behind the Service `keys`.
fn cluster() -> SimCluster {
    let mut spec = ClusterSpec::two_nodes();
    spec.namespaces.push(("auth".into(), true));
    spec.pods.push(PodSpec::new("jwks", "auth", "a"));
    spec.services
        .push(ServiceSpec::new("keys", "auth", 8080, 8080, &["jwks"]));
    spec.agent_args.extend([
        "--jwks-refresh".to_string(),
        format!("{}s", REFRESH.as_secs()),
    ]);
    SimCluster::create(spec).unwrap()
}

/// The status of one GET from `client` to the backend with `token` as a bearer token.
fn status(cluster: &SimCluster, token: Option<&str>) -> u16 {
    let dst = cluster.pod("server").addr4(8080);
    let header = token.map(|t| format!("authorization: Bearer {t}"));
    let extra: Vec<&str> = match &header {
        Some(h) => vec!["-H", h],
        None => vec![],
    };
    let r = cluster.http("client", dst, "server", "/", &extra).unwrap();
    r.statuses.keys().next().copied().unwrap_or(0)
}

fn write(path: &PathBuf, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn jwt_from_a_jwks_served_in_the_mesh_is_checked_at_the_destination() {
    let cluster = cluster();
    let first = Key::new(Algorithm::ES256, "first");
    let second = Key::new(Algorithm::EdDSA, "second");
    let impostor = Key::new(Algorithm::ES256, "first");
    let file = cluster.work_dir.join("jwks.json");
    write(&file, &jwks(&[&first]));
    let jwks_server = cluster.http_serve_file("jwks", 8080, &file).unwrap();
    let _backend = cluster.http_serve("server", &[8080]).unwrap();
    cluster.start_agents().unwrap();
    cluster
        .write_manifest("request-authentication.yaml", REQUEST_AUTHENTICATION)
        .unwrap();
    cluster
        .write_manifest("require-principal.yaml", REQUIRE_PRINCIPAL)
        .unwrap();

    let valid = first.sign(&claims(ISSUER, AUDIENCE, now() + 3600));
    // Both policies in force (the two files may reach node b in two snapshots, and
    // before either, every request passes at L4) and the keys fetched: a token that
    // fails is refused, no token is denied, the valid one passes.
    let fetched = cluster.eventually(Duration::from_secs(15), || {
        status(&cluster, Some("not.a.token")) == 401
            && status(&cluster, None) == 403
            && status(&cluster, Some(&valid)) == 200
    });
    assert!(
        fetched.is_some(),
        "a valid token never passed (keys never fetched through the mesh?); b's log:\n{}",
        cluster.agent_log("b")
    );

    let cases = [
        (
            "expired",
            first.sign(&claims(ISSUER, AUDIENCE, now() - 3600)),
        ),
        (
            "wrong issuer",
            first.sign(&claims("https://evil.test", AUDIENCE, now() + 3600)),
        ),
        (
            "wrong audience",
            first.sign(&claims(ISSUER, "someone-else", now() + 3600)),
        ),
        (
            "bad signature",
            impostor.sign(&claims(ISSUER, AUDIENCE, now() + 3600)),
        ),
        ("malformed", "not.a.token".to_string()),
        ("huge", "a".repeat(9000)),
    ];
    for (why, token) in &cases {
        assert_eq!(status(&cluster, Some(token)), 401, "{why}");
    }
    assert_eq!(status(&cluster, Some(&valid)), 200, "valid, again");

    // The issuer rotates to a new key: its tokens pass within the refresh interval
    // (plus the time the request takes), the old key's no longer.
    let rotated_token = second.sign(&claims(ISSUER, AUDIENCE, now() + 3600));
    assert_eq!(
        status(&cluster, Some(&rotated_token)),
        401,
        "before rotation"
    );
    write(&file, &jwks(&[&second]));
    let rotated = Instant::now();
    let took = cluster
        .eventually(REFRESH * 3, || {
            status(&cluster, Some(&rotated_token)) == 200
        })
        .expect("the rotated key never passed");
    assert!(
        took <= REFRESH * 2,
        "the rotated key passed {took:?} after the rotation (refresh {REFRESH:?})"
    );
    assert!(rotated.elapsed() < REFRESH * 3);
    assert_eq!(status(&cluster, Some(&valid)), 401, "the retired key");

    // The JWKS pod goes away: fetches fail, the last good keys keep working.
    drop(jwks_server);
    std::thread::sleep(REFRESH * 3);
    assert_eq!(
        status(&cluster, Some(&rotated_token)),
        200,
        "after the JWKS server went away"
    );
    let metrics = cluster.scrape_metrics("b").unwrap();
    let failed = metrics
        .lines()
        .filter(|l| l.starts_with("nodemesh_jwks_fetches_total") && !l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(failed >= 1.0, "no failed fetch counted:\n{metrics}");

    // No token passes authentication; the policy requires a principal: 403.
    assert_eq!(status(&cluster, None), 403, "no token");
}
