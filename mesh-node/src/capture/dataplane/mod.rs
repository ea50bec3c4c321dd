//! The eBPF dataplane: loads the object, reuses pinned maps, keeps exactly one pinned
//! link per cgroup program (a restart swaps the new program into the old link), and
//! offers the map operations the agent needs.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, SockHash},
    programs::SkLookup,
    Ebpf,
};
use mesh_common::{
    map_names, program_names, ConnKey, InboundPolicy, Ip, NodeConfig, NodeFlow, OrigDst,
    OutboundPolicy,
};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    capture::bpf_sys, capture::bpf_sys::CgroupAttachType, capture::netns::Netns,
    capture::preflight, capture::sk_lookup, capture::sk_lookup::PodLink,
};

mod error;
mod pins;

pub(crate) use error::map_err;
pub use error::DataplaneError;
pub use pins::Prepared;

/// What the admin API shows about one map.
#[derive(Debug, Clone, Serialize)]
pub struct MapStatus {
    pub name: &'static str,
    pub id: u32,
    pub max_entries: u32,
    pub entries: usize,
    pub pinned: bool,
}

/// What the admin API shows about one attached cgroup program.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramStatus {
    pub name: &'static str,
    pub attach: &'static str,
    pub program_id: u32,
    pub link_id: u32,
    pub pin: PathBuf,
}

struct CgroupProgram {
    name: &'static str,
    attach: CgroupAttachType,
    attach_name: &'static str,
}

const CGROUP_PROGRAMS: [CgroupProgram; 3] = [
    CgroupProgram {
        name: program_names::CONNECT4,
        attach: CgroupAttachType::Inet4Connect,
        attach_name: "cgroup/connect4",
    },
    CgroupProgram {
        name: program_names::CONNECT6,
        attach: CgroupAttachType::Inet6Connect,
        attach_name: "cgroup/connect6",
    },
    CgroupProgram {
        name: program_names::SOCK_OPS,
        attach: CgroupAttachType::SockOps,
        attach_name: "sock_ops",
    },
];

pub struct Dataplane {
    ebpf: Mutex<Ebpf>,
    pub(crate) enrolled: Mutex<HashMap<MapData, u64, OutboundPolicy>>,
    orig_dst: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    /// A second handle on `NM_ORIG_DST` for counting, so that walking the map never
    /// holds up the proxy's lookups.
    pub(crate) orig_dst_stats: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    pub(crate) refused: Mutex<PerCpuArray<MapData, u64>>,
    /// The last count of every map's entries, for readiness (see `map_pressure`).
    pub(crate) fill: Mutex<Option<(Instant, Vec<MapStatus>)>>,
    pub(crate) inbound_pods: Mutex<HashMap<MapData, Ip, InboundPolicy>>,
    pub(crate) inbound_listeners: Mutex<SockHash<MapData, Ip>>,
    /// The node's own connections to pods, being set up (see `pod_holds`).
    pub(crate) node_flows: Mutex<HashMap<MapData, NodeFlow, u64>>,
    /// Pods held until they are enrolled, by cgroup id (see `pod_holds`).
    pub(crate) held: Mutex<HashMap<MapData, u64, OutboundPolicy>>,
    pin_dir: PathBuf,
    programs: Vec<ProgramStatus>,
    /// True when the maps were found pinned by an earlier run and reused.
    pub reused_pins: bool,
}

impl Dataplane {
    /// Loads the object, reusing pins under `pin_dir`, and attaches the cgroup
    /// programs at `cgroup_root`. The caller holds the pin lock.
    pub fn load(
        object: &Path,
        pin_dir: &Path,
        cgroup_root: &Path,
        config: NodeConfig,
    ) -> Result<Dataplane, DataplaneError> {
        Self::finish(
            pins::load_as_holder(object, pin_dir)?,
            pin_dir,
            cgroup_root,
            config,
        )
    }

    /// Loads and verifies the programs against the maps another agent has pinned,
    /// changing no pin: the slow part of a start, done by a newcomer before it takes
    /// the node over. Refused unless that agent has pinned every map, with this
    /// build's layout ([`Dataplane::load`] then, once the lock is held).
    pub fn prepare(object: &Path, pin_dir: &Path) -> Result<Prepared, DataplaneError> {
        let prepared = pins::load_as_newcomer(object, pin_dir)?;
        info!("eBPF programs loaded and verified; attaching them once the node is taken over");
        Ok(prepared)
    }

