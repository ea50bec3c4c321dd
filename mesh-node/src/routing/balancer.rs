//! Choosing where a connection goes once its destination is resolved: a backend by
//! smooth weighted round-robin, kept per client (each backend gets W_i / ΣW of each
//! client's connections or requests, spread evenly, never bunched: [`ClientSplits`]),
//! then an endpoint by the backend's policy (round-robin, random, or least-request by
//! power of two choices), skipping endpoints outlier detection has ejected
//! (`routing::outlier`).
//!
//! Every pick comes back as a [`Pick`], through which the caller reports what became of
//! it ([`Outcome`]); a pick dropped without a report counts as [`Outcome::Abandoned`].
//! The outcomes go to the balancer's [`OutcomeObserver`] — the place passive health
//! checking (outlier detection) plugs in. Least-connections counts a pick as in flight
//! for as long as it is held.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use crate::{
    keys::ObjectKey,
    routing::backend::{Backend, LbPolicy, OutlierPolicy},
    routing::hash_key::connection_hash,
    routing::outlier::{EndpointOutlier, Outliers, Signal},
    routing::splits::{signature, ClientSplits, SignatureEntry},
    telemetry::metrics::OutlierMetrics,
};

/// What became of a pick, as the proxy saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The connection to the endpoint (TCP, or the HBONE tunnel, or the HTTP
    /// connection with its handshake) was made after `latency`.
    Connected { latency: Duration },
    /// The connection to the endpoint could not be made (refused, unreachable, timed
    /// out, TLS or HTTP handshake failed).
    ConnectFailed,
    /// The endpoint's agent refused the tunnel: its authorization policy denies the
    /// source (not a sign of the endpoint's health).
    Denied,
    /// An established connection or a sent request failed (reset, broken pipe).
    Reset,
    /// The endpoint answered an HTTP request with `status`, `latency` after it was sent.
    Http { status: u16, latency: Duration },
    /// The endpoint did not answer within the route's timeout.
    Timeout,
    /// The pick was dropped without any report (the client went away, the request's
    /// overall timeout fired, ...).
    Abandoned,
}

impl Outcome {
    /// What the outcome says about the endpoint's health (outlier detection).
    fn signal(self) -> Signal {
        match self {
            Outcome::Connected { .. } => Signal::Connected,
            Outcome::Http { status, .. } => Signal::Http(status),
            Outcome::ConnectFailed | Outcome::Reset | Outcome::Timeout => Signal::LocalFailure,
            Outcome::Denied | Outcome::Abandoned => Signal::Nothing,
        }
    }
}

/// Receives the outcome of every pick: where passive health checking plugs in.
pub trait OutcomeObserver: Send + Sync {
    /// `endpoint` of `backend` (a Service) had `outcome`. Called on the proxy's task:
    /// must not block.
    fn observe(&self, backend: &ObjectKey, endpoint: SocketAddr, outcome: Outcome);
}

/// The observed shares of one frontend (the round-robin state is each client's:
/// [`ClientSplits`]).
#[derive(Debug, Default)]
struct FrontendSlot {
    picks: Mutex<HashMap<ObjectKey, Arc<AtomicU64>>>,
}

impl FrontendSlot {
    fn counter(&self, backend: &ObjectKey) -> Arc<AtomicU64> {
        let mut picks = lock(&self.picks);
        if let Some(c) = picks.get(backend) {
            return c.clone();
        }
        picks.entry(backend.clone()).or_default().clone()
    }
}

/// The endpoint round-robin and outlier state of one backend (Service port), shared
/// by every frontend that routes to it.
#[derive(Debug, Default)]
struct BackendSlot {
    turn: AtomicUsize,
    outliers: Outliers,
}

/// State kept per key (no clone of the key to look it up), made on first use.
type ByPort<T> = HashMap<ObjectKey, HashMap<u16, Arc<T>>>;

fn slot<T: Default>(map: &Mutex<ByPort<T>>, key: &ObjectKey, port: u16) -> Arc<T> {
    let mut map = lock(map);
    if let Some(slot) = map.get(key).and_then(|ports| ports.get(&port)) {
        return slot.clone();
    }
    map.entry(key.clone())
        .or_default()
        .entry(port)
        .or_default()
        .clone()
}

/// Connections in flight per endpoint (least-connections and the admin view).
type Active = Arc<Mutex<HashMap<SocketAddr, u32>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Picks per backend Service, per frontend (Service port): the observed shares.
pub type PickCounts = BTreeMap<(ObjectKey, u16), BTreeMap<ObjectKey, u64>>;

