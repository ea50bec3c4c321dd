//! RequestAuthentication through the `kube` source against [`FakeApiServer`]: read at
//! the version the API server serves (v1 or v1beta1, v1 preferred), compiled into the
//! state with its selection, and a missing CRD counts as empty and healthy.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::{
    discovery::apiserver::fake_apiserver::gr, discovery::apiserver::fake_apiserver::FakeApiServer,
    discovery::apiserver::test_agent::eventually, discovery::apiserver::test_agent::start,
    discovery::apiserver::test_agent::versions_read, discovery::apiserver::test_agent::PROMPTLY,
    discovery::cluster::Kind, discovery::request_auth::KeySource, keys::ObjectKey,
};

const SECURITY: &str = "security.istio.io";
fn policy(version: &str, namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": format!("{SECURITY}/{version}"),
        "kind": "RequestAuthentication",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
        "spec": {
            "selector": {"matchLabels": {"app": "backend"}},
            "jwtRules": [{"issuer": "https://issuer.test",
                          "jwksUri": "http://keys.auth.svc.cluster.local:8080/jwks.json"}],
        },
    })
}

fn pod(name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "apps", "resourceVersion": "1", "labels": {"app": app}},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_authentication_is_read_at_the_version_the_api_server_serves() {
    for (served, chosen) in [
        (&["v1beta1"][..], "v1beta1"),
        (&["v1", "v1beta1"][..], "v1"),
    ] {
        let server = FakeApiServer::start().await;
        server.serve_crd(
            SECURITY,
            "requestauthentications",
            "RequestAuthentication",
            served,
        );
        server.apply(&gr("", "pods"), pod("backend", "backend"));
        server.apply(&gr("", "pods"), pod("web", "web"));
        server.apply(
            &gr(SECURITY, "requestauthentications"),
            policy(chosen, "apps", "jwt"),
        );
        let agent = start(&server);
        eventually(
            &format!("the policy, served at {served:?}"),
            PROMPTLY,
            || agent.state().request_authentications.len() == 1 && agent.ready(),
        )
        .await;
        assert_eq!(
            versions_read(&server, SECURITY, "requestauthentications"),
            BTreeSet::from([chosen.to_string()]),
            "served at {served:?}: {:#?}",
            server.requests()
        );
        assert_eq!(
            agent.health.snapshot()[&Kind::RequestAuthentication].version,
            Some(chosen)
        );
        let state = agent.state();
        let selecting = state.request_authentications_for(&ObjectKey::new("apps", "backend"));
        assert_eq!(selecting.len(), 1);
        assert!(matches!(
            &selecting[0].1.rules[0].keys,
            KeySource::Uri(u) if u.host == "keys.auth.svc.cluster.local" && u.port == 8080 && u.path == "/jwks.json"
        ));
        assert!(state
            .request_authentications_for(&ObjectKey::new("apps", "web"))
            .is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_request_authentication_crd_counts_as_empty_until_it_is_installed() {
    let server = FakeApiServer::start().await;
    server.apply(&gr("", "pods"), pod("backend", "backend"));
    let agent = start(&server);
    eventually(
        "RequestAuthentication to count as not installed",
        PROMPTLY,
        || {
            agent.ready()
                && agent.health.snapshot()[&Kind::RequestAuthentication]
                    .not_installed
                    .is_some()
        },
    )
    .await;
    assert!(agent.state().request_authentications.is_empty());
    server.serve_crd(
        SECURITY,
        "requestauthentications",
        "RequestAuthentication",
        &["v1"],
    );
    server.apply(
        &gr(SECURITY, "requestauthentications"),
        policy("v1", "apps", "jwt"),
    );
    eventually("the installed CRD's policy", PROMPTLY, || {
        !agent
            .state()
            .request_authentications_for(&ObjectKey::new("apps", "backend"))
            .is_empty()
    })
    .await;
    assert!(agent.ready());
}
