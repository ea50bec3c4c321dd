//! `/routes` (and the routes of `/services` and `/trace`): TCPRoutes and HTTPRoutes
//! attached to Services, with their rules, weighted backends and observed shares.

use serde::{Deserialize, Serialize};

use crate::keys::ObjectKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteKind {
    #[serde(rename = "TCPRoute")]
    TcpRoute,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    VirtualService,
}

impl RouteKind {
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::TcpRoute => "TCPRoute",
            RouteKind::HttpRoute => "HTTPRoute",
            RouteKind::VirtualService => "VirtualService",
        }
    }
}

/// When the route's rule is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Chosen {
    /// TCP: once per connection.
    PerConnection,
    /// HTTP: the rule is chosen per request.
    PerRequest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParentView {
    pub service: ObjectKey,
    /// None: every port of the Service.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub service: ObjectKey,
    /// None: the port the client connected to.
    pub port: Option<u16>,
    pub weight: u32,
    /// Ready endpoints of the backend Service right now.
    pub ready_endpoints: usize,
    /// Connections (or requests) the balancer sent to this backend since the agent started.
    pub picks: u64,
    /// picks / all picks of this rule (None before the first pick).
    pub observed_share: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleView {
    pub index: usize,
    pub name: Option<String>,
    /// One line per match (HTTP); empty for TCP. A rule without matches matches all.
    pub matches: Vec<String>,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteView {
    pub kind: RouteKind,
    pub route: ObjectKey,
    pub parents: Vec<ParentView>,
    pub chosen: Chosen,
    pub rules: Vec<RuleView>,
    /// Where the route does not apply, and why (a VirtualService bound only to
    /// gateways, or losing a Service port to an HTTPRoute; fields not implemented).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_applied: Vec<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::admin::api::round_trip::check;

    #[test]
    fn routes_keep_their_wire_form() {
        let view = vec![
            RouteView {
                kind: RouteKind::TcpRoute,
                route: ObjectKey::new("apps", "split"),
                parents: vec![ParentView {
                    service: ObjectKey::new("apps", "web"),
                    port: Some(80),
                }],
                chosen: Chosen::PerConnection,
                rules: vec![RuleView {
                    index: 0,
                    name: None,
                    matches: vec![],
                    backends: vec![BackendView {
                        service: ObjectKey::new("apps", "web-v1"),
                        port: Some(80),
                        weight: 90,
                        ready_endpoints: 2,
                        picks: 27,
                        observed_share: Some(0.9),
                    }],
                }],
                not_applied: vec![],
            },
            RouteView {
                kind: RouteKind::HttpRoute,
                route: ObjectKey::new("apps", "api"),
                parents: vec![ParentView {
                    service: ObjectKey::new("apps", "api"),
                    port: None,
                }],
                chosen: Chosen::PerRequest,
                rules: vec![RuleView {
                    index: 1,
                    name: Some("canary".into()),
                    matches: vec!["PathPrefix /v2, GET".into()],
                    backends: vec![BackendView {
                        service: ObjectKey::new("apps", "api-v2"),
                        port: None,
                        weight: 1,
                        ready_endpoints: 0,
                        picks: 0,
                        observed_share: None,
                    }],
                }],
                not_applied: vec![],
            },
        ];
        check(
            &view,
            json!([
                {
                    "kind": "TCPRoute", "route": {"namespace": "apps", "name": "split"},
                    "parents": [{"service": {"namespace": "apps", "name": "web"}, "port": 80}],
                    "chosen": "per_connection",
                    "rules": [{"index": 0, "name": null, "matches": [], "backends": [{
                        "service": {"namespace": "apps", "name": "web-v1"}, "port": 80, "weight": 90,
                        "ready_endpoints": 2, "picks": 27, "observed_share": 0.9}]}],
                },
                {
                    "kind": "HTTPRoute", "route": {"namespace": "apps", "name": "api"},
                    "parents": [{"service": {"namespace": "apps", "name": "api"}, "port": null}],
                    "chosen": "per_request",
                    "rules": [{"index": 1, "name": "canary", "matches": ["PathPrefix /v2, GET"], "backends": [{
                        "service": {"namespace": "apps", "name": "api-v2"}, "port": null, "weight": 1,
                        "ready_endpoints": 0, "picks": 0, "observed_share": null}]}],
                },
            ]),
        );
    }
}
