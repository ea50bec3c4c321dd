//! Per-pod sk_lookup links, pinned so that a pod's inbound capture outlives the agent.
//!
//! Each enrolled pod's network namespace has exactly one sk_lookup link, pinned at
//! `<pin-dir>/links/sk_lookup/<netns cookie>`. While no agent runs, the pinned link keeps
//! the last program steering inbound TCP (and dropping it for governed pods, as no
//! listener is left: see `mesh_sk_lookup`). A restarted agent opens the pin and swaps its
//! new program in (`BPF_LINK_UPDATE`) instead of attaching a second time. A pod that
//! leaves has its pin removed (the link detaches when the agent closes its descriptor);
//! a pin whose namespace is gone (the kernel detached the link) is removed at start.

use std::{
    fs, io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::capture::{bpf_sys, netns::Netns};

/// The folder of the per-pod links under the pin directory.
pub(crate) const LINK_DIR: &str = "links/sk_lookup";

/// A pod's sk_lookup link: attached while this descriptor is open or the pin exists.
#[derive(Debug)]
pub struct PodLink {
    fd: OwnedFd,
    pin: PathBuf,
    pub link_id: u32,
    /// True when an earlier run's pinned link was taken over.
    pub reused: bool,
}

impl PodLink {
    /// Swaps `prog` into the pinned link of the pod's namespace, or attaches and pins a
    /// new one. A pin of a namespace that is gone, or of another namespace, is replaced.
    pub(crate) fn attach(
        dir: &Path,
        prog: BorrowedFd<'_>,
        netns: &Netns,
        cookie: u64,
    ) -> io::Result<PodLink> {
        let pin = dir.join(cookie.to_string());
        match bpf_sys::obj_get(&pin) {
            Ok(link) => {
                let info = bpf_sys::netns_link_info(&link)?;
                let ours = info.is_some_and(|i| {
                    i.attach_type == bpf_sys::ATTACH_SK_LOOKUP
                        && u64::from(i.netns_ino) == netns.id().ino
                });
                if ours {
                    match bpf_sys::link_update(&link, prog) {
                        Ok(()) => {
                            let (link_id, _) = bpf_sys::link_ids(&link)?;
                            info!(
                                netns_cookie = cookie,
                                link_id, "took over the pod's pinned sk_lookup link"
                            );
                            return Ok(PodLink {
                                fd: link,
                                pin,
                                link_id,
                                reused: true,
                            });
                        }
                        // Detached meanwhile (its namespace went away): replaced below.
                        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
                        Err(e) => return Err(e),
                    }
                }
                warn!(netns_cookie = cookie, pin = %pin.display(), "replacing a pinned sk_lookup link that is not this namespace's");
                remove_pin(&pin)?;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let link = bpf_sys::netns_sk_lookup_link_create(prog, netns.file())?;
        bpf_sys::obj_pin(&link, &pin)?;
        let (link_id, _) = bpf_sys::link_ids(&link)?;
        Ok(PodLink {
            fd: link,
            pin,
            link_id,
            reused: false,
        })
    }

    /// The pod left: its pin goes, the link stays attached until this is dropped.
    pub(crate) fn unpin(&self) -> io::Result<()> {
        remove_pin(&self.pin)
    }

    /// The pod came back before its link was dropped: pinned again.
    pub(crate) fn repin(&self) -> io::Result<()> {
        match bpf_sys::obj_pin(self.fd.as_fd(), &self.pin) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(e),
            _ => Ok(()),
        }
    }
}

fn remove_pin(pin: &Path) -> io::Result<()> {
    match fs::remove_file(pin) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The netns cookies that have a pinned link in `dir` (other files are ignored).
pub(crate) fn pinned_cookies(dir: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Removes the pins in `dir` whose namespace is gone (the kernel detached their link)
/// or that are not netns links; returns how many.
pub(crate) fn remove_dead_pins(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for cookie in pinned_cookies(dir) {
        let pin = dir.join(cookie.to_string());
        let alive = bpf_sys::obj_get(&pin)
            .and_then(bpf_sys::netns_link_info)
            .is_ok_and(|i| i.is_some_and(|i| i.netns_ino != 0));
        if !alive {
            remove_pin(&pin)?;
            info!(
                netns_cookie = cookie,
                "removed the pinned sk_lookup link of a namespace that is gone"
            );
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes the pins in `dir` of namespaces not in `keep` (pods no longer managed);
/// returns how many.
pub(crate) fn remove_pins_except(dir: &Path, keep: &[u64]) -> io::Result<usize> {
    let mut removed = 0;
    for cookie in pinned_cookies(dir) {
        if !keep.contains(&cookie) {
            remove_pin(&dir.join(cookie.to_string()))?;
            info!(
                netns_cookie = cookie,
                "removed the pinned sk_lookup link of a pod no longer managed"
            );
            removed += 1;
        }
    }
    Ok(removed)
}

/// The sk_lookup links attached to the namespace at `netns` (a path to its nsfs file):
/// one per enrolled pod, always.
pub fn attached_links(netns: &Path) -> io::Result<Vec<bpf_sys::NetnsLinkInfo>> {
    use std::os::unix::fs::MetadataExt;
    let ino = fs::metadata(netns)?.ino();
    Ok(bpf_sys::sk_lookup_links()?
        .into_iter()
        .filter(|l| u64::from(l.netns_ino) == ino)
        .collect())
}
