use super::*;
use crate::discovery::{cluster::KubeObject, files::parse_manifest};

fn rule(yaml: &str) -> CompiledRule {
    let objects = parse_manifest(yaml).expect("valid yaml");
    let Some(KubeObject::DestinationRule(dr)) = objects.into_iter().next() else {
        panic!("not a DestinationRule");
    };
    let key = ObjectKey::new(dr.metadata.namespace.as_deref().unwrap_or("default"), "r");
    compile(&key, &dr)
}

/// The issue's example, verbatim but for the namespace.
const SEED: &str = r#"
apiVersion: networking.istio.io/VERSION
kind: DestinationRule
metadata: {name: my-service-circuit-breaker, namespace: prod}
spec:
  host: my-service
  trafficPolicy:
    connectionPool:
      http: {http1MaxPendingRequests: 100, maxRequestsPerConnection: 10}
    outlierDetection: {consecutive5xxErrors: 7, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 10}
    loadBalancer: {simple: LEAST_CONN}
"#;

#[test]
fn every_api_version_parses_to_the_same_rule() {
    let mut seen = Vec::new();
    for v in ["v1", "v1beta1", "v1alpha3"] {
        let r = rule(&SEED.replace("VERSION", v));
        assert!(r.is_valid(), "{v}: {:?}", r.problems);
        seen.push(r);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]));
    let r = &seen[0];
    assert_eq!(r.service, Some(ObjectKey::new("prod", "my-service")));
    let p = r.endpoint_policy(80, None).unwrap();
    assert_eq!(p.load_balancer, LbPolicy::LeastRequest);
    let od = p.outlier_detection.unwrap();
    assert_eq!(od.consecutive_5xx, 7);
    assert_eq!(od.interval, Duration::from_secs(10));
    assert_eq!(od.base_ejection_time, Duration::from_secs(30));
    assert_eq!(od.max_ejection_percent, 10);
    // The connection pool is applied (circuit breaking).
    assert_eq!(r.problems, vec![]);
    let pool = p.connection_pool.unwrap();
    assert_eq!(pool.max_pending_requests, Some(100));
    assert_eq!(pool.max_requests_per_connection, Some(10));
    assert_eq!(pool.max_connections, None);
}

#[test]
fn policy_durations_are_istio_durations_of_at_least_a_millisecond() {
    let ms = Duration::from_millis;
    assert_eq!(policy_duration("500ms"), Ok(ms(500)));
    assert_eq!(policy_duration("1m30s"), Ok(ms(90_000)));
    assert_eq!(policy_duration("1.5s"), Ok(ms(1_500)));
    assert_eq!(policy_duration("1ms"), Ok(ms(1)));
    assert!(policy_duration("0s")
        .unwrap_err()
        .contains("shorter than 1ms"));
    assert!(policy_duration("999us")
        .unwrap_err()
        .contains("shorter than 1ms"));
    assert!(policy_duration("10").is_err());
    assert!(policy_duration("-1.5s").is_err());
}

#[test]
fn hosts_name_services_in_every_form() {
    let web = Ok(ObjectKey::new("apps", "web"));
    assert_eq!(service_of_host("web", "apps"), web);
    assert_eq!(service_of_host("web.apps", "other"), web);
    assert_eq!(service_of_host("web.apps.svc", "other"), web);
    assert_eq!(service_of_host("web.apps.svc.cluster.local", "other"), web);
    for bad in [
        "",
        "*.apps.svc.cluster.local",
        "web.apps.svc.example.com",
        "example.com.foo.bar",
        "Web",
        "web..svc",
    ] {
        assert!(service_of_host(bad, "apps").is_err(), "{bad}");
    }
}

const BROKEN: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: broken, namespace: apps}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {simple: FASTEST}
    outlierDetection: {interval: 10 seconds}
"#;

#[test]
fn a_bad_duration_or_an_unknown_enum_rejects_the_rule_with_reasons() {
    let r = rule(BROKEN);
    assert!(!r.is_valid());
    let reasons: Vec<(&str, ProblemReason)> = r
        .problems
        .iter()
        .map(|p| (p.field.as_str(), p.reason))
        .collect();
    assert_eq!(
        reasons,
        [
            (
                "trafficPolicy.loadBalancer.simple",
                ProblemReason::UnknownValue
            ),
            (
                "trafficPolicy.outlierDetection.interval",
                ProblemReason::BadDuration
            ),
        ]
    );
    assert!(r.problems[0].detail.contains("FASTEST"));
}

