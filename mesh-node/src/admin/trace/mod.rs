//! `meshctl node trace <pod> <host:port>`: what the mesh would do with a connection
//! from a pod, computed from the live state with the very functions the data path
//! calls (enrollment, the connect hooks' exclusion check on the map entry, the routing
//! plan — Service, route, candidate backends and endpoints, transport — and inbound
//! admission), so the prediction cannot drift from what traffic does. No traffic is
//! sent.

mod destination;
mod policy;
mod request;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use mesh_common::{
    InboundPolicy, Ip, OutboundPolicy, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT,
};
use serde::Serialize;
use thiserror::Error;

pub(crate) use destination::parse_destination;
pub(crate) use policy::HashStep;

use crate::{
    admin::routes::http_routes_for, admin::routes::RouteView, capture::dataplane::Dataplane,
    capture::dataplane::ProgramStatus, discovery::cluster::canonical, discovery::cluster::ip_key,
    discovery::cluster::plan, discovery::cluster::service_account,
    discovery::cluster::ClusterState, identity::authz::admit, identity::authz::Admission,
    identity::authz::ConnectionFacts, identity::Identity, keys::ObjectKey, keys::PodKey,
    routing::balancer::Balancer, routing::balancer::PickCounts, routing::hash_key::KeyedRequest,
    routing::http::routes::RouteTable, routing::plan as routing_plan,
    routing::plan::candidates as candidates_of, routing::plan::Route,
    routing::resolve::ready_endpoints, routing::resolve::IpCidr, routing::resolve::Lookup,
    routing::resolve::Resolution, routing::table::RoutingTable, routing::transport,
    workloads::WorkloadStatus,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum TraceError {
    #[error("no pod {0} in this agent's cluster state; check the name with `meshctl node workloads` (or -n for its namespace)")]
    UnknownPod(PodKey),
    #[error("{0}")]
    BadDestination(String),
}

/// Request attributes that will select an HTTPRoute rule once the L7 matcher is
/// wired in; carried and echoed so clients can already send them.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct HttpAttributes {
    pub method: Option<String>,
    pub path: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl HttpAttributes {
    pub(crate) fn is_empty(&self) -> bool {
        self.method.is_none() && self.path.is_none() && self.headers.is_empty()
    }
}

/// The eBPF state a trace reads (the live maps on an agent, fixed values in tests).
pub(crate) trait DataplaneView {
    fn enrolled_policy(&self, netns_cookie: u64) -> Option<OutboundPolicy>;
    fn inbound_policy(&self, ip: Ip) -> Option<InboundPolicy>;
    fn program(&self, attach: &str) -> Option<ProgramStatus>;
}

impl DataplaneView for Dataplane {
    fn enrolled_policy(&self, netns_cookie: u64) -> Option<OutboundPolicy> {
        Dataplane::enrolled_policy(self, netns_cookie)
    }
    fn inbound_policy(&self, ip: Ip) -> Option<InboundPolicy> {
        Dataplane::inbound_policy(self, ip)
    }
    fn program(&self, attach: &str) -> Option<ProgramStatus> {
        self.programs().iter().find(|p| p.attach == attach).cloned()
    }
}

/// What a trace reads.
pub(crate) struct TraceInputs<'a> {
    pub state: &'a ClusterState,
    pub node: &'a str,
    pub workloads: &'a [WorkloadStatus],
    pub dataplane: &'a dyn DataplaneView,
    pub service_cidrs: &'a [IpCidr],
    /// None: no CA configured, so no mutual TLS.
    pub trust_domain: Option<&'a str>,
    pub picks: &'a PickCounts,
    /// The live balancer (its outlier state), when the trace runs on an agent.
    pub balancer: Option<&'a Balancer>,
    /// The node's request authenticator (its JWKS), when the trace runs on an agent.
    pub jwt: Option<&'a crate::identity::jwt::JwtAuthenticator>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SourceStep {
    pub pod: PodKey,
    pub node: Option<String>,
    pub on_this_node: bool,
    pub enrolled: bool,
    /// Why not enrolled (a rule, or the agent's last enrollment error).
    pub reason: Option<String>,
    pub netns_cookie: Option<u64>,
    /// The identity the source presents over mutual TLS.
    pub identity: Option<String>,
    /// A hostNetwork pod: its sockets are the node's own.
    pub host_network: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RedirectStep {
    pub redirected: bool,
    /// The connect hook that sees the connection (`cgroup/connect4` or `connect6`).
    pub program: String,
    pub program_id: Option<u32>,
    pub link_id: Option<u32>,
    /// The in-pod outbound listener the connection is rewritten to.
    pub to: Option<SocketAddr>,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Transport {
    /// HTTP/2 CONNECT over mutual TLS to the endpoint's port 15008.
    HboneMtls,
    Plaintext,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct InboundStep {
    /// The destination's agent takes the connection (15008 HBONE, or 15006 captured
    /// plaintext); false: it reaches the application (or the outside) directly.
    pub handled_by_mesh: bool,
    pub listener: Option<u16>,
    /// The effective mTLS mode of the destination port (STRICT, PERMISSIVE or
    /// DISABLE), for an enrolled destination.
    pub mode: Option<&'static str>,
    /// What decided `mode`: a PeerAuthentication (and its level) or the namespace label.
    pub mode_source: Option<String>,
    pub admission: Option<Admission>,
    pub note: String,
    /// The traced request's verdict, where the destination judges each request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<request::RequestStep>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Candidate {
    pub backend: Option<ObjectKey>,
    pub weight: Option<u32>,
    /// The DestinationRule subset of the backend.
    pub subset: Option<String>,
    pub endpoint: SocketAddr,
    pub pod: Option<PodKey>,
    pub node: Option<String>,
    pub transport: Transport,
    pub presented_identity: Option<String>,
    pub expected_identity: Option<String>,
    pub inbound: InboundStep,
    pub allowed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum Outcome {
    /// Every candidate endpoint accepts the connection.
    Allow,
    /// Every candidate refuses it.
    Deny,
    /// Some candidates accept, some refuse (which one a connection meets is the
    /// balancer's pick).
    Partial,
    /// The source's proxy refuses it before choosing an endpoint.
    Refused,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Trace {
    pub source: SourceStep,
    pub destination: String,
    pub address: SocketAddr,
    /// The Service the name resolved to, when a name was given.
    pub named_service: Option<ObjectKey>,
    pub redirect: RedirectStep,
    /// What the source's outbound proxy resolves (redirected connections only).
    pub resolution: Option<Resolution>,
    /// HTTPRoutes on the Service: their rules are matched per request.
    pub http_routes: Vec<RouteView>,
    pub http_request: Option<HttpAttributes>,
    /// The backends the candidates come from, with the traffic policy in force (the
    /// admin view adds their outlier state and pool occupancy).
    #[serde(skip)]
    pub backends: Vec<crate::routing::resolve::Backend>,
    /// Where consistent-hash backends send this connection or request.
    pub hashes: Vec<HashStep>,
    pub candidates: Vec<Candidate>,
    pub outcome: Outcome,
    pub summary: String,
    pub notes: Vec<String>,
}

fn source_step(
    inputs: &TraceInputs,
    key: &PodKey,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> SourceStep {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let on_this_node = node.as_deref() == Some(inputs.node);
    let rule = inputs.state.enrollment(key, pod);
    let running = inputs.workloads.iter().find(|w| w.pod == *key);
    let (enrolled, reason, cookie) = match (on_this_node, running, rule) {
        (true, Some(w), _) => (w.enrolled, w.reason.clone(), w.netns_cookie),
        (true, None, _) => (false, Some("pending: not reconciled yet".into()), None),
        // Another node's pod: its agent applies the same rule.
        (false, _, Ok(())) => (true, None, None),
        (false, _, Err(r)) => (false, Some(not_enrolled_text(r)), None),
    };
    let identity = match (enrolled, inputs.trust_domain) {
        (true, Some(td)) => {
            Some(Identity::new(td, &key.namespace, service_account(pod)).to_string())
        }
        _ => None,
    };
    SourceStep {
        pod: key.clone(),
        node,
        on_this_node,
        enrolled,
        reason,
        netns_cookie: cookie,
        identity,
        host_network: pod.spec.as_ref().and_then(|s| s.host_network) == Some(true),
    }
}

fn not_enrolled_text(r: crate::discovery::cluster::NotEnrolled) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn redirect_step(
    inputs: &TraceInputs,
    source: &SourceStep,
    pod: &k8s_openapi::api::core::v1::Pod,
    dst: SocketAddr,
) -> RedirectStep {
    let program = if dst.is_ipv4() {
        "cgroup/connect4"
    } else {
        "cgroup/connect6"
    };
    let status = inputs.dataplane.program(program);
    let mut step = RedirectStep {
        redirected: false,
        program: program.to_string(),
        program_id: status.as_ref().map(|p| p.program_id),
        link_id: status.as_ref().map(|p| p.link_id),
        to: None,
        reason: String::new(),
    };
    if !source.enrolled {
        step.reason = format!(
            "the pod is not enrolled ({}): the connect hook leaves it alone",
            source.reason.as_deref().unwrap_or("unknown")
        );
        return step;
    }
    // On this node the live map entry decides; for another node's pod, the entry its
    // agent writes from the same plan.
    let policy = match source.netns_cookie {
        Some(cookie) => inputs.dataplane.enrolled_policy(cookie),
        None if !source.on_this_node => Some(plan(&source.pod, pod).outbound),
        None => None,
    };
    let Some(policy) = policy else {
        step.reason = "the pod's network namespace has no entry in the enrollment map".into();
        return step;
    };
    let ip = ip_key(dst.ip());
    if ip.is_loopback_or_unspecified() {
        step.reason = "loopback and unspecified destinations are never redirected".into();
    } else if policy.excludes(&ip, dst.port()) {
        step.reason =
            "excluded by the pod's nodemesh.io/exclude-outbound-ports or -cidrs annotation".into();
    } else {
        step.redirected = true;
        step.to = Some(if dst.is_ipv4() {
            SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT))
        } else {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), OUTBOUND_PORT)
        });
        step.reason = "enrolled and not excluded: rewritten to the in-pod outbound listener".into();
    }
    step
}

/// Whether sk_lookup on the destination's node steers a plaintext connection from
/// `src_ip` to `ep` into the pod's 15006 listener; Err says why not. `node_socket`:
/// the connection is the destination node's own, straight to the pod's address.
fn captured(
    inputs: &TraceInputs,
    dest: &PodKey,
    src_ip: Option<IpAddr>,
    ep: SocketAddr,
    node_socket: bool,
) -> Result<(), String> {
    let state = inputs.state;
    let pod = state.pods.get(dest).ok_or("unknown pod")?;
    if let Err(r) = state.enrollment(dest, pod) {
        return Err(format!(
            "destination not enrolled ({}): no policy applies",
            not_enrolled_text(r)
        ));
    }
    if [HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT].contains(&ep.port()) {
        return Err(format!("port {} belongs to the mesh itself", ep.port()));
    }
    let on_this_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(inputs.node);
    let ip = ip_key(ep.ip());
    let policy = if on_this_node {
        inputs.dataplane.inbound_policy(ip)
    } else {
        Some(plan(dest, pod).inbound)
    };
    let Some(policy) = policy else {
        return Err("the destination address has no entry in the inbound map".into());
    };
    if policy.excludes(ep.port()) {
        return Err("port excluded by nodemesh.io/exclude-inbound-ports".into());
    }
    if let Some(src) = src_ip {
        let src = canonical(src);
        if src == canonical(ep.ip()) {
            return Err("a pod connecting to itself is not captured".into());
        }
    }
    if node_socket {
        return Err(
            "from the node's own socket straight to the pod (kubelet probes are not captured)"
                .into(),
        );
    }
    Ok(())
}

/// One endpoint a connection may reach. `planned`: the transport the routing plan
/// chose for it (None: not redirected, the connection leaves as the pod sent it).
fn candidate(
    inputs: &TraceInputs,
    source: &SourceStep,
    src_ip: Option<IpAddr>,
    planned: Option<&transport::Transport>,
    backend: Option<(&ObjectKey, u32)>,
    ep: SocketAddr,
) -> Candidate {
    let state = inputs.state;
    let dest = state.pod_by_ip(ep.ip()).cloned();
    let node = dest
        .as_ref()
        .and_then(|k| state.pods.get(k))
        .and_then(|p| p.spec.as_ref()?.node_name.clone());
    // A hostNetwork pod's socket is the node's: recognised when it connects straight to
    // a pod of its own node (not through a Service address).
    let node_socket = source.host_network && backend.is_none() && node == source.node;
    // The outbound proxy's choice, from the plan: HBONE to meshed pods when a CA is set.
    let expected: Option<Identity> = planned.and_then(|t| t.identity().cloned());
    let presented: Option<Identity> = expected
        .as_ref()
        .and_then(|_| source.identity.as_deref()?.parse().ok());
    let mut inbound = InboundStep {
        handled_by_mesh: false,
        listener: None,
        mode: None,
        mode_source: None,
        admission: None,
        note: String::new(),
        request: None,
    };
    match (&dest, &presented) {
        (Some(d), Some(peer)) => {
            inbound.handled_by_mesh = true;
            inbound.listener = Some(HBONE_PORT);
            set_mode(&mut inbound, state, d, ep.port());
            let facts = ConnectionFacts {
                source_ip: src_ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                peer: Some(peer.clone()),
                destination: ep,
            };
            inbound.admission = Some(admit(state, d, &facts));
        }
        (Some(d), None) => match captured(inputs, d, src_ip, ep, node_socket) {
            Ok(()) => {
                inbound.handled_by_mesh = true;
                inbound.listener = Some(INBOUND_PLAINTEXT_PORT);
                set_mode(&mut inbound, state, d, ep.port());
                let facts = ConnectionFacts {
                    source_ip: src_ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                    peer: None,
                    destination: ep,
                };
                inbound.admission = Some(admit(state, d, &facts));
            }
            Err(why) => inbound.note = why,
        },
        (None, _) => inbound.note = "not a pod of the cluster: no mesh policy applies".into(),
    }
    if inbound.note.is_empty() {
        inbound.note = match &inbound.admission {
            Some(Admission::Allow { policy: Some(p) }) => format!("allowed by {p}"),
            Some(Admission::Allow { policy: None }) => "allowed: no policy denies it".into(),
            Some(Admission::Refuse { detail, .. }) => detail.clone(),
            Some(Admission::Http { policies }) => {
                format!(
                    "served as HTTP, each request judged by {}",
                    policies.join(", ")
                )
            }
            None => String::new(),
        };
    }
    let allowed = !matches!(inbound.admission, Some(Admission::Refuse { .. }));
    Candidate {
        backend: backend.map(|(b, _)| b.clone()),
        weight: backend.map(|(_, w)| w),
        subset: None,
        endpoint: ep,
        pod: dest,
        node,
        transport: if presented.is_some() {
            Transport::HboneMtls
        } else {
            Transport::Plaintext
        },
        presented_identity: presented.map(|i| i.to_string()),
        expected_identity: expected.map(|i| i.to_string()),
        inbound,
        allowed,
    }
}

/// The destination port's effective mTLS mode and what decided it (the same
/// [`ClusterState::mtls_mode`] the inbound listeners use).
fn set_mode(inbound: &mut InboundStep, state: &ClusterState, pod: &PodKey, port: u16) {
    let mtls = state.mtls_mode(pod, port);
    inbound.mode = Some(mtls.mode.name());
    inbound.mode_source = Some(mtls.source.to_string());
}

/// The request the attributes describe, for the L7 matcher (None when none given).
fn request_parts(http: &HttpAttributes) -> Option<http::request::Parts> {
    if http.is_empty() {
        return None;
    }
    let mut builder = http::Request::builder()
        .method(http.method.as_deref().unwrap_or("GET"))
        .uri(http.path.as_deref().unwrap_or("/"));
    for (k, v) in &http.headers {
        builder = builder.header(k, v);
    }
    builder.body(()).ok().map(|r| r.into_parts().0)
}

/// Traces a connection from `pod` to `destination` (`ip:port` or `service[.ns]:port`).
pub(crate) fn trace(
    inputs: &TraceInputs,
    pod_key: &PodKey,
    destination: &str,
    http: Option<HttpAttributes>,
) -> Result<Trace, TraceError> {
    let state = inputs.state;
    let pod = state
        .pods
        .get(pod_key)
        .ok_or_else(|| TraceError::UnknownPod(pod_key.clone()))?;
    let (dst, named_service) = parse_destination(state, &pod_key.namespace, destination)
        .map_err(TraceError::BadDestination)?;
    let source = source_step(inputs, pod_key, pod);
    let redirect = redirect_step(inputs, &source, pod, dst);
    // (A hostNetwork pod's status.podIP is its node's address.)
    let src_ip = crate::discovery::cluster::pod_ips(pod)
        .into_iter()
        .find(|ip| ip.is_ipv4() == canonical(dst.ip()).is_ipv4());
    let mut notes = Vec::new();
    if !source.on_this_node {
        notes.push(format!(
            "{} runs on node {}, not {}: computed from the shared state; run the trace on that node's agent for its live maps",
            pod_key,
            source.node.as_deref().unwrap_or("(unscheduled)"),
            inputs.node
        ));
    }
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut backends: Vec<crate::routing::resolve::Backend> = Vec::new();
    let mut resolution = None;
    let mut http_routes = Vec::new();
    let mut refusal = None;
    let mut hashes = Vec::new();
    if redirect.redirected {
        // The plan traffic follows, on a table of the same snapshot.
        let table = RoutingTable::new(
            Arc::new(inputs.service_cidrs.to_vec()),
            inputs.trust_domain.map(String::from),
        );
        let lookup = table.lookup(state, dst);
        if let Lookup::Service(s) = &lookup {
            http_routes =
                http_routes_for(state, &s.frontend.service, s.frontend.port, inputs.picks);
        }
        resolution = Some(lookup.resolution());
        let mut push = |backend: Option<&crate::routing::resolve::Backend>, ep: SocketAddr| {
            let info = table.endpoint(state, ep);
            let mut c = candidate(
                inputs,
                &source,
                src_ip,
                Some(&info.transport),
                backend.map(|b| (&b.service, b.weight)),
                ep,
            );
            c.subset = backend.and_then(|b| b.subset.clone());
            candidates.push(c);
        };
        match routing_plan::route(&table, state, dst) {
            Route::Direct(endpoint) => push(None, endpoint.addr),
            Route::Service(service) => {
                for b in service.eligible() {
                    for ep in &b.endpoints {
                        push(Some(b), *ep);
                    }
                }
                backends = service.backends.clone();
                let keys = policy::Keys::Connection(src_ip);
                hashes = backends
                    .iter()
                    .filter_map(|b| policy::hash_step(b, keys, inputs.balancer))
                    .collect();
            }
            // HTTP-routed: the L7 proxy's own table; its rule is chosen per request (by
            // the request's method, path and headers when they are given).
            Route::Http(service) => {
                let frontend = &service.frontend;
                let rule_table =
                    RouteTable::build(state, &frontend.service, frontend.port, service.want_v6);
                let parts = http.as_ref().and_then(request_parts);
                let rules = match &parts {
                    Some(parts) => rule_table
                        .select(parts)
                        .map(|(_, r)| vec![r])
                        .unwrap_or_default(),
                    None => rule_table.rules(),
                };
                if let (Some(parts), Some(rule)) = (&parts, rules.first()) {
                    notes.push(format!(
                        "{} {} selects rule {}",
                        parts.method,
                        parts.uri,
                        rule.describe()
                    ));
                }
                let in_play = rules
                    .iter()
                    .flat_map(|r| r.backends.iter().map(|t| &t.backend));
                let mut any = false;
                for b in candidates_of(in_play.clone()) {
                    for ep in &b.endpoints {
                        any = true;
                        push(Some(b), *ep);
                    }
                }
                let keyed = match (&parts, src_ip) {
                    (Some(parts), Some(ip)) => policy::Keys::Request(KeyedRequest {
                        parts,
                        src: SocketAddr::new(ip, 0),
                        source_ip: ip,
                    }),
                    _ => policy::Keys::AnyRequest,
                };
                for b in in_play {
                    if !backends.contains(b) {
                        backends.push(b.clone());
                    }
                }
                hashes = backends
                    .iter()
                    .filter_map(|b| policy::hash_step(b, keyed, inputs.balancer))
                    .collect();
                if !any {
                    refusal = Some(
                        "no HTTPRoute rule with a ready backend for this request (HTTP 404/503)"
                            .to_string(),
                    );
                }
            }
            Route::Refused { refusal: r, .. } => {
                refusal = Some(format!("{} ({})", r.detail(), r.as_str()));
            }
        }
    } else if let Some((key, _)) = state.service_by_ip(dst.ip()) {
        notes.push("not redirected: a Service address is left to kube-proxy (or its replacement), which spreads over the Service's own ready endpoints".into());
        for ep in ready_endpoints(state, key, dst.port(), !canonical(dst.ip()).is_ipv4()) {
            candidates.push(candidate(inputs, &source, src_ip, None, Some((key, 1)), ep));
        }
        if candidates.is_empty() {
            refusal = Some("the Service has no ready endpoint for this port".to_string());
        }
    } else {
        candidates.push(candidate(inputs, &source, src_ip, None, None, dst));
    }
    if !http_routes.is_empty() && http.as_ref().and_then(request_parts).is_none() {
        notes.push("HTTP-routed: the rule is chosen per request; the candidates are the backends of every rule (pass method/path/header to select one)".into());
    }
    for c in &mut candidates {
        request::judge(inputs, c, src_ip, http.as_ref());
    }
    let allowed = candidates.iter().filter(|c| c.allowed).count();
    let outcome = match refusal {
        Some(_) => Outcome::Refused,
        None if allowed == candidates.len() => Outcome::Allow,
        None if allowed == 0 => Outcome::Deny,
        None => Outcome::Partial,
    };
    let summary = match (outcome, refusal) {
        (_, Some(why)) => format!("refused by the source's proxy: {why}"),
        (Outcome::Allow, _) => format!("allowed on all {} candidate endpoint(s)", candidates.len()),
        (Outcome::Deny, _) => {
            let why = candidates
                .first()
                .map(|c| c.inbound.note.clone())
                .unwrap_or_default();
            format!("denied on every candidate endpoint: {why}")
        }
        _ => format!(
            "allowed on {allowed} of {} candidate endpoints",
            candidates.len()
        ),
    };
    Ok(Trace {
        source,
        destination: destination.to_string(),
        address: dst,
        named_service,
        redirect,
        resolution,
        http_routes,
        http_request: http.filter(|h| !h.is_empty()),
        backends,
        hashes,
        candidates,
        outcome,
        summary,
        notes,
    })
}

#[cfg(test)]
mod request_tests;
#[cfg(test)]
mod tests;
