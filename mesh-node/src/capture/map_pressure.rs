//! How full the dataplane's eBPF maps are, and what the eBPF side refused: the agent's
//! readiness and metrics read these.
//!
//! The redirect cannot run out of room for everyone at once: the original destination
//! is parked in each socket's own storage (`NM_PARKED`, see mesh-ebpf). What is left
//! with a node-wide capacity (`NM_ORIG_DST`, the enrollment maps) is watched here: one
//! that is nearly full makes the agent unready, naming the map and what to do.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, IterableMap, MapData};
use mesh_common::{map_names, EbpfRefusal};

use crate::{
    capture::dataplane::lock, capture::dataplane::map_info, capture::dataplane::Dataplane,
    capture::dataplane::MapStatus,
};

/// A capacity map at least this full makes the agent unready.
pub(crate) const FULL_PERCENT: usize = 90;
/// How long a computed map fill is reused (counting entries walks the whole map).
const FILL_CACHE: Duration = Duration::from_secs(1);

impl Dataplane {
    /// Entry counts of every map, for the admin API and the churn test.
    pub fn map_status(&self) -> Vec<MapStatus> {
        fn status<K: aya::Pod, V: aya::Pod>(
            name: &'static str,
            map: &Mutex<HashMap<MapData, K, V>>,
        ) -> MapStatus {
            let map = lock(map);
            let info = map_info(IterableMap::map(&*map));
            MapStatus {
                name,
                id: info.0,
                max_entries: info.1,
                entries: map.keys().filter(Result::is_ok).count(),
                pinned: true,
            }
        }
        let listeners = lock(&self.inbound_listeners);
        let listeners_info = map_info(IterableMap::map(&*listeners));
        vec![
            status(map_names::ENROLLED, &self.enrolled),
            status(map_names::ORIG_DST, &self.orig_dst_stats),
            status(map_names::INBOUND_PODS, &self.inbound_pods),
            status(map_names::NODE_FLOWS, &self.node_flows),
            status(map_names::HELD, &self.held),
            MapStatus {
                name: map_names::INBOUND_LISTENERS,
                id: listeners_info.0,
                max_entries: listeners_info.1,
                entries: listeners.keys().filter(Result::is_ok).count(),
                pinned: false,
            },
        ]
    }

    /// How many connects the eBPF side refused so far, per reason (summed over CPUs).
    pub fn ebpf_refusals(&self) -> Vec<(EbpfRefusal, u64)> {
        let counters = lock(&self.refused);
        EbpfRefusal::ALL
            .iter()
            .map(|&reason| {
                let total = counters
                    .get(&(reason as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (reason, total)
            })
            .collect()
    }

    /// Why the dataplane cannot take more connections or pods: a map with a capacity is
    /// at least [`FULL_PERCENT`] full (None: all have room). Recounted at most once per
    /// [`FILL_CACHE`].
    pub fn pressure_reason(&self) -> Option<String> {
        let mut cache = lock(&self.fill);
        let fresh = cache
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < FILL_CACHE);
        if !fresh {
            *cache = Some((Instant::now(), self.map_status()));
        }
        let maps = cache.as_ref().map(|(_, maps)| maps.as_slice());
        nearly_full(maps.unwrap_or_default()).map(full_map_advice)
    }
}

/// The first map with a capacity that is at least [`FULL_PERCENT`] full.
fn nearly_full(maps: &[MapStatus]) -> Option<&MapStatus> {
    maps.iter()
        .find(|m| m.max_entries > 0 && m.entries * 100 >= m.max_entries as usize * FULL_PERCENT)
}

/// What a (nearly) full map means and what to do about it.
fn full_map_advice(map: &MapStatus) -> String {
    let what = match map.name {
        map_names::ORIG_DST => {
            "redirected connections waiting for the agent to accept them; when it is full, new \
             connections of enrolled pods are reset. The agent is not accepting fast enough: \
             check its log for accept errors (file-descriptor limit) and `meshctl node \
             connections` for a pod opening connections in bulk"
        }
        map_names::NODE_FLOWS => {
            "connections the node itself is opening to its pods (kubelet probes); when it is \
             full, such connections are captured like outside traffic (STRICT or an ALLOW \
             policy refuses them). Find what on the node opens connections to pods in bulk \
             (`ss -tn state syn-sent`)"
        }
        map_names::HELD => {
            "pods of enrolled namespaces that are starting (held until enrolled). Schedule \
             fewer pods on this node"
        }
        _ => {
            "enrolled pods of this node; pods beyond it cannot be enrolled. Schedule fewer \
             pods on this node"
        }
    };
    format!(
        "eBPF map {} is {}% full ({} of {} entries): it holds {what}",
        map.name,
        map.entries * 100 / (map.max_entries.max(1) as usize),
        map.entries,
        map.max_entries
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(name: &'static str, entries: usize, max_entries: u32) -> MapStatus {
        MapStatus {
            name,
            id: 1,
            max_entries,
            entries,
            pinned: true,
        }
    }

    #[test]
    fn a_map_is_reported_from_ninety_percent_on() {
        let roomy = [map(map_names::ORIG_DST, 58_981, 65_536)];
        assert!(nearly_full(&roomy).is_none(), "89.99% is not yet full");
        let full = [
            map(map_names::ENROLLED, 2, 16_384),
            map(map_names::ORIG_DST, 58_983, 65_536),
        ];
        let found = nearly_full(&full).map(|m| m.name);
        assert_eq!(found, Some(map_names::ORIG_DST));
        assert!(
            nearly_full(&[map("NM_EMPTY", 0, 0)]).is_none(),
            "no capacity, no fill"
        );
    }

    #[test]
    fn the_advice_names_the_map_and_what_to_do() {
        let text = full_map_advice(&map(map_names::ORIG_DST, 65_536, 65_536));
        assert!(text.starts_with("eBPF map NM_ORIG_DST is 100% full (65536 of 65536"));
        assert!(text.contains("file-descriptor limit"), "{text}");
        let text = full_map_advice(&map(map_names::ENROLLED, 15_000, 16_384));
        assert!(
            text.contains("91% full") && text.contains("Schedule fewer pods"),
            "{text}"
        );
        let text = full_map_advice(&map(map_names::NODE_FLOWS, 16_000, 16_384));
        assert!(
            text.contains("kubelet probes") && text.contains("syn-sent"),
            "{text}"
        );
    }
}
