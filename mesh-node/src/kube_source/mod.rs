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
mod fake_apiserver;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod wire_tests;
