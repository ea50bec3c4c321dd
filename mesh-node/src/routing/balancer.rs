//! Choosing where a connection goes once its destination is resolved: a backend by
//! smooth weighted round-robin, kept per client (each backend gets W_i / ΣW of each
//! client's connections or requests, spread evenly, never bunched: [`ClientSplits`]),
//! then an endpoint by round-robin or least-connections.
//!
//! Every pick comes back as a [`Pick`], through which the caller reports what became of
//! it ([`Outcome`]); a pick dropped without a report counts as [`Outcome::Abandoned`].
//! The outcomes go to the balancer's [`OutcomeObserver`] — the place passive health
//! checking (outlier detection) plugs in. Least-connections counts a pick as in flight
//! for as long as it is held.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use crate::{
    keys::ObjectKey,
    routing::backend::Backend,
    routing::splits::{signature, ClientSplits, SignatureEntry},
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

/// The endpoint round-robin of one backend (Service port), shared by every frontend
/// that routes to it.
#[derive(Debug, Default)]
struct BackendSlot {
    turn: AtomicUsize,
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
}

impl Default for Balancer {
    fn default() -> Balancer {
        Balancer {
            id: BALANCERS.fetch_add(1, Ordering::Relaxed),
            frontends: Mutex::default(),
            backends: Mutex::default(),
            active: Active::default(),
            observer: None,
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
    /// Per eligible backend: its pick counter for this frontend, and its round-robin.
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

/// Counts a pick in flight while it lives, and reports it abandoned when dropped
/// without any report.
struct PickGuard {
    active: Active,
    endpoint: SocketAddr,
    reported: AtomicBool,
    reporting: Option<Reporting>,
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
        self.endpoint_of(eligible.clone().nth(k)?, backend_slot, name)
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

    /// An endpoint of `backend` by round-robin or least-connections; None without any.
    pub fn pick_endpoint(&self, backend: &Backend) -> Option<Pick> {
        if backend.endpoints.is_empty() {
            return None;
        }
        let slot = slot(&self.backends, &backend.service, backend.port);
        self.endpoint_of(backend, &slot, Arc::new(backend.service.clone()))
    }

    fn endpoint_of(
        &self,
        backend: &Backend,
        slot: &BackendSlot,
        name: Arc<ObjectKey>,
    ) -> Option<Pick> {
        let n = backend.endpoints.len();
        if n == 0 {
            return None;
        }
        let turn = slot.turn.fetch_add(1, Ordering::Relaxed);
        let mut active = lock(&self.active);
        let endpoint = if backend.least_connections {
            // Fewest in flight; ties broken in round-robin order.
            (0..n)
                .map(|k| backend.endpoints[turn.wrapping_add(k) % n])
                .min_by_key(|e| active.get(e).copied().unwrap_or(0))
                .unwrap_or(backend.endpoints[0])
        } else {
            backend.endpoints[turn % n]
        };
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
            },
            backend: name,
            endpoint,
        })
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
mod tests {
    use super::*;

    fn backend(name: &str, weight: u32, endpoints: &[&str], least: bool) -> Backend {
        Backend {
            service: ObjectKey::new("apps", name),
            port: 80,
            weight,
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            least_connections: least,
            subset: None,
        }
    }

    fn shares(b: &Balancer, backends: &[Backend], n: usize) -> HashMap<String, usize> {
        let svc = ObjectKey::new("apps", "web");
        let mut counts = HashMap::new();
        let client = ClientSplits::new();
        for _ in 0..n {
            let p = b.pick(&client, &svc, 80, backends).unwrap();
            *counts.entry(p.backend.name.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn weights_give_exact_shares_and_zero_gets_nothing() {
        let b = Balancer::new();
        let backends = [
            backend("v1", 90, &["10.0.0.1:80"], false),
            backend("v2", 10, &["10.0.0.2:80"], false),
            backend("v3", 0, &["10.0.0.3:80"], false),
        ];
        let counts = shares(&b, &backends, 1000);
        assert_eq!(counts["v1"], 900);
        assert_eq!(counts["v2"], 100);
        assert!(!counts.contains_key("v3"));
        let picks = b.picks();
        let web = &picks[&(ObjectKey::new("apps", "web"), 80)];
        assert_eq!(web[&ObjectKey::new("apps", "v1")], 900);
        assert_eq!(web[&ObjectKey::new("apps", "v2")], 100);
    }

    #[test]
    fn picks_are_spread_not_bunched() {
        let b = Balancer::new();
        let c = ClientSplits::new();
        let backends = [
            backend("a", 1, &["10.0.0.1:80"], false),
            backend("b", 1, &["10.0.0.2:80"], false),
        ];
        let svc = ObjectKey::new("apps", "web");
        let seq: Vec<String> = (0..6)
            .map(|_| {
                b.pick(&c, &svc, 80, &backends)
                    .unwrap()
                    .backend
                    .name
                    .clone()
            })
            .collect();
        assert_eq!(seq, ["a", "b", "a", "b", "a", "b"]);
    }

    #[test]
    fn backends_without_endpoints_are_skipped_and_none_means_none() {
        let b = Balancer::new();
        let backends = [
            backend("v1", 90, &[], false),
            backend("v2", 10, &["10.0.0.2:80"], false),
        ];
        assert_eq!(shares(&b, &backends, 10)["v2"], 10);
        assert!(b
            .pick(
                &ClientSplits::new(),
                &ObjectKey::new("apps", "web"),
                80,
                &[backend("v1", 5, &[], false)]
            )
            .is_none());
    }

    #[test]
    fn least_connections_prefers_the_idle_endpoint_and_guards_release() {
        let b = Balancer::new();
        let c = ClientSplits::new();
        let svc = ObjectKey::new("apps", "web");
        let backends = [backend("v1", 1, &["10.0.0.1:80", "10.0.0.2:80"], true)];
        let first = b.pick(&c, &svc, 80, &backends).unwrap();
        let second = b.pick(&c, &svc, 80, &backends).unwrap();
        assert_ne!(first.endpoint, second.endpoint);
        let busy = first.endpoint;
        drop(second);
        // `busy` still has one connection: the next two picks go to the other one first.
        let third = b.pick(&c, &svc, 80, &backends).unwrap();
        assert_ne!(third.endpoint, busy);
        assert_eq!(b.active(&busy), 1);
        drop(first);
        assert_eq!(b.active(&busy), 0);
    }

    /// Records every outcome, in order.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, SocketAddr, Outcome)>>);

    impl OutcomeObserver for Recorder {
        fn observe(&self, backend: &ObjectKey, endpoint: SocketAddr, outcome: Outcome) {
            lock(&self.0).push((backend.name.clone(), endpoint, outcome));
        }
    }

    #[test]
    fn outcomes_reach_the_observer_and_an_unreported_pick_is_abandoned() {
        let recorder = Arc::new(Recorder::default());
        let b = Balancer::with_observer(recorder.clone());
        let c = ClientSplits::new();
        let svc = ObjectKey::new("apps", "web");
        let backends = [backend("v1", 1, &["10.0.0.1:80", "10.0.0.2:80"], true)];
        let ms = Duration::from_millis;

        let connected = b.pick(&c, &svc, 80, &backends).unwrap();
        let first = connected.endpoint;
        connected.report(Outcome::Connected { latency: ms(2) });
        connected.report(Outcome::Reset);
        // Least-connections still sees it in flight until it is dropped.
        assert_eq!(b.active(&first), 1);
        drop(connected);
        assert_eq!(b.active(&first), 0);

        let http = b.pick(&c, &svc, 80, &backends).unwrap();
        let second = http.endpoint;
        http.report(Outcome::Http {
            status: 503,
            latency: ms(7),
        });
        drop(http);

        let forgotten = b.pick(&c, &svc, 80, &backends).unwrap();
        let third = forgotten.endpoint;
        drop(forgotten);

        let seen = lock(&recorder.0).clone();
        let v1 = |e, o| ("v1".to_string(), e, o);
        assert_eq!(
            seen,
            [
                v1(first, Outcome::Connected { latency: ms(2) }),
                v1(first, Outcome::Reset),
                v1(
                    second,
                    Outcome::Http {
                        status: 503,
                        latency: ms(7)
                    }
                ),
                v1(third, Outcome::Abandoned),
            ]
        );
    }

    #[test]
    fn weighted_choice_is_the_same_over_any_view_of_the_backends() {
        // L7 chooses among every weighted backendRef (with or without endpoints), by
        // index into the rule's list; a zero weight is skipped, not counted.
        let b = Balancer::new();
        let c = ClientSplits::new();
        let backends = [
            backend("off", 0, &["10.0.0.9:80"], false),
            backend("a", 3, &[], false),
            backend("b", 1, &["10.0.0.2:80"], false),
        ];
        let refs: Vec<&Backend> = backends.iter().collect();
        let svc = ObjectKey::new("apps", "rule");
        let seq: Vec<usize> = (0..8)
            .map(|_| b.choose_backend(&c, &svc, 80, &refs).unwrap())
            .collect();
        assert_eq!(seq, [1, 1, 2, 1, 1, 1, 2, 1]);
        let picks = b.picks();
        let shares = &picks[&(svc, 80)];
        assert_eq!(shares[&ObjectKey::new("apps", "a")], 6);
        assert_eq!(shares[&ObjectKey::new("apps", "b")], 2);
    }
}
