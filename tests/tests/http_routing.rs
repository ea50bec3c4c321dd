//! End-to-end: HTTPRoutes (GAMMA) on the node proxy, mirroring the Gateway API mesh
//! conformance suite (conformance/tests/mesh) with real HTTP clients and servers in
//! pods. The client pod is on node a, the echo servers on node b; requests cross the
//! nodes over HBONE mTLS. The echo server answers with `x-served-by: <pod>` and a JSON
//! report of the request it received (path, host, headers, protocol).

use std::{net::SocketAddr, time::Duration};

use mesh_tests::{
    report::{HttpReport, HttpSample},
    sim::{ClusterSpec, PodSpec, Process, ServiceSpec, SimCluster},
};
use serde_json::Value;

/// echo → both versions; echo-v1 / echo-v2 → one each; every Service also has port
/// 8080 (`alt`); echo-empty has no pods.
fn cluster() -> (SimCluster, Vec<Process>) {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("echo-v1", "apps", "b"));
    spec.pods.push(PodSpec::new("echo-v2", "apps", "b"));
    let service = |name: &str, pods: &[&str]| ServiceSpec {
        alt_port: Some((8080, 8080)),
        ..ServiceSpec::new(name, "apps", 80, 8080, pods)
    };
    spec.services = vec![
        service("echo", &["echo-v1", "echo-v2"]),
        service("echo-v1", &["echo-v1"]),
        service("echo-v2", &["echo-v2"]),
        service("echo-empty", &[]),
    ];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let servers = ["echo-v1", "echo-v2"]
        .iter()
        .map(|p| cluster.http_serve(p, &[8080]).unwrap())
        .collect();
    (cluster, servers)
}

fn route(name: &str, parent: &str, port: Option<u16>, rules: &str) -> String {
    let port = port.map(|p| format!("\n    port: {p}")).unwrap_or_default();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: apps\n\
         spec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: {parent}{port}\n  rules:\n{rules}"
    )
}

fn vip(cluster: &SimCluster, service: &str) -> SocketAddr {
    cluster.service(service).addr4()
}

fn request(
    cluster: &SimCluster,
    dst: SocketAddr,
    host: &str,
    path: &str,
    extra: &[&str],
) -> HttpReport {
    cluster.http("client", dst, host, path, extra).unwrap()
}

fn first(report: &HttpReport) -> HttpSample {
    report
        .samples
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("no response: {report:?}"))
}

/// Repeats a request until `check` holds (routes take a moment to reach the agent),
/// then returns that response; fails with the last one after 5 s.
fn expect(
    cluster: &SimCluster,
    dst: SocketAddr,
    host: &str,
    path: &str,
    extra: &[&str],
    check: impl Fn(&HttpSample) -> bool,
) -> HttpSample {
    let mut last = None;
    let ok = cluster.eventually(Duration::from_secs(5), || {
        let r = request(cluster, dst, host, path, extra);
        let hit = r.samples.first().is_some_and(&check);
        last = Some(r);
        hit
    });
    let last = last.unwrap();
    assert!(
        ok.is_some(),
        "{host}{path} {extra:?} never gave the expected answer; last: {last:?}"
    );
    first(&last)
}

fn served_by(s: &HttpSample) -> &str {
    s.headers
        .get("x-served-by")
        .map(String::as_str)
        .unwrap_or("")
}

fn header<'a>(s: &'a HttpSample, name: &str) -> Option<&'a str> {
    s.headers.get(name).map(String::as_str)
}

