//! Prometheus metrics (`nodemesh_` prefix, Istio's standard label names).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

use prometheus::{
    core::Collector, proto::MetricType, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::telemetry::outcome::ResponseFlags;

/// Labels of the TCP metrics (Istio's names), one field each. Every value is bounded
/// by the pods, service accounts and Services of the cluster and a fixed set of flags:
/// nothing per connection (no addresses or ports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TcpLabels<'a> {
    /// `source` (outbound) or `destination` (inbound): which side's proxy reports.
    pub reporter: &'static str,
    pub source_workload: &'a str,
    pub source_workload_namespace: &'a str,
    pub source_principal: &'a str,
    pub destination_workload: &'a str,
    pub destination_workload_namespace: &'a str,
    pub destination_principal: &'a str,
    /// `name.namespace.svc.cluster.local`.
    pub destination_service: String,
    pub destination_service_name: &'a str,
    pub destination_service_namespace: &'a str,
    pub request_protocol: &'static str,
    pub response_flags: ResponseFlags,
    /// `none` or `mutual_tls`.
    pub connection_security_policy: &'static str,
}

impl TcpLabels<'_> {
    /// The label names, in the order the metrics are registered with.
    pub(crate) const NAMES: [&'static str; 13] = [
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "source_principal",
        "destination_workload",
        "destination_workload_namespace",
        "destination_principal",
        "destination_service",
        "destination_service_name",
        "destination_service_namespace",
        "request_protocol",
        "response_flags",
        "connection_security_policy",
    ];

    /// The values, in the order of [`Self::NAMES`].
    pub(crate) fn values(&self) -> [&str; 13] {
        [
            self.reporter,
            self.source_workload,
            self.source_workload_namespace,
            self.source_principal,
            self.destination_workload,
            self.destination_workload_namespace,
            self.destination_principal,
            &self.destination_service,
            self.destination_service_name,
            self.destination_service_namespace,
            self.request_protocol,
            self.response_flags.as_str(),
            self.connection_security_policy,
        ]
    }
}

/// Labels of the HTTP request metrics (L7 routes), as Istio names them, one field each;
/// every value is bounded by the pods, Services and status codes of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestLabels<'a> {
    /// Always `source`: requests are reported by the client's side.
    pub reporter: &'static str,
    pub source_workload: &'a str,
    pub source_workload_namespace: &'a str,
    pub source_principal: &'a str,
    pub destination_workload: &'a str,
    pub destination_workload_namespace: &'a str,
    pub destination_principal: &'a str,
    /// `name.namespace.svc.cluster.local` of the backend Service.
    pub destination_service: String,
    pub destination_service_name: &'a str,
    pub destination_service_namespace: &'a str,
    /// The HTTP status, in decimal.
    pub response_code: &'a str,
    pub response_flags: ResponseFlags,
    /// `none` or `mutual_tls`.
    pub connection_security_policy: &'static str,
}

impl RequestLabels<'_> {
    /// The label names, in the order the metrics are registered with.
    pub(crate) const NAMES: [&'static str; 13] = [
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "source_principal",
        "destination_workload",
        "destination_workload_namespace",
        "destination_principal",
        "destination_service",
        "destination_service_name",
        "destination_service_namespace",
        "response_code",
        "response_flags",
        "connection_security_policy",
    ];

    /// The values, in the order of [`Self::NAMES`].
    pub(crate) fn values(&self) -> [&str; 13] {
        [
            self.reporter,
            self.source_workload,
            self.source_workload_namespace,
            self.source_principal,
            self.destination_workload,
            self.destination_workload_namespace,
            self.destination_principal,
            &self.destination_service,
            self.destination_service_name,
            self.destination_service_namespace,
            self.response_code,
            self.response_flags.as_str(),
            self.connection_security_policy,
        ]
    }
}

/// Request duration buckets in milliseconds.
const DURATION_BUCKETS_MS: [f64; 14] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// Outlier detection's metrics (the balancer holds a copy).
#[derive(Clone)]
pub struct OutlierMetrics {
    /// Ejections, by destination Service and reason.
    pub ejections: IntCounterVec,
    /// Endpoints ejected now, by destination Service.
    pub ejected: IntGaugeVec,
}

/// Labels of the outlier gauge (the counter adds `reason`).
pub(crate) const OUTLIER_LABELS: [&str; 3] = [
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
];

