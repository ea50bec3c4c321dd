//! `mesh-sim`: drives the simulated cluster outside of tests (`cargo xtask demo` and
//! `cargo xtask bench` call it; the bench itself lives in `mesh_tests::bench`) and sweeps what crashed runs left behind.

use std::{
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use mesh_tests::sim::{
    host::target_bin, registry, ClusterSpec, PodSpec, RouteSpec, ServiceSpec, SimCluster,
};
use nix::sys::signal::{SigSet, Signal};
use serde_json::Value;

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
        /// Only these scenarios (direct, nodemesh-l4, stunnel, haproxy); all by default.
        #[arg(long, value_parser = parse_scenario)]
        scenario: Vec<mesh_tests::bench::Scenario>,
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

fn check(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn start_cluster(stop: &AtomicBool) -> Result<SimCluster> {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("web-v1", "apps", "b"));
    spec.pods.push(PodSpec::new("web-v2", "apps", "b"));
    spec.services = vec![
        ServiceSpec::new("web", "apps", 80, 8080, &["web-v1", "web-v2"]),
        ServiceSpec::new("web-v1", "apps", 80, 8080, &["web-v1"]),
        ServiceSpec::new("web-v2", "apps", 80, 8080, &["web-v2"]),
    ];
    spec.routes = vec![RouteSpec {
        name: "web-split".into(),
        namespace: "apps".into(),
        parent: "web".into(),
        port: 80,
        backends: vec![("web-v1".into(), 90), ("web-v2".into(), 10)],
    }];
    step(
        "Creating a simulated cluster: 2 nodes, 6 pods (network namespaces + cgroups), 3 Services",
    );
    let cluster = SimCluster::create(spec)?;
    for pod in &cluster.pods {
        println!(
            "    pod {:<10} ns {:<6} node {}  {} / {}",
            pod.name(),
            pod.spec.namespace,
            pod.spec.node,
            pod.ipv4,
            pod.ipv6
        );
    }
    println!("    namespace `apps` is labelled nodemesh.io/mesh=enabled; `plain` is not");
    check(stop)?;
    step("Starting one mesh-node agent per node");
    for node in &cluster.nodes {
        let started = Instant::now();
        cluster.start_agent(&node.name)?;
        println!(
            "    node {}: agent ready in {} ms (eBPF attached at {})",
            node.name,
            started.elapsed().as_millis(),
            node.cgroup.display()
        );
    }
    Ok(cluster)
}

fn demo(stop: &AtomicBool) -> Result<()> {
    let cluster = start_cluster(stop)?;
    let _server = cluster.serve("server", 8080)?;
    let dst = cluster.pod("server").addr4(8080);

    step(&format!(
        "client (apps, node a) sends to server {dst} for 3 seconds"
    ));
    let until = Instant::now() + Duration::from_secs(3);
    let (mut ok, mut bytes, mut peer) = (0u64, 0u64, String::new());
    while Instant::now() < until {
        check(stop)?;
        let r = cluster.transfer("client", dst, 256 * 1024)?;
        if !r.ok {
            bail!("transfer failed: {r:?}");
        }
        ok += 1;
        bytes += r.received;
        peer = r.peer.unwrap_or_default();
    }
    println!("    {ok} connections, {} KiB echoed intact", bytes / 1024);
    println!("    the client's socket was connected to {peer}: the in-pod outbound listener");

    step("What the agents recorded");
    let out = cluster.closed_connections("a")?;
    let inbound = cluster.closed_connections("b")?;
    print_connection("node a (outbound)", out.last());
    print_connection("node b (inbound) ", inbound.last());

    step(&format!(
        "Service apps/web (VIP {}) is split 90/10 between web-v1 and web-v2 by a TCPRoute",
        cluster.service("web").addr4()
    ));
    let _v1 = cluster.serve("web-v1", 8080)?;
    let _v2 = cluster.serve("web-v2", 8080)?;
    let before = cluster.closed_connections("b")?.len();
    let churn = cluster.churn("client", cluster.service("web").addr4(), 1000)?;
    check(stop)?;
    // Node b closes its side a moment after the client; wait (bounded) for every record.
    cluster.eventually(Duration::from_secs(2), || {
        cluster
            .closed_connections("b")
            .map(|c| c.len() - before)
            .unwrap_or(0) as u64
            >= churn.succeeded
    });
    let mut counts = std::collections::BTreeMap::new();
    for c in cluster.closed_connections("b")?.iter().skip(before) {
        *counts
            .entry(c["pod"]["name"].as_str().unwrap_or("?").to_string())
            .or_insert(0u32) += 1;
    }
    println!(
        "    {} connections from client: web-v1 got {}, web-v2 got {} (node b's inbound records)",
        churn.succeeded,
        counts.get("web-v1").copied().unwrap_or(0),
        counts.get("web-v2").copied().unwrap_or(0)
    );

    step("bystander (namespace `plain`, not enrolled) sends to the same server");
    let r = cluster.transfer("bystander", dst, 64 * 1024)?;
    let bystander = cluster.pod("bystander").ipv4.to_string();
    let captured = cluster.closed_connections("b")?.iter().any(|c| {
        c["direction"] == "inbound"
            && c["src"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("{bystander}:")))
    });
    println!(
        "    connected straight to {} (not redirected by node a); node b {} it on 15006",
        r.peer.unwrap_or_default(),
        if captured {
            "captured"
        } else {
            "did NOT capture"
        }
    );

    step("A kubelet-style probe from node b's own address");
    let r = cluster.transfer_from(&cluster.node_placement("b"), dst, 16)?;
    println!(
        "    probe ok={} and bypassed the proxy (node addresses are never captured)",
        r.ok
    );

    for node in ["a", "b"] {
        check(stop)?;
        step(&format!("node {node}: workloads (admin API /workloads)"));
        print_workloads(&cluster.admin(node, "/workloads")?);
        step(&format!(
            "node {node}: eBPF programs and maps (admin API /bpf)"
        ));
        print_bpf(&cluster.admin(node, "/bpf")?);
    }
    step("meshctl node log-level, run on node a");
    let meshctl = target_bin("meshctl")?;
    let out = cluster
        .node_placement("a")
        .command(&meshctl)?
        .args(["node", "log-level"])
        .output()?;
    print!(
        "    {}",
        String::from_utf8_lossy(&out.stdout).replace('\n', "\n    ")
    );
    step("Done: tearing the cluster down (namespaces, cgroups, pins, processes)");
    Ok(())
}

