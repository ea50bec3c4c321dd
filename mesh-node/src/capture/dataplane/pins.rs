//! What lives under the pin directory, and loading the object's programs against it:
//! the pinned maps and their layouts, pins earlier builds left, pods' links whose
//! namespace is gone. The pin lock's holder may replace pins; a newcomer that does not
//! hold the lock yet loads against the running agent's pins and changes none.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{maps::MapData, programs::Program, Ebpf, EbpfLoader};
use mesh_common::{
    map_names, program_names, ConnKey, InboundPolicy, Ip, NodeConfig, NodeFlow, OrigDst,
    OutboundPolicy,
};
use tracing::{info, warn};

use crate::{capture::dataplane::error::DataplaneError, capture::preflight, capture::sk_lookup};

/// The maps the programs share through pins (by name, under `<pin dir>/maps`).
const PINNED_MAPS: [&str; 7] = [
    map_names::CONFIG,
    map_names::ENROLLED,
    map_names::PARKED,
    map_names::ORIG_DST,
    map_names::INBOUND_PODS,
    map_names::NODE_FLOWS,
    map_names::HELD,
];

/// The programs of the object, loaded and verified, not attached.
pub struct Prepared {
    pub(super) ebpf: Ebpf,
    /// The maps were found pinned by an earlier agent and reused.
    pub(super) reused_pins: bool,
    /// Loaded before the lock was held: the ids of the pinned maps it was loaded
    /// against, in [`PINNED_MAPS`] order.
    loaded_against: Option<Vec<u32>>,
}

/// The holder of the pin lock: creates the pin directories, removes retired pins and
/// pinned maps of another layout, and loads the programs on the pinned maps (creating
/// and pinning those that are missing).
pub(super) fn load_as_holder(object: &Path, pin_dir: &Path) -> Result<Prepared, DataplaneError> {
    let map_dir = clean_pins(pin_dir)?;
    let reused_pins = drop_incompatible_pins(&map_dir)?;
    Ok(Prepared {
        ebpf: load_programs(object, &map_dir)?,
        reused_pins,
        loaded_against: None,
    })
}

/// A newcomer, before it holds the pin lock: loads and verifies the programs on the
/// maps the running agent pinned, changing no pin. Refused unless every map this
/// build pins is there with this build's layout (the running agent may be pinning
/// them right now: loading then would create and pin maps beside its own).
pub(super) fn load_as_newcomer(object: &Path, pin_dir: &Path) -> Result<Prepared, DataplaneError> {
    let map_dir = pin_dir.join("maps");
    let not_ready = || DataplaneError::PinsNotReady {
        map_dir: map_dir.clone(),
    };
    let before = pinned_ids(&map_dir).ok_or_else(not_ready)?;
    let ebpf = load_programs(object, &map_dir)?;
    if pinned_ids(&map_dir).as_ref() != Some(&before) {
        return Err(not_ready());
    }
    Ok(Prepared {
        ebpf,
        reused_pins: true,
        loaded_against: Some(before),
    })
}

impl Prepared {
    /// Under the lock: whether the programs use the maps pinned now (a newcomer's
    /// load is stale if its predecessor replaced a pin meanwhile).
    pub(super) fn uses_the_pins(&self, pin_dir: &Path) -> bool {
        match &self.loaded_against {
            Some(ids) => pinned_ids(&pin_dir.join("maps")).as_ref() == Some(ids),
            None => true,
        }
    }
}

/// The ids of [`PINNED_MAPS`] under `map_dir`; None unless each is pinned with this
/// build's layout.
fn pinned_ids(map_dir: &Path) -> Option<Vec<u32>> {
    PINNED_MAPS
        .iter()
        .map(|name| compatible_pin_id(&map_dir.join(name), name))
        .collect()
}

/// Pins earlier builds left that this one no longer uses: the node-wide parking hash
/// (replaced by per-socket storage), the sock_release program that emptied it, and the
/// inbound policies without their fail-closed fields (now `NM_INBOUND_POL`: the old
/// map lives on only while an old program still uses it).
/// Removing a link's last pin detaches its program.
const RETIRED_PINS: [&str; 3] = [
    "maps/NM_PENDING_DST",
    "links/mesh_sock_release",
    "maps/NM_INBOUND_PODS",
];

/// Key and value sizes of the pinned maps; a pin left by an incompatible build is
/// replaced instead of being silently misread.
fn expected_layout(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    let sizes = match name {
        map_names::CONFIG => (4, size_of::<NodeConfig>()),
        map_names::ENROLLED => (8, size_of::<OutboundPolicy>()),
        map_names::PARKED => (4, size_of::<OrigDst>()),
        map_names::ORIG_DST => (size_of::<ConnKey>(), size_of::<OrigDst>()),
        map_names::INBOUND_PODS => (size_of::<Ip>(), size_of::<InboundPolicy>()),
        map_names::NODE_FLOWS => (size_of::<NodeFlow>(), 8),
        map_names::HELD => (8, size_of::<OutboundPolicy>()),
        _ => return None,
    };
    Some((sizes.0 as u32, sizes.1 as u32))
}