    /// Attaches what [`Dataplane::prepare`] loaded. The caller holds the pin lock now.
    /// If the pinned maps changed since (the predecessor replaced one), the object is
    /// loaded again on the maps pinned now.
    pub fn attach(
        prepared: Prepared,
        object: &Path,
        pin_dir: &Path,
        cgroup_root: &Path,
        config: NodeConfig,
    ) -> Result<Dataplane, DataplaneError> {
        if !prepared.uses_the_pins(pin_dir) {
            info!("the pinned maps changed while this agent waited for the node; loading the programs again");
            return Self::load(object, pin_dir, cgroup_root, config);
        }
        pins::clean_pins(pin_dir)?;
        Self::finish(prepared, pin_dir, cgroup_root, config)
    }

    fn finish(
        prepared: Prepared,
        pin_dir: &Path,
        cgroup_root: &Path,
        config: NodeConfig,
    ) -> Result<Dataplane, DataplaneError> {
        let reused_pins = prepared.reused_pins;
        let mut ebpf = prepared.ebpf;
        let link_dir = pin_dir.join("links");
        let kernel = preflight::kernel_release();
        let cgroup = fs::File::open(cgroup_root).map_err(|source| DataplaneError::Cgroup {
            path: cgroup_root.to_path_buf(),
            source,
        })?;
        let mut programs = Vec::new();
        for spec in &CGROUP_PROGRAMS {
            let program = ebpf
                .program(spec.name)
                .ok_or(DataplaneError::MissingProgram(spec.name))?;
            let prog_fd = program.fd().map_err(|source| DataplaneError::ProgramLoad {
                program: spec.name,
                requirement: preflight::kernel_requirement(spec.name),
                kernel: kernel.clone(),
                source: Box::new(source),
            })?;
            let pin = link_dir.join(spec.name);
            let (link_id, program_id) = attach_pinned(prog_fd.as_fd(), &cgroup, spec, &pin)
                .map_err(|source| DataplaneError::Attach {
                    program: spec.name,
                    cgroup: cgroup_root.to_path_buf(),
                    requirement: preflight::kernel_requirement(spec.name),
                    kernel: kernel.clone(),
                    source,
                })?;
            programs.push(ProgramStatus {
                name: spec.name,
                attach: spec.attach_name,
                program_id,
                link_id,
                pin,
            });
        }

        let mut config_map: Array<MapData, NodeConfig> = take_map(&mut ebpf, map_names::CONFIG)?;
        config_map
            .set(0, config, 0)
            .map_err(map_err(map_names::CONFIG))?;

        let orig_dst: HashMap<MapData, ConnKey, OrigDst> =
            take_map(&mut ebpf, map_names::ORIG_DST)?;
        let orig_dst_stats = second_handle(&orig_dst, map_names::ORIG_DST)?;
        let dataplane = Dataplane {
            enrolled: Mutex::new(take_map(&mut ebpf, map_names::ENROLLED)?),
            orig_dst: Mutex::new(orig_dst),
            orig_dst_stats: Mutex::new(orig_dst_stats),
            refused: Mutex::new(take_map(&mut ebpf, map_names::REFUSED)?),
            fill: Mutex::new(None),
            inbound_pods: Mutex::new(take_map(&mut ebpf, map_names::INBOUND_PODS)?),
            inbound_listeners: Mutex::new(take_map(&mut ebpf, map_names::INBOUND_LISTENERS)?),
            node_flows: Mutex::new(take_map(&mut ebpf, map_names::NODE_FLOWS)?),
            held: Mutex::new(take_map(&mut ebpf, map_names::HELD)?),
            ebpf: Mutex::new(ebpf),
            pin_dir: pin_dir.to_path_buf(),
            programs,
            reused_pins,
        };
        info!(
            pin_dir = %pin_dir.display(),
            cgroup = %cgroup_root.display(),
            reused_pins,
            "eBPF dataplane loaded and attached"
        );
        Ok(dataplane)
    }

