use super::*;
use crate::discovery::files::parse_manifest;

fn service(name: &str, ip: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: apps{annotations}}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n"
    )
}

fn slice(service: &str, endpoints: &[(&str, Option<bool>)]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(ip, ready)| match ready {
            Some(r) => format!("{{addresses: [{ip}], conditions: {{ready: {r}}}}}"),
            None => format!("{{addresses: [{ip}]}}"),
        })
        .collect();
    format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-x, namespace: apps, \
             labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{}]\n---\n",
            eps.join(", ")
        )
}

const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: split, namespace: apps}\n\
        spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - backendRefs:\n    \
        - {name: web-v1, port: 80, weight: 90}\n    - {name: web-v2, port: 80, weight: 10}\n";

fn state(yaml: &str) -> ClusterState {
    ClusterState::from_objects(parse_manifest(yaml).expect("valid yaml"))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn a_route_splits_a_service_into_weighted_backends() {
    let yaml = [
        service("web", "10.96.0.10", ""),
        service("web-v1", "10.96.0.11", ""),
        service(
            "web-v2",
            "10.96.0.12",
            ", annotations: {nodemesh.io/load-balancing: least-connections}",
        ),
        slice("web-v1", &[("10.1.0.2", None), ("10.1.0.3", Some(false))]),
        slice("web-v2", &[("10.2.0.2", Some(true))]),
        ROUTE.to_string(),
    ]
    .concat();
    let s = state(&yaml);
    let Resolution::Service {
        service,
        route,
        backends,
        ..
    } = resolve(&s, addr("10.96.0.10:80"), &[])
    else {
        panic!("not a service");
    };
    assert_eq!(service, ObjectKey::new("apps", "web"));
    assert_eq!(route, Some(ObjectKey::new("apps", "split")));
    assert_eq!(backends.len(), 2);
    assert_eq!((backends[0].weight, backends[1].weight), (90, 10));
    assert_eq!(
        backends[0].endpoints,
        vec![addr("10.1.0.2:8080")],
        "unready endpoint left out"
    );
    assert!(!backends[0].least_connections() && backends[1].least_connections());
    // The backends themselves, addressed directly, resolve to their own endpoints.
    let Resolution::Service {
        route, backends, ..
    } = resolve(&s, addr("10.96.0.12:80"), &[])
    else {
        panic!("not a service");
    };
    assert_eq!(route, None);
    assert_eq!(backends[0].endpoints, vec![addr("10.2.0.2:8080")]);
}

fn pod(name: &str, ip: &str, version: &str) -> String {
    format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: apps, labels: {{app: web, version: {version}}}}}\n\
             spec: {{nodeName: b, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
        )
}

const SUBSETS: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\n\
        metadata: {name: web, namespace: apps}\nspec:\n  host: web.apps.svc.cluster.local\n  \
        trafficPolicy: {loadBalancer: {simple: RANDOM}}\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  \
        - name: v2\n    labels: {version: v2}\n    trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}\n";