const LAYERED: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: apps}
spec:
  host: reviews.apps.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    outlierDetection: {consecutiveGatewayErrors: 3, baseEjectionTime: 1.5s}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: LEAST_REQUEST}
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN, consistentHash: {httpHeaderName: x-user}}
  exportTo: ["*"]
"#;

#[test]
fn subsets_and_ports_override_the_rule_field_by_field() {
    let r = rule(LAYERED);
    assert!(r.is_valid(), "{:?}", r.problems);
    let lb = |port, subset| r.endpoint_policy(port, subset).unwrap().load_balancer;
    assert_eq!(lb(80, None), LbPolicy::Random);
    assert_eq!(lb(9080, None), LbPolicy::LeastRequest);
    assert_eq!(lb(9080, Some("v1")), LbPolicy::LeastRequest);
    assert_eq!(lb(9080, Some("v2")), LbPolicy::RoundRobin);
    assert!(
        r.endpoint_policy(80, Some("v3")).is_none(),
        "unknown subset"
    );
    // Outlier detection is inherited by the subsets, Istio's defaults filled in.
    let od = r
        .endpoint_policy(9080, Some("v2"))
        .unwrap()
        .outlier_detection
        .unwrap();
    assert_eq!(
        (
            od.consecutive_5xx,
            od.consecutive_gateway,
            od.max_ejection_percent
        ),
        (5, 3, 10)
    );
    assert_eq!(od.base_ejection_time, Duration::from_millis(1500));
    assert_eq!(r.subset("v2").unwrap().labels["version"], "v2");
    // consistentHash is reported (the simple policy applies).
    assert_eq!(r.problems.len(), 1);
    assert_eq!(
        r.problems[0].field,
        "subsets[1].trafficPolicy.loadBalancer.consistentHash"
    );
}

#[test]
fn unimplemented_fields_are_reported_and_the_rest_applies() {
    let r = rule(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: odd, namespace: apps}
spec:
  host: web
  workloadSelector: {matchLabels: {app: client}}
  exportTo: ["."]
  trafficPolicy:
    loadBalancer: {simple: PASSTHROUGH, localityLbSetting: {enabled: true}}
    tls: {mode: SIMPLE, sni: web.example.com}
    connectionPool: {tcp: {maxConnections: 10, maxConnectionDuration: 1h}}
    outlierDetection: {consecutive5xxErrors: 2}
"#,
    );
    assert!(r.is_valid(), "{:?}", r.problems);
    let fields: Vec<&str> = r.problems.iter().map(|p| p.field.as_str()).collect();
    for f in [
        "workloadSelector",
        "exportTo",
        "trafficPolicy.loadBalancer.simple",
        "trafficPolicy.loadBalancer.localityLbSetting",
        "trafficPolicy.tls.mode",
        "trafficPolicy.tls",
        "trafficPolicy.connectionPool.tcp.maxConnectionDuration",
    ] {
        assert!(fields.contains(&f), "{f} not reported: {fields:?}");
    }
    assert!(r
        .problems
        .iter()
        .all(|p| p.reason == ProblemReason::NotImplemented));
    let p = r.endpoint_policy(80, None).unwrap();
    assert_eq!(p.load_balancer, LbPolicy::RoundRobin);
    assert_eq!(p.outlier_detection.unwrap().consecutive_5xx, 2);
}

#[test]
fn bad_values_and_duplicates_reject_the_rule() {
    let r = rule(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dup, namespace: apps}
spec:
  host: web
  trafficPolicy:
    outlierDetection: {maxEjectionPercent: 150}
    portLevelSettings: [{loadBalancer: {simple: RANDOM}}]
  subsets: [{name: a}, {name: a}]
"#,
    );
    assert!(!r.is_valid());
    let reasons: Vec<ProblemReason> = r.problems.iter().map(|p| p.reason).collect();
    assert_eq!(
        reasons,
        [
            ProblemReason::BadValue,
            ProblemReason::BadValue,
            ProblemReason::DuplicateSubset
        ]
    );
}
