//! A DestinationRule's `connectionPool` (Istio's circuit breaking) checked and compiled
//! into the limits the node proxy enforces ([`PoolLimits`]).
//!
//! The wire form stays free-form in the CRD (`tcp` and `http` objects); here it is read
//! into typed settings with Istio's field names. An unknown field or a value of the
//! wrong type rejects the rule (as Istio's validation would); a field Nodemesh does not
//! implement is reported and the rest applies. As in Istio, `0` (or absent) means "no
//! limit" for the counts.
//!
//! The limits are per node proxy: every pod of the node shares them per destination
//! (Service port and subset), where Envoy's are per sidecar.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::discovery::{
    destination_rule::ConnectionPoolSettings,
    duration::parse_istio_duration,
    problem::{Problem, ProblemReason},
};

/// `connectionPool.tcp`, as Istio writes it.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TcpSettings {
    max_connections: Option<i64>,
    connect_timeout: Option<String>,
    tcp_keepalive: Option<KeepaliveSettings>,
    max_connection_duration: Option<String>,
    idle_timeout: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KeepaliveSettings {
    probes: Option<i64>,
    time: Option<String>,
    interval: Option<String>,
}

/// `connectionPool.http`, as Istio writes it.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpSettings {
    http1_max_pending_requests: Option<i64>,
    http2_max_requests: Option<i64>,
    max_requests_per_connection: Option<i64>,
    max_retries: Option<i64>,
    idle_timeout: Option<String>,
    h2_upgrade_policy: Option<String>,
    use_client_protocol: Option<bool>,
    max_concurrent_streams: Option<i64>,
}

/// SO_KEEPALIVE on upstream sockets (None: the kernel's default for that part).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Keepalive {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<u64>,
}

/// The connection-pool limits in force for one destination (Service port, subset).
/// `None` is "no limit" (Istio's default, 2^32-1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolLimits {
    /// `tcp.maxConnections`: L4 connections to the destination open at once; for HTTP,
    /// upstream HTTP/1.1 connections carrying a request at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`: HTTP/1.1 requests waiting for a connection
    /// while `max_connections` are busy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: HTTP requests (either protocol) in flight at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: an upstream HTTP/1.1 connection is closed after
    /// this many requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// `tcp.connectTimeout`: the upstream connect deadline (None: the agent's).
    #[serde(
        skip_serializing_if = "Option::is_none",
        rename = "connect_timeout_ms",
        with = "opt_millis"
    )]
    pub connect_timeout: Option<Duration>,
    /// `http.idleTimeout`: a kept-alive upstream HTTP connection idle this long is
    /// closed (None: the proxy's default).
    #[serde(
        skip_serializing_if = "Option::is_none",
        rename = "idle_timeout_ms",
        with = "opt_millis"
    )]
    pub idle_timeout: Option<Duration>,
    /// `tcp.tcpKeepalive`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<Keepalive>,
    /// `http.maxRetries`: retries to the destination outstanding at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// `http.maxConcurrentStreams`: requests in flight at once on one upstream HTTP/2
    /// connection; more open another connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
}

