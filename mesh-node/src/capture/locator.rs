//! Finding an enrolled pod's network namespace.
//!
//! - [`KubepodsLocator`] (real nodes, DaemonSet with hostPID): a process of the pod is
//!   found by the pod UID in its cgroup path, as kubelet lays it out for either cgroup
//!   driver on cgroup v1 or v2, and its `/proc/<pid>/ns/net` is the namespace. The pod's
//!   cgroup itself (which kubelet creates before the pod's sandbox and containers) is
//!   found below the cgroup root, so that a pod can be held before it can be enrolled.
//! - [`NetnsDirectory`]: `<dir>/<pod uid>`, for namespaces created with `ip netns add`.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::{capture::netns::NetnsId, discovery::cluster::PodPlan};

pub(crate) trait NetnsLocator: Send + Sync {
    /// A path that opens the pod's network namespace, or why there is none (yet).
    fn locate(&self, pod: &PodPlan) -> Result<PathBuf, String>;

    /// The pod's cgroup directory and its cgroup id, once kubelet has created it.
    fn pod_cgroup(&self, _pod: &PodPlan) -> Option<(PathBuf, u64)> {
        None
    }
}

fn usable_uid(pod: &PodPlan) -> Result<&str, String> {
    let uid = pod.uid.as_str();
    if uid.is_empty() || uid.contains('/') || uid.starts_with('.') {
        return Err(format!("pod {} has no usable metadata.uid", pod.key));
    }
    Ok(uid)
}

pub(crate) struct NetnsDirectory {
    pub dir: PathBuf,
}

impl NetnsLocator for NetnsDirectory {
    fn locate(&self, pod: &PodPlan) -> Result<PathBuf, String> {
        Ok(self.dir.join(usable_uid(pod)?))
    }
}

pub(crate) struct KubepodsLocator {
    /// Normally `/proc`; the host's, so the DaemonSet needs hostPID.
    pub proc_root: PathBuf,
    /// The cgroup v2 directory the pods' cgroups are under (the agent's cgroup root).
    pub cgroup_root: Option<PathBuf>,
    /// Namespaces that are never a pod's (the node's, the agent's): a process of the pod
    /// still in one of them (a container runtime's process before it joined the pod's
    /// namespace) is skipped.
    pub not_pods: Vec<NetnsId>,
}

impl Default for KubepodsLocator {
    fn default() -> Self {
        KubepodsLocator {
            proc_root: PathBuf::from("/proc"),
            cgroup_root: None,
            not_pods: Vec::new(),
        }
    }
}

/// Whether one segment of a cgroup path is the cgroup of the pod with `uid`:
/// - cgroupfs driver: `pod<uid>` (as in `.../kubepods/burstable/pod<uid>/<container>`)
/// - systemd driver:  `kubepods-burstable-pod<uid with _ for ->.slice`
fn is_pod_segment(segment: &str, uid: &str) -> bool {
    if let Some(rest) = segment.strip_prefix("pod") {
        return rest == uid;
    }
    segment.starts_with("kubepods")
        && segment
            .strip_suffix(".slice")
            .and_then(|s| s.strip_suffix(uid.replace('-', "_").as_str()))
            .is_some_and(|s| s.ends_with("-pod"))
}

/// Whether a cgroup path belongs to the pod with `uid` (see [`is_pod_segment`]).
pub(crate) fn cgroup_path_has_pod(path: &str, uid: &str) -> bool {
    path.split('/').any(|segment| is_pod_segment(segment, uid))
}

/// The directories kubelet nests pod cgroups in (either driver), below the root.
fn is_kubepods_level(name: &str) -> bool {
    matches!(
        name,
        "kubepods"
            | "besteffort"
            | "burstable"
            | "kubepods.slice"
            | "kubepods-besteffort.slice"
            | "kubepods-burstable.slice"
    )
}

/// The cgroup of the pod with `uid` below `root`: `root/kubepods[.slice]/[QoS/]pod...`
/// (at most three levels down; guaranteed pods sit right under kubepods). Reads only
/// kubelet's directories, never other pods' or the rest of the node's.
pub(crate) fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    fn walk(dir: &Path, uid: &str, depth: usize) -> Option<PathBuf> {
        for entry in fs::read_dir(dir).ok()?.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if is_pod_segment(name, uid) {
                return Some(entry.path());
            }
            if depth < 2 && is_kubepods_level(name) {
                if let Some(found) = walk(&entry.path(), uid, depth + 1) {
                    return Some(found);
                }
            }
        }
        None
    }
    walk(root, uid, 0)
}

