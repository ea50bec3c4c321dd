//! A simulated Kubernetes cluster made of network namespaces and cgroups.

pub mod cluster;
pub mod host;
pub mod registry;

pub use cluster::{ClusterSpec, PodSpec, Process, SimCluster, SimNode, SimPod};
