//! The `kube` discovery source: one kube-rs watcher per kind, all feeding the same
//! [`ClusterState`] the `files` source builds. The event handling ([`KubeState`]) is
//! plain code over `watcher::Event`s, tested without an API server; the glue that
//! opens the watches is thin.
//!
//! Outages: watchers retry with backoff (kube-rs `default_backoff`); a relist after
//! "410 Gone" arrives as Init/InitApply/InitDone and replaces that kind wholesale;
//! meanwhile the last good state keeps serving and [`DiscoveryHealth`] reports which
//! kinds are stale, for readiness and metrics.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use gateway_api::apis::experimental::{httproutes::HttpRoute, tcproutes::TcpRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    metrics::Metrics,
    policy::AuthorizationPolicy,
    state::{ClusterState, Kind, KubeObject},
};

/// Verbs the watchers use (kube-rs watcher: an initial list, then watch).
pub const WATCH_VERBS: [&str; 2] = ["list", "watch"];

/// (API group, resource) of everything [`run`] watches; `deploy/` grants exactly these.
pub fn watched_resources() -> Vec<(String, String)> {
    fn resource<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned())
    }
    vec![
        resource::<Namespace>(),
        resource::<Pod>(),
        resource::<Service>(),
        resource::<EndpointSlice>(),
        resource::<HttpRoute>(),
        resource::<TcpRoute>(),
        resource::<AuthorizationPolicy>(),
    ]
}

/// A kind failing for longer than this makes the agent unready.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// A watch event with the object already wrapped; errors reduced to what we act on.
#[derive(Debug)]
pub enum SourceEvent {
    Event(watcher::Event<KubeObject>),
    /// The kind is not served (its CRD is not installed): treat it as empty.
    NotInstalled(String),
    Error(String),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KindHealth {
    pub synced: bool,
    #[serde(skip)]
    pub failing_since: Option<Instant>,
    pub last_error: Option<String>,
}

/// Per-kind sync state of discovery, shared with readiness and the admin API.
#[derive(Debug, Default)]
pub struct DiscoveryHealth {
    kinds: Mutex<BTreeMap<Kind, KindHealth>>,
}

impl DiscoveryHealth {
    fn update(&self, kind: Kind, f: impl FnOnce(&mut KindHealth)) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        f(kinds.entry(kind).or_default());
    }

    /// Marks every kind synced (the `files` source has no partial state).
    pub fn all_synced(&self) {
        for kind in Kind::ALL {
            self.update(kind, |h| h.synced = true);
        }
    }

    /// Whether every kind has completed an initial list at least once.
    pub fn every_kind_synced(&self) -> bool {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        Kind::ALL
            .iter()
            .all(|k| kinds.get(k).is_some_and(|h| h.synced))
    }

    /// Why the state should not be trusted, or None.
    pub fn unready_reason(&self, now: Instant) -> Option<String> {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        for kind in Kind::ALL {
            let h = kinds.get(&kind);
            if !h.is_some_and(|h| h.synced) {
                return Some(format!("{} not synced yet", kind.name()));
            }
            if let Some(since) = h.and_then(|h| h.failing_since) {
                if now.duration_since(since) > STALE_AFTER {
                    return Some(format!(
                        "{} watch failing for {}s: {}",
                        kind.name(),
                        now.duration_since(since).as_secs(),
                        h.and_then(|h| h.last_error.clone()).unwrap_or_default()
                    ));
                }
            }
        }
        None
    }

    /// Seconds each kind has been failing (0 when healthy).
    pub fn staleness(&self, now: Instant) -> Vec<(Kind, f64)> {
        let kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        Kind::ALL
            .iter()
            .map(|k| {
                let since = kinds.get(k).and_then(|h| h.failing_since);
                (
                    *k,
                    since.map_or(0.0, |s| now.duration_since(s).as_secs_f64()),
                )
            })
            .collect()
    }

