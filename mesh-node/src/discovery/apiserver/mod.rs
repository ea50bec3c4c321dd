//! The `kube` discovery source: one list-and-watch loop per kind ([`watch`]), all
//! feeding the same [`ClusterState`] the `files` source builds. The event handling
//! ([`KubeState`]) is plain code over events, tested without an API server; the loops
//! talk to the API server through kube-rs's `Client`, and are tested against a
//! scripted one that answers as the real API server does.
//!
//! Outages: requests retry with a short jittered backoff; a relist after "410 Gone"
//! arrives as Init/InitApply/InitDone and replaces that kind wholesale; meanwhile the
//! last good state keeps serving and [`DiscoveryHealth`] reports which kinds are
//! stale, for readiness and metrics. CRD kinds are read at the version API discovery
//! says is served; a CRD that is not installed (or is deleted) counts as empty.

mod health;
pub(crate) mod watch;

use std::{collections::HashMap, sync::Arc, time::Instant};

use gateway_api::apis::experimental::{httproutes::HttpRoute, tcproutes::TcpRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{runtime::watcher, Client};
use tokio::sync::{mpsc, watch as channel};
use tracing::{info, warn};

pub use health::{DiscoveryHealth, KindHealth, STALE_AFTER};
use watch::{watch_kind, KindSpec};

use crate::{
    discovery::authorization_policy::AuthorizationPolicy as IstioAuthorizationPolicy,
    discovery::cluster::ClusterState, discovery::cluster::Kind, discovery::cluster::KubeObject,
    discovery::destination_rule::DestinationRule, discovery::destination_rule::ISTIO_NETWORKING,
    discovery::destination_rule::VERSIONS, discovery::mtls::RootNamespace,
    discovery::peer_authentication::PeerAuthentication,
    discovery::peer_authentication::ISTIO_SECURITY, discovery::policy::AuthorizationPolicy,
    discovery::request_authentication::RequestAuthentication,
    discovery::virtual_service::VirtualService, telemetry::metrics::Metrics,
};

/// Verbs the watchers use: an initial list, then watch. (API discovery needs no
/// grant: every authenticated user may read it.)
pub const WATCH_VERBS: [&str; 2] = ["list", "watch"];

const GATEWAY_API: &str = "gateway.networking.k8s.io";

/// What discovery reads, kind by kind (keep in step with [`run`]).
pub static KINDS: [KindSpec; 13] = [
    KindSpec {
        kind: Kind::Namespace,
        group: "",
        plural: "namespaces",
        versions: &["v1"],
        crd: false,
    },
    KindSpec {
        kind: Kind::Pod,
        group: "",
        plural: "pods",
        versions: &["v1"],
        crd: false,
    },
    KindSpec {
        kind: Kind::Service,
        group: "",
        plural: "services",
        versions: &["v1"],
        crd: false,
    },
    KindSpec {
        kind: Kind::EndpointSlice,
        group: "discovery.k8s.io",
        plural: "endpointslices",
        versions: &["v1"],
        crd: false,
    },
    // The same schema at each version we list.
    KindSpec {
        kind: Kind::HttpRoute,
        group: GATEWAY_API,
        plural: "httproutes",
        versions: &["v1", "v1beta1"],
        crd: true,
    },
    // Gateway API >= 1.5 serves TCPRoute as v1 in the standard channel; older
    // experimental channels as v1alpha2 only.
    KindSpec {
        kind: Kind::TcpRoute,
        group: GATEWAY_API,
        plural: "tcproutes",
        versions: &["v1", "v1alpha2"],
        crd: true,
    },
    KindSpec {
        kind: Kind::AuthorizationPolicy,
        group: "security.nodemesh.io",
        plural: "authorizationpolicies",
        versions: &["v1alpha1"],
        crd: true,
    },
    // Istio's kinds: one schema at each of its versions (ours or Istio's own CRD).
    KindSpec {
        kind: Kind::DestinationRule,
        group: ISTIO_NETWORKING,
        plural: "destinationrules",
        versions: &VERSIONS,
        crd: true,
    },
    KindSpec {
        kind: Kind::VirtualService,
        group: ISTIO_NETWORKING,
        plural: "virtualservices",
        versions: &crate::discovery::virtual_service::VERSIONS,
        crd: true,
    },
    KindSpec {
        kind: Kind::PeerAuthentication,
        group: ISTIO_SECURITY,
        plural: "peerauthentications",
        versions: &crate::discovery::peer_authentication::VERSIONS,
        crd: true,
    },
    KindSpec {
        kind: Kind::IstioAuthorizationPolicy,
        group: ISTIO_SECURITY,
        plural: "authorizationpolicies",
        versions: &crate::discovery::peer_authentication::VERSIONS,
        crd: true,
    },
    KindSpec {
        kind: Kind::RequestAuthentication,
        group: ISTIO_SECURITY,
        plural: "requestauthentications",
        versions: &crate::discovery::peer_authentication::VERSIONS,
        crd: true,
    },
    KindSpec {
        kind: Kind::Telemetry,
        group: crate::discovery::telemetry::ISTIO_TELEMETRY,
        plural: "telemetries",
        versions: &crate::discovery::telemetry::VERSIONS,
        crd: true,
    },
];

fn spec(kind: Kind) -> &'static KindSpec {
    KINDS
        .iter()
        .find(|s| s.kind == kind)
        .unwrap_or_else(|| unreachable!("KINDS lists every Kind"))
}

/// (API group, resource) of everything [`run`] watches; `deploy/` grants exactly these.
pub fn watched_resources() -> Vec<(String, String)> {
    KINDS
        .iter()
        .map(|s| (s.group.to_string(), s.plural.to_string()))
        .collect()
}

