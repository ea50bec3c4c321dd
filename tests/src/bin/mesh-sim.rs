//! `mesh-sim`: drives the simulated cluster outside of tests (`cargo xtask demo` and
//! `cargo xtask bench` call it; the bench itself lives in `mesh_tests::bench`) and sweeps what crashed runs left behind.

use std::{
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::Result;
use clap::{Parser, Subcommand};
use mesh_tests::sim::registry;
use nix::sys::signal::{SigSet, Signal};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the mesh on a simulated 2-node cluster and show what it does.
    Demo,
    /// Benchmarks: direct, through the mesh and through peer proxies; writes the
    /// markdown report and charts to OUT.
    Bench {
        #[arg(long, default_value = "docs/benchmarks")]
        out: std::path::PathBuf,
        /// Runs per figure (the medians need at least 5 to mean much).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Only these scenarios (direct, nodemesh-l4, nodemesh-l7, nodemesh-l7-authz,
        /// nodemesh-l7-jwt, stunnel, haproxy); all by default.
        #[arg(long, value_parser = parse_scenario)]
        scenario: Vec<mesh_tests::bench::Scenario>,
        /// Idle connections held at once for the memory-per-connection figure (0: skip).
        #[arg(long, default_value_t = 10_000)]
        held_connections: u64,
        /// Seconds of a fixed 1,000 HTTP requests/s for the CPU-per-rate figure (0: skip).
        #[arg(long, default_value_t = 30)]
        cost_http_seconds: u64,
    },
    /// Remove namespaces, cgroups and pins of clusters whose owner process is gone.
    Sweep,
}

/// Ctrl-C and SIGTERM set this instead of killing us, so the cluster is torn down.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            eprintln!("\ninterrupted: tearing the simulated cluster down");
            f.store(true, Ordering::SeqCst);
        }
    });
    Ok(flag)
}

fn parse_scenario(name: &str) -> Result<mesh_tests::bench::Scenario, String> {
    mesh_tests::bench::Scenario::by_name(name).ok_or_else(|| {
        format!("unknown scenario {name}: use direct, nodemesh-l4, stunnel or haproxy")
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Sweep => {
            let swept = registry::sweep_stale();
            if !swept.is_empty() {
                println!(
                    "removed {} stale simulated cluster(s): {}",
                    swept.len(),
                    swept.join(", ")
                );
            }
            Ok(())
        }
        Cmd::Demo => stop_flag().and_then(|s| mesh_tests::demo::run(&s)),
        Cmd::Bench {
            out,
            rounds,
            scenario,
            held_connections,
            cost_http_seconds,
        } => stop_flag().and_then(|s| {
            let plan = mesh_tests::bench::Plan {
                rounds,
                held_connections,
                cost_http_seconds,
                ..Default::default()
            };
            mesh_tests::bench::run(&s, &out, plan, &scenario)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