/// Tells balancers apart (a [`PickSlots`] belongs to one).
static BALANCERS: AtomicU64 = AtomicU64::new(0);

pub struct Balancer {
    id: u64,
    frontends: Mutex<ByPort<FrontendSlot>>,
    backends: Mutex<ByPort<BackendSlot>>,
    active: Active,
    observer: Option<Arc<dyn OutcomeObserver>>,
    outlier_metrics: Option<Arc<OutlierMetrics>>,
}

impl Default for Balancer {
    fn default() -> Balancer {
        Balancer {
            id: BALANCERS.fetch_add(1, Ordering::Relaxed),
            frontends: Mutex::default(),
            backends: Mutex::default(),
            active: Active::default(),
            observer: None,
            outlier_metrics: None,
        }
    }
}

/// The backends a pick chooses among: a positive weight and at least one ready
/// endpoint. (The trace lists the same set as the candidates.)
pub fn eligible(backends: &[Backend]) -> Vec<&Backend> {
    backends.iter().filter(|b| b.is_eligible()).collect()
}

/// A frontend's balancer state, looked up once for a routing table entry (one
/// snapshot's eligible backends of one Service port) instead of once per pick.
#[derive(Default)]
pub struct PickSlots(OnceLock<Slots>);

struct Slots {
    balancer: u64,
    signature: Arc<Vec<SignatureEntry>>,
    /// Per eligible backend: its pick counter for this frontend, and its endpoint state.
    backends: Vec<(Arc<AtomicU64>, Arc<BackendSlot>)>,
    /// Per eligible backend: its name, for the picks.
    names: Vec<Arc<ObjectKey>>,
}

impl Clone for PickSlots {
    /// A copy starts empty (the slots are looked up again on its first pick).
    fn clone(&self) -> PickSlots {
        PickSlots::default()
    }
}

impl PartialEq for PickSlots {
    /// A cache: never part of what it is attached to.
    fn eq(&self, _: &PickSlots) -> bool {
        true
    }
}

impl Eq for PickSlots {}

impl std::fmt::Debug for PickSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PickSlots")
    }
}

/// The chosen backend and endpoint. Holding it counts the connection as in flight
/// (least-connections); report what became of it with [`Pick::report`] — dropped
/// without a report, it counts as [`Outcome::Abandoned`].
#[derive(Debug)]
pub struct Pick {
    pub backend: Arc<ObjectKey>,
    pub endpoint: SocketAddr,
    guard: PickGuard,
}

impl Pick {
    /// Reports what became of the pick; may be called more than once (connected, then
    /// reset).
    pub fn report(&self, outcome: Outcome) {
        self.guard.report(outcome);
    }
}

/// Where a pick's outcomes go: the backend it was for (kept only when there is an
/// observer to tell).
struct Reporting {
    observer: Arc<dyn OutcomeObserver>,
    backend: Arc<ObjectKey>,
}

/// Where a pick's outcomes count for outlier detection (when the backend has it).
struct OutlierReporting {
    slot: Arc<BackendSlot>,
    policy: OutlierPolicy,
    /// The backend's endpoints when picked (the ejection cap's base).
    total: usize,
    backend: Arc<ObjectKey>,
    metrics: Option<Arc<OutlierMetrics>>,
}

/// Counts a pick in flight while it lives, and reports it abandoned when dropped
/// without any report.
struct PickGuard {
    active: Active,
    endpoint: SocketAddr,
    reported: AtomicBool,
    reporting: Option<Reporting>,
    outlier: Option<OutlierReporting>,
}

impl std::fmt::Debug for PickGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickGuard")
            .field("reported", &self.reported)
            .finish_non_exhaustive()
    }
}

impl PickGuard {
    fn report(&self, outcome: Outcome) {
        self.reported.store(true, Ordering::Relaxed);
        if let Some(o) = &self.outlier {
            o.slot.outliers.observe(
                &o.backend,
                &o.policy,
                self.endpoint,
                o.total,
                outcome.signal(),
                o.metrics.as_deref(),
            );
        }
        if let Some(r) = &self.reporting {
            r.observer.observe(&r.backend, self.endpoint, outcome);
        }
    }
}

