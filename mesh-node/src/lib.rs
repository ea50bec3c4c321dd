//! Nodemesh node agent: loads the eBPF dataplane, opens listeners inside each enrolled
//! pod's network namespace, and proxies the connections the kernel steers to them.
//!
//! The rooms, and which may import which, are described in ARCHITECTURE.md at the
//! repository root.

// Library code returns errors and logs through tracing (the binaries print); see the
// lints in the workspace's Cargo.toml.
//
// An item is `pub` only where the binaries, tests, benches or fuzz targets reach it;
// everything else says `pub(crate)` (`unreachable_pub`).
#![warn(
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

pub mod admin;
pub mod agent;
pub mod ca;
pub mod capture;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod handover;
pub mod hbone;
pub mod identity;
pub mod keys;
pub(crate) mod limits;
pub(crate) mod proxy;
pub(crate) mod relay;
pub mod routing;
pub(crate) mod telemetry;
pub(crate) mod workloads;
