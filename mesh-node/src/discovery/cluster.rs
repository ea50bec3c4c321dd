//! The agent's view of the cluster: Kubernetes objects by kind, plus the indexes the
//! proxy needs. Sources mutate a working copy and publish snapshots; a snapshot is
//! cheap (each kind is an `Arc`'d map of `Arc`'d objects), and a change to one kind
//! copies only that kind's map. Keeping the objects and their indexes is here; asking
//! them (`*_for`, `*_by_ip`, the mTLS modes) is in `discovery::lookups`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use gateway_api::apis::experimental::{httproutes::HttpRoute, tcproutes::TcpRoute};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Serialize;

pub use crate::{
    discovery::addresses::canonical, discovery::addresses::ip_from_key,
    discovery::addresses::ip_key, discovery::addresses::pod_ips,
    discovery::addresses::service_account, discovery::addresses::service_ips,
    discovery::enrollment::plan, discovery::enrollment::NotEnrolled,
    discovery::enrollment::PodPlan, discovery::enrollment::EXCLUDE_INBOUND_PORTS,
    discovery::enrollment::EXCLUDE_OUTBOUND_CIDRS, discovery::enrollment::EXCLUDE_OUTBOUND_PORTS,
    discovery::enrollment::MESH_LABEL, discovery::mtls::MTLS_LABEL,
    discovery::route_parents::ServiceParents, discovery::service_ref::is_service_parent,
};

use crate::{
    discovery::authorization::AuthzIndex,
    discovery::authorization_policy::AuthorizationPolicy as IstioAuthorizationPolicy,
    discovery::destination_rule::DestinationRule, discovery::mtls::PeerAuthIndex,
    discovery::mtls::RootNamespace, discovery::peer_authentication::PeerAuthentication,
    discovery::policy::AuthorizationPolicy, discovery::request_auth::RequestAuthIndex,
    discovery::request_authentication::RequestAuthentication,
    discovery::route_parents::route_index, discovery::telemetry::Telemetry,
    discovery::telemetry_index::TelemetryIndex, discovery::traffic_policy::compile,
    discovery::traffic_policy::CompiledRule, discovery::traffic_policy::Problem,
    discovery::traffic_policy::ProblemReason, discovery::virtual_service::VirtualService,
    keys::ObjectKey,
};

/// Label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The kinds the agent watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    HttpRoute,
    TcpRoute,
    AuthorizationPolicy,
    DestinationRule,
    VirtualService,
    PeerAuthentication,
    /// Istio's (`security.istio.io`); `AuthorizationPolicy` is Nodemesh's own.
    IstioAuthorizationPolicy,
    RequestAuthentication,
    Telemetry,
}

impl Kind {
    pub const ALL: [Kind; 13] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::HttpRoute,
        Kind::TcpRoute,
        Kind::AuthorizationPolicy,
        Kind::DestinationRule,
        Kind::VirtualService,
        Kind::PeerAuthentication,
        Kind::IstioAuthorizationPolicy,
        Kind::RequestAuthentication,
        Kind::Telemetry,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::HttpRoute => "HTTPRoute",
            Kind::TcpRoute => "TCPRoute",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::DestinationRule => "DestinationRule",
            Kind::VirtualService => "VirtualService",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::IstioAuthorizationPolicy => "AuthorizationPolicy.security.istio.io",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::Telemetry => "Telemetry",
        }
    }
}