/// A watch event with the object already wrapped; errors reduced to what we act on.
#[derive(Debug)]
pub enum SourceEvent {
    Event(watcher::Event<KubeObject>),
    /// The API server answered a list or watch of the kind, served at `version`.
    Answered {
        version: &'static str,
    },
    /// The kind is not served (its CRD is not installed): treat it as empty.
    NotInstalled(String),
    Error(String),
}

/// Applies watcher events of every kind to one state.
#[derive(Default)]
pub struct KubeState {
    state: ClusterState,
    /// Objects of a relist in progress, per kind (between Init and InitDone).
    relisting: HashMap<Kind, Vec<KubeObject>>,
}

impl KubeState {
    /// An empty state whose mesh root namespace is `root` (`--root-namespace`).
    pub fn with_root_namespace(root: &RootNamespace) -> KubeState {
        let mut kube = KubeState::default();
        kube.state.set_root_namespace(root);
        kube
    }

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
            SourceEvent::Answered { version } => {
                health.update(kind, |h| {
                    ok(h);
                    h.version = Some(version);
                    h.not_installed = None;
                });
                false
            }
            SourceEvent::NotInstalled(reason) => {
                self.relisting.remove(&kind);
                let first = health.update(kind, |h| {
                    let first = !h.synced || h.not_installed.is_none();
                    h.synced = true;
                    ok(h);
                    h.version = None;
                    h.not_installed = Some(reason.clone());
                    first
                });
                if first {
                    warn!(kind = kind.name(), %reason, "kind not served by the API server (CRD not installed?); treating it as empty");
                }
                let had = self.state.counts().get(kind.name()).copied().unwrap_or(0) > 0;
                self.state.replace_kind(kind, Vec::new());
                first || had
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

/// Watches every kind of [`KINDS`] and publishes a new state after each batch of
/// events, once all kinds have synced (a partial first state would unenroll pods).
/// `root` is the mesh's root namespace (`--root-namespace`).
pub async fn run(
    client: Client,
    tx: channel::Sender<Arc<ClusterState>>,
    metrics: Arc<Metrics>,
    health: Arc<DiscoveryHealth>,
    root: RootNamespace,
) {
    let (ev_tx, mut ev_rx) = mpsc::channel(4096);
    tokio::spawn(watch_kind::<Namespace>(
        client.clone(),
        spec(Kind::Namespace),
        |o| KubeObject::Namespace(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<Pod>(
        client.clone(),
        spec(Kind::Pod),
        |o| KubeObject::Pod(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<Service>(
        client.clone(),
        spec(Kind::Service),
        |o| KubeObject::Service(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<EndpointSlice>(
        client.clone(),
        spec(Kind::EndpointSlice),
        |o| KubeObject::EndpointSlice(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<HttpRoute>(
        client.clone(),
        spec(Kind::HttpRoute),
        |o| KubeObject::HttpRoute(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<TcpRoute>(
        client.clone(),
        spec(Kind::TcpRoute),
        |o| KubeObject::TcpRoute(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<AuthorizationPolicy>(
        client.clone(),
        spec(Kind::AuthorizationPolicy),
        |o| KubeObject::AuthorizationPolicy(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<DestinationRule>(
        client.clone(),
        spec(Kind::DestinationRule),
        |o| KubeObject::DestinationRule(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<VirtualService>(
        client.clone(),
        spec(Kind::VirtualService),
        |o| KubeObject::VirtualService(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<PeerAuthentication>(
        client.clone(),
        spec(Kind::PeerAuthentication),
        |o| KubeObject::PeerAuthentication(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<IstioAuthorizationPolicy>(
        client.clone(),
        spec(Kind::IstioAuthorizationPolicy),
        |o| KubeObject::IstioAuthorizationPolicy(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<RequestAuthentication>(
        client.clone(),
        spec(Kind::RequestAuthentication),
        |o| KubeObject::RequestAuthentication(Box::new(o)),
        ev_tx.clone(),
    ));
    tokio::spawn(watch_kind::<crate::discovery::telemetry::Telemetry>(
        client,
        spec(Kind::Telemetry),
        |o| KubeObject::Telemetry(Box::new(o)),
        ev_tx,
    ));
    let mut kube = KubeState::with_root_namespace(&root);
    let mut published = false;
    let mut problems = crate::discovery::problems::ProblemReporter::new();
    while let Some((kind, event)) = ev_rx.recv().await {
        let mut changed = false;
        let mut next = Some((kind, event));
        while let Some((kind, event)) = next {
            if let SourceEvent::Error(e) = &event {
                metrics
                    .discovery_errors
                    .with_label_values(&[kind.name()])
                    .inc();
                crate::warn_limited!(kind = kind.name(), error = %e, "watch failed; retrying, the last state keeps serving");
            }
            changed |= kube.handle(kind, event, &health);
            next = ev_rx.try_recv().ok();
        }
        // Stale kinds still publish (the last good objects keep serving); only the
        // first, partial sync is held back.
        if changed && health.every_kind_synced() {
            if !published {
                info!(objects = ?kube.state().counts(), "discovery synced");
                published = true;
            }
            metrics.state_updates.inc();
            problems.report(kube.state(), &metrics);
            tx.send_replace(Arc::new(kube.state().clone()));
        }
    }
}

#[cfg(test)]
mod authz_wire_tests;
#[cfg(test)]
mod fake_apiserver;
#[cfg(test)]
mod peer_auth_wire_tests;
#[cfg(test)]
mod request_auth_wire_tests;
#[cfg(test)]
mod telemetry_wire_tests;
#[cfg(test)]
mod test_agent;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod wire_tests;
