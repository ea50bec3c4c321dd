//! The `kube` source against the API server's wire behaviour, played by
//! [`FakeApiServer`]: a CRD deleted while watched, an API server restart with and
//! without its watch cache (a silent re-watch; 410 Gone as a watch event), an expired
//! list continuation (HTTP 410), TCPRoute served under v1, v1alpha2 or both, and
//! Istio's DestinationRule and VirtualService at whichever of their versions the
//! installed CRDs serve, a broken rule among them reported by name.
//! Each scenario checks readiness, the staleness the metrics export, and the state.

use std::{
    collections::BTreeSet,
    future::Future,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    discovery::apiserver::fake_apiserver::gr, discovery::apiserver::fake_apiserver::FakeApiServer,
    discovery::apiserver::fake_apiserver::Gr, discovery::apiserver::fake_apiserver::NotFoundBody,
    discovery::apiserver::test_agent::eventually, discovery::apiserver::test_agent::start,
    discovery::apiserver::test_agent::versions_read, discovery::apiserver::test_agent::Agent,
    discovery::apiserver::test_agent::PROMPTLY, discovery::apiserver::tests::OBJECTS,
    discovery::apiserver::STALE_AFTER, discovery::cluster::ClusterState, discovery::cluster::Kind,
};

const GATEWAY: &str = "gateway.networking.k8s.io";
const SECURITY: &str = "security.nodemesh.io";
const ISTIO: &str = "networking.istio.io";
/// Recovery goal after the API server answers again.
const RECOVERY_GOAL: Duration = Duration::from_secs(5);

fn tcproutes() -> Gr {
    gr(GATEWAY, "tcproutes")
}

/// The collection an object of the test manifests belongs to.
fn collection(object: &Value) -> Gr {
    match object["kind"].as_str().unwrap_or("") {
        "Namespace" => gr("", "namespaces"),
        "Pod" => gr("", "pods"),
        "Service" => gr("", "services"),
        "EndpointSlice" => gr("discovery.k8s.io", "endpointslices"),
        "TCPRoute" => tcproutes(),
        "HTTPRoute" => gr(GATEWAY, "httproutes"),
        "AuthorizationPolicy" => gr(SECURITY, "authorizationpolicies"),
        "VirtualService" => gr(ISTIO, "virtualservices"),
        "DestinationRule" => gr(ISTIO, "destinationrules"),
        other => panic!("no collection for {other}"),
    }
}

