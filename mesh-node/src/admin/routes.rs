//! The routes the agent knows (TCPRoutes and HTTPRoutes attached to Services, GAMMA),
//! as the admin API, `meshctl node routes` and the trace show them: rules, matches,
//! weighted backends, and the share of picks each backend actually got.

use serde_json::Value;

/// The trace shows the routes of a Service as this view does.
pub use crate::admin::api::RouteView;
use crate::{
    admin::api::BackendView, admin::api::Chosen, admin::api::ParentView, admin::api::RouteKind,
    admin::api::RuleView, discovery::cluster::is_service_parent, discovery::cluster::ClusterState,
    keys::ObjectKey, routing::balancer::PickCounts, routing::resolve::is_service_backend,
    routing::resolve::ready_endpoints,
};

/// A backendRef as the two route kinds spell it.
struct BackendRef<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    namespace: Option<&'a str>,
    name: &'a str,
    port: Option<i32>,
    weight: Option<i32>,
}

/// A parentRef as the two route kinds spell it.
struct ParentRef<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    namespace: Option<&'a str>,
    name: &'a str,
    port: Option<i32>,
}

fn parents(route_ns: &str, refs: &[ParentRef]) -> Vec<ParentView> {
    refs.iter()
        .filter(|p| is_service_parent(p.group, p.kind))
        .map(|p| ParentView {
            service: ObjectKey::new(p.namespace.unwrap_or(route_ns), p.name),
            port: p.port.and_then(|p| u16::try_from(p).ok()),
        })
        .collect()
}

fn backends(
    state: &ClusterState,
    route_ns: &str,
    parents: &[ParentView],
    refs: &[BackendRef],
    picks: &PickCounts,
    rule_frontend: Option<&ObjectKey>,
) -> Vec<BackendView> {
    let mut out: Vec<BackendView> = refs
        .iter()
        .filter(|r| is_service_backend(r.group, r.kind))
        .map(|r| {
            let service = ObjectKey::new(r.namespace.unwrap_or(route_ns), r.name);
            let port = r.port.and_then(|p| u16::try_from(p).ok());
            let ready = port
                .or_else(|| parents.iter().find_map(|p| p.port))
                .map(|port| {
                    let v4 = ready_endpoints(state, &service, port, false).len();
                    v4.max(ready_endpoints(state, &service, port, true).len())
                })
                .unwrap_or(0);
            // Picks are counted per frontend: the Service port (L4), or the rule (L7).
            let picked = picks
                .iter()
                .filter(|((svc, port), _)| {
                    Some(svc) == rule_frontend
                        || parents
                            .iter()
                            .any(|p| p.service == *svc && p.port.is_none_or(|pp| pp == *port))
                })
                .filter_map(|(_, by_backend)| by_backend.get(&service))
                .sum();
            BackendView {
                service,
                port,
                weight: r.weight.unwrap_or(1).max(0) as u32,
                ready_endpoints: ready,
                picks: picked,
                observed_share: None,
            }
        })
        .collect();
    let total: u64 = out.iter().map(|b| b.picks).sum();
    if total > 0 {
        for b in &mut out {
            b.observed_share = Some(b.picks as f64 / total as f64);
        }
    }
    out
}

/// One line for an HTTPRoute match, read from its JSON form so it does not depend on
/// which Gateway API channel's types the state carries.
pub fn describe_match(m: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(path) = m.get("path") {
        let kind = path["type"].as_str().unwrap_or("PathPrefix");
        let value = path["value"].as_str().unwrap_or("/");
        parts.push(format!("{kind} {value}"));
    }
    if let Some(method) = m["method"].as_str() {
        parts.push(method.to_string());
    }
    for (field, what) in [("headers", "header"), ("queryParams", "query")] {
        for h in m[field].as_array().into_iter().flatten() {
            let op = match h["type"].as_str() {
                Some("RegularExpression") => "~",
                _ => "=",
            };
            parts.push(format!(
                "{what} {}{op}{}",
                h["name"].as_str().unwrap_or("?"),
                h["value"].as_str().unwrap_or("")
            ));
        }
    }
    if parts.is_empty() {
        "PathPrefix /".to_string()
    } else {
        parts.join(", ")
    }
}

/// The two route kinds spell parentRefs and backendRefs alike, in different types.
macro_rules! parent_ref {
    ($p:expr) => {
        ParentRef {
            group: $p.group.as_deref(),
            kind: $p.kind.as_deref(),
            namespace: $p.namespace.as_deref(),
            name: &$p.name,
            port: $p.port,
        }
    };
}

macro_rules! backend_ref {
    ($b:expr) => {
        BackendRef {
            group: $b.group.as_deref(),
            kind: $b.kind.as_deref(),
            namespace: $b.namespace.as_deref(),
            name: &$b.name,
            port: $b.port,
            weight: $b.weight,
        }
    };
}

/// One rule of either kind: its name, matches (JSON) and backendRefs.
struct Rule<'a> {
    name: Option<String>,
    matches: Vec<String>,
    backends: Vec<BackendRef<'a>>,
}

