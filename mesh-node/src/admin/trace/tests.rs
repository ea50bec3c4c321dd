use std::path::PathBuf;

use crate::admin::trace::*;
use crate::discovery::files::parse_manifest;
use crate::telemetry::outcome::RefusalReason;

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
metadata: {name: client, namespace: apps, labels: {app: client}}
spec: {nodeName: a, serviceAccountName: client, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: apps, labels: {app: intruder}}
spec: {nodeName: a, serviceAccountName: intruder, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: bystander, namespace: plain}
spec: {nodeName: a, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: apps, labels: {app: server}}
spec: {nodeName: b, serviceAccountName: server, containers: [{name: c, image: x}]}
status: {podIP: 10.2.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: plain}
spec: {nodeName: b, containers: [{name: c, image: x}]}
status: {podIP: 10.2.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec: {clusterIP: 10.96.0.10, ports: [{name: tcp, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: apps, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: tcp, port: 8080}]
endpoints: [{addresses: [10.2.0.2]}]
---
apiVersion: security.nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-intruder, namespace: apps}
spec: {action: DENY, rules: [{from: [{principals: ["spiffe://cluster.local/ns/apps/sa/intruder"]}]}]}
"#;

pub(super) struct Maps;

impl DataplaneView for Maps {
    fn enrolled_policy(&self, _: u64) -> Option<OutboundPolicy> {
        Some(OutboundPolicy::default())
    }
    fn inbound_policy(&self, _: Ip) -> Option<InboundPolicy> {
        Some(InboundPolicy::default())
    }
    fn program(&self, attach: &str) -> Option<ProgramStatus> {
        Some(ProgramStatus {
            name: "mesh_connect4",
            attach: if attach == "cgroup/connect4" {
                "cgroup/connect4"
            } else {
                "cgroup/connect6"
            },
            program_id: 41,
            link_id: 7,
            pin: PathBuf::new(),
        })
    }
}

fn workload(name: &str, ns: &str, enrolled: bool, cookie: u64) -> WorkloadStatus {
    WorkloadStatus {
        pod: PodKey::new(ns, name),
        uid: String::new(),
        ips: Vec::new(),
        service_account: name.into(),
        enrolled,
        reason: (!enrolled).then(|| "namespace_not_enrolled".into()),
        netns: None,
        netns_cookie: enrolled.then_some(cookie),
        listeners: Vec::new(),
        held: false,
    }
}

fn run(state: &ClusterState, from: (&str, &str), to: &str) -> Trace {
    run_with(state, from, to, None, None, &Maps)
}

/// A trace from `from` on node a, with the request `http` and the authenticator `jwt`.
pub(super) fn run_with(
    state: &ClusterState,
    from: (&str, &str),
    to: &str,
    http: Option<HttpAttributes>,
    jwt: Option<&crate::identity::jwt::JwtAuthenticator>,
    maps: &dyn DataplaneView,
) -> Trace {
    let workloads = [
        workload("client", "apps", true, 1),
        workload("intruder", "apps", true, 2),
        workload("bystander", "plain", false, 0),
    ];
    let cidrs = ["10.96.0.0/16".parse().unwrap()];
    let picks = PickCounts::new();
    let inputs = TraceInputs {
        state,
        node: "a",
        workloads: &workloads,
        dataplane: maps,
        service_cidrs: &cidrs,
        trust_domain: Some("cluster.local"),
        picks: &picks,
        jwt,
        balancer: None,
    };
    trace(&inputs, &PodKey::new(from.0, from.1), to, http).unwrap()
}

pub(super) fn state(extra: &str) -> ClusterState {
    ClusterState::from_objects(parse_manifest(&format!("{CLUSTER}{extra}")).unwrap())
}

#[test]
fn an_allowed_mtls_connection_through_a_service() {
    let t = run(&state(""), ("apps", "client"), "web:80");
    assert_eq!(t.named_service, Some(ObjectKey::new("apps", "web")));
    assert!(t.redirect.redirected, "{:?}", t.redirect);
    assert_eq!(t.redirect.program, "cgroup/connect4");
    assert_eq!(t.redirect.program_id, Some(41));
    assert_eq!(t.candidates.len(), 1);
    let c = &t.candidates[0];
    assert_eq!(c.endpoint, "10.2.0.2:8080".parse().unwrap());
    assert_eq!(c.transport, Transport::HboneMtls);
    assert_eq!(
        c.presented_identity.as_deref(),
        Some("spiffe://cluster.local/ns/apps/sa/client")
    );
    assert_eq!(
        c.expected_identity.as_deref(),
        Some("spiffe://cluster.local/ns/apps/sa/server")
    );
    assert_eq!(c.inbound.mode, Some("PERMISSIVE"));
    assert_eq!(t.outcome, Outcome::Allow);
}

#[test]
fn a_denied_identity_names_the_policy() {
    let t = run(&state(""), ("apps", "intruder"), "10.2.0.2:8080");
    assert!(matches!(t.resolution, Some(Resolution::Direct)));
    assert_eq!(t.outcome, Outcome::Deny);
    assert_eq!(
        t.candidates[0].inbound.admission,
        Some(Admission::Refuse {
            reason: RefusalReason::PolicyDenied,
            policy: Some("apps/deny-intruder".into()),
            detail: "a DENY rule matched".into()
        })
    );
}

#[test]
fn non_enrolled_pods_are_not_redirected_and_meet_no_policy() {
    let t = run(&state(""), ("plain", "bystander"), "10.2.0.3:9090");
    assert!(!t.redirect.redirected);
    assert!(t.redirect.reason.contains("namespace_not_enrolled"));
    let c = &t.candidates[0];
    assert_eq!(c.transport, Transport::Plaintext);
    assert!(!c.inbound.handled_by_mesh);
    assert_eq!(t.outcome, Outcome::Allow);
}

#[test]
fn plaintext_to_an_enrolled_pod_follows_the_namespace_mode() {
    let t = run(&state(""), ("plain", "bystander"), "10.2.0.2:8080");
    let c = &t.candidates[0];
    assert_eq!(c.transport, Transport::Plaintext);
    assert_eq!(c.inbound.listener, Some(INBOUND_PLAINTEXT_PORT));
    assert_eq!(c.inbound.mode, Some("PERMISSIVE"));
    assert_eq!(t.outcome, Outcome::Allow);

    let strict = state("").clone();
    let mut strict = strict;
    strict.apply(
        parse_manifest(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {nodemesh.io/mesh: enabled, nodemesh.io/mtls: strict}}\n",
        )
        .unwrap()
        .remove(0),
    );
    let t = run(&strict, ("plain", "bystander"), "10.2.0.2:8080");
    assert_eq!(t.outcome, Outcome::Deny);
    assert_eq!(t.candidates[0].inbound.mode, Some("STRICT"));
    assert!(t.summary.contains("STRICT"), "{}", t.summary);
    // mTLS from an enrolled client is still fine in STRICT mode.
    assert_eq!(
        run(&strict, ("apps", "client"), "web.apps.svc.cluster.local:80").outcome,
        Outcome::Allow
    );
}

