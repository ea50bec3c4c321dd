//! What the cgroup hooks need from the agent besides enrollment:
//!
//! - **Held pods** (`NM_HELD`). A pod of an enrolled namespace exists on the node before
//!   the agent can enroll it: kubelet creates its cgroup, then its sandbox (network
//!   namespace), then starts its containers, and publishes its IP only after that. From
//!   the moment its cgroup exists until it is enrolled, the pod is held: the connect
//!   hooks refuse its connects (EPERM, counted as `ebpf_pod_not_enrolled`) instead of
//!   letting them leave the mesh. The agent enrolls a pod as soon as its namespace can
//!   be found, reading its addresses from the namespace when its status has none yet.
//! - **The node's own connections to pods** (`NM_NODE_FLOWS`), written by the eBPF side
//!   only; the agent sweeps entries that outlived any TCP handshake.

use std::{collections::BTreeMap, time::Duration};

use mesh_common::NodeFlow;
use mesh_common::{map_names, OutboundPolicy};
use tracing::{info, warn};

use crate::{
    capture::dataplane::lock, capture::dataplane::map_err, capture::dataplane::monotonic_ns,
    capture::dataplane::remove_if_present, capture::dataplane::Dataplane,
    capture::dataplane::DataplaneError, capture::locator::NetnsLocator,
    discovery::cluster::PodPlan, keys::PodKey,
};

impl Dataplane {
    /// Refuses the connects of every process in cgroup `cgroup_id` (and below) unless
    /// `policy` excludes the destination, until [`Dataplane::release_hold`].
    pub(crate) fn hold(
        &self,
        cgroup_id: u64,
        policy: &OutboundPolicy,
    ) -> Result<(), DataplaneError> {
        lock(&self.held)
            .insert(cgroup_id, *policy, 0)
            .map_err(map_err(map_names::HELD))
    }

    pub(crate) fn release_hold(&self, cgroup_id: u64) -> Result<(), DataplaneError> {
        remove_if_present(&mut lock(&self.held), &cgroup_id, map_names::HELD)
    }

    pub(crate) fn held_cgroups(&self) -> Vec<u64> {
        lock(&self.held).keys().filter_map(Result::ok).collect()
    }

    /// Removes node-flow entries older than `max_age`: a handshake that long is over
    /// (the eBPF side removes entries at ESTABLISHED and close; this only catches what
    /// it could not). Returns how many were removed.
    pub(crate) fn sweep_node_flows(&self, max_age: Duration) -> usize {
        let cutoff = monotonic_ns().saturating_sub(max_age.as_nanos() as u64);
        let mut flows = lock(&self.node_flows);
        let stale: Vec<NodeFlow> = flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, created)| *created < cutoff)
            .map(|(k, _)| k)
            .collect();
        stale.iter().filter(|k| flows.remove(k).is_ok()).count()
    }
}

/// The pods this agent holds, by the cgroup id it held them under.
#[derive(Default)]
pub(crate) struct Holds {
    held: BTreeMap<PodKey, u64>,
}

impl Holds {
    /// Holds the pod once kubelet has created its cgroup; returns whether it is held.
    pub(crate) fn hold(
        &mut self,
        dataplane: &Dataplane,
        locator: &dyn NetnsLocator,
        plan: &PodPlan,
    ) -> bool {
        let Some((dir, id)) = locator.pod_cgroup(plan) else {
            return false;
        };
        if self.held.get(&plan.key) == Some(&id) {
            return true;
        }
        if let Err(e) = dataplane.hold(id, &plan.outbound) {
            warn!(pod = %plan.key, error = %e, "cannot hold the pod's connections until it is enrolled");
            return false;
        }
        info!(pod = %plan.key, cgroup = %dir.display(), cgroup_id = id, "pod not enrolled yet: its connections are refused until it is");
        if let Some(old) = self.held.insert(plan.key.clone(), id) {
            if old != id {
                let _ = dataplane.release_hold(old);
            }
        }
        true
    }

    /// Lets the pod's connects through again (it is enrolled, or gone).
    pub(crate) fn release(&mut self, dataplane: &Dataplane, key: &PodKey) {
        if let Some(id) = self.held.remove(key) {
            if let Err(e) = dataplane.release_hold(id) {
                warn!(pod = %key, error = %e, "cannot release the pod's hold");
            }
        }
    }

    pub(crate) fn is_held(&self, key: &PodKey) -> bool {
        self.held.contains_key(key)
    }

    /// Releases the holds of pods `keep` rejects, and removes map entries no pod of
    /// this agent holds (leftovers of a previous run).
    pub(crate) fn prune(&mut self, dataplane: &Dataplane, keep: impl Fn(&PodKey) -> bool) {
        let gone: Vec<PodKey> = self.held.keys().filter(|k| !keep(k)).cloned().collect();
        for key in gone {
            self.release(dataplane, &key);
        }
        for id in dataplane.held_cgroups() {
            if !self.held.values().any(|&h| h == id) {
                info!(cgroup_id = id, "removing stale hold");
                let _ = dataplane.release_hold(id);
            }
        }
    }
}