fn manifest_objects() -> Vec<Value> {
    serde_yaml::Deserializer::from_str(OBJECTS)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// An API server with every CRD installed (TCPRoute at `tcp_versions`) and the test
/// objects in it.
async fn cluster(tcp_versions: &[&str]) -> FakeApiServer {
    let server = FakeApiServer::start().await;
    server.serve_crd(GATEWAY, "httproutes", "HTTPRoute", &["v1", "v1beta1"]);
    server.serve_crd(GATEWAY, "tcproutes", "TCPRoute", tcp_versions);
    server.serve_crd(
        SECURITY,
        "authorizationpolicies",
        "AuthorizationPolicy",
        &["v1alpha1"],
    );
    // Istio's CRD, as an older Istio serves it (v1beta1 and v1alpha3, no v1).
    server.serve_crd(
        "networking.istio.io",
        "virtualservices",
        "VirtualService",
        &["v1beta1", "v1alpha3"],
    );
    for o in manifest_objects() {
        server.apply(&collection(&o), o);
    }
    server
}

impl Agent {
    /// Readiness's discovery part, as `/healthz/ready` computes it.
    fn readiness(&self) -> Option<String> {
        crate::admin::state::discovery_unready_reason(&self.health)
    }

    /// Whether readiness would still hold after the stale limit has passed: no kind
    /// is failing now.
    fn stays_ready(&self) -> bool {
        self.health
            .unready_reason(Instant::now() + STALE_AFTER * 2)
            .is_none()
    }

    /// `nodemesh_discovery_stale_seconds` of each kind (what the agent exports).
    fn stale_seconds(&self) -> Vec<(Kind, f64)> {
        self.health.staleness(Instant::now())
    }

    fn failing_kinds(&self) -> Vec<Kind> {
        self.stale_seconds()
            .into_iter()
            .filter(|(_, s)| *s > 0.0)
            .map(|(k, _)| k)
            .collect()
    }

    /// `nodemesh_state_updates_total`: snapshots published.
    fn updates(&self) -> u64 {
        self.metrics.state_updates.get()
    }

    fn errors(&self, kind: Kind) -> u64 {
        self.metrics
            .discovery_errors
            .with_label_values(&[kind.name()])
            .get()
    }
}

/// (kind, namespace/name) of every object in the state.
fn keys(s: &ClusterState) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut add = |kind: &str, k: String| {
        out.insert(format!("{kind} {k}"));
    };
    s.namespaces
        .keys()
        .for_each(|k| add("Namespace", k.to_string()));
    s.pods.keys().for_each(|k| add("Pod", k.to_string()));
    s.services
        .keys()
        .for_each(|k| add("Service", k.to_string()));
    s.endpoint_slices
        .keys()
        .for_each(|k| add("EndpointSlice", k.to_string()));
    s.http_routes
        .keys()
        .for_each(|k| add("HTTPRoute", k.to_string()));
    s.tcp_routes
        .keys()
        .for_each(|k| add("TCPRoute", k.to_string()));
    s.authorization_policies
        .keys()
        .for_each(|k| add("AuthorizationPolicy", k.to_string()));
    s.virtual_services
        .keys()
        .for_each(|k| add("VirtualService", k.to_string()));
    s.destination_rules
        .keys()
        .for_each(|k| add("DestinationRule", k.to_string()));
    out
}

fn expected_keys(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or("");
            let name = o["metadata"]["name"].as_str().unwrap_or("");
            let key = if ns.is_empty() {
                name.to_string()
            } else {
                format!("{ns}/{name}")
            };
            format!("{} {key}", o["kind"].as_str().unwrap_or(""))
        })
        .collect()
}

async fn synced(agent: &Agent, objects: &[Value]) {
    let want = expected_keys(objects);
    eventually("the first full sync", PROMPTLY, || {
        agent.health.every_kind_synced() && keys(&agent.state()) == want
    })
    .await;
    assert_eq!(keys(&agent.state()).len(), objects.len());
    assert_eq!(agent.readiness(), None);
    assert!(agent.stays_ready());
}