/// A Kubernetes object the agent understands.
#[derive(Debug, Clone)]
pub enum KubeObject {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    HttpRoute(Box<HttpRoute>),
    TcpRoute(Box<TcpRoute>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    DestinationRule(Box<DestinationRule>),
    VirtualService(Box<VirtualService>),
    PeerAuthentication(Box<PeerAuthentication>),
    IstioAuthorizationPolicy(Box<IstioAuthorizationPolicy>),
    RequestAuthentication(Box<RequestAuthentication>),
    Telemetry(Box<Telemetry>),
}

impl KubeObject {
    pub fn kind(&self) -> Kind {
        match self {
            KubeObject::Namespace(_) => Kind::Namespace,
            KubeObject::Pod(_) => Kind::Pod,
            KubeObject::Service(_) => Kind::Service,
            KubeObject::EndpointSlice(_) => Kind::EndpointSlice,
            KubeObject::HttpRoute(_) => Kind::HttpRoute,
            KubeObject::TcpRoute(_) => Kind::TcpRoute,
            KubeObject::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            KubeObject::DestinationRule(_) => Kind::DestinationRule,
            KubeObject::VirtualService(_) => Kind::VirtualService,
            KubeObject::PeerAuthentication(_) => Kind::PeerAuthentication,
            KubeObject::IstioAuthorizationPolicy(_) => Kind::IstioAuthorizationPolicy,
            KubeObject::RequestAuthentication(_) => Kind::RequestAuthentication,
            KubeObject::Telemetry(_) => Kind::Telemetry,
        }
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            KubeObject::Namespace(o) => &o.metadata,
            KubeObject::Pod(o) => &o.metadata,
            KubeObject::Service(o) => &o.metadata,
            KubeObject::EndpointSlice(o) => &o.metadata,
            KubeObject::HttpRoute(o) => &o.metadata,
            KubeObject::TcpRoute(o) => &o.metadata,
            KubeObject::AuthorizationPolicy(o) => &o.metadata,
            KubeObject::DestinationRule(o) => &o.metadata,
            KubeObject::VirtualService(o) => &o.metadata,
            KubeObject::PeerAuthentication(o) => &o.metadata,
            KubeObject::IstioAuthorizationPolicy(o) => &o.metadata,
            KubeObject::RequestAuthentication(o) => &o.metadata,
            KubeObject::Telemetry(o) => &o.metadata,
        }
    }

    /// Namespaced objects without a namespace land in `default`, as kubectl does.
    pub fn key(&self) -> Option<ObjectKey> {
        let mut key = ObjectKey::of(self.meta())?;
        if self.kind() != Kind::Namespace && key.namespace.is_empty() {
            key.namespace = "default".into();
        }
        Some(key)
    }
}

pub type Objects<T> = Arc<BTreeMap<ObjectKey, Arc<T>>>;

#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub namespaces: Objects<Namespace>,
    pub pods: Objects<Pod>,
    pub services: Objects<Service>,
    pub endpoint_slices: Objects<EndpointSlice>,
    pub http_routes: Objects<HttpRoute>,
    pub tcp_routes: Objects<TcpRoute>,
    /// Nodemesh's own AuthorizationPolicies as written. A new map (same content)
    /// whenever a policy of either kind changes: connections pooled under older
    /// policies are then not reused (`proxy/http/pool.rs` compares it by pointer).
    pub authorization_policies: Objects<AuthorizationPolicy>,
    /// Istio's AuthorizationPolicies as written.
    pub istio_authorization_policies: Objects<IstioAuthorizationPolicy>,
    /// Every AuthorizationPolicy of both kinds compiled into one model
    /// (`discovery::authorization`): what `identity::authz` decides with.
    pub authorization: Arc<AuthzIndex>,
    pub destination_rules: Objects<DestinationRule>,
    /// Every DestinationRule checked and compiled (with its problems), by rule.
    pub compiled_rules: Arc<BTreeMap<ObjectKey, Arc<CompiledRule>>>,
    /// The DestinationRule in force for each Service (valid, and the oldest of those
    /// naming it).
    pub(super) rules_by_service: Arc<HashMap<ObjectKey, Arc<CompiledRule>>>,
    pub virtual_services: Objects<VirtualService>,
    pub peer_authentications: Objects<PeerAuthentication>,
    /// Every PeerAuthentication checked, which are in force, and the root namespace
    /// (`discovery::mtls`; [`ClusterState::mtls_mode`] reads it).
    pub peer_authentication: Arc<PeerAuthIndex>,
    pub request_authentications: Objects<RequestAuthentication>,
    /// Every RequestAuthentication checked (`discovery::request_auth`;
    /// [`ClusterState::request_authentications_for`] reads it).
    pub request_authentication: Arc<RequestAuthIndex>,
    pub telemetries: Objects<Telemetry>,
    /// Every Telemetry checked (`discovery::telemetry_index`;
    /// [`ClusterState::telemetry_for`] reads it).
    pub telemetry: Arc<TelemetryIndex>,
    pub(super) pods_by_ip: Arc<HashMap<IpAddr, ObjectKey>>,
    pub(super) services_by_ip: Arc<HashMap<IpAddr, ObjectKey>>,
    pub(super) slices_by_service: Arc<HashMap<ObjectKey, BTreeSet<ObjectKey>>>,
    pub(super) tcp_routes_by_service: Arc<HashMap<ObjectKey, Vec<ObjectKey>>>,
    pub(super) http_routes_by_service: Arc<HashMap<ObjectKey, Vec<ObjectKey>>>,
}

