//! A `DestinationRule` checked and compiled into the traffic policy routing applies:
//! the Service it is for, its subsets, and per layer (rule, port, subset, subset port)
//! the load-balancing policy and outlier detection.
//!
//! A rule that cannot be applied as written (a host that names no Service, a bad
//! duration, an unknown enum value, a duplicate subset) is rejected whole, as Istio's
//! validation would refuse it: it is reported with its name and the Service keeps its
//! default policy (a subset it defines does not exist, so routes naming it fail
//! closed). A field Nodemesh does not implement is reported and the rest applies.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    discovery::connection_pool::{self, PoolLimits},
    discovery::consistent_hash::HashPolicy,
    discovery::destination_rule::{ClientTlsSettings, ConnectionPoolSettings, TrafficPolicy},
    discovery::destination_rule::{
        DestinationRule, LoadBalancerSettings, OutlierDetection, PortTrafficPolicy,
    },
    discovery::duration::parse_istio_duration,
    keys::{ObjectKey, CLUSTER_DOMAIN},
};

pub use crate::discovery::problem::{Problem, ProblemReason};

/// At most this many subsets per rule; more are rejected (bounded input).
pub const MAX_SUBSETS: usize = 256;
/// At most this many port-level settings per policy.
pub const MAX_PORT_SETTINGS: usize = 256;

/// How an endpoint of a backend is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbPolicy {
    /// In turn (the default without a DestinationRule).
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// The less busy of two random endpoints (power of two choices) by picks in flight;
    /// Istio's LEAST_CONN is the same.
    LeastRequest,
    /// `consistentHash`: by the key the policy's `consistent_hash` names (a request or
    /// connection without it: at random).
    ConsistentHash,
}

/// Outlier detection in force: Istio's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OutlierPolicy {
    /// 0: off.
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local_origin: u32,
    #[serde(with = "millis", rename = "interval_ms")]
    pub interval: Duration,
    #[serde(with = "millis", rename = "base_ejection_time_ms")]
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

mod millis {
    use serde::Deserialize;
    use std::time::Duration;
    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX))
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// What one layer of a policy sets (None: the layer below decides).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyLayer {
    pub load_balancer: Option<LbPolicy>,
    /// Some when `load_balancer` is [`LbPolicy::ConsistentHash`].
    pub consistent_hash: Option<HashPolicy>,
    pub outlier_detection: Option<OutlierPolicy>,
    /// `connectionPool` (the first layer that sets it decides it whole, as in Istio).
    pub connection_pool: Option<PoolLimits>,
}

/// A `trafficPolicy` compiled: its own layer and its ports'.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CompiledPolicy {
    pub default: PolicyLayer,
    pub ports: BTreeMap<u16, PolicyLayer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompiledSubset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub policy: CompiledPolicy,
}

/// The policy an endpoint choice follows, for one Service port (and subset).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EndpointPolicy {
    pub load_balancer: LbPolicy,
    /// Some when `load_balancer` is [`LbPolicy::ConsistentHash`]: what is hashed, how.
    pub consistent_hash: Option<HashPolicy>,
    pub outlier_detection: Option<OutlierPolicy>,
    /// Circuit breaking (`connectionPool`), when a layer sets one.
    pub connection_pool: Option<PoolLimits>,
}

impl Serialize for EndpointPolicy {
    /// As the admin API shows a backend's policy (flattened into it):
    /// `least_connections` (as before DestinationRules), `load_balancer`, and
    /// `outlier_detection` when on.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry(
            "least_connections",
            &(self.load_balancer == LbPolicy::LeastRequest),
        )?;
        m.serialize_entry("load_balancer", &self.load_balancer)?;
        if let Some(hash) = &self.consistent_hash {
            m.serialize_entry("consistent_hash", hash)?;
        }
        if let Some(od) = &self.outlier_detection {
            m.serialize_entry("outlier_detection", od)?;
        }
        if let Some(pool) = &self.connection_pool {
            m.serialize_entry("connection_pool", pool)?;
        }
        m.end()
    }
}

/// A DestinationRule as routing uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompiledRule {
    /// The rule itself.
    pub rule: ObjectKey,
    /// The Service it is for (None when the host names none: rejected).
    pub service: Option<ObjectKey>,
    pub policy: CompiledPolicy,
    pub subsets: Vec<CompiledSubset>,
    pub problems: Vec<Problem>,
    /// When the rule was created (older rules win a host), seconds since the epoch.
    pub created: Option<i64>,
}