#[test]
fn the_inbound_mode_is_the_ports_and_names_what_decided_it() {
    let strict_but_9090 = "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: server, namespace: apps}\n\
        spec: {selector: {matchLabels: {app: server}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: DISABLE}}}\n";
    let s = state(strict_but_9090);
    let t = run(&s, ("plain", "bystander"), "10.2.0.2:8080");
    assert_eq!(t.outcome, Outcome::Deny);
    let inbound = &t.candidates[0].inbound;
    assert_eq!(inbound.mode, Some("STRICT"));
    assert_eq!(
        inbound.mode_source.as_deref(),
        Some("PeerAuthentication apps/server (workload)")
    );
    let t = run(&s, ("plain", "bystander"), "10.2.0.2:9090");
    assert_eq!(t.outcome, Outcome::Allow, "{}", t.summary);
    let inbound = &t.candidates[0].inbound;
    assert_eq!(inbound.mode, Some("DISABLE"));
    assert_eq!(
        inbound.mode_source.as_deref(),
        Some("PeerAuthentication apps/server (portLevelMtls 9090)")
    );
    // Over HBONE the mode is shown too, and mutual TLS is admitted whatever it is.
    let t = run(&s, ("apps", "client"), "web.apps.svc.cluster.local:80");
    assert_eq!(t.outcome, Outcome::Allow);
    assert_eq!(t.candidates[0].inbound.mode, Some("STRICT"));
}

