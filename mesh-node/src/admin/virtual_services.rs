//! VirtualServices as `meshctl node routes` shows them: the Services their hosts name,
//! their `http` routes with matches and weighted destinations, and where they do not
//! apply — bound only to gateways, or losing a Service port to an HTTPRoute (the
//! Gateway API, the project's native API, wins).

use crate::{
    admin::api::BackendView, admin::api::Chosen, admin::api::ParentView, admin::api::RouteKind,
    admin::api::RouteView, admin::api::RuleView, discovery::cluster::ClusterState,
    discovery::virtual_service::HttpMatchRequest, discovery::virtual_service::StringMatch,
    keys::ObjectKey, routing::balancer::PickCounts, routing::resolve::only_port,
    routing::resolve::subset_backend,
};

fn string_match(m: &StringMatch) -> String {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), _, _) => format!("= {v}"),
        (_, Some(p), _) => format!("prefix {p}"),
        (_, _, Some(r)) => format!("~ {r}"),
        _ => "(empty)".into(),
    }
}

fn describe(m: &HttpMatchRequest) -> String {
    let mut parts = Vec::new();
    if let Some(u) = &m.uri {
        parts.push(format!("uri {}", string_match(u)));
    }
    if let Some(v) = &m.method {
        parts.push(format!("method {}", string_match(v)));
    }
    for (name, v) in &m.headers {
        parts.push(format!("header {name} {}", string_match(v)));
    }
    for (name, v) in &m.query_params {
        parts.push(format!("query {name} {}", string_match(v)));
    }
    if let Some(p) = m.port {
        parts.push(format!("port {p}"));
    }
    if parts.is_empty() {
        "any request".into()
    } else {
        parts.join(", ")
    }
}

/// Every VirtualService of the state.
pub fn virtual_service_views(state: &ClusterState, picks: &PickCounts) -> Vec<RouteView> {
    state
        .virtual_services
        .iter()
        .map(|(key, vs)| {
            let services: Vec<ObjectKey> = vs
                .spec
                .hosts
                .iter()
                .filter_map(|h| ObjectKey::from_service_host(h, &key.namespace).ok())
                .collect();
            let mut not_applied = Vec::new();
            if !vs.spec.binds_mesh() {
                not_applied.push("bound only to gateways: the node proxy ignores it".into());
            }
            for service in &services {
                let ports = state
                    .services
                    .get(service)
                    .and_then(|s| s.spec.as_ref()?.ports.clone())
                    .unwrap_or_default();
                for p in ports {
                    let Ok(port) = u16::try_from(p.port) else {
                        continue;
                    };
                    if let Some((route, _)) = state.http_routes_for(service, port).first() {
                        not_applied.push(format!("{service}:{port}: HTTPRoute {route} wins"));
                    }
                }
            }
            for field in vs.spec.unimplemented() {
                not_applied.push(format!("{field}: not implemented"));
            }
            let rules = vs
                .spec
                .http
                .iter()
                .enumerate()
                .map(|(index, r)| {
                    let frontend =
                        ObjectKey::new(&key.namespace, &format!("{}#vs{index}", key.name));
                    let by_backend = picks
                        .iter()
                        .filter(|((f, _), _)| *f == frontend)
                        .flat_map(|(_, b)| b.iter())
                        .collect::<Vec<_>>();
                    let mut backends: Vec<BackendView> = r
                        .route
                        .iter()
                        .map(|d| {
                            let service =
                                ObjectKey::from_service_host(&d.destination.host, &key.namespace)
                                    .unwrap_or_else(|_| ObjectKey::new("", &d.destination.host));
                            let port = d
                                .destination
                                .port
                                .and_then(|p| u16::try_from(p.number).ok());
                            // As traffic resolves it: a destination without a port
                            // takes the Service's only port; a subset is the
                            // DestinationRule's (none defined: no endpoints).
                            let port = port.or_else(|| only_port(state, &service));
                            let ready = port.map_or(0, |port| {
                                let subset = d.destination.subset.as_deref();
                                subset_backend(state, service.clone(), port, 0, false, subset)
                                    .endpoints
                                    .len()
                            });
                            let picked = by_backend
                                .iter()
                                .filter(|(b, _)| **b == service)
                                .map(|(_, n)| **n)
                                .sum();
                            BackendView {
                                service,
                                port,
                                weight: d.weight.unwrap_or(1).max(0) as u32,
                                ready_endpoints: ready,
                                picks: picked,
                                observed_share: None,
                            }
                        })
                        .collect();
                    let total: u64 = backends.iter().map(|b| b.picks).sum();
                    if total > 0 {
                        for b in &mut backends {
                            b.observed_share = Some(b.picks as f64 / total as f64);
                        }
                    }
                    RuleView {
                        index,
                        name: r.name.clone(),
                        matches: r.matches.iter().map(describe).collect(),
                        backends,
                    }
                })
                .collect();
            RouteView {
                kind: RouteKind::VirtualService,
                route: key.clone(),
                parents: services
                    .into_iter()
                    .map(|service| ParentView {
                        service,
                        port: None,
                    })
                    .collect(),
                chosen: Chosen::PerRequest,
                rules,
                not_applied,
            }
        })
        .collect()
}
