use std::collections::HashMap;

use super::*;
use crate::discovery::consistent_hash::{DEFAULT_MAGLEV_TABLE_SIZE, MAX_RING_SIZE};

#[test]
fn xxh64_matches_the_reference_vectors() {
    // From the reference implementation (libxxhash).
    assert_eq!(xxh64(b"", 0), 0xef46_db37_51d8_e999);
    assert_eq!(xxh64(b"a", 0), 0xd24e_c4f1_a98c_6e5b);
    assert_eq!(xxh64(b"abc", 0), 0x44bc_2cf5_ad77_0999);
    assert_eq!(xxh64(b"10.0.0.1:8080_0", 0), 0x23a2_9ae7_75df_d4a3);
    assert_eq!(xxh64(&[b'x'; 100], 0), 0x92f0_de5a_88a3_c094);
    assert_eq!(
        xxh64(b"Nobody inspects the spammish repetition", 1),
        0x43f4_2544_8d95_4db6
    );
}

fn endpoints(n: usize) -> Vec<SocketAddr> {
    let mut e: Vec<SocketAddr> = (0..n)
        .map(|i| {
            format!("10.1.{}.{}:8080", i / 200, i % 200 + 1)
                .parse()
                .unwrap()
        })
        .collect();
    e.sort();
    e
}

const RING: HashTable = HashTable::RingHash {
    minimum_ring_size: 1024,
};
const MAGLEV: HashTable = HashTable::Maglev {
    table_size: DEFAULT_MAGLEV_TABLE_SIZE,
};

fn keys(n: u64) -> Vec<u64> {
    (0..n)
        .map(|k| xxh64(format!("user-{k}").as_bytes(), 0))
        .collect()
}

/// Which endpoint (address) each key lands on.
fn placement(eps: &[SocketAddr], table: HashTable, keys: &[u64]) -> Vec<SocketAddr> {
    let ring = HashRing::build(eps, table);
    keys.iter()
        .map(|k| eps[ring.lookup(*k, |_| true).unwrap()])
        .collect()
}

#[test]
fn keys_spread_over_every_endpoint_about_evenly() {
    for table in [RING, MAGLEV] {
        let eps = endpoints(5);
        let keys = keys(10_000);
        let mut count: HashMap<SocketAddr, usize> = HashMap::new();
        for e in placement(&eps, table, &keys) {
            *count.entry(e).or_default() += 1;
        }
        assert_eq!(count.len(), 5, "{table:?}: {count:?}");
        for (e, n) in &count {
            // 2,000 each on average; a 1024-point ring is within ±30 %.
            assert!((1400..=2600).contains(n), "{table:?}: {e} got {n}");
        }
    }
}

#[test]
fn removing_one_of_n_endpoints_moves_about_one_nth_of_the_keys() {
    for table in [RING, MAGLEV] {
        for n in [4, 5, 10] {
            let eps = endpoints(n);
            let keys = keys(10_000);
            let before = placement(&eps, table, &keys);
            let gone = eps[n / 2];
            let rest: Vec<SocketAddr> = eps.iter().copied().filter(|e| *e != gone).collect();
            let after = placement(&rest, table, &keys);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let on_gone = before.iter().filter(|e| **e == gone).count();
            // Every key of the removed endpoint moves; almost none of the others.
            assert!(moved >= on_gone, "{table:?} n={n}");
            let limit = 10_000 * 3 / (2 * n);
            assert!(
                moved <= limit,
                "{table:?} n={n}: {moved} of 10000 moved (limit {limit}, {on_gone} were on the removed one)"
            );
            if matches!(table, HashTable::RingHash { .. }) {
                // On a ring, exactly the removed endpoint's keys move.
                assert_eq!(moved, on_gone, "n={n}");
            }
        }
    }
}

#[test]
fn an_ejected_endpoint_gives_its_keys_to_the_next_and_the_others_stay() {
    for table in [RING, MAGLEV] {
        let eps = endpoints(4);
        let ring = HashRing::build(&eps, table);
        let keys = keys(2_000);
        let ejected = 1;
        for k in &keys {
            let home = ring.lookup(*k, |_| true).unwrap();
            let now = ring.lookup(*k, |i| i != ejected).unwrap();
            assert_ne!(now, ejected);
            if home != ejected {
                assert_eq!(
                    now, home,
                    "{table:?}: a key not on the ejected endpoint moved"
                );
            }
        }
        assert_eq!(ring.lookup(keys[0], |_| false), None, "none allowed");
    }
}

#[test]
fn an_empty_backend_has_no_endpoint_and_one_endpoint_takes_every_key() {
    for table in [RING, MAGLEV] {
        let empty = HashRing::build(&[], table);
        assert_eq!(empty.lookup(42, |_| true), None);
        assert_eq!(empty.size(), 0);
        let one = HashRing::build(&endpoints(1), table);
        assert!(keys(500)
            .iter()
            .all(|k| one.lookup(*k, |_| true) == Some(0)));
    }
}

#[test]
fn ring_and_table_sizes_are_capped() {
    // The policy caps minimumRingSize at MAX_RING_SIZE; more endpoints than that still
    // get one point each, never more.
    let ring = HashRing::build(
        &endpoints(3),
        HashTable::RingHash {
            minimum_ring_size: MAX_RING_SIZE,
        },
    );
    assert!(ring.size() as u64 <= MAX_RING_SIZE + 3, "{}", ring.size());
    let many = endpoints(600);
    let ring = HashRing::build(
        &many,
        HashTable::RingHash {
            minimum_ring_size: MAX_RING_SIZE,
        },
    );
    assert!(ring.size() as u64 <= MAX_RING_SIZE, "{}", ring.size());
    assert!(ring.size() >= 600);
    // A Maglev table is a prime at least the endpoint count.
    let table = HashRing::build(&many, HashTable::Maglev { table_size: 251 });
    assert!(table.size() >= 600 && is_prime(table.size() as u64));
}

#[test]
fn rings_past_the_memory_budget_are_built_small() {
    // Hold rings of 2 MiB each until an 8 MiB budget is spent: later ones are small,
    // and the budget is given back when they go.
    static BUDGET: AtomicUsize = AtomicUsize::new(0);
    let max = 8 << 20;
    let eps = endpoints(4);
    let big = HashTable::RingHash {
        minimum_ring_size: MAX_RING_SIZE,
    };
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(HashRing::build_within(&eps, big, &BUDGET, max));
    }
    assert!(held[3].size() as u64 >= MAX_RING_SIZE);
    assert_eq!(held[5].size() as u64, 4 * SMALL_POINTS_PER_ENDPOINT);
    assert!(BUDGET.load(Ordering::Relaxed) <= max + 2 * 4 * 8 * 16);
    drop(held);
    assert_eq!(BUDGET.load(Ordering::Relaxed), 0);
    let again = HashRing::build_within(&eps, big, &BUDGET, max);
    assert!(again.size() as u64 >= MAX_RING_SIZE);
    let maglev = HashRing::build_within(&eps, MAGLEV, &BUDGET, max);
    assert_eq!(maglev.size() as u64, DEFAULT_MAGLEV_TABLE_SIZE);
}

#[test]
fn the_cache_builds_once_and_a_copy_starts_empty() {
    let eps = endpoints(3);
    let cache = RingCache::default();
    let a: *const HashRing = cache.get(&eps, RING);
    let b: *const HashRing = cache.get(&eps, RING);
    assert_eq!(a, b);
    let copy = cache.clone();
    assert!(copy.0.get().is_none());
    assert_eq!(copy, cache);
}