mod opt_millis {
    use serde::{Deserialize, Serialize};
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let ms = d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        ms.serialize(s)
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

impl PoolLimits {
    /// Whether any request, connection or retry count is bounded (the proxy tracks
    /// occupancy only then).
    pub fn bounds_anything(&self) -> bool {
        self.max_connections.is_some()
            || self.max_pending_requests.is_some()
            || self.max_requests.is_some()
            || self.max_retries.is_some()
    }
}

struct Checker<'a> {
    field: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, field: &str, reason: ProblemReason, detail: impl Into<String>) {
        self.problems.push(Problem {
            field: format!("{}.{field}", self.field),
            reason,
            detail: detail.into(),
        });
    }

    fn not_implemented(&mut self, field: &str, what: &str) {
        self.problems.push(Problem::not_implemented(
            format!("{}.{field}", self.field),
            what,
        ));
    }

    /// A count: 0 or absent is no limit (as Istio); negative or over u32 is rejected.
    fn count(&mut self, field: &str, value: Option<i64>) -> Option<u32> {
        match value {
            None | Some(0) => None,
            Some(v) => match u32::try_from(v) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.problem(
                        field,
                        ProblemReason::BadValue,
                        format!("{v} is not a count: write 1 to 4294967295, or 0 for no limit"),
                    );
                    None
                }
            },
        }
    }

    fn duration(&mut self, field: &str, text: Option<&str>) -> Option<Duration> {
        match parse_istio_duration(text?) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(field, ProblemReason::BadDuration, e);
                None
            }
        }
    }

    fn parse<T: for<'de> Deserialize<'de> + Default>(
        &mut self,
        field: &str,
        value: Option<&serde_json::Value>,
    ) -> Option<T> {
        let value = value?;
        match T::deserialize(value) {
            Ok(t) => Some(t),
            Err(e) => {
                self.problem(
                    field,
                    ProblemReason::BadValue,
                    format!(
                        "{}: write it as Istio's ConnectionPoolSettings",
                        crate::telemetry::log_limit::clip(&e.to_string())
                    ),
                );
                None
            }
        }
    }

    fn tcp(&mut self, tcp: &TcpSettings, limits: &mut PoolLimits) {
        limits.max_connections = self.count("tcp.maxConnections", tcp.max_connections);
        limits.connect_timeout =
            self.duration("tcp.connectTimeout", tcp.connect_timeout.as_deref());
        if let Some(k) = &tcp.tcp_keepalive {
            let probes = self.count("tcp.tcpKeepalive.probes", k.probes);
            let time = self.duration("tcp.tcpKeepalive.time", k.time.as_deref());
            let interval = self.duration("tcp.tcpKeepalive.interval", k.interval.as_deref());
            // The kernel counts in whole seconds (at least 1).
            let secs = |d: Duration| d.as_secs().max(1);
            limits.tcp_keepalive = Some(Keepalive {
                probes,
                time_secs: time.map(secs),
                interval_secs: interval.map(secs),
            });
        }
        if tcp.max_connection_duration.is_some() {
            self.not_implemented("tcp.maxConnectionDuration", "maxConnectionDuration");
        }
        if tcp.idle_timeout.is_some() {
            self.not_implemented(
                "tcp.idleTimeout",
                "a per-rule TCP idle timeout (the agent's --idle-timeout applies)",
            );
        }
    }

    fn http(&mut self, http: &HttpSettings, limits: &mut PoolLimits) {
        limits.max_pending_requests = self.count(
            "http.http1MaxPendingRequests",
            http.http1_max_pending_requests,
        );
        limits.max_requests = self.count("http.http2MaxRequests", http.http2_max_requests);
        limits.max_requests_per_connection = self.count(
            "http.maxRequestsPerConnection",
            http.max_requests_per_connection,
        );
        limits.idle_timeout = self.duration("http.idleTimeout", http.idle_timeout.as_deref());
        limits.max_retries = self.count("http.maxRetries", http.max_retries);
        limits.max_concurrent_streams =
            self.count("http.maxConcurrentStreams", http.max_concurrent_streams);
        match http.h2_upgrade_policy.as_deref() {
            None | Some("DEFAULT") | Some("DO_NOT_UPGRADE") => {}
            Some("UPGRADE") => self.not_implemented(
                "http.h2UpgradePolicy",
                "upgrading HTTP/1.1 to HTTP/2 upstream (declare `appProtocol: kubernetes.io/h2c` on the Service port instead)",
            ),
            Some(other) => self.problem(
                "http.h2UpgradePolicy",
                ProblemReason::UnknownValue,
                format!(
                    "`{}` is not an h2UpgradePolicy: use DEFAULT, DO_NOT_UPGRADE or UPGRADE",
                    crate::telemetry::log_limit::clip(other)
                ),
            ),
        }
        if http.use_client_protocol == Some(true) {
            self.not_implemented(
                "http.useClientProtocol",
                "useClientProtocol (the client's protocol is kept for HTTP/2 clients already)",
            );
        }
    }
}

