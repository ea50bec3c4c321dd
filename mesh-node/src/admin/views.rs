//! The JSON views of the admin API that combine several parts of the agent: status,
//! policies, routes and trace.

use serde_json::{json, Value};

use std::net::SocketAddr;

use crate::{
    admin::routes::route_views, admin::state::unix_now, admin::state::AdminState,
    admin::trace::trace, admin::trace::HttpAttributes, admin::trace::Trace,
    admin::trace::TraceError, admin::trace::TraceInputs, discovery::cluster::service_ips,
    discovery::cluster::ClusterState, discovery::cluster::MESH_LABEL,
    discovery::policy::PolicyAction, identity::authz::selects, keys::ObjectKey, keys::PodKey,
    routing::resolve::resolve, routing::resolve::IpCidr,
};

/// One view of the agent's health: readiness, state freshness, what it serves.
pub fn status(state: &AdminState) -> Value {
    let cluster = state.state.borrow().clone();
    let workloads = state.workloads.borrow().clone();
    let certs = state
        .certificates
        .as_ref()
        .map(|c| c.status())
        .unwrap_or_default();
    let (live_out, live_in) = state.connections.live_counts();
    let last_update = state.metrics.state_last_update.get();
    let unready = crate::admin::state::unready_reason(
        &state.ready,
        &state.discovery,
        &state.dataplane,
        state.certificates.as_deref(),
    );
    json!({
        "node": state.config.node_name,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": unready.is_none(),
        "not_ready_reason": unready,
        "uptime_seconds": state.started.elapsed().as_secs(),
        "mtls": state.certificates.is_some(),
        "trust_domain": state.config.trust_domain,
        "source": state.config.source,
        "state": {
            "objects": cluster.counts(),
            "updates": state.metrics.state_updates.get(),
            "age_seconds": (last_update > 0.0).then(|| (unix_now() - last_update).max(0.0)),
        },
        "workloads": {
            "total": workloads.len(),
            "enrolled": workloads.iter().filter(|w| w.enrolled).count(),
        },
        "connections": { "live_outbound": live_out, "live_inbound": live_in },
        "certificates": {
            "total": certs.len(),
            "valid": certs.iter().filter(|c| c.state == "valid").count(),
        },
    })
}

/// Namespaces with their mesh mode, and every AuthorizationPolicy with the pods of
/// this node it selects.
pub fn policies(state: &AdminState) -> Value {
    let cluster = state.state.borrow().clone();
    let workloads = state.workloads.borrow().clone();
    let namespaces: Vec<Value> = cluster
        .namespaces
        .iter()
        .map(|(key, ns)| {
            let labels = ns.metadata.labels.clone().unwrap_or_default();
            json!({
                "namespace": key.name,
                "enrolled": labels.get(MESH_LABEL).map(String::as_str) == Some("enabled"),
                "mode": if cluster.strict_mtls(&key.name) { "STRICT" } else { "PERMISSIVE" },
            })
        })
        .collect();
    let policies: Vec<Value> = cluster
        .authorization_policies
        .iter()
        .map(|(key, policy)| {
            let selected: Vec<&PodKey> = workloads
                .iter()
                .map(|w| &w.pod)
                .filter(|p| p.namespace == key.namespace)
                .filter(|p| cluster.pods.get(*p).is_some_and(|pod| selects(policy, pod)))
                .collect();
            json!({
                "policy": key,
                "action": match policy.spec.action {
                    PolicyAction::Allow => "ALLOW",
                    PolicyAction::Deny => "DENY",
                },
                "selector": policy.spec.selector.match_labels,
                "rules": policy.spec.rules,
                "selects_on_this_node": selected,
            })
        })
        .collect();
    json!({ "namespaces": namespaces, "policies": policies })
}

pub fn routes(state: &AdminState) -> Value {
    let cluster: std::sync::Arc<ClusterState> = state.state.borrow().clone();
    json!(route_views(&cluster, &state.balancer.picks()))
}

/// `pod` is `namespace/name`; `to` is `host:port`.
pub fn run_trace(
    state: &AdminState,
    pod: &str,
    to: &str,
    http: HttpAttributes,
) -> Result<Trace, TraceError> {
    let key = match pod.split_once('/') {
        Some((ns, name)) => ObjectKey::new(ns, name),
        None => ObjectKey::new("default", pod),
    };
    let cluster = state.state.borrow().clone();
    let workloads = state.workloads.borrow().clone();
    let picks = state.balancer.picks();
    let inputs = TraceInputs {
        state: &cluster,
        node: &state.config.node_name,
        workloads: &workloads,
        dataplane: &*state.dataplane,
        service_cidrs: &state.config.service_cidrs,
        trust_domain: state
            .certificates
            .is_some()
            .then_some(state.config.trust_domain.as_str()),
        picks: &picks,
    };
    trace(&inputs, &key, to, Some(http))
}

/// Every Service port with what a connection to it would resolve to right now; an
/// HTTP-routed port also with its HTTPRoutes (their rules choose per request).
pub(crate) fn services_view(
    state: &ClusterState,
    cidrs: &[IpCidr],
    picks: &crate::routing::balancer::PickCounts,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (key, svc) in state.services.iter() {
        let vips = service_ips(svc);
        let ports = svc.spec.iter().flat_map(|s| s.ports.iter().flatten());
        for port in ports.filter_map(|p| u16::try_from(p.port).ok()) {
            let resolution = vips
                .first()
                .map(|vip| resolve(state, SocketAddr::new(*vip, port), cidrs));
            out.push(json!({
                "service": key,
                "vips": vips,
                "port": port,
                "resolution": resolution,
                "http_routes": crate::admin::routes::http_routes_for(state, key, port, picks),
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admin::views::services_view, discovery::files::parse_manifest,
        routing::balancer::PickCounts,
    };

    const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
        spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: web-v1, namespace: demo}\n\
        spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}\n---\n\
        apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: split, namespace: demo}\n\
        spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  \
        rules: [{backendRefs: [{name: web-v1, port: 80, weight: 90}]}]\n";

    #[test]
    fn an_http_routed_service_port_shows_its_httproute_and_backends() {
        let state = ClusterState::from_objects(parse_manifest(SERVICES).unwrap());
        let view = services_view(&state, &[], &PickCounts::new());
        let web = view.iter().find(|v| v["service"]["name"] == "web").unwrap();
        let routes = web["http_routes"].as_array().unwrap();
        assert_eq!(routes.len(), 1, "{web:#}");
        assert_eq!(routes[0]["route"]["name"], "split");
        assert_eq!(routes[0]["kind"], "HTTPRoute");
        let backend = &routes[0]["rules"][0]["backends"][0];
        assert_eq!(backend["service"]["name"], "web-v1");
        assert_eq!(backend["weight"], 90);
        let plain = view
            .iter()
            .find(|v| v["service"]["name"] == "web-v1")
            .unwrap();
        assert!(plain["http_routes"].as_array().unwrap().is_empty());
    }
}
