//! End-to-end: distributed tracing. A request from `client` (node a) to the Service
//! `front` (node b), whose application calls the Service `back` (node a), leaves four
//! spans in one trace — a client span on the source node's agent and a server span on
//! the destination node's agent for each hop — linked parent to child, with the trace
//! id the client sent, delivered over OTLP/HTTP, OTLP/gRPC and Zipkin to a collector
//! that decodes them with OpenTelemetry's own message types. Sampling honours the
//! incoming flag and samples the rest at the configured percentage. A collector that is
//! slow or down leaves request latency alone: spans are dropped and counted, the queue
//! stays bounded, and `meshctl node status` shows the failing exporter.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    collector::{CollectedSpan, Collector},
    sim::{network, services::ServiceSpec, ClusterSpec, PodSpec, Process, SimCluster},
};
use serde_json::Value;

/// Where the collector listens: node a's fabric address, which every agent reaches.
fn collector_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(network::underlay(0).0), port)
}

/// Writes the agents' mesh configuration (Istio's MeshConfig) for one test.
fn mesh_config_file(test: &str, yaml: &str) -> String {
    let path = std::env::temp_dir().join(format!(
        "nodemesh-tracing-{test}-{}.yaml",
        std::process::id()
    ));
    std::fs::write(&path, yaml).unwrap();
    path.to_string_lossy().into_owned()
}

fn virtual_service(name: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: apps}}\n\
         spec:\n  hosts: [{name}]\n  http:\n  - route:\n    - destination: {{host: {name}}}\n"
    )
}

/// An L7 policy, so the destination's agent serves the pod's requests as HTTP.
fn allow_get(app: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {app}-get, namespace: apps}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  rules:\n  - to:\n    - operation: {{methods: [GET]}}\n"
    )
}

/// Two nodes: `client` on a, `front` on b (its application calls `back`), `back` on
/// a; both Services routed by a VirtualService, both pods under an L7 policy.
fn chain(test: &str, mesh_config: &str) -> (SimCluster, Vec<Process>) {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("front", "apps", "b"));
    spec.pods.push(PodSpec::new("back", "apps", "a"));
    spec.services = vec![
        ServiceSpec::new("front", "apps", 80, 8080, &["front"]),
        ServiceSpec::new("back", "apps", 80, 8080, &["back"]),
    ];
    spec.agent_args = vec!["--mesh-config".into(), mesh_config_file(test, mesh_config)];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    for name in ["front", "back"] {
        cluster
            .write_manifest(&format!("vs-{name}.yaml"), &virtual_service(name))
            .unwrap();
        cluster
            .write_manifest(&format!("authz-{name}.yaml"), &allow_get(name))
            .unwrap();
    }
    let back = cluster.http_serve("back", &[8080]).unwrap();
    let front = cluster
        .http_serve_forwarding("front", 8080, cluster.service("back").addr4(), "back")
        .unwrap();
    (cluster, vec![back, front])
}

fn traceparent(trace_id: &str, flags: &str) -> String {
    format!("traceparent: 00-{trace_id}-00f067aa0ba902b7-{flags}")
}

/// One GET from `client` to `front` with `headers`; its answer.
fn get_front(cluster: &SimCluster, headers: &[&str]) -> mesh_tests::report::HttpSample {
    let mut extra = Vec::new();
    for h in headers {
        extra.extend(["-H", *h]);
    }
    let r = cluster
        .http(
            "client",
            cluster.service("front").addr4(),
            "front",
            "/chain",
            &extra,
        )
        .unwrap();
    assert_eq!(r.errors, 0, "{r:?}");
    r.samples[0].clone()
}

fn of_trace<'a>(spans: &'a [CollectedSpan], trace: &str, via: &str) -> Vec<&'a CollectedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace && s.via == via)
        .collect()
}

