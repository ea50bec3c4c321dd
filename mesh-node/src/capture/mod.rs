//! Capture: the eBPF dataplane and everything that puts a pod's traffic into the
//! agent's hands — pinned maps and links, cgroups, network namespaces, the pod locator,
//! sockets inside a pod's namespace, held pods, map pressure, and the preflight checks.

pub mod bpf_sys;
pub mod cgroup;
pub mod dataplane;
pub(crate) mod holds;
pub(crate) mod locator;
pub(crate) mod map_pressure;
pub(crate) mod netns;
pub mod pin_lock;
pub mod preflight;
pub mod sk_lookup;
pub(crate) mod sockets;
