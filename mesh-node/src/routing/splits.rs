//! Weighted splits per client: the smooth weighted round-robin state of each frontend
//! (a Service port, or an HTTP route rule) kept per source pod, so that every client
//! gets W_i / ΣW of its own connections or requests, spread evenly.
//!
//! Why per client and not per node: with one state per node, clients on the node
//! interleave in the same cycle, and a client whose connections keep landing on the
//! same phase of it gets only one backend (two clients taking turns through a 90/10
//! split: one gets 20 % v2, the other none; 50/50: each gets one backend only).
//! Weighted random would also hold per client, but only on average; a per-client
//! round-robin holds exactly, after every ΣW picks.
//!
//! Bounded: a [`ClientSplits`] belongs to one enrolled pod's context and goes with it
//! (evicted with the pod). It is keyed by the pod, never by a source address or port,
//! so a pod opening connections from many ports still has one state; and a pod keeps
//! at most [`MAX_FRONTENDS`] frontends' states (past that, the states start over,
//! which costs that pod its evenness for one cycle and nothing else).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::{keys::ObjectKey, routing::backend::Backend};

/// Frontends (Service ports and HTTP route rules) one client keeps a state for.
pub(crate) const MAX_FRONTENDS: usize = 1024;

/// One entry of a weighted choice's signature: backend Service, port, weight.
pub(crate) type SignatureEntry = (ObjectKey, u16, u32);

pub(crate) fn signature<'b>(backends: impl Iterator<Item = &'b Backend>) -> Vec<SignatureEntry> {
    backends
        .map(|b| (b.service.clone(), b.port, b.weight))
        .collect()
}

/// Smooth weighted round-robin state of one frontend for one client.
#[derive(Debug, Default)]
struct Swrr {
    /// The eligible backends this state was built for; a change resets it.
    signature: Arc<Vec<SignatureEntry>>,
    current: Vec<i64>,
}

impl Swrr {
    /// Index into `eligible` (weights > 0) of the next pick.
    fn next<'b, I>(&mut self, eligible: I) -> usize
    where
        I: Iterator<Item = &'b Backend> + Clone,
    {
        let same = self.signature.len() == eligible.clone().count()
            && self
                .signature
                .iter()
                .zip(eligible.clone())
                .all(|((s, p, w), b)| *s == b.service && *p == b.port && *w == b.weight);
        if !same {
            self.signature = Arc::new(signature(eligible.clone()));
            self.current = vec![0; self.signature.len()];
        }
        self.step(eligible.map(|b| b.weight))
    }

    /// [`Swrr::next`] for a precomputed signature: the same signature object is the
    /// same set of backends without comparing them.
    fn next_for(&mut self, signature: &Arc<Vec<SignatureEntry>>) -> usize {
        if !Arc::ptr_eq(&self.signature, signature) {
            if *self.signature != **signature {
                self.current = vec![0; signature.len()];
            }
            self.signature = signature.clone();
        }
        self.step(signature.iter().map(|(_, _, w)| *w))
    }

    fn step(&mut self, weights: impl Iterator<Item = u32> + Clone) -> usize {
        let total: i64 = weights.clone().map(i64::from).sum();
        let mut best = 0;
        for (i, w) in weights.enumerate() {
            self.current[i] += i64::from(w);
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= total;
        best
    }
}

/// The weighted-choice states of one client (an enrolled pod), by frontend and port.
/// Held by the pod's context: dropped when the pod leaves.
#[derive(Debug, Default)]
pub struct ClientSplits {
    states: Mutex<HashMap<ObjectKey, HashMap<u16, Swrr>>>,
}

impl ClientSplits {
    pub fn new() -> ClientSplits {
        ClientSplits::default()
    }

    /// Runs `f` on this client's state of `frontend:port`, made on first use.
    fn with<R>(&self, frontend: &ObjectKey, port: u16, f: impl FnOnce(&mut Swrr) -> R) -> R {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = states.get_mut(frontend).and_then(|p| p.get_mut(&port)) {
            return f(state);
        }
        let held: usize = states.values().map(HashMap::len).sum();
        if held >= MAX_FRONTENDS {
            states.clear();
        }
        let state = states
            .entry(frontend.clone())
            .or_default()
            .entry(port)
            .or_default();
        f(state)
    }

    /// Index into `eligible` (all with a positive weight) of this client's next pick
    /// for `frontend:port`.
    pub(crate) fn next<'b, I>(&self, frontend: &ObjectKey, port: u16, eligible: I) -> usize
    where
        I: Iterator<Item = &'b Backend> + Clone,
    {
        self.with(frontend, port, |s| s.next(eligible))
    }

    /// [`ClientSplits::next`] for a precomputed signature of the eligible backends.
    pub(crate) fn next_for(
        &self,
        frontend: &ObjectKey,
        port: u16,
        signature: &Arc<Vec<SignatureEntry>>,
    ) -> usize {
        self.with(frontend, port, |s| s.next_for(signature))
    }

    /// Frontends this client holds a state for.
    pub fn len(&self) -> usize {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, weight: u32) -> Backend {
        Backend {
            service: ObjectKey::new("apps", name),
            port: 80,
            weight,
            endpoints: vec!["10.0.0.1:80".parse().unwrap()],
            subset: None,
            subset_error: None,
            policy: crate::routing::backend::EndpointPolicy {
                load_balancer: crate::routing::backend::LbPolicy::RoundRobin,
                outlier_detection: None,
                consistent_hash: None,
                connection_pool: None,
            },
            ring: Default::default(),
        }
    }

    #[test]
    fn clients_taking_turns_each_get_the_weighted_share() {
        let backends = [backend("v1", 90), backend("v2", 10)];
        let web = ObjectKey::new("apps", "web");
        let (a, b) = (ClientSplits::new(), ClientSplits::new());
        let mut v2 = [0, 0];
        for _ in 0..100 {
            for (i, c) in [&a, &b].into_iter().enumerate() {
                if c.next(&web, 80, backends.iter()) == 1 {
                    v2[i] += 1;
                }
            }
        }
        assert_eq!(v2, [10, 10]);
    }

    #[test]
    fn a_client_keeps_a_bounded_number_of_states() {
        let backends = [backend("v1", 1), backend("v2", 1)];
        let c = ClientSplits::new();
        for i in 0..(MAX_FRONTENDS as u16 * 3) {
            let frontend = ObjectKey::new("apps", &format!("svc-{i}"));
            c.next(&frontend, 80, backends.iter());
            assert!(c.len() <= MAX_FRONTENDS);
        }
        // The ports of one frontend count too.
        let web = ObjectKey::new("apps", "web");
        for port in 0..u16::MAX {
            c.next(&web, port, backends.iter());
        }
        assert!(c.len() <= MAX_FRONTENDS);
    }
}
