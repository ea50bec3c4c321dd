//! Choosing where a connection goes once its destination is resolved: a backend by
//! smooth weighted round-robin (each backend gets W_i / ΣW of the connections, spread
//! evenly, never bunched), then an endpoint by round-robin or least-connections.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::{keys::ObjectKey, routing::resolve::Backend};

type Frontend = (ObjectKey, u16);

/// Smooth weighted round-robin state of one frontend (Service port).
#[derive(Debug, Default)]
struct Swrr {
    /// The eligible backends this state was built for; a change resets it.
    signature: Vec<(ObjectKey, u16, u32)>,
    current: Vec<i64>,
}

impl Swrr {
    /// Index into `eligible` (weights > 0) of the next pick.
    fn next(&mut self, eligible: &[&Backend]) -> usize {
        let signature: Vec<_> = eligible
            .iter()
            .map(|b| (b.service.clone(), b.port, b.weight))
            .collect();
        if signature != self.signature {
            self.signature = signature;
            self.current = vec![0; eligible.len()];
        }
        let total: i64 = eligible.iter().map(|b| i64::from(b.weight)).sum();
        let mut best = 0;
        for (i, b) in eligible.iter().enumerate() {
            self.current[i] += i64::from(b.weight);
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= total;
        best
    }
}

#[derive(Default)]
struct Choices {
    frontends: HashMap<Frontend, Swrr>,
    round_robin: HashMap<Frontend, usize>,
}

/// Connections in flight per endpoint (least-connections and the admin view).
type Active = Arc<Mutex<HashMap<SocketAddr, u32>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Picks per backend Service, per frontend (Service port): the observed shares.
pub type PickCounts = BTreeMap<(ObjectKey, u16), BTreeMap<ObjectKey, u64>>;

#[derive(Default)]
pub struct Balancer {
    choices: Mutex<Choices>,
    active: Active,
    picks: Mutex<PickCounts>,
}

/// The backends a pick chooses among: a positive weight and at least one ready
/// endpoint. (The trace lists the same set as the candidates.)
pub fn eligible(backends: &[Backend]) -> Vec<&Backend> {
    backends
        .iter()
        .filter(|b| b.weight > 0 && !b.endpoints.is_empty())
        .collect()
}

/// The chosen backend and endpoint; holding it counts the connection as active.
pub struct Pick {
    pub backend: ObjectKey,
    pub endpoint: SocketAddr,
    _active: ActiveGuard,
}

struct ActiveGuard {
    active: Active,
    endpoint: SocketAddr,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
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

    /// Picks for a connection to `service:port`; None when no backend with a positive
    /// weight has a ready endpoint (L4: a backend without endpoints gives its share to
    /// the others, so connections keep flowing).
    pub fn pick(&self, service: &ObjectKey, port: u16, backends: &[Backend]) -> Option<Pick> {
        let eligible = eligible(backends);
        let i = self.choose_backend(service, port, &eligible)?;
        self.pick_endpoint(eligible[i])
    }

    /// Index into `backends` of the next weighted choice for `frontend:port`, by smooth
    /// weighted round-robin over those with a positive weight; None if there is none.
    pub fn choose_backend(
        &self,
        frontend: &ObjectKey,
        port: u16,
        backends: &[&Backend],
    ) -> Option<usize> {
        let positive: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .collect();
        let chosen = match positive.len() {
            0 => None,
            1 => Some(positive[0]),
            _ => {
                let eligible: Vec<&Backend> = positive.iter().map(|&i| backends[i]).collect();
                let mut choices = lock(&self.choices);
                let k = choices
                    .frontends
                    .entry((frontend.clone(), port))
                    .or_default()
                    .next(&eligible);
                Some(positive[k])
            }
        }?;
        // Observed shares: the weighted choice, per connection (L4) or request (L7).
        *lock(&self.picks)
            .entry((frontend.clone(), port))
            .or_default()
            .entry(backends[chosen].service.clone())
            .or_insert(0) += 1;
        Some(chosen)
    }

    /// An endpoint of `backend` by round-robin or least-connections; None without any.
    pub fn pick_endpoint(&self, backend: &Backend) -> Option<Pick> {
        let n = backend.endpoints.len();
        if n == 0 {
            return None;
        }
        let mut choices = lock(&self.choices);
        let turn = choices
            .round_robin
            .entry((backend.service.clone(), backend.port))
            .or_insert(0);
        let mut active = lock(&self.active);
        let endpoint = if backend.least_connections {
            // Fewest in flight; ties broken in round-robin order.
            (0..n)
                .map(|k| backend.endpoints[(*turn + k) % n])
                .min_by_key(|e| active.get(e).copied().unwrap_or(0))
                .unwrap_or(backend.endpoints[0])
        } else {
            backend.endpoints[*turn % n]
        };
        *turn = turn.wrapping_add(1);
        *active.entry(endpoint).or_insert(0) += 1;
        Some(Pick {
            backend: backend.service.clone(),
            endpoint,
            _active: ActiveGuard {
                active: self.active.clone(),
                endpoint,
            },
        })
    }

    /// How often each backend was picked for each frontend since the agent started.
    pub fn picks(&self) -> PickCounts {
        lock(&self.picks).clone()
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
        }
    }

    fn shares(b: &Balancer, backends: &[Backend], n: usize) -> HashMap<String, usize> {
        let svc = ObjectKey::new("apps", "web");
        let mut counts = HashMap::new();
        for _ in 0..n {
            let p = b.pick(&svc, 80, backends).unwrap();
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
        let backends = [
            backend("a", 1, &["10.0.0.1:80"], false),
            backend("b", 1, &["10.0.0.2:80"], false),
        ];
        let svc = ObjectKey::new("apps", "web");
        let seq: Vec<String> = (0..6)
            .map(|_| b.pick(&svc, 80, &backends).unwrap().backend.name)
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
                &ObjectKey::new("apps", "web"),
                80,
                &[backend("v1", 5, &[], false)]
            )
            .is_none());
    }

    #[test]
    fn least_connections_prefers_the_idle_endpoint_and_guards_release() {
        let b = Balancer::new();
        let svc = ObjectKey::new("apps", "web");
        let backends = [backend("v1", 1, &["10.0.0.1:80", "10.0.0.2:80"], true)];
        let first = b.pick(&svc, 80, &backends).unwrap();
        let second = b.pick(&svc, 80, &backends).unwrap();
        assert_ne!(first.endpoint, second.endpoint);
        let busy = first.endpoint;
        drop(second);
        // `busy` still has one connection: the next two picks go to the other one first.
        let third = b.pick(&svc, 80, &backends).unwrap();
        assert_ne!(third.endpoint, busy);
        assert_eq!(b.active(&busy), 1);
        drop(first);
        assert_eq!(b.active(&busy), 0);
    }
}