fn print_connection(label: &str, c: Option<&Value>) {
    let Some(c) = c else {
        println!("    {label}: nothing recorded");
        return;
    };
    println!(
        "    {label}: pod {}/{}  src {}  original dst {}  {} B up / {} B down  {}",
        c["pod"]["namespace"].as_str().unwrap_or("?"),
        c["pod"]["name"].as_str().unwrap_or("?"),
        c["src"].as_str().unwrap_or("?"),
        c["original_dst"].as_str().unwrap_or("?"),
        c["bytes_to_server"],
        c["bytes_to_client"],
        c["result"].as_str().unwrap_or("?"),
    );
    println!(
        "    {:17}  security {}: {} -> {}",
        "",
        c["security"].as_str().unwrap_or("?"),
        c["source_identity"].as_str().unwrap_or("-"),
        c["destination_identity"].as_str().unwrap_or("-"),
    );
}

fn print_workloads(v: &Value) {
    println!(
        "    {:<8} {:<10} {:<9} {:<13} reason",
        "NS", "POD", "ENROLLED", "NETNS-COOKIE"
    );
    for w in v.as_array().into_iter().flatten() {
        println!(
            "    {:<8} {:<10} {:<9} {:<13} {}",
            w["namespace"].as_str().unwrap_or("?"),
            w["name"].as_str().unwrap_or("?"),
            w["enrolled"].to_string(),
            w["netns_cookie"]
                .as_u64()
                .map(|c| c.to_string())
                .unwrap_or("-".into()),
            w["reason"].as_str().unwrap_or("-"),
        );
    }
}

fn print_bpf(v: &Value) {
    for p in v["programs"].as_array().into_iter().flatten() {
        println!(
            "    program {:<18} {:<20} prog id {:<5} link id {}",
            p["name"].as_str().unwrap_or("?"),
            p["attach"].as_str().unwrap_or("?"),
            p["program_id"],
            p["link_id"]
        );
    }
    for m in v["maps"].as_array().into_iter().flatten() {
        println!(
            "    map     {:<22} {:>6} / {} entries",
            m["name"].as_str().unwrap_or("?"),
            m["entries"],
            m["max_entries"]
        );
    }
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
        Cmd::Demo => stop_flag().and_then(|s| demo(&s)),
        Cmd::Bench {
            out,
            rounds,
            scenario,
        } => stop_flag().and_then(|s| {
            let plan = mesh_tests::bench::Plan {
                rounds,
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
