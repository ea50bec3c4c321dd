//! The agent's view of the cluster: Kubernetes objects by kind, plus the indexes the
//! proxy needs. Sources mutate a working copy and publish snapshots; a snapshot is
//! cheap (each kind is an `Arc`'d map of `Arc`'d objects), and a change to one kind
//! copies only that kind's map.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
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
use mesh_common::Ip;
use serde::Serialize;

pub use crate::{
    discovery::enrollment::plan, discovery::enrollment::NotEnrolled,
    discovery::enrollment::PodPlan, discovery::enrollment::EXCLUDE_INBOUND_PORTS,
    discovery::enrollment::EXCLUDE_OUTBOUND_CIDRS, discovery::enrollment::EXCLUDE_OUTBOUND_PORTS,
    discovery::enrollment::MESH_LABEL, discovery::mtls::MTLS_LABEL,
};

use crate::{
    discovery::authorization::AuthzIndex,
    discovery::authorization_policy::AuthorizationPolicy as IstioAuthorizationPolicy,
    discovery::destination_rule::DestinationRule, discovery::mtls::EffectiveMtls,
    discovery::mtls::PeerAuthIndex, discovery::mtls::RootNamespace, discovery::mtls::WorkloadMtls,
    discovery::peer_authentication::PeerAuthentication, discovery::policy::AuthorizationPolicy,
    discovery::request_auth::CompiledRequestAuth, discovery::request_auth::RequestAuthIndex,
    discovery::request_authentication::RequestAuthentication, discovery::traffic_policy::compile,
    discovery::traffic_policy::CompiledRule, discovery::traffic_policy::Problem,
    discovery::traffic_policy::ProblemReason, discovery::virtual_service::VirtualService,
    keys::ObjectKey, keys::PodKey,
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
}

impl Kind {
    pub const ALL: [Kind; 12] = [
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
    rules_by_service: Arc<HashMap<ObjectKey, Arc<CompiledRule>>>,
    pub virtual_services: Objects<VirtualService>,
    pub peer_authentications: Objects<PeerAuthentication>,
    /// Every PeerAuthentication checked, which are in force, and the root namespace
    /// (`discovery::mtls`; [`ClusterState::mtls_mode`] reads it).
    pub peer_authentication: Arc<PeerAuthIndex>,
    pub request_authentications: Objects<RequestAuthentication>,
    /// Every RequestAuthentication checked (`discovery::request_auth`;
    /// [`ClusterState::request_authentications_for`] reads it).
    pub request_authentication: Arc<RequestAuthIndex>,
    pods_by_ip: Arc<HashMap<IpAddr, ObjectKey>>,
    services_by_ip: Arc<HashMap<IpAddr, ObjectKey>>,
    slices_by_service: Arc<HashMap<ObjectKey, BTreeSet<ObjectKey>>>,
    tcp_routes_by_service: Arc<HashMap<ObjectKey, Vec<ObjectKey>>>,
    http_routes_by_service: Arc<HashMap<ObjectKey, Vec<ObjectKey>>>,
}

/// A route's `parentRefs` that name a Service (GAMMA), as (Service, port) pairs; `None`
/// means every port.
pub trait ServiceParents {
    fn service_parents(&self, own_namespace: &str) -> Vec<(ObjectKey, Option<u16>)>;
}

pub use crate::discovery::service_ref::is_service_parent;

fn service_parent(
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<i32>,
    own_namespace: &str,
) -> Option<(ObjectKey, Option<u16>)> {
    if !is_service_parent(group, kind) {
        return None;
    }
    let key = ObjectKey::new(namespace.unwrap_or(own_namespace), name);
    Some((key, port.and_then(|p| u16::try_from(p).ok())))
}

/// The route kinds' parentRef types differ only in name (generated per CRD).
macro_rules! service_parents_of {
    ($($route:ty),*) => {$(
        impl ServiceParents for $route {
            fn service_parents(&self, own_namespace: &str) -> Vec<(ObjectKey, Option<u16>)> {
                self.spec
                    .parent_refs
                    .iter()
                    .flatten()
                    .filter_map(|p| {
                        service_parent(
                            p.group.as_deref(),
                            p.kind.as_deref(),
                            &p.name,
                            p.namespace.as_deref(),
                            p.port,
                            own_namespace,
                        )
                    })
                    .collect()
            }
        }
    )*};
}

service_parents_of!(TcpRoute, HttpRoute);

fn route_index<T: ServiceParents>(routes: &Objects<T>) -> HashMap<ObjectKey, Vec<ObjectKey>> {
    let mut index: HashMap<ObjectKey, Vec<ObjectKey>> = HashMap::new();
    for (key, route) in routes.iter() {
        for (service, _) in route.service_parents(&key.namespace) {
            let entry = index.entry(service).or_default();
            if !entry.contains(key) {
                entry.push(key.clone());
            }
        }
    }
    index
}

/// Routes of `index` attached to `service` on `port`, by Gateway API precedence:
/// oldest first, then by namespace/name.
fn routes_for<'a, T: ServiceParents + kube::Resource>(
    index: &HashMap<ObjectKey, Vec<ObjectKey>>,
    routes: &'a Objects<T>,
    service: &ObjectKey,
    port: u16,
) -> Vec<(&'a ObjectKey, &'a T)> {
    let mut out: Vec<(&ObjectKey, &T)> = index
        .get(service)
        .into_iter()
        .flatten()
        .filter_map(|k| routes.get_key_value(k).map(|(k, r)| (k, &**r)))
        .filter(|(k, r)| {
            r.service_parents(&k.namespace)
                .iter()
                .any(|(s, p)| s == service && p.is_none_or(|p| p == port))
        })
        .collect();
    out.sort_by(|a, b| {
        let created = |r: &T| r.meta().creation_timestamp.as_ref().map(|t| t.0);
        created(a.1).cmp(&created(b.1)).then_with(|| a.0.cmp(b.0))
    });
    out
}

