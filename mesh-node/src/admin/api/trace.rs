//! `/trace`: what the mesh would do with a connection from a pod to an address, step
//! by step, from the live state.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    admin::api::ResolutionView, admin::api::ResolvedBackendView, admin::api::RouteView,
    keys::ObjectKey, keys::PodKey, telemetry::outcome::RefusalReason,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceView {
    pub source: SourceView,
    /// The destination as asked (an address, or a Service name and port).
    pub destination: String,
    pub address: SocketAddr,
    /// The Service the name resolved to, when a name was given.
    pub named_service: Option<ObjectKey>,
    pub redirect: RedirectView,
    /// What the source's outbound proxy resolves (redirected connections only).
    pub resolution: Option<ResolutionView>,
    /// HTTPRoutes on the Service: their rules are matched per request.
    pub http_routes: Vec<RouteView>,
    pub http_request: Option<HttpRequestView>,
    /// The backends the candidates come from, with the traffic policy in force:
    /// subset, load balancer, outlier detection and each endpoint's outlier state,
    /// connection pool limits and occupancy.
    #[serde(default)]
    pub backends: Vec<ResolvedBackendView>,
    /// Where each consistent-hash backend sends this connection or request.
    #[serde(default)]
    pub hashes: Vec<HashView>,
    pub candidates: Vec<CandidateView>,
    pub outcome: TraceOutcome,
    pub summary: String,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceView {
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectView {
    pub redirected: bool,
    /// The connect hook that sees the connection (`cgroup/connect4` or `connect6`).
    pub program: String,
    pub program_id: Option<u32>,
    pub link_id: Option<u32>,
    /// The in-pod outbound listener the connection is rewritten to.
    pub to: Option<SocketAddr>,
    pub reason: String,
}

/// The request attributes the trace was asked with (they select an HTTPRoute rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequestView {
    pub method: Option<String>,
    pub path: Option<String>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceTransport {
    /// HTTP/2 CONNECT over mutual TLS to the endpoint's port 15008.
    HboneMtls,
    Plaintext,
}

/// One endpoint the connection may reach, and what its side does with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateView {
    pub backend: Option<ObjectKey>,
    pub weight: Option<u32>,
    /// The DestinationRule subset of the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    pub endpoint: SocketAddr,
    pub pod: Option<PodKey>,
    pub node: Option<String>,
    pub transport: TraceTransport,
    pub presented_identity: Option<String>,
    pub expected_identity: Option<String>,
    pub inbound: InboundView,
    pub allowed: bool,
}

/// Where a consistent-hash backend sends the traced connection or request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashView {
    pub backend: ObjectKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The policy, as `meshctl` shows it (`header x-user, ring hash 1024`).
    pub policy: String,
    /// The key's hash, in hex; None: the connection or request offers no key.
    pub hash: Option<String>,
    /// The endpoint the key lands on now (ejected endpoints skipped).
    pub endpoint: Option<SocketAddr>,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundView {
    /// The destination's agent takes the connection (15008 HBONE, or 15006 captured
    /// plaintext); false: it reaches the application (or the outside) directly.
    pub handled_by_mesh: bool,
    pub listener: Option<u16>,
    /// The effective mTLS mode of the destination port (STRICT, PERMISSIVE or
    /// DISABLE), for an enrolled destination.
    pub mode: Option<String>,
    /// What decided `mode`: a PeerAuthentication (and its level) or the namespace label.
    #[serde(default)]
    pub mode_source: Option<String>,
    pub admission: Option<AdmissionView>,
    pub note: String,
    /// Where the destination judges each request: the traced request's fate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestView>,
}

/// The destination's verdict on the traced request (`--method`, `--path`, `--header`,
/// `--jwt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestView {
    /// What the mesh answers instead of the application (401, 403); None: it reaches
    /// the application.
    pub status: Option<u16>,
    /// `no token`, `valid: <iss>/<sub>`, or `invalid: <why>`.
    pub authentication: String,
    pub allowed: bool,
    /// The deciding policy (`<ns>/<name>`) and its rule's index.
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub detail: String,
}

