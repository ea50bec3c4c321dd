//! The `files` discovery source: one manifest file's text into typed objects, then
//! into the state and through what the agent reads from it on every connection
//! (Service resolution, enrollment, admission and per-request authorization, HTTP
//! route tables, the admin's routes).
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use mesh_node::{
    admin::routes::route_views, discovery::cluster::pod_ips, discovery::cluster::service_ips,
    discovery::cluster::ClusterState, discovery::files::parse_manifest, identity::authz::admit,
    identity::authz::authorize_request, identity::authz::ConnectionFacts,
    identity::authz::RequestFacts, identity::Identity, routing::balancer::PickCounts,
    routing::http::routes::RouteTable, routing::resolve::resolve,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(objects) = parse_manifest(text) else {
        return;
    };
    let count = objects.len();
    let state = ClusterState::from_objects(objects);
    assert!(state.counts().values().sum::<usize>() <= count);
    let peer = Identity::new("cluster.local", "apps", "client");
    for (key, pod) in state.pods.iter() {
        let _ = state.enrollment(key, pod);
        for ip in pod_ips(pod) {
            assert!(state.pod_by_ip(ip).is_some());
        }
        for peer in [Some(peer.clone()), None] {
            let facts = ConnectionFacts {
                source_ip: "10.1.0.2"
                    .parse()
                    .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
                peer,
                destination: SocketAddr::from(([10, 2, 0, 2], 8080)),
            };
            let _ = admit(&state, key, &facts);
            let mut headers = http::HeaderMap::new();
            headers.insert("x-user", http::HeaderValue::from_static("alice"));
            let request = RequestFacts {
                method: "GET",
                path: "/api/x",
                host: "web.apps.svc.cluster.local",
                headers: &headers,
                auth: None,
            };
            let _ = authorize_request(&state, key, &facts, &request);
        }
    }
    let _ = state.enrolled_on_node("node-a");
    for (key, service) in state.services.iter() {
        let ports: Vec<u16> = service
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter_map(|p| u16::try_from(p.port).ok())
            .collect();
        for ip in service_ips(service) {
            for port in &ports {
                let _ = resolve(&state, SocketAddr::new(ip, *port), &[]);
            }
        }
        for port in ports {
            for want_v6 in [false, true] {
                let table = RouteTable::build(&state, key, port, want_v6);
                let request = http::Request::builder()
                    .uri("/")
                    .body(())
                    .map(|r| r.into_parts().0);
                if let Ok(parts) = request {
                    let _ = table.select(&parts);
                }
            }
        }
    }
    let _ = route_views(&state, &PickCounts::default());
});