impl Drop for PickGuard {
    fn drop(&mut self) {
        if !self.reported.load(Ordering::Relaxed) {
            self.report(Outcome::Abandoned);
        }
        let mut active = lock(&self.active);
        if let Some(n) = active.get_mut(&self.endpoint) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.endpoint);
            }
        }
    }
}

impl Balancer {
    pub fn new() -> Balancer {
        Balancer::default()
    }

    /// A balancer whose picks report their outcomes to `observer`.
    pub fn with_observer(observer: Arc<dyn OutcomeObserver>) -> Balancer {
        Balancer {
            observer: Some(observer),
            ..Balancer::default()
        }
    }

    /// Counts outlier ejections in `metrics`.
    pub fn with_outlier_metrics(mut self, metrics: OutlierMetrics) -> Balancer {
        self.outlier_metrics = Some(Arc::new(metrics));
        self
    }

    /// Picks for a connection to `service:port`; None when no backend with a positive
    /// weight has a ready endpoint (L4: a backend without endpoints gives its share to
    /// the others, so connections keep flowing).
    pub fn pick(
        &self,
        client: &ClientSplits,
        service: &ObjectKey,
        port: u16,
        backends: &[Backend],
    ) -> Option<Pick> {
        let eligible = backends.iter().filter(|b| b.is_eligible());
        let k = self.choose(client, service, port, eligible.clone())?;
        self.pick_endpoint(eligible.clone().nth(k)?)
    }

