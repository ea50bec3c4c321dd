//! Istio's AuthorizationPolicy, continued: addresses and L4 conditions, JWT claims,
//! targets, the root namespace, which ports are decided per request, both kinds side
//! by side, and broken rules failing closed. (Helpers in `authz_tests`.)

use serde_json::json;

use crate::{
    discovery::authorization::PolicyKind, discovery::cluster::Kind, discovery::mtls::RootNamespace,
    discovery::problems::ProblemReporter, identity::authz::Admission, identity::authz_tests::id,
    identity::authz_tests::istio, identity::authz_tests::state, identity::authz_tests::token,
    identity::authz_tests::Req, telemetry::metrics::Metrics, telemetry::outcome::RefusalReason,
};

#[test]
fn ip_blocks_and_l4_conditions_decide_at_connection_time() {
    let s = state(&istio(
        "by-ip",
        "{rules: [{from: [{source: {ipBlocks: [10.1.0.0/16, 192.168.0.7]}}], when: [{key: destination.port, values: ['8080']}, {key: destination.ip, values: [10.0.0.0/24]}]}]}",
    ));
    let ok = Req::default();
    assert_eq!(
        ok.admit(&s, "default/backend"),
        Admission::Allow {
            policy: Some("default/by-ip".into())
        },
        "no HTTP attribute: decided for the connection"
    );
    for refused in [
        Req {
            source: "10.2.0.1".parse().unwrap(),
            ..Req::default()
        },
        Req {
            port: 9090,
            ..Req::default()
        },
    ] {
        assert!(matches!(
            refused.admit(&s, "default/backend"),
            Admission::Refuse {
                reason: RefusalReason::PolicyDenied,
                ..
            }
        ));
    }
    assert!(Req {
        source: "192.168.0.7".parse().unwrap(),
        ..Req::default()
    }
    .allowed(&s, "default/backend"));
    let s = state(&istio(
        "remote",
        "{rules: [{from: [{source: {remoteIpBlocks: [10.1.0.0/16]}}], when: [{key: remote.ip, values: [10.1.2.0/24]}, {key: source.ip, notValues: [10.1.2.9]}]}]}",
    ));
    assert!(ok.allowed(&s, "default/backend"));
    assert!(!Req {
        source: "10.1.2.9".parse().unwrap(),
        ..Req::default()
    }
    .allowed(&s, "default/backend"));
    assert!(!Req {
        source: "10.1.3.1".parse().unwrap(),
        ..Req::default()
    }
    .allowed(&s, "default/backend"));
}

#[test]
fn claims_nested_and_listed_audiences_presenter_and_principals() {
    let s = state(&istio(
        "admins",
        "{rules: [{when: [{key: 'request.auth.claims[realm][roles]', values: [admin]}, {key: request.auth.audiences, values: ['ap*']}, {key: request.auth.presenter, values: [web-app]}, {key: request.auth.principal, values: ['issuer/*']}, {key: source.principal, values: ['*/sa/client']}, {key: source.namespace, values: [default]}]}]}",
    ));
    let with = |claims| Req {
        auth: Some(token(claims)),
        ..Req::default()
    };
    let base = json!({"iss": "issuer", "sub": "u"});
    let mut admin = base.clone();
    admin["realm"] = json!({"roles": ["user", "admin"]});
    assert!(with(admin.clone()).allowed(&s, "default/backend"));
    let mut single = base.clone();
    single["realm"] = json!({"roles": "admin"});
    assert!(
        with(single).allowed(&s, "default/backend"),
        "a string claim"
    );
    let mut user = base.clone();
    user["realm"] = json!({"roles": ["user"]});
    assert!(!with(user).allowed(&s, "default/backend"));
    let mut flat = base.clone();
    flat["roles"] = json!(["admin"]);
    assert!(!with(flat).allowed(&s, "default/backend"), "not nested");
    assert!(!Req::default().allowed(&s, "default/backend"), "no token");
    let mut elsewhere = with(admin.clone());
    elsewhere.peer = Some(id("other", "client"));
    assert!(
        !elsewhere.allowed(&s, "default/backend"),
        "source.namespace"
    );
    let mut wrong_issuer = admin;
    wrong_issuer["iss"] = json!("other");
    assert!(!with(wrong_issuer).allowed(&s, "default/backend"));
}