    pub fn programs(&self) -> &[ProgramStatus] {
        &self.programs
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn enroll(&self, netns_cookie: u64, policy: &OutboundPolicy) -> Result<(), DataplaneError> {
        lock(&self.enrolled)
            .insert(netns_cookie, *policy, 0)
            .map_err(map_err(map_names::ENROLLED))
    }

    /// Stops redirecting a pod's new connections; destinations already parked for
    /// connections still in its listener's accept queue stay until [`Self::unenroll`].
    pub fn stop_redirecting(&self, netns_cookie: u64) -> Result<(), DataplaneError> {
        remove_if_present(
            &mut lock(&self.enrolled),
            &netns_cookie,
            map_names::ENROLLED,
        )
    }

    /// Removes a pod's enrollment and every original destination still parked for it.
    pub fn unenroll(&self, netns_cookie: u64) -> Result<(), DataplaneError> {
        remove_if_present(
            &mut lock(&self.enrolled),
            &netns_cookie,
            map_names::ENROLLED,
        )?;
        let mut orig = lock(&self.orig_dst);
        let keys: Vec<ConnKey> = orig
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == netns_cookie)
            .collect();
        for key in keys {
            remove_if_present(&mut orig, &key, map_names::ORIG_DST)?;
        }
        Ok(())
    }

    /// The outbound policy the connect hooks apply in a netns (None: not enrolled).
    pub fn enrolled_policy(&self, netns_cookie: u64) -> Option<OutboundPolicy> {
        lock(&self.enrolled).get(&netns_cookie, 0).ok()
    }

    /// The inbound policy sk_lookup applies to a pod address (None: not captured).
    pub fn inbound_policy(&self, ip: Ip) -> Option<InboundPolicy> {
        lock(&self.inbound_pods).get(&ip, 0).ok()
    }

    pub fn enrolled_cookies(&self) -> Vec<u64> {
        lock(&self.enrolled).keys().filter_map(Result::ok).collect()
    }

    /// Routes inbound TCP for `ip` into `listener` (same address family).
    pub fn capture_inbound(
        &self,
        ip: Ip,
        policy: &InboundPolicy,
        listener: &impl AsRawFd,
    ) -> Result<(), DataplaneError> {
        lock(&self.inbound_listeners)
            .insert(ip, listener.as_raw_fd(), 0)
            .map_err(map_err(map_names::INBOUND_LISTENERS))?;
        lock(&self.inbound_pods)
            .insert(ip, *policy, 0)
            .map_err(map_err(map_names::INBOUND_PODS))
    }

    /// Rewrites the inbound policy of a captured address (its fail mode changed).
    pub fn update_inbound_policy(
        &self,
        ip: Ip,
        policy: &InboundPolicy,
    ) -> Result<(), DataplaneError> {
        lock(&self.inbound_pods)
            .insert(ip, *policy, 0)
            .map_err(map_err(map_names::INBOUND_PODS))
    }

    pub fn release_inbound(&self, ip: Ip) -> Result<(), DataplaneError> {
        remove_if_present(&mut lock(&self.inbound_pods), &ip, map_names::INBOUND_PODS)?;
        absent_ok(
            lock(&self.inbound_listeners).remove(&ip),
            map_names::INBOUND_LISTENERS,
        )
    }

    pub fn inbound_pod_ips(&self) -> Vec<Ip> {
        lock(&self.inbound_pods)
            .keys()
            .filter_map(Result::ok)
            .collect()
    }

    /// Looks up and removes the original destination of an accepted connection.
    pub fn take_orig_dst(&self, key: &ConnKey) -> Option<OrigDst> {
        let mut map = lock(&self.orig_dst);
        let value = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        Some(value)
    }