#[test]
fn mesh_routes_apply_by_service_address_and_port_not_by_host_or_pod_ip() {
    let (cluster, _servers) = cluster();
    // MeshBasic: no route at all — plain Service load balancing per connection, both
    // versions answer.
    let mut pods = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let s = first(&request(&cluster, vip(&cluster, "echo"), "echo", "/", &[]));
        assert_eq!(s.status, 200, "{s:?}");
        pods.insert(served_by(&s).to_string());
    }
    assert_eq!(pods.len(), 2, "{pods:?}");

    let routes = [
        route(
            "ports",
            "echo-v1",
            Some(80),
            "  - filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        set: [{name: X-Header-Set, value: v1}]\n\
             \x20   backendRefs: [{name: echo-v1, port: 80}]\n",
        ),
        route(
            "no-port",
            "echo-v2",
            None,
            "  - filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        set: [{name: X-Header-Set, value: v2}]\n\
             \x20   backendRefs: [{name: echo-v2, port: 80}]\n",
        ),
    ];
    cluster
        .write_manifest("httproutes.yaml", &routes.join("---\n"))
        .unwrap();

    // MeshPorts: the route names port 80 only; port 8080 of the same Service is untouched.
    let v1 = expect(
        &cluster,
        vip(&cluster, "echo-v1"),
        "echo-v1",
        "/",
        &[],
        |s| header(s, "x-header-set") == Some("v1"),
    );
    assert_eq!(served_by(&v1), "echo-v1");
    let v1_alt = SocketAddr::new(vip(&cluster, "echo-v1").ip(), 8080);
    let other_port = first(&request(&cluster, v1_alt, "echo-v1:8080", "/", &[]));
    assert_eq!(
        (other_port.status, served_by(&other_port)),
        (200, "echo-v1")
    );
    assert_eq!(header(&other_port, "x-header-set"), None, "{other_port:?}");
    // A route without a port applies to every port of its Service.
    for port in [80, 8080] {
        let dst = SocketAddr::new(vip(&cluster, "echo-v2").ip(), port);
        let s = expect(&cluster, dst, "echo-v2", "/", &[], |s| {
            header(s, "x-header-set") == Some("v2")
        });
        assert_eq!(served_by(&s), "echo-v2");
    }
    // IPv6 Service addresses take the same route.
    let v6 = first(&request(
        &cluster,
        cluster.service("echo-v2").addr6(),
        "echo-v2",
        "/",
        &[],
    ));
    assert_eq!(
        (header(&v6, "x-header-set"), served_by(&v6)),
        (Some("v2"), "echo-v2")
    );

    // MeshFrontend: the route is for traffic to the Service, not to a pod IP directly.
    let pod_ip = cluster.pod("echo-v2").addr4(8080);
    let direct = first(&request(&cluster, pod_ip, "echo-v2", "/", &[]));
    assert_eq!((direct.status, served_by(&direct)), (200, "echo-v2"));
    assert_eq!(header(&direct, "x-header-set"), None, "{direct:?}");

    // MeshFrontendHostname: the Service address decides, not the Host header.
    let by_ip = first(&request(
        &cluster,
        vip(&cluster, "echo-v2"),
        "echo-v1",
        "/",
        &[],
    ));
    assert_eq!(
        (header(&by_ip, "x-header-set"), served_by(&by_ip)),
        (Some("v2"), "echo-v2")
    );
    let by_ip = first(&request(
        &cluster,
        vip(&cluster, "echo-v1"),
        "echo-v2",
        "/",
        &[],
    ));
    assert_eq!(
        (header(&by_ip, "x-header-set"), served_by(&by_ip)),
        (Some("v1"), "echo-v1")
    );
}

