//! Outbound resolution (ARCHITECTURE.md, "One connection", step 3): original
//! destination → Service (by VIP and port) → TCPRoute whose parentRefs name that
//! Service (GAMMA) → weighted backend Services → ready endpoints. A destination that
//! is not a Service VIP — a pod IP, or anything outside the cluster — goes where the
//! application sent it.
//!
//! [`lookup`] works from the raw objects of a snapshot; the routing table
//! (`routing::table`) keeps its answers for the snapshot's lifetime, and the plan
//! (`routing::plan`) turns them into decisions.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::Endpoint,
};
use serde::Serialize;

pub use crate::routing::backend::{Backend, EndpointPolicy, LbPolicy};
use crate::{
    discovery::cluster::canonical, discovery::cluster::ClusterState, keys::ObjectKey,
    keys::ServicePortRef, routing::balancer::PickSlots,
};

/// Service annotation choosing least-connections instead of round-robin endpoints.
pub const LOAD_BALANCING_ANNOTATION: &str = "nodemesh.io/load-balancing";
pub const LEAST_CONNECTIONS: &str = "least-connections";

/// A CIDR such as `10.96.0.0/12` (service address ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl FromStr for IpCidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not a CIDR like 10.96.0.0/12 or fd00:96::/108");
        let (addr, len) = text.split_once('/').ok_or_else(bad)?;
        let addr = canonical(IpAddr::from_str(addr).map_err(|_| bad())?);
        let prefix_len: u8 = len.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(bad());
        }
        Ok(IpCidr { addr, prefix_len })
    }
}

impl std::fmt::Display for IpCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl serde::Serialize for IpCidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl IpCidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u32) {
            match ip {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        };
        let (net, width) = bits(self.addr);
        let (candidate, other_width) = bits(canonical(ip));
        if width != other_width {
            return false;
        }
        let shift = width - u32::from(self.prefix_len);
        shift >= width || (net >> shift) == (candidate >> shift)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resolution {
    /// Not a Service address: connect to the original destination.
    Direct,
    Service {
        service: ObjectKey,
        port: u16,
        route: Option<ObjectKey>,
        backends: Vec<Backend>,
    },
    /// A Service VIP, but not one of its ports.
    UnknownPort { service: ObjectKey, port: u16 },
    /// Inside a service address range, but no Service has this address.
    UnknownService,
}

/// backendRefs default to core Services.
pub fn is_service_backend(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(kind, None | Some("Service")) && matches!(group, None | Some("") | Some("core"))
}

pub fn service_port(service: &Service, port: u16) -> Option<&ServicePort> {
    service
        .spec
        .as_ref()?
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == i32::from(port))
}

/// Ready endpoints of `service`'s `port`, in the address family of `dst`.
pub fn ready_endpoints(
    state: &ClusterState,
    service: &ObjectKey,
    port: u16,
    want_v6: bool,
) -> Vec<SocketAddr> {
    match state.services.get(service) {
        Some(svc) => ready_endpoints_of(state, service, svc, port, want_v6, None),
        None => Vec::new(),
    }
}

/// Whether the pod behind `ep` (by its targetRef, else by its address) carries every
/// label of `labels`. An endpoint whose pod is unknown is in no subset.
fn in_subset(
    state: &ClusterState,
    service: &ObjectKey,
    ep: &Endpoint,
    ip: IpAddr,
    labels: &BTreeMap<String, String>,
) -> bool {
    let by_ref = ep
        .target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .and_then(|r| {
            let ns = r.namespace.as_deref().unwrap_or(&service.namespace);
            state.pods.get(&ObjectKey::new(ns, r.name.as_deref()?))
        });
    let pod = by_ref.or_else(|| state.pods.get(state.pod_by_ip(ip)?));
    let Some(pod_labels) = pod.and_then(|p| p.metadata.labels.as_ref()) else {
        return labels.is_empty() && pod.is_some();
    };
    labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
}