/// A [`Registry`] that remembers what was registered with it: each metric family's
/// name and variable label names, read from the collectors' own descriptions, so the
/// catalog ([`Metrics::catalog`]) lists every family `/metrics` can expose.
pub(crate) struct CatalogRegistry {
    registry: Registry,
    catalog: Mutex<Catalog>,
}

#[derive(Default)]
struct Catalog {
    /// Family name -> variable label names, in registration order.
    families: BTreeMap<String, Vec<String>>,
    /// The families that are histograms (exposed as `_bucket`, `_sum`, `_count`).
    histograms: BTreeSet<String>,
}

impl CatalogRegistry {
    pub(crate) fn new() -> CatalogRegistry {
        CatalogRegistry {
            registry: Registry::new(),
            catalog: Mutex::new(Catalog::default()),
        }
    }

    fn catalog_lock(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `collector` and, once the registry took it, records its families.
    pub(crate) fn register(&self, collector: Box<dyn Collector>) -> prometheus::Result<()> {
        let families: Vec<(String, Vec<String>)> = collector
            .desc()
            .iter()
            .map(|d| (d.fq_name.clone(), d.variable_labels.clone()))
            .collect();
        // A vector without series still reports its family's type.
        let histograms: Vec<String> = collector
            .collect()
            .iter()
            .filter(|f| f.get_field_type() == MetricType::HISTOGRAM)
            .map(|f| f.name().to_string())
            .collect();
        self.registry.register(collector)?;
        let mut catalog = self.catalog_lock();
        catalog.families.extend(families);
        catalog.histograms.extend(histograms);
        Ok(())
    }

    /// Every family registered so far, with its variable label names.
    pub(crate) fn catalog(&self) -> BTreeMap<String, Vec<String>> {
        self.catalog_lock().families.clone()
    }

    /// The families of [`Self::catalog`] that are histograms.
    pub(crate) fn histograms(&self) -> BTreeSet<String> {
        self.catalog_lock().histograms.clone()
    }

    fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }
}

pub struct Metrics {
    registry: CatalogRegistry,
    /// Outlier detection: ejections and endpoints ejected now.
    pub outliers: OutlierMetrics,
    /// Circuit breaking: connection pool overflows and occupancy.
    pub pools: crate::telemetry::pool_metrics::PoolMetrics,
    /// The tracing exporters'.
    pub spans: crate::telemetry::spans::metrics::SpanMetrics,
    /// Problems found in configuration objects (DestinationRules), by kind and reason;
    /// counted once per object version.
    pub config_problems: IntCounterVec,
    /// JWKS documents fetched for RequestAuthentication `jwksUri`s, by result.
    pub jwks_fetches: IntCounterVec,
    /// Requests whose JSON Web Token was refused (401), by reason.
    pub jwt_rejected: IntCounterVec,
    /// HTTP requests on L7 routes.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// Mirrored copies of requests, by the mirror's Service and outcome.
    pub mirrored_requests: IntCounterVec,
    /// Retries of HTTP requests on L7 routes (by destination service).
    pub request_retries: IntCounterVec,
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_sent_bytes: IntCounterVec,
    pub tcp_received_bytes: IntCounterVec,
    /// Connections the agent refused or could not serve, by reason.
    pub refused: IntCounterVec,
    pub manifest_errors: IntCounter,
    /// Rescans of the manifest directory (files source).
    pub manifest_scans: IntCounter,
    /// Route configuration problems found compiling a Service port's HTTP routes
    /// (a broken or unsupported part of an HTTPRoute or VirtualService, a
    /// VirtualService that does not apply), counted per table built.
    pub route_config_problems: IntCounter,
    pub state_updates: IntCounter,
    /// Pods dropped because their network namespace disappeared.
    pub netns_vanished: IntCounter,
    /// Pods that could not be enrolled (netns missing, listener failed), by reason.
    pub enroll_failures: IntCounterVec,
    /// Failed watches of the `kube` source, by kind.
    pub discovery_errors: IntCounterVec,
    /// Seconds a kind's watch has been failing (0 when healthy).
    pub discovery_stale_seconds: GaugeVec,
    pub certificates_issued: IntCounter,
    pub certificate_errors: IntCounter,
    /// TLS handshakes of outbound HBONE connections (pooling keeps this low).
    pub hbone_handshakes: IntCounter,
    /// Connections refused at a listener's cap, by listener and reason (`limits.rs`).
    pub listener_refused: IntCounterVec,
    /// Connections cut for being slow or idle, by listener and stage.
    pub listener_timeouts: IntCounterVec,
    /// Failed accepts, by listener and error (`emfile`, `enfile`, `other`).
    pub accept_errors: IntCounterVec,
    /// Connections open now on each listener (in-pod ones summed over pods; `inbound`
    /// includes HBONE streams).
    pub listener_connections: IntGaugeVec,
    // Agent health, refreshed when scraped (see `health.rs`).
    pub bpf_map_entries: IntGaugeVec,
    pub bpf_map_capacity: IntGaugeVec,
    pub certificate_expiry_seconds: GaugeVec,
    pub workloads: IntGaugeVec,
    pub connections_active: IntGaugeVec,
    /// Unix time of the last cluster state the agent applied.
    pub state_last_update: Gauge,
    pub state_age_seconds: Gauge,
    /// 1 while the agent drains (after SIGTERM), else 0.
    pub draining: IntGauge,
    /// Connections open when a drain began, by how they ended: `completed` before the
    /// drain timeout, `cut` by it.
    pub drained_connections: IntCounterVec,
    /// Hand-overs between agents on this node, by role (`giver`, `taker`) and outcome.
    pub handovers: IntCounterVec,
}

