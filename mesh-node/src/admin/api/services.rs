//! `/services`: every Service port with what a connection to it resolves to.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{
    admin::api::RouteView, discovery::connection_pool::PoolLimits,
    discovery::consistent_hash::HashPolicy, discovery::traffic_policy::LbPolicy,
    discovery::traffic_policy::OutlierPolicy, discovery::traffic_policy::Problem, keys::ObjectKey,
    routing::outlier::EndpointOutlier, routing::pool::Occupancy,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub service: ObjectKey,
    pub vips: Vec<IpAddr>,
    pub port: u16,
    /// What a connection to the first VIP resolves to (None: the Service has no VIP).
    pub resolution: Option<ResolutionView>,
    /// HTTPRoutes on this port: their rules choose per request.
    pub http_routes: Vec<RouteView>,
    /// The DestinationRule for the Service (in force, or rejected with its problems).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<DestinationRuleView>,
}

/// A DestinationRule as the agent applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRuleView {
    pub rule: ObjectKey,
    /// False: rejected (see the problems); the Service keeps its default policy.
    pub applied: bool,
    pub subsets: Vec<String>,
    /// What is wrong with it, not implemented, or shadowed by an older rule.
    pub problems: Vec<Problem>,
}

/// Where a connection to an address goes, as the outbound proxy resolves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResolutionView {
    /// Not a Service address: the proxy connects to it as addressed.
    Direct,
    Service {
        service: ObjectKey,
        port: u16,
        /// The TCPRoute that chose the backends (None: the Service's own endpoints).
        route: Option<ObjectKey>,
        backends: Vec<ResolvedBackendView>,
    },
    /// A Service VIP, but not one of its ports.
    UnknownPort { service: ObjectKey, port: u16 },
    /// Inside a service address range, but no Service has this address.
    UnknownService,
}

impl ResolutionView {
    /// The `kind` of the resolution as the JSON names it.
    pub fn kind(&self) -> &'static str {
        match self {
            ResolutionView::Direct => "direct",
            ResolutionView::Service { .. } => "service",
            ResolutionView::UnknownPort { .. } => "unknown_port",
            ResolutionView::UnknownService => "unknown_service",
        }
    }
}

/// One weighted backend Service of a resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedBackendView {
    pub service: ObjectKey,
    /// The backend Service's port.
    pub port: u16,
    pub weight: u32,
    /// Ready endpoints, sorted.
    pub endpoints: Vec<SocketAddr>,
    pub least_connections: bool,
    /// The DestinationRule subset the endpoints are limited to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Why the subset has no endpoints at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset_error: Option<String>,
    /// How an endpoint is chosen.
    #[serde(default)]
    pub load_balancer: LbPolicy,
    /// What a consistent-hash load balancer hashes, and how (CONSISTENT_HASH only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<HashPolicy>,
    /// Outlier detection in force (None: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierPolicy>,
    /// Each endpoint's outlier state (those outlier detection has seen).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outliers: Vec<EndpointOutlier>,
    /// Circuit breaking in force (a DestinationRule's connectionPool; None: no limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<PoolLimits>,
    /// The pool's occupancy on this node (with `connection_pool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Occupancy>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::admin::api::round_trip::check;

    #[test]
    fn services_keep_their_wire_form() {
        let view = vec![
            ServiceView {
                service: ObjectKey::new("apps", "web"),
                vips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
                port: 80,
                resolution: Some(ResolutionView::Service {
                    service: ObjectKey::new("apps", "web"),
                    port: 80,
                    route: Some(ObjectKey::new("apps", "web-split")),
                    backends: vec![ResolvedBackendView {
                        service: ObjectKey::new("apps", "web-v1"),
                        port: 80,
                        weight: 50,
                        endpoints: vec!["10.0.0.9:8080".parse().unwrap()],
                        least_connections: false,
                        subset: None,
                        subset_error: None,
                        load_balancer: LbPolicy::RoundRobin,
                        consistent_hash: None,
                        outlier_detection: None,
                        outliers: vec![],
                        connection_pool: None,
                        pool: None,
                    }],
                }),
                http_routes: vec![],
                destination_rule: None,
            },
            ServiceView {
                service: ObjectKey::new("apps", "headless"),
                vips: vec![],
                port: 81,
                resolution: None,
                http_routes: vec![],
                destination_rule: None,
            },
        ];
        check(
            &view,
            json!([
                {
                    "service": {"namespace": "apps", "name": "web"},
                    "vips": ["10.96.0.10", "fd00::10"], "port": 80,
                    "resolution": {
                        "kind": "service", "service": {"namespace": "apps", "name": "web"}, "port": 80,
                        "route": {"namespace": "apps", "name": "web-split"},
                        "backends": [{"service": {"namespace": "apps", "name": "web-v1"}, "port": 80,
                            "weight": 50, "endpoints": ["10.0.0.9:8080"], "least_connections": false,
                            "load_balancer": "ROUND_ROBIN"}],
                    },
                    "http_routes": [],
                },
                {
                    "service": {"namespace": "apps", "name": "headless"},
                    "vips": [], "port": 81, "resolution": null, "http_routes": [],
                },
            ]),
        );
        for (resolution, wire) in [
            (ResolutionView::Direct, json!({"kind": "direct"})),
            (
                ResolutionView::UnknownService,
                json!({"kind": "unknown_service"}),
            ),
            (
                ResolutionView::UnknownPort {
                    service: ObjectKey::new("apps", "web"),
                    port: 81,
                },
                json!({"kind": "unknown_port", "service": {"namespace": "apps", "name": "web"}, "port": 81}),
            ),
        ] {
            assert_eq!(resolution.kind(), wire["kind"]);
            check(&resolution, wire);
        }
    }
}