/// Checks and compiles `pool` (at `field`, e.g. `trafficPolicy.connectionPool`):
/// the limits, and what is wrong with or left out of it.
pub fn compile(field: &str, pool: &ConnectionPoolSettings) -> (PoolLimits, Vec<Problem>) {
    let mut c = Checker {
        field,
        problems: Vec::new(),
    };
    let mut limits = PoolLimits::default();
    if let Some(tcp) = c.parse::<TcpSettings>("tcp", pool.tcp.as_ref()) {
        c.tcp(&tcp, &mut limits);
    }
    if let Some(http) = c.parse::<HttpSettings>("http", pool.http.as_ref()) {
        c.http(&http, &mut limits);
    }
    (limits, c.problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(
        tcp: Option<serde_json::Value>,
        http: Option<serde_json::Value>,
    ) -> ConnectionPoolSettings {
        ConnectionPoolSettings { tcp, http }
    }

    #[test]
    fn the_seeds_circuit_breaker_compiles_to_its_limits() {
        let (limits, problems) = compile(
            "trafficPolicy.connectionPool",
            &pool(
                Some(json!({"maxConnections": 100, "connectTimeout": "30ms",
                    "tcpKeepalive": {"time": "7200s", "interval": "75s", "probes": 9}})),
                Some(
                    json!({"http1MaxPendingRequests": 100, "maxRequestsPerConnection": 10,
                    "http2MaxRequests": 1000, "idleTimeout": "1.5s", "maxRetries": 3,
                    "maxConcurrentStreams": 8}),
                ),
            ),
        );
        assert_eq!(problems, vec![]);
        assert_eq!(limits.max_connections, Some(100));
        assert_eq!(limits.max_pending_requests, Some(100));
        assert_eq!(limits.max_requests, Some(1000));
        assert_eq!(limits.max_requests_per_connection, Some(10));
        assert_eq!(limits.connect_timeout, Some(Duration::from_millis(30)));
        assert_eq!(limits.idle_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(limits.max_retries, Some(3));
        assert_eq!(limits.max_concurrent_streams, Some(8));
        assert_eq!(
            limits.tcp_keepalive,
            Some(Keepalive {
                probes: Some(9),
                time_secs: Some(7200),
                interval_secs: Some(75)
            })
        );
        assert!(limits.bounds_anything());
    }

    #[test]
    fn zero_means_no_limit_as_in_istio() {
        let (limits, problems) = compile(
            "p",
            &pool(
                Some(json!({"maxConnections": 0})),
                Some(
                    json!({"http1MaxPendingRequests": 0, "maxRetries": 0, "maxConcurrentStreams": 0}),
                ),
            ),
        );
        assert!(problems.is_empty());
        assert_eq!(limits, PoolLimits::default());
        assert!(!limits.bounds_anything());
    }

    #[test]
    fn broken_values_are_rejected_with_their_field() {
        let (_, problems) = compile(
            "p",
            &pool(
                Some(json!({"maxConnections": -1, "connectTimeout": "soon"})),
                Some(json!({"http2MaxRequests": 99999999999i64, "h2UpgradePolicy": "MAYBE"})),
            ),
        );
        let fields: Vec<(&str, ProblemReason)> = problems
            .iter()
            .map(|p| (p.field.as_str(), p.reason))
            .collect();
        assert_eq!(
            fields,
            [
                ("p.tcp.maxConnections", ProblemReason::BadValue),
                ("p.tcp.connectTimeout", ProblemReason::BadDuration),
                ("p.http.http2MaxRequests", ProblemReason::BadValue),
                ("p.http.h2UpgradePolicy", ProblemReason::UnknownValue),
            ]
        );
        assert!(problems.iter().all(|p| p.reason.rejects()));
    }

    #[test]
    fn unknown_fields_and_wrong_types_reject_and_unimplemented_ones_are_reported() {
        let (_, problems) = compile("p", &pool(Some(json!({"maxConections": 1})), None));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "p.tcp");
        assert!(problems[0].detail.contains("maxConections"), "{problems:?}");
        assert!(problems[0].reason.rejects());
        let (_, problems) = compile("p", &pool(None, Some(json!("many"))));
        assert!(problems[0].reason.rejects());
        let (limits, problems) = compile(
            "p",
            &pool(
                Some(json!({"maxConnectionDuration": "1h", "maxConnections": 3})),
                Some(json!({"maxRetries": 3, "useClientProtocol": true})),
            ),
        );
        assert_eq!(limits.max_connections, Some(3));
        assert_eq!(limits.max_retries, Some(3));
        let reported: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            reported,
            ["p.tcp.maxConnectionDuration", "p.http.useClientProtocol"],
            "{problems:?}"
        );
        assert!(problems
            .iter()
            .all(|p| p.reason == ProblemReason::NotImplemented));
    }

    #[test]
    fn max_retries_alone_is_a_bound_the_proxy_tracks() {
        let (limits, problems) = compile("p", &pool(None, Some(json!({"maxRetries": 1}))));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(limits.max_retries, Some(1));
        assert!(limits.bounds_anything());
        let (limits, _) = compile("p", &pool(None, Some(json!({"maxConcurrentStreams": 4}))));
        assert_eq!(limits.max_concurrent_streams, Some(4));
        // A per-connection setting: no node-wide count to keep.
        assert!(!limits.bounds_anything());
    }
}