/// What the destination's inbound side does with the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "admission", rename_all = "snake_case")]
pub enum AdmissionView {
    Allow {
        policy: Option<String>,
    },
    Refuse {
        /// The `reason` label of `nodemesh_connections_refused_total`.
        reason: RefusalReason,
        policy: Option<String>,
        detail: String,
    },
    /// Served as HTTP: each request is judged by the policies named.
    Http {
        policies: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TraceOutcome {
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

impl TraceOutcome {
    pub fn name(self) -> &'static str {
        match self {
            TraceOutcome::Allow => "ALLOW",
            TraceOutcome::Deny => "DENY",
            TraceOutcome::Partial => "PARTIAL",
            TraceOutcome::Refused => "REFUSED",
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::admin::api::round_trip::check;

    /// A trace with every optional part present.
    pub(crate) fn sample() -> TraceView {
        TraceView {
            source: SourceView {
                pod: ObjectKey::new("apps", "client"),
                node: Some("a".into()),
                on_this_node: true,
                enrolled: true,
                reason: None,
                netns_cookie: Some(4097),
                identity: Some("spiffe://cluster.local/ns/apps/sa/client".into()),
                host_network: false,
            },
            destination: "web:80".into(),
            address: "10.96.0.10:80".parse().unwrap(),
            named_service: Some(ObjectKey::new("apps", "web")),
            redirect: RedirectView {
                redirected: true,
                program: "cgroup/connect4".into(),
                program_id: Some(41),
                link_id: Some(7),
                to: Some("127.0.0.1:15001".parse().unwrap()),
                reason: "the pod is enrolled".into(),
            },
            resolution: Some(ResolutionView::Direct),
            http_routes: vec![],
            http_request: Some(HttpRequestView {
                method: Some("GET".into()),
                path: Some("/v2".into()),
                headers: vec![("x-canary".into(), "1".into())],
            }),
            backends: vec![],
            hashes: vec![HashView {
                backend: ObjectKey::new("apps", "web"),
                subset: Some("v1".into()),
                policy: "header x-user, ring hash 1024".into(),
                hash: Some("00000000000000ff".into()),
                endpoint: Some("10.0.0.9:8080".parse().unwrap()),
                note: "the key hashes to 00000000000000ff: endpoint 10.0.0.9:8080".into(),
            }],
            candidates: vec![
                CandidateView {
                    backend: Some(ObjectKey::new("apps", "web-v1")),
                    weight: Some(50),
                    subset: Some("v1".into()),
                    endpoint: "10.0.0.9:8080".parse().unwrap(),
                    pod: Some(ObjectKey::new("apps", "server")),
                    node: Some("b".into()),
                    transport: TraceTransport::HboneMtls,
                    presented_identity: Some("spiffe://cluster.local/ns/apps/sa/client".into()),
                    expected_identity: Some("spiffe://cluster.local/ns/apps/sa/server".into()),
                    inbound: InboundView {
                        handled_by_mesh: true,
                        listener: Some(15008),
                        mode: Some("PERMISSIVE".into()),
                        mode_source: Some("no PeerAuthentication or label (default)".into()),
                        admission: Some(AdmissionView::Allow { policy: None }),
                        note: "admitted".into(),
                        request: None,
                    },
                    allowed: true,
                },
                CandidateView {
                    backend: None,
                    weight: None,
                    subset: None,
                    endpoint: "10.0.0.10:8080".parse().unwrap(),
                    pod: None,
                    node: None,
                    transport: TraceTransport::Plaintext,
                    presented_identity: None,
                    expected_identity: None,
                    inbound: InboundView {
                        handled_by_mesh: false,
                        listener: None,
                        mode: None,
                        mode_source: None,
                        admission: Some(AdmissionView::Refuse {
                            reason: RefusalReason::PolicyDenied,
                            policy: Some("apps/deny-intruder".into()),
                            detail: "DENY policy matched".into(),
                        }),
                        note: "refused".into(),
                        request: None,
                    },
                    allowed: false,
                },
            ],
            outcome: TraceOutcome::Partial,
            summary: "some candidates refuse".into(),
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn traces_keep_their_wire_form() {
        check(
            &sample(),
            json!({
                "source": {
                    "pod": {"namespace": "apps", "name": "client"}, "node": "a", "on_this_node": true,
                    "enrolled": true, "reason": null, "netns_cookie": 4097,
                    "identity": "spiffe://cluster.local/ns/apps/sa/client", "host_network": false,
                },
                "destination": "web:80", "address": "10.96.0.10:80",
                "named_service": {"namespace": "apps", "name": "web"},
                "redirect": {
                    "redirected": true, "program": "cgroup/connect4", "program_id": 41, "link_id": 7,
                    "to": "127.0.0.1:15001", "reason": "the pod is enrolled",
                },
                "resolution": {"kind": "direct"},
                "http_routes": [],
                "http_request": {"method": "GET", "path": "/v2", "headers": [["x-canary", "1"]]},
                "backends": [],
                "hashes": [{
                    "backend": {"namespace": "apps", "name": "web"}, "subset": "v1",
                    "policy": "header x-user, ring hash 1024", "hash": "00000000000000ff",
                    "endpoint": "10.0.0.9:8080",
                    "note": "the key hashes to 00000000000000ff: endpoint 10.0.0.9:8080",
                }],
                "candidates": [
                    {
                        "backend": {"namespace": "apps", "name": "web-v1"}, "weight": 50, "subset": "v1",
                        "endpoint": "10.0.0.9:8080", "pod": {"namespace": "apps", "name": "server"},
                        "node": "b", "transport": "hbone_mtls",
                        "presented_identity": "spiffe://cluster.local/ns/apps/sa/client",
                        "expected_identity": "spiffe://cluster.local/ns/apps/sa/server",
                        "inbound": {
                            "handled_by_mesh": true, "listener": 15008, "mode": "PERMISSIVE",
                            "mode_source": "no PeerAuthentication or label (default)",
                            "admission": {"admission": "allow", "policy": null}, "note": "admitted",
                        },
                        "allowed": true,
                    },
                    {
                        "backend": null, "weight": null, "endpoint": "10.0.0.10:8080", "pod": null,
                        "node": null, "transport": "plaintext", "presented_identity": null,
                        "expected_identity": null,
                        "inbound": {
                            "handled_by_mesh": false, "listener": null, "mode": null, "mode_source": null,
                            "admission": {"admission": "refuse", "reason": "policy_denied",
                                "policy": "apps/deny-intruder", "detail": "DENY policy matched"},
                            "note": "refused",
                        },
                        "allowed": false,
                    },
                ],
                "outcome": "PARTIAL", "summary": "some candidates refuse", "notes": ["a note"],
            }),
        );
        for outcome in [
            TraceOutcome::Allow,
            TraceOutcome::Deny,
            TraceOutcome::Partial,
            TraceOutcome::Refused,
        ] {
            assert_eq!(serde_json::to_value(outcome).unwrap(), outcome.name());
        }
    }
}
