use std::{collections::BTreeMap, time::Instant};

use kube::Resource;
use serde::Serialize;

use crate::discovery::apiserver::*;
use crate::{discovery::files::parse_manifest, keys::ObjectKey};

pub(super) const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: apps, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: apps, uid: u1}
spec: {nodeName: a, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: apps, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.2]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: r, namespace: apps}
spec:
  parentRefs: [{kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
---
apiVersion: security.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p, namespace: apps}
spec: {action: DENY, rules: [{from: [{namespaces: [plain]}]}]}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web-vs, namespace: apps}
spec:
  hosts: [web.apps.svc.cluster.local]
  http: [{route: [{destination: {host: web}, weight: 100}]}]
"#;

pub(super) fn objects() -> Vec<KubeObject> {
    parse_manifest(OBJECTS).unwrap()
}

fn ev(e: watcher::Event<KubeObject>) -> SourceEvent {
    SourceEvent::Event(e)
}

/// A comparable rendering of a state: every object, serialized, by kind and key.
pub(super) fn fingerprint(s: &ClusterState) -> Vec<String> {
    fn all<T: Serialize>(kind: &str, m: &BTreeMap<ObjectKey, Arc<T>>) -> Vec<String> {
        m.iter()
            .map(|(k, v)| format!("{kind} {k} {}", serde_json::to_string(&**v).unwrap()))
            .collect()
    }
    [
        all("ns", &s.namespaces),
        all("pod", &s.pods),
        all("svc", &s.services),
        all("slice", &s.endpoint_slices),
        all("http", &s.http_routes),
        all("tcp", &s.tcp_routes),
        all("authz", &s.authorization_policies),
    ]
    .concat()
}

/// The initial list of every kind, as a watcher delivers it.
fn initial_sync(kube: &mut KubeState, health: &DiscoveryHealth, objects: Vec<KubeObject>) {
    for kind in Kind::ALL {
        kube.handle(kind, ev(watcher::Event::Init), health);
        for o in objects.iter().filter(|o| o.kind() == kind) {
            kube.handle(kind, ev(watcher::Event::InitApply(o.clone())), health);
        }
        kube.handle(kind, ev(watcher::Event::InitDone), health);
    }
}

#[test]
fn initial_sync_gives_the_same_state_as_the_files_source() {
    let health = DiscoveryHealth::default();
    let mut kube = KubeState::default();
    assert!(health.unready_reason(Instant::now()).is_some());
    assert!(!health.every_kind_synced());
    initial_sync(&mut kube, &health, objects());
    assert_eq!(health.unready_reason(Instant::now()), None);
    assert!(health.every_kind_synced());
    let files = ClusterState::from_objects(objects());
    assert_eq!(fingerprint(kube.state()), fingerprint(&files));
    assert_eq!(fingerprint(&files).len(), 6);
    assert!(kube
        .state()
        .service_by_ip("10.96.0.10".parse().unwrap())
        .is_some());
}

#[test]
fn applies_deletes_relists_and_errors_end_in_the_files_state() {
    let health = DiscoveryHealth::default();
    let mut kube = KubeState::default();
    initial_sync(&mut kube, &health, objects());
    let all = objects();
    let pod = all.iter().find(|o| o.kind() == Kind::Pod).unwrap().clone();
    let slice = all
        .iter()
        .find(|o| o.kind() == Kind::EndpointSlice)
        .unwrap()
        .clone();

    // Delete then re-add the pod; an error in between changes nothing.
    assert!(kube.handle(Kind::Pod, ev(watcher::Event::Delete(pod.clone())), &health));
    assert!(kube.state().pods.is_empty());
    assert!(!kube.handle(
        Kind::Pod,
        SourceEvent::Error("connection refused".into()),
        &health
    ));
    assert!(
        health.unready_reason(Instant::now()).is_none(),
        "a fresh error is not stale yet"
    );
    assert!(health
        .unready_reason(Instant::now() + STALE_AFTER * 2)
        .unwrap()
        .contains("Pod watch failing"));
    assert!(kube.handle(Kind::Pod, ev(watcher::Event::Apply(pod)), &health));
    assert!(
        health
            .unready_reason(Instant::now() + STALE_AFTER * 2)
            .is_none(),
        "recovered"
    );

    // A relist (after 410 Gone) that no longer has the slice, then one that does.
    kube.handle(Kind::EndpointSlice, ev(watcher::Event::Init), &health);
    assert_eq!(
        kube.state().endpoint_slices.len(),
        1,
        "the old state serves during a relist"
    );
    kube.handle(Kind::EndpointSlice, ev(watcher::Event::InitDone), &health);
    assert!(kube.state().endpoint_slices.is_empty());
    let web = ObjectKey::new("apps", "web");
    assert_eq!(kube.state().endpoint_slices_of(&web).count(), 0);
    kube.handle(Kind::EndpointSlice, ev(watcher::Event::Init), &health);
    kube.handle(
        Kind::EndpointSlice,
        ev(watcher::Event::InitApply(slice)),
        &health,
    );
    kube.handle(Kind::EndpointSlice, ev(watcher::Event::InitDone), &health);

    assert_eq!(
        fingerprint(kube.state()),
        fingerprint(&ClusterState::from_objects(objects()))
    );
    assert_eq!(kube.state().endpoint_slices_of(&web).count(), 1);
}