fn find<'a>(spans: &[&'a CollectedSpan], service: &str, kind: &str) -> &'a CollectedSpan {
    spans
        .iter()
        .find(|s| s.service == service && s.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} span of {service} in {spans:#?}"))
}

const ALL_PROTOCOLS: &str = r#"
extensionProviders:
- name: otel-http
  opentelemetry:
    service: COLLECTOR_IP
    port: 4318
    http: {path: /v1/traces, timeout: 2s}
- name: otel-grpc
  opentelemetry: {service: COLLECTOR_IP, port: 4318}
- name: zipkin
  zipkin: {service: COLLECTOR_IP, port: 4318, path: /api/v2/spans}
defaultProviders:
  tracing: [otel-http, otel-grpc, zipkin]
defaultConfig:
  tracing: {sampling: 0}
"#;

fn with_collector_ip(yaml: &str) -> String {
    yaml.replace("COLLECTOR_IP", &network::underlay(0).0.to_string())
}

#[test]
fn a_two_hop_request_leaves_four_linked_spans_over_otlp_http_otlp_grpc_and_zipkin() {
    let (cluster, _apps) = chain("two-hop", &with_collector_ip(ALL_PROTOCOLS));
    let collector = Collector::start(&cluster.node("a").netns, collector_addr(4318)).unwrap();

    // Until the routes and policies apply, a request leaves fewer spans: retry with a
    // new trace each time (bounded) until one leaves all four over every protocol.
    let mut found = None;
    for attempt in 0..30u32 {
        let trace = format!("4bf92f3577b34da6a3ce929d0e0e{attempt:04x}");
        let answer = get_front(
            &cluster,
            &[&traceparent(&trace, "01"), "tracestate: vendor=x"],
        );
        let spans = collector.wait_for(Duration::from_secs(3), |s| {
            ["otlp-http", "otlp-grpc", "zipkin"]
                .iter()
                .all(|via| of_trace(s, &trace, via).len() >= 4)
        });
        if ["otlp-http", "otlp-grpc", "zipkin"]
            .iter()
            .all(|via| of_trace(&spans, &trace, via).len() >= 4)
        {
            found = Some((trace, answer, spans));
            break;
        }
    }
    let (trace, answer, spans) = found.expect("no request left four spans over each protocol");
    assert_eq!(answer.status, 200, "{answer:?}");

    let principal = |sa: &str| format!("spiffe://cluster.local/ns/apps/sa/{sa}");
    for via in ["otlp-http", "otlp-grpc", "zipkin"] {
        let trace_spans = of_trace(&spans, &trace, via);
        assert_eq!(trace_spans.len(), 4, "{via}: {trace_spans:#?}");
        let client_out = find(&trace_spans, "client.apps", "CLIENT");
        let front_in = find(&trace_spans, "front.apps", "SERVER");
        let front_out = find(&trace_spans, "front.apps", "CLIENT");
        let back_in = find(&trace_spans, "back.apps", "SERVER");

        // Parent → child, from the client's own span id down the chain.
        assert_eq!(
            client_out.parent_id.as_deref(),
            Some("00f067aa0ba902b7"),
            "{via}"
        );
        assert_eq!(
            front_in.parent_id,
            Some(client_out.span_id.clone()),
            "{via}"
        );
        assert_eq!(front_out.parent_id, Some(front_in.span_id.clone()), "{via}");
        assert_eq!(back_in.parent_id, Some(front_out.span_id.clone()), "{via}");
        let ids: std::collections::BTreeSet<_> = trace_spans.iter().map(|s| &s.span_id).collect();
        assert_eq!(ids.len(), 4, "{via}: every span has its own id");

        // OpenTelemetry's HTTP attributes and the mesh's.
        let a = &client_out.attributes;
        let want: BTreeMap<&str, String> = BTreeMap::from([
            ("http.request.method", "GET".into()),
            ("http.response.status_code", "200".into()),
            ("url.path", "/chain".into()),
            ("server.address", "front".into()),
            ("nodemesh.source.workload", "apps/client".into()),
            ("nodemesh.source.principal", principal("client")),
            (
                "nodemesh.destination.service",
                "front.apps.svc.cluster.local".into(),
            ),
            ("nodemesh.destination.workload", "apps/front".into()),
            ("nodemesh.destination.principal", principal("front")),
            ("nodemesh.backend", "front.apps.svc.cluster.local".into()),
            ("nodemesh.response_flags", "-".into()),
            ("nodemesh.retries", "0".into()),
            ("nodemesh.connection_security_policy", "mutual_tls".into()),
            (
                "network.peer.address",
                cluster.pod("front").addr4(8080).ip().to_string(),
            ),
        ]);
        for (k, v) in &want {
            assert_eq!(a.get(*k), Some(v), "{via}: client span's {k}: {a:#?}");
        }
        assert!(
            a.get("nodemesh.route")
                .is_some_and(|r| r.contains("apps/front")),
            "{via}: {a:#?}"
        );
        let b = &back_in.attributes;
        for (k, v) in [
            ("http.request.method", "GET".to_string()),
            ("http.response.status_code", "200".into()),
            ("nodemesh.source.workload", "apps/front".into()),
            ("nodemesh.source.principal", principal("front")),
            ("nodemesh.destination.workload", "apps/back".into()),
            ("nodemesh.destination.principal", principal("back")),
            ("nodemesh.connection_security_policy", "mutual_tls".into()),
        ] {
            assert_eq!(
                b.get(k),
                Some(&v),
                "{via}: back's server span's {k}: {b:#?}"
            );
        }
        assert!(b.get("nodemesh.policy").is_some(), "{via}: {b:#?}");
        for s in &trace_spans {
            assert!(!s.error, "{via}: {s:#?}");
            assert!(s.end_unix_nanos >= s.start_unix_nanos, "{via}: {s:#?}");
        }
        // The server span of a hop lies within its client span.
        assert!(
            front_in.start_unix_nanos >= client_out.start_unix_nanos
                && front_in.end_unix_nanos <= client_out.end_unix_nanos + 1_000_000,
            "{via}: {client_out:#?} {front_in:#?}"
        );
    }

    // The application at the end of the chain saw the trace, its parent the span of
    // the proxy in front of it, and the tracestate kept.
    let seen = &answer.echo()["upstream"]["headers"];
    let back_in = find(
        &of_trace(&spans, &trace, "otlp-http"),
        "back.apps",
        "SERVER",
    )
    .clone();
    assert_eq!(
        seen["traceparent"],
        Value::from(format!("00-{trace}-{}-01", back_in.span_id)),
        "{answer:?}"
    );
    assert_eq!(seen["tracestate"], "vendor=x");
}

