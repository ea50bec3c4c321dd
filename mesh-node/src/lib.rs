//! Nodemesh node agent: loads the eBPF dataplane, opens listeners inside each enrolled
//! pod's network namespace, and proxies the connections the kernel steers to them.
// Library code returns errors and logs through tracing (the binaries print); see the
// lints in the workspace's Cargo.toml.
#![warn(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

pub mod access_log;
pub mod admin;
pub mod admin_client;
pub mod admin_views;
pub mod agent;
pub mod authz;
pub mod balancer;
pub mod bpf_sys;
pub mod ca;
pub mod cert_cache;
pub mod certificates;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod connections;
pub mod dataplane;
pub mod files_source;
pub mod forward;
pub mod hbone;
pub mod health;
pub(crate) mod holds;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod kube_source;
pub mod limits;
pub mod locator;
pub mod log_limit;
pub mod map_pressure;
pub mod metrics;
pub mod netns;
pub mod outbound;
pub mod policy;
pub mod preflight;
pub mod relay;
pub mod routes;
pub mod sockets;
pub mod state;
pub mod tls;
pub mod trace;
pub mod workloads;