#[test]
fn refusals_before_any_endpoint_and_bad_input() {
    let s = state("");
    let t = run(&s, ("apps", "client"), "10.96.9.9:80");
    assert_eq!(t.outcome, Outcome::Refused);
    assert!(t.summary.contains("unknown_service"));
    assert_eq!(
        run(&s, ("apps", "client"), "web:81").outcome,
        Outcome::Refused
    );
    let picks = PickCounts::new();
    let inputs = TraceInputs {
        state: &s,
        node: "a",
        workloads: &[],
        dataplane: &Maps,
        service_cidrs: &[],
        jwt: None,
        balancer: None,
        trust_domain: None,
        picks: &picks,
    };
    assert_eq!(
        trace(&inputs, &PodKey::new("apps", "nobody"), "web:80", None).unwrap_err(),
        TraceError::UnknownPod(PodKey::new("apps", "nobody"))
    );
    for bad in ["web", "web:http", "missing:80", "web.apps.cluster:80"] {
        assert!(
            matches!(
                trace(&inputs, &PodKey::new("apps", "client"), bad, None),
                Err(TraceError::BadDestination(_))
            ),
            "{bad}"
        );
    }
    // Without a CA the same path is plaintext, checked by the captured 15006.
    let t = trace(
        &inputs,
        &PodKey::new("apps", "server"),
        "10.2.0.3:9090",
        None,
    )
    .unwrap();
    assert!(t.notes.iter().any(|n| n.contains("runs on node b")));
    assert_eq!(t.candidates[0].transport, Transport::Plaintext);
}

const HTTP_ROUTED: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: web-b, namespace: apps}
spec: {clusterIP: 10.96.0.11, ports: [{name: tcp, port: 80, targetPort: 9090}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b-v4, namespace: apps, labels: {kubernetes.io/service-name: web-b}}
addressType: IPv4
ports: [{name: tcp, port: 9090}]
endpoints: [{addresses: [10.2.0.3]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-http, namespace: apps}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /b}}]
    backendRefs: [{name: web-b, port: 80}]
  - backendRefs: [{name: web, port: 80}]
"#;

#[test]
fn http_routed_services_use_the_l7_table_and_a_request_selects_the_rule() {
    let s = state(HTTP_ROUTED);
    let t = run(&s, ("apps", "client"), "web:80");
    assert_eq!(t.http_routes.len(), 1);
    assert_eq!(t.http_routes[0].rules[0].matches, vec!["PathPrefix /b"]);
    let all: Vec<String> = t
        .candidates
        .iter()
        .map(|c| c.endpoint.to_string())
        .collect();
    assert_eq!(all.len(), 2, "every rule's backends: {all:?}");
    let workloads = [workload("client", "apps", true, 1)];
    let picks = PickCounts::new();
    let inputs = TraceInputs {
        state: &s,
        node: "a",
        workloads: &workloads,
        dataplane: &Maps,
        service_cidrs: &[],
        trust_domain: Some("cluster.local"),
        picks: &picks,
        jwt: None,
        balancer: None,
    };
    let request = HttpAttributes {
        method: Some("GET".into()),
        path: Some("/b/x".into()),
        headers: Vec::new(),
    };
    let t = trace(
        &inputs,
        &PodKey::new("apps", "client"),
        "web:80",
        Some(request),
    )
    .unwrap();
    let picked: Vec<String> = t
        .candidates
        .iter()
        .map(|c| c.endpoint.to_string())
        .collect();
    assert_eq!(picked, ["10.2.0.3:9090"]);
    assert!(
        t.notes
            .iter()
            .any(|n| n.contains("selects rule apps/web-http#0")),
        "{:?}",
        t.notes
    );
}