#[test]
fn subsets_select_endpoints_by_pod_labels_and_unknown_ones_fail_closed() {
    let base = [
        service("web", "10.96.0.10", ""),
        pod("web-1", "10.1.0.2", "v1"),
        pod("web-2", "10.1.0.3", "v2"),
        pod("web-3", "10.1.0.4", "v2"),
        // 10.1.0.9 is no pod's: in no subset.
        slice(
            "web",
            &[
                ("10.1.0.2", None),
                ("10.1.0.3", None),
                ("10.1.0.4", Some(false)),
                ("10.1.0.9", None),
            ],
        ),
    ]
    .concat();
    let web = || ObjectKey::new("apps", "web");
    // Without a DestinationRule: a subset fails closed and says why.
    let s = state(&base);
    let b = subset_backend(&s, web(), 80, 1, false, Some("v1"));
    assert!(b.endpoints.is_empty());
    assert!(b
        .subset_error
        .as_deref()
        .unwrap()
        .contains("no DestinationRule"));
    let all = subset_backend(&s, web(), 80, 1, false, None);
    assert_eq!(all.endpoints.len(), 3);

    let s = state(&format!("{base}{SUBSETS}"));
    let v1 = subset_backend(&s, web(), 80, 1, false, Some("v1"));
    assert_eq!(v1.endpoints, vec![addr("10.1.0.2:8080")]);
    assert_eq!(v1.policy.load_balancer, LbPolicy::Random);
    let v2 = subset_backend(&s, web(), 80, 1, false, Some("v2"));
    assert_eq!(
        v2.endpoints,
        vec![addr("10.1.0.3:8080")],
        "unready left out"
    );
    assert_eq!(v2.policy.load_balancer, LbPolicy::LeastRequest);
    assert_eq!(v2.subset.as_deref(), Some("v2"));
    let v3 = subset_backend(&s, web(), 80, 1, false, Some("v3"));
    assert!(v3.endpoints.is_empty() && !v3.is_eligible());
    assert!(v3
        .subset_error
        .as_deref()
        .unwrap()
        .contains("apps/web has no subset `v3`"));
    // The whole Service follows the rule's policy too.
    let Resolution::Service { backends, .. } = resolve(&s, addr("10.96.0.10:80"), &[]) else {
        panic!("not a service");
    };
    assert_eq!(backends[0].policy.load_balancer, LbPolicy::Random);
    assert_eq!(backends[0].endpoints.len(), 3);
    // The routing table keeps each (port, family, subset) once per snapshot.
    let table = crate::routing::table::RoutingTable::new(Arc::new(Vec::new()), None);
    let a = table.backend(&s, &web(), 80, Some("v2"), false);
    let b = table.backend(&s, &web(), 80, Some("v2"), false);
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(*a, v2);
    assert!(table
        .backend(&s, &web(), 80, Some("v3"), false)
        .endpoints
        .is_empty());
}

#[test]
fn pod_ips_unknown_vips_and_ports_are_told_apart() {
    let s = state(
        &[
            service("web", "10.96.0.10", ""),
            slice("web", &[("10.1.0.2", None)]),
        ]
        .concat(),
    );
    let cidrs = ["10.96.0.0/16".parse::<IpCidr>().unwrap()];
    assert_eq!(
        resolve(&s, addr("10.1.0.2:8080"), &cidrs),
        Resolution::Direct
    );
    assert_eq!(
        resolve(&s, addr("93.184.216.34:443"), &cidrs),
        Resolution::Direct
    );
    assert_eq!(
        resolve(&s, addr("10.96.9.9:80"), &cidrs),
        Resolution::UnknownService
    );
    assert_eq!(resolve(&s, addr("10.96.9.9:80"), &[]), Resolution::Direct);
    assert!(matches!(
        resolve(&s, addr("10.96.0.10:81"), &cidrs),
        Resolution::UnknownPort { .. }
    ));
    assert!(matches!(
        resolve(&s, addr("[::ffff:10.96.0.10]:80"), &cidrs),
        Resolution::Service { .. }
    ));
}

#[test]
fn cidrs_parse_and_match() {
    let c: IpCidr = "10.96.0.0/12".parse().unwrap();
    assert!(c.contains("10.96.0.1".parse().unwrap()));
    assert!(c.contains("10.111.255.255".parse().unwrap()));
    assert!(!c.contains("10.112.0.0".parse().unwrap()));
    assert!(!c.contains("fd00::1".parse().unwrap()));
    let v6: IpCidr = "fd00:96::/108".parse().unwrap();
    assert!(v6.contains("fd00:96::a".parse().unwrap()));
    assert!("10.0.0.0/33".parse::<IpCidr>().is_err());
    assert!("nonsense".parse::<IpCidr>().is_err());
    let all: IpCidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains("1.2.3.4".parse().unwrap()));
}