#[test]
fn target_refs_pick_the_pods_a_service_selects() {
    let s = state(&istio(
        "web-only",
        "{targetRefs: [{group: '', kind: Service, name: web}], rules: [{from: [{source: {namespaces: [default]}}]}]}",
    ));
    let outsider = Req {
        peer: Some(id("other", "x")),
        ..Req::default()
    };
    assert!(
        !outsider.allowed(&s, "default/frontend"),
        "web selects frontend"
    );
    assert!(Req::default().allowed(&s, "default/frontend"));
    assert!(
        outsider.allowed(&s, "default/backend"),
        "web does not select backend"
    );
    assert!(
        outsider.allowed(&s, "other/elsewhere"),
        "the Service's namespace only"
    );
}

#[test]
fn a_selector_beside_target_refs_is_reported_and_the_policy_applies_to_the_pods_of_both() {
    // web selects frontend; the selector picks backend: the policy checks both.
    let s = state(&istio(
        "both",
        "{selector: {matchLabels: {app: backend}}, targetRefs: [{kind: Service, name: web}], rules: [{from: [{source: {namespaces: [default]}}]}]}",
    ));
    let outsider = Req {
        peer: Some(id("other", "x")),
        ..Req::default()
    };
    for pod in ["default/frontend", "default/backend"] {
        assert!(!outsider.allowed(&s, pod), "{pod} is checked");
        assert!(Req::default().allowed(&s, pod), "{pod}: the rule allows");
    }
    assert!(
        outsider.allowed(&s, "other/elsewhere"),
        "neither selects it"
    );
    let metrics = Metrics::new();
    assert_eq!(ProblemReporter::new().report(&s, &metrics), 1);
    let counted = metrics
        .config_problems
        .with_label_values(&[Kind::IstioAuthorizationPolicy.name(), "exclusive_fields"])
        .get();
    assert_eq!(counted, 1);
}

#[test]
fn root_namespace_policies_apply_mesh_wide() {
    let policies = "\
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-delete, namespace: mesh-root}\nspec: {action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}\n---\n\
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: frontends, namespace: mesh-root}\nspec: {selector: {matchLabels: {app: frontend}}, rules: [{from: [{source: {namespaces: [default]}}]}]}\n---\n\
apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: own-kind, namespace: mesh-root}\nspec: {action: DENY, rules: [{}]}\n";
    let mut s = state(policies);
    let delete = Req {
        method: "DELETE",
        ..Req::default()
    };
    assert!(
        delete.allowed(&s, "other/elsewhere"),
        "mesh-root is not the root yet"
    );
    s.set_root_namespace(&"mesh-root".parse::<RootNamespace>().unwrap());
    let v = delete.ask(&s, "other/elsewhere");
    assert!(!v.allowed);
    assert_eq!(v.policy.as_deref(), Some("mesh-root/no-delete"));
    assert!(!delete.allowed(&s, "default/backend"));
    // The selector applies in every namespace.
    assert!(Req::default().allowed(&s, "other/elsewhere"));
    let outsider = Req {
        peer: Some(id("other", "x")),
        ..Req::default()
    };
    assert!(!outsider.allowed(&s, "other/elsewhere"));
    assert!(outsider.allowed(&s, "default/backend"), "not a frontend");
}

#[test]
fn http_rules_for_one_port_leave_the_others_at_l4() {
    let s = state(&istio(
        "api",
        "{selector: {matchLabels: {app: backend}}, rules: [{to: [{operation: {ports: ['8080'], paths: ['/api/*']}}]}, {to: [{operation: {ports: ['5432']}}]}]}",
    ));
    assert!(matches!(
        Req::default().admit(&s, "default/backend"),
        Admission::Http { .. }
    ));
    let db = Req {
        port: 5432,
        ..Req::default()
    };
    assert_eq!(
        db.admit(&s, "default/backend"),
        Admission::Allow {
            policy: Some("default/api".into())
        }
    );
    let other = Req {
        port: 9000,
        ..Req::default()
    };
    assert!(matches!(
        other.admit(&s, "default/backend"),
        Admission::Refuse {
            reason: RefusalReason::PolicyDenied,
            ..
        }
    ));
    assert_eq!(
        Req::default().admit(&s, "default/frontend"),
        Admission::Allow { policy: None }
    );
}

