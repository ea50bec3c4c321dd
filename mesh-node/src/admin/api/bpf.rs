//! `/bpf`: the eBPF programs the agent attached and the maps it uses.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BpfView {
    pub pin_dir: PathBuf,
    /// The maps were reused from a previous run of the agent.
    pub reused_pins: bool,
    pub programs: Vec<ProgramView>,
    pub maps: Vec<MapView>,
    pub enrolled_netns_cookies: Vec<u64>,
    /// Pods whose sk_lookup link is pinned (their capture outlives the agent).
    #[serde(default)]
    pub pinned_sk_lookup_links: usize,
}

/// One attached cgroup program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramView {
    pub name: String,
    pub attach: String,
    pub program_id: u32,
    pub link_id: u32,
    pub pin: PathBuf,
}

/// One map and how full it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapView {
    pub name: String,
    pub id: u32,
    pub max_entries: u32,
    pub entries: usize,
    pub pinned: bool,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::admin::api::round_trip::check;

    #[test]
    fn bpf_keeps_its_wire_form() {
        let view = BpfView {
            pin_dir: "/sys/fs/bpf/nodemesh".into(),
            reused_pins: true,
            programs: vec![ProgramView {
                name: "nm_connect4".into(),
                attach: "cgroup/connect4".into(),
                program_id: 41,
                link_id: 7,
                pin: "/sys/fs/bpf/nodemesh/links/nm_connect4".into(),
            }],
            maps: vec![MapView {
                name: "NM_ENROLLED".into(),
                id: 12,
                max_entries: 1024,
                entries: 2,
                pinned: true,
            }],
            enrolled_netns_cookies: vec![4097, 4098],
            pinned_sk_lookup_links: 2,
        };
        check(
            &view,
            json!({
                "pin_dir": "/sys/fs/bpf/nodemesh", "reused_pins": true,
                "programs": [{"name": "nm_connect4", "attach": "cgroup/connect4", "program_id": 41,
                    "link_id": 7, "pin": "/sys/fs/bpf/nodemesh/links/nm_connect4"}],
                "maps": [{"name": "NM_ENROLLED", "id": 12, "max_entries": 1024, "entries": 2, "pinned": true}],
                "enrolled_netns_cookies": [4097, 4098],
                "pinned_sk_lookup_links": 2,
            }),
        );
    }
}