#[test]
fn a_kind_without_its_crd_counts_as_synced_and_empty() {
    let health = DiscoveryHealth::default();
    let mut kube = KubeState::default();
    let without_routes: Vec<KubeObject> = objects()
        .into_iter()
        .filter(|o| o.kind() != Kind::TcpRoute)
        .collect();
    for kind in Kind::ALL.into_iter().filter(|k| *k != Kind::TcpRoute) {
        kube.handle(kind, ev(watcher::Event::Init), &health);
        for o in without_routes.iter().filter(|o| o.kind() == kind) {
            kube.handle(kind, ev(watcher::Event::InitApply(o.clone())), &health);
        }
        kube.handle(kind, ev(watcher::Event::InitDone), &health);
    }
    assert!(health
        .unready_reason(Instant::now())
        .unwrap()
        .contains("TCPRoute"));
    kube.handle(
        Kind::TcpRoute,
        SourceEvent::NotInstalled("404".into()),
        &health,
    );
    assert_eq!(health.unready_reason(Instant::now()), None);
    assert!(kube.state().tcp_routes.is_empty());
}

#[test]
fn a_crd_deleted_after_sync_empties_its_kind_and_stays_healthy() {
    let health = DiscoveryHealth::default();
    let mut kube = KubeState::default();
    initial_sync(&mut kube, &health, objects());
    assert_eq!(kube.state().tcp_routes.len(), 1);
    // The re-watch was refused (404) before discovery confirmed the CRD is gone.
    kube.handle(Kind::TcpRoute, SourceEvent::Error("404".into()), &health);
    assert!(kube.handle(
        Kind::TcpRoute,
        SourceEvent::NotInstalled("not served".into()),
        &health
    ));
    assert!(kube.state().tcp_routes.is_empty());
    assert_eq!(
        health.unready_reason(Instant::now() + STALE_AFTER * 2),
        None
    );
    assert_eq!(
        health.snapshot()[&Kind::TcpRoute].not_installed.as_deref(),
        Some("not served")
    );
    // Rechecks that find it still absent change nothing.
    assert!(!kube.handle(
        Kind::TcpRoute,
        SourceEvent::NotInstalled("not served".into()),
        &health
    ));
}

#[test]
fn an_answer_of_the_api_server_clears_a_failure_without_any_object_event() {
    let health = DiscoveryHealth::default();
    let mut kube = KubeState::default();
    initial_sync(&mut kube, &health, objects());
    kube.handle(
        Kind::Namespace,
        SourceEvent::Error("connection refused".into()),
        &health,
    );
    let later = Instant::now() + STALE_AFTER * 2;
    assert!(health.unready_reason(later).is_some());
    assert!(health.staleness(later)[0].1 > 0.0);
    // A re-watch that succeeds and stays silent.
    assert!(!kube.handle(
        Kind::Namespace,
        SourceEvent::Answered { version: "v1" },
        &health
    ));
    assert_eq!(health.unready_reason(later), None);
    assert!(health.staleness(later).iter().all(|(_, s)| *s == 0.0));
    assert_eq!(health.snapshot()[&Kind::Namespace].version, Some("v1"));
}

#[test]
fn the_kinds_read_agree_with_the_rust_types() {
    fn check<K: Resource<DynamicType = ()>>(kind: Kind) {
        let spec = super::spec(kind);
        assert_eq!(spec.group, K::group(&()), "{kind:?}");
        assert_eq!(spec.plural, K::plural(&()), "{kind:?}");
        assert!(
            spec.versions.contains(&&*K::version(&())),
            "{kind:?}: the type's own version is read"
        );
    }
    check::<k8s_openapi::api::core::v1::Namespace>(Kind::Namespace);
    check::<k8s_openapi::api::core::v1::Pod>(Kind::Pod);
    check::<k8s_openapi::api::core::v1::Service>(Kind::Service);
    check::<k8s_openapi::api::discovery::v1::EndpointSlice>(Kind::EndpointSlice);
    check::<gateway_api::apis::experimental::httproutes::HttpRoute>(Kind::HttpRoute);
    check::<gateway_api::apis::experimental::tcproutes::TcpRoute>(Kind::TcpRoute);
    check::<crate::discovery::policy::AuthorizationPolicy>(Kind::AuthorizationPolicy);
    check::<crate::discovery::virtual_service::VirtualService>(Kind::VirtualService);
    assert_eq!(KINDS.len(), Kind::ALL.len());
    // Built-in kinds are never "not installed".
    assert!(KINDS
        .iter()
        .filter(|s| s.group.is_empty() || s.group == "discovery.k8s.io")
        .all(|s| !s.crd));
}

#[test]
fn the_preferred_served_version_is_chosen() {
    let tcp = super::spec(Kind::TcpRoute);
    assert_eq!(tcp.choose_version(|v| v == "v1"), Some("v1"));
    assert_eq!(tcp.choose_version(|v| v == "v1alpha2"), Some("v1alpha2"));
    assert_eq!(
        tcp.choose_version(|v| v == "v1" || v == "v1alpha2"),
        Some("v1")
    );
    assert_eq!(tcp.choose_version(|v| v == "v1beta1"), None);
}

#[test]
fn a_v1_tcproute_decodes_into_the_type_read() {
    let v1 = OBJECTS.replace(
        "gateway.networking.k8s.io/v1alpha2",
        "gateway.networking.k8s.io/v1",
    );
    let routes: Vec<KubeObject> = parse_manifest(&v1)
        .unwrap()
        .into_iter()
        .filter(|o| o.kind() == Kind::TcpRoute)
        .collect();
    assert_eq!(routes.len(), 1);
}