    /// Removes re-keyed destinations older than `max_age` that no proxy claimed (their
    /// listener went away before accepting). Returns how many were removed. (Parked
    /// ones live in their socket's storage and go with the socket.)
    pub fn sweep_stale(&self, max_age: Duration) -> usize {
        let now = monotonic_ns();
        let cutoff = now.saturating_sub(max_age.as_nanos() as u64);
        let stale: Vec<ConnKey> = lock(&self.orig_dst_stats)
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.created_ns < cutoff)
            .map(|(k, _)| k)
            .collect();
        let mut orig = lock(&self.orig_dst);
        // Checked again under the lock: the key may have been claimed and reused since.
        let mut removed = 0;
        for k in &stale {
            if orig.get(k, 0).is_ok_and(|v| v.created_ns < cutoff) && orig.remove(k).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Gives a pod's namespace this agent's sk_lookup program: through its pinned link
    /// when an earlier run left one (swapped in place), else a new link, pinned
    /// (see `capture::sk_lookup`).
    pub(crate) fn attach_sk_lookup(
        &self,
        netns: &Netns,
        cookie: u64,
        label: &str,
    ) -> Result<PodLink, DataplaneError> {
        let ebpf = lock(&self.ebpf);
        let program: &SkLookup = ebpf
            .program(program_names::SK_LOOKUP)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram(program_names::SK_LOOKUP))?;
        let attach_err = |source| DataplaneError::AttachNetns {
            netns: label.to_string(),
            source,
        };
        let prog = program
            .fd()
            .map_err(|e| attach_err(std::io::Error::other(e)))?;
        PodLink::attach(&self.sk_lookup_dir(), prog.as_fd(), netns, cookie).map_err(attach_err)
    }

    fn sk_lookup_dir(&self) -> PathBuf {
        self.pin_dir.join(sk_lookup::LINK_DIR)
    }

    /// Removes the pinned sk_lookup links of namespaces not in `keep` (pods this agent
    /// does not manage, e.g. left while no agent ran); returns how many.
    pub(crate) fn remove_sk_lookup_pins_except(&self, keep: &[u64]) -> usize {
        let dir = self.sk_lookup_dir();
        sk_lookup::remove_pins_except(&dir, keep).unwrap_or_else(|e| {
            warn!(dir = %dir.display(), error = %e, "cannot remove stale sk_lookup pins");
            0
        })
    }

    /// How many pods' sk_lookup links are pinned.
    pub fn pinned_sk_lookup_links(&self) -> usize {
        sk_lookup::pinned_cookies(&self.sk_lookup_dir()).len()
    }
}

/// Another handle on the same kernel map (for reading it without taking the lock of
/// the handle the hot path uses).
fn second_handle(
    map: &HashMap<MapData, ConnKey, OrigDst>,
    name: &'static str,
) -> Result<HashMap<MapData, ConnKey, OrigDst>, DataplaneError> {
    let (id, _) = map_info(IterableMap::map(map));
    let data = MapData::from_id(id).map_err(map_err(name))?;
    HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err(name))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a map lock leaves the map itself consistent (the kernel
    // owns it), so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn map_info(data: &MapData) -> (u32, u32) {
    data.info()
        .map(|i| (i.id(), i.max_entries()))
        .unwrap_or((0, 0))
}

pub(crate) fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), DataplaneError> {
    absent_ok(map.remove(key), name)
}

/// A removal of a key that is already gone is not an error.
fn absent_ok(result: Result<(), MapError>, name: &'static str) -> Result<(), DataplaneError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(map_err(name)(source)),
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| map_err(name)(MapError::InvalidName { name: name.into() }))?;
    T::try_from(map).map_err(map_err(name))
}

/// Swaps `prog` into the link pinned at `pin`, or creates and pins a new link.
/// Returns (link id, program id).
fn attach_pinned(
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup: &fs::File,
    spec: &CgroupProgram,
    pin: &Path,
) -> std::io::Result<(u32, u32)> {
    let link = match bpf_sys::obj_get(pin) {
        Ok(link) => {
            bpf_sys::link_update(&link, prog)?;
            info!(program = spec.name, pin = %pin.display(), "updated pinned link in place");
            link
        }
        Err(_) => {
            let link = bpf_sys::cgroup_link_create(prog, cgroup, spec.attach)?;
            bpf_sys::obj_pin(&link, pin)?;
            link
        }
    };
    bpf_sys::link_ids(&link)
}

pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Programs attached to `cgroup` for each Nodemesh attach type (for tests and `bpf`).
pub fn cgroup_attachments(cgroup: &Path) -> std::io::Result<Vec<(&'static str, Vec<u32>)>> {
    let file = fs::File::open(cgroup)?;
    CGROUP_PROGRAMS
        .iter()
        .map(|spec| {
            Ok((
                spec.attach_name,
                bpf_sys::cgroup_prog_ids(&file, spec.attach)?,
            ))
        })
        .collect()
}