const SAMPLED_AT_10: &str = r#"
extensionProviders:
- name: otel
  opentelemetry:
    service: COLLECTOR_IP
    port: 4318
    http: {}
defaultProviders: {tracing: [otel]}
defaultConfig: {tracing: {sampling: 10}}
"#;

fn client_spans(spans: &[CollectedSpan]) -> Vec<&CollectedSpan> {
    spans
        .iter()
        .filter(|s| s.service == "client.apps" && s.kind == "CLIENT")
        .collect()
}

#[test]
fn requests_without_trace_context_are_sampled_at_the_configured_percentage_and_the_flag_is_honoured(
) {
    let (cluster, _apps) = chain("sampling", &with_collector_ip(SAMPLED_AT_10));
    let collector = Collector::start(&cluster.node("a").netns, collector_addr(4318)).unwrap();
    let back = cluster.service("back").addr4();
    let requests = |headers: &[&str], count: u64| {
        let count = count.to_string();
        let mut extra = vec!["--count", &count];
        for h in headers {
            extra.extend(["-H", *h]);
        }
        let r = cluster.http("client", back, "back", "/", &extra).unwrap();
        assert_eq!(
            (r.errors, r.statuses.get(&200)),
            (0, Some(&(count.parse().unwrap()))),
            "{r:?}"
        );
    };
    // The route is in force once a sampled request leaves a client span.
    let ready = (0..50).any(|_| {
        requests(&[&traceparent("0000000000000000000000000000beef", "01")], 1);
        !client_spans(&collector.wait_for(Duration::from_secs(2), |s| !client_spans(s).is_empty()))
            .is_empty()
    });
    assert!(ready, "no client span ever arrived");
    std::thread::sleep(Duration::from_secs(1));
    collector.clear();

    // An incoming sampled flag always records; a clear one never does.
    let sampled = "0af7651916cd43dd8448eb211c80319c";
    let unsampled = "1af7651916cd43dd8448eb211c80319c";
    requests(&[&traceparent(sampled, "01")], 50);
    requests(&[&traceparent(unsampled, "00")], 50);
    let spans = collector.wait_for(Duration::from_secs(5), |s| {
        client_spans(s)
            .iter()
            .filter(|c| c.trace_id == sampled)
            .count()
            >= 50
    });
    let by_trace = |t: &str| {
        client_spans(&spans)
            .iter()
            .filter(|c| c.trace_id == t)
            .count()
    };
    assert_eq!((by_trace(sampled), by_trace(unsampled)), (50, 0));
    collector.clear();

    // Without trace context: 10 % of 2,000, within ±2 % (the binomial's σ is 0.67 %).
    requests(&[], 2000);
    std::thread::sleep(Duration::from_secs(2));
    let spans = collector.wait_for(Duration::from_secs(3), |_| false);
    let recorded = client_spans(&spans).len();
    assert!(
        (160..=240).contains(&recorded),
        "{recorded} of 2,000 requests left a span at 10 % sampling"
    );
}

