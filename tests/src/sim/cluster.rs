//! A simulated cluster: nodes and pods are network namespaces joined by veths and
//! bridges, each pod also a cgroup; every node runs a real `mesh-node` agent fed by a
//! shared manifest directory. Torn down on drop, and swept if its owner dies.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::{
    host::{self, ip, netns_path, target_bin, wait_for, Placement},
    registry::{self, Resources},
};
use crate::report::{ChurnReport, TransferReport};

#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
}

impl PodSpec {
    pub fn new(name: &str, namespace: &str, node: &str) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            node: node.into(),
            service_account: name.into(),
            labels: vec![("app".into(), name.into())],
            annotations: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: Vec<String>,
    /// Namespace name and whether it carries `nodemesh.io/mesh=enabled`.
    pub namespaces: Vec<(String, bool)>,
    pub pods: Vec<PodSpec>,
}

impl ClusterSpec {
    /// Two nodes; `apps` is enrolled, `plain` is not. Node a: `client` (apps) and
    /// `bystander` (plain). Node b: `server` (apps) and `outsider` (plain).
    pub fn two_nodes() -> ClusterSpec {
        ClusterSpec {
            nodes: vec!["a".into(), "b".into()],
            namespaces: vec![("apps".into(), true), ("plain".into(), false)],
            pods: vec![
                PodSpec::new("client", "apps", "a"),
                PodSpec::new("bystander", "plain", "a"),
                PodSpec::new("server", "apps", "b"),
                PodSpec::new("outsider", "plain", "b"),
            ],
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimNode {
    pub name: String,
    pub index: u8,
    pub netns: PathBuf,
    /// The node's cgroup: the agent attaches its cgroup programs here.
    pub cgroup: PathBuf,
    /// The node's address on its pod bridge: the source of kubelet-style probes.
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub pin_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct SimPod {
    pub spec: PodSpec,
    pub uid: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl SimPod {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    pub fn placement(&self) -> Placement {
        Placement {
            netns: self.netns.clone(),
            cgroup: self.cgroup.clone(),
        }
    }
    pub fn addr4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4), port)
    }
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ipv6), port)
    }
}

/// A process started in the cluster; killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct SimCluster {
    pub id: String,
    pub work_dir: PathBuf,
    pub manifests: PathBuf,
    pub cgroup_root: PathBuf,
    pub nodes: Vec<SimNode>,
    pub pods: Vec<SimPod>,
    namespaces: Mutex<Vec<(String, bool)>>,
    agents: Mutex<HashMap<String, Child>>,
    resources: Resources,
    mesh_node: PathBuf,
    testapp: PathBuf,
}

fn unique_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:06x}{:02x}",
        (std::process::id() ^ (nanos >> 8)) & 0xff_ffff,
        n & 0xff
    )
}

/// Underlay ("fabric") addresses of node i.
fn underlay(i: u8) -> (String, String) {
    (
        format!("192.168.77.{}", 10 + i),
        format!("fd77::{}", 10 + i),
    )
}