impl CompiledRule {
    /// Whether the rule is applied (no problem rejects it).
    pub fn is_valid(&self) -> bool {
        self.service.is_some() && !self.problems.iter().any(|p| p.reason.rejects())
    }

    pub fn subset(&self, name: &str) -> Option<&CompiledSubset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy for `port` of the Service, and of `subset` when given (None: no such
    /// subset). Each field comes from the first layer that sets it: the subset's port,
    /// the subset, the rule's port, the rule.
    pub fn endpoint_policy(&self, port: u16, subset: Option<&str>) -> Option<EndpointPolicy> {
        let subset = match subset {
            Some(name) => Some(self.subset(name)?),
            None => None,
        };
        let mut layers: Vec<&PolicyLayer> = Vec::with_capacity(4);
        if let Some(s) = subset {
            layers.extend(s.policy.ports.get(&port));
            layers.push(&s.policy.default);
        }
        layers.extend(self.policy.ports.get(&port));
        layers.push(&self.policy.default);
        // The first layer with a load balancer decides it (and its hash policy).
        let lb = layers.iter().find(|l| l.load_balancer.is_some());
        Some(EndpointPolicy {
            load_balancer: lb.and_then(|l| l.load_balancer).unwrap_or_default(),
            consistent_hash: lb.and_then(|l| l.consistent_hash.clone()),
            outlier_detection: layers.iter().find_map(|l| l.outlier_detection),
            connection_pool: layers.iter().find_map(|l| l.connection_pool),
        })
    }
}

/// The Service `host` names, for a rule in `namespace`
/// ([`ObjectKey::from_service_host`]), or the words that say what to write instead.
pub fn service_of_host(host: &str, namespace: &str) -> Result<ObjectKey, String> {
    ObjectKey::from_service_host(host, namespace).map_err(|why| {
        format!(
            "host `{}` {why}: write the Service as `name`, `name.namespace` or `name.namespace.svc.{CLUSTER_DOMAIN}`",
            crate::telemetry::log_limit::clip(host)
        )
    })
}

/// A DestinationRule duration: Istio's grammar
/// ([`crate::discovery::duration::parse_istio_duration`]), and at least 1ms (intervals
/// and ejection times of zero would spin or never eject).
pub fn policy_duration(text: &str) -> Result<Duration, String> {
    let parsed = parse_istio_duration(text)?;
    if parsed < Duration::from_millis(1) {
        return Err(format!(
            "`{}` is shorter than 1ms: write e.g. 10s",
            text.trim()
        ));
    }
    Ok(parsed)
}

struct Compiler {
    problems: Vec<Problem>,
}

impl Compiler {
    fn problem(&mut self, field: &str, reason: ProblemReason, detail: impl Into<String>) {
        self.problems.push(Problem {
            field: field.to_string(),
            reason,
            detail: detail.into(),
        });
    }

    fn not_implemented(&mut self, field: &str, what: &str) {
        self.problems
            .push(Problem::not_implemented(field.to_string(), what));
    }

    fn duration(&mut self, field: &str, text: Option<&str>, default: Duration) -> Duration {
        match text.map(policy_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.problem(field, ProblemReason::BadDuration, e);
                default
            }
        }
    }

    fn load_balancer(
        &mut self,
        field: &str,
        lb: &LoadBalancerSettings,
    ) -> (Option<LbPolicy>, Option<HashPolicy>) {
        if let Some(raw) = &lb.consistent_hash {
            let field = format!("{field}.consistentHash");
            if lb.simple.is_some() {
                self.problem(
                    &field,
                    ProblemReason::InvalidField,
                    "set either simple or consistentHash, not both: simple applies",
                );
            } else if let Some(hash) =
                crate::discovery::consistent_hash::compile(&field, raw, &mut self.problems)
            {
                return (Some(LbPolicy::ConsistentHash), Some(hash));
            }
        }
        if lb.locality_lb_setting.is_some() {
            self.not_implemented(
                &format!("{field}.localityLbSetting"),
                "locality load balancing",
            );
        }
        if lb.warmup_duration_secs.is_some() {
            self.not_implemented(&format!("{field}.warmupDurationSecs"), "slow start");
        }
        let Some(simple) = lb.simple.as_deref() else {
            return (None, None);
        };
        let policy = match simple {
            "ROUND_ROBIN" => Some(LbPolicy::RoundRobin),
            "RANDOM" => Some(LbPolicy::Random),
            "LEAST_REQUEST" | "LEAST_CONN" => Some(LbPolicy::LeastRequest),
            "UNSPECIFIED" => None,
            "PASSTHROUGH" => {
                self.not_implemented(&format!("{field}.simple"), "PASSTHROUGH");
                None
            }
            other => {
                self.problem(
                    &format!("{field}.simple"),
                    ProblemReason::UnknownValue,
                    format!(
                        "`{}` is not a load-balancing policy: use ROUND_ROBIN, RANDOM, LEAST_REQUEST or LEAST_CONN",
                        crate::telemetry::log_limit::clip(other)
                    ),
                );
                None
            }
        };
        (policy, None)
    }

