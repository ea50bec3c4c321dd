//! Running the test app (`mesh-testapp`) in pods and on nodes.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::Stdio,
};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    host::{ip, Placement},
    Process, SimCluster,
};
use crate::{
    conn_flood::FloodMode,
    report::{ChurnReport, FloodReport, HttpReport, RttReport, TransferReport, WebsocketReport},
};

/// A flood running in a pod (`mesh-testapp flood`): its connections are open.
pub struct FloodRun {
    process: Process,
    stdout: BufReader<std::process::ChildStdout>,
    /// The report once every connection was opened.
    pub opened: FloodReport,
}

impl FloodRun {
    /// Waits until the flood ends (its peer closed everything, or its time is up).
    pub fn finish(mut self) -> Result<FloodReport> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let _ = self.process.0.wait();
        serde_json::from_str(line.trim()).with_context(|| format!("flood report `{line}`"))
    }

    /// The attacker leaves: its process (and every connection) is gone when this returns.
    pub fn stop(self) {
        drop(self.process);
    }
}

impl SimCluster {
    /// Starts an echo server in `pod` on `port` and waits until it listens. Like most
    /// real servers it binds one dual-stack socket (`[::]`), taking IPv4 and IPv6.
    pub fn serve(&self, pod: &str, port: u16) -> Result<Process> {
        self.start_server(pod, &["serve", "--listen", &format!("[::]:{port}")])
    }

