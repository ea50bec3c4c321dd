//! `cargo xtask demo`: the example app of `deploy/examples/` on the simulated 2-node
//! cluster — the HTTPRoute's 90/10 split as the client sees it, the mTLS identities on
//! the wire, the forbidden client refused, and `meshctl node` on each node.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::sim::{examples, host::target_bin, Process, SimCluster};

/// How long the client sends requests to the split Service.
const CLIENT_RUN: Duration = Duration::from_secs(3);
const BATCH: &str = "250";

fn step(text: &str) {
    println!("\n==> {text}");
}

fn check(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn examples_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    dir.canonicalize().unwrap_or(dir)
}

fn meshctl(cluster: &SimCluster, node: &str, args: &[&str]) -> Result<String> {
    let out = cluster
        .node_placement(node)
        .command(&target_bin("meshctl")?)?
        .arg("node")
        .args(args)
        .output()
        .context("running meshctl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "meshctl node {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

pub fn run(stop: &AtomicBool) -> Result<()> {
    let dir = examples_dir();
    step(&format!("Reading the example app from {}", dir.display()));
    let example = examples::load(&dir)?;
    for p in &example.spec.pods {
        println!(
            "    pod {:<10} ns {:<5} sa {:<10} node {}",
            p.name, p.namespace, p.service_account, p.node
        );
    }
    for s in &example.spec.services {
        println!(
            "    Service {}/{} port {} → {:?}",
            s.namespace, s.name, s.port, s.pods
        );
    }

    step("Creating the simulated cluster: 2 nodes, a network namespace and cgroup per pod");
    let cluster = SimCluster::create(example.spec.clone())?;
    check(stop)?;
    let started = Instant::now();
    cluster.start_agents()?;
    println!(
        "    CA and one mesh-node agent per node ready in {} ms (eBPF attached per node)",
        started.elapsed().as_millis()
    );
    let mut servers: Vec<Process> = Vec::new();
    for (pod, deployment, ports) in &example.servers {
        servers.push(cluster.http_serve(pod, ports)?);
        println!("    {pod} ({deployment}) serves HTTP on {ports:?}");
    }

    step("Applying the example's HTTPRoute and AuthorizationPolicy as written");
    cluster.write_manifest("examples.yaml", &example.manifests)?;
    let (client, forbidden) = (
        find(&example.clients, "client")?,
        find(&example.clients, "forbidden")?,
    );
    let web = cluster.service("web").addr4();
    // Routed per request once both versions answer one kept-alive connection.
    let routed = cluster.eventually(Duration::from_secs(5), || {
        cluster
            .http(&client, web, "web", "/", &["--count", "20"])
            .is_ok_and(|r| r.pods.len() == 2)
    });
    if routed.is_none() {
        bail!(
            "the HTTPRoute never took effect; see the agent log {}",
            cluster.agent_log_path("a").display()
        );
    }
    println!("    the route is live on node a");

    step(&format!(
        "client → http://web ({web}) for {} seconds, on kept-alive connections",
        CLIENT_RUN.as_secs()
    ));
    let until = Instant::now() + CLIENT_RUN;
    let (mut counts, mut requests, mut errors) = (BTreeMap::<String, u64>::new(), 0u64, 0u64);
    let mut p50 = Vec::new();
    while Instant::now() < until {
        check(stop)?;
        let r = cluster.http(&client, web, "web", "/", &["--count", BATCH])?;
        requests += r.requests;
        errors += r.errors;
        p50.push(r.p50_us);
        for (pod, n) in r.pods {
            *counts.entry(pod).or_default() += n;
        }
    }
    p50.sort_unstable();
    println!(
        "    {requests} requests, {errors} failed, median latency {} µs",
        p50[p50.len() / 2]
    );
    for (pod, n) in &counts {
        println!(
            "    {pod:<8} {n:>6}  ({:.1} %)",
            *n as f64 * 100.0 / requests.max(1) as f64
        );
    }
    println!("    (the HTTPRoute asks for 90/10; every request is routed on its own)");

    step("Who talked to whom: mutual TLS with SPIFFE identities");
    let logs = cluster.request_logs("a");
    let last = logs.last().context("node a logged no request")?;
    println!(
        "    node a, request log: {} {} → {} via {}: {} {} -> {}",
        last["method"].as_str().unwrap_or("?"),
        last["path"].as_str().unwrap_or("?"),
        last["backend"].as_str().unwrap_or("?"),
        last["upstream_address"].as_str().unwrap_or("?"),
        last["connection_security_policy"].as_str().unwrap_or("?"),
        last["source_principal"].as_str().unwrap_or("?"),
        last["destination_principal"].as_str().unwrap_or("?"),
    );
    let inbound = cluster.admin("b", "/connections")?;
    if let Some(c) = inbound["live"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(inbound["closed"].as_array().into_iter().flatten())
        .find(|c| c["direction"] == "inbound" && c["security"] == "mutual_tls")
    {
        println!(
            "    node b, inbound tunnel to {}: {} {} -> {}",
            c["pod"]["name"].as_str().unwrap_or("?"),
            c["security"].as_str().unwrap_or("?"),
            c["source_identity"].as_str().unwrap_or("?"),
            c["destination_identity"].as_str().unwrap_or("?"),
        );
    }

    step("forbidden → http://web: the AuthorizationPolicy allows only demo/client, GET and HEAD");
    check(stop)?;
    let r = cluster.http(&forbidden, web, "web", "/", &[])?;
    let answer = r.samples.first().context("forbidden got no answer")?;
    println!("    HTTP {}: {}", answer.status, answer.body.trim());
    let r = cluster.http(&client, web, "web", "/", &["--method", "DELETE"])?;
    let answer = r.samples.first().context("client's DELETE got no answer")?;
    println!(
        "    client DELETE: HTTP {}: {}",
        answer.status,
        answer.body.trim()
    );
    // The destination's agent judged each request: its access log says by what.
    let logs = cluster.request_logs("b");
    for l in logs
        .iter()
        .filter(|l| l["reporter"] == "destination" && l["response_code"] == 403)
        .take(2)
    {
        println!(
            "    node b denied {} {} from {}: {} (flag {})",
            l["method"].as_str().unwrap_or("?"),
            l["path"].as_str().unwrap_or("?"),
            l["source_principal"].as_str().unwrap_or("?"),
            l["detail"].as_str().unwrap_or("?"),
            l["response_flags"].as_str().unwrap_or("?"),
        );
    }

    for node in ["a", "b"] {
        check(stop)?;
        step(&format!("meshctl node workloads, on node {node}"));
        print!("{}", indent(&meshctl(&cluster, node, &["workloads"])?));
    }
    step("meshctl node routes, on node a (weights and the shares picked so far)");
    print!("{}", indent(&meshctl(&cluster, "a", &["routes"])?));
    let target = format!("{web}");
    step(&format!(
        "meshctl node trace demo/forbidden {target}, on node a (no traffic sent)"
    ));
    print!(
        "{}",
        indent(&meshctl(
            &cluster,
            "a",
            &["trace", "demo/forbidden", &target]
        )?)
    );
    drop(servers);
    step("Done: tearing the cluster down (namespaces, cgroups, pins, processes)");
    Ok(())
}

fn find(clients: &[(String, String)], deployment: &str) -> Result<String> {
    clients
        .iter()
        .find(|(_, d)| d == deployment)
        .map(|(p, _)| p.clone())
        .with_context(|| format!("the example app has no `{deployment}` Deployment"))
}