/// The object file in u64-backed storage: aya parses the ELF in place and needs it
/// 8-byte aligned (a plain `Vec<u8>` gives "error parsing ELF data").
struct AlignedObject {
    words: Vec<u64>,
    len: usize,
}

impl AlignedObject {
    fn read(path: &Path) -> Result<AlignedObject, DataplaneError> {
        let bytes = fs::read(path).map_err(|source| DataplaneError::ReadObject {
            path: path.to_path_buf(),
            source,
        })?;
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_ne_bytes(b);
        }
        Ok(AlignedObject {
            words,
            len: bytes.len(),
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the words own at least `len` initialised bytes; u8 has no alignment needs.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

/// Removes the pins of [`RETIRED_PINS`] that an earlier build left behind.
fn remove_retired_pins(pin_dir: &Path) -> Result<(), DataplaneError> {
    for retired in RETIRED_PINS {
        let path = pin_dir.join(retired);
        match fs::remove_file(&path) {
            Ok(()) => info!(pin = %path.display(), "removed a pin this version no longer uses"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataplaneError::Pin { path, source }),
        }
    }
    Ok(())
}

fn load_program(program: &mut Program) -> Result<(), aya::programs::ProgramError> {
    match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        _ => Ok(()),
    }
}

/// Creates the pin directories, and removes the pins of retired maps and of pods'
/// links whose namespace is gone. Returns the map directory.
pub(super) fn clean_pins(pin_dir: &Path) -> Result<PathBuf, DataplaneError> {
    let map_dir = pin_dir.join("maps");
    let link_dir = pin_dir.join("links");
    let pod_link_dir = pin_dir.join(sk_lookup::LINK_DIR);
    for dir in [&map_dir, &link_dir, &pod_link_dir] {
        fs::create_dir_all(dir).map_err(|source| DataplaneError::Pin {
            path: dir.clone(),
            source,
        })?;
    }
    remove_retired_pins(pin_dir)?;
    sk_lookup::remove_dead_pins(&pod_link_dir).map_err(|source| DataplaneError::Pin {
        path: pod_link_dir.clone(),
        source,
    })?;
    Ok(map_dir)
}

fn load_programs(object: &Path, map_dir: &Path) -> Result<Ebpf, DataplaneError> {
    let object = AlignedObject::read(object)?;
    let mut ebpf = EbpfLoader::new()
        .map_pin_path(map_dir)
        // NM_PARKED is per-socket storage, a map type aya has no wrapper for; only
        // the programs use it.
        .allow_unsupported_maps()
        .load(object.bytes())
        .map_err(|e| DataplaneError::Load(Box::new(e)))?;
    let kernel = preflight::kernel_release();
    for name in [
        program_names::CONNECT4,
        program_names::CONNECT6,
        program_names::SOCK_OPS,
        program_names::SK_LOOKUP,
    ] {
        let program = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?;
        load_program(program).map_err(|source| DataplaneError::ProgramLoad {
            program: name,
            requirement: preflight::kernel_requirement(name),
            kernel: kernel.clone(),
            source: Box::new(source),
        })?;
    }
    Ok(ebpf)
}

/// The id of the map pinned at `path`, when it is one this build pins as `name` and
/// has the layout this build expects.
fn compatible_pin_id(path: &Path, name: &str) -> Option<u32> {
    let (key, value) = expected_layout(name)?;
    let info = MapData::from_pin(path).ok()?.info().ok()?;
    (info.key_size() == key && info.value_size() == value).then(|| info.id())
}

/// Whether the pinned map at `path` has the layout this build expects of `name`
/// (a name this build does not pin has none to check).
fn pin_compatible(path: &Path, name: &str) -> bool {
    expected_layout(name).is_none() || compatible_pin_id(path, name).is_some()
}

/// Removes pinned maps whose layout differs from this build's; returns whether any
/// compatible pinned map was found (and will be reused).
fn drop_incompatible_pins(map_dir: &Path) -> Result<bool, DataplaneError> {
    let mut reused = false;
    let entries = match fs::read_dir(map_dir) {
        Ok(e) => e,
        Err(_) => return Ok(false),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if expected_layout(&name).is_none() {
            continue;
        }
        if pin_compatible(&path, &name) {
            reused = true;
        } else {
            warn!(map = %name, pin = %path.display(), "pinned map has another layout; replacing it");
            fs::remove_file(&path).map_err(|source| DataplaneError::Pin {
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(reused)
}