    fn outlier(&mut self, field: &str, od: &OutlierDetection) -> OutlierPolicy {
        if od.consecutive_errors.is_some() {
            self.not_implemented(
                &format!("{field}.consecutiveErrors"),
                "the deprecated consecutiveErrors (use consecutiveGatewayErrors)",
            );
        }
        let mut percent = |name: &str, value: Option<u32>, default: u32| match value {
            Some(v) if v > 100 => {
                self.problem(
                    &format!("{field}.{name}"),
                    ProblemReason::BadValue,
                    format!("{v} is not a percentage: write 0 to 100"),
                );
                default
            }
            Some(v) => v,
            None => default,
        };
        let max_ejection_percent = percent("maxEjectionPercent", od.max_ejection_percent, 10);
        let min_health_percent = percent("minHealthPercent", od.min_health_percent, 0);
        OutlierPolicy {
            consecutive_5xx: od.consecutive_5xx_errors.unwrap_or(5),
            consecutive_gateway: od.consecutive_gateway_errors.unwrap_or(0),
            consecutive_local_origin: od.consecutive_local_origin_failures.unwrap_or(5),
            interval: self.duration(
                &format!("{field}.interval"),
                od.interval.as_deref(),
                Duration::from_secs(10),
            ),
            base_ejection_time: self.duration(
                &format!("{field}.baseEjectionTime"),
                od.base_ejection_time.as_deref(),
                Duration::from_secs(30),
            ),
            max_ejection_percent,
            min_health_percent,
        }
    }

    fn connection_pool(&mut self, field: &str, pool: &ConnectionPoolSettings) -> PoolLimits {
        let (limits, problems) = connection_pool::compile(field, pool);
        self.problems.extend(problems);
        limits
    }

    fn tls(&mut self, field: &str, tls: &ClientTlsSettings) {
        match tls.mode.as_deref() {
            None | Some("ISTIO_MUTUAL") => {}
            Some(mode @ ("DISABLE" | "SIMPLE" | "MUTUAL")) => self.not_implemented(
                &format!("{field}.mode"),
                &format!("TLS mode {mode} (the mesh uses its own mutual TLS, as ISTIO_MUTUAL)"),
            ),
            Some(other) => self.problem(
                &format!("{field}.mode"),
                ProblemReason::UnknownValue,
                format!(
                    "`{}` is not a TLS mode: use ISTIO_MUTUAL (or leave it out)",
                    crate::telemetry::log_limit::clip(other)
                ),
            ),
        }
        let set = tls.client_certificate.is_some()
            || tls.private_key.is_some()
            || tls.ca_certificates.is_some()
            || tls.credential_name.is_some()
            || !tls.subject_alt_names.is_empty()
            || tls.sni.is_some()
            || tls.insecure_skip_verify.is_some();
        if set {
            self.not_implemented(field, "client TLS certificates, SNI and SAN settings");
        }
    }

    fn layer(
        &mut self,
        field: &str,
        lb: Option<&LoadBalancerSettings>,
        pool: Option<&ConnectionPoolSettings>,
        od: Option<&OutlierDetection>,
        tls: Option<&ClientTlsSettings>,
    ) -> PolicyLayer {
        let connection_pool =
            pool.map(|pool| self.connection_pool(&format!("{field}.connectionPool"), pool));
        if let Some(tls) = tls {
            self.tls(&format!("{field}.tls"), tls);
        }
        let (load_balancer, consistent_hash) = lb
            .map(|lb| self.load_balancer(&format!("{field}.loadBalancer"), lb))
            .unwrap_or_default();
        PolicyLayer {
            load_balancer,
            consistent_hash,
            outlier_detection: od.map(|od| self.outlier(&format!("{field}.outlierDetection"), od)),
            connection_pool,
        }
    }

