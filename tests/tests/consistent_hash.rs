//! End-to-end: DestinationRule `loadBalancer.consistentHash` on the node proxy — a
//! header key stays on one endpoint, removing one of N endpoints moves few keys, a
//! cookie with a ttl is made up, set and then sticks, and `useSourceIp` keeps one TCP
//! client's connections on one endpoint. The client is on node a; the four `web`
//! endpoints are on node b (requests cross the nodes over HBONE).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use mesh_node::{
    discovery::consistent_hash::HashTable,
    routing::hash_ring::{xxh64, HashRing},
};
use mesh_tests::{
    report::HttpReport,
    sim::{ClusterSpec, PodSpec, Process, ServiceSpec, SimCluster},
};

const PODS: [&str; 4] = ["web-1", "web-2", "web-3", "web-4"];

/// `web` (port 80 → 8080) over web-1..4 on node b, each serving HTTP.
fn cluster() -> (SimCluster, Vec<Process>) {
    let mut spec = ClusterSpec::two_nodes();
    for p in PODS {
        spec.pods.push(PodSpec::new(p, "apps", "b"));
    }
    spec.services = vec![ServiceSpec::new("web", "apps", 80, 8080, &PODS)];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let servers = PODS
        .iter()
        .map(|p| cluster.http_serve(p, &[8080]).unwrap())
        .collect();
    (cluster, servers)
}

/// Makes `web` HTTP-routed: each request is balanced on its own.
const HTTP_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
    metadata: {name: web, namespace: apps}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  \
    rules: [{backendRefs: [{name: web, port: 80}]}]\n";

fn rule(consistent_hash: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: apps}}\n\
         spec:\n  host: web\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {consistent_hash}\n"
    )
}

fn vip(cluster: &SimCluster) -> SocketAddr {
    cluster.service("web").addr4()
}

/// web:80's backend as node a's admin API shows it.
fn backend(cluster: &SimCluster) -> serde_json::Value {
    let services = cluster.admin("a", "/services").unwrap();
    services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"]["name"] == "web" && s["port"] == 80)
        .map(|s| s["resolution"]["backends"][0].clone())
        .unwrap_or_default()
}

/// Waits until node a applies the hash policy keyed on `source`, with `ready` endpoints.
fn wait_for_policy(cluster: &SimCluster, source: &str, ready: usize) {
    let applied = cluster.eventually(Duration::from_secs(5), || {
        let b = backend(cluster);
        b["load_balancer"] == "CONSISTENT_HASH"
            && b["consistent_hash"]["key"]["source"] == source
            && b["endpoints"].as_array().map(Vec::len) == Some(ready)
    });
    assert!(
        applied.is_some(),
        "the consistent hash never applied: {}",
        backend(cluster)
    );
}

/// `count` requests on one connection with `headers`.
fn requests(cluster: &SimCluster, count: u64, headers: &[String]) -> HttpReport {
    let count = count.to_string();
    let mut args = vec!["--count", count.as_str()];
    for h in headers {
        args.extend(["-H", h.as_str()]);
    }
    cluster
        .http("client", vip(cluster), "web", "/", &args)
        .unwrap()
}

/// The one pod that served every request of `report` (panics otherwise).
fn only_pod(report: &HttpReport, what: &str) -> String {
    assert_eq!(report.errors, 0, "{what}: {report:?}");
    assert_eq!(report.pods.len(), 1, "{what} spread: {:?}", report.pods);
    report.pods.keys().next().unwrap().clone()
}

