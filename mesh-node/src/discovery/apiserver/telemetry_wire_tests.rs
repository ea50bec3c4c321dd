//! Telemetry through the `kube` source against [`FakeApiServer`]: read at the version
//! the API server serves (v1 or v1alpha1, v1 preferred) and resolved per pod; a
//! missing CRD counts as empty and healthy until it is installed.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::{
    discovery::apiserver::fake_apiserver::gr, discovery::apiserver::fake_apiserver::FakeApiServer,
    discovery::apiserver::test_agent::eventually, discovery::apiserver::test_agent::start,
    discovery::apiserver::test_agent::versions_read, discovery::apiserver::test_agent::PROMPTLY,
    discovery::cluster::Kind, keys::ObjectKey,
};

const TELEMETRY: &str = "telemetry.istio.io";

fn telemetry(version: &str, namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": format!("{TELEMETRY}/{version}"),
        "kind": "Telemetry",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
        "spec": spec,
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
async fn telemetry_is_read_at_the_version_the_api_server_serves_and_resolved_per_pod() {
    for (served, chosen) in [
        (&["v1alpha1"][..], "v1alpha1"),
        (&["v1", "v1alpha1"][..], "v1"),
    ] {
        let server = FakeApiServer::start().await;
        server.serve_crd(TELEMETRY, "telemetries", "Telemetry", served);
        server.apply(&gr("", "pods"), pod("backend", "backend"));
        server.apply(&gr("", "pods"), pod("web", "web"));
        server.apply(
            &gr(TELEMETRY, "telemetries"),
            telemetry(
                chosen,
                // The agent's root namespace (--root-namespace, by default this).
                crate::discovery::mtls::DEFAULT_ROOT_NAMESPACE,
                "mesh-default",
                json!({"tracing": [{"providers": [{"name": "otel"}], "randomSamplingPercentage": 10}]}),
            ),
        );
        server.apply(
            &gr(TELEMETRY, "telemetries"),
            telemetry(
                chosen,
                "apps",
                "backend-quiet",
                json!({"selector": {"matchLabels": {"app": "backend"}},
                       "tracing": [{"disableSpanReporting": true}],
                       "accessLogging": [{"disabled": true}]}),
            ),
        );
        let agent = start(&server);
        eventually(
            &format!("the Telemetry resources, served at {served:?}"),
            PROMPTLY,
            || agent.state().telemetries.len() == 2 && agent.ready(),
        )
        .await;
        assert_eq!(
            versions_read(&server, TELEMETRY, "telemetries"),
            BTreeSet::from([chosen.to_string()]),
            "served at {served:?}: {:#?}",
            server.requests()
        );
        assert_eq!(
            agent.health.snapshot()[&Kind::Telemetry].version,
            Some(chosen)
        );
        let state = agent.state();
        let backend = state.telemetry_for(&ObjectKey::new("apps", "backend"));
        assert_eq!(backend.client.disabled, Some(true));
        assert_eq!(backend.client.sampling, Some(10.0));
        assert!(!backend.logs());
        let web = state.telemetry_for(&ObjectKey::new("apps", "web"));
        assert_eq!(
            (web.client.disabled, web.client.providers.clone()),
            (None, Some(vec!["otel".to_string()]))
        );
        assert!(web.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_telemetry_crd_counts_as_empty_until_it_is_installed() {
    let server = FakeApiServer::start().await;
    server.apply(&gr("", "pods"), pod("backend", "backend"));
    let agent = start(&server);
    eventually("Telemetry to count as not installed", PROMPTLY, || {
        agent.ready()
            && agent.health.snapshot()[&Kind::Telemetry]
                .not_installed
                .is_some()
    })
    .await;
    assert!(agent.state().telemetries.is_empty());
    server.serve_crd(TELEMETRY, "telemetries", "Telemetry", &["v1"]);
    server.apply(
        &gr(TELEMETRY, "telemetries"),
        telemetry(
            "v1",
            "apps",
            "quiet",
            json!({"accessLogging": [{"disabled": true}]}),
        ),
    );
    eventually("the installed CRD's resource", PROMPTLY, || {
        !agent
            .state()
            .telemetry_for(&ObjectKey::new("apps", "backend"))
            .logs()
    })
    .await;
    assert!(agent.ready());
}
