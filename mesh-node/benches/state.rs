//! `cargo xtask bench state`: the discovery state at scale — 10,000 Services with
//! 100,000 endpoints (10 per EndpointSlice) and 1,000 TCPRoutes. Reports agent-side
//! memory, the time to apply a full snapshot, the latency of one EndpointSlice change
//! (apply plus publishing a new snapshot), and the cost of one outbound lookup: the
//! routing plan with the balancer's pick, as the outbound proxy makes it — the first
//! time a snapshot sees each Service port (its routing table entry is built), and once
//! the entry is there.

use std::{
    collections::BTreeMap,
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use gateway_api::apis::experimental::tcproutes::{
    TcpRoute, TcpRouteParentRefs, TcpRouteRules, TcpRouteRulesBackendRefs, TcpRouteSpec,
};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use mesh_node::{
    discovery::cluster::ClusterState, discovery::cluster::KubeObject, routing::balancer::Balancer,
    routing::plan, routing::plan::Plan, routing::table::Router,
};

const SERVICES: u32 = 10_000;
const ENDPOINTS_PER_SERVICE: u32 = 10;
const ROUTES: u32 = 1_000;
const CHANGES: usize = 2_000;
const LOOKUPS: u32 = 200_000;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches(" kB").to_string())
            })
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn meta(name: String, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some("bench".into()),
        labels,
        ..Default::default()
    }
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + i) // 10.96.0.0 + i
}

fn service(i: u32) -> KubeObject {
    KubeObject::Service(Box::new(Service {
        metadata: meta(format!("svc-{i}"), None),
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip(i).to_string()),
            ports: Some(vec![ServicePort {
                name: Some("tcp".into()),
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }))
}

fn slice(i: u32, generation: u32) -> KubeObject {
    let labels = BTreeMap::from([("kubernetes.io/service-name".to_string(), format!("svc-{i}"))]);
    let endpoints =
        (0..ENDPOINTS_PER_SERVICE)
            .map(|e| Endpoint {
                addresses: vec![
                    Ipv4Addr::from(0x0a00_0000 + i * ENDPOINTS_PER_SERVICE + e).to_string()
                ],
                conditions: Some(EndpointConditions {
                    ready: Some(!(e + generation).is_multiple_of(7)),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
    KubeObject::EndpointSlice(Box::new(EndpointSlice {
        metadata: meta(format!("svc-{i}-abc"), Some(labels)),
        address_type: "IPv4".into(),
        endpoints: Some(endpoints),
        ports: Some(vec![EndpointPort {
            name: Some("tcp".into()),
            port: Some(8080),
            ..Default::default()
        }]),
    }))
}

fn route(i: u32) -> KubeObject {
    let backend = |name: String, weight| TcpRouteRulesBackendRefs {
        name,
        port: Some(80),
        weight: Some(weight),
        ..Default::default()
    };
    KubeObject::TcpRoute(Box::new(TcpRoute {
        metadata: meta(format!("route-{i}"), None),
        spec: TcpRouteSpec {
            parent_refs: Some(vec![TcpRouteParentRefs {
                group: Some(String::new()),
                kind: Some("Service".into()),
                name: format!("svc-{i}"),
                ..Default::default()
            }]),
            rules: vec![TcpRouteRules {
                backend_refs: vec![
                    backend(format!("svc-{}", i + 1), 90),
                    backend(format!("svc-{}", i + 2), 10),
                ],
                ..Default::default()
            }],
            ..Default::default()
        },
        status: None,
    }))
}

/// CPU time this thread has used (unlike the wall clock, not stretched by other work
/// sharing the machine).
fn cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let rss_start = rss_mib();
    let mut objects = Vec::new();
    for i in 0..SERVICES {
        objects.push(service(i));
        objects.push(slice(i, 0));
    }
    for i in 0..ROUTES {
        objects.push(route(i * 5));
    }
    let started = Instant::now();
    let mut state = ClusterState::from_objects(objects);
    let full_apply = started.elapsed();
    let rss_loaded = rss_mib();

    // Each change: apply one EndpointSlice, then publish a snapshot while the previous
    // one is still held by readers (so copy-on-write really copies).
    let mut published = Arc::new(state.clone());
    let mut times = Vec::with_capacity(CHANGES);
    for n in 0..CHANGES {
        let i = (n as u32 * 7919) % SERVICES;
        let changed = slice(i, n as u32 + 1);
        let t = Instant::now();
        state.apply(changed);
        let next = Arc::new(state.clone());
        times.push(t.elapsed());
        published = black_box(next);
    }
    drop(published);
    times.sort();

    let router = Router::new(Arc::new(Vec::new()), None);
    let balancer = Balancer::new();
    let splits = mesh_node::routing::splits::ClientSplits::new();
    let mut routed = 0u32;
    let mut lookup = |state: &Arc<ClusterState>, n: u32| {
        let i = (n * 104_729) % SERVICES;
        let dst = SocketAddr::new(IpAddr::V4(vip(i)), 80);
        let table = router.table(state);
        if let Plan::Forward(to) = plan::connection(&table, state, &balancer, &splits, dst) {
            black_box(to.endpoint.addr);
            routed += 1;
        }
    };
    // The agent's first snapshot: the balancer learns every Service port.
    let first = Arc::new(state.clone());
    for n in 0..SERVICES {
        lookup(&first, n);
    }
    // A new snapshot: the first lookup of each Service port builds its table entry.
    let state = Arc::new(state);
    let (t, c) = (Instant::now(), cpu_time());
    for n in 0..SERVICES {
        lookup(&state, n);
    }
    let (cold, cold_cpu) = (t.elapsed() / SERVICES, (cpu_time() - c) / SERVICES);
    let (t, c) = (Instant::now(), cpu_time());
    for n in 0..LOOKUPS {
        lookup(&state, n);
    }
    let (warm, warm_cpu) = (t.elapsed() / LOOKUPS, (cpu_time() - c) / LOOKUPS);

    println!(
        "state: {SERVICES} Services, {} endpoints in {SERVICES} EndpointSlices, {ROUTES} TCPRoutes",
        SERVICES * ENDPOINTS_PER_SERVICE
    );
    println!(
        "  RSS: {rss_start:.1} MiB before, {rss_loaded:.1} MiB loaded (+{:.1} MiB)",
        rss_loaded - rss_start
    );
    println!(
        "  full snapshot apply: {:.1} ms",
        full_apply.as_secs_f64() * 1e3
    );
    println!(
        "  one EndpointSlice change (apply + publish): p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs over {CHANGES}",
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        times[times.len() - 1].as_secs_f64() * 1e6
    );
    println!(
        "  outbound lookup (plan + pick): {} ns ({} ns CPU); the first of each Service port in a snapshot {} ns ({} ns CPU); {routed} of {} routed",
        warm.as_nanos(),
        warm_cpu.as_nanos(),
        cold.as_nanos(),
        cold_cpu.as_nanos(),
        2 * SERVICES + LOOKUPS
    );
}