#[test]
fn requests_match_on_path_headers_query_and_method_in_the_specs_order() {
    let (cluster, _servers) = cluster();
    let rules = "  - name: exact\n    matches: [{path: {type: Exact, value: /exact}}]\n    backendRefs: [{name: echo-v2, port: 80}]\n\
        \x20 - name: v1\n    matches: [{path: {type: PathPrefix, value: /v1}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n\
        \x20 - matches: [{path: {type: PathPrefix, value: /v2}}]\n    backendRefs: [{name: echo-v2, port: 80}]\n\
        \x20 - name: patch\n    matches: [{method: PATCH, path: {type: PathPrefix, value: /v1}}]\n    backendRefs: [{name: echo-v2, port: 80}]\n\
        \x20 - matches: [{headers: [{name: version, value: two}]}, {queryParams: [{name: animal, value: whale}]}]\n    backendRefs: [{name: echo-v2, port: 80}]\n\
        \x20 - matches: [{path: {type: RegularExpression, value: \"/re/[0-9]+\"}}]\n    backendRefs: [{name: echo-v2, port: 80}]\n\
        \x20 - name: default\n    filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {set: [{name: X-Rule, value: default}]}\n    backendRefs: [{name: echo-v1, port: 80}]\n";
    cluster
        .write_manifest("httproutes.yaml", &route("split", "echo", Some(80), rules))
        .unwrap();
    let dst = vip(&cluster, "echo");
    // Wait until the route is live.
    expect(&cluster, dst, "echo", "/anything", &[], |s| {
        header(s, "x-rule") == Some("default")
    });

    let cases: [(&str, &str, &[&str], &str); 12] = [
        // MeshTrafficSplit: path prefixes split one Service between versions.
        ("GET", "/v1", &[], "echo-v1"),
        ("GET", "/v2", &[], "echo-v2"),
        ("GET", "/v2/deeper", &[], "echo-v2"),
        ("GET", "/v2x", &[], "echo-v1"),
        ("GET", "/exact", &[], "echo-v2"),
        ("GET", "/exact/not", &[], "echo-v1"),
        // Same prefix length: the rule with a method match wins for that method.
        ("PATCH", "/v1/x", &[], "echo-v2"),
        ("GET", "/v1/x", &[], "echo-v1"),
        ("GET", "/", &["-H", "version: two"], "echo-v2"),
        ("GET", "/?animal=whale", &[], "echo-v2"),
        ("GET", "/re/42", &[], "echo-v2"),
        ("GET", "/re/x", &[], "echo-v1"),
    ];
    for (method, path, headers, expected) in cases {
        let mut extra = vec!["--method", method];
        extra.extend_from_slice(headers);
        let s = first(&request(&cluster, dst, "echo", path, &extra));
        assert_eq!(s.status, 200, "{method} {path}: {s:?}");
        assert_eq!(served_by(&s), expected, "{method} {path} {headers:?}");
        assert_eq!(
            s.echo()["path"],
            path,
            "the backend sees the path unchanged"
        );
    }
    // Named rules show in the access log, with the request's facts.
    let logs = cluster.eventually(Duration::from_secs(3), || {
        cluster
            .request_logs("a")
            .iter()
            .any(|l| l["route"] == "apps/split#exact")
    });
    assert!(
        logs.is_some(),
        "no access-log line names the rule: {:?}",
        cluster.request_logs("a").last()
    );
    let line = cluster
        .request_logs("a")
        .into_iter()
        .find(|l| l["route"] == "apps/split#patch")
        .expect("a PATCH line");
    assert_eq!(line["method"], "PATCH");
    assert_eq!(line["path"], "/v1/x");
    assert_eq!(line["response_code"], 200);
    assert_eq!(line["backend"], "apps/echo-v2");
    assert_eq!(
        line["destination_principal"],
        "spiffe://cluster.local/ns/apps/sa/echo-v2"
    );
    assert_eq!(
        line["source_principal"],
        "spiffe://cluster.local/ns/apps/sa/client"
    );
    assert_eq!(line["connection_security_policy"], "mutual_tls");
}

#[test]
fn weighted_backends_split_requests_70_30_and_reuse_backend_connections() {
    let (cluster, _servers) = cluster();
    let rules = "  - backendRefs:\n    - {name: echo-v1, port: 80, weight: 70}\n    - {name: echo-v2, port: 80, weight: 30}\n";
    cluster
        .write_manifest("httproutes.yaml", &route("weights", "echo", None, rules))
        .unwrap();
    let dst = vip(&cluster, "echo");
    // Routed once both versions answer one kept-alive connection's requests.
    let applied = cluster.eventually(Duration::from_secs(5), || {
        let r = request(&cluster, dst, "echo", "/", &["--count", "10"]);
        r.pods.get("echo-v1") == Some(&7)
    });
    assert!(applied.is_some(), "the 70/30 route never applied");
    let inbound_before = inbound_count(&cluster);

    // Every request of one connection is routed on its own (per-request, not per-connection).
    let r = request(&cluster, dst, "echo", "/", &["--count", "2000"]);
    assert_eq!(r.errors, 0, "{r:?}");
    let v1 = *r.pods.get("echo-v1").unwrap_or(&0) as f64 / 2000.0;
    let v2 = *r.pods.get("echo-v2").unwrap_or(&0) as f64 / 2000.0;
    eprintln!(
        "70/30 split over 2000 requests: {:.1}% / {:.1}%",
        v1 * 100.0,
        v2 * 100.0
    );
    assert!(
        (v1 - 0.70).abs() <= 0.03 && (v2 - 0.30).abs() <= 0.03,
        "{r:?}"
    );

    // The same over HTTP/2 prior knowledge.
    let h2 = request(&cluster, dst, "echo", "/", &["--count", "200", "--http2"]);
    assert_eq!(h2.errors, 0, "{h2:?}");
    assert_eq!(h2.pods.get("echo-v1"), Some(&140), "{h2:?}");
    assert_eq!(first(&h2).echo()["proto"], "HTTP/2.0");

    // 2,200 requests, yet the backends saw only a handful of new tunnelled connections.
    let new_inbound = inbound_count(&cluster) - inbound_before;
    eprintln!("new backend connections for 2,200 requests: {new_inbound}");
    assert!(
        new_inbound <= 8,
        "backend connections were not reused: {new_inbound}"
    );
}