    fn port(&mut self, field: &str, p: &PortTrafficPolicy) -> Option<(u16, PolicyLayer)> {
        let number = p.port.as_ref().map(|s| s.number);
        let Some(port) = number
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0)
        else {
            self.problem(
                &format!("{field}.port.number"),
                ProblemReason::BadValue,
                "a port-level setting needs a port number from 1 to 65535",
            );
            return None;
        };
        let layer = self.layer(
            field,
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
            p.tls.as_ref(),
        );
        Some((port, layer))
    }

    fn policy(&mut self, field: &str, tp: &TrafficPolicy) -> CompiledPolicy {
        if tp.tunnel.is_some() {
            self.not_implemented(&format!("{field}.tunnel"), "tunnel settings");
        }
        if tp.proxy_protocol.is_some() {
            self.not_implemented(&format!("{field}.proxyProtocol"), "PROXY protocol");
        }
        let default = self.layer(
            field,
            tp.load_balancer.as_ref(),
            tp.connection_pool.as_ref(),
            tp.outlier_detection.as_ref(),
            tp.tls.as_ref(),
        );
        if tp.port_level_settings.len() > MAX_PORT_SETTINGS {
            self.problem(
                &format!("{field}.portLevelSettings"),
                ProblemReason::TooLarge,
                format!("more than {MAX_PORT_SETTINGS} port-level settings"),
            );
            return CompiledPolicy::default();
        }
        let mut ports = BTreeMap::new();
        for (i, p) in tp.port_level_settings.iter().enumerate() {
            let field = format!("{field}.portLevelSettings[{i}]");
            if let Some((port, layer)) = self.port(&field, p) {
                if ports.insert(port, layer).is_some() {
                    self.problem(
                        &field,
                        ProblemReason::BadValue,
                        format!("port {port} has more than one port-level setting"),
                    );
                }
            }
        }
        CompiledPolicy { default, ports }
    }
}

/// Checks and compiles one rule (`key` is its namespace/name).
pub fn compile(key: &ObjectKey, dr: &DestinationRule) -> CompiledRule {
    let mut c = Compiler {
        problems: Vec::new(),
    };
    let spec = &dr.spec;
    let service = match service_of_host(&spec.host, &key.namespace) {
        Ok(s) => Some(s),
        Err(e) => {
            c.problem("host", ProblemReason::BadHost, e);
            None
        }
    };
    let policy = spec
        .traffic_policy
        .as_ref()
        .map(|tp| c.policy("trafficPolicy", tp))
        .unwrap_or_default();
    let mut subsets: Vec<CompiledSubset> = Vec::new();
    if spec.subsets.len() > MAX_SUBSETS {
        c.problem(
            "subsets",
            ProblemReason::TooLarge,
            format!("more than {MAX_SUBSETS} subsets"),
        );
    } else {
        for (i, s) in spec.subsets.iter().enumerate() {
            let field = format!("subsets[{i}]");
            if s.name.is_empty() {
                c.problem(&field, ProblemReason::BadValue, "a subset needs a name");
                continue;
            }
            if subsets.iter().any(|x| x.name == s.name) {
                c.problem(
                    &field,
                    ProblemReason::DuplicateSubset,
                    format!(
                        "subset `{}` is defined twice",
                        crate::telemetry::log_limit::clip(&s.name)
                    ),
                );
                continue;
            }
            let policy = s
                .traffic_policy
                .as_ref()
                .map(|tp| c.policy(&format!("{field}.trafficPolicy"), tp))
                .unwrap_or_default();
            subsets.push(CompiledSubset {
                name: s.name.clone(),
                labels: s.labels.clone(),
                policy,
            });
        }
    }
    if spec.export_to.iter().any(|e| e != "*") {
        c.not_implemented(
            "exportTo",
            "exportTo other than `*` (the rule applies to every namespace)",
        );
    }
    if spec.workload_selector.is_some() {
        c.not_implemented(
            "workloadSelector",
            "workloadSelector (the rule applies to every client workload)",
        );
    }
    CompiledRule {
        rule: key.clone(),
        service,
        policy,
        subsets,
        problems: c.problems,
        created: dr
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
    }
}

#[cfg(test)]
#[path = "traffic_policy_tests.rs"]
mod tests;
