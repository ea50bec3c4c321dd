//! Every simulated cluster records what it created under /run/nodemesh-sim, so that a
//! cluster whose owner died without tearing down (SIGKILL, Ctrl-C) is removed by the
//! next harness start or by `mesh-sim sweep`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::host::{ip, netns_path, remove_cgroup_tree};

const REGISTRY: &str = "/run/nodemesh-sim";

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Resources {
    pub owner_pid: u32,
    pub netns: Vec<String>,
    pub cgroup_root: Option<PathBuf>,
    pub pin_root: Option<PathBuf>,
    pub work_dir: Option<PathBuf>,
    /// Filesystems mounted inside the work dir (unmounted before it is removed).
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
}

fn entry(id: &str) -> PathBuf {
    Path::new(REGISTRY).join(format!("{id}.json"))
}

pub fn record(id: &str, resources: &Resources) -> Result<()> {
    fs::create_dir_all(REGISTRY).with_context(|| format!("creating {REGISTRY}"))?;
    let tmp = Path::new(REGISTRY).join(format!(".{id}.tmp"));
    fs::write(&tmp, serde_json::to_vec(resources)?)?;
    fs::rename(&tmp, entry(id))?;
    Ok(())
}

/// Removes everything `resources` lists; carries on past individual failures and
/// reports the first.
pub fn release(id: &str, resources: &Resources) -> Result<()> {
    let mut first_error = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    };
    // Processes first (the cgroup kill), so nothing holds the namespaces or pins.
    if let Some(cg) = &resources.cgroup_root {
        note(remove_cgroup_tree(cg));
    }
    for ns in resources.netns.iter().rev() {
        if netns_path(ns).exists() {
            note(ip(&["netns", "del", ns]));
        }
    }
    if let Some(pins) = &resources.pin_root {
        if pins.exists() {
            note(
                fs::remove_dir_all(pins)
                    .with_context(|| format!("removing pins {}", pins.display())),
            );
        }
    }
    for mount in &resources.mounts {
        // Detached even if busy; not mounted (yet, or any more) is fine.
        let _ = nix::mount::umount2(mount, nix::mount::MntFlags::MNT_DETACH);
    }
    if let Some(dir) = &resources.work_dir {
        if dir.exists() {
            note(fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display())));
        }
    }
    let _ = fs::remove_file(entry(id));
    first_error.map_or(Ok(()), Err)
}

/// A process that exists and is not a zombie (a killed owner nobody reaped yet).
fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    pid != 0 && !matches!(state, Some("Z") | Some("X") | None)
}

/// Releases every recorded cluster whose owner process is gone. Returns their ids.
pub fn sweep_stale() -> Vec<String> {
    let mut swept = Vec::new();
    let Ok(entries) = fs::read_dir(REGISTRY) else {
        return swept;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .map(String::from)
        else {
            continue;
        };
        let Ok(resources) = fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| serde_json::from_slice::<Resources>(&b).map_err(Into::into))
        else {
            let _ = fs::remove_file(&path);
            continue;
        };
        if alive(resources.owner_pid) {
            continue;
        }
        if let Err(e) = release(&id, &resources) {
            eprintln!("mesh-sim: sweeping stale cluster {id}: {e:#}");
        }
        swept.push(id);
    }
    swept
}