/// Inbound connections node b has seen (live and closed).
fn inbound_count(cluster: &SimCluster) -> u64 {
    let live = cluster.admin("b", "/connections").unwrap();
    let all: Vec<Value> = live["live"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(live["closed"].as_array().into_iter().flatten())
        .cloned()
        .collect();
    all.iter().filter(|c| c["direction"] == "inbound").count() as u64
}

#[test]
fn redirects_rewrites_and_header_modifiers() {
    let (cluster, _servers) = cluster();
    let redirect = |path: &str, spec: &str| {
        format!(
            "  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    filters:\n    - type: RequestRedirect\n      requestRedirect: {spec}\n"
        )
    };
    let rules = [
        redirect("/port", "{port: 8083}"),
        redirect("/host-status", "{hostname: example.org, statusCode: 301}"),
        redirect("/scheme", "{scheme: https}"),
        redirect("/path", "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 308}"),
        "  - matches: [{path: {type: PathPrefix, value: /prefix/one}}]\n    filters:\n    - type: URLRewrite\n      \
         urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}\n    backendRefs: [{name: echo-v1, port: 80}]\n"
            .to_string(),
        "  - matches: [{path: {type: PathPrefix, value: /full}}]\n    filters:\n    - type: URLRewrite\n      \
         urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}\n    backendRefs: [{name: echo-v1, port: 80}]\n"
            .to_string(),
        "  - matches: [{path: {type: PathPrefix, value: /headers}}]\n    filters:\n    - type: RequestHeaderModifier\n      \
         requestHeaderModifier: {set: [{name: X-Set, value: s}], add: [{name: X-Add, value: a}], remove: [X-Remove]}\n    \
         - type: ResponseHeaderModifier\n      responseHeaderModifier: {set: [{name: X-Resp, value: r}], remove: [content-type]}\n    \
         backendRefs:\n    - name: echo-v2\n      port: 80\n      filters:\n      - type: RequestHeaderModifier\n        \
         requestHeaderModifier: {add: [{name: X-Backend, value: v2}]}\n"
            .to_string(),
    ];
    cluster
        .write_manifest(
            "httproutes.yaml",
            &route("filters", "echo", Some(80), &rules.concat()),
        )
        .unwrap();
    let dst = vip(&cluster, "echo");
    let location = |s: &HttpSample| header(s, "location").unwrap_or("").to_string();

    let s = expect(&cluster, dst, "echo", "/port", &[], |s| s.status == 302);
    assert_eq!(location(&s), "http://echo:8083/port");
    let s = first(&request(&cluster, dst, "echo", "/host-status?q=1", &[]));
    assert_eq!(
        (s.status, location(&s)),
        (301, "http://example.org/host-status?q=1".into())
    );
    let s = first(&request(&cluster, dst, "echo", "/scheme", &[]));
    assert_eq!(
        (s.status, location(&s)),
        (302, "https://echo/scheme".into())
    );
    let s = first(&request(&cluster, dst, "echo:80", "/path/x", &[]));
    assert_eq!((s.status, location(&s)), (308, "http://echo/new/x".into()));

    let s = first(&request(&cluster, dst, "echo", "/prefix/one/two", &[]));
    assert_eq!((s.status, served_by(&s)), (200, "echo-v1"));
    assert_eq!(s.echo()["path"], "/one/two");
    assert_eq!(s.echo()["host"], "rewritten.example");
    let s = first(&request(&cluster, dst, "echo", "/full/a?b=c", &[]));
    assert_eq!(s.echo()["path"], "/replaced?b=c");

    let s = first(&request(
        &cluster,
        dst,
        "echo",
        "/headers",
        &[
            "-H",
            "X-Remove: gone",
            "-H",
            "X-Add: first",
            "-H",
            "X-Set: old",
        ],
    ));
    assert_eq!((s.status, served_by(&s)), (200, "echo-v2"));
    let seen = &s.echo()["headers"];
    assert_eq!(seen["x-set"], "s");
    assert_eq!(seen["x-add"], "first,a");
    assert_eq!(seen["x-backend"], "v2");
    assert!(seen.get("x-remove").is_none(), "{seen}");
    assert_eq!(header(&s, "x-resp"), Some("r"));
    assert_eq!(header(&s, "content-type"), None);
}

#[test]
fn timeouts_retries_and_missing_backends_answer_in_time_with_clear_errors() {
    let (cluster, _servers) = cluster();
    let rules = "  - matches: [{path: {value: /slow}}]\n    timeouts: {request: 300ms}\n    backendRefs: [{name: echo-v1, port: 80}]\n\
        \x20 - matches: [{path: {value: /backend-slow}}]\n    timeouts: {backendRequest: 200ms}\n    backendRefs: [{name: echo-v1, port: 80}]\n\
        \x20 - matches: [{path: {value: /retry}}]\n    retry: {attempts: 2, codes: [503], backoff: 10ms}\n    backendRefs: [{name: echo-v1, port: 80}]\n\
        \x20 - matches: [{path: {value: /no-retry}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n\
        \x20 - matches: [{path: {value: /nobody}}]\n    backendRefs: [{name: echo-empty, port: 80}]\n\
        \x20 - matches: [{path: {value: /invalid}}]\n    backendRefs: [{name: does-not-exist, port: 80}]\n";
    let only =
        "  - matches: [{path: {value: /only}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n";
    cluster
        .write_manifest(
            "httproutes.yaml",
            &[
                route("resilience", "echo", Some(80), rules),
                route("only", "echo-v1", Some(80), only),
            ]
            .join("---\n"),
        )
        .unwrap();
    let dst = vip(&cluster, "echo");
    expect(&cluster, dst, "echo", "/invalid", &[], |s| s.status == 500);

    // A slow backend yields 504 when the request timeout expires, not when it answers.
    let r = request(&cluster, dst, "echo", "/slow?delay_ms=3000", &[]);
    let s = first(&r);
    assert_eq!(s.status, 504, "{s:?}");
    assert!(r.p50_us < 1_500_000, "504 came after {} µs", r.p50_us);
    assert!(s.body.contains("timeout"), "{}", s.body);
    let fast = first(&request(&cluster, dst, "echo", "/slow?delay_ms=10", &[]));
    assert_eq!(fast.status, 200);
    let r = request(&cluster, dst, "echo", "/backend-slow?delay_ms=3000", &[]);
    assert_eq!(first(&r).status, 504);
    assert!(r.p50_us < 1_500_000, "504 came after {} µs", r.p50_us);

    // A backend failing the first attempt with 503 still gives the client 200.
    let fail_once = [
        "--count",
        "20",
        "-H",
        "x-fail-attempts: 1",
        "--request-ids",
        "once",
    ];
    let r = request(&cluster, dst, "echo", "/retry", &fail_once);
    assert_eq!(r.statuses.get(&200), Some(&20), "{r:?}");
    // Without a retry policy the same failure reaches the client.
    let r = request(
        &cluster,
        dst,
        "echo",
        "/no-retry",
        &["-H", "x-fail-attempts: 1", "--request-ids", "plain"],
    );
    assert_eq!(first(&r).status, 503, "{r:?}");
    // Retries are bounded: 1 + 2 attempts, then the backend's 503 is returned.
    let r = request(
        &cluster,
        dst,
        "echo",
        "/retry",
        &["-H", "x-fail-attempts: 5", "--request-ids", "many"],
    );
    assert_eq!(first(&r).status, 503, "{r:?}");
    let logs = cluster.request_logs("a");
    let exhausted = logs
        .iter()
        .rev()
        .find(|l| l["path"] == "/retry")
        .expect("a /retry line");
    assert_eq!(
        (
            exhausted["retries"].as_u64(),
            exhausted["response_flags"].as_str()
        ),
        (Some(2), Some("URX"))
    );

    // No ready endpoint: 503 naming the backend; an invalid backend: 500.
    let s = first(&request(&cluster, dst, "echo", "/nobody", &[]));
    assert_eq!(s.status, 503);
    assert!(
        s.body.contains("apps/echo-empty has no ready endpoint"),
        "{}",
        s.body
    );
    let s = first(&request(&cluster, dst, "echo", "/invalid", &[]));
    assert_eq!(s.status, 500);
    assert!(
        s.body.contains("does-not-exist does not exist"),
        "{}",
        s.body
    );
    // No rule matches: 404 saying so.
    let s = expect(
        &cluster,
        vip(&cluster, "echo-v1"),
        "echo-v1",
        "/else",
        &[],
        |s| s.status == 404,
    );
    assert!(s.body.contains("no HTTPRoute rule"), "{}", s.body);
    // Garbage instead of HTTP is refused without harming the agent.
    let garbage = cluster.transfer("client", dst, 4096).unwrap();
    assert!(!garbage.ok);
    let s = first(&request(&cluster, dst, "echo", "/no-retry", &[]));
    assert_eq!(s.status, 200, "the agent still serves after garbage");
}

#[test]
fn http2_websocket_trace_context_and_request_metrics() {
    let (cluster, _servers) = cluster();
    let rules = "  - filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {set: [{name: X-Routed, value: \"yes\"}]}\n    \
        backendRefs: [{name: echo-v1, port: 80}]\n";
    cluster
        .write_manifest(
            "httproutes.yaml",
            &route("v1-only", "echo", Some(80), rules),
        )
        .unwrap();
    let dst = vip(&cluster, "echo");
    expect(&cluster, dst, "echo", "/", &[], |s| {
        header(s, "x-routed") == Some("yes")
    });

    // HTTP/2 prior knowledge from the app, routed per request.
    let h2 = request(&cluster, dst, "echo", "/h2", &["--http2", "--count", "5"]);
    let s = first(&h2);
    assert_eq!(
        (s.status, header(&s, "x-routed"), served_by(&s)),
        (200, Some("yes"), "echo-v1")
    );
    assert_eq!(s.echo()["proto"], "HTTP/2.0");
    assert_eq!(s.echo()["host"], "echo");

    // A WebSocket upgrade through the routed Service.
    let ws = cluster
        .websocket("client", dst, "echo", "hello through the mesh")
        .unwrap();
    assert_eq!(ws.error, None, "{ws:?}");
    assert_eq!((ws.status, ws.accept_ok), (101, true));
    assert_eq!(ws.echoed, "hello through the mesh");

    // Trace context: kept when valid, started when missing.
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let s = first(&request(
        &cluster,
        dst,
        "echo",
        "/traced",
        &[
            "-H",
            &format!("traceparent: {given}"),
            "-H",
            "tracestate: vendor=1",
        ],
    ));
    assert_eq!(s.echo()["headers"]["traceparent"], given);
    assert_eq!(s.echo()["headers"]["tracestate"], "vendor=1");
    let s = first(&request(&cluster, dst, "echo", "/untraced", &[]));
    let started = s.echo()["headers"]["traceparent"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(started.len(), 55, "{started}");
    assert!(
        started.starts_with("00-") && started.ends_with("-01"),
        "{started}"
    );
    let trace_id = &started[3..35];
    let logged = cluster.eventually(Duration::from_secs(3), || {
        cluster
            .request_logs("a")
            .iter()
            .any(|l| l["trace_id"] == trace_id && l["path"] == "/untraced")
    });
    assert!(
        logged.is_some(),
        "the access log does not carry trace {trace_id}"
    );

    // Per-request metrics with Istio's labels.
    let r = request(&cluster, dst, "echo", "/counted", &["--count", "25"]);
    assert_eq!(r.statuses.get(&200), Some(&25));
    let (_, text) = cluster.admin_raw("a", "GET", "/stats/prometheus").unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("nodemesh_requests_total{")
                && l.contains("destination_service_name=\"echo-v1\"")
                && l.contains("response_code=\"200\"")
                && l.contains("response_flags=\"-\"")
        })
        .unwrap_or_else(|| panic!("no request counter in:\n{text}"));
    for label in [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "source_principal=\"spiffe://cluster.local/ns/apps/sa/client\"",
        "destination_workload=\"echo-v1\"",
        "destination_principal=\"spiffe://cluster.local/ns/apps/sa/echo-v1\"",
        "destination_service=\"echo-v1.apps.svc.cluster.local\"",
        "connection_security_policy=\"mutual_tls\"",
    ] {
        assert!(line.contains(label), "{label} missing in {line}");
    }
    let count: f64 = line
        .rsplit(' ')
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0.0);
    // 1+ (expect) + 5 + 2 + 25 successful requests to echo-v1 at least.
    assert!(count >= 33.0, "{line}");
    assert!(
        text.contains("nodemesh_request_duration_milliseconds_bucket{"),
        "no duration histogram"
    );

    // The connections that carried those requests, closed by the client, count as
    // completed (`-`), not as upstream terminations (`UC`).
    let served = |flags: &str| {
        let needle = format!("response_flags=\"{flags}\"");
        text.lines()
            .filter(|l| {
                l.starts_with("nodemesh_tcp_connections_closed_total{")
                    && l.contains("reporter=\"source\"")
                    && l.contains("destination_service_name=\"echo\"")
                    && l.contains(&needle)
            })
            .map(|l| l.rsplit(' ').next().unwrap_or("0").parse().unwrap_or(0.0))
            .sum::<f64>()
    };
    assert!(
        served("-") >= 1.0,
        "no completed HTTP connection in:\n{text}"
    );
    assert_eq!(served("UC"), 0.0, "HTTP connections flagged UC in:\n{text}");
}

