//! Consistent hashing of a backend's endpoints (DestinationRule `consistentHash`): a
//! ring with virtual nodes, or a Maglev lookup table, built once per backend and
//! discovery snapshot over its ready endpoints, so that one key keeps landing on one
//! endpoint and removing one of N endpoints moves about 1/N of the keys.
//!
//! Keys and endpoints are hashed with xxHash64 (seed 0), written here from its
//! published specification: stable across agents, nodes and releases, so every node
//! sends a key to the same endpoint. An endpoint outlier detection has ejected is
//! skipped at lookup: its keys move to the next endpoint on the ring (or in the table),
//! the others stay where they are.
//!
//! A ring gives each endpoint `minimumRingSize` points (Envoy shares that many among
//! all endpoints, so the others' points shift when one leaves and more keys move).
//! Memory is bounded: a ring has at most `MAX_RING_SIZE` points in all, a Maglev
//! table at most its capped size (`discovery::consistent_hash`), and all alive
//! together by
//! [`MAX_RING_BYTES`]; past it, new rings are built small (a few points per endpoint),
//! and the agent says so.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, OnceLock,
    },
};

use crate::discovery::consistent_hash::{is_prime, HashTable, MAX_RING_SIZE};

/// At most this many bytes of rings and tables alive at once, across every backend.
pub const MAX_RING_BYTES: usize = 64 << 20;
/// Points per endpoint of a ring built over budget.
const SMALL_POINTS_PER_ENDPOINT: u64 = 8;

