//! Outlier detection (passive health checking) of one backend (Service port): the
//! outcomes of its picks, counted per endpoint, eject an endpoint that fails
//! `consecutive5xxErrors` (any 5xx), `consecutiveGatewayErrors` (502, 503, 504) or
//! `consecutiveLocalOriginFailures` (connect failures, resets, timeouts) times in a row.
//! An ejected endpoint gets no new connection or request for `baseEjectionTime` times
//! the number of times it has been ejected.
//!
//! Local-origin failures are always counted on their own, as Envoy does with
//! `splitExternalLocalOriginErrors: true` (Istio's default is false, where Envoy turns
//! them into 5xx): `consecutiveLocalOriginFailures` (default 5, as Envoy's) is what
//! plain TCP traffic can use, and a refused connection does not count as a 5xx. A
//! connection made resets the local-origin count; an HTTP answer below 500 resets them
//! all. An endpoint comes back as soon as its time is up (Envoy: at the next
//! `interval`).
//!
//! At most `maxEjectionPercent` of the endpoints are ejected at once, but always one
//! may be (as Envoy); below `minHealthPercent` healthy endpoints, ejections are ignored
//! (Envoy's panic threshold). State is kept only for the backend's current endpoints
//! (and at most [`MAX_TRACKED`]); an endpoint that leaves is forgotten at the next
//! sweep (every `interval`).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    discovery::traffic_policy::OutlierPolicy, keys::ObjectKey, telemetry::metrics::OutlierMetrics,
};

/// At most this many endpoints of one backend have outlier state.
pub const MAX_TRACKED: usize = 4096;
/// An endpoint's ejection time stops growing at this many times the base (Envoy's
/// max_ejection_time defaults to 300s, i.e. 10 × the default 30s).
const MAX_MULTIPLIER: u32 = 10;

/// What an outcome of a pick says about the endpoint's health (the balancer turns
/// its `Outcome`s into these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// A connection was made.
    Connected,
    /// A connect failure, reset or timeout: the endpoint's fault, seen locally.
    LocalFailure,
    /// An HTTP answer with this status.
    Http(u16),
    /// Nothing about health (denied by policy, abandoned by the client).
    Nothing,
}

/// Why an endpoint was ejected: the `reason` label of the ejection counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EjectReason {
    #[serde(rename = "consecutive_5xx")]
    Consecutive5xx,
    #[serde(rename = "consecutive_gateway_error")]
    ConsecutiveGateway,
    #[serde(rename = "consecutive_local_origin_failure")]
    ConsecutiveLocalOrigin,
}

impl EjectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EjectReason::Consecutive5xx => "consecutive_5xx",
            EjectReason::ConsecutiveGateway => "consecutive_gateway_error",
            EjectReason::ConsecutiveLocalOrigin => "consecutive_local_origin_failure",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct EndpointHealth {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    /// Times ejected so far.
    ejections: u32,
    ejected_until: Option<Instant>,
    last_reason: Option<EjectReason>,
}

/// One endpoint's outlier state, for the admin view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointOutlier {
    pub endpoint: SocketAddr,
    pub ejected: bool,
    /// When the ejection ends (milliseconds since the Unix epoch).
    pub ejected_until_unix_ms: Option<u64>,
    pub ejections: u32,
    pub last_reason: Option<EjectReason>,
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local_origin: u32,
}