/// [`ready_endpoints`] of the Service `svc` (named `service`).
fn ready_endpoints_of(
    state: &ClusterState,
    service: &ObjectKey,
    svc: &Service,
    port: u16,
    want_v6: bool,
    subset: Option<&BTreeMap<String, String>>,
) -> Vec<SocketAddr> {
    let Some(sp) = service_port(svc, port) else {
        return Vec::new();
    };
    let port_name = sp.name.as_deref().unwrap_or("");
    let family = if want_v6 { "IPv6" } else { "IPv4" };
    let mut out = Vec::new();
    for slice in state.endpoint_slices_of(service) {
        if slice.address_type != family {
            continue;
        }
        let slice_port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port);
        let Some(target) = slice_port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let conditions = ep.conditions.as_ref();
            // An unset `ready` means ready; terminating endpoints take no new connections.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            if let Some(ip) = ep.addresses.first().and_then(|a| IpAddr::from_str(a).ok()) {
                let ip = canonical(ip);
                if subset.is_some_and(|labels| !in_subset(state, service, ep, ip, labels)) {
                    continue;
                }
                out.push(SocketAddr::new(ip, target));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

pub fn backend(
    state: &ClusterState,
    service: ObjectKey,
    port: u16,
    weight: u32,
    want_v6: bool,
) -> Backend {
    subset_backend(state, service, port, weight, want_v6, None)
}

/// [`backend`] limited to a DestinationRule `subset` of the Service: its ready
/// endpoints whose pods carry all the subset's labels, under the subset's policy. A
/// subset no DestinationRule defines has no endpoints (fail closed) and says why in
/// [`Backend::subset_error`].
pub fn subset_backend(
    state: &ClusterState,
    service: ObjectKey,
    port: u16,
    weight: u32,
    want_v6: bool,
    subset: Option<&str>,
) -> Backend {
    let svc = state.services.get(&service).map(|s| &**s);
    backend_of(state, service, svc, port, weight, want_v6, subset)
}

/// [`backend`] for the Service `svc` (named `service`; None when there is none).
fn backend_of(
    state: &ClusterState,
    service: ObjectKey,
    svc: Option<&Service>,
    port: u16,
    weight: u32,
    want_v6: bool,
    subset: Option<&str>,
) -> Backend {
    let least_connections = svc
        .and_then(|s| {
            s.metadata
                .annotations
                .as_ref()?
                .get(LOAD_BALANCING_ANNOTATION)
        })
        .is_some_and(|v| v == LEAST_CONNECTIONS);
    // Without a DestinationRule: round-robin, or the Service's annotation.
    let default = EndpointPolicy {
        load_balancer: if least_connections {
            LbPolicy::LeastRequest
        } else {
            LbPolicy::RoundRobin
        },
        outlier_detection: None,
        consistent_hash: None,
        connection_pool: None,
    };
    let rule = state.destination_rule_for(&service);
    let (policy, labels, subset_error) = match (rule, subset) {
        (None, None) => (default, None, None),
        (None, Some(name)) => (
            default,
            None,
            Some(format!(
                "no DestinationRule for Service {service} defines subset `{}`: add it to the Service's DestinationRule",
                crate::telemetry::log_limit::clip(name)
            )),
        ),
        (Some(rule), subset) => match rule.endpoint_policy(port, subset) {
            Some(policy) => (
                policy,
                subset.and_then(|n| rule.subset(n)).map(|s| &s.labels),
                None,
            ),
            None => (
                default,
                None,
                Some(format!(
                    "DestinationRule {} has no subset `{}`: add it there or fix the route",
                    rule.rule,
                    crate::telemetry::log_limit::clip(subset.unwrap_or_default())
                )),
            ),
        },
    };
    if let Some(error) = &subset_error {
        crate::warn_limited!(service = %service, %error, "a route names a subset that does not exist; it gets no endpoints");
    }
    let endpoints = match (svc, &subset_error) {
        (Some(svc), None) => ready_endpoints_of(state, &service, svc, port, want_v6, labels),
        _ => Vec::new(),
    };
    Backend {
        endpoints,
        service,
        port,
        weight,
        subset: subset.map(str::to_string),
        subset_error,
        policy,
        ring: Default::default(),
    }
}

/// An HTTP-routed Service port (an HTTPRoute names it): requests are routed one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpPort {
    /// The port declares HTTP/2 cleartext (`appProtocol: kubernetes.io/h2c`).
    pub backend_http2: bool,
}

/// Everything one snapshot says about a Service port, in one address family: its
/// TCPRoute, its weighted backends with their ready endpoints parsed, and whether it is
/// HTTP-routed. Built once per snapshot (see `routing::table`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    pub frontend: ServicePortRef,
    /// The TCPRoute whose first rule carries the backends (None: the Service itself).
    pub route: Option<ObjectKey>,
    pub backends: Vec<Backend>,
    /// Some: an HTTPRoute names the port, and the L7 proxy routes each request.
    pub http: Option<HttpPort>,
    /// The destination was an IPv6 address (endpoints are of the same family).
    pub want_v6: bool,
    /// Whether any backend can take a connection (positive weight, ready endpoint).
    has_eligible: bool,
    /// The balancer's state for this route's eligible backends, looked up on the first
    /// pick.
    pub slots: PickSlots,
}