/// Where each of `keys` lands (one request each, ten clients at a time).
fn placement(cluster: &SimCluster, keys: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for chunk in keys.chunks(10) {
        let served: Vec<(String, String)> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|k| {
                    scope.spawn(move || {
                        let r = requests(cluster, 1, &[format!("x-user: {k}")]);
                        (k.clone(), only_pod(&r, k))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        out.extend(served);
    }
    out
}

#[test]
fn consistent_hash_a_header_key_stays_on_one_endpoint_over_1000_requests() {
    let (cluster, _servers) = cluster();
    cluster
        .write_manifest(
            "web.yaml",
            &format!(
                "{HTTP_ROUTE}---\n{}",
                rule("{httpHeaderName: x-user, maglev: {tableSize: 65537}}")
            ),
        )
        .unwrap();
    wait_for_policy(&cluster, "header", 4);

    let mut homes = BTreeSet::new();
    for key in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let report = requests(&cluster, 1000, &[format!("X-User: {key}")]);
        assert_eq!(report.statuses.get(&200), Some(&1000), "{report:?}");
        let home = only_pod(&report, key);
        // `meshctl node trace` with the key names the endpoint that served it.
        let header = format!("x-user:{key}");
        let trace = cluster
            .meshctl_json(
                "a",
                &["trace", "apps/client", "web:80", "--header", &header],
            )
            .unwrap();
        let hash = &trace["hashes"][0];
        let predicted: SocketAddr = hash["endpoint"]
            .as_str()
            .and_then(|e| e.parse().ok())
            .unwrap_or_else(|| panic!("no hashed endpoint in {trace:#}"));
        assert_eq!(
            predicted.ip(),
            cluster.pod(&home).ipv4,
            "{key} was served by {home}: {hash:#}"
        );
        homes.insert(home);
    }
    assert!(homes.len() > 1, "every key on one endpoint: {homes:?}");

    // A request without the key is balanced at random (as Envoy): it spreads.
    let keyless = requests(&cluster, 200, &[]);
    assert_eq!(keyless.statuses.get(&200), Some(&200), "{keyless:?}");
    assert!(keyless.pods.len() >= 3, "{:?}", keyless.pods);

    // Operators see the hash key in force.
    let b = backend(&cluster);
    assert_eq!(b["consistent_hash"]["key"]["name"], "x-user", "{b}");
    assert_eq!(b["consistent_hash"]["table"]["kind"], "maglev", "{b}");
}

#[test]
fn consistent_hash_removing_one_of_four_endpoints_moves_few_of_100_keys() {
    let (cluster, _servers) = cluster();
    cluster
        .write_manifest(
            "web.yaml",
            &format!("{HTTP_ROUTE}---\n{}", rule("{httpHeaderName: x-user}")),
        )
        .unwrap();
    wait_for_policy(&cluster, "header", 4);
    let keys: Vec<String> = (0..100).map(|k| format!("user-{k}")).collect();
    let before = placement(&cluster, &keys);
    let used: BTreeSet<&String> = before.values().collect();
    assert_eq!(used.len(), 4, "100 keys use every endpoint: {before:?}");

    // web-3 leaves (no longer ready): only its keys should move.
    cluster.set_endpoint_ready("web", "web-3", false).unwrap();
    wait_for_policy(&cluster, "header", 3);
    let after = placement(&cluster, &keys);
    let moved: Vec<&String> = keys.iter().filter(|k| before[*k] != after[*k]).collect();
    let on_removed = before.values().filter(|p| *p == "web-3").count();
    assert!(after.values().all(|p| p != "web-3"), "{after:?}");
    // The bound: keys whose endpoint changed / 100 ≤ 1.5 / N.
    let n = PODS.len();
    assert!(
        moved.len() * n * 2 <= 100 * 3,
        "{} of 100 keys moved ({on_removed} were on web-3): {moved:?}",
        moved.len()
    );
    assert!(moved.len() >= on_removed);
}

#[test]
fn consistent_hash_a_cookie_with_a_ttl_is_set_on_the_first_response_and_sticks() {
    let (cluster, _servers) = cluster();
    cluster
        .write_manifest(
            "web.yaml",
            &format!(
                "{HTTP_ROUTE}---\n{}",
                rule("{httpCookie: {name: session, path: /, ttl: 3600s}}")
            ),
        )
        .unwrap();
    wait_for_policy(&cluster, "cookie", 4);

    for attempt in 0..4 {
        // A first request without the cookie: the proxy makes one up and sets it.
        let first = requests(&cluster, 1, &[]);
        let sample = &first.samples[0];
        let set = sample
            .headers
            .get("set-cookie")
            .unwrap_or_else(|| panic!("no Set-Cookie: {first:?}"));
        let value = set
            .strip_prefix("session=")
            .and_then(|v| v.split(';').next())
            .unwrap_or_else(|| panic!("{set}"));
        assert!(
            set.contains("Max-Age=3600") && set.contains("Path=/"),
            "{set}"
        );
        let first_pod = sample.headers["x-served-by"].clone();

        // Sending it back: every request on the endpoint the first one went to, and
        // no new cookie.
        let cookie = format!("cookie: other=1; session={value}");
        let sticky = requests(&cluster, 200, &[cookie]);
        assert_eq!(only_pod(&sticky, value), first_pod, "attempt {attempt}");
        assert!(
            sticky
                .samples
                .iter()
                .all(|s| !s.headers.contains_key("set-cookie")),
            "{sticky:?}"
        );
    }
}

#[test]
fn consistent_hash_use_source_ip_keeps_a_tcp_clients_connections_on_one_endpoint() {
    let (cluster, _servers) = cluster();
    // No HTTPRoute: web is routed per TCP connection.
    cluster
        .write_manifest("web.yaml", &rule("{useSourceIp: true}"))
        .unwrap();
    wait_for_policy(&cluster, "source_ip", 4);
    let mut served = BTreeMap::<String, u64>::new();
    for _ in 0..30 {
        // One request per run: a new connection (a new source port) each time.
        let r = requests(&cluster, 1, &[]);
        *served.entry(only_pod(&r, "connection")).or_default() += 1;
    }
    assert_eq!(
        served.len(),
        1,
        "one client's connections spread: {served:?}"
    );
    // The key is the client pod's IP (not the loopback address the in-pod listener
    // sees): the endpoint is the one any node's ring gives that IP.
    let mut endpoints: Vec<SocketAddr> = PODS.iter().map(|p| cluster.pod(p).addr4(8080)).collect();
    endpoints.sort();
    let ring = HashRing::build(
        &endpoints,
        HashTable::RingHash {
            minimum_ring_size: 1024,
        },
    );
    let client_ip = cluster.pod("client").ipv4.to_string();
    let expected = ring
        .lookup(xxh64(client_ip.as_bytes(), 0), |_| true)
        .unwrap();
    let expected_pod = PODS
        .iter()
        .find(|p| cluster.pod(p).addr4(8080) == endpoints[expected])
        .unwrap();
    assert_eq!(served.keys().next().unwrap(), expected_pod, "{served:?}");
    let services = cluster.admin("a", "/services").unwrap();
    let web = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"]["name"] == "web")
        .cloned()
        .unwrap();
    assert!(
        web["http_routes"].as_array().is_none_or(Vec::is_empty),
        "web is L4-routed: {web}"
    );
    // Operators see the hash key in force.
    let out = cluster.meshctl("a", &["services"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lb ConsistentHash on source IP"), "{text}");
}