fn slice_service(slice: &EndpointSlice, key: &ObjectKey) -> Option<ObjectKey> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ObjectKey::new(&key.namespace, name))
}

/// Moves `key`'s entries in an IP index from `old` to `new` addresses.
fn reindex_ips(
    index: &mut Arc<HashMap<IpAddr, ObjectKey>>,
    key: &ObjectKey,
    old: &[IpAddr],
    new: &[IpAddr],
) {
    if old == new {
        return;
    }
    let index = Arc::make_mut(index);
    for ip in old {
        if index.get(ip) == Some(key) {
            index.remove(ip);
        }
    }
    for ip in new {
        index.insert(*ip, key.clone());
    }
}

fn upsert<T>(map: &mut Objects<T>, key: ObjectKey, value: T) -> Option<Arc<T>> {
    Arc::make_mut(map).insert(key, Arc::new(value))
}

impl ClusterState {
    pub fn from_objects(objects: impl IntoIterator<Item = KubeObject>) -> ClusterState {
        let mut by_kind: BTreeMap<Kind, Vec<KubeObject>> = BTreeMap::new();
        for o in objects {
            by_kind.entry(o.kind()).or_default().push(o);
        }
        let mut state = ClusterState::default();
        for (kind, objects) in by_kind {
            state.replace_kind(kind, objects);
        }
        state
    }

    /// Adds or replaces one object.
    pub fn apply(&mut self, object: KubeObject) {
        let Some(key) = object.key() else {
            return;
        };
        match object {
            KubeObject::Namespace(o) => {
                upsert(&mut self.namespaces, key, *o);
            }
            KubeObject::Pod(o) => {
                let new = pod_ips(&o);
                let old = upsert(&mut self.pods, key.clone(), *o)
                    .map(|p| pod_ips(&p))
                    .unwrap_or_default();
                reindex_ips(&mut self.pods_by_ip, &key, &old, &new);
            }
            KubeObject::Service(o) => {
                let new = service_ips(&o);
                let old = upsert(&mut self.services, key.clone(), *o)
                    .map(|s| service_ips(&s))
                    .unwrap_or_default();
                reindex_ips(&mut self.services_by_ip, &key, &old, &new);
            }
            KubeObject::EndpointSlice(o) => {
                let new = slice_service(&o, &key);
                let old = upsert(&mut self.endpoint_slices, key.clone(), *o)
                    .and_then(|s| slice_service(&s, &key));
                self.reindex_slice(&key, old, new);
            }
            KubeObject::HttpRoute(o) => {
                upsert(&mut self.http_routes, key, *o);
                self.http_routes_by_service = Arc::new(route_index(&self.http_routes));
            }
            KubeObject::TcpRoute(o) => {
                upsert(&mut self.tcp_routes, key, *o);
                self.tcp_routes_by_service = Arc::new(route_index(&self.tcp_routes));
            }
            KubeObject::AuthorizationPolicy(o) => {
                upsert(&mut self.authorization_policies, key, *o);
                self.reindex_authorization();
            }
            KubeObject::IstioAuthorizationPolicy(o) => {
                upsert(&mut self.istio_authorization_policies, key, *o);
                self.reindex_authorization();
            }
            KubeObject::DestinationRule(o) => {
                upsert(&mut self.destination_rules, key, *o);
                self.reindex_destination_rules();
            }
            KubeObject::VirtualService(o) => {
                upsert(&mut self.virtual_services, key, *o);
            }
            KubeObject::PeerAuthentication(o) => {
                upsert(&mut self.peer_authentications, key, *o);
                self.reindex_peer_authentications();
            }
            KubeObject::RequestAuthentication(o) => {
                upsert(&mut self.request_authentications, key, *o);
                self.reindex_request_authentications();
            }
            KubeObject::Telemetry(o) => {
                upsert(&mut self.telemetries, key, *o);
                self.reindex_telemetry();
            }
        }
    }

