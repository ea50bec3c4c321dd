//! Istio's AuthorizationPolicy decided as Istio documents it: the issue's policies
//! verbatim (principal × method × path, the JWT policy), DENY before ALLOW, AUDIT
//! recording, CUSTOM failing closed and every `not…` form. More in
//! `authz_scope_tests`, with these helpers.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use serde_json::json;

use crate::{
    discovery::cluster::ClusterState, discovery::files::parse_manifest, identity::authz::admit,
    identity::authz::authorize_request, identity::authz::Admission,
    identity::authz::ConnectionFacts, identity::authz::RequestFacts,
    identity::authz::RequestVerdict, identity::jwt::RequestAuth, identity::Identity,
    keys::ObjectKey, telemetry::outcome::RefusalReason,
};

const CLUSTER: &str = "\
apiVersion: v1\nkind: Pod\nmetadata: {name: frontend, namespace: default, labels: {app: frontend}}\nspec: {containers: [{name: c, image: x}]}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: backend, namespace: default, labels: {app: backend}}\nspec: {containers: [{name: c, image: x}]}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: elsewhere, namespace: other, labels: {app: frontend}}\nspec: {containers: [{name: c, image: x}]}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {selector: {app: frontend}, ports: [{port: 80}]}\n";

/// The issue's three documents, verbatim.
const ISSUE: &str = "\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: service-mesh-policy}
spec:
  selector: {matchLabels: {app: frontend}}
  rules:
  - from:
    - source: {principals: [\"cluster.local/ns/default/sa/frontend-service-account\"]}
    to:
    - operation: {methods: [\"GET\", \"POST\"], paths: [\"/api/*\"]}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: jwt-policy}
spec:
  selector: {matchLabels: {app: backend}}
  rules:
  - from:
    - source: {requestPrincipals: [\"*\"]}
    when:
    - key: request.auth.claims[iss]
      values: [\"https://accounts.google.com\"]
";

pub(super) fn state(policies: &str) -> ClusterState {
    ClusterState::from_objects(parse_manifest(&format!("{CLUSTER}---\n{policies}")).unwrap())
}

pub(super) fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

fn pod(key: &str) -> ObjectKey {
    let (ns, name) = key.split_once('/').unwrap();
    ObjectKey::new(ns, name)
}

/// One request; the defaults: GET / from default/client over mTLS, 10.1.2.3 to port
/// 8080, no token.
#[derive(Clone)]
pub(super) struct Req {
    pub(super) peer: Option<Identity>,
    pub(super) source: IpAddr,
    pub(super) port: u16,
    pub(super) method: &'static str,
    pub(super) path: &'static str,
    pub(super) host: &'static str,
    pub(super) headers: HeaderMap,
    pub(super) auth: Option<RequestAuth>,
}

impl Default for Req {
    fn default() -> Req {
        Req {
            peer: Some(id("default", "client")),
            source: "10.1.2.3".parse().unwrap(),
            port: 8080,
            method: "GET",
            path: "/",
            host: "backend.default.svc.cluster.local",
            headers: HeaderMap::new(),
            auth: None,
        }
    }
}

impl Req {
    fn conn(&self) -> ConnectionFacts {
        ConnectionFacts {
            source_ip: self.source,
            peer: self.peer.clone(),
            destination: SocketAddr::new("10.0.0.1".parse().unwrap(), self.port),
        }
    }

    pub(super) fn ask(&self, s: &ClusterState, dest: &str) -> RequestVerdict {
        let facts = RequestFacts {
            method: self.method,
            path: self.path,
            host: self.host,
            headers: &self.headers,
            auth: self.auth.as_ref(),
        };
        authorize_request(s, &pod(dest), &self.conn(), &facts)
    }

    pub(super) fn allowed(&self, s: &ClusterState, dest: &str) -> bool {
        self.ask(s, dest).allowed
    }

    pub(super) fn admit(&self, s: &ClusterState, dest: &str) -> Admission {
        admit(s, &pod(dest), &self.conn())
    }
}

pub(super) fn token(claims: serde_json::Value) -> RequestAuth {
    let claims = claims.as_object().unwrap().clone();
    let iss = claims.get("iss").and_then(|v| v.as_str()).unwrap_or("");
    let sub = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("");
    RequestAuth {
        principal: format!("{iss}/{sub}"),
        audiences: vec!["api".into()],
        presenter: Some("web-app".into()),
        claims: claims.into(),
    }
}

pub(super) fn istio(name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n")
}

#[test]
fn the_issues_policy_decides_by_principal_method_and_path() {
    let s = state(ISSUE);
    let fsa = Some(id("default", "frontend-service-account"));
    for peer in [
        fsa.clone(),
        Some(id("default", "other")),
        Some(id("apps", "frontend-service-account")),
    ] {
        for method in ["GET", "POST", "DELETE", "PUT"] {
            for path in ["/api/x", "/api/", "/apix", "/other", "/API/x"] {
                let r = Req {
                    peer: peer.clone(),
                    method,
                    path,
                    ..Req::default()
                };
                let expected =
                    peer == fsa && ["GET", "POST"].contains(&method) && path.starts_with("/api/");
                let v = r.ask(&s, "default/frontend");
                assert_eq!(v.allowed, expected, "{peer:?} {method} {path}: {v:?}");
                if expected {
                    assert_eq!(v.policy.as_deref(), Some("default/service-mesh-policy"));
                    assert_eq!(v.rule, Some(0));
                }
            }
        }
    }
    // The connection is served as HTTP; plaintext is refused by STRICT first.
    let r = Req {
        peer: fsa,
        ..Req::default()
    };
    assert_eq!(
        r.admit(&s, "default/frontend"),
        Admission::Http {
            policies: vec!["default/service-mesh-policy".into()]
        }
    );
    let plain = Req {
        peer: None,
        ..Req::default()
    };
    assert!(matches!(
        plain.admit(&s, "default/frontend"),
        Admission::Refuse {
            reason: RefusalReason::StrictMtlsPlaintext,
            ..
        }
    ));
}

#[test]
fn post_is_allowed_and_delete_denied() {
    let s = state(ISSUE);
    let r = Req {
        peer: Some(id("default", "frontend-service-account")),
        path: "/api/orders",
        ..Req::default()
    };
    assert!(Req {
        method: "POST",
        ..r.clone()
    }
    .allowed(&s, "default/frontend"));
    let denied = Req {
        method: "DELETE",
        ..r
    }
    .ask(&s, "default/frontend");
    assert!(!denied.allowed);
    assert_eq!(denied.policy, None);
    assert!(denied.detail.contains("none matched"), "{denied:?}");
}

#[test]
fn the_jwt_policy_wants_a_token_from_its_issuer() {
    let s = state(ISSUE);
    let r = Req::default();
    assert_eq!(
        r.admit(&s, "default/backend"),
        Admission::Http {
            policies: vec!["default/jwt-policy".into()]
        }
    );
    assert!(!r.allowed(&s, "default/backend"), "no token");
    let google = token(json!({"iss": "https://accounts.google.com", "sub": "u1"}));
    let v = Req {
        auth: Some(google),
        ..r.clone()
    }
    .ask(&s, "default/backend");
    assert!(v.allowed, "{v:?}");
    assert_eq!(v.policy.as_deref(), Some("default/jwt-policy"));
    let other = token(json!({"iss": "https://evil.example", "sub": "u1"}));
    assert!(!Req {
        auth: Some(other),
        ..r.clone()
    }
    .allowed(&s, "default/backend"));
    // Plaintext is refused by STRICT at connection time.
    assert!(matches!(
        Req { peer: None, ..r }.admit(&s, "default/backend"),
        Admission::Refuse {
            reason: RefusalReason::StrictMtlsPlaintext,
            ..
        }
    ));
}

#[test]
fn deny_wins_over_allow_and_audit_only_records() {
    let s = state(&format!(
        "{}---\n{}---\n{}",
        istio("allow-all", "{rules: [{}]}"),
        istio(
            "no-delete",
            "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}"
        ),
        istio(
            "watch-admin",
            "{action: AUDIT, rules: [{to: [{operation: {paths: ['/admin*']}}]}]}"
        ),
    ));
    let get = Req::default().ask(&s, "default/backend");
    assert!(get.allowed);
    assert_eq!(get.policy.as_deref(), Some("default/allow-all"));
    assert!(get.audited.is_empty());
    let delete = Req {
        method: "DELETE",
        path: "/admin/x",
        ..Req::default()
    }
    .ask(&s, "default/backend");
    assert!(!delete.allowed);
    assert_eq!(delete.policy.as_deref(), Some("default/no-delete"));
    assert_eq!(delete.rule, Some(0));
    let admin = Req {
        path: "/admin/x",
        ..Req::default()
    }
    .ask(&s, "default/backend");
    assert!(admin.allowed, "AUDIT never decides");
    assert_eq!(admin.audited, ["default/watch-admin"]);
    // AUDIT alone: no ALLOW policy, so allowed, and recorded.
    let s = state(&istio("watch", "{action: AUDIT, rules: [{}]}"));
    let v = Req::default().ask(&s, "default/backend");
    assert!(v.allowed && v.audited == ["default/watch"], "{v:?}");
}

#[test]
fn custom_fails_closed_for_the_workloads_it_selects() {
    let s = state(&istio(
        "ext",
        "{action: CUSTOM, provider: {name: opa}, selector: {matchLabels: {app: backend}}, rules: [{to: [{operation: {paths: ['/x']}}]}]}",
    ));
    let r = Req::default();
    match r.admit(&s, "default/backend") {
        Admission::Refuse {
            reason: RefusalReason::PolicyDenied,
            policy,
            detail,
        } => {
            assert_eq!(policy.as_deref(), Some("default/ext"));
            assert!(
                detail.contains("CUSTOM/ext-authz is not supported"),
                "{detail}"
            );
        }
        other => panic!("{other:?}"),
    }
    let v = r.ask(&s, "default/backend");
    assert!(!v.allowed && v.detail.contains("CUSTOM"), "{v:?}");
    assert!(r.allowed(&s, "default/frontend"), "not selected");
}

/// A DENY policy on the backend with one `not…` field: the request the field names
/// passes, another is denied.
#[test]
fn every_not_form_excludes_what_it_names() {
    let caught = Req::default();
    let cases: Vec<(&str, Req, Req)> = vec![
        (
            "{from: [{source: {notPrincipals: ['cluster.local/ns/default/sa/good']}}]}",
            Req {
                peer: Some(id("default", "good")),
                ..Req::default()
            },
            Req {
                peer: None,
                ..Req::default()
            },
        ),
        (
            "{from: [{source: {notRequestPrincipals: ['*']}}]}",
            Req {
                auth: Some(token(json!({"iss": "i", "sub": "s"}))),
                ..Req::default()
            },
            caught.clone(),
        ),
        (
            "{from: [{source: {notNamespaces: [default]}}]}",
            Req::default(),
            Req {
                peer: Some(id("other", "x")),
                ..Req::default()
            },
        ),
        (
            "{from: [{source: {notIpBlocks: [10.1.0.0/16]}}]}",
            Req::default(),
            Req {
                source: "10.9.0.1".parse().unwrap(),
                ..Req::default()
            },
        ),
        (
            "{from: [{source: {notRemoteIpBlocks: [10.1.2.3]}}]}",
            Req::default(),
            Req {
                source: "10.1.2.4".parse().unwrap(),
                ..Req::default()
            },
        ),
        (
            "{to: [{operation: {notHosts: [backend.default.svc.cluster.local]}}]}",
            Req {
                host: "Backend.Default.svc.cluster.local",
                ..Req::default()
            },
            Req {
                host: "evil.example",
                ..Req::default()
            },
        ),
        (
            "{to: [{operation: {notPorts: ['8080']}}]}",
            Req::default(),
            Req {
                port: 9090,
                ..Req::default()
            },
        ),
        (
            "{to: [{operation: {notMethods: [GET]}}]}",
            Req::default(),
            Req {
                method: "POST",
                ..Req::default()
            },
        ),
        (
            "{to: [{operation: {notPaths: ['/public/*']}}]}",
            Req {
                path: "/public/a",
                ..Req::default()
            },
            Req {
                path: "/private",
                ..Req::default()
            },
        ),
        (
            "{when: [{key: 'request.headers[x-env]', notValues: [prod]}]}",
            {
                let mut r = Req::default();
                r.headers.insert("x-env", "prod".parse().unwrap());
                r
            },
            caught.clone(),
        ),
    ];
    for (rule, passes, denied) in cases {
        let s = state(&istio(
            "guard",
            &format!("{{action: DENY, rules: [{rule}]}}"),
        ));
        let p = s.authorization.policies.values().next().unwrap();
        assert!(p.problems.is_empty(), "{rule}: {:?}", p.problems);
        assert!(passes.allowed(&s, "default/backend"), "{rule}: should pass");
        let v = denied.ask(&s, "default/backend");
        assert!(!v.allowed, "{rule}: should be denied: {v:?}");
        assert_eq!(v.policy.as_deref(), Some("default/guard"));
    }
}

#[test]
fn an_l4_allow_by_principal_refuses_plaintext_on_a_permissive_pod() {
    // No PeerAuthentication: PERMISSIVE, plaintext reaches the policy, which has no
    // principal to match and must refuse it at connect time (no HTTP attribute: L4).
    let s = state(&istio(
        "client-only",
        "{selector: {matchLabels: {app: backend}}, rules: [{from: [{source: {principals: [\"cluster.local/ns/default/sa/client\"]}}]}]}",
    ));
    assert!(matches!(
        Req::default().admit(&s, "default/backend"),
        Admission::Allow { .. }
    ));
    assert!(matches!(
        Req {
            peer: None,
            ..Req::default()
        }
        .admit(&s, "default/backend"),
        Admission::Refuse {
            reason: RefusalReason::PolicyDenied,
            ..
        }
    ));
    // Another principal is refused too; a pod the policy does not select is not.
    let other = Req {
        peer: Some(id("default", "intruder")),
        ..Req::default()
    };
    assert!(matches!(
        other.admit(&s, "default/backend"),
        Admission::Refuse { .. }
    ));
    assert!(matches!(
        other.admit(&s, "default/frontend"),
        Admission::Allow { .. }
    ));
}
