//! A simulated Kubernetes cluster made of network namespaces and cgroups.

mod admin;
mod apps;
pub mod cluster;
pub mod host;
mod manifests;
mod network;
pub mod registry;

pub use cluster::{ClusterSpec, PodSpec, Process, SimCluster, SimNode, SimPod};
