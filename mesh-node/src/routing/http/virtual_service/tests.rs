use http::request::Parts;

use super::*;
use crate::{discovery::files::parse_manifest, routing::http::routes::RouteTable};

const BASE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: apps}\n\
    spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: echo-v1, namespace: apps}\n\
    spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: echo-v2, namespace: apps}\n\
    spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
    metadata: {name: echo-a, namespace: apps, labels: {kubernetes.io/service-name: echo}}\n\
    addressType: IPv4\nports: [{name: http, port: 8080}]\n\
    endpoints: [{addresses: [10.0.0.5], conditions: {ready: true}}]\n---\n";

fn vs(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: apps}}\nspec:\n{spec}---\n"
    )
}

fn table(extra: &str) -> RouteTable {
    let state =
        ClusterState::from_objects(parse_manifest(&format!("{BASE}{extra}")).expect("yaml"));
    RouteTable::build(&state, &ObjectKey::new("apps", "echo"), 80, false)
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

/// The chosen rule's route index and backends, or None.
fn chosen(t: &RouteTable, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
    t.select(&request(method, uri, headers)).map(|(_, r)| {
        let backends: Vec<String> = r
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.backend.service.name, b.backend.weight))
            .collect();
        format!("{}={}", r.index, backends.join("+"))
    })
}

#[test]
fn routes_apply_in_order_and_the_first_match_wins() {
    let t = table(&vs(
        "echo",
        "  hosts: [echo.apps.svc.cluster.local]\n  http:\n\
         \x20 - match: [{uri: {prefix: /api}}]\n    route: [{destination: {host: echo-v2}}]\n\
         \x20 - match: [{uri: {exact: /api/v1}}]\n    route: [{destination: {host: echo-v1}}]\n\
         \x20 - match: [{uri: {regex: \"/r/[0-9]+\"}}, {method: {exact: POST}}]\n    route: [{destination: {host: echo-v1.apps}}]\n\
         \x20 - match: [{headers: {x-canary: {prefix: \"yes\"}}, queryParams: {v: {exact: \"2\"}}}]\n    route: [{destination: {host: echo-v2.apps.svc}}]\n\
         \x20 - match: [{method: {regex: \"PUT|PATCH\"}}]\n    route: [{destination: {host: echo-v2}}]\n\
         \x20 - route:\n    - {destination: {host: echo-v1}, weight: 90}\n    - {destination: {host: echo-v2}, weight: 10}\n",
    ));
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    // In order: the exact /api/v1 rule comes after the prefix /api and never wins.
    assert_eq!(chosen(&t, "GET", "/api/v1", &[]).unwrap(), "0=echo-v2:1");
    // A plain string prefix, as Istio's.
    assert_eq!(chosen(&t, "GET", "/apis", &[]).unwrap(), "0=echo-v2:1");
    assert_eq!(chosen(&t, "GET", "/r/12", &[]).unwrap(), "2=echo-v1:1");
    assert_eq!(
        chosen(&t, "GET", "/r/12/x", &[]).unwrap(),
        "5=echo-v1:90+echo-v2:10"
    );
    assert_eq!(chosen(&t, "POST", "/x", &[]).unwrap(), "2=echo-v1:1");
    assert_eq!(
        chosen(&t, "GET", "/x?v=2", &[("x-canary", "yes-please")]).unwrap(),
        "3=echo-v2:1"
    );
    assert_eq!(
        chosen(&t, "GET", "/x?v=3", &[("x-canary", "yes")]).unwrap(),
        "5=echo-v1:90+echo-v2:10"
    );
    assert_eq!(chosen(&t, "PATCH", "/x", &[]).unwrap(), "4=echo-v2:1");
    let rule = t.select(&request("GET", "/", &[])).unwrap().1.clone();
    assert_eq!(rule.source, RuleSource::VirtualService);
    assert_eq!(
        rule.frontend(&ObjectKey::new("apps", "echo")).name,
        "echo#vs5"
    );
}

#[test]
fn a_match_on_another_port_does_not_apply() {
    let t = table(&vs(
        "echo",
        "  hosts: [echo]\n  http:\n\
         \x20 - match: [{port: 8080}]\n    route: [{destination: {host: echo-v2}}]\n\
         \x20 - route: [{destination: {host: echo-v1}}]\n",
    ));
    assert_eq!(chosen(&t, "GET", "/", &[]).unwrap(), "1=echo-v1:1");
}

