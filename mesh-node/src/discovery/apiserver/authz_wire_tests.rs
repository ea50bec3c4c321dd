//! Istio's AuthorizationPolicy through the `kube` source against [`FakeApiServer`]:
//! read at the version the API server serves (v1 or v1beta1, v1 preferred) beside
//! Nodemesh's own kind of the same name (two policies, not one), and a policy that
//! cannot be compiled reported by name and counted once, then fixed and deleted by
//! watch events.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::{
    discovery::apiserver::fake_apiserver::gr, discovery::apiserver::fake_apiserver::FakeApiServer,
    discovery::apiserver::test_agent::eventually, discovery::apiserver::test_agent::start,
    discovery::apiserver::test_agent::versions_read, discovery::apiserver::test_agent::PROMPTLY,
    discovery::authorization::Action, discovery::authorization::PolicyId,
    discovery::authorization::PolicyKind, discovery::cluster::Kind, keys::ObjectKey,
};

const SECURITY: &str = "security.istio.io";
fn istio(version: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": format!("{SECURITY}/{version}"),
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "apps", "resourceVersion": "1"},
        "spec": spec,
    })
}

fn id(kind: PolicyKind, name: &str) -> PolicyId {
    PolicyId {
        kind,
        key: ObjectKey::new("apps", name),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_policies_are_read_at_the_served_version_beside_nodemesh_ones_of_the_same_name() {
    for (served, chosen) in [
        (&["v1beta1"][..], "v1beta1"),
        (&["v1"][..], "v1"),
        (&["v1", "v1beta1"][..], "v1"),
    ] {
        let server = FakeApiServer::start().await;
        server.serve_crd(
            SECURITY,
            "authorizationpolicies",
            "AuthorizationPolicy",
            served,
        );
        server.serve_crd(
            "security.nodemesh.io",
            "authorizationpolicies",
            "AuthorizationPolicy",
            &["v1alpha1"],
        );
        let spec =
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]});
        server.apply(
            &gr(SECURITY, "authorizationpolicies"),
            istio(chosen, "guard", spec),
        );
        server.apply(
            &gr("security.nodemesh.io", "authorizationpolicies"),
            json!({
                "apiVersion": "security.nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "guard", "namespace": "apps", "resourceVersion": "1"},
                "spec": {"action": "ALLOW", "rules": [{"from": [{"namespaces": ["apps"]}]}]},
            }),
        );
        let agent = start(&server);
        eventually(
            &format!("both policies, served at {served:?}"),
            PROMPTLY,
            || agent.state().authorization.policies.len() == 2 && agent.ready(),
        )
        .await;
        assert_eq!(
            versions_read(&server, SECURITY, "authorizationpolicies"),
            BTreeSet::from([chosen.to_string()])
        );
        assert_eq!(
            agent.health.snapshot()[&Kind::IstioAuthorizationPolicy].version,
            Some(chosen)
        );
        let state = agent.state();
        let istio = &state.authorization.policies[&id(PolicyKind::Istio, "guard")];
        assert_eq!(istio.action, Action::Deny);
        assert!(istio.is_http(), "methods make it an HTTP policy");
        let own = &state.authorization.policies[&id(PolicyKind::Nodemesh, "guard")];
        assert_eq!(own.action, Action::Allow);
        assert!(!own.is_http());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_policy_is_counted_once_then_fixed_and_deleted_by_watch_events() {
    let server = FakeApiServer::start().await;
    server.serve_crd(
        SECURITY,
        "authorizationpolicies",
        "AuthorizationPolicy",
        &["v1"],
    );
    let collection = gr(SECURITY, "authorizationpolicies");
    let broken = json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]});
    server.apply(&collection, istio("v1", "by-ip", broken));
    server.apply(
        &collection,
        istio("v1", "neighbour", json!({"action": "AUDIT", "rules": [{}]})),
    );
    let agent = start(&server);
    eventually("both policies", PROMPTLY, || {
        agent.ready() && agent.state().authorization.policies.len() == 2
    })
    .await;
    eventually("the problem counted", PROMPTLY, || {
        agent.problems(Kind::IstioAuthorizationPolicy, "bad_value") == 1
    })
    .await;
    let state = agent.state();
    let p = &state.authorization.policies[&id(PolicyKind::Istio, "by-ip")];
    assert_eq!(p.problems[0].field, "rules[0].from[0].source.ipBlocks[0]");
    assert!(
        state.authorization.policies[&id(PolicyKind::Istio, "neighbour")]
            .problems
            .is_empty(),
        "its neighbour compiles"
    );

    // Fixed by a watch event: no new problem; then deleted.
    let mut fixed = istio(
        "v1",
        "by-ip",
        json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/24"]}}]}]}),
    );
    fixed["metadata"]["resourceVersion"] = json!("2");
    server.apply(&collection, fixed);
    eventually("the fixed policy", PROMPTLY, || {
        agent.state().authorization.policies[&id(PolicyKind::Istio, "by-ip")]
            .problems
            .is_empty()
    })
    .await;
    assert_eq!(
        agent.problems(Kind::IstioAuthorizationPolicy, "bad_value"),
        1,
        "counted once"
    );
    server.delete(&collection, "apps", "by-ip");
    eventually("the deleted policy gone", PROMPTLY, || {
        agent.state().authorization.policies.len() == 1
    })
    .await;
}