impl SimCluster {
    /// Builds the network, the cgroups and the manifests. Agents are not started.
    pub fn create(spec: ClusterSpec) -> Result<SimCluster> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the simulated cluster needs root (network namespaces, cgroups, eBPF): run `cargo xtask test` as root");
        }
        registry::sweep_stale();
        host::ensure_bpffs()?;
        let id = unique_id();
        let work_dir = std::env::temp_dir().join(format!("nodemesh-sim-{id}"));
        let cgroup_root = host::cgroup2_mount()?.join(format!("nodemesh-sim-{id}"));
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/nodemesh-sim-{id}"));
        let fabric = format!("nm{id}-fab");
        let node_ns = |n: &str| format!("nm{id}-{n}");
        let pod_ns = |p: &PodSpec| format!("nm{id}-{}-{}", p.node, p.name);

        let mut netns = vec![fabric.clone()];
        netns.extend(spec.nodes.iter().map(|n| node_ns(n)));
        netns.extend(spec.pods.iter().map(pod_ns));
        let resources = Resources {
            owner_pid: std::process::id(),
            netns,
            cgroup_root: Some(cgroup_root.clone()),
            pin_root: Some(pin_root.clone()),
            work_dir: Some(work_dir.clone()),
        };
        // Recorded before anything exists, so a crash half-way is still swept.
        registry::record(&id, &resources)?;
        let mut cluster = SimCluster {
            id: id.clone(),
            manifests: work_dir.join("manifests"),
            work_dir,
            cgroup_root,
            nodes: Vec::new(),
            pods: Vec::new(),
            namespaces: Mutex::new(spec.namespaces.clone()),
            agents: Mutex::new(HashMap::new()),
            resources,
            mesh_node: target_bin("mesh-node")?,
            testapp: target_bin("mesh-testapp")?,
        };
        // Any error from here on drops `cluster`, which tears down what was built.
        cluster.build(&spec, &fabric, &node_ns, &pod_ns, &pin_root)?;
        Ok(cluster)
    }

    fn build(
        &mut self,
        spec: &ClusterSpec,
        fabric: &str,
        node_ns: &dyn Fn(&str) -> String,
        pod_ns: &dyn Fn(&PodSpec) -> String,
        pin_root: &Path,
    ) -> Result<()> {
        fs::create_dir_all(&self.manifests)?;
        fs::create_dir_all(&self.cgroup_root).context("creating the cluster cgroup")?;
        ip(&["netns", "add", fabric])?;
        ip(&["-n", fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", fabric, "link", "set", "br0", "up"])?;

        for (i, name) in spec.nodes.iter().enumerate() {
            let i = i as u8;
            let ns = node_ns(name);
            let path = netns_path(&ns);
            ip(&["netns", "add", &ns])?;
            let (u4, u6) = underlay(i);
            let port = format!("n{i}");
            ip(&[
                "link", "add", &port, "netns", fabric, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&["-n", fabric, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{u4}/24"), "dev", "eth0"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{u6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "add", "cbr0", "type", "bridge"])?;
            let ipv4 = Ipv4Addr::new(10, 77, i, 1);
            let ipv6: Ipv6Addr = format!("fd00:77:{i}::1").parse()?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ipv4}/24"),
                "dev",
                "cbr0",
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ipv6}/64"),
                "dev",
                "cbr0",
                "nodad",
            ])?;
            ip(&["-n", &ns, "link", "set", "cbr0", "up"])?;
            host::sysctl_in(&path, "/proc/sys/net/ipv4/ip_forward", "1")?;
            host::sysctl_in(&path, "/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
            let cgroup = self.cgroup_root.join(name);
            for sub in ["pods", "agent", "system"] {
                fs::create_dir_all(cgroup.join(sub))?;
            }
            self.nodes.push(SimNode {
                name: name.clone(),
                index: i,
                netns: path,
                cgroup,
                ipv4,
                ipv6,
                pin_dir: pin_root.join(name),
            });
        }
        // Each node routes the other nodes' pod subnets over the fabric.
        for node in &self.nodes {
            let ns = node_ns(&node.name);
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                let (u4, u6) = underlay(other.index);
                let j = other.index;
                ip(&[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &format!("10.77.{j}.0/24"),
                    "via",
                    &u4,
                ])?;
                ip(&[
                    "-n",
                    &ns,
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:77:{j}::/64"),
                    "via",
                    &u6,
                ])?;
            }
        }

        let mut per_node: HashMap<String, u8> = HashMap::new();
        for p in &spec.pods {
            let node = self
                .nodes
                .iter()
                .find(|n| n.name == p.node)
                .ok_or_else(|| anyhow!("pod {} is on unknown node {}", p.name, p.node))?
                .clone();
            let k = per_node.entry(p.node.clone()).or_insert(0);
            *k += 1;
            let host_index = *k + 1;
            let ns = pod_ns(p);
            let node_ns_name = node_ns(&node.name);
            ip(&["netns", "add", &ns])?;
            let veth = format!("p{host_index}");
            ip(&[
                "link",
                "add",
                &veth,
                "netns",
                &node_ns_name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns,
            ])?;
            ip(&[
                "-n",
                &node_ns_name,
                "link",
                "set",
                &veth,
                "master",
                "cbr0",
                "up",
            ])?;
            let ipv4 = Ipv4Addr::new(10, 77, node.index, host_index);
            let ipv6: Ipv6Addr = format!("fd00:77:{}::{host_index:x}", node.index).parse()?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ipv4}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ipv6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &node.ipv4.to_string(),
            ])?;
            ip(&[
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &node.ipv6.to_string(),
            ])?;
            let cgroup = node.cgroup.join("pods").join(&p.name);
            fs::create_dir_all(&cgroup)?;
            self.pods.push(SimPod {
                spec: p.clone(),
                uid: ns.clone(),
                netns: netns_path(&ns),
                cgroup,
                ipv4,
                ipv6,
            });
        }
        self.write_manifests()
    }

    pub fn node(&self, name: &str) -> &SimNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in this cluster"))
    }

    pub fn pod(&self, name: &str) -> &SimPod {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in this cluster"))
    }

    // ---- manifests -------------------------------------------------------------

    fn namespaces_yaml(&self) -> String {
        let namespaces = self.namespaces.lock().unwrap_or_else(|p| p.into_inner());
        namespaces
            .iter()
            .map(|(name, enrolled)| {
                let labels = if *enrolled {
                    "\n  labels:\n    nodemesh.io/mesh: enabled"
                } else {
                    ""
                };
                format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    fn pods_yaml(&self) -> String {
        let map = |items: &[(String, String)]| {
            items
                .iter()
                .map(|(k, v)| format!("\n    {k}: \"{v}\""))
                .collect::<String>()
        };
        self.pods
            .iter()
            .map(|p| {
                let s = &p.spec;
                let annotations = if s.annotations.is_empty() {
                    String::new()
                } else {
                    format!("\n  annotations:{}", map(&s.annotations))
                };
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  labels:{}{annotations}\n\
                     spec:\n  nodeName: {}\n  serviceAccountName: {}\n  containers:\n  - name: app\n    image: mesh-testapp\n\
                     status:\n  phase: Running\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: \"{}\"\n",
                    s.name, s.namespace, p.uid, map(&s.labels), s.node, s.service_account, p.ipv4, p.ipv4, p.ipv6
                )
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    /// Writes a manifest file atomically (the agent never sees half a file).
    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.manifests.join(file))?;
        Ok(())
    }

    fn write_manifests(&self) -> Result<()> {
        self.write_manifest("namespaces.yaml", &self.namespaces_yaml())?;
        self.write_manifest("pods.yaml", &self.pods_yaml())
    }

    /// Labels or unlabels a namespace by editing its manifest, as `kubectl label` would.
    pub fn set_namespace_enrolled(&self, namespace: &str, enrolled: bool) -> Result<()> {
        {
            let mut namespaces = self.namespaces.lock().unwrap_or_else(|p| p.into_inner());
            let entry = namespaces
                .iter_mut()
                .find(|(n, _)| n == namespace)
                .ok_or_else(|| anyhow!("no namespace {namespace}"))?;
            entry.1 = enrolled;
        }
        self.write_manifest("namespaces.yaml", &self.namespaces_yaml())
    }

    // ---- agents ----------------------------------------------------------------

    pub fn agent_log_path(&self, node: &str) -> PathBuf {
        self.work_dir.join(format!("agent-{node}.log"))
    }

    pub fn agent_log(&self, node: &str) -> String {
        fs::read_to_string(self.agent_log_path(node)).unwrap_or_default()
    }

    /// `mesh-node` with `args`, placed in the node's namespace and agent cgroup.
    pub fn mesh_node_command(&self, node: &SimNode, args: &[&str]) -> Result<Command> {
        let placement = Placement {
            netns: node.netns.clone(),
            cgroup: node.cgroup.join("agent"),
        };
        let mut cmd = placement.command(&self.mesh_node)?;
        cmd.args(args);
        Ok(cmd)
    }

    /// The `mesh-node` binary under test.
    pub fn mesh_node_bin(&self) -> &Path {
        &self.mesh_node
    }

    /// The agent's full command line for `node`.
    pub fn agent_command(&self, node: &SimNode) -> Result<Command> {
        let mut cmd = self.mesh_node_command(node, &["agent", "--node-name", &node.name])?;
        cmd.arg("--manifests")
            .arg(&self.manifests)
            .arg("--netns-dir")
            .arg(host::NETNS_DIR)
            .arg("--cgroup-root")
            .arg(&node.cgroup)
            .arg("--pin-dir")
            .arg(&node.pin_dir)
            .args([
                "--node-ip",
                &node.ipv4.to_string(),
                "--node-ip",
                &node.ipv6.to_string(),
            ])
            .args(["--log-format", "json", "--log-level", "info"]);
        Ok(cmd)
    }

    /// Starts the node's agent and waits until it reports ready.
    pub fn start_agent(&self, node: &str) -> Result<()> {
        let node = self.node(node).clone();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log_path(&node.name))?;
        let child = self
            .agent_command(&node)?
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mesh-node")?;
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.name.clone(), child);
        self.wait_ready(&node.name, Duration::from_secs(20))
    }

    pub fn start_agents(&self) -> Result<()> {
        for n in &self.nodes {
            self.start_agent(&n.name)?;
        }
        Ok(())
    }

    pub fn wait_ready(&self, node: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.agent_exit_status(node) {
                bail!(
                    "mesh-node on {node} exited ({status}); log:\n{}",
                    self.agent_log(node)
                );
            }
            if let Ok((200, _)) = self.admin_raw(node, "GET", "/healthz/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mesh-node on {node} not ready after {timeout:?}; log:\n{}",
                    self.agent_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn agent_exit_status(&self, node: &str) -> Option<std::process::ExitStatus> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents
            .get_mut(node)
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILLs the node's agent (no cleanup of its own) and reaps it.
    pub fn kill_agent(&self, node: &str) -> Result<()> {
        let child = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
        if let Some(mut c) = child {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .map(Child::id)
    }

    // ---- admin API ---------------------------------------------------------------

    /// One HTTP/1.1 request to the node agent's admin API (127.0.0.1:15000 in the node).
    pub fn admin_raw(&self, node: &str, method: &str, path: &str) -> Result<(u16, String)> {
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        host::in_netns(&self.node(node).netns, move || {
            let addr: SocketAddr = "127.0.0.1:15000".parse()?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let (head, body) = text
                .split_once("\r\n\r\n")
                .ok_or_else(|| anyhow!("malformed HTTP response"))?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("no status in `{head}`"))?;
            Ok((status, body.to_string()))
        })
    }

    pub fn admin(&self, node: &str, path: &str) -> Result<Value> {
        let (status, body) = self.admin_raw(node, "GET", path)?;
        if status != 200 {
            bail!("admin {path} on {node}: HTTP {status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("admin {path}: not JSON: {body}"))
    }

    /// Closed connections the node's agent recorded.
    pub fn closed_connections(&self, node: &str) -> Result<Vec<Value>> {
        let v = self.admin(node, "/connections")?;
        Ok(v["closed"].as_array().cloned().unwrap_or_default())
    }

    /// The entry count of each eBPF map of the node's agent.
    pub fn map_entries(&self, node: &str) -> Result<HashMap<String, u64>> {
        let v = self.admin(node, "/bpf")?;
        Ok(v["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| Some((m["name"].as_str()?.to_string(), m["entries"].as_u64()?)))
            .collect())
    }

    // ---- workloads -----------------------------------------------------------------

    /// Starts an echo server in `pod` on `port` and waits until it listens. Like most
    /// real servers it binds one dual-stack socket (`[::]`), taking IPv4 and IPv6.
    pub fn serve(&self, pod: &str, port: u16) -> Result<Process> {
        let p = self.pod(pod);
        let mut cmd = p.placement().command(&self.testapp)?;
        cmd.args(["serve", "--listen", &format!("[::]:{port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting the echo server")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("echo server in {pod} did not start: {err}");
        }
        Ok(Process(child))
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
        let args = [
            "transfer".to_string(),
            "--connect".into(),
            dst.to_string(),
            "--bytes".into(),
            bytes.to_string(),
        ];
        Ok(serde_json::from_str(
            self.run_testapp(placement, &args)?.trim(),
        )?)
    }

    /// A process on the node itself, outside every pod (where kubelet runs).
    pub fn node_placement(&self, node: &str) -> Placement {
        let n = self.node(node);
        Placement {
            netns: n.netns.clone(),
            cgroup: n.cgroup.join("system"),
        }
    }

    pub fn churn(&self, pod: &str, dst: SocketAddr, count: u64) -> Result<ChurnReport> {
        let args = [
            "churn".to_string(),
            "--connect".into(),
            dst.to_string(),
            "--count".into(),
            count.to_string(),
        ];
        Ok(serde_json::from_str(
            self.run_testapp(&self.pod(pod).placement(), &args)?.trim(),
        )?)
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

    /// Waits until `check` holds, polling every 20 ms; returns how long it took.
    pub fn eventually(
        &self,
        timeout: Duration,
        mut check: impl FnMut() -> bool,
    ) -> Option<Duration> {
        let start = Instant::now();
        wait_for(timeout, || check().then(|| start.elapsed()))
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        let names: Vec<String> = self
            .agents
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default();
        for n in names {
            let _ = self.kill_agent(&n);
        }
        if let Err(e) = registry::release(&self.id, &self.resources) {
            eprintln!("mesh-sim: tearing down cluster {}: {e:#}", self.id);
        }
    }
}