#[test]
fn actions_compile_into_the_same_filters_timeouts_and_retries() {
    let t = table(&vs(
        "echo",
        "  hosts: [echo]\n  http:\n\
         \x20 - match: [{uri: {prefix: /old}}]\n    redirect: {uri: /new, authority: example.com, redirectCode: 302}\n\
         \x20 - match: [{uri: {prefix: /api}}]\n    rewrite: {uri: /v2, authority: api.local}\n\
         \x20   headers: {request: {set: {x-a: b}, remove: [x-drop]}, response: {add: {x-r: \"1\"}}}\n\
         \x20   timeout: 1.5s\n    retries: {attempts: 3, perTryTimeout: 200ms, retryOn: \"gateway-error,connect-failure,429\"}\n\
         \x20   route: [{destination: {host: echo-v1, port: {number: 80}}, headers: {request: {set: {x-dest: v1}}}}]\n",
    ));
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let (m, rule) = t
        .select(&request("GET", "/old/x?q=1", &[("host", "echo")]))
        .unwrap();
    let mut parts = request("GET", "/old/x?q=1", &[("host", "echo")]);
    let action = rule.filters.apply_request(&mut parts, &m.path).unwrap();
    assert_eq!(
        action,
        crate::routing::http::filters::RequestAction::Redirect {
            status: StatusCode::FOUND,
            location: "http://example.com/new?q=1".into()
        }
    );

    let (m, rule) = t.select(&request("GET", "/api/users", &[])).unwrap();
    let mut parts = request("GET", "/api/users", &[("x-drop", "1")]);
    rule.filters.apply_request(&mut parts, &m.path).unwrap();
    assert_eq!(parts.uri.path(), "/v2/users");
    assert_eq!(parts.headers["host"], "api.local");
    assert_eq!(parts.headers["x-a"], "b");
    assert!(!parts.headers.contains_key("x-drop"));
    let mut backend_headers = http::HeaderMap::new();
    rule.backends[0]
        .filters
        .apply_backend_request(&mut backend_headers);
    assert_eq!(backend_headers["x-dest"], "v1");
    let mut response = http::HeaderMap::new();
    rule.filters.apply_response(&mut response);
    assert_eq!(response["x-r"], "1");
    assert_eq!(rule.request_timeout, Some(Duration::from_millis(1500)));
    assert_eq!(rule.backend_timeout, Some(Duration::from_millis(200)));
    let retry = rule.retry.as_ref().unwrap();
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.codes, [429, 502, 503, 504]);
}

#[test]
fn faults_and_mirrors_compile_onto_the_rule_and_a_bad_mirror_is_left_out() {
    let t = table(&vs(
        "faulty",
        "  hosts: [echo]\n  http:\n\
         \x20 - route: [{destination: {host: echo-v1}}]\n\
         \x20   fault: {delay: {fixedDelay: 1.5s, percentage: {value: 10}}, abort: {httpStatus: 418, percentage: {value: 0.5}}}\n\
         \x20   mirror: {host: echo-v2}\n    mirrorPercentage: {value: 25}\n\
         \x20   mirrors: [{destination: {host: nothere}}, {destination: {host: echo-v1}, percentage: {value: 5}}]\n",
    ));
    let rule = t.select(&request("GET", "/", &[])).unwrap().1.clone();
    assert!(rule.invalid.is_none(), "{:?}", rule.invalid);
    let fault = rule.fault.as_ref().unwrap();
    assert_eq!(
        fault.delay.as_ref().unwrap().fixed,
        Duration::from_millis(1500)
    );
    assert_eq!(fault.abort.as_ref().unwrap().status.as_u16(), 418);
    let mirrors: Vec<(String, f64)> = rule
        .mirrors
        .iter()
        .map(|m| (m.backend.service.name.clone(), m.share.percent()))
        .collect();
    assert_eq!(mirrors, [("echo-v2".into(), 25.0), ("echo-v1".into(), 5.0)]);
    assert!(
        t.errors
            .iter()
            .any(|e| e.contains("mirror nothere") && e.contains("does not exist")),
        "{:?}",
        t.errors
    );
    // A fault that cannot apply makes the route answer 500, as any broken action.
    let t = table(&vs(
        "faulty",
        "  hosts: [echo]\n  http:\n  - route: [{destination: {host: echo-v1}}]\n    fault: {abort: {httpStatus: 42, percentage: {value: 1}}}\n",
    ));
    let rule = t.select(&request("GET", "/", &[])).unwrap().1.clone();
    assert!(rule
        .invalid
        .as_deref()
        .is_some_and(|e| e.contains("not an HTTP status")));
}