/// The outlier state of one backend (Service port).
#[derive(Debug, Default)]
pub(crate) struct Outliers {
    /// Endpoints ejected right now (a cheap check on every pick).
    ejected: AtomicUsize,
    state: std::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<SocketAddr, EndpointHealth>,
    next_sweep: Option<Instant>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Metric labels of a backend: Istio's destination_service names.
fn labels(service: &ObjectKey) -> [String; 3] {
    [
        service.service_fqdn(),
        service.name.clone(),
        service.namespace.clone(),
    ]
}

impl Outliers {
    /// Whether any endpoint may be ejected (the fast path of every pick).
    pub(crate) fn any_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed) > 0
    }

    /// Which of `endpoints` (the backend's current ones, sorted) to skip now: ends
    /// ejections whose time is up and forgets endpoints that left (every `interval`).
    /// All false when ejections are ignored (`minHealthPercent`).
    pub(crate) fn skip(
        &self,
        service: &ObjectKey,
        policy: &OutlierPolicy,
        endpoints: &[SocketAddr],
        metrics: Option<&OutlierMetrics>,
    ) -> Vec<bool> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        self.sweep(&mut state, service, policy, endpoints, now, metrics);
        let skip: Vec<bool> = endpoints
            .iter()
            .map(|e| {
                state
                    .endpoints
                    .get(e)
                    .is_some_and(|h| h.ejected_until.is_some())
            })
            .collect();
        let n = endpoints.len();
        let healthy = skip.iter().filter(|s| !**s).count();
        if healthy * 100 < policy.min_health_percent as usize * n {
            return vec![false; n];
        }
        skip
    }

    /// Ends expired ejections; every `interval`, forgets endpoints no longer listed.
    fn sweep(
        &self,
        state: &mut State,
        service: &ObjectKey,
        policy: &OutlierPolicy,
        endpoints: &[SocketAddr],
        now: Instant,
        metrics: Option<&OutlierMetrics>,
    ) {
        let mut ended = 0;
        for h in state.endpoints.values_mut() {
            if h.ejected_until.is_some_and(|t| t <= now) {
                h.ejected_until = None;
                ended += 1;
            }
        }
        if state.next_sweep.is_none_or(|t| t <= now) {
            state.next_sweep = Some(now + policy.interval);
            let before = state.endpoints.len();
            state.endpoints.retain(|e, h| {
                let keep = endpoints.binary_search(e).is_ok();
                if !keep && h.ejected_until.is_some() {
                    ended += 1;
                }
                keep
            });
            if state.endpoints.len() != before {
                tracing::debug!(service = %service, forgotten = before - state.endpoints.len(), "outlier state of departed endpoints dropped");
            }
        }
        if ended > 0 {
            self.ejected.fetch_sub(ended, Ordering::Relaxed);
            if let Some(m) = metrics {
                m.ejected
                    .with_label_values(&labels(service))
                    .sub(ended as i64);
            }
        }
    }

    /// Counts one outcome of a pick of `endpoint` (one of `total` endpoints) and ejects
    /// it when a threshold is reached and the cap allows.
    pub(crate) fn observe(
        &self,
        service: &ObjectKey,
        policy: &OutlierPolicy,
        endpoint: SocketAddr,
        total: usize,
        signal: Signal,
        metrics: Option<&OutlierMetrics>,
    ) {
        if signal == Signal::Nothing {
            return;
        }
        let mut state = lock(&self.state);
        let tracked = state.endpoints.len();
        let ejected_now = self.ejected.load(Ordering::Relaxed);
        let h = match state.endpoints.get_mut(&endpoint) {
            Some(h) => h,
            None if tracked >= MAX_TRACKED => return,
            None => state.endpoints.entry(endpoint).or_default(),
        };
        if h.ejected_until.is_some() {
            // Outcomes of picks made before the ejection change nothing.
            return;
        }
        let bump = |n: &mut u32| *n = n.saturating_add(1);
        match signal {
            Signal::Connected => h.consecutive_local = 0,
            Signal::Http(status) if status < 500 => {
                h.consecutive_local = 0;
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
            }
            Signal::Http(status) => {
                bump(&mut h.consecutive_5xx);
                if matches!(status, 502..=504) {
                    bump(&mut h.consecutive_gateway);
                } else {
                    h.consecutive_gateway = 0;
                }
            }
            Signal::LocalFailure => bump(&mut h.consecutive_local),
            Signal::Nothing => {}
        }
        let reached = |threshold: u32, n: u32| threshold > 0 && n >= threshold;
        let reason = if reached(policy.consecutive_5xx, h.consecutive_5xx) {
            EjectReason::Consecutive5xx
        } else if reached(policy.consecutive_gateway, h.consecutive_gateway) {
            EjectReason::ConsecutiveGateway
        } else if reached(policy.consecutive_local_origin, h.consecutive_local) {
            EjectReason::ConsecutiveLocalOrigin
        } else {
            return;
        };
        // The cap: always one; more only while within maxEjectionPercent.
        let allowed = ejected_now == 0
            || (ejected_now + 1) * 100 <= policy.max_ejection_percent as usize * total.max(1);
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
        h.consecutive_local = 0;
        if !allowed {
            tracing::debug!(service = %service, %endpoint, reason = reason.as_str(), "outlier not ejected: maxEjectionPercent reached");
            return;
        }
        h.ejections = h.ejections.saturating_add(1);
        let time = policy
            .base_ejection_time
            .saturating_mul(h.ejections.min(MAX_MULTIPLIER));
        h.ejected_until = Some(Instant::now() + time);
        h.last_reason = Some(reason);
        let times = h.ejections;
        self.ejected.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = metrics {
            let [fqdn, name, ns] = labels(service);
            m.ejections
                .with_label_values(&[&fqdn, &name, &ns, reason.as_str()])
                .inc();
            m.ejected.with_label_values(&[&fqdn, &name, &ns]).inc();
        }
        tracing::info!(service = %service, %endpoint, reason = reason.as_str(), times, ejected_for_ms = time.as_millis() as u64, "endpoint ejected by outlier detection");
    }

    /// Every tracked endpoint's state, for the admin view.
    pub(crate) fn view(&self) -> Vec<EndpointOutlier> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let state = lock(&self.state);
        let mut out: Vec<EndpointOutlier> = state
            .endpoints
            .iter()
            .map(|(e, h)| {
                let until = h.ejected_until.filter(|t| *t > now);
                EndpointOutlier {
                    endpoint: *e,
                    ejected: until.is_some(),
                    ejected_until_unix_ms: until.and_then(|t| {
                        let at = wall + t.saturating_duration_since(now);
                        let ms = at.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis();
                        u64::try_from(ms).ok()
                    }),
                    ejections: h.ejections,
                    last_reason: h.last_reason,
                    consecutive_5xx: h.consecutive_5xx,
                    consecutive_gateway: h.consecutive_gateway,
                    consecutive_local_origin: h.consecutive_local,
                }
            })
            .collect();
        out.sort_by_key(|o| o.endpoint);
        out
    }
}

/// How long ejections last in tests without waiting for them.
#[cfg(test)]
pub(crate) fn policy_for_tests(base: std::time::Duration) -> OutlierPolicy {
    OutlierPolicy {
        consecutive_5xx: 3,
        consecutive_gateway: 0,
        consecutive_local_origin: 2,
        interval: std::time::Duration::from_millis(10),
        base_ejection_time: base,
        max_ejection_percent: 50,
        min_health_percent: 0,
    }
}

#[cfg(test)]
#[path = "outlier_tests.rs"]
mod tests;