    /// [`Balancer::pick`] among `eligible` backends (each with a positive weight and a
    /// ready endpoint, always the same for one `slots`), with the balancer state looked
    /// up once per `slots` instead of once per pick.
    pub fn pick_cached<'b, I>(
        &self,
        client: &ClientSplits,
        slots: &PickSlots,
        service: &ObjectKey,
        port: u16,
        eligible: I,
    ) -> Option<Pick>
    where
        I: Iterator<Item = &'b Backend> + Clone,
    {
        self.pick_cached_from(client, slots, service, port, eligible, None)
    }

    /// [`Balancer::pick_cached`] for a connection from `source` (the client pod's IP):
    /// a backend whose policy hashes the source IP (`consistentHash.useSourceIp`) sends
    /// every connection of one client to one endpoint.
    pub fn pick_cached_from<'b, I>(
        &self,
        client: &ClientSplits,
        slots: &PickSlots,
        service: &ObjectKey,
        port: u16,
        eligible: I,
        source: Option<IpAddr>,
    ) -> Option<Pick>
    where
        I: Iterator<Item = &'b Backend> + Clone,
    {
        let fresh;
        let slots = match slots.0.get() {
            Some(s) if s.balancer == self.id => s,
            Some(_) => {
                // Cached for another balancer: look up this one's state (not kept).
                fresh = self.slots(service, port, eligible.clone());
                &fresh
            }
            None => slots
                .0
                .get_or_init(|| self.slots(service, port, eligible.clone())),
        };
        let k = match slots.backends.len() {
            0 => return None,
            1 => 0,
            _ => client.next_for(service, port, &slots.signature),
        };
        let (count, backend_slot) = slots.backends.get(k)?;
        count.fetch_add(1, Ordering::Relaxed);
        let name = slots.names.get(k)?.clone();
        let backend = eligible.clone().nth(k)?;
        let hash =
            source.and_then(|ip| connection_hash(backend.policy.consistent_hash.as_ref(), ip));
        self.endpoint_of(backend, backend_slot, name, hash)
    }

    fn slots<'b>(
        &self,
        service: &ObjectKey,
        port: u16,
        eligible: impl Iterator<Item = &'b Backend> + Clone,
    ) -> Slots {
        let frontend = slot(&self.frontends, service, port);
        let backends = eligible
            .clone()
            .map(|b| {
                (
                    frontend.counter(&b.service),
                    slot(&self.backends, &b.service, b.port),
                )
            })
            .collect();
        Slots {
            balancer: self.id,
            names: eligible
                .clone()
                .map(|b| Arc::new(b.service.clone()))
                .collect(),
            signature: Arc::new(signature(eligible)),
            backends,
        }
    }

    /// Index into `backends` of the next weighted choice for `frontend:port`, by smooth
    /// weighted round-robin over those with a positive weight; None if there is none.
    pub fn choose_backend(
        &self,
        client: &ClientSplits,
        frontend: &ObjectKey,
        port: u16,
        backends: &[&Backend],
    ) -> Option<usize> {
        self.choose_among(client, frontend, port, backends.iter().copied())
    }

    /// [`Balancer::choose_backend`] over any sequence of backends.
    pub fn choose_among<'b, I>(
        &self,
        client: &ClientSplits,
        frontend: &ObjectKey,
        port: u16,
        backends: I,
    ) -> Option<usize>
    where
        I: Iterator<Item = &'b Backend> + Clone,
    {
        let positive = backends.clone().filter(|b| b.weight > 0);
        let k = self.choose(client, frontend, port, positive)?;
        backends
            .enumerate()
            .filter(|(_, b)| b.weight > 0)
            .nth(k)
            .map(|(i, _)| i)
    }

    /// Index into `candidates` (all with a positive weight) of the next weighted choice.
    fn choose<'b, I>(
        &self,
        client: &ClientSplits,
        frontend: &ObjectKey,
        port: u16,
        candidates: I,
    ) -> Option<usize>
    where
        I: Iterator<Item = &'b Backend> + Clone,
    {
        let n = candidates.clone().count();
        if n == 0 {
            return None;
        }
        let state = slot(&self.frontends, frontend, port);
        let chosen = if n == 1 {
            0
        } else {
            client.next(frontend, port, candidates.clone())
        };
        // Observed shares: the weighted choice, per connection (L4) or request (L7).
        let service = &candidates.clone().nth(chosen)?.service;
        state.counter(service).fetch_add(1, Ordering::Relaxed);
        Some(chosen)
    }

    /// An endpoint of `backend` by its policy, skipping ejected endpoints; None
    /// without any (or when every one is ejected).
    pub fn pick_endpoint(&self, backend: &Backend) -> Option<Pick> {
        self.pick_endpoint_hashed(backend, None)
    }

    /// [`Balancer::pick_endpoint`] for a request whose consistent-hash key hashes to
    /// `hash` (None: it has none; or the backend does not hash).
    pub fn pick_endpoint_hashed(&self, backend: &Backend, hash: Option<u64>) -> Option<Pick> {
        if backend.endpoints.is_empty() {
            return None;
        }
        let slot = slot(&self.backends, &backend.service, backend.port);
        self.endpoint_of(backend, &slot, Arc::new(backend.service.clone()), hash)
    }

    /// Which of `backend`'s endpoints outlier detection skips now (None: none).
    fn skipped(
        &self,
        backend: &Backend,
        slot: &BackendSlot,
        name: &ObjectKey,
    ) -> Option<Vec<bool>> {
        backend
            .policy
            .outlier_detection
            .as_ref()
            .filter(|_| slot.outliers.any_ejected())
            .map(|policy| {
                slot.outliers.skip(
                    name,
                    policy,
                    &backend.endpoints,
                    self.outlier_metrics.as_deref(),
                )
            })
            .filter(|skip| skip.iter().any(|s| *s))
    }

    /// The endpoint a consistent-hash key that hashes to `hash` lands on now, as a
    /// pick would choose it (ejected endpoints skipped), without picking it: what
    /// `meshctl node trace` shows. None when `backend` does not hash by key or every
    /// endpoint is ejected.
    pub fn hashed_endpoint(&self, backend: &Backend, hash: u64) -> Option<SocketAddr> {
        // An existing slot only: a trace leaves no state behind.
        let slot = lock(&self.backends)
            .get(&backend.service)
            .and_then(|ports| ports.get(&backend.port))
            .cloned();
        let skip = slot
            .as_ref()
            .and_then(|slot| self.skipped(backend, slot, &backend.service));
        ring_lookup(backend, hash, |i| skip.as_ref().is_none_or(|s| !s[i]))
    }

    /// The endpoint a key hashing to `hash` lands on with no endpoint ejected (the ring
    /// alone decides): a trace computed away from a live balancer.
    pub fn ring_endpoint(backend: &Backend, hash: u64) -> Option<SocketAddr> {
        ring_lookup(backend, hash, |_| true)
    }

    fn endpoint_of(
        &self,
        backend: &Backend,
        slot: &Arc<BackendSlot>,
        name: Arc<ObjectKey>,
        hash: Option<u64>,
    ) -> Option<Pick> {
        let endpoints = &backend.endpoints;
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let outlier = backend.policy.outlier_detection.as_ref();
        let skip = self.skipped(backend, slot, &name);
        let allowed = |i: usize| skip.as_ref().is_none_or(|s| !s[i]);
        let available = skip
            .as_ref()
            .map_or(n, |s| s.iter().filter(|s| !**s).count());
        if available == 0 {
            return None;
        }
        // The k-th allowed endpoint, in order.
        let nth_allowed = |k: usize| -> usize {
            match &skip {
                None => k,
                Some(_) => (0..n).filter(|i| allowed(*i)).nth(k).unwrap_or(0),
            }
        };
        // The consistent-hash ring, built (once per backend) before taking the lock.
        let ring = match (
            backend.policy.load_balancer,
            hash,
            &backend.policy.consistent_hash,
        ) {
            (LbPolicy::ConsistentHash, Some(h), Some(policy)) => {
                Some((h, backend.ring.get(endpoints, policy.table)))
            }
            _ => None,
        };
        let mut active = lock(&self.active);
        let index = match backend.policy.load_balancer {
            LbPolicy::RoundRobin => {
                let turn = slot.turn.fetch_add(1, Ordering::Relaxed);
                nth_allowed(turn % available)
            }
            LbPolicy::Random => nth_allowed(rand::random_range(0..available)),
            // The key's endpoint on the ring, or the next one outlier detection has
            // not ejected; without a key, at random (as Envoy).
            LbPolicy::ConsistentHash => ring
                .and_then(|(h, ring)| ring.lookup(h, allowed))
                .unwrap_or_else(|| nth_allowed(rand::random_range(0..available))),
            LbPolicy::LeastRequest if available == 1 => nth_allowed(0),
            LbPolicy::LeastRequest => {
                // Power of two choices: two distinct endpoints at random, the one
                // with fewer picks in flight (the first on a tie).
                let a = rand::random_range(0..available);
                let b = (a + rand::random_range(1..available)) % available;
                let (a, b) = (nth_allowed(a), nth_allowed(b));
                let load = |i: usize| active.get(&endpoints[i]).copied().unwrap_or(0);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
        };
        let endpoint = endpoints[index];
        *active.entry(endpoint).or_insert(0) += 1;
        drop(active);
        Some(Pick {
            guard: PickGuard {
                active: self.active.clone(),
                endpoint,
                reported: AtomicBool::new(false),
                reporting: self.observer.as_ref().map(|observer| Reporting {
                    observer: observer.clone(),
                    backend: name.clone(),
                }),
                outlier: outlier.map(|policy| OutlierReporting {
                    slot: slot.clone(),
                    policy: *policy,
                    total: n,
                    backend: name.clone(),
                    metrics: self.outlier_metrics.clone(),
                }),
            },
            backend: name,
            endpoint,
        })
    }

    /// Outlier state of the endpoints of `service:port` (empty when none was tracked).
    pub fn outliers(&self, service: &ObjectKey, port: u16) -> Vec<EndpointOutlier> {
        let backends = lock(&self.backends);
        backends
            .get(service)
            .and_then(|ports| ports.get(&port))
            .map(|slot| slot.outliers.view())
            .unwrap_or_default()
    }

    /// How often each backend was picked for each frontend since the agent started.
    pub fn picks(&self) -> PickCounts {
        let frontends = lock(&self.frontends);
        let mut out = PickCounts::new();
        for (frontend, ports) in frontends.iter() {
            for (port, state) in ports {
                for (backend, n) in lock(&state.picks).iter() {
                    let n = n.load(Ordering::Relaxed);
                    if n > 0 {
                        out.entry((frontend.clone(), *port))
                            .or_default()
                            .insert(backend.clone(), n);
                    }
                }
            }
        }
        out
    }

    /// Connections in flight to `endpoint`.
    pub fn active(&self, endpoint: &SocketAddr) -> u32 {
        lock(&self.active).get(endpoint).copied().unwrap_or(0)
    }
}

#[cfg(test)]
#[path = "balancer_tests.rs"]
mod tests;

/// The endpoint of `backend`'s ring (consistent hash only) for `hash`, among those
/// `allowed`.
fn ring_lookup(
    backend: &Backend,
    hash: u64,
    allowed: impl Fn(usize) -> bool,
) -> Option<SocketAddr> {
    let policy = backend
        .policy
        .consistent_hash
        .as_ref()
        .filter(|_| backend.policy.load_balancer == LbPolicy::ConsistentHash)?;
    if backend.endpoints.is_empty() {
        return None;
    }
    let ring = backend.ring.get(&backend.endpoints, policy.table);
    ring.lookup(hash, allowed)
        .and_then(|i| backend.endpoints.get(i).copied())
}
