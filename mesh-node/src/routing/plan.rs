//! The routing plan: the one place that decides where a connection or a request goes.
//!
//! A connection: original destination → Service port (by VIP and port) → TCPRoute →
//! weighted backend Service → endpoint (the balancer's pick) → transport (HBONE to an
//! enrolled pod, expecting its identity; plain TCP otherwise) — or a typed refusal. An
//! HTTP-routed Service port is handed to the L7 proxy, which plans each request:
//! HTTPRoute rule → weighted backendRef → endpoint → transport.
//!
//! The L4 proxy, the L7 proxy and `meshctl node trace` all call this module; trace
//! stops short of the pick ([`route`]) and lists the candidates instead.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::HeaderValue;

use crate::{
    discovery::cluster::ClusterState,
    keys::ObjectKey,
    keys::ServicePortRef,
    routing::balancer::{Balancer, Pick},
    routing::hash_key::{request_hash, KeyedRequest, RequestHash},
    routing::http::routes::{BackendTarget, Rule},
    routing::resolve::{Lookup, ServiceRoute},
    routing::splits::ClientSplits,
    routing::table::RoutingTable,
    routing::transport::{EndpointInfo, Transport},
    telemetry::outcome::RefusalReason,
};

/// Why the proxy refuses a connection before choosing any endpoint. The names are the
/// `reason` label of `nodemesh_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Inside a service address range (`--service-cidr`), but no Service has the address.
    UnknownService,
    /// A Service address, but not one of the Service's ports.
    UnknownServicePort,
    /// No backend with a positive weight has a ready endpoint.
    NoReadyEndpoint,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::UnknownService,
        Refusal::UnknownServicePort,
        Refusal::NoReadyEndpoint,
    ];

    /// How the connection's record and the refusal metric name it.
    pub fn reason(self) -> RefusalReason {
        match self {
            Refusal::UnknownService => RefusalReason::UnknownService,
            Refusal::UnknownServicePort => RefusalReason::UnknownServicePort,
            Refusal::NoReadyEndpoint => RefusalReason::NoReadyEndpoint,
        }
    }

    /// The metric label and connection-record name (`no_ready_endpoint`, ...).
    pub fn as_str(self) -> &'static str {
        self.reason().name()
    }

    /// What it means, for people (`meshctl node trace`).
    pub fn detail(self) -> &'static str {
        match self {
            Refusal::UnknownService => "a service address no Service has",
            Refusal::UnknownServicePort => "the Service has no such port",
            Refusal::NoReadyEndpoint => "no backend has a ready endpoint",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One endpoint a connection or request is sent to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    info: Arc<EndpointInfo>,
}

impl Endpoint {
    fn new(table: &RoutingTable, state: &ClusterState, addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            info: table.endpoint(state, addr),
        }
    }

    /// The pod that has the address, if any (enrolled or not).
    pub fn pod(&self) -> Option<&ObjectKey> {
        self.info.pod.as_ref()
    }

    pub fn transport(&self) -> &Transport {
        &self.info.transport
    }
}

/// Where a connection goes, short of the balancer's pick: what `meshctl node trace`
/// shows, and what every connection to the destination follows.
#[derive(Debug, Clone)]
pub enum Route {
    /// Not a Service address (a pod, or outside the cluster): to the destination itself.
    Direct(Endpoint),
    /// A Service port routed per connection: to an endpoint of one of
    /// [`ServiceRoute::eligible`], as the balancer picks.
    Service(Arc<ServiceRoute>),
    /// A Service port an HTTPRoute names: the L7 proxy routes each request
    /// ([`request`]).
    Http(Arc<ServiceRoute>),
    /// Refused before any endpoint is chosen.
    Refused {
        /// The Service port addressed, when the address is a Service's.
        frontend: Option<ServicePortRef>,
        refusal: Refusal,
    },
}

