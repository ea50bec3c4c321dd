use super::*;

/// The seeds' canary, verbatim (v1alpha3), then the same at v1 with more fields.
const CANARY: &str = "apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews-route}
spec:
  hosts: [reviews.prod.svc.cluster.local]
  http:
  - route:
    - destination: {host: reviews.prod.svc.cluster.local, subset: v1}
      weight: 90
    - destination: {host: reviews.prod.svc.cluster.local, subset: v2}
      weight: 10
";

const FULL: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: apps}
spec:
  hosts: [web]
  gateways: [mesh, istio-system/public]
  http:
  - name: api
    match:
    - uri: {prefix: /api}
      method: {exact: GET}
      headers: {x-user: {regex: \"a.*\"}}
      queryParams: {debug: {exact: \"1\"}}
      port: 80
    route:
    - destination: {host: web-v2.apps, port: {number: 8080}}
      weight: 100
      headers: {response: {set: {x-v: \"2\"}}}
    rewrite: {uri: /v2/api, authority: api.local}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 200ms, retryOn: \"5xx,connect-failure\"}
    headers: {request: {add: {x-a: b}, remove: [x-drop]}}
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
  - redirect: {uri: /moved, redirectCode: 302}
  tcp:
  - match: [{port: 9000}]
    route:
    - destination: {host: db}
      weight: 80
    - destination: {host: db-next}
      weight: 20
";

fn parse(text: &str) -> VirtualService {
    serde_yaml::from_str(text).expect("parses")
}

#[test]
fn the_seeds_canary_parses_at_v1alpha3() {
    let vs = parse(CANARY);
    assert_eq!(vs.spec.hosts, ["reviews.prod.svc.cluster.local"]);
    let route = &vs.spec.http[0].route;
    assert_eq!(route.len(), 2);
    assert_eq!(route[0].destination.subset.as_deref(), Some("v1"));
    assert_eq!((route[0].weight, route[1].weight), (Some(90), Some(10)));
    assert!(vs.spec.binds_mesh());
    assert!(vs.spec.unimplemented().is_empty());
}

#[test]
fn every_implemented_field_parses_and_the_rest_is_reported() {
    let vs = parse(FULL);
    let http = &vs.spec.http[0];
    let m = &http.matches[0];
    assert_eq!(m.uri.as_ref().unwrap().prefix.as_deref(), Some("/api"));
    assert_eq!(m.method.as_ref().unwrap().exact.as_deref(), Some("GET"));
    assert_eq!(m.headers["x-user"].regex.as_deref(), Some("a.*"));
    assert_eq!(m.query_params["debug"].exact.as_deref(), Some("1"));
    assert_eq!(m.port, Some(80));
    let d = &http.route[0].destination;
    assert_eq!(
        (d.host.as_str(), d.port),
        ("web-v2.apps", Some(PortSelector { number: 8080 }))
    );
    assert_eq!(
        http.rewrite.as_ref().unwrap().authority.as_deref(),
        Some("api.local")
    );
    assert_eq!(http.timeout.as_deref(), Some("1.5s"));
    let retries = http.retries.as_ref().unwrap();
    assert_eq!(
        (retries.attempts, retries.retry_on.as_deref()),
        (3, Some("5xx,connect-failure"))
    );
    assert_eq!(
        http.headers
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .remove,
        ["x-drop"]
    );
    assert_eq!(
        vs.spec.http[1].redirect.as_ref().unwrap().redirect_code,
        Some(302)
    );
    assert_eq!(vs.spec.tcp[0].route[1].weight, Some(20));
    assert!(vs.spec.binds_mesh());
    assert!(
        vs.spec.unimplemented().is_empty(),
        "{:?}",
        vs.spec.unimplemented()
    );
}

#[test]
fn gateways_without_mesh_do_not_bind_the_node_proxy() {
    let mut vs = parse(FULL);
    vs.spec.gateways = Some(vec!["istio-system/public".into()]);
    assert!(!vs.spec.binds_mesh());
    vs.spec.gateways = Some(vec![]);
    assert!(vs.spec.binds_mesh());
}

#[test]
fn a_wrong_type_names_the_field() {
    let err = serde_yaml::from_str::<VirtualService>(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\n\
         spec: {http: [{route: [{destination: {host: a}, weight: heavy}]}]}\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");
}