fn counter_vec(
    registry: &CatalogRegistry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registered twice: {e}"));
    c
}

fn gauge_vec(registry: &CatalogRegistry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registered twice: {e}"));
    g
}

/// Registers a health metric; a malformed or doubly registered one is a bug.
fn register<M: Collector + Clone + 'static>(
    registry: &CatalogRegistry,
    made: prometheus::Result<M>,
) -> M {
    let m = made.unwrap_or_else(|e| panic!("a health metric is malformed: {e}"));
    registry
        .register(Box::new(m.clone()))
        .unwrap_or_else(|e| panic!("a health metric is registered twice: {e}"));
    m
}

fn counter(registry: &CatalogRegistry, name: &str, help: &str) -> IntCounter {
    let c =
        IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registered twice: {e}"));
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = CatalogRegistry::new();
        // Counted by the access log's writer, shared by every registry.
        let _ = r.register(Box::new(crate::telemetry::access_log::dropped().clone()));
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "nodemesh_request_duration_milliseconds",
                "Duration of HTTP requests on L7 routes, until the response ends.",
            )
            .buckets(DURATION_BUCKETS_MS.to_vec()),
            &RequestLabels::NAMES,
        )
        .unwrap_or_else(|e| panic!("request duration histogram is malformed: {e}"));
        r.register(Box::new(request_duration.clone()))
            .unwrap_or_else(|e| panic!("request duration histogram registered twice: {e}"));
        Metrics {
            pools: crate::telemetry::pool_metrics::PoolMetrics::new(&r),
            spans: crate::telemetry::spans::metrics::SpanMetrics::new(&r),
            outliers: OutlierMetrics {
                ejections: counter_vec(
                    &r,
                    "nodemesh_outlier_ejections_total",
                    "Endpoints ejected by outlier detection, by destination Service and reason.",
                    &[
                        OUTLIER_LABELS[0],
                        OUTLIER_LABELS[1],
                        OUTLIER_LABELS[2],
                        "reason",
                    ],
                ),
                ejected: register(
                    &r,
                    IntGaugeVec::new(
                        Opts::new(
                            "nodemesh_outlier_ejected_endpoints",
                            "Endpoints ejected by outlier detection now, by destination Service.",
                        ),
                        &OUTLIER_LABELS,
                    ),
                ),
            },
            config_problems: counter_vec(
                &r,
                "nodemesh_config_problems_total",
                "Problems found in configuration objects (rejected, shadowed or not implemented), by kind and reason.",
                &["kind", "reason"],
            ),
            jwks_fetches: counter_vec(
                &r,
                "nodemesh_jwks_fetches_total",
                "JWKS fetches for RequestAuthentication jwksUri, by result (ok, http_error, too_large, timeout, connect_failed, bad_jwks, unsupported).",
                &["result"],
            ),
            jwt_rejected: counter_vec(
                &r,
                "nodemesh_jwt_rejected_total",
                "Requests whose JSON Web Token was refused (401), by reason.",
                &["reason"],
            ),
            mirrored_requests: counter_vec(
                &r,
                "nodemesh_mirrored_requests_total",
                "Copies of requests sent to a route's mirror (answers dropped), by the mirror's Service and outcome (answered, failed, no_endpoint, body_not_held, overflow, pool_overflow).",
                &["destination_service", "outcome"],
            ),
            requests: counter_vec(
                &r,
                "nodemesh_requests_total",
                "HTTP requests on L7 routes.",
                &RequestLabels::NAMES,
            ),
            request_duration,
            request_retries: counter_vec(
                &r,
                "nodemesh_request_retries_total",
                "Retried attempts of HTTP requests on L7 routes.",
                &["destination_service"],
            ),
            tcp_opened: counter_vec(
                &r,
                "nodemesh_tcp_connections_opened_total",
                "TCP connections opened by the proxy.",
                &TcpLabels::NAMES,
            ),
            tcp_closed: counter_vec(
                &r,
                "nodemesh_tcp_connections_closed_total",
                "TCP connections closed by the proxy.",
                &TcpLabels::NAMES,
            ),
            tcp_sent_bytes: counter_vec(
                &r,
                "nodemesh_tcp_sent_bytes_total",
                "Bytes sent from client to server through the proxy.",
                &TcpLabels::NAMES,
            ),
            tcp_received_bytes: counter_vec(
                &r,
                "nodemesh_tcp_received_bytes_total",
                "Bytes received by the client from the server through the proxy.",
                &TcpLabels::NAMES,
            ),
            refused: counter_vec(
                &r,
                "nodemesh_connections_refused_total",
                "Connections refused or failed, by reason.",
                &["reason"],
            ),
            manifest_errors: counter(
                &r,
                "nodemesh_manifest_errors_total",
                "Manifest files skipped because they did not parse.",
            ),
            manifest_scans: counter(
                &r,
                "nodemesh_manifest_scans_total",
                "Rescans of the manifest directory (files source): after a change, and every 2 s.",
            ),
            route_config_problems: counter(
                &r,
                "nodemesh_route_config_problems_total",
                "Problems found compiling HTTPRoutes and VirtualServices (each one logged, naming the object).",
            ),
            state_updates: counter(
                &r,
                "nodemesh_state_updates_total",
                "Cluster state snapshots applied.",
            ),
            netns_vanished: counter(
                &r,
                "nodemesh_netns_vanished_total",
                "Enrolled pods removed because their network namespace disappeared.",
            ),
            enroll_failures: counter_vec(
                &r,
                "nodemesh_enroll_failures_total",
                "Attempts to enroll a pod that failed, by reason.",
                &["reason"],
            ),
            discovery_errors: counter_vec(
                &r,
                "nodemesh_discovery_errors_total",
                "Failed watches of the Kubernetes API, by kind.",
                &["kind"],
            ),
            discovery_stale_seconds: gauge_vec(
                &r,
                "nodemesh_discovery_stale_seconds",
                "Seconds a kind's watch has been failing; the last good state keeps serving.",
                &["kind"],
            ),
            certificates_issued: counter(
                &r,
                "nodemesh_certificates_issued_total",
                "Workload certificates obtained from the CA.",
            ),
            certificate_errors: counter(
                &r,
                "nodemesh_certificate_errors_total",
                "Failed attempts to obtain a workload certificate.",
            ),
            hbone_handshakes: counter(
                &r,
                "nodemesh_hbone_handshakes_total",
                "TLS handshakes of outbound HBONE connections.",
            ),
            listener_refused: counter_vec(
                &r,
                "nodemesh_listener_refused_total",
                "Connections accepted and closed at once because a cap was reached, by listener and reason.",
                &["listener", "reason"],
            ),
            listener_timeouts: counter_vec(
                &r,
                "nodemesh_listener_timeouts_total",
                "Connections closed for not finishing a handshake or request head in time, or for idling, by listener and stage.",
                &["listener", "stage"],
            ),
            accept_errors: counter_vec(
                &r,
                "nodemesh_accept_errors_total",
                "Failed accepts, by listener and error (emfile: the agent is at its descriptor limit).",
                &["listener", "error"],
            ),
            listener_connections: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "nodemesh_listener_connections",
                        "Connections open now on each listener (in-pod listeners summed over pods).",
                    ),
                    &["listener"],
                ),
            ),
            bpf_map_entries: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "nodemesh_bpf_map_entries",
                        "Entries in each eBPF map.",
                    ),
                    &["map"],
                ),
            ),
            bpf_map_capacity: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "nodemesh_bpf_map_capacity",
                        "max_entries of each eBPF map.",
                    ),
                    &["map"],
                ),
            ),
            certificate_expiry_seconds: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "nodemesh_certificate_expiry_seconds",
                        "Seconds until each workload certificate on this node expires (negative: expired).",
                    ),
                    &["identity"],
                ),
            ),
            workloads: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "nodemesh_workloads",
                        "Pods on this node, enrolled or not.",
                    ),
                    &["state"],
                ),
            ),
            connections_active: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "nodemesh_connections_active",
                        "Proxied connections open now.",
                    ),
                    &["direction"],
                ),
            ),
            state_last_update: register(
                &r,
                Gauge::new(
                    "nodemesh_state_last_update_timestamp_seconds",
                    "Unix time the agent last applied a new cluster state.",
                ),
            ),
            state_age_seconds: register(
                &r,
                Gauge::new(
                    "nodemesh_state_age_seconds",
                    "Seconds since the agent last applied a new cluster state.",
                ),
            ),
            draining: register(
                &r,
                IntGauge::new(
                    "nodemesh_agent_draining",
                    "1 while the agent drains its connections before exiting.",
                ),
            ),
            drained_connections: counter_vec(
                &r,
                "nodemesh_drained_connections_total",
                "Connections open when the agent began to drain, by outcome (completed, cut).",
                &["outcome"],
            ),
            handovers: counter_vec(
                &r,
                "nodemesh_handovers_total",
                "Hand-overs of the node between agents, by role (giver, taker) and outcome (handed_over, refused, failed; taken_over, fell_back).",
                &["role", "outcome"],
            ),
            registry: r,
        }
    }

    /// Every metric family `/metrics` exposes, by name, with its variable label names
    /// (a histogram under its family name: the exposition adds `_bucket` with `le`,
    /// `_sum` and `_count`). What dashboards and alerts may query.
    pub fn catalog(&self) -> BTreeMap<String, Vec<String>> {
        self.registry.catalog()
    }

    /// The families of [`Self::catalog`] that are histograms.
    pub fn histograms(&self) -> BTreeSet<String> {
        self.registry.histograms()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labels of the first series of `metric` in the exposition, as Prometheus
    /// writes them (sorted by name).
    fn series_labels(text: &str, metric: &str) -> String {
        let start = format!("{metric}{{");
        let line = text
            .lines()
            .find(|l| l.starts_with(&start))
            .unwrap_or_else(|| panic!("no {metric} series in {text}"));
        line[start.len()..line.rfind('}').unwrap()].to_string()
    }

    /// What `pairs` look like in the exposition: sorted by name, `name="value"`.
    fn exposed(pairs: &[(&str, &str)]) -> String {
        let mut pairs = pairs.to_vec();
        pairs.sort();
        let pairs: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}=\"{v}\"")).collect();
        pairs.join(",")
    }

    /// Each field, set to a value of its own, is exposed under the label of its name:
    /// the values come in the order the metrics were registered with.
    #[test]
    fn tcp_label_fields_are_exposed_under_their_own_names() {
        let labels = TcpLabels {
            reporter: "destination",
            source_workload: "sw",
            source_workload_namespace: "swns",
            source_principal: "sp",
            destination_workload: "dw",
            destination_workload_namespace: "dwns",
            destination_principal: "dp",
            destination_service: "ds".into(),
            destination_service_name: "dsname",
            destination_service_namespace: "dsns",
            request_protocol: "tcp",
            response_flags: ResponseFlags::StreamIdleTimeout,
            connection_security_policy: "mutual_tls",
        };
        let want = exposed(&[
            ("reporter", "destination"),
            ("source_workload", "sw"),
            ("source_workload_namespace", "swns"),
            ("source_principal", "sp"),
            ("destination_workload", "dw"),
            ("destination_workload_namespace", "dwns"),
            ("destination_principal", "dp"),
            ("destination_service", "ds"),
            ("destination_service_name", "dsname"),
            ("destination_service_namespace", "dsns"),
            ("request_protocol", "tcp"),
            ("response_flags", "SI"),
            ("connection_security_policy", "mutual_tls"),
        ]);
        let metrics = Metrics::new();
        for (metric, vec) in [
            ("nodemesh_tcp_connections_opened_total", &metrics.tcp_opened),
            ("nodemesh_tcp_connections_closed_total", &metrics.tcp_closed),
            ("nodemesh_tcp_sent_bytes_total", &metrics.tcp_sent_bytes),
            (
                "nodemesh_tcp_received_bytes_total",
                &metrics.tcp_received_bytes,
            ),
        ] {
            vec.with_label_values(&labels.values()).inc();
            assert_eq!(series_labels(&metrics.encode(), metric), want, "{metric}");
        }
    }

    /// The catalog is filled as collectors register: the families of `Metrics::new`
    /// itself, of the pools, of the span exporters and the access log's shared counter,
    /// each with the label names its series carry.
    #[test]
    fn the_catalog_lists_every_family_with_its_labels() {
        let catalog = Metrics::new().catalog();
        let labels = |name: &str| -> Vec<&str> {
            catalog
                .get(name)
                .unwrap_or_else(|| panic!("{name} is not in the catalog: {catalog:?}"))
                .iter()
                .map(String::as_str)
                .collect()
        };
        assert_eq!(labels("nodemesh_requests_total"), RequestLabels::NAMES);
        assert_eq!(
            labels("nodemesh_request_duration_milliseconds"),
            RequestLabels::NAMES,
            "a histogram under its family name, without `le`"
        );
        assert_eq!(labels("nodemesh_tcp_sent_bytes_total"), TcpLabels::NAMES);
        assert_eq!(
            labels("nodemesh_spans_dropped_total"),
            ["provider", "reason"]
        );
        assert_eq!(
            labels("nodemesh_pool_pending_requests"),
            crate::telemetry::pool_metrics::POOL_LABELS
        );
        assert_eq!(
            Metrics::new().histograms(),
            BTreeSet::from(["nodemesh_request_duration_milliseconds".to_string()])
        );
        assert!(labels("nodemesh_access_log_dropped_total").is_empty());
        assert!(labels("nodemesh_state_age_seconds").is_empty());
        assert!(catalog.keys().all(|name| name.starts_with("nodemesh_")));
        // Whatever the registry exposes is in the catalog (a vector without series is
        // not exposed at all; the plain counters and gauges are).
        let metrics = Metrics::new();
        metrics
            .requests
            .with_label_values(&[""; RequestLabels::NAMES.len()])
            .inc();
        for family in metrics.registry.gather() {
            assert!(
                catalog.contains_key(family.name()),
                "{} is exposed but not in the catalog",
                family.name()
            );
        }
    }

    #[test]
    fn request_label_fields_are_exposed_under_their_own_names() {
        let labels = RequestLabels {
            reporter: "source",
            source_workload: "sw",
            source_workload_namespace: "swns",
            source_principal: "sp",
            destination_workload: "dw",
            destination_workload_namespace: "dwns",
            destination_principal: "dp",
            destination_service: "ds".into(),
            destination_service_name: "dsname",
            destination_service_namespace: "dsns",
            response_code: "503",
            response_flags: ResponseFlags::NoHealthyUpstream,
            connection_security_policy: "none",
        };
        let want = exposed(&[
            ("reporter", "source"),
            ("source_workload", "sw"),
            ("source_workload_namespace", "swns"),
            ("source_principal", "sp"),
            ("destination_workload", "dw"),
            ("destination_workload_namespace", "dwns"),
            ("destination_principal", "dp"),
            ("destination_service", "ds"),
            ("destination_service_name", "dsname"),
            ("destination_service_namespace", "dsns"),
            ("response_code", "503"),
            ("response_flags", "UH"),
            ("connection_security_policy", "none"),
        ]);
        let metrics = Metrics::new();
        metrics.requests.with_label_values(&labels.values()).inc();
        metrics
            .request_duration
            .with_label_values(&labels.values())
            .observe(1.0);
        let text = metrics.encode();
        assert_eq!(series_labels(&text, "nodemesh_requests_total"), want);
        assert_eq!(
            series_labels(&text, "nodemesh_request_duration_milliseconds_count"),
            want
        );
    }
}
