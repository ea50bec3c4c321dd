//! `mesh-sim`: drives the simulated cluster outside of tests (`cargo xtask demo` and
//! `cargo xtask bench` call it) and sweeps what crashed runs left behind.

use std::{
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use mesh_tests::sim::{registry, ClusterSpec, SimCluster};
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
    /// Quick throughput and connection-rate figures, direct versus through the mesh.
    Bench,
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

fn check(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn step(text: &str) {
    println!("\n==> {text}");
}

/// Median of `runs` measurements.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// One measured path: median throughput, round-trip percentiles, connection rate.
struct PathFigures {
    label: &'static str,
    mib_s: f64,
    rtt: mesh_tests::report::RttReport,
    conns_s: f64,
}

fn measure(
    cluster: &SimCluster,
    label: &'static str,
    pod: &str,
    dst: std::net::SocketAddr,
    stop: &AtomicBool,
) -> Result<PathFigures> {
    const BYTES: u64 = 128 * 1024 * 1024;
    const CONNS: u64 = 2000;
    let mut rates = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..5 {
        check(stop)?;
        let r = cluster.transfer(pod, dst, BYTES)?;
        if !r.ok {
            bail!("{label}: transfer failed: {r:?}");
        }
        rates.push(BYTES as f64 / (1 << 20) as f64 / (r.elapsed_us as f64 / 1e6));
        let c = cluster.churn(pod, dst, CONNS)?;
        conns.push(c.succeeded as f64 / (c.elapsed_ms.max(1) as f64 / 1e3));
    }
    let rtt = cluster.rtt(pod, dst, 1024, 5000)?;
    if let Some(e) = &rtt.error {
        bail!("{label}: round trips failed: {e}");
    }
    Ok(PathFigures {
        label,
        mib_s: median(rates),
        rtt,
        conns_s: median(conns),
    })
}

fn bench(stop: &AtomicBool) -> Result<()> {
    let mut figures = Vec::new();
    for mtls in [false, true] {
        let mut spec = ClusterSpec::two_nodes();
        spec.mtls = mtls;
        step(if mtls {
            "Cluster with the CA: meshed pods talk HBONE (HTTP/2 CONNECT over mTLS)"
        } else {
            "Cluster without a CA: meshed pods talk plain TCP through both proxies"
        });
        let cluster = SimCluster::create(spec)?;
        cluster.start_agents()?;
        let _server = cluster.serve("server", 8080)?;
        let _plain = cluster.serve("outsider", 8080)?;
        if !mtls {
            figures.push(measure(
                &cluster,
                "direct (no mesh)",
                "bystander",
                cluster.pod("outsider").addr4(8080),
                stop,
            )?);
        }
        let label = if mtls {
            "HBONE mTLS, 2 proxies"
        } else {
            "L4 plaintext, 2 proxies"
        };
        figures.push(measure(
            &cluster,
            label,
            "client",
            cluster.pod("server").addr4(8080),
            stop,
        )?);
    }
    step("Results (median of 5 for throughput and connections; 5,000 round trips of 1 KiB)");
    println!(
        "    {:<26} {:>9} {:>9} {:>9} {:>10} {:>11}",
        "path", "MiB/s", "RTT p50", "RTT p99", "RTT p99.9", "conns/s"
    );
    for f in &figures {
        println!(
            "    {:<26} {:>9.0} {:>7.0}µs {:>7.0}µs {:>8.0}µs {:>11.0}",
            f.label, f.mib_s, f.rtt.p50_us, f.rtt.p99_us, f.rtt.p999_us, f.conns_s
        );
    }
    if let [direct, plain, mtls] = &figures[..] {
        println!(
            "    HBONE vs direct: {:.2}x throughput, +{:.0} µs RTT p50, {:.2}x connection rate",
            mtls.mib_s / direct.mib_s,
            mtls.rtt.p50_us - direct.rtt.p50_us,
            mtls.conns_s / direct.conns_s
        );
        println!(
            "    HBONE vs plain L4 proxies: {:.2}x throughput, +{:.0} µs RTT p50",
            mtls.mib_s / plain.mib_s,
            mtls.rtt.p50_us - plain.rtt.p50_us
        );
    }
    println!("    (echo workloads: bytes flow both ways; TLS handshakes/s: cargo bench -p mesh-node --bench handshake)");
    Ok(())
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
        Cmd::Bench => stop_flag().and_then(|s| bench(&s)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