#[test]
fn a_request_the_destinations_policy_denies_gets_403_and_allowed_ones_pass() {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("echo-v1", "apps", "b"));
    spec.pods.push(PodSpec::new("intruder", "apps", "a"));
    spec.services = vec![ServiceSpec::new("echo", "apps", 80, 8080, &["echo-v1"])];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.http_serve("echo-v1", &[8080]).unwrap();
    let policy = "apiVersion: security.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-client, namespace: apps}\n\
        spec:\n  selector: {matchLabels: {app: echo-v1}}\n  action: ALLOW\n  rules:\n  - from: [{serviceAccounts: [apps/client]}]\n";
    let rules = "  - backendRefs: [{name: echo, port: 80}]\n";
    let routed = route("echo", "echo", None, rules);
    cluster.write_manifest("httproutes.yaml", &routed).unwrap();
    let dst = vip(&cluster, "echo");
    // Before the policy the intruder is served, which leaves a kept-alive backend
    // connection in node a's pool.
    let served = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .http("intruder", dst, "echo", "/", &[])
            .is_ok_and(|r| r.statuses.contains_key(&200))
    });
    assert!(
        served.is_some(),
        "the intruder was never served before the policy"
    );
    cluster
        .write_manifest(
            "httproutes.yaml",
            &[routed, policy.to_string()].join("---\n"),
        )
        .unwrap();
    // The tightened policy reaches the intruder's next requests, pooled connection or not.
    let mut last = None;
    let denied = cluster.eventually(Duration::from_secs(5), || {
        let r = cluster.http("intruder", dst, "echo", "/", &[]);
        let hit = r.as_ref().is_ok_and(|r| r.statuses.contains_key(&403));
        last = Some(r);
        hit
    });
    assert!(denied.is_some(), "the intruder was never refused: {last:?}");
    eprintln!("the tightened policy applied after {denied:?}");
    let s = first(&cluster.http("intruder", dst, "echo", "/", &[]).unwrap());
    assert!(s.body.contains("authorization policy denies"), "{}", s.body);
    let ok = first(&request(&cluster, dst, "echo", "/", &[]));
    assert_eq!((ok.status, served_by(&ok)), (200, "echo-v1"));
    let line = cluster
        .request_logs("a")
        .into_iter()
        .rev()
        .find(|l| l["response_code"] == 403)
        .expect("a 403 line");
    assert_eq!(line["response_flags"], "RBAC");
    assert_eq!(
        line["source_principal"],
        "spiffe://cluster.local/ns/apps/sa/intruder"
    );
}