impl ServiceRoute {
    /// The backends an L4 pick chooses among (positive weight, ready endpoint).
    pub fn eligible(&self) -> impl Iterator<Item = &Backend> + Clone {
        self.backends.iter().filter(|b| b.is_eligible())
    }

    /// Whether a connection can be given an endpoint at all.
    pub fn has_eligible(&self) -> bool {
        self.has_eligible
    }

    /// The admin view of this route.
    pub fn resolution(&self) -> Resolution {
        Resolution::Service {
            service: self.frontend.service.clone(),
            port: self.frontend.port,
            route: self.route.clone(),
            backends: self.backends.clone(),
        }
    }
}

/// What a destination address is, before any pick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not a Service address: connect to the original destination.
    Direct,
    Service(Arc<ServiceRoute>),
    /// A Service VIP, but not one of its ports.
    UnknownPort(ServicePortRef),
    /// Inside a service address range, but no Service has this address.
    UnknownService,
}

impl Lookup {
    /// The admin view (`meshctl node services`, `meshctl node trace`).
    pub fn resolution(&self) -> Resolution {
        match self {
            Lookup::Direct => Resolution::Direct,
            Lookup::Service(route) => route.resolution(),
            Lookup::UnknownPort(f) => Resolution::UnknownPort {
                service: f.service.clone(),
                port: f.port,
            },
            Lookup::UnknownService => Resolution::UnknownService,
        }
    }
}

/// What a destination address names in `state`, short of building the Service port's
/// route: the Service (and whether `port` is one of its ports), or nothing.
pub(crate) enum Addressed<'s> {
    Direct,
    UnknownService,
    UnknownPort(ServicePortRef),
    ServicePort(&'s ObjectKey, &'s Service),
}

/// Classifies a destination (canonical address) by the Service addresses of `state`.
pub(crate) fn addressed<'s>(
    state: &'s ClusterState,
    ip: IpAddr,
    port: u16,
    service_cidrs: &[IpCidr],
) -> Addressed<'s> {
    let Some((key, svc)) = state.service_by_ip(ip) else {
        if service_cidrs.iter().any(|c| c.contains(ip)) {
            return Addressed::UnknownService;
        }
        return Addressed::Direct;
    };
    if service_port(svc, port).is_none() {
        return Addressed::UnknownPort(ServicePortRef {
            service: key.clone(),
            port,
        });
    }
    Addressed::ServicePort(key, svc)
}

/// Builds the route of `service:port` (`svc`, a port it has) from the raw objects.
pub(crate) fn service_route(
    state: &ClusterState,
    service: &ObjectKey,
    svc: &Service,
    port: u16,
    want_v6: bool,
) -> ServiceRoute {
    let route = state.tcp_routes_for(service, port).into_iter().next();
    let (route, backends) = match route {
        Some((route_key, route)) => {
            // TCP has nothing to match on: the first rule carries the backends.
            let refs = route
                .spec
                .rules
                .first()
                .map(|r| r.backend_refs.as_slice())
                .unwrap_or(&[]);
            let backends = refs
                .iter()
                .filter(|r| is_service_backend(r.group.as_deref(), r.kind.as_deref()))
                .map(|r| {
                    let ns = r
                        .namespace
                        .clone()
                        .unwrap_or_else(|| route_key.namespace.clone());
                    let backend_port = r.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(port);
                    let weight = r.weight.unwrap_or(1).max(0) as u32;
                    backend(
                        state,
                        ObjectKey::new(&ns, &r.name),
                        backend_port,
                        weight,
                        want_v6,
                    )
                })
                .collect();
            (Some(route_key.clone()), backends)
        }
        // No TCPRoute: a VirtualService's `tcp` route, else the Service itself.
        None => match virtual_service_tcp(state, service, port, want_v6) {
            Some((vs, backends)) => (Some(vs), backends),
            None => (
                None,
                vec![backend_of(
                    state,
                    service.clone(),
                    Some(svc),
                    port,
                    1,
                    want_v6,
                    None,
                )],
            ),
        },
    };
    let http = is_http_routed(state, service, port).then(|| HttpPort {
        backend_http2: http2_port(svc, port),
    });
    let has_eligible = backends.iter().any(Backend::is_eligible);
    ServiceRoute {
        frontend: ServicePortRef {
            service: service.clone(),
            port,
        },
        route,
        backends,
        http,
        want_v6,
        has_eligible,
        slots: PickSlots::default(),
    }
}