/// Runs `scenario` with a fresh API server per `NotFoundBody`.
async fn each_not_found_body<F, Fut>(scenario: F)
where
    F: Fn(NotFoundBody) -> Fut,
    Fut: Future<Output = ()>,
{
    for body in [NotFoundBody::Status, NotFoundBody::PlainText] {
        scenario(body).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_deleted_while_watched_counts_as_empty_and_the_agent_stays_ready() {
    each_not_found_body(|body| async move {
        let server = cluster(&["v1alpha2"]).await;
        server.set_not_found_body(body);
        let agent = start(&server);
        synced(&agent, &manifest_objects()).await;
        assert_eq!(agent.state().tcp_routes.len(), 1);

        server.delete_crd(GATEWAY, "tcproutes");
        eventually("the TCPRoutes to go with their CRD", PROMPTLY, || {
            agent.state().tcp_routes.is_empty()
        })
        .await;
        // The watch is refused with 404 from now on; the kind must count as empty and
        // healthy, not as a failing watch that makes the agent unready after 60 s.
        // (Healthy before the 404 is seen too: wait for the verdict itself.)
        eventually(
            &format!("TCPRoute to count as not installed ({body:?} 404)"),
            PROMPTLY,
            || {
                agent.health.snapshot()[&Kind::TcpRoute]
                    .not_installed
                    .is_some()
                    && agent.stays_ready()
            },
        )
        .await;
        let health = agent.health.snapshot();
        let tcp = &health[&Kind::TcpRoute];
        assert!(tcp.synced);
        assert!(tcp.not_installed.is_some(), "{tcp:?}");
        assert_eq!(tcp.version, None);
        assert_eq!(agent.readiness(), None);
        assert!(
            agent.failing_kinds().is_empty(),
            "{:?}",
            agent.stale_seconds()
        );
        // Everything else is untouched.
        assert_eq!(agent.state().pods.len(), 1);
        assert_eq!(agent.state().authorization_policies.len(), 1);

        // The CRD comes back with a route: it is watched again.
        server.serve_crd(GATEWAY, "tcproutes", "TCPRoute", &["v1"]);
        let route = manifest_objects()
            .into_iter()
            .find(|o| o["kind"] == "TCPRoute")
            .unwrap();
        server.apply(&tcproutes(), route);
        eventually(
            "the reinstalled CRD's route",
            Duration::from_secs(20),
            || agent.state().tcp_routes.len() == 1,
        )
        .await;
        assert!(agent.stays_ready());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_that_discovery_does_not_confirm_deletes_nothing() {
    let server = cluster(&["v1"]).await;
    let agent = start(&server);
    synced(&agent, &manifest_objects()).await;
    // The watch and the list are refused, discovery still lists TCPRoute.
    server.stop_serving(GATEWAY, "tcproutes");
    eventually("TCPRoute to report its failure", PROMPTLY, || {
        agent.failing_kinds() == vec![Kind::TcpRoute]
    })
    .await;
    assert_eq!(
        agent.state().tcp_routes.len(),
        1,
        "the last good state serves"
    );
    assert!(agent.errors(Kind::TcpRoute) > 0);
    assert!(
        !agent.stays_ready(),
        "a failure that lasts makes the agent unready"
    );
    // Discovery catches up: the CRD is gone after all.
    server.delete_crd(GATEWAY, "tcproutes");
    eventually("TCPRoute to count as not installed", PROMPTLY, || {
        agent.state().tcp_routes.is_empty() && agent.stays_ready()
    })
    .await;
}

/// Stops the API server until every kind reports failing, keeps it down for
/// `outage`, restarts it, and returns how long after the restart every kind was
/// healthy again.
async fn outage(server: &FakeApiServer, agent: &Agent, outage: Duration, forget: bool) -> Duration {
    server.stop();
    eventually("every kind to notice the outage", PROMPTLY, || {
        agent.failing_kinds().len() == Kind::ALL.len()
    })
    .await;
    tokio::time::sleep(outage).await;
    assert!(
        agent.readiness().is_none(),
        "a short outage is not stale yet"
    );
    if forget {
        server.forget_watch_cache();
    }
    server.restart().await;
    let back = Instant::now();
    eventually(
        "every kind healthy after the API server came back",
        Duration::from_secs(60),
        || agent.failing_kinds().is_empty(),
    )
    .await;
    back.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_rewatch_after_an_api_server_restart_is_healthy_within_5s() {
    let server = cluster(&["v1alpha2"]).await;
    let agent = start(&server);
    synced(&agent, &manifest_objects()).await;
    let before = keys(&agent.state());
    let updates_before = agent.updates();
    let lists_before = server
        .requests()
        .iter()
        .filter(|r| !r.contains("watch=true") && r.contains('?'))
        .count();

    // The API server restarts with its watch cache: every re-watch succeeds and has
    // nothing to report.
    let recovered = outage(&server, &agent, Duration::from_secs(6), false).await;
    println!("silent re-watch: every kind healthy {recovered:?} after the API server came back");
    assert!(
        recovered < RECOVERY_GOAL,
        "recovered after {recovered:?} (goal {RECOVERY_GOAL:?})"
    );
    assert!(agent.stays_ready(), "{:?}", agent.health.snapshot());
    assert_eq!(keys(&agent.state()), before);
    let lists_after = server
        .requests()
        .iter()
        .filter(|r| !r.contains("watch=true") && r.contains('?'))
        .count();
    assert_eq!(
        lists_after, lists_before,
        "resumed from the resourceVersion, no relist"
    );
    assert_eq!(
        agent.updates(),
        updates_before,
        "nothing changed, nothing published"
    );
    for kind in Kind::ALL {
        assert!(
            agent.errors(kind) > 0,
            "{} counted its failed watch",
            kind.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_the_watch_cache_relists_after_410_within_5s() {
    let server = cluster(&["v1alpha2"]).await;
    let agent = start(&server);
    let mut objects = manifest_objects();
    synced(&agent, &objects).await;
    let updates_before = agent.updates();

    server.stop();
    eventually("every kind to notice the outage", PROMPTLY, || {
        agent.failing_kinds().len() == Kind::ALL.len()
    })
    .await;
    // Changes while the agent cannot watch: the pod goes, a Service arrives.
    server.delete(&gr("", "pods"), "apps", "web");
    objects.retain(|o| o["kind"] != "Pod");
    let db: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "apps"},
        "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 5432}]},
    });
    server.apply(&gr("", "services"), db.clone());
    objects.push(db);
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.forget_watch_cache();
    server.restart().await;
    let back = Instant::now();
    let want = expected_keys(&objects);
    eventually("the relisted state", Duration::from_secs(60), || {
        keys(&agent.state()) == want && agent.failing_kinds().is_empty()
    })
    .await;
    let recovered = back.elapsed();
    println!(
        "410 relist: every kind healthy and relisted {recovered:?} after the API server came back"
    );
    assert!(
        recovered < RECOVERY_GOAL,
        "recovered after {recovered:?} (goal {RECOVERY_GOAL:?})"
    );
    assert!(agent.stays_ready());
    assert!(agent.state().pods.is_empty());
    assert_eq!(agent.state().services.len(), 2);
    assert!(
        agent.updates() > updates_before,
        "the relisted state was published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_list_continuation_restarts_the_list() {
    let server = cluster(&["v1alpha2"]).await;
    let mut objects = manifest_objects();
    for i in 0..5 {
        let svc: Value = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "apps"},
            "spec": {"clusterIP": format!("10.96.1.{i}"), "ports": [{"port": 80}]},
        });
        server.apply(&gr("", "services"), svc.clone());
        objects.push(svc);
    }
    // Pages of 2: the Services take three pages.
    server.set_page_size(2);
    let agent = start(&server);
    synced(&agent, &objects).await;

    // Relist (watch cache gone), and the relist's continuation expires once.
    server.forget_watch_cache();
    server.expire_next_continue();
    server.delete(&gr("", "services"), "apps", "svc-0");
    objects.retain(|o| o["metadata"]["name"] != "svc-0");
    server.close_watches();
    let want = expected_keys(&objects);
    eventually("the relisted state", PROMPTLY, || {
        keys(&agent.state()) == want
    })
    .await;
    eventually("every kind healthy", PROMPTLY, || {
        agent.failing_kinds().is_empty()
    })
    .await;
    assert!(agent.stays_ready());
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("/api/v1/services?") && r.contains("continue=")),
        "the list was paginated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcproute_is_watched_at_the_version_the_api_server_serves() {
    for (served, chosen) in [
        (&["v1"][..], "v1"),
        (&["v1alpha2"][..], "v1alpha2"),
        (&["v1", "v1alpha2"][..], "v1"),
    ] {
        let server = cluster(served).await;
        let agent = start(&server);
        synced(&agent, &manifest_objects()).await;
        assert_eq!(
            agent.state().tcp_routes.len(),
            1,
            "TCPRoute served at {served:?}"
        );
        assert_eq!(
            versions_read(&server, GATEWAY, "tcproutes"),
            BTreeSet::from([chosen.to_string()]),
            "TCPRoute served at {served:?}: {:#?}",
            server.requests()
        );
        assert_eq!(
            agent.health.snapshot()[&Kind::TcpRoute].version,
            Some(chosen)
        );
        println!(
            "served {served:?}: discovery requests {:?}",
            server.discovery_requests()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_that_stops_serving_the_watched_version_is_followed_to_the_new_one() {
    let server = cluster(&["v1alpha2"]).await;
    let agent = start(&server);
    synced(&agent, &manifest_objects()).await;
    // An upgrade of the Gateway API CRDs: TCPRoute is served as v1 only.
    server.serve_crd(GATEWAY, "tcproutes", "TCPRoute", &["v1"]);
    eventually("the TCPRoute watch to move to v1", PROMPTLY, || {
        versions_read(&server, GATEWAY, "tcproutes").contains("v1")
    })
    .await;
    eventually("every kind healthy", PROMPTLY, || {
        agent.failing_kinds().is_empty()
    })
    .await;
    assert_eq!(agent.state().tcp_routes.len(), 1);
    assert!(agent.stays_ready());
    assert_eq!(agent.health.snapshot()[&Kind::TcpRoute].version, Some("v1"));
}

/// A DestinationRule as Istio's docs write one (subsets and a traffic policy), at
/// `api_version`.
fn destination_rule(name: &str, api_version: &str, policy: &str) -> Value {
    let yaml = format!(
        "apiVersion: networking.istio.io/{api_version}\nkind: DestinationRule\n\
         metadata: {{name: {name}, namespace: apps, resourceVersion: \"1\"}}\n\
         spec:\n  host: web.apps.svc.cluster.local\n  trafficPolicy: {policy}\n  subsets:\n\
         \x20 - name: v1\n    labels: {{version: v1}}\n\
         \x20 - name: v2\n    labels: {{version: v2}}\n"
    );
    serde_yaml::from_str(&yaml).unwrap()
}

const GOOD_POLICY: &str = "{loadBalancer: {simple: LEAST_REQUEST}, outlierDetection: {consecutive5xxErrors: 7, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 10}, connectionPool: {http: {http1MaxPendingRequests: 100, maxRequestsPerConnection: 10}}}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_rules_are_read_at_the_version_the_installed_crds_serve() {
    // Istio >= 1.22 serves v1 (and the older two); Istio 1.2x before it, v1beta1 and
    // v1alpha3; a very old install, v1alpha3 only. The objects come back at the
    // version read, whatever version they were written at.
    for (served, chosen) in [
        (&["v1", "v1beta1", "v1alpha3"][..], "v1"),
        (&["v1beta1", "v1alpha3"][..], "v1beta1"),
        (&["v1alpha3"][..], "v1alpha3"),
    ] {
        let server = cluster(&["v1alpha2"]).await;
        server.serve_crd(ISTIO, "destinationrules", "DestinationRule", served);
        server.serve_crd(ISTIO, "virtualservices", "VirtualService", served);
        let rule = destination_rule("web", chosen, GOOD_POLICY);
        server.apply(&collection(&rule), rule.clone());
        let mut objects = manifest_objects();
        objects.push(rule);
        let agent = start(&server);
        synced(&agent, &objects).await;

        let state = agent.state();
        let key = crate::keys::ObjectKey::new("apps", "web");
        let compiled = &state.compiled_rules[&key];
        assert!(
            compiled.problems.is_empty() && compiled.is_valid(),
            "served {served:?}: {:?}",
            compiled.problems
        );
        assert_eq!(compiled.service, Some(key.clone()));
        let subsets: Vec<&str> = compiled.subsets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(subsets, ["v1", "v2"]);
        // The policy as written, read back through the API server.
        let policy = compiled
            .endpoint_policy(80, Some("v1"))
            .expect("a policy for port 80");
        assert_eq!(
            policy.load_balancer,
            crate::discovery::traffic_policy::LbPolicy::LeastRequest
        );
        let od = policy.outlier_detection.expect("outlier detection");
        assert_eq!(od.consecutive_5xx, 7);
        assert_eq!(od.base_ejection_time, Duration::from_secs(30));
        let pool = policy.connection_pool.expect("a connection pool");
        assert_eq!(pool.max_pending_requests, Some(100));
        assert_eq!(pool.max_requests_per_connection, Some(10));
        assert_eq!(state.virtual_services.len(), 1);

        for (kind, plural) in [
            (Kind::DestinationRule, "destinationrules"),
            (Kind::VirtualService, "virtualservices"),
        ] {
            assert_eq!(
                versions_read(&server, ISTIO, plural),
                BTreeSet::from([chosen.to_string()]),
                "{plural} served at {served:?}"
            );
            assert_eq!(agent.health.snapshot()[&kind].version, Some(chosen));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_destination_rule_from_the_api_server_is_reported_by_name_and_the_rest_applies() {
    let server = cluster(&["v1alpha2"]).await;
    server.serve_crd(
        ISTIO,
        "destinationrules",
        "DestinationRule",
        &["v1", "v1beta1", "v1alpha3"],
    );
    // The same host: the older rule (by name, at equal age) wins, so the broken one
    // gets its own Service.
    let good = destination_rule("web", "v1", GOOD_POLICY);
    let mut broken = destination_rule(
        "web-broken",
        "v1",
        "{loadBalancer: {simple: FASTEST}, outlierDetection: {interval: 10parsecs}}",
    );
    broken["spec"]["host"] = "db".into();
    for o in [&good, &broken] {
        server.apply(&collection(o), o.clone());
    }
    let mut objects = manifest_objects();
    objects.extend([good.clone(), broken.clone()]);
    let agent = start(&server);
    synced(&agent, &objects).await;

    let state = agent.state();
    let broken_key = crate::keys::ObjectKey::new("apps", "web-broken");
    let problems = &state.compiled_rules[&broken_key].problems;
    let fields: BTreeSet<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert!(
        fields.contains("trafficPolicy.loadBalancer.simple")
            && fields.contains("trafficPolicy.outlierDetection.interval"),
        "{problems:#?}"
    );
    assert!(
        problems.iter().any(|p| p.detail.contains("FASTEST")),
        "{problems:#?}"
    );
    // The good rule is untouched by its broken neighbour.
    let good_key = crate::keys::ObjectKey::new("apps", "web");
    assert!(state.compiled_rules[&good_key].problems.is_empty());
    // Discovery reports each problem once, by name, and counts it.
    let counted = |reason: &str| {
        agent
            .metrics
            .config_problems
            .with_label_values(&["DestinationRule", reason])
            .get()
    };
    assert_eq!((counted("unknown_value"), counted("bad_duration")), (1, 1));

    // Fixed through the API server: a watch event, and the problems are gone.
    let mut fixed = broken.clone();
    fixed["spec"]["trafficPolicy"] = serde_json::json!({"loadBalancer": {"simple": "RANDOM"}});
    fixed["metadata"]["resourceVersion"] = "2".into();
    server.apply(&collection(&fixed), fixed);
    eventually("the fixed rule to apply", PROMPTLY, || {
        agent
            .state()
            .compiled_rules
            .get(&broken_key)
            .is_some_and(|r| r.problems.is_empty())
    })
    .await;
    // Snapshots published since did not count the old problems again.
    assert_eq!((counted("unknown_value"), counted("bad_duration")), (1, 1));
    // Deleted: its Service falls back to no rule; the good one stays.
    server.delete(&collection(&good), "apps", "web-broken");
    eventually("the deleted rule to go", PROMPTLY, || {
        !agent.state().compiled_rules.contains_key(&broken_key)
    })
    .await;
    assert!(agent.state().compiled_rules.contains_key(&good_key));
    assert_eq!(agent.readiness(), None);
}