/// Where one connection goes.
#[derive(Debug)]
pub enum Plan {
    /// Connect to `endpoint` (over its transport) and relay.
    Forward(Forward),
    /// Serve the connection as HTTP and route each request ([`request`]).
    Http(Arc<ServiceRoute>),
    /// Reset the connection and count `refusal`.
    Refused {
        frontend: Option<ServicePortRef>,
        refusal: Refusal,
    },
}

/// A connection to one endpoint.
#[derive(Debug)]
pub struct Forward {
    /// The Service port and its route, when the destination was a Service address.
    pub service: Option<Arc<ServiceRoute>>,
    pub endpoint: Endpoint,
    /// The balancer's pick (a Service's endpoint): report what becomes of the
    /// connection through it, and hold it while the connection lives.
    pub pick: Option<Pick>,
}

impl Forward {
    /// The backend Service the balancer chose.
    pub fn backend(&self) -> Option<&ObjectKey> {
        self.pick.as_ref().map(|p| &*p.backend)
    }
}

/// Where a connection to `dst` goes, short of the pick. `table` must be `state`'s.
pub fn route(table: &RoutingTable, state: &ClusterState, dst: SocketAddr) -> Route {
    match table.lookup(state, dst) {
        Lookup::Direct => Route::Direct(Endpoint::new(table, state, dst)),
        Lookup::UnknownService => Route::Refused {
            frontend: None,
            refusal: Refusal::UnknownService,
        },
        Lookup::UnknownPort(frontend) => Route::Refused {
            frontend: Some(frontend),
            refusal: Refusal::UnknownServicePort,
        },
        Lookup::Service(service) if service.http.is_some() => Route::Http(service),
        Lookup::Service(service) if !service.has_eligible() => Route::Refused {
            frontend: Some(service.frontend.clone()),
            refusal: Refusal::NoReadyEndpoint,
        },
        Lookup::Service(service) => Route::Service(service),
    }
}

/// Where one connection to `dst` goes, with the balancer's pick; `client` is the
/// source pod's weighted-choice state. `table` must be `state`'s.
pub fn connection(
    table: &RoutingTable,
    state: &ClusterState,
    balancer: &Balancer,
    client: &ClientSplits,
    dst: SocketAddr,
) -> Plan {
    connection_from(table, state, balancer, client, None, dst)
}

/// [`connection`] from `source` (the client pod's IP), which a backend's
/// `consistentHash.useSourceIp` hashes.
pub fn connection_from(
    table: &RoutingTable,
    state: &ClusterState,
    balancer: &Balancer,
    client: &ClientSplits,
    source: Option<IpAddr>,
    dst: SocketAddr,
) -> Plan {
    match route(table, state, dst) {
        Route::Direct(endpoint) => Plan::Forward(Forward {
            service: None,
            endpoint,
            pick: None,
        }),
        Route::Http(service) => Plan::Http(service),
        Route::Refused { frontend, refusal } => Plan::Refused { frontend, refusal },
        Route::Service(service) => {
            let frontend = &service.frontend;
            let picked = balancer.pick_cached_from(
                client,
                &service.slots,
                &frontend.service,
                frontend.port,
                service.eligible(),
                source,
            );
            let Some(pick) = picked else {
                // Every endpoint of the chosen backend is ejected by outlier
                // detection (fail closed).
                return Plan::Refused {
                    frontend: Some(frontend.clone()),
                    refusal: Refusal::NoReadyEndpoint,
                };
            };
            Plan::Forward(Forward {
                endpoint: Endpoint::new(table, state, pick.endpoint),
                service: Some(service),
                pick: Some(pick),
            })
        }
    }
}

/// Where one request of an HTTP-routed connection goes, once its rule is selected.
#[derive(Debug)]
pub struct RequestPlan<'r> {
    /// The rule's chosen backendRef (its filters apply to the request).
    pub target: &'r BackendTarget,
    pub endpoint: Endpoint,
    /// Report the request's outcome through it; hold it until the response arrives.
    pub pick: Pick,
    /// The consistent-hash cookie the proxy made up for the request (`httpCookie` with
    /// a `ttl`, absent from the request): set it on the response.
    pub set_cookie: Option<HeaderValue>,
}