    /// Removes one object (absent objects are fine).
    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) {
        fn take<T>(map: &mut Objects<T>, key: &ObjectKey) -> Option<Arc<T>> {
            if map.contains_key(key) {
                Arc::make_mut(map).remove(key)
            } else {
                None
            }
        }
        match kind {
            Kind::Namespace => {
                take(&mut self.namespaces, key);
            }
            Kind::Pod => {
                if let Some(old) = take(&mut self.pods, key) {
                    reindex_ips(&mut self.pods_by_ip, key, &pod_ips(&old), &[]);
                }
            }
            Kind::Service => {
                if let Some(old) = take(&mut self.services, key) {
                    reindex_ips(&mut self.services_by_ip, key, &service_ips(&old), &[]);
                }
            }
            Kind::EndpointSlice => {
                if let Some(old) = take(&mut self.endpoint_slices, key) {
                    self.reindex_slice(key, slice_service(&old, key), None);
                }
            }
            Kind::HttpRoute => {
                if take(&mut self.http_routes, key).is_some() {
                    self.http_routes_by_service = Arc::new(route_index(&self.http_routes));
                }
            }
            Kind::TcpRoute => {
                if take(&mut self.tcp_routes, key).is_some() {
                    self.tcp_routes_by_service = Arc::new(route_index(&self.tcp_routes));
                }
            }
            Kind::AuthorizationPolicy => {
                if take(&mut self.authorization_policies, key).is_some() {
                    self.reindex_authorization();
                }
            }
            Kind::IstioAuthorizationPolicy => {
                if take(&mut self.istio_authorization_policies, key).is_some() {
                    self.reindex_authorization();
                }
            }
            Kind::DestinationRule => {
                if take(&mut self.destination_rules, key).is_some() {
                    self.reindex_destination_rules();
                }
            }
            Kind::VirtualService => {
                take(&mut self.virtual_services, key);
            }
            Kind::PeerAuthentication => {
                if take(&mut self.peer_authentications, key).is_some() {
                    self.reindex_peer_authentications();
                }
            }
            Kind::RequestAuthentication => {
                if take(&mut self.request_authentications, key).is_some() {
                    self.reindex_request_authentications();
                }
            }
            Kind::Telemetry => {
                if take(&mut self.telemetries, key).is_some() {
                    self.reindex_telemetry();
                }
            }
        }
    }

    /// Replaces every object of `kind` (a full relist).
    pub fn replace_kind(&mut self, kind: Kind, objects: Vec<KubeObject>) {
        let keys: Vec<ObjectKey> = match kind {
            Kind::Namespace => self.namespaces.keys().cloned().collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.endpoint_slices.keys().cloned().collect(),
            Kind::HttpRoute => self.http_routes.keys().cloned().collect(),
            Kind::TcpRoute => self.tcp_routes.keys().cloned().collect(),
            Kind::AuthorizationPolicy => self.authorization_policies.keys().cloned().collect(),
            Kind::DestinationRule => self.destination_rules.keys().cloned().collect(),
            Kind::VirtualService => self.virtual_services.keys().cloned().collect(),
            Kind::PeerAuthentication => self.peer_authentications.keys().cloned().collect(),
            Kind::IstioAuthorizationPolicy => {
                self.istio_authorization_policies.keys().cloned().collect()
            }
            Kind::RequestAuthentication => self.request_authentications.keys().cloned().collect(),
            Kind::Telemetry => self.telemetries.keys().cloned().collect(),
        };
        let keep: BTreeSet<ObjectKey> = objects.iter().filter_map(KubeObject::key).collect();
        for key in keys.iter().filter(|k| !keep.contains(*k)) {
            self.delete(kind, key);
        }
        for object in objects.into_iter().filter(|o| o.kind() == kind) {
            self.apply(object);
        }
    }

    /// Compiles every DestinationRule again and picks the one in force per Service:
    /// the oldest valid rule (then by namespace/name), as Istio does; the others are
    /// reported as shadowed. (Rules are few; a change recompiles them all.)
    fn reindex_destination_rules(&mut self) {
        let mut compiled: BTreeMap<ObjectKey, CompiledRule> = self
            .destination_rules
            .iter()
            .map(|(k, dr)| (k.clone(), compile(k, dr)))
            .collect();
        let mut winners: HashMap<ObjectKey, (Option<i64>, ObjectKey)> = HashMap::new();
        for (key, rule) in compiled.iter().filter(|(_, r)| r.is_valid()) {
            let Some(service) = rule.service.clone() else {
                continue;
            };
            let candidate = (rule.created, key.clone());
            let entry = winners.entry(service).or_insert_with(|| candidate.clone());
            // None (no timestamp: a manifest file) sorts first, like the oldest.
            if candidate < *entry {
                *entry = candidate;
            }
        }
        for (key, rule) in compiled.iter_mut().filter(|(_, r)| r.is_valid()) {
            let Some((_, winner)) = rule.service.as_ref().and_then(|s| winners.get(s)) else {
                continue;
            };
            if winner != key {
                rule.problems.push(Problem {
                    field: "host".into(),
                    reason: ProblemReason::Shadowed,
                    detail: format!(
                        "DestinationRule {winner} is older and applies to the same host; this one is not used: merge them"
                    ),
                });
            }
        }
        let compiled: BTreeMap<ObjectKey, Arc<CompiledRule>> = compiled
            .into_iter()
            .map(|(k, r)| (k, Arc::new(r)))
            .collect();
        self.rules_by_service = Arc::new(
            winners
                .into_iter()
                .filter_map(|(service, (_, rule))| Some((service, compiled.get(&rule)?.clone())))
                .collect(),
        );
        self.compiled_rules = Arc::new(compiled);
    }

    /// Compiles every AuthorizationPolicy of both kinds again (they are few).
    fn reindex_authorization(&mut self) {
        self.authorization = Arc::new(AuthzIndex::build(
            self.istio_authorization_policies
                .iter()
                .map(|(k, p)| (k, &**p)),
            self.authorization_policies.iter().map(|(k, p)| (k, &**p)),
        ));
        self.authorization_policies = Arc::new((*self.authorization_policies).clone());
    }

    /// Sets the mesh's root namespace (`--root-namespace`): its namespace-wide
    /// PeerAuthentication is the mesh-wide one. The sources set it on every state.
    pub fn set_root_namespace(&mut self, root: &RootNamespace) {
        if self.peer_authentication.root() != root {
            self.peer_authentication =
                Arc::new(PeerAuthIndex::build(root, &self.peer_authentications));
        }
        if self.request_authentication.root() != root {
            self.request_authentication =
                Arc::new(RequestAuthIndex::build(root, &self.request_authentications));
        }
        if self.telemetry.root() != root {
            self.telemetry = Arc::new(TelemetryIndex::build(root, &self.telemetries));
        }
    }

    /// Checks every Telemetry again (they are few).
    fn reindex_telemetry(&mut self) {
        let root = self.peer_authentication.root().clone();
        self.telemetry = Arc::new(TelemetryIndex::build(&root, &self.telemetries));
    }

    /// Checks every RequestAuthentication again (they are few).
    fn reindex_request_authentications(&mut self) {
        let root = self.peer_authentication.root().clone();
        self.request_authentication = Arc::new(RequestAuthIndex::build(
            &root,
            &self.request_authentications,
        ));
    }

    /// Checks every PeerAuthentication again (they are few) and decides which are in
    /// force at each level.
    fn reindex_peer_authentications(&mut self) {
        let root = self.peer_authentication.root().clone();
        self.peer_authentication =
            Arc::new(PeerAuthIndex::build(&root, &self.peer_authentications));
    }

    fn reindex_slice(&mut self, key: &ObjectKey, old: Option<ObjectKey>, new: Option<ObjectKey>) {
        if old == new {
            return;
        }
        let index = Arc::make_mut(&mut self.slices_by_service);
        if let Some(old) = old {
            if let Some(set) = index.get_mut(&old) {
                set.remove(key);
                if set.is_empty() {
                    index.remove(&old);
                }
            }
        }
        if let Some(new) = new {
            index.entry(new).or_default().insert(key.clone());
        }
    }

    /// Object counts by kind, for logs and the admin API.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        BTreeMap::from([
            (Kind::Namespace.name(), self.namespaces.len()),
            (Kind::Pod.name(), self.pods.len()),
            (Kind::Service.name(), self.services.len()),
            (Kind::EndpointSlice.name(), self.endpoint_slices.len()),
            (Kind::HttpRoute.name(), self.http_routes.len()),
            (Kind::TcpRoute.name(), self.tcp_routes.len()),
            (
                Kind::AuthorizationPolicy.name(),
                self.authorization_policies.len(),
            ),
            (Kind::DestinationRule.name(), self.destination_rules.len()),
            (Kind::VirtualService.name(), self.virtual_services.len()),
            (
                Kind::PeerAuthentication.name(),
                self.peer_authentications.len(),
            ),
            (
                Kind::IstioAuthorizationPolicy.name(),
                self.istio_authorization_policies.len(),
            ),
            (
                Kind::RequestAuthentication.name(),
                self.request_authentications.len(),
            ),
            (Kind::Telemetry.name(), self.telemetries.len()),
        ])
    }
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