fn view(
    state: &ClusterState,
    picks: &PickCounts,
    kind: RouteKind,
    key: &ObjectKey,
    parent_refs: &[ParentRef],
    rules: Vec<Rule>,
) -> RouteView {
    let parents = parents(&key.namespace, parent_refs);
    let rules = rules
        .into_iter()
        .enumerate()
        .map(|(index, rule)| RuleView {
            index,
            name: rule.name,
            matches: rule.matches,
            backends: backends(
                state,
                &key.namespace,
                &parents,
                &rule.backends,
                picks,
                // The L7 proxy's balancer key of a rule (http::routes::Rule::frontend).
                (kind == RouteKind::HttpRoute)
                    .then(|| ObjectKey::new(&key.namespace, &format!("{}#{index}", key.name)))
                    .as_ref(),
            ),
        })
        .collect();
    RouteView {
        kind,
        route: key.clone(),
        parents,
        chosen: match kind {
            RouteKind::TcpRoute => Chosen::PerConnection,
            RouteKind::HttpRoute | RouteKind::VirtualService => Chosen::PerRequest,
        },
        rules,
        not_applied: Vec::new(),
    }
}

fn tcp_routes(state: &ClusterState, picks: &PickCounts) -> Vec<RouteView> {
    state
        .tcp_routes
        .iter()
        .map(|(key, route)| {
            let parents: Vec<ParentRef> = route
                .spec
                .parent_refs
                .iter()
                .flatten()
                .map(|p| parent_ref!(p))
                .collect();
            let rules = route
                .spec
                .rules
                .iter()
                .map(|rule| Rule {
                    name: rule.name.clone(),
                    matches: Vec::new(),
                    backends: rule.backend_refs.iter().map(|b| backend_ref!(b)).collect(),
                })
                .collect();
            view(state, picks, RouteKind::TcpRoute, key, &parents, rules)
        })
        .collect()
}

fn http_routes(state: &ClusterState, picks: &PickCounts) -> Vec<RouteView> {
    state
        .http_routes
        .iter()
        .map(|(key, route)| {
            let parents: Vec<ParentRef> = route
                .spec
                .parent_refs
                .iter()
                .flatten()
                .map(|p| parent_ref!(p))
                .collect();
            let rules = route
                .spec
                .rules
                .iter()
                .flatten()
                .map(|rule| {
                    // Read through JSON so this does not depend on which Gateway API
                    // channel's types the state carries.
                    let json = serde_json::to_value(rule).unwrap_or_default();
                    Rule {
                        name: json["name"].as_str().map(String::from),
                        matches: json["matches"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(describe_match)
                            .collect(),
                        backends: rule
                            .backend_refs
                            .iter()
                            .flatten()
                            .map(|b| backend_ref!(b))
                            .collect(),
                    }
                })
                .collect();
            view(state, picks, RouteKind::HttpRoute, key, &parents, rules)
        })
        .collect()
}

/// Every TCPRoute, HTTPRoute and VirtualService of the state.
pub fn route_views(state: &ClusterState, picks: &PickCounts) -> Vec<RouteView> {
    let mut out = tcp_routes(state, picks);
    out.extend(http_routes(state, picks));
    out.extend(crate::admin::virtual_services::virtual_service_views(
        state, picks,
    ));
    out
}

/// The HTTPRoutes attached to `service` (on `port`, or on every port).
pub fn http_routes_for(
    state: &ClusterState,
    service: &ObjectKey,
    port: u16,
    picks: &PickCounts,
) -> Vec<RouteView> {
    http_routes(state, picks)
        .into_iter()
        .filter(|r| {
            r.parents
                .iter()
                .any(|p| p.service == *service && p.port.is_none_or(|pp| pp == port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::discovery::files::parse_manifest;

    const ROUTES: &str = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: split, namespace: apps}\n\
        spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - backendRefs:\n    \
        - {name: web-v1, port: 80, weight: 90}\n    - {name: web-v2, port: 80, weight: 10}\n---\n\
        apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api, namespace: apps}\n\
        spec:\n  parentRefs: [{group: \"\", kind: Service, name: api, port: 80}]\n  rules:\n  \
        - matches: [{path: {type: PathPrefix, value: /v2}, method: GET, headers: [{name: x-canary, value: \"1\"}]}]\n    \
        backendRefs: [{name: api-v2, port: 80}]\n  - backendRefs: [{name: api-v1, port: 80, weight: 3}]\n";

    #[test]
    fn routes_list_rules_matches_weights_and_observed_shares() {
        let state = ClusterState::from_objects(parse_manifest(ROUTES).unwrap());
        let mut picks = PickCounts::new();
        picks.insert(
            (ObjectKey::new("apps", "web"), 80),
            BTreeMap::from([
                (ObjectKey::new("apps", "web-v1"), 27),
                (ObjectKey::new("apps", "web-v2"), 3),
            ]),
        );
        let views = route_views(&state, &picks);
        assert_eq!(views.len(), 2);
        let tcp = &views[0];
        assert_eq!(
            (tcp.kind, tcp.chosen),
            (RouteKind::TcpRoute, Chosen::PerConnection)
        );
        let b = &tcp.rules[0].backends;
        assert_eq!((b[0].weight, b[0].picks), (90, 27));
        assert_eq!(b[1].observed_share, Some(0.1));
        let http = &views[1];
        assert_eq!(http.chosen, Chosen::PerRequest);
        assert_eq!(
            http.rules[0].matches,
            vec!["PathPrefix /v2, GET, header x-canary=1"]
        );
        assert!(http.rules[1].matches.is_empty());
        assert_eq!(http.rules[1].backends[0].weight, 3);
        assert_eq!(http.rules[1].backends[0].observed_share, None);
        let api = http_routes_for(&state, &ObjectKey::new("apps", "api"), 80, &picks);
        assert_eq!(api.len(), 1);
        assert!(http_routes_for(&state, &ObjectKey::new("apps", "web"), 80, &picks).is_empty());
    }
}
