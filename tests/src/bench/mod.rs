//! `cargo xtask bench`: the data path on the simulated 2-node cluster, side by side
//! with peers doing the same job (stunnel, haproxy), written to `docs/benchmarks/`.

pub mod charts;
pub mod http;
pub mod machine;
pub mod measure;
pub mod peers;
pub mod report;
pub mod scale;
pub mod scenarios;
mod servers;

use std::{fs, path::Path, sync::atomic::AtomicBool, time::Instant};

use anyhow::{Context, Result};

pub use measure::Plan;
use scenarios::Bed;
pub use scenarios::Scenario;

fn step(text: &str) {
    println!("\n==> {text}");
}

/// Measures `scenarios` (all when empty) and writes `README.md` and the charts into
/// `out_dir`.
pub fn run(stop: &AtomicBool, out_dir: &Path, plan: Plan, scenarios: &[Scenario]) -> Result<()> {
    let scenarios = if scenarios.is_empty() {
        &Scenario::ALL[..]
    } else {
        scenarios
    };
    let started = Instant::now();
    step("Checking the tools (iperf3, stunnel4, haproxy, fonts-dejavu-core)");
    machine::ensure_tools()?;
    let machine = machine::Machine::describe();
    println!(
        "    {} ({} cores), load average {}",
        machine.cpu, machine.cores, machine.load_start
    );
    step("Starting the simulated cluster, its agents, the servers and the peer proxies");
    let work = std::env::temp_dir().join(format!("nodemesh-bench-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let bed = Bed::start(&work)?;
    for s in scenarios {
        println!("    {:<12} {}", s.name(), s.description());
    }
    step(&format!(
        "Measuring: {} rounds, each visiting every scenario in turn",
        plan.rounds
    ));
    let mut results = measure::run(&bed, scenarios, plan, stop)?;
    step(&format!(
        "Holding {} idle connections, then {} HTTP requests/s for {} s, per scenario",
        plan.held_connections, plan.http_rate, plan.cost_http_seconds
    ));
    scale::run(&bed, &mut results, plan, stop)?;
    drop(bed);
    let _ = fs::remove_dir_all(&work);
    let report = report::Report {
        machine: &machine,
        results: &results,
        plan,
        minutes: started.elapsed().as_secs_f64() / 60.0,
        load_end: machine::load_average(),
    };
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    fs::write(out_dir.join("README.md"), report.markdown())?;
    charts::write(out_dir, &results)?;
    step("Ratios (this run)");
    print!("{}", report.ratios());
    step("Goals");
    print!("{}", report.goals());
    println!(
        "\n    written to {} in {:.1} minutes (load average {} at start, {} now)",
        out_dir.display(),
        started.elapsed().as_secs_f64() / 60.0,
        machine.load_start,
        report.load_end
    );
    Ok(())
}