/// IPv4-mapped IPv6 becomes IPv4, so lookups compare like with like.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

pub fn ip_key(ip: IpAddr) -> Ip {
    let v6: Ipv6Addr = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    Ip::from_bytes(v6.octets())
}

pub fn ip_from_key(ip: &Ip) -> IpAddr {
    canonical(IpAddr::V6(Ipv6Addr::from(ip.to_bytes())))
}

fn parse_ips<'a>(texts: impl Iterator<Item = &'a str>) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for t in texts {
        if let Ok(ip) = IpAddr::from_str(t) {
            let ip = canonical(ip);
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    ips
}

/// The pod's IPs: status.podIPs, falling back to status.podIP.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    if listed.is_empty() {
        parse_ips(status.pod_ip.as_deref().into_iter())
    } else {
        parse_ips(listed.into_iter())
    }
}

/// The pod's service account (its identity); Kubernetes defaults it to `default`.
pub fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default")
}

/// The Service's virtual IPs: spec.clusterIPs, falling back to spec.clusterIP.
pub fn service_ips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if listed.is_empty() {
        parse_ips(spec.cluster_ip.as_deref().into_iter())
    } else {
        parse_ips(listed.into_iter())
    }
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
    }

    /// Checks every RequestAuthentication again (they are few).
    fn reindex_request_authentications(&mut self) {
        let root = self.peer_authentication.root().clone();
        self.request_authentication = Arc::new(RequestAuthIndex::build(
            &root,
            &self.request_authentications,
        ));
    }

    /// The RequestAuthentications that select the pod `pod`, by key (their rules all
    /// apply).
    pub fn request_authentications_for(
        &self,
        pod: &PodKey,
    ) -> Vec<(&ObjectKey, &Arc<CompiledRequestAuth>)> {
        if self.request_authentication.is_empty() {
            return Vec::new();
        }
        let labels = self.pods.get(pod).and_then(|p| p.metadata.labels.as_ref());
        let selects = |service: &ObjectKey| {
            service.namespace == pod.namespace
                && self
                    .services
                    .get(service)
                    .and_then(|s| s.spec.as_ref()?.selector.as_ref())
                    .is_some_and(|want| {
                        !want.is_empty()
                            && want
                                .iter()
                                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
                    })
        };
        self.request_authentication.selecting(pod, labels, selects)
    }

    /// Checks every PeerAuthentication again (they are few) and decides which are in
    /// force at each level.
    fn reindex_peer_authentications(&mut self) {
        let root = self.peer_authentication.root().clone();
        self.peer_authentication =
            Arc::new(PeerAuthIndex::build(&root, &self.peer_authentications));
    }

    /// The mode of a pod of `namespace` no workload PeerAuthentication selects.
    pub fn namespace_mtls(&self, namespace: &str) -> EffectiveMtls {
        let label = self.mtls_label(namespace);
        self.peer_authentication.namespace_mode(namespace, label)
    }

    /// Every mTLS mode of the pod `pod` (a pod not in the state: its namespace's).
    pub fn mtls_modes(&self, pod: &PodKey) -> WorkloadMtls {
        let labels = self.pods.get(pod).and_then(|p| p.metadata.labels.as_ref());
        let label = self.mtls_label(&pod.namespace);
        self.peer_authentication.workload_modes(pod, labels, label)
    }

    /// The mode in force for plaintext to `port` of the pod `pod`, and what decided it
    /// (`discovery::mtls`): what the inbound listeners, `meshctl node trace` and
    /// `meshctl node policies` use.
    pub fn mtls_mode(&self, pod: &PodKey, port: u16) -> EffectiveMtls {
        let mut modes = self.mtls_modes(pod);
        modes.ports.remove(&port).unwrap_or(modes.default)
    }

    fn mtls_label(&self, namespace: &str) -> Option<&str> {
        let labels = self.namespace(namespace)?.metadata.labels.as_ref()?;
        labels.get(MTLS_LABEL).map(String::as_str)
    }

    /// The DestinationRule in force for `service`, if any (O(1)).
    pub fn destination_rule_for(&self, service: &ObjectKey) -> Option<&Arc<CompiledRule>> {
        self.rules_by_service.get(service)
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

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(&ObjectKey::new("", name)).map(|n| &**n)
    }

    pub fn pods_on_node<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = (&'a PodKey, &'a Pod)> + 'a {
        self.pods
            .iter()
            .filter(move |(_, pod)| {
                pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            })
            .map(|(k, p)| (k, &**p))
    }

    /// The pod that owns `ip`, if any.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodKey> {
        self.pods_by_ip.get(&canonical(ip))
    }

    /// The Service whose virtual IP is `ip`, if any.
    pub fn service_by_ip(&self, ip: IpAddr) -> Option<(&ObjectKey, &Service)> {
        let key = self.services_by_ip.get(&canonical(ip))?;
        Some((key, self.services.get(key)?))
    }

    pub fn endpoint_slices_of<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.endpoint_slices.get(k).map(|s| &**s))
    }

    /// TCPRoutes attached to a Service port, by Gateway API precedence (oldest first).
    pub fn tcp_routes_for(&self, service: &ObjectKey, port: u16) -> Vec<(&ObjectKey, &TcpRoute)> {
        routes_for(&self.tcp_routes_by_service, &self.tcp_routes, service, port)
    }

    /// HTTPRoutes attached to a Service port, by Gateway API precedence (oldest first).
    pub fn http_routes_for(&self, service: &ObjectKey, port: u16) -> Vec<(&ObjectKey, &HttpRoute)> {
        routes_for(
            &self.http_routes_by_service,
            &self.http_routes,
            service,
            port,
        )
    }

    /// VirtualServices with a host naming `service` (any spelling of it), whatever
    /// their `gateways`, by name. (A scan: the routing table builds this once per
    /// Service port and snapshot.)
    pub fn virtual_services_for(&self, service: &ObjectKey) -> Vec<(&ObjectKey, &VirtualService)> {
        self.virtual_services
            .iter()
            .filter(|(key, vs)| {
                vs.spec.hosts.iter().any(|h| {
                    ObjectKey::from_service_host(h, &key.namespace).is_ok_and(|s| s == *service)
                })
            })
            .map(|(k, v)| (k, &**v))
            .collect()
    }

    /// Whether a VirtualService that applies to the mesh has `http` routes for
    /// `service`: its connections are then served as HTTP.
    pub fn virtual_services_route_http(&self, service: &ObjectKey) -> bool {
        self.virtual_services_for(service)
            .iter()
            .any(|(_, vs)| vs.spec.binds_mesh() && !vs.spec.http.is_empty())
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
        ])
    }
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