const SLOW_AND_DOWN: &str = r#"
extensionProviders:
- name: slow
  opentelemetry:
    service: COLLECTOR_IP
    port: 4318
    http: {timeout: 1s}
- name: down
  zipkin: {service: COLLECTOR_IP, port: 9, path: /api/v2/spans}
defaultProviders: {tracing: [slow, down]}
defaultConfig: {tracing: {sampling: 100}}
"#;

fn metric(cluster: &SimCluster, node: &str, series: &str) -> u64 {
    let text = cluster.scrape_metrics(node).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap_or(0.0) as u64)
        .unwrap_or(0)
}

#[test]
fn a_slow_or_down_collector_costs_requests_nothing_and_its_spans_are_dropped_and_counted() {
    let (cluster, _apps) = chain("slow", &with_collector_ip(SLOW_AND_DOWN));
    let collector = Collector::start(&cluster.node("a").netns, collector_addr(4318)).unwrap();
    let back = cluster.service("back").addr4();
    let run = |count: u64| {
        let count = count.to_string();
        let r = cluster
            .http("client", back, "back", "/", &["--count", &count])
            .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        r
    };
    let ready = (0..50).any(|_| {
        run(1);
        !client_spans(&collector.wait_for(Duration::from_secs(2), |s| !client_spans(s).is_empty()))
            .is_empty()
    });
    assert!(ready, "no client span ever arrived");

    // Healthy collector: the baseline.
    let healthy = run(3000);
    // Slow collector (answers after 5 s, past the provider's 1 s timeout).
    collector.set_delay(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    let slow = run(3000);
    assert!(
        slow.p99_us <= healthy.p99_us * 2 + 10_000,
        "p99 with the collector slow: {} µs, healthy: {} µs",
        slow.p99_us,
        healthy.p99_us
    );
    assert!(
        slow.p50_us <= healthy.p50_us * 2 + 2_000,
        "p50 with the collector slow: {} µs, healthy: {} µs",
        slow.p50_us,
        healthy.p50_us
    );

    // Dropped and counted, the queue bounded.
    let queued = metric(&cluster, "a", "nodemesh_spans_queued{provider=\"slow\"}");
    assert!(queued <= 2048, "{queued} spans queued");
    let dropped = |provider: &str, reason: &str| {
        metric(
            &cluster,
            "a",
            &format!("nodemesh_spans_dropped_total{{provider=\"{provider}\",reason=\"{reason}\"}}"),
        )
    };
    assert!(
        dropped("slow", "queue_full") > 0,
        "a full queue drops spans"
    );
    assert!(
        dropped("slow", "export_failed") > 0,
        "timed-out exports drop spans"
    );
    assert!(
        dropped("down", "export_failed") > 0,
        "a collector down drops spans"
    );

    // meshctl shows the failing exporters.
    let status = cluster.admin("a", "/status").unwrap();
    let exporters = status["tracing"].as_array().cloned().unwrap_or_default();
    let of = |name: &str| {
        exporters
            .iter()
            .find(|e| e["provider"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no exporter {name} in {status:#}"))
    };
    assert!(
        of("down")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("connecting")),
        "{status:#}"
    );
    assert!(of("down")["dropped"].as_u64() > Some(0));
    let out = cluster.meshctl("a", &["status"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tracing down") && text.contains("FAILING"),
        "{text}"
    );

    // The collector answering again: exports succeed, the error clears.
    collector.set_delay(Duration::ZERO);
    let sent_before = of("slow")["sent"].as_u64().unwrap_or(0);
    run(100);
    let recovered = cluster.eventually(Duration::from_secs(10), || {
        let status = cluster.admin("a", "/status").unwrap();
        status["tracing"].as_array().is_some_and(|all| {
            all.iter().any(|e| {
                e["provider"] == "slow"
                    && e["last_error"].is_null()
                    && e["sent"].as_u64() > Some(sent_before)
            })
        })
    });
    assert!(recovered.is_some(), "the slow exporter never recovered");
}

const PROVIDER_ONLY: &str = r#"
extensionProviders:
- name: otel
  opentelemetry:
    service: COLLECTOR_IP
    port: 4318
    http: {}
"#;

/// Istio's precedence, as its documents write it: tracing on for the mesh (the root
/// namespace: the agents' default `--root-namespace`, nodemesh-system), off for the namespace `apps`, on again for the workload `client`;
/// access logging off for the namespace `quiet`.
const TELEMETRY: &str = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: nodemesh-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 100
---
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: no-tracing, namespace: apps}
spec:
  tracing:
  - disableSpanReporting: true
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: client-traced, namespace: apps}
spec:
  selector: {matchLabels: {app: client}}
  tracing:
  - disableSpanReporting: false
    customTags:
      team: {literal: {value: payments}}
      user: {header: {name: x-user, defaultValue: nobody}}
---
apiVersion: networking.istio.io/v1alpha3
kind: Telemetry
metadata: {name: no-access-log, namespace: quiet}
spec:
  accessLogging:
  - disabled: true
"#;

#[test]
fn telemetry_resources_turn_tracing_and_access_logging_on_and_off_with_istios_precedence() {
    let mut spec = ClusterSpec::two_nodes();
    spec.namespaces.push(("quiet".into(), true));
    spec.pods.push(PodSpec::new("q", "quiet", "a"));
    spec.services = vec![ServiceSpec::new("server", "apps", 80, 8080, &["server"])];
    spec.agent_args = vec![
        "--mesh-config".into(),
        mesh_config_file("precedence", &with_collector_ip(PROVIDER_ONLY)),
    ];
    let cluster = SimCluster::create(spec).unwrap();
    cluster.start_agents().unwrap();
    let collector = Collector::start(&cluster.node("a").netns, collector_addr(4318)).unwrap();
    let _server = cluster.http_serve("server", &[8080]).unwrap();
    cluster
        .write_manifest("vs.yaml", &virtual_service("server"))
        .unwrap();
    cluster
        .write_manifest("authz.yaml", &allow_get("server"))
        .unwrap();
    cluster.write_manifest("telemetry.yaml", TELEMETRY).unwrap();
    let vip = cluster.service("server").addr4();
    let send = |pod: &str, count: u64| {
        let count = count.to_string();
        let r = cluster
            .http(
                pod,
                vip,
                "server",
                "/",
                &["--count", &count, "-H", "x-user: alice"],
            )
            .unwrap();
        assert_eq!(
            (r.errors, r.statuses.get(&200).copied()),
            (0, count.parse().ok()),
            "{pod}: {r:?}"
        );
    };
    let of = |spans: &[CollectedSpan], service: &str, kind: &str| {
        spans
            .iter()
            .filter(|s| s.service == service && s.kind == kind)
            .count()
    };
    // In force once the client's requests leave spans (no trace context, 100 %).
    let ready = (0..50).any(|_| {
        send("client", 1);
        of(
            &collector.wait_for(Duration::from_secs(2), |s| {
                of(s, "client.apps", "CLIENT") > 0
            }),
            "client.apps",
            "CLIENT",
        ) > 0
    });
    assert!(ready, "the client's spans never arrived");
    std::thread::sleep(Duration::from_secs(1));
    collector.clear();
    let lines_before = cluster.request_logs("a").len();

    send("client", 20);
    send("q", 20);
    let spans = collector.wait_for(Duration::from_secs(5), |s| {
        of(s, "client.apps", "CLIENT") >= 20 && of(s, "q.quiet", "CLIENT") >= 20
    });
    std::thread::sleep(Duration::from_secs(1));
    let spans = [spans, collector.spans()].concat();
    let spans: Vec<CollectedSpan> = {
        let mut seen = std::collections::BTreeSet::new();
        spans
            .into_iter()
            .filter(|s| seen.insert(s.span_id.clone()))
            .collect()
    };
    // The workload's resource wins over its namespace's; the namespace's over the
    // mesh's (the server, in `apps`, records nothing); `quiet` keeps the mesh's.
    assert_eq!(of(&spans, "client.apps", "CLIENT"), 20, "{spans:#?}");
    assert_eq!(of(&spans, "server.apps", "SERVER"), 0, "{spans:#?}");
    assert_eq!(of(&spans, "q.quiet", "CLIENT"), 20, "{spans:#?}");
    let tagged = spans
        .iter()
        .find(|s| s.service == "client.apps")
        .map(|s| s.attributes.clone())
        .unwrap_or_default();
    assert_eq!(tagged.get("team").map(String::as_str), Some("payments"));
    assert_eq!(tagged.get("user").map(String::as_str), Some("alice"));
    let q_tags = spans
        .iter()
        .find(|s| s.service == "q.quiet")
        .map(|s| s.attributes.clone())
        .unwrap_or_default();
    assert_eq!(q_tags.get("team"), None, "the client's tags are its own");

    // Access logging: the client's requests are logged, quiet's are not.
    let logged = cluster.eventually(Duration::from_secs(5), || {
        let lines = cluster.request_logs("a");
        lines[lines_before.min(lines.len())..]
            .iter()
            .filter(|l| l["source_workload"] == "client")
            .count()
            >= 20
    });
    assert!(logged.is_some(), "the client's requests were not logged");
    let lines = cluster.request_logs("a");
    let from_quiet: Vec<_> = lines
        .iter()
        .filter(|l| l["source_workload_namespace"] == "quiet")
        .collect();
    assert!(from_quiet.is_empty(), "{from_quiet:#?}");

    // What Nodemesh does not implement is reported, not ignored: none here, and the
    // Telemetry kind is counted in the state.
    let status = cluster.admin("a", "/status").unwrap();
    assert_eq!(status["state"]["objects"]["Telemetry"], 4, "{status:#}");
}
