//! `cargo xtask bench policy`: what a DestinationRule adds to the node proxy's work for
//! each HTTP request — rule selection, the plan (weighted backend, then an endpoint by
//! the backend's policy, skipping ejected ones), the connection-pool permit and the
//! outcome report that feeds outlier detection — with no DestinationRule and with one
//! (outlier detection and a connection pool with limits), on one thread, for the same
//! Service with an HTTPRoute and three endpoints. Reported per request: the median of
//! batches of 1,000 and the 99th percentile batch.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_node::{
    discovery::cluster::ClusterState,
    discovery::files::parse_manifest,
    keys::ObjectKey,
    routing::balancer::{Balancer, Outcome},
    routing::http::routes::RouteCache,
    routing::plan,
    routing::pool::ConnectionPools,
    routing::splits::ClientSplits,
    routing::table::Router,
};

const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: apps, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.2]}, {addresses: [10.1.0.3]}, {addresses: [10.1.0.4]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: apps}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"#;

/// The issue's circuit breaker, with limits no request here reaches.
const RULE: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: apps}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10000}
      http: {http1MaxPendingRequests: 10000, http2MaxRequests: 10000, maxRequestsPerConnection: 1000}
    outlierDetection: {consecutive5xxErrors: 7, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 10}
    loadBalancer: {simple: LEAST_REQUEST}
"#;

const BATCH: u32 = 1_000;
const BATCHES: usize = 400;

/// Nanoseconds per request: (median batch, 99th percentile batch).
fn measure(manifest: &str) -> (f64, f64) {
    let state = Arc::new(ClusterState::from_objects(
        parse_manifest(manifest).expect("the bench's manifest parses"),
    ));
    let service = ObjectKey::new("apps", "web");
    let routes = RouteCache::default();
    let router = Router::new(Arc::new(Vec::new()), None);
    let balancer = Balancer::new();
    let splits = ClientSplits::new();
    let pools = ConnectionPools::new(None);
    let (parts, ()) = http::Request::builder()
        .uri("/")
        .body(())
        .expect("a request")
        .into_parts();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let one = || async {
        let table = routes.table(&state, &service, 80, false);
        let (_, rule) = table.select(&parts).expect("the route matches");
        let routing = router.table(&state);
        let planned = plan::request(&routing, &state, &balancer, &splits, &service, 80, rule)
            .expect("an endpoint");
        let permit = match pools.pool(&planned.target.backend) {
            Some(pool) => Some(pool.request(true).await.expect("under the limits")),
            None => None,
        };
        planned.pick.report(Outcome::Http {
            status: 200,
            latency: Duration::from_micros(200),
        });
        black_box(planned.endpoint.addr);
        drop(permit);
    };
    runtime.block_on(async {
        for _ in 0..BATCH * 10 {
            one().await;
        }
        let mut batches = Vec::with_capacity(BATCHES);
        for _ in 0..BATCHES {
            let t = Instant::now();
            for _ in 0..BATCH {
                one().await;
            }
            batches.push(t.elapsed().as_nanos() as f64 / f64::from(BATCH));
        }
        batches.sort_by(f64::total_cmp);
        (batches[BATCHES / 2], batches[BATCHES * 99 / 100])
    })
}

fn main() {
    // Alternate, so drift on a busy machine hits both alike.
    let mut without = Vec::new();
    let mut with = Vec::new();
    for _ in 0..3 {
        without.push(measure(BASE));
        with.push(measure(&format!("{BASE}{RULE}")));
    }
    let best = |v: &[(f64, f64)]| {
        v.iter()
            .copied()
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap_or_default()
    };
    let (w50, w99) = best(&without);
    let (d50, d99) = best(&with);
    println!("per-request routing on the node proxy (rule, plan, pool permit, outcome), ns:");
    println!("  without a DestinationRule: p50 {w50:.0}, p99 {w99:.0}");
    println!(
        "  with outlier detection + connection pool + LEAST_REQUEST: p50 {d50:.0}, p99 {d99:.0}"
    );
    println!("  added by the DestinationRule: p50 {:.0} ns", d50 - w50);
}
