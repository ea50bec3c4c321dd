//! A simulated Kubernetes cluster made of network namespaces and cgroups.

mod admin;
mod agent_control;
mod apps;
pub mod capture;
pub mod cluster;
pub mod examples;
pub mod host;
mod load;
mod manifests;
pub mod network;
pub mod registry;
pub mod services;
pub mod usage;

pub use agent_control::OldAgent;
pub use apps::FloodRun;
pub use cluster::{ClusterSpec, PodSpec, Process, SimCluster, SimNode, SimPod};
pub use load::RunningLoad;
pub use services::{RouteSpec, ServiceSpec, SimService};