#[test]
fn an_istio_and_a_nodemesh_policy_of_one_name_are_two_policies() {
    let own = "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: guard, namespace: default}\n\
        spec: {action: DENY, rules: [{from: [{namespaces: [bad], serviceAccounts: [default/banned]}]}]}\n";
    let s = state(&format!(
        "{own}---\n{}",
        istio(
            "guard",
            "{rules: [{from: [{source: {namespaces: [default, bad]}}]}]}"
        )
    ));
    let kinds: Vec<PolicyKind> = s.authorization.policies.keys().map(|k| k.kind).collect();
    assert_eq!(kinds, [PolicyKind::Istio, PolicyKind::Nodemesh]);
    assert!(Req::default().allowed(&s, "default/backend"));
    let bad = Req {
        peer: Some(id("bad", "x")),
        ..Req::default()
    };
    assert!(
        !bad.allowed(&s, "default/backend"),
        "the nodemesh DENY (any of its lists)"
    );
    let banned = Req {
        peer: Some(id("default", "banned")),
        ..Req::default()
    };
    assert!(!banned.allowed(&s, "default/backend"));
    let elsewhere = Req {
        peer: Some(id("third", "x")),
        ..Req::default()
    };
    assert!(!elsewhere.allowed(&s, "default/backend"), "the Istio ALLOW");
}

#[test]
fn broken_rules_fail_closed_and_are_counted_once() {
    let broken_allow = istio("allow-broken", "{rules: [{from: [{source: {ipBlocks: [not-an-ip]}}]}, {to: [{operation: {methods: [GET]}}]}]}");
    let s = state(&broken_allow);
    assert!(
        Req::default().allowed(&s, "default/backend"),
        "the good rule still allows"
    );
    assert!(
        !Req {
            method: "POST",
            ..Req::default()
        }
        .allowed(&s, "default/backend"),
        "the broken rule matches nothing"
    );
    let broken_deny = istio(
        "deny-broken",
        "{action: DENY, rules: [{to: [{operation: {ports: [http]}}]}]}",
    );
    let s = state(&broken_deny);
    let v = Req::default().ask(&s, "default/backend");
    assert!(!v.allowed, "a broken DENY rule matches everything");
    assert_eq!(
        (v.policy.as_deref(), v.rule),
        (Some("default/deny-broken"), Some(0))
    );
    assert!(matches!(
        Req::default().admit(&s, "default/backend"),
        Admission::Refuse { .. }
    ));
    let s = state(&format!("{broken_allow}---\n{broken_deny}"));
    let metrics = Metrics::new();
    let mut reporter = ProblemReporter::new();
    assert_eq!(reporter.report(&s, &metrics), 2);
    assert_eq!(reporter.report(&s, &metrics), 0, "once per version");
    let counted = metrics
        .config_problems
        .with_label_values(&[Kind::IstioAuthorizationPolicy.name(), "bad_value"])
        .get();
    assert_eq!(counted, 2);
}

#[test]
fn plaintext_has_no_principal_but_not_principals_match_it() {
    let s = state(&format!(
        "{}---\n{}",
        istio(
            "only-mtls",
            "{action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}"
        ),
        istio("ns", "{rules: [{from: [{source: {namespaces: ['*']}}]}]}"),
    ));
    let plain = Req {
        peer: None,
        ..Req::default()
    };
    let v = plain.ask(&s, "default/backend");
    assert_eq!(
        (v.allowed, v.policy.as_deref()),
        (false, Some("default/only-mtls"))
    );
    assert!(Req::default().allowed(&s, "default/backend"));
}