#[test]
fn a_broken_virtual_service_is_reported_by_name_and_the_rest_works() {
    let t = table(&vs(
        "broken",
        "  hosts: [echo]\n  http:\n\
         \x20 - match: [{uri: {regex: \"(\"}}]\n    route: [{destination: {host: echo-v2}}]\n\
         \x20 - match: [{uri: {prefix: /slow}}]\n    timeout: soon\n    route: [{destination: {host: echo-v2}}]\n\
         \x20 - match: [{uri: {prefix: /retry}}]\n    retries: {attempts: 2, retryOn: \"5xx,sometimes\"}\n    route: [{destination: {host: echo-v2}}]\n\
         \x20 - match: [{uri: {prefix: /gone}}]\n    route: [{destination: {host: nothere}}, {destination: {host: www.example.com}}]\n\
         \x20 - match: [{uri: {prefix: /canary}}]\n    route: [{destination: {host: echo, subset: v2}}, {destination: {host: echo}}]\n\
         \x20 - route: [{destination: {host: echo-v1}}]\n    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}}\n",
    ));
    let errors = t.errors.join("\n");
    for want in [
        "VirtualService apps/broken http[0] match[0]: regular expression",
        "VirtualService apps/broken http[1]: timeout: ",
        "VirtualService apps/broken http[2]: retries.retryOn `sometimes` is not supported",
        "Service apps/nothere does not exist",
        "www.example.com is not a Service",
        "defines subset `v2`",
        "`http[5].fault.abort.grpcStatus` is not implemented",
    ] {
        assert!(errors.contains(want), "missing {want:?} in:\n{errors}");
    }
    let rule = |p: &str| t.select(&request("GET", p, &[])).unwrap().1.clone();
    // The bad regex never matches: that request falls through to the last route.
    assert_eq!(rule("/whatever").index, 5);
    assert!(rule("/slow").invalid.is_some());
    assert!(rule("/retry").invalid.is_some());
    assert!(rule("/gone").backends.iter().all(|b| b.invalid.is_some()));
    // A subset no DestinationRule defines fails closed: no endpoints (503), never the
    // whole Service.
    let canary = rule("/canary");
    assert_eq!(canary.backends[0].backend.subset.as_deref(), Some("v2"));
    assert!(canary.backends[0].backend.endpoints.is_empty());
    // (The same Service without a subset has its endpoints.)
    assert_eq!(canary.backends[1].backend.endpoints.len(), 1);
    assert!(canary.backends[0].invalid.is_none());
    assert!(rule("/").invalid.is_none());
}

#[test]
fn gateway_only_virtual_services_are_ignored_and_say_so() {
    let t = table(&vs(
        "edge",
        "  hosts: [echo]\n  gateways: [istio-system/public]\n  http:\n  - route: [{destination: {host: echo-v2}}]\n",
    ));
    assert!(t
        .select(&request("GET", "/", &[]))
        .unwrap()
        .1
        .route
        .is_none());
    assert!(
        t.errors[0].contains("bound only to gateways"),
        "{:?}",
        t.errors
    );
}

#[test]
fn an_httproute_on_the_same_port_wins_and_the_virtual_service_is_shown_overridden() {
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: a, namespace: apps}\n\
         spec:\n  parentRefs: [{kind: Service, name: echo}]\n  rules:\n  - backendRefs: [{name: echo-v1, port: 80}]\n---\n";
    let t = table(&format!(
        "{route}{}",
        vs(
            "echo",
            "  hosts: [echo]\n  http:\n  - route: [{destination: {host: echo-v2}}]\n"
        )
    ));
    assert_eq!(chosen(&t, "GET", "/", &[]).unwrap(), "0=echo-v1:1");
    assert_eq!(t.overridden, [ObjectKey::new("apps", "echo")]);
    assert!(t.errors[0].contains("HTTPRoute wins"), "{:?}", t.errors);
}

#[test]
fn tcp_routes_give_weighted_backends_for_their_port_and_subsets_no_endpoints() {
    let text = format!(
        "{BASE}{}",
        vs(
            "echo-tcp",
            "  hosts: [echo]\n  tcp:\n\
             \x20 - match: [{port: 9000}]\n    route: [{destination: {host: echo-v2}}]\n\
             \x20 - route:\n    - {destination: {host: echo-v1}, weight: 80}\n    - {destination: {host: echo-v2}, weight: 20}\n    - {destination: {host: echo, subset: v3}, weight: 5}\n",
        )
    );
    let state = ClusterState::from_objects(parse_manifest(&text).unwrap());
    let (route, backends) = crate::routing::resolve::virtual_service_tcp(
        &state,
        &ObjectKey::new("apps", "echo"),
        80,
        false,
    )
    .unwrap();
    assert_eq!(route, ObjectKey::new("apps", "echo-tcp"));
    let got: Vec<(String, u32, Option<String>)> = backends
        .iter()
        .map(|b| (b.service.name.clone(), b.weight, b.subset.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("echo-v1".into(), 80, None),
            ("echo-v2".into(), 20, None),
            ("echo".into(), 5, Some("v3".into()))
        ]
    );
    assert!(backends[2].endpoints.is_empty());
    assert_eq!(
        crate::routing::resolve::backend(&state, ObjectKey::new("apps", "echo"), 80, 1, false)
            .endpoints
            .len(),
        1,
        "the Service itself has an endpoint"
    );
    assert!(crate::routing::resolve::virtual_service_tcp(
        &state,
        &ObjectKey::new("apps", "echo-v1"),
        80,
        false
    )
    .is_none());
}
