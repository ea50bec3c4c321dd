//! `mesh-sim`: drives the simulated cluster outside of tests (`cargo xtask demo`
//! and `cargo xtask bench` call it) and sweeps what crashed runs left behind.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_tests::sim::registry;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Remove namespaces, cgroups and pins of clusters whose owner process is gone.
    Sweep,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Sweep => {
            let swept = registry::sweep_stale();
            if !swept.is_empty() {
                println!(
                    "removed {} stale simulated cluster(s): {}",
                    swept.len(),
                    swept.join(", ")
                );
            }
            ExitCode::SUCCESS
        }
    }
}
