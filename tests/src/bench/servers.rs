//! Server programs in the server pods: iperf3 and the test app's HTTP server (the
//! echo server is the simulated cluster's own `serve`).

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::Stdio,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::sim::{host::target_bin, Process, SimCluster};

/// Starts `program args` in `pod` and waits for a stdout line containing `ready`.
fn start(
    cluster: &SimCluster,
    pod: &str,
    program: &Path,
    args: &[&str],
    ready: &str,
) -> Result<Process> {
    let mut child = cluster
        .pod(pod)
        .placement()
        .command(program)?
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} in {pod}", program.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let started = lines.any(|l| l.map(|l| l.contains(ready)).unwrap_or(false));
    if !started {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!("{} in {pod} did not start: {err}", program.display());
    }
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(Process(child))
}

pub fn iperf(cluster: &SimCluster, pod: &str, port: u16) -> Result<Process> {
    let port = port.to_string();
    start(
        cluster,
        pod,
        Path::new("iperf3"),
        &["-s", "-p", &port, "--forceflush"],
        "Server listening",
    )
}

pub fn http(cluster: &SimCluster, pod: &str, port: u16) -> Result<Process> {
    let listen = format!("[::]:{port}");
    start(
        cluster,
        pod,
        &target_bin("mesh-testapp")?,
        &["http-serve", "--listen", &listen, "--name", pod],
        "ready",
    )
}