/// Why a request is answered by the proxy instead of a backend.
#[derive(Debug, Clone, Copy)]
pub enum RequestRefusal<'r> {
    /// No backendRef of the rule has a positive weight (HTTP 500).
    NoWeightedBackend,
    /// The chosen backendRef is invalid (not a Service, missing, bad filter): HTTP 500.
    InvalidBackend {
        target: &'r BackendTarget,
        reason: &'r str,
    },
    /// The chosen backend Service has no ready endpoint (HTTP 503; retriable).
    NoReadyEndpoint { target: &'r BackendTarget },
}

impl<'r> RequestRefusal<'r> {
    /// The backendRef chosen before the refusal, if one was.
    pub fn target(&self) -> Option<&'r BackendTarget> {
        match *self {
            RequestRefusal::NoWeightedBackend => None,
            RequestRefusal::InvalidBackend { target, .. }
            | RequestRefusal::NoReadyEndpoint { target } => Some(target),
        }
    }
}

/// Plans one request to `service` under `rule`: a backendRef by weight (a backend
/// without endpoints keeps its share and answers 503, as the Gateway API asks), then an
/// endpoint, then the transport; `client` is the source pod's weighted-choice state.
/// `table` must be `state`'s.
pub fn request<'r>(
    table: &RoutingTable,
    state: &ClusterState,
    balancer: &Balancer,
    client: &ClientSplits,
    service: &ObjectKey,
    port: u16,
    rule: &'r Rule,
) -> Result<RequestPlan<'r>, RequestRefusal<'r>> {
    request_keyed(table, state, balancer, client, service, port, rule, None)
}

/// [`request`] with what the backend's consistent-hash policy may hash (`None`: the
/// request offers no key, and a hashing backend picks at random).
#[allow(clippy::too_many_arguments)]
pub fn request_keyed<'r>(
    table: &RoutingTable,
    state: &ClusterState,
    balancer: &Balancer,
    client: &ClientSplits,
    service: &ObjectKey,
    port: u16,
    rule: &'r Rule,
    keys: Option<&KeyedRequest<'_>>,
) -> Result<RequestPlan<'r>, RequestRefusal<'r>> {
    let backends = rule.backends.iter().map(|t| &t.backend);
    let index = balancer
        .choose_among(client, &rule.frontend(service), port, backends)
        .ok_or(RequestRefusal::NoWeightedBackend)?;
    let target = &rule.backends[index];
    if let Some(reason) = &target.invalid {
        return Err(RequestRefusal::InvalidBackend { target, reason });
    }
    let RequestHash { hash, set_cookie } = keys
        .zip(target.backend.policy.consistent_hash.as_ref())
        .map(|(keys, policy)| request_hash(policy, keys))
        .unwrap_or_default();
    let pick = balancer
        .pick_endpoint_hashed(&target.backend, hash)
        .ok_or(RequestRefusal::NoReadyEndpoint { target })?;
    Ok(RequestPlan {
        target,
        endpoint: Endpoint::new(table, state, pick.endpoint),
        pick,
        set_cookie,
    })
}

/// Where a mirrored copy of a request goes: an endpoint of the mirror's backend, by its
/// policy (None without a ready one). `table` must be `state`'s.
pub fn mirror(
    table: &RoutingTable,
    state: &ClusterState,
    balancer: &Balancer,
    backend: &crate::routing::resolve::Backend,
) -> Option<(Endpoint, Pick)> {
    let pick = balancer.pick_endpoint(backend)?;
    Some((Endpoint::new(table, state, pick.endpoint), pick))
}

/// The backends a request or connection may be sent to, with their endpoints: those
/// with a positive weight and a ready endpoint (what trace lists as candidates).
pub fn candidates<'b>(
    backends: impl IntoIterator<Item = &'b crate::routing::resolve::Backend>,
) -> impl Iterator<Item = &'b crate::routing::resolve::Backend> {
    backends.into_iter().filter(|b| b.is_eligible())
}

#[cfg(test)]
mod tests;