    pub fn snapshot(&self) -> BTreeMap<Kind, KindHealth> {
        self.kinds.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Applies watcher events of every kind to one state.
#[derive(Default)]
pub struct KubeState {
    state: ClusterState,
    /// Objects of a relist in progress, per kind (between Init and InitDone).
    relisting: HashMap<Kind, Vec<KubeObject>>,
}

impl KubeState {
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Applies one event; returns whether the published state changed.
    pub fn handle(&mut self, kind: Kind, event: SourceEvent, health: &DiscoveryHealth) -> bool {
        let ok = |h: &mut KindHealth| {
            h.failing_since = None;
            h.last_error = None;
        };
        match event {
            SourceEvent::Event(watcher::Event::Init) => {
                self.relisting.insert(kind, Vec::new());
                false
            }
            SourceEvent::Event(watcher::Event::InitApply(o)) => {
                self.relisting.entry(kind).or_default().push(o);
                false
            }
            SourceEvent::Event(watcher::Event::InitDone) => {
                let objects = self.relisting.remove(&kind).unwrap_or_default();
                self.state.replace_kind(kind, objects);
                health.update(kind, |h| {
                    h.synced = true;
                    ok(h);
                });
                true
            }
            SourceEvent::Event(watcher::Event::Apply(o)) => {
                self.state.apply(o);
                health.update(kind, ok);
                true
            }
            SourceEvent::Event(watcher::Event::Delete(o)) => {
                if let Some(key) = o.key() {
                    self.state.delete(kind, &key);
                }
                health.update(kind, ok);
                true
            }
            SourceEvent::NotInstalled(reason) => {
                let mut first = false;
                health.update(kind, |h| {
                    first = !h.synced;
                    h.synced = true;
                    h.last_error = Some(reason.clone());
                });
                if first {
                    warn!(kind = kind.name(), %reason, "kind not served by the API server (CRD not installed?); treating it as empty");
                    self.state.replace_kind(kind, Vec::new());
                }
                first
            }
            SourceEvent::Error(reason) => {
                health.update(kind, |h| {
                    h.failing_since.get_or_insert_with(Instant::now);
                    h.last_error = Some(reason);
                });
                false
            }
        }
    }
}

fn map_event<K>(event: watcher::Event<K>, wrap: fn(K) -> KubeObject) -> watcher::Event<KubeObject> {
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(wrap(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(wrap(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(wrap(o)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    let api = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s,
        _ => return false,
    };
    api.code == 404
}

async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    wrap: fn(K) -> KubeObject,
    tx: mpsc::Sender<(Kind, SourceEvent)>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(e) => SourceEvent::Event(map_event(e, wrap)),
            Err(e) if is_not_found(&e) => SourceEvent::NotInstalled(e.to_string()),
            Err(e) => SourceEvent::Error(e.to_string()),
        };
        if tx.send((kind, event)).await.is_err() {
            return;
        }
    }
}

/// Watches every kind (keep in step with [`watched_resources`]) and publishes a new state after each batch of events, once all
/// kinds have synced (a partial first state would unenroll pods).
pub async fn run(
    client: Client,
    tx: watch::Sender<Arc<ClusterState>>,
    metrics: Arc<Metrics>,
    health: Arc<DiscoveryHealth>,
) {
    let (ev_tx, mut ev_rx) = mpsc::channel(4096);
    tokio::spawn(watch_kind(
        Api::<Namespace>::all(client.clone()),
        Kind::Namespace,
        |o| KubeObject::Namespace(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<Pod>::all(client.clone()),
        Kind::Pod,
        |o| KubeObject::Pod(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<Service>::all(client.clone()),
        Kind::Service,
        |o| KubeObject::Service(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<EndpointSlice>::all(client.clone()),
        Kind::EndpointSlice,
        |o| KubeObject::EndpointSlice(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<HttpRoute>::all(client.clone()),
        Kind::HttpRoute,
        |o| KubeObject::HttpRoute(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<TcpRoute>::all(client.clone()),
        Kind::TcpRoute,
        |o| KubeObject::TcpRoute(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<AuthorizationPolicy>::all(client),
        Kind::AuthorizationPolicy,
        |o| KubeObject::AuthorizationPolicy(Box::new(o)),
        ev_tx,
    ));
    let mut kube = KubeState::default();
    let mut published = false;
    while let Some((kind, event)) = ev_rx.recv().await {
        if let SourceEvent::Error(e) = &event {
            metrics
                .discovery_errors
                .with_label_values(&[kind.name()])
                .inc();
            warn!(kind = kind.name(), error = %e, "watch failed; retrying with backoff, the last state keeps serving");
        }
        let mut changed = kube.handle(kind, event, &health);
        while let Ok((kind, event)) = ev_rx.try_recv() {
            changed |= kube.handle(kind, event, &health);
        }
        // Stale kinds still publish (the last good objects keep serving); only the
        // first, partial sync is held back.
        if changed && health.every_kind_synced() {
            if !published {
                info!(objects = ?kube.state().counts(), "discovery synced");
                published = true;
            }
            metrics.state_updates.inc();
            tx.send_replace(Arc::new(kube.state().clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{files_source::parse_manifest, state::ObjectKey};

    const OBJECTS: &str = r#"
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
"#;

    fn objects() -> Vec<KubeObject> {
        parse_manifest(OBJECTS).unwrap()
    }

    fn ev(e: watcher::Event<KubeObject>) -> SourceEvent {
        SourceEvent::Event(e)
    }

    /// A comparable rendering of a state: every object, serialized, by kind and key.
    fn fingerprint(s: &ClusterState) -> Vec<String> {
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
}