    /// Starts the HTTP echo server in `pod` on each of `ports` (dual-stack); it answers
    /// with `x-served-by: <pod>` and a JSON report of the request.
    pub fn http_serve(&self, pod: &str, ports: &[u16]) -> Result<Process> {
        let mut args = vec!["http-serve".to_string(), "--name".into(), pod.into()];
        for p in ports {
            args.extend(["--listen".to_string(), format!("[::]:{p}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_server(pod, &args)
    }

    /// An HTTP server in `pod` on `port` that serves every request by calling `to`
    /// (with `host` as its Host), passing the trace context on: an application in
    /// the middle of a call chain. It answers `{"pod": .., "upstream": <its answer>}`.
    pub fn http_serve_forwarding(
        &self,
        pod: &str,
        port: u16,
        to: SocketAddr,
        host: &str,
    ) -> Result<Process> {
        let (listen, to) = (format!("[::]:{port}"), to.to_string());
        self.start_server(
            pod,
            &[
                "http-serve",
                "--name",
                pod,
                "--listen",
                &listen,
                "--forward-to",
                &to,
                "--forward-host",
                host,
            ],
        )
    }

    /// [`SimCluster::http_serve`], answering every request with `status` (a broken
    /// endpoint).
    pub fn http_serve_status(&self, pod: &str, port: u16, status: u16) -> Result<Process> {
        let (listen, status) = (format!("[::]:{port}"), status.to_string());
        self.start_server(
            pod,
            &[
                "http-serve",
                "--name",
                pod,
                "--listen",
                &listen,
                "--status",
                &status,
            ],
        )
    }

    /// [`SimCluster::http_serve`], waiting `delay_ms` before every answer (a slow
    /// endpoint).
    pub fn http_serve_slow(&self, pod: &str, port: u16, delay_ms: u64) -> Result<Process> {
        let (listen, delay) = (format!("[::]:{port}"), delay_ms.to_string());
        self.start_server(
            pod,
            &[
                "http-serve",
                "--name",
                pod,
                "--listen",
                &listen,
                "--delay-ms",
                &delay,
            ],
        )
    }

    /// [`SimCluster::http_serve`], answering every request with `status` after
    /// `delay_ms` (a slow, broken endpoint).
    pub fn http_serve_status_slow(
        &self,
        pod: &str,
        port: u16,
        status: u16,
        delay_ms: u64,
    ) -> Result<Process> {
        let listen = format!("[::]:{port}");
        let (status, delay) = (status.to_string(), delay_ms.to_string());
        self.start_server(
            pod,
            &[
                "http-serve",
                "--name",
                pod,
                "--listen",
                &listen,
                "--status",
                &status,
                "--delay-ms",
                &delay,
            ],
        )
    }

    /// An HTTP server in `pod` on `port` answering every request with the contents of
    /// `file` (read at each request, so rewriting it changes the answers): a static
    /// file server, such as an issuer's JWKS endpoint.
    pub fn http_serve_file(&self, pod: &str, port: u16, file: &std::path::Path) -> Result<Process> {
        let listen = format!("[::]:{port}");
        let file = file.to_string_lossy().to_string();
        self.start_server(
            pod,
            &[
                "http-serve",
                "--name",
                pod,
                "--listen",
                &listen,
                "--file",
                &file,
            ],
        )
    }

    fn start_server(&self, pod: &str, args: &[&str]) -> Result<Process> {
        let p = self.pod(pod);
        let mut cmd = p.placement().command(&self.testapp)?;
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting a server")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("{} server in {pod} did not start: {err}", args[0]);
        }
        Ok(Process(child))
    }

    /// Runs HTTP requests from `pod` (see `mesh-testapp http --help` for `extra`).
    pub fn http(
        &self,
        pod: &str,
        dst: SocketAddr,
        host: &str,
        path: &str,
        extra: &[&str],
    ) -> Result<HttpReport> {
        let (dst, mut args) = (dst.to_string(), Vec::new());
        args.extend(["http", "--connect", &dst, "--host", host, "--path", path]);
        args.extend(extra);
        self.testapp_report(&self.pod(pod).placement(), &args)
    }

    /// A WebSocket upgrade from `pod` to `dst`, then one echoed message.
    pub fn websocket(
        &self,
        pod: &str,
        dst: SocketAddr,
        host: &str,
        message: &str,
    ) -> Result<WebsocketReport> {
        let dst = dst.to_string();
        self.testapp_report(
            &self.pod(pod).placement(),
            &[
                "websocket",
                "--connect",
                &dst,
                "--host",
                host,
                "--message",
                message,
            ],
        )
    }

    fn run_testapp(&self, placement: &Placement, args: &[String]) -> Result<String> {
        let out = placement
            .command(&self.testapp)?
            .args(args)
            .output()
            .context("running mesh-testapp")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.trim().is_empty() {
            bail!(
                "mesh-testapp printed nothing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// Runs a test-app client and parses the JSON report it prints.
    pub fn testapp_report<T: serde::de::DeserializeOwned>(
        &self,
        placement: &Placement,
        args: &[&str],
    ) -> Result<T> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Ok(serde_json::from_str(
            self.run_testapp(placement, &args)?.trim(),
        )?)
    }

    /// Opens `count` connections from `placement` to `dst` and keeps them for up to
    /// `seconds`; returns once they are open.
    pub fn flood_from(
        &self,
        placement: &Placement,
        dst: SocketAddr,
        count: usize,
        mode: FloodMode,
        seconds: u64,
    ) -> Result<FloodRun> {
        let mut runs = self.floods(&[(placement.clone(), dst, count, mode, seconds)])?;
        runs.pop().ok_or_else(|| anyhow!("no flood"))
    }

    /// Several floods at once: all start, then this returns once each has opened its
    /// connections. (Started from this thread: a flood dies with the thread that
    /// started it.)
    pub fn floods(
        &self,
        floods: &[(Placement, SocketAddr, usize, FloodMode, u64)],
    ) -> Result<Vec<FloodRun>> {
        let mut started = Vec::new();
        for (placement, dst, count, mode, seconds) in floods {
            let mode = match mode {
                FloodMode::Idle => "idle",
                FloodMode::Echo => "echo",
                FloodMode::Slowloris => "slowloris",
                FloodMode::TlsHello => "tls-hello",
            };
            let mut child = placement
                .command(&self.testapp)?
                .args(["flood", "--connect", &dst.to_string(), "--mode", mode])
                .args([
                    "--count",
                    &count.to_string(),
                    "--seconds",
                    &seconds.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .context("starting mesh-testapp flood")?;
            let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
            started.push((Process(child), BufReader::new(stdout)));
        }
        let mut runs = Vec::new();
        for (process, mut stdout) in started {
            let mut line = String::new();
            stdout.read_line(&mut line)?;
            let opened = serde_json::from_str(line.trim())
                .with_context(|| format!("flood did not start: `{line}`"))?;
            runs.push(FloodRun {
                process,
                stdout,
                opened,
            });
        }
        Ok(runs)
    }

    /// [`Self::flood_from`] in `pod`.
    pub fn flood(
        &self,
        pod: &str,
        dst: SocketAddr,
        count: usize,
        mode: FloodMode,
        seconds: u64,
    ) -> Result<FloodRun> {
        self.flood_from(&self.pod(pod).placement(), dst, count, mode, seconds)
    }

    /// Sends `bytes` random bytes from `pod` to `dst` and checks the echo.
    pub fn transfer(&self, pod: &str, dst: SocketAddr, bytes: u64) -> Result<TransferReport> {
        self.transfer_from(&self.pod(pod).placement(), dst, bytes)
    }

    pub fn transfer_from(
        &self,
        placement: &Placement,
        dst: SocketAddr,
        bytes: u64,
    ) -> Result<TransferReport> {
        let (dst, bytes) = (dst.to_string(), bytes.to_string());
        self.testapp_report(
            placement,
            &["transfer", "--connect", &dst, "--bytes", &bytes],
        )
    }

    pub fn node_placement(&self, node: &str) -> Placement {
        let n = self.node(node);
        Placement {
            netns: n.netns.clone(),
            cgroup: n.cgroup.join("system"),
        }
    }

    /// A transfer whose payload is `marker` repeated (to look for it on the wire).
    pub fn transfer_marked(
        &self,
        pod: &str,
        dst: SocketAddr,
        bytes: u64,
        marker: &str,
    ) -> Result<TransferReport> {
        let (dst, bytes) = (dst.to_string(), bytes.to_string());
        let args = [
            "transfer",
            "--connect",
            &dst,
            "--bytes",
            &bytes,
            "--marker",
            marker,
        ];
        self.testapp_report(&self.pod(pod).placement(), &args)
    }

    /// Starts one long-lived connection (ping every 500 ms for `seconds`).
    pub fn hold(&self, pod: &str, dst: SocketAddr, seconds: u64) -> Result<std::process::Child> {
        let mut cmd = self.pod(pod).placement().command(&self.testapp)?;
        cmd.args([
            "hold",
            "--connect",
            &dst.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .stdout(Stdio::piped());
        Ok(cmd.spawn()?)
    }

    /// Starts `mesh-testapp <command> <args>` in `pod` and returns at once (its report
    /// on stdout when it ends).
    pub fn start_testapp(
        &self,
        pod: &str,
        command: &str,
        args: &[String],
    ) -> Result<std::process::Child> {
        let mut cmd = self.pod(pod).placement().command(&self.testapp)?;
        cmd.arg(command).args(args).stdout(Stdio::piped());
        Ok(cmd.spawn()?)
    }

    /// Closed-loop round trips of `size` bytes from `pod`.
    pub fn rtt(&self, pod: &str, dst: SocketAddr, size: u64, count: u64) -> Result<RttReport> {
        let (dst, size, count) = (dst.to_string(), size.to_string(), count.to_string());
        self.testapp_report(
            &self.pod(pod).placement(),
            &["rtt", "--connect", &dst, "--size", &size, "--count", &count],
        )
    }

    pub fn churn(&self, pod: &str, dst: SocketAddr, count: u64) -> Result<ChurnReport> {
        let (dst, count) = (dst.to_string(), count.to_string());
        self.testapp_report(
            &self.pod(pod).placement(),
            &["churn", "--connect", &dst, "--count", &count],
        )
    }

    /// Makes a pod's network namespace disappear: its processes die and the
    /// namespace file is removed, as when a container runtime tears a pod down.
    pub fn destroy_pod_netns(&self, pod: &str) -> Result<()> {
        let p = self.pod(pod);
        let _ = fs::write(p.cgroup.join("cgroup.kill"), "1");
        let name = p
            .netns
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        ip(&["netns", "del", name])
    }
}
