//! Finding an enrolled pod's network namespace. The embedded cluster names each
//! namespace file after the pod UID; on a real node (discovery issue) the kubepods
//! cgroup of a pod process leads to `/proc/<pid>/ns/net` behind the same trait.

use std::path::PathBuf;

use crate::state::PodPlan;

pub trait NetnsLocator: Send + Sync {
    /// Where the pod's namespace file should be, or why it cannot be known.
    fn locate(&self, pod: &PodPlan) -> Result<PathBuf, String>;
}

/// `<dir>/<pod uid>`, e.g. `/var/run/netns/<uid>` as made by `ip netns add <uid>`.
pub struct NetnsDirectory {
    pub dir: PathBuf,
}

impl NetnsLocator for NetnsDirectory {
    fn locate(&self, pod: &PodPlan) -> Result<PathBuf, String> {
        if pod.uid.is_empty() || pod.uid.contains('/') || pod.uid.starts_with('.') {
            return Err(format!(
                "pod {} has no usable metadata.uid to name its network namespace",
                pod.key
            ));
        }
        Ok(self.dir.join(&pod.uid))
    }
}