/// The first `tcp` route whose match holds on `port` among the VirtualServices of
/// `service` that apply to the mesh (in order), as weighted backends: the L4 proxy's
/// route when no TCPRoute names the port. A `subset` is the DestinationRule subset's
/// endpoints. A destination that is not a Service, or a subset no DestinationRule
/// defines, has no endpoints: its share goes to the others, and with none left the
/// connection is refused — never sent to all of a Service's endpoints.
pub(crate) fn virtual_service_tcp(
    state: &ClusterState,
    service: &ObjectKey,
    port: u16,
    want_v6: bool,
) -> Option<(ObjectKey, Vec<Backend>)> {
    for (key, vs) in state.virtual_services_for(service) {
        if !vs.spec.binds_mesh() {
            continue;
        }
        for route in &vs.spec.tcp {
            let applies = route.matches.is_empty()
                || route
                    .matches
                    .iter()
                    .any(|m| m.port.is_none_or(|p| p == u32::from(port)));
            if !applies {
                continue;
            }
            let unweighted = route.route.iter().all(|d| d.weight.is_none());
            let backends = route
                .route
                .iter()
                .map(|d| {
                    let weight = match d.weight {
                        None if unweighted => 1,
                        None => 0,
                        Some(w) => w.max(0) as u32,
                    };
                    let host = &d.destination.host;
                    let target = ObjectKey::from_service_host(host, &key.namespace).ok();
                    let known = target.is_some();
                    let target = target.unwrap_or_else(|| ObjectKey::new(&key.namespace, host));
                    let backend_port = d
                        .destination
                        .port
                        .and_then(|p| u16::try_from(p.number).ok())
                        .or_else(|| only_port(state, &target))
                        .unwrap_or(port);
                    let subset = d.destination.subset.as_deref();
                    let mut b =
                        subset_backend(state, target, backend_port, weight, want_v6, subset);
                    if !known {
                        b.endpoints.clear();
                    }
                    b
                })
                .collect();
            return Some((key.clone(), backends));
        }
    }
    None
}

/// The Service's port when it has exactly one (Istio: a destination port may be left
/// out then).
pub(crate) fn only_port(state: &ClusterState, service: &ObjectKey) -> Option<u16> {
    let ports = state.services.get(service)?.spec.as_ref()?.ports.as_ref()?;
    match ports.as_slice() {
        [p] => u16::try_from(p.port).ok(),
        _ => None,
    }
}

/// What a connection to `dst` resolves to in `state`, from the raw objects (the routing
/// table keeps these per snapshot; this builds them afresh).
pub fn lookup(state: &ClusterState, dst: SocketAddr, service_cidrs: &[IpCidr]) -> Lookup {
    let ip = canonical(dst.ip());
    match addressed(state, ip, dst.port(), service_cidrs) {
        Addressed::Direct => Lookup::Direct,
        Addressed::UnknownService => Lookup::UnknownService,
        Addressed::UnknownPort(f) => Lookup::UnknownPort(f),
        Addressed::ServicePort(key, svc) => Lookup::Service(Arc::new(service_route(
            state,
            key,
            svc,
            dst.port(),
            ip.is_ipv6(),
        ))),
    }
}

/// The admin view of [`lookup`].
pub fn resolve(state: &ClusterState, dst: SocketAddr, service_cidrs: &[IpCidr]) -> Resolution {
    lookup(state, dst, service_cidrs).resolution()
}

/// Whether connections to `service:port` are HTTP-routed (an HTTPRoute names it, or
/// a VirtualService has `http` routes for the Service).
fn is_http_routed(state: &ClusterState, service: &ObjectKey, port: u16) -> bool {
    !state.http_routes_for(service, port).is_empty() || state.virtual_services_route_http(service)
}

/// Whether `svc`'s `port` declares HTTP/2 cleartext (`appProtocol:
/// kubernetes.io/h2c`), so requests reach its backends as HTTP/2 whatever the client
/// spoke.
fn http2_port(svc: &Service, port: u16) -> bool {
    service_port(svc, port)
        .and_then(|p| p.app_protocol.as_deref())
        .is_some_and(|a| matches!(a, "kubernetes.io/h2c" | "h2c" | "grpc"))
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
