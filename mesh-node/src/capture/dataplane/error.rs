//! What can go wrong loading, attaching and using the eBPF dataplane; every message
//! says what to check or do next.

use std::path::PathBuf;

use aya::maps::MapError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("cannot read the eBPF object {path}: {source} (build it with `cargo xtask build`, or pass --ebpf-object)")]
    ReadObject {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load the eBPF object: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("the eBPF object has no program `{0}`: it does not match this mesh-node build")]
    MissingProgram(&'static str),
    #[error("the kernel ({kernel}) refused program `{program}`; it needs {requirement}: {source}")]
    ProgramLoad {
        program: &'static str,
        requirement: &'static str,
        kernel: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("cannot attach `{program}` to cgroup {cgroup}: {source} (needs {requirement}, kernel is {kernel})")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        requirement: &'static str,
        kernel: String,
        source: std::io::Error,
    },
    #[error("sk_lookup attach to network namespace {netns} failed: {source}")]
    AttachNetns {
        netns: String,
        source: std::io::Error,
    },
    #[error("bpffs {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the running agent has not pinned every map under {map_dir} with this build's layout (yet): the programs are loaded once this agent holds the pin lock")]
    PinsNotReady { map_dir: PathBuf },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map {
        name,
        source: Box::new(source),
    }
}