/// Processes in a pod's cgroup and its containers' cgroups (one level below), lowest
/// pid first.
fn pids_in_cgroup(dir: &Path) -> Vec<u32> {
    let read = |d: &Path| -> Vec<u32> {
        fs::read_to_string(d.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    };
    let mut pids = read(dir);
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(read(&entry.path()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Whether any hierarchy line of a `/proc/<pid>/cgroup` file (v1: `N:ctrl:/path`,
/// v2: `0::/path`) is a cgroup of the pod.
pub(crate) fn proc_cgroup_has_pod(text: &str, uid: &str) -> bool {
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .any(|path| cgroup_path_has_pod(path, uid))
}

impl KubepodsLocator {
    /// A live process of the pod in the pod's own network namespace (lowest pid:
    /// normally the pause container).
    pub(crate) fn find_pid(&self, uid: &str) -> Option<u32> {
        let in_pod_netns = |pid: &u32| {
            fs::metadata(self.netns_path(*pid)).is_ok_and(|m| {
                let id = NetnsId {
                    dev: m.dev(),
                    ino: m.ino(),
                };
                !self.not_pods.contains(&id)
            })
        };
        // Cheap: the pod's cgroup lists its processes.
        if let Some(dir) = self
            .cgroup_root
            .as_deref()
            .and_then(|r| find_pod_cgroup(r, uid))
        {
            return pids_in_cgroup(&dir).into_iter().find(in_pod_netns);
        }
        let mut pids: Vec<u32> = fs::read_dir(&self.proc_root)
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        pids.into_iter().find(|pid| {
            fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
                .is_ok_and(|text| proc_cgroup_has_pod(&text, uid))
                && in_pod_netns(pid)
        })
    }

    fn netns_path(&self, pid: u32) -> PathBuf {
        self.proc_root.join(pid.to_string()).join("ns/net")
    }
}

impl NetnsLocator for KubepodsLocator {
    fn locate(&self, pod: &PodPlan) -> Result<PathBuf, String> {
        let uid = usable_uid(pod)?;
        let pid = self.find_pid(uid).ok_or_else(|| {
            format!(
                "no process of pod {} (uid {uid}) found in its own network namespace under {}: is it running on this node, and does the agent run with hostPID?",
                pod.key,
                self.proc_root.display()
            )
        })?;
        Ok(self.netns_path(pid))
    }

    fn pod_cgroup(&self, pod: &PodPlan) -> Option<(PathBuf, u64)> {
        let dir = find_pod_cgroup(self.cgroup_root.as_deref()?, usable_uid(pod).ok()?)?;
        let id = fs::metadata(&dir).ok()?.ino();
        Some((dir, id))
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
        let in_pod = format!("0::/kubepods/besteffort/pod{UID}/c\n");
        // pid 40 is in the pod's cgroup but still in the node's namespace (a runtime
        // setting the container up): not the pod's process.
        for (pid, cg) in [
            ("1", "0::/init.scope\n"),
            ("40", in_pod.as_str()),
            ("42", in_pod.as_str()),
            ("7", "0::/other\n"),
        ] {
            fs::create_dir_all(dir.path().join(pid).join("ns")).unwrap();
            fs::write(dir.path().join(pid).join("cgroup"), cg).unwrap();
            fs::write(dir.path().join(pid).join("ns/net"), pid).unwrap();
        }
        fs::create_dir_all(dir.path().join("self")).unwrap();
        let node_netns = fs::metadata(dir.path().join("40/ns/net")).unwrap();
        let locator = KubepodsLocator {
            proc_root: dir.path().to_path_buf(),
            not_pods: vec![NetnsId {
                dev: node_netns.dev(),
                ino: node_netns.ino(),
            }],
            ..KubepodsLocator::default()
        };
        assert_eq!(locator.find_pid(UID), Some(42));
        assert_eq!(locator.find_pid("nope"), None);
    }

    #[test]
    fn finds_pod_cgroups_of_both_drivers_and_every_qos_class() {
        let root = tempfile::tempdir().unwrap();
        let systemd_uid = UID.replace('-', "_");
        let cases = [
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice"),
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice"),
            format!("kubepods.slice/kubepods-pod{systemd_uid}.slice"),
            format!("kubepods/besteffort/pod{UID}"),
            format!("kubepods/pod{UID}"),
        ];
        for case in &cases {
            let dir = root.path().join(case);
            fs::create_dir_all(dir.join("cri-containerd-abc.scope")).unwrap();
            assert_eq!(find_pod_cgroup(root.path(), UID), Some(dir), "{case}");
            fs::remove_dir_all(root.path().join(case.split('/').next().unwrap())).unwrap();
        }
        // Another pod, a longer uid, and a pod-like name outside kubelet's tree.
        for other in [
            "kubepods/besteffort/pod8d3c1f2a-0b7e-4c55-9a61-2f0e4d5c6b7b".to_string(),
            format!("kubepods/besteffort/pod{UID}x"),
            format!("system.slice/pod{UID}"),
        ] {
            fs::create_dir_all(root.path().join(other)).unwrap();
        }
        assert_eq!(find_pod_cgroup(root.path(), UID), None);
    }

    #[test]
    fn lists_the_processes_of_a_pod_and_its_containers() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        for (c, procs) in [("a", "30\n7\n"), ("b", "12\n")] {
            fs::create_dir_all(dir.path().join(c)).unwrap();
            fs::write(dir.path().join(c).join("cgroup.procs"), procs).unwrap();
        }
        assert_eq!(pids_in_cgroup(dir.path()), vec![7, 12, 30]);
    }
}
