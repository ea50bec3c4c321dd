//! The balancer's endpoint choice under DestinationRule policies: load-balancing
//! policies and outlier ejections, through real picks and their outcomes.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use crate::{
    keys::ObjectKey,
    routing::backend::{Backend, EndpointPolicy, LbPolicy, OutlierPolicy},
    routing::balancer::{Balancer, Outcome},
    routing::outlier::policy_for_tests,
};

const MS: fn(u64) -> Duration = Duration::from_millis;

fn addrs(n: usize) -> Vec<SocketAddr> {
    (1..=n)
        .map(|i| format!("10.0.0.{i}:80").parse().unwrap())
        .collect()
}

fn web() -> ObjectKey {
    ObjectKey::new("apps", "web")
}

fn http(status: u16) -> Outcome {
    Outcome::Http {
        status,
        latency: MS(1),
    }
}

fn backend(eps: &[SocketAddr], lb: LbPolicy, od: Option<OutlierPolicy>) -> Backend {
    Backend {
        service: web(),
        port: 80,
        weight: 1,
        endpoints: eps.to_vec(),
        subset: None,
        subset_error: None,
        policy: EndpointPolicy {
            load_balancer: lb,
            outlier_detection: od,
            consistent_hash: None,
            connection_pool: None,
        },
        ring: Default::default(),
    }
}

#[test]
fn an_ejected_endpoint_gets_no_picks_until_its_time_is_up() {
    let b = Balancer::new();
    let eps = addrs(3);
    let backend = backend(&eps, LbPolicy::RoundRobin, Some(policy_for_tests(MS(300))));
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for _ in 0..30 {
        let pick = b.pick_endpoint(&backend).unwrap();
        let status = if pick.endpoint == eps[1] { 500 } else { 200 };
        pick.report(http(status));
        *counts.entry(pick.endpoint).or_default() += 1;
    }
    // Ejected after its third 500: 3 picks, then none.
    assert_eq!(counts[&eps[1]], 3);
    assert_eq!(counts[&eps[0]] + counts[&eps[2]], 27);
    let view = b.outliers(&web(), 80);
    assert!(view.iter().any(|v| v.endpoint == eps[1] && v.ejected));
    std::thread::sleep(MS(360));
    let back = (0..6).any(|_| b.pick_endpoint(&backend).unwrap().endpoint == eps[1]);
    assert!(back, "back in rotation after baseEjectionTime");
}

#[test]
fn random_spreads_and_least_request_avoids_the_busy_endpoint() {
    let b = Balancer::new();
    let eps = addrs(4);
    let random = backend(&eps, LbPolicy::Random, None);
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for _ in 0..4000 {
        *counts
            .entry(b.pick_endpoint(&random).unwrap().endpoint)
            .or_default() += 1;
    }
    for e in &eps {
        let n = counts[e];
        assert!((800..1200).contains(&n), "{e}: {n} of 4000");
    }

    // eps[0] holds 5 picks in flight: power of two choices never picks it, as the
    // other choice is always less busy.
    let least = backend(&eps, LbPolicy::LeastRequest, None);
    // (In flight is counted per endpoint address, whichever backend picked it.)
    let only_first = backend(&eps[..1], LbPolicy::LeastRequest, None);
    let held: Vec<_> = (0..5)
        .map(|_| b.pick_endpoint(&only_first).unwrap())
        .collect();
    assert_eq!(b.active(&eps[0]), 5);
    let mut to_busy = 0;
    for _ in 0..1000 {
        if b.pick_endpoint(&least).unwrap().endpoint == eps[0] {
            to_busy += 1;
        }
    }
    assert_eq!(to_busy, 0, "the busy endpoint always loses its comparison");
    drop(held);
}

#[test]
fn consistent_hash_keeps_a_key_on_one_endpoint_and_moves_it_off_an_ejected_one() {
    use crate::discovery::consistent_hash::{HashKey, HashPolicy, HashTable};
    let b = Balancer::new();
    let eps = addrs(4);
    let mut backend = backend(
        &eps,
        LbPolicy::ConsistentHash,
        Some(policy_for_tests(MS(60_000))),
    );
    backend.policy.consistent_hash = Some(HashPolicy {
        key: HashKey::Header {
            name: "x-user".into(),
        },
        table: HashTable::RingHash {
            minimum_ring_size: 1024,
        },
    });
    let home = |key: u64| {
        b.pick_endpoint_hashed(&backend, Some(key))
            .unwrap()
            .endpoint
    };
    let keys: Vec<u64> = (0..64u64)
        .map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let homes: Vec<SocketAddr> = keys.iter().map(|k| home(*k)).collect();
    for (k, h) in keys.iter().zip(&homes) {
        assert!((0..20).all(|_| home(*k) == *h), "key {k} moved");
    }
    let used: std::collections::HashSet<&SocketAddr> = homes.iter().collect();
    assert!(used.len() >= 3, "keys spread: {used:?}");
    // Without a key: any endpoint (at random).
    let keyless: std::collections::HashSet<SocketAddr> = (0..200)
        .map(|_| b.pick_endpoint_hashed(&backend, None).unwrap().endpoint)
        .collect();
    assert_eq!(keyless.len(), 4);
    // Eject the first key's endpoint: its keys move, the others stay.
    let ejected = homes[0];
    for _ in 0..3 {
        b.pick_endpoint_hashed(&backend, Some(keys[0]))
            .unwrap()
            .report(http(500));
    }
    for (k, h) in keys.iter().zip(&homes) {
        let now = home(*k);
        assert_ne!(now, ejected);
        if *h != ejected {
            assert_eq!(now, *h, "a key not on the ejected endpoint moved");
        }
    }
}
