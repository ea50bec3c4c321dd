use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use super::*;
use crate::{
    discovery::files::parse_manifest,
    identity::Identity,
    routing::balancer::{Outcome, OutcomeObserver},
    routing::http::routes::RouteTable,
    routing::resolve::{lookup, IpCidr},
    routing::table::Router,
};

/// Two namespaces (`apps` enrolled, `plain` not), a meshed server pod, a plain pod,
/// and Services: `web` (split 90/10 by a TCPRoute into `web-v1` and `web-v2`), `empty`
/// (no ready endpoint), `zero` (a TCPRoute whose only backend weighs 0), `echo` (an
/// HTTPRoute, HTTP/2 declared).
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: apps, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: apps}
spec: {nodeName: b, serviceAccountName: server, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: apps}
spec: {nodeName: b, serviceAccountName: other, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: plain}
spec: {nodeName: b, containers: [{name: c, image: x}]}
status: {podIP: 10.2.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec: {clusterIP: 10.96.0.10, ports: [{name: tcp, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: apps}
spec: {clusterIP: 10.96.0.11, ports: [{name: tcp, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v1-a, namespace: apps, labels: {kubernetes.io/service-name: web-v1}}
addressType: IPv4
ports: [{name: tcp, port: 8080}]
endpoints: [{addresses: [10.1.0.2]}, {addresses: [10.1.0.9], conditions: {ready: false}}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: apps}
spec: {clusterIP: 10.96.0.12, ports: [{name: tcp, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v2-a, namespace: apps, labels: {kubernetes.io/service-name: web-v2}}
addressType: IPv4
ports: [{name: tcp, port: 8080}]
endpoints: [{addresses: [10.2.0.2]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: split, namespace: apps}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: apps}
spec: {clusterIP: 10.96.0.20, ports: [{name: tcp, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: empty-a, namespace: apps, labels: {kubernetes.io/service-name: empty}}
addressType: IPv4
ports: [{name: tcp, port: 8080}]
endpoints: [{addresses: [10.1.0.3], conditions: {ready: true, terminating: true}}]
---
apiVersion: v1
kind: Service
metadata: {name: zero, namespace: apps}
spec: {clusterIP: 10.96.0.21, ports: [{name: tcp, port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: off, namespace: apps}
spec:
  parentRefs: [{kind: Service, name: zero}]
  rules:
  - backendRefs: [{name: web-v1, port: 80, weight: 0}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: apps}
spec: {clusterIP: 10.96.0.30, ports: [{name: http, port: 80, targetPort: 8080, appProtocol: kubernetes.io/h2c}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-a, namespace: apps, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.3]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: apps}
spec:
  parentRefs: [{kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /none}}]
    backendRefs: [{name: web-v1, port: 80, weight: 0}]
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: nothere, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /empty}}]
    backendRefs: [{name: empty, port: 80}]
"#;

const TRUST_DOMAIN: &str = "cluster.local";

fn state() -> Arc<ClusterState> {
    Arc::new(ClusterState::from_objects(
        parse_manifest(CLUSTER).expect("valid yaml"),
    ))
}

fn cidrs() -> Arc<Vec<IpCidr>> {
    Arc::new(vec!["10.96.0.0/16".parse().expect("a CIDR")])
}

fn table(trust_domain: Option<&str>) -> RoutingTable {
    RoutingTable::new(cidrs(), trust_domain.map(String::from))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("an address")
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("apps", name)
}

thread_local! {
    /// The client of [`plan`]'s connections: one per test (each runs on its thread).
    static CLIENT: ClientSplits = ClientSplits::new();
}

fn plan(state: &ClusterState, balancer: &Balancer, dst: &str) -> Plan {
    CLIENT.with(|client| {
        connection(
            &table(Some(TRUST_DOMAIN)),
            state,
            balancer,
            client,
            addr(dst),
        )
    })
}

fn refusal(plan: &Plan) -> Option<(Option<String>, &'static str)> {
    match plan {
        Plan::Refused { frontend, refusal } => {
            Some((frontend.as_ref().map(|f| f.to_string()), refusal.as_str()))
        }
        _ => None,
    }
}

#[test]
fn refusal_names_are_the_metric_reasons() {
    let names: Vec<&str> = Refusal::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        names,
        [
            "unknown_service",
            "unknown_service_port",
            "no_ready_endpoint"
        ]
    );
}

#[test]
fn every_refusal_kind() {
    let s = state();
    let b = Balancer::new();
    assert_eq!(
        refusal(&plan(&s, &b, "10.96.9.9:80")),
        Some((None, "unknown_service")),
        "a service address no Service has"
    );
    assert_eq!(
        refusal(&plan(&s, &b, "10.96.0.10:81")),
        Some((Some("apps/web:81".into()), "unknown_service_port"))
    );
    assert_eq!(
        refusal(&plan(&s, &b, "10.96.0.20:80")),
        Some((Some("apps/empty:80".into()), "no_ready_endpoint")),
        "a terminating endpoint takes no new connection"
    );
    assert_eq!(
        refusal(&plan(&s, &b, "10.96.0.21:80")),
        Some((Some("apps/zero:80".into()), "no_ready_endpoint")),
        "a backend of weight 0 takes nothing"
    );
    // Outside the service ranges an unknown address is just an address.
    let no_ranges = RoutingTable::new(Arc::new(Vec::new()), None);
    assert!(matches!(
        connection(
            &no_ranges,
            &s,
            &b,
            &ClientSplits::new(),
            addr("10.96.9.9:80")
        ),
        Plan::Forward(Forward { service: None, .. })
    ));
    // Trace sees the same refusals, before any pick.
    assert!(matches!(
        route(&table(None), &s, addr("10.96.0.20:80")),
        Route::Refused {
            refusal: Refusal::NoReadyEndpoint,
            ..
        }
    ));
    assert!(b.picks().is_empty(), "a refusal picks nothing");
}

#[test]
fn a_tcproute_splits_connections_by_weight_to_ready_endpoints() {
    let s = state();
    let b = Balancer::new();
    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..100 {
        let Plan::Forward(to) = plan(&s, &b, "10.96.0.10:80") else {
            panic!("not forwarded");
        };
        let service = to.service.as_ref().expect("a Service");
        assert_eq!(service.frontend.to_string(), "apps/web:80");
        assert_eq!(service.route, Some(key("split")));
        let backend = to.backend().expect("picked").name.clone();
        let expected = if backend == "web-v1" {
            // The unready 10.1.0.9 is never chosen; the server pod is meshed.
            assert_eq!(to.endpoint.addr, addr("10.1.0.2:8080"));
            assert_eq!(to.endpoint.pod(), Some(&key("server")));
            Transport::Hbone {
                identity: Identity::new(TRUST_DOMAIN, "apps", "server"),
            }
        } else {
            assert_eq!(to.endpoint.addr, addr("10.2.0.2:8080"));
            Transport::Plain
        };
        assert_eq!(to.endpoint.transport(), &expected);
        *by_backend.entry(backend).or_default() += 1;
    }
    assert_eq!(by_backend["web-v1"], 90);
    assert_eq!(by_backend["web-v2"], 10);
}

#[test]
fn an_http_routed_port_goes_to_the_l7_proxy_and_each_request_is_planned() {
    let s = state();
    let b = Balancer::new();
    let c = ClientSplits::new();
    let Plan::Http(service) = plan(&s, &b, "10.96.0.30:80") else {
        panic!("not HTTP-routed");
    };
    assert_eq!(service.frontend.to_string(), "apps/echo:80");
    assert_eq!(service.http.map(|h| h.backend_http2), Some(true));
    assert!(b.picks().is_empty(), "the connection itself picks nothing");

    let t = table(Some(TRUST_DOMAIN));
    let rules = RouteTable::build(&s, &key("echo"), 80, false);
    let rule = |path: &str| {
        let parts = http::Request::builder()
            .uri(path)
            .body(())
            .expect("a request")
            .into_parts()
            .0;
        rules.select(&parts).expect("a rule").1.clone()
    };
    let v1 = rule("/v1");
    let planned = request(&t, &s, &b, &c, &key("echo"), 80, &v1).expect("planned");
    assert_eq!(planned.target.backend.service, key("web-v1"));
    assert_eq!(planned.endpoint.addr, addr("10.1.0.2:8080"));
    assert!(matches!(
        planned.endpoint.transport(),
        Transport::Hbone { identity } if identity.service_account == "server"
    ));
    drop(planned);

    let none = rule("/none");
    assert!(matches!(
        request(&t, &s, &b, &c, &key("echo"), 80, &none),
        Err(RequestRefusal::NoWeightedBackend)
    ));
    let missing = rule("/missing");
    match request(&t, &s, &b, &c, &key("echo"), 80, &missing) {
        Err(RequestRefusal::InvalidBackend { target, reason }) => {
            assert_eq!(target.backend.service, key("nothere"));
            assert!(reason.contains("does not exist"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let empty = rule("/empty");
    match request(&t, &s, &b, &c, &key("echo"), 80, &empty) {
        Err(RequestRefusal::NoReadyEndpoint { target }) => {
            assert_eq!(target.backend.service, key("empty"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_pod_address_goes_to_the_pod_over_its_transport() {
    let s = state();
    let b = Balancer::new();
    let Plan::Forward(to) = plan(&s, &b, "10.1.0.2:8080") else {
        panic!("not forwarded");
    };
    assert!(to.service.is_none() && to.pick.is_none());
    assert_eq!(to.endpoint.addr, addr("10.1.0.2:8080"));
    assert_eq!(to.endpoint.pod(), Some(&key("server")));
    assert_eq!(
        to.endpoint.transport(),
        &Transport::Hbone {
            identity: Identity::new(TRUST_DOMAIN, "apps", "server")
        }
    );
    // A pod of a namespace outside the mesh: plain TCP, but still known as a pod.
    let Plan::Forward(to) = plan(&s, &b, "10.2.0.2:9090") else {
        panic!("not forwarded");
    };
    assert_eq!(to.endpoint.pod(), Some(&ObjectKey::new("plain", "legacy")));
    assert_eq!(to.endpoint.transport(), &Transport::Plain);
    // The same address written as IPv4-mapped IPv6 is the same pod.
    let Plan::Forward(to) = plan(&s, &b, "[::ffff:10.1.0.2]:8080") else {
        panic!("not forwarded");
    };
    assert_eq!(to.endpoint.pod(), Some(&key("server")));
}

#[test]
fn an_address_outside_the_cluster_goes_there_in_plain_tcp() {
    let s = state();
    let b = Balancer::new();
    let Plan::Forward(to) = plan(&s, &b, "93.184.216.34:443") else {
        panic!("not forwarded");
    };
    assert!(to.service.is_none() && to.pick.is_none() && to.endpoint.pod().is_none());
    assert_eq!(to.endpoint.addr, addr("93.184.216.34:443"));
    assert_eq!(to.endpoint.transport(), &Transport::Plain);
}

#[test]
fn hbone_only_to_enrolled_pods_and_only_with_a_ca() {
    let s = state();
    let meshed = addr("10.1.0.2:8080");
    let with_ca = table(Some(TRUST_DOMAIN));
    assert_eq!(
        with_ca.endpoint(&s, meshed).transport,
        Transport::Hbone {
            identity: Identity::new(TRUST_DOMAIN, "apps", "server")
        }
    );
    assert_eq!(
        with_ca.endpoint(&s, addr("10.2.0.2:80")).transport,
        Transport::Plain,
        "not enrolled"
    );
    // Without a CA there is no mutual TLS at all.
    let without = table(None);
    assert_eq!(without.endpoint(&s, meshed).transport, Transport::Plain);
    assert_eq!(
        without.endpoint(&s, meshed).pod,
        Some(key("server")),
        "still known as a pod"
    );
}

#[test]
fn the_table_answers_as_the_raw_objects_do_and_lives_as_long_as_its_snapshot() {
    let s = state();
    let t = table(None);
    for dst in [
        "10.96.0.10:80",
        "10.96.0.10:81",
        "10.96.9.9:80",
        "10.1.0.2:8080",
        "10.96.0.20:80",
        "10.96.0.30:80",
        "[::ffff:10.96.0.10]:80",
    ] {
        let cached = t.lookup(&s, addr(dst));
        assert_eq!(cached, lookup(&s, addr(dst), &cidrs()), "{dst}");
        assert_eq!(cached, t.lookup(&s, addr(dst)), "{dst}: kept");
    }
    let Lookup::Service(first) = t.lookup(&s, addr("10.96.0.10:80")) else {
        panic!("a Service");
    };
    let Lookup::Service(again) = t.lookup(&s, addr("10.96.0.10:80")) else {
        panic!("a Service");
    };
    assert!(Arc::ptr_eq(&first, &again), "built once per snapshot");

    let router = Router::new(cidrs(), None);
    let a = router.table(&s);
    assert!(Arc::ptr_eq(&a, &router.table(&s)));
    let next = Arc::new((*s).clone());
    assert!(
        !Arc::ptr_eq(&a, &router.table(&next)),
        "a new snapshot, a new table"
    );
}

/// Records every outcome.
#[derive(Default)]
struct Recorder(Mutex<Vec<(ObjectKey, SocketAddr, Outcome)>>);

impl OutcomeObserver for Recorder {
    fn observe(&self, backend: &ObjectKey, endpoint: SocketAddr, outcome: Outcome) {
        self.0
            .lock()
            .expect("not poisoned")
            .push((backend.clone(), endpoint, outcome));
    }
}

#[test]
fn a_connections_pick_reports_its_outcome_to_the_observer() {
    let s = state();
    let recorder = Arc::new(Recorder::default());
    let b = Balancer::with_observer(recorder.clone());
    let Plan::Forward(to) = plan(&s, &b, "10.96.0.10:80") else {
        panic!("not forwarded");
    };
    let pick = to.pick.expect("picked");
    let endpoint = pick.endpoint;
    pick.report(Outcome::ConnectFailed);
    drop(pick);
    let seen = recorder.0.lock().expect("not poisoned").clone();
    assert_eq!(seen, [(key("web-v1"), endpoint, Outcome::ConnectFailed)]);
}