/// Bytes of rings and tables alive now.
static RING_BYTES: AtomicUsize = AtomicUsize::new(0);

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn read64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn read32(b: &[u8]) -> u64 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u64::from(u32::from_le_bytes(a))
}

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, v: u64) -> u64 {
    (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

/// xxHash64 of `data` with `seed`.
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let len = data.len() as u64;
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        while rest.len() >= 32 {
            for (i, acc) in v.iter_mut().enumerate() {
                *acc = round(*acc, read64(&rest[i * 8..]));
            }
            rest = &rest[32..];
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for x in v {
            h = merge(h, x);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(len);
    while rest.len() >= 8 {
        h ^= round(0, read64(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        h ^= read32(rest).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for b in rest {
        h ^= u64::from(*b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// The smallest prime at least `n`.
fn next_prime(n: u64) -> u64 {
    (n.max(2)..).find(|m| is_prime(*m)).unwrap_or(n)
}

#[derive(Debug)]
enum Layout {
    /// Points (hash, endpoint index), sorted by hash.
    Ring(Vec<(u64, u32)>),
    /// Slot → endpoint index; the length is a prime.
    Maglev(Vec<u32>),
}

/// A ring or table over one backend's endpoints (indexes into its sorted endpoint
/// list).
#[derive(Debug)]
pub struct HashRing {
    layout: Layout,
    /// Bytes counted in `budget` for it.
    bytes: usize,
    budget: &'static AtomicUsize,
}

impl Drop for HashRing {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl HashRing {
    /// Lays `endpoints` out as `table` asks (within the memory budget).
    pub fn build(endpoints: &[SocketAddr], table: HashTable) -> HashRing {
        HashRing::build_within(endpoints, table, &RING_BYTES, MAX_RING_BYTES)
    }

    /// [`HashRing::build`] counting its bytes in `budget`, at most `max` in all.
    fn build_within(
        endpoints: &[SocketAddr],
        table: HashTable,
        budget: &'static AtomicUsize,
        max: usize,
    ) -> HashRing {
        let n = endpoints.len() as u64;
        let names: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
        // What the policy asks for, and how big it is.
        let (ring_points, maglev_size) = match table {
            // Each endpoint gets minimumRingSize points, not a share of it (Envoy's
            // way): the points of the others do not change when one leaves, so
            // exactly its keys move. Past the cap, fewer points each.
            HashTable::RingHash { minimum_ring_size } => {
                let per = minimum_ring_size.min(MAX_RING_SIZE / n.max(1)).max(1);
                (Some(per), 0)
            }
            HashTable::Maglev { table_size } => (None, next_prime(table_size.max(n))),
        };
        let wanted = match ring_points {
            Some(per) => (per * n) as usize * std::mem::size_of::<(u64, u32)>(),
            None => maglev_size as usize * std::mem::size_of::<u32>(),
        };
        let before = budget.fetch_add(wanted, Ordering::Relaxed);
        if before.saturating_add(wanted) <= max || n == 0 {
            let layout = match ring_points {
                Some(per) => Layout::Ring(ring(&names, per)),
                None => Layout::Maglev(maglev(&names, maglev_size)),
            };
            return HashRing {
                layout,
                bytes: wanted,
                budget,
            };
        }
        budget.fetch_sub(wanted, Ordering::Relaxed);
        crate::warn_limited!(
            endpoints = n,
            budget_bytes = max,
            "consistent-hash rings use their whole memory budget: this one is built small (keys spread less evenly)"
        );
        let layout = match ring_points {
            Some(_) => Layout::Ring(ring(&names, SMALL_POINTS_PER_ENDPOINT)),
            None => Layout::Maglev(maglev(
                &names,
                next_prime((n * SMALL_POINTS_PER_ENDPOINT).max(11)),
            )),
        };
        let bytes = match &layout {
            Layout::Ring(p) => p.len() * std::mem::size_of::<(u64, u32)>(),
            Layout::Maglev(t) => t.len() * std::mem::size_of::<u32>(),
        };
        budget.fetch_add(bytes, Ordering::Relaxed);
        HashRing {
            layout,
            bytes,
            budget,
        }
    }

    /// The endpoint (index) for `hash`: the first on the ring at or after it (the slot
    /// it names in a Maglev table), skipping those `allowed` refuses; None when the ring
    /// is empty or no endpoint is allowed.
    pub fn lookup(&self, hash: u64, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        match &self.layout {
            Layout::Ring(points) => {
                let len = points.len();
                if len == 0 {
                    return None;
                }
                let start = points.partition_point(|(h, _)| *h < hash);
                (0..len)
                    .map(|step| points[(start + step) % len].1 as usize)
                    .find(|i| allowed(*i))
            }
            Layout::Maglev(table) => {
                let len = table.len();
                if len == 0 {
                    return None;
                }
                let start = (hash % len as u64) as usize;
                (0..len)
                    .map(|step| table[(start + step) % len] as usize)
                    .find(|i| allowed(*i))
            }
        }
    }

    /// Points on the ring or slots in the table.
    pub fn size(&self) -> usize {
        match &self.layout {
            Layout::Ring(p) => p.len(),
            Layout::Maglev(t) => t.len(),
        }
    }
}

/// `per` points for each endpoint, at the hashes of `<address>_<n>`.
fn ring(names: &[String], per: u64) -> Vec<(u64, u32)> {
    let mut points = Vec::with_capacity(names.len() * per as usize);
    for (i, name) in names.iter().enumerate() {
        for v in 0..per {
            let h = xxh64(format!("{name}_{v}").as_bytes(), 0);
            points.push((h, i as u32));
        }
    }
    points.sort_unstable();
    points
}

/// Maglev's table of `size` (a prime at least the endpoint count): each endpoint
/// takes slots in turn by its own permutation (offset and skip from two hashes of its
/// address).
fn maglev(names: &[String], size: u64) -> Vec<u32> {
    let n = names.len();
    if n == 0 {
        return Vec::new();
    }
    let m = size as usize;
    let perms: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = xxh64(name.as_bytes(), 0) % size;
            let skip = xxh64(name.as_bytes(), 1) % (size - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % size) as usize;
            while table[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % size) as usize;
            }
            table[slot] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

/// A backend's ring, built on its first hashed pick and kept with the backend (one per
/// routing-table snapshot). A cache: a copy starts empty, and it is never part of the
/// backend's equality.
#[derive(Default)]
pub struct RingCache(OnceLock<Arc<HashRing>>);

impl RingCache {
    /// The ring of `endpoints` laid out as `table` (built on first use).
    pub fn get(&self, endpoints: &[SocketAddr], table: HashTable) -> &HashRing {
        self.0
            .get_or_init(|| Arc::new(HashRing::build(endpoints, table)))
    }
}

impl Clone for RingCache {
    fn clone(&self) -> RingCache {
        RingCache::default()
    }
}

impl PartialEq for RingCache {
    fn eq(&self, _: &RingCache) -> bool {
        true
    }
}

impl Eq for RingCache {}

impl std::fmt::Debug for RingCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingCache")
    }
}

#[cfg(test)]
#[path = "hash_ring_tests.rs"]
mod tests;
