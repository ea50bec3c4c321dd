//! Finding an enrolled pod's network namespace.
//!
//! - [`KubepodsLocator`] (real nodes, DaemonSet with hostPID): a process of the pod is
//!   found by the pod UID in its cgroup path, as kubelet lays it out for either cgroup
//!   driver on cgroup v1 or v2, and its `/proc/<pid>/ns/net` is the namespace.
//! - [`NetnsDirectory`]: `<dir>/<pod uid>`, for namespaces created with `ip netns add`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::state::PodPlan;

pub trait NetnsLocator: Send + Sync {
    /// A path that opens the pod's network namespace, or why there is none (yet).
    fn locate(&self, pod: &PodPlan) -> Result<PathBuf, String>;
}

fn usable_uid(pod: &PodPlan) -> Result<&str, String> {
    let uid = pod.uid.as_str();
    if uid.is_empty() || uid.contains('/') || uid.starts_with('.') {
        return Err(format!("pod {} has no usable metadata.uid", pod.key));
    }
    Ok(uid)
}

pub struct NetnsDirectory {
    pub dir: PathBuf,
}

impl NetnsLocator for NetnsDirectory {
    fn locate(&self, pod: &PodPlan) -> Result<PathBuf, String> {
        Ok(self.dir.join(usable_uid(pod)?))
    }
}

pub struct KubepodsLocator {
    /// Normally `/proc`; the host's, so the DaemonSet needs hostPID.
    pub proc_root: PathBuf,
}

impl Default for KubepodsLocator {
    fn default() -> Self {
        KubepodsLocator {
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// Whether a cgroup path belongs to the pod with `uid`:
/// - cgroupfs driver: `.../kubepods/burstable/pod<uid>/<container>`
/// - systemd driver:  `.../kubepods-burstable-pod<uid with _ for ->.slice/...`
pub fn cgroup_path_has_pod(path: &str, uid: &str) -> bool {
    let systemd_uid = uid.replace('-', "_");
    path.split('/').any(|segment| {
        segment == format!("pod{uid}")
            || (segment.starts_with("kubepods")
                && segment.ends_with(".slice")
                && segment
                    .trim_end_matches(".slice")
                    .ends_with(&format!("pod{systemd_uid}")))
    })
}

/// Whether any hierarchy line of a `/proc/<pid>/cgroup` file (v1: `N:ctrl:/path`,
/// v2: `0::/path`) is a cgroup of the pod.
pub fn proc_cgroup_has_pod(text: &str, uid: &str) -> bool {
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .any(|path| cgroup_path_has_pod(path, uid))
}

impl KubepodsLocator {
    /// A live process of the pod (lowest pid: normally the pause container).
    pub fn find_pid(&self, uid: &str) -> Option<u32> {
        let mut pids: Vec<u32> = fs::read_dir(&self.proc_root)
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        pids.into_iter().find(|pid| {
            fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
                .is_ok_and(|text| proc_cgroup_has_pod(&text, uid))
        })
    }
}

impl NetnsLocator for KubepodsLocator {
    fn locate(&self, pod: &PodPlan) -> Result<PathBuf, String> {
        let uid = usable_uid(pod)?;
        let pid = self.find_pid(uid).ok_or_else(|| {
            format!(
                "no process of pod {} (uid {uid}) found under {}: is it running on this node, and does the agent run with hostPID?",
                pod.key,
                self.proc_root.display()
            )
        })?;
        Ok(Path::new(&self.proc_root)
            .join(pid.to_string())
            .join("ns/net"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8d3c1f2a-0b7e-4c55-9a61-2f0e4d5c6b7a";

    #[test]
    fn recognises_both_cgroup_drivers_on_v1_and_v2() {
        let v2_systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8d3c1f2a_0b7e_4c55_9a61_2f0e4d5c6b7a.slice/cri-containerd-abc.scope\n";
        let v2_cgroupfs =
            "0::/kubepods/besteffort/pod8d3c1f2a-0b7e-4c55-9a61-2f0e4d5c6b7a/0123abcd\n";
        let v1_cgroupfs = "12:pids:/kubepods/pod8d3c1f2a-0b7e-4c55-9a61-2f0e4d5c6b7a/0123\n11:memory:/kubepods/pod8d3c1f2a-0b7e-4c55-9a61-2f0e4d5c6b7a/0123\n";
        let v1_systemd = "3:cpu,cpuacct:/kubepods.slice/kubepods-pod8d3c1f2a_0b7e_4c55_9a61_2f0e4d5c6b7a.slice/docker-1.scope\n";
        let guaranteed =
            "0::/kubepods.slice/kubepods-pod8d3c1f2a_0b7e_4c55_9a61_2f0e4d5c6b7a.slice\n";
        for text in [v2_systemd, v2_cgroupfs, v1_cgroupfs, v1_systemd, guaranteed] {
            assert!(proc_cgroup_has_pod(text, UID), "{text}");
        }
    }

    #[test]
    fn other_pods_and_prefixes_do_not_match() {
        let other = "0::/kubepods/burstable/pod8d3c1f2a-0b7e-4c55-9a61-2f0e4d5c6b7b/0123\n";
        assert!(!proc_cgroup_has_pod(other, UID));
        let longer = format!("0::/kubepods/burstable/pod{UID}x/c\n");
        assert!(!proc_cgroup_has_pod(&longer, UID));
        assert!(!proc_cgroup_has_pod(
            "0::/user.slice/user-0.slice/session-1.scope\n",
            UID
        ));
        assert!(!proc_cgroup_has_pod("garbage", UID));
    }

    #[test]
    fn finds_a_process_by_its_cgroup_in_a_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        for (pid, cg) in [
            ("1", "0::/init.scope\n"),
            ("42", &format!("0::/kubepods/besteffort/pod{UID}/c\n")),
            ("7", "0::/other\n"),
        ] {
            fs::create_dir_all(dir.path().join(pid)).unwrap();
            fs::write(dir.path().join(pid).join("cgroup"), cg).unwrap();
        }
        fs::create_dir_all(dir.path().join("self")).unwrap();
        let locator = KubepodsLocator {
            proc_root: dir.path().to_path_buf(),
        };
        assert_eq!(locator.find_pid(UID), Some(42));
        assert_eq!(locator.find_pid("nope"), None);
    }
}