#[test]
fn the_nodes_own_sockets_reach_a_pod_directly_but_not_through_a_service() {
    let host = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: kubelet-like, namespace: plain}
spec: {nodeName: b, hostNetwork: true, containers: [{name: c, image: x}]}
status: {podIP: 192.168.0.2}
"#;
    let s = state(host);
    let direct = run(&s, ("plain", "kubelet-like"), "10.2.0.2:8080");
    let c = &direct.candidates[0];
    assert!(!c.inbound.handled_by_mesh, "{:?}", c.inbound);
    assert!(
        c.inbound.note.contains("node's own socket"),
        "{}",
        c.inbound.note
    );
    // Through a Service address (DNATed on the way) it is outside traffic to the pod.
    let via_service = run(&s, ("plain", "kubelet-like"), "web.apps:80");
    let c = &via_service.candidates[0];
    assert!(c.inbound.handled_by_mesh, "{:?}", c.inbound);
    assert_eq!(c.inbound.listener, Some(INBOUND_PLAINTEXT_PORT));
}

/// `shop` has three v1 pods and one v2 pod; a DestinationRule hashes v1's requests
/// on header x-user and a VirtualService sends every request to subset v1.
const HASHED: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: apps}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop-v4, namespace: apps, labels: {kubernetes.io/service-name: shop}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.2.0.11], conditions: {ready: true}}
- {addresses: [10.2.0.12], conditions: {ready: true}}
- {addresses: [10.2.0.13], conditions: {ready: true}}
- {addresses: [10.2.0.14], conditions: {ready: true}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: apps}
spec:
  hosts: [shop]
  http: [{route: [{destination: {host: shop, subset: v1}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shop, namespace: apps}
spec:
  host: shop
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: x-user}}
      outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s}
  - name: v2
    labels: {version: v2}
"#;

fn shop_pod(n: u8, version: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: shop-{n}, namespace: apps, labels: {{version: {version}}}}}\n\
         spec: {{nodeName: b, serviceAccountName: shop, containers: [{{name: c, image: x}}]}}\n\
         status: {{podIP: 10.2.0.{n}}}\n"
    )
}

fn hashed_state() -> ClusterState {
    let pods: String = [(11, "v1"), (12, "v1"), (13, "v1"), (14, "v2")]
        .iter()
        .map(|(n, v)| shop_pod(*n, v))
        .collect();
    state(&format!("{pods}{HASHED}"))
}

fn trace_user(s: &ClusterState, balancer: &Balancer, user: Option<&str>) -> Trace {
    let workloads = [workload("client", "apps", true, 1)];
    let picks = PickCounts::new();
    let inputs = TraceInputs {
        state: s,
        node: "a",
        workloads: &workloads,
        dataplane: &Maps,
        service_cidrs: &[],
        trust_domain: Some("cluster.local"),
        picks: &picks,
        jwt: None,
        balancer: Some(balancer),
    };
    let request = HttpAttributes {
        method: Some("GET".into()),
        path: Some("/".into()),
        headers: user
            .map(|u| vec![("x-user".to_string(), u.to_string())])
            .unwrap_or_default(),
    };
    trace(
        &inputs,
        &PodKey::new("apps", "client"),
        "shop:80",
        Some(request),
    )
    .unwrap()
}

