//! PeerAuthentication through the `kube` source against [`FakeApiServer`]: read at the
//! version the API server serves (v1 or v1beta1, v1 preferred), a CRD that is not
//! installed counts as empty and healthy, and the root namespace the agent is given
//! decides which policy is mesh-wide.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::{
    discovery::apiserver::fake_apiserver::gr, discovery::apiserver::fake_apiserver::FakeApiServer,
    discovery::apiserver::test_agent::eventually,
    discovery::apiserver::test_agent::start_with_root,
    discovery::apiserver::test_agent::versions_read, discovery::apiserver::test_agent::PROMPTLY,
    discovery::cluster::Kind, discovery::mtls::MtlsMode, discovery::mtls::MtlsSource,
    keys::ObjectKey,
};

const SECURITY: &str = "security.istio.io";
fn policy(version: &str, namespace: &str, name: &str, mode: &str) -> Value {
    json!({
        "apiVersion": format!("{SECURITY}/{version}"),
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
        "spec": {"mtls": {"mode": mode}},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_is_read_at_the_version_the_api_server_serves() {
    for (served, chosen) in [
        (&["v1beta1"][..], "v1beta1"),
        (&["v1"][..], "v1"),
        (&["v1", "v1beta1"][..], "v1"),
    ] {
        let server = FakeApiServer::start().await;
        server.serve_crd(
            SECURITY,
            "peerauthentications",
            "PeerAuthentication",
            served,
        );
        let collection = gr(SECURITY, "peerauthentications");
        server.apply(
            &collection,
            policy(chosen, "mesh-root", "default", "STRICT"),
        );
        server.apply(
            &collection,
            policy(chosen, "legacy", "default", "PERMISSIVE"),
        );
        let agent = start_with_root(&server, "mesh-root".parse().unwrap());
        eventually(
            &format!("two policies, served at {served:?}"),
            PROMPTLY,
            || agent.state().peer_authentications.len() == 2 && agent.ready(),
        )
        .await;
        assert_eq!(
            versions_read(&server, SECURITY, "peerauthentications"),
            BTreeSet::from([chosen.to_string()]),
            "served at {served:?}: {:#?}",
            server.requests()
        );
        assert_eq!(
            agent.health.snapshot()[&Kind::PeerAuthentication].version,
            Some(chosen)
        );
        // The root namespace the agent was given makes its policy mesh-wide.
        let state = agent.state();
        let apps = state.namespace_mtls("apps");
        assert_eq!(apps.mode, MtlsMode::Strict, "served at {served:?}");
        assert_eq!(
            apps.source,
            MtlsSource::Mesh {
                policy: ObjectKey::new("mesh-root", "default")
            }
        );
        assert_eq!(state.namespace_mtls("legacy").mode, MtlsMode::Permissive);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_peer_authentication_crd_counts_as_empty_until_it_is_installed() {
    let server = FakeApiServer::start().await;
    server.apply(
        &gr("", "namespaces"),
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "apps", "resourceVersion": "1", "labels": {"nodemesh.io/mtls": "strict"}},
        }),
    );
    let agent = start_with_root(&server, "nodemesh-system".parse().unwrap());
    eventually(
        "the first state, without PeerAuthentication",
        PROMPTLY,
        || agent.ready() && agent.state().namespaces.len() == 1,
    )
    .await;
    eventually(
        "PeerAuthentication to count as not installed",
        PROMPTLY,
        || {
            agent.health.snapshot()[&Kind::PeerAuthentication]
                .not_installed
                .is_some()
        },
    )
    .await;
    assert!(
        agent.ready(),
        "a missing CRD does not make the agent unready"
    );
    assert!(agent.state().peer_authentications.is_empty());
    // Without policies the namespace label decides.
    let apps = agent.state().namespace_mtls("apps");
    assert_eq!(apps.mode, MtlsMode::Strict);
    assert_eq!(
        apps.source,
        MtlsSource::NamespaceLabel {
            namespace: "apps".into()
        }
    );

    // The CRD is installed (as an older Istio serves it) with a namespace-wide policy:
    // it is found and wins over the label.
    server.serve_crd(
        SECURITY,
        "peerauthentications",
        "PeerAuthentication",
        &["v1beta1"],
    );
    server.apply(
        &gr(SECURITY, "peerauthentications"),
        policy("v1beta1", "apps", "default", "PERMISSIVE"),
    );
    eventually("the installed CRD's policy", PROMPTLY, || {
        agent.state().namespace_mtls("apps").mode == MtlsMode::Permissive
    })
    .await;
    assert!(agent.ready());
    assert_eq!(
        agent.state().namespace_mtls("apps").source,
        MtlsSource::Namespace {
            policy: ObjectKey::new("apps", "default")
        }
    );
}