/// Where the data path sends a request of `user` (the proxy's own plan).
fn routed(s: &ClusterState, balancer: &Balancer, user: &str) -> std::net::SocketAddr {
    use crate::routing::{hash_key::KeyedRequest, splits::ClientSplits};
    let service = ObjectKey::new("apps", "shop");
    let rules = RouteTable::build(s, &service, 80, false);
    let parts = http::Request::builder()
        .uri("/")
        .header("x-user", user)
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let (_, rule) = rules.select(&parts).unwrap();
    let table = RoutingTable::new(Arc::new(Vec::new()), None);
    let keys = KeyedRequest {
        parts: &parts,
        src: "10.1.0.2:40000".parse().unwrap(),
        source_ip: "10.1.0.2".parse().unwrap(),
    };
    let client = ClientSplits::default();
    crate::routing::plan::request_keyed(
        &table,
        s,
        balancer,
        &client,
        &service,
        80,
        rule,
        Some(&keys),
    )
    .unwrap()
    .endpoint
    .addr
}

#[test]
fn a_trace_shows_the_subset_and_where_a_hash_key_lands_as_the_proxy_routes_it() {
    let s = hashed_state();
    let balancer = Balancer::default();
    let t = trace_user(&s, &balancer, None);
    // Subset v1 only, with its policy.
    let eps: Vec<String> = t
        .candidates
        .iter()
        .map(|c| c.endpoint.to_string())
        .collect();
    assert_eq!(eps, ["10.2.0.11:8080", "10.2.0.12:8080", "10.2.0.13:8080"]);
    assert!(t
        .candidates
        .iter()
        .all(|c| c.subset.as_deref() == Some("v1")));
    assert_eq!(t.backends.len(), 1);
    assert_eq!(t.backends[0].subset.as_deref(), Some("v1"));
    assert!(t.backends[0].policy.outlier_detection.is_some());
    // No header: the trace says the key is each request's own.
    assert_eq!(t.hashes.len(), 1);
    assert_eq!(t.hashes[0].hash, None);
    assert!(t.hashes[0].note.contains("header x-user"), "{:?}", t.hashes);
    // With a header: the endpoint the proxy's own plan picks, for every user.
    let mut seen = std::collections::BTreeSet::new();
    for user in (0..40).map(|i| format!("user-{i}")) {
        let t = trace_user(&s, &balancer, Some(&user));
        let predicted = t.hashes[0].endpoint.expect("a ready endpoint");
        assert_eq!(predicted, routed(&s, &balancer, &user), "{user}");
        seen.insert(predicted);
    }
    assert_eq!(
        seen.len(),
        3,
        "40 keys spread over the 3 endpoints: {seen:?}"
    );
    // Outlier detection ejects user-0's endpoint (3 x 500): the trace moves the key to
    // the endpoint the proxy now sends it to, and the backend shows the ejection.
    let before = trace_user(&s, &balancer, Some("user-0")).hashes[0]
        .endpoint
        .unwrap();
    let t = trace_user(&s, &balancer, Some("user-0"));
    let v1 = &t.backends[0];
    for _ in 0..3 {
        let pick = balancer
            .pick_endpoint_hashed(v1, Some(t.hashes[0].hash.unwrap()))
            .unwrap();
        assert_eq!(pick.endpoint, before);
        pick.report(crate::routing::balancer::Outcome::Http {
            status: 500,
            latency: std::time::Duration::from_millis(1),
        });
    }
    let after = trace_user(&s, &balancer, Some("user-0"));
    let moved = after.hashes[0].endpoint.unwrap();
    assert_ne!(moved, before, "the ejected endpoint is skipped");
    assert_eq!(moved, routed(&s, &balancer, "user-0"));
    let outliers = balancer.outliers(&v1.service, v1.port);
    assert!(
        outliers.iter().any(|o| o.endpoint == before && o.ejected),
        "{outliers:?}"
    );
}
