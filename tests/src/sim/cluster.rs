//! A simulated cluster: nodes and pods are network namespaces joined by veths and
//! bridges, each pod also a cgroup; every node runs a real `mesh-node` agent fed by a
//! shared manifest directory. Torn down on drop, and swept if its owner dies.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    host::{self, netns_path, target_bin, wait_for, Placement},
    manifests, network,
    registry::{self, Resources},
    services::{self, RouteSpec, ServiceSpec, SimService, SERVICE_CIDRS},
};

#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    /// Its sandbox runs (a pause process holds its namespace) when the cluster is
    /// created. False: the pod's cgroup and namespace exist, but no process yet, as
    /// while kubelet is still creating the sandbox; the pod's first process starts it.
    pub sandbox: bool,
    /// Its IP is in its status when the cluster is created. False: the manifests show
    /// it without one (as until the kubelet publishes it) until
    /// [`SimCluster::publish_pod_ip`].
    pub ip_published: bool,
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
            sandbox: true,
            ip_published: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: Vec<String>,
    /// Namespace name and whether it carries `nodemesh.io/mesh=enabled`.
    pub namespaces: Vec<(String, bool)>,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    pub routes: Vec<RouteSpec>,
    /// Workload certificate lifetime given to the CA (`24h` when None).
    pub cert_ttl: Option<String>,
    /// Run the CA and give agents mTLS (true unless a test compares without it).
    pub mtls: bool,
    /// More flags for every agent (e.g. tighter limits for a test).
    pub agent_args: Vec<String>,
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
            services: Vec::new(),
            routes: Vec::new(),
            cert_ttl: None,
            mtls: true,
            agent_args: Vec::new(),
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
    /// The node's address on its pod bridge: the source of the node's own connections to
    /// its pods (kubelet probes), as with bridge CNIs, and of traffic masqueraded to them.
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The node's own address (its `status.hostIP`, on the fabric): distinct from the
    /// bridge's, as on a real node.
    pub host_ipv4: Ipv4Addr,
    pub host_ipv6: Ipv6Addr,
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
    /// Namespaces labelled `nodemesh.io/mtls: strict`.
    strict: Mutex<Vec<String>>,
    /// Pods whose IP the manifests do not show yet.
    unpublished: Mutex<Vec<String>>,
    /// The fabric namespace, where node-to-node traffic crosses.
    pub fabric: PathBuf,
    services: Mutex<Vec<SimService>>,
    routes: Mutex<Vec<RouteSpec>>,
    pub(super) agents: Mutex<HashMap<String, Child>>,
    ca: Mutex<Option<Child>>,
    cert_ttl: String,
    mtls: bool,
    agent_args: Vec<String>,
    /// One pause process per pod, as a container runtime keeps: the agent finds a pod's
    /// namespace through it.
    pauses: Vec<Process>,
    resources: Resources,
    mesh_node: PathBuf,
    pub(super) testapp: PathBuf,
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

/// The pod's cgroup as kubelet lays it out: the systemd driver on even-numbered nodes,
/// cgroupfs on odd ones, so both layouts are exercised.
fn kubelet_pod_cgroup(node_index: u8, uid: &str) -> PathBuf {
    if node_index.is_multiple_of(2) {
        let systemd_uid = uid.replace('-', "_");
        PathBuf::from(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice"
        ))
    } else {
        PathBuf::from(format!("kubepods/besteffort/pod{uid}"))
    }
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
            mounts: vec![work_dir.join("certs")],
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
            strict: Mutex::new(Vec::new()),
            unpublished: Mutex::new(
                spec.pods
                    .iter()
                    .filter(|p| !p.ip_published)
                    .map(|p| p.name.clone())
                    .collect(),
            ),
            fabric: netns_path(&fabric),
            services: Mutex::new(
                spec.services
                    .iter()
                    .enumerate()
                    .map(|(i, s)| SimService::new(s.clone(), i))
                    .collect(),
            ),
            routes: Mutex::new(spec.routes.clone()),
            agents: Mutex::new(HashMap::new()),
            ca: Mutex::new(None),
            cert_ttl: spec.cert_ttl.clone().unwrap_or_else(|| "24h".into()),
            mtls: spec.mtls,
            agent_args: spec.agent_args.clone(),
            pauses: Vec::new(),
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
        self.mount_cert_cache()?;
        fs::create_dir_all(&self.cgroup_root).context("creating the cluster cgroup")?;
        network::create_fabric(fabric)?;
        for (i, name) in spec.nodes.iter().enumerate() {
            let index = i as u8;
            let (ipv4, ipv6) = network::create_node(fabric, &node_ns(name), index)?;
            let (host_ipv4, host_ipv6) = network::underlay(index);
            let cgroup = self.cgroup_root.join(name);
            for sub in ["agent", "system"] {
                fs::create_dir_all(cgroup.join(sub))?;
            }
            self.nodes.push(SimNode {
                name: name.clone(),
                index,
                netns: netns_path(&node_ns(name)),
                cgroup,
                ipv4,
                ipv6,
                host_ipv4,
                host_ipv6,
                pin_dir: pin_root.join(name),
            });
        }
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                network::route_to_node(&node_ns(&node.name), other.index)?;
            }
            self.point_view(&node.name, &self.manifests)?;
        }
        let mut hosts_per_node: HashMap<String, u8> = HashMap::new();
        for p in &spec.pods {
            let node = self
                .nodes
                .iter()
                .find(|n| n.name == p.node)
                .ok_or_else(|| anyhow!("pod {} is on unknown node {}", p.name, p.node))?;
            // Host 1 of each pod subnet is the node; pods start at 2.
            let k = hosts_per_node.entry(p.node.clone()).or_insert(1);
            *k += 1;
            let ns = pod_ns(p);
            let (ipv4, ipv6) = network::create_pod(&node_ns(&node.name), &ns, node.index, *k)?;
            let cgroup = node.cgroup.join(kubelet_pod_cgroup(node.index, &ns));
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
        for pod in self.pods.iter().filter(|p| p.spec.sandbox) {
            let pause = pod
                .placement()
                .command(&self.testapp)?
                .arg("pause")
                .spawn()?;
            self.pauses.push(Process(pause));
        }
        self.write_manifest("namespaces.yaml", &self.namespaces_yaml())?;
        self.write_pods()?;
        self.write_services()?;
        self.write_routes()
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
        manifests::namespaces_yaml(
            &self.namespaces.lock().unwrap_or_else(|p| p.into_inner()),
            &self.strict.lock().unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Sets or clears `nodemesh.io/mtls: strict` on a namespace.
    pub fn set_namespace_strict(&self, namespace: &str, strict: bool) -> Result<()> {
        {
            let mut set = self.strict.lock().unwrap_or_else(|p| p.into_inner());
            set.retain(|n| n != namespace);
            if strict {
                set.push(namespace.to_string());
            }
        }
        self.write_manifest("namespaces.yaml", &self.namespaces_yaml())
    }

    fn write_pods(&self) -> Result<()> {
        let unpublished = self.unpublished.lock().unwrap_or_else(|p| p.into_inner());
        self.write_manifest("pods.yaml", &manifests::pods_yaml(&self.pods, &unpublished))
    }

    /// Puts the pod's IP in its status, as the kubelet does once its containers run.
    pub fn publish_pod_ip(&self, pod: &str) -> Result<()> {
        self.unpublished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| p != pod);
        self.write_pods()
    }

    /// Writes a manifest file atomically (the agent never sees half a file).
    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.manifests.join(file))?;
        Ok(())
    }

    /// The manifest directory as node `node`'s agent reads it: a link to the shared
    /// one, or to a copy while the node's view is frozen.
    pub fn manifest_view(&self, node: &str) -> PathBuf {
        self.work_dir.join(format!("manifests-seen-by-{node}"))
    }

    fn point_view(&self, node: &str, target: &Path) -> Result<()> {
        let link = self.manifest_view(node);
        let tmp = self.work_dir.join(format!(".manifests-seen-by-{node}.tmp"));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        fs::rename(&tmp, &link)?;
        Ok(())
    }

    /// Freezes what node `node`'s agent knows of the cluster: until
    /// [`Self::thaw_manifests`] it keeps reading the manifests as they are now,
    /// whatever is written meanwhile (an agent that learns of changes late).
    pub fn freeze_manifests(&self, node: &str) -> Result<()> {
        let copy = self.work_dir.join(format!("manifests-frozen-for-{node}"));
        let _ = fs::remove_dir_all(&copy);
        fs::create_dir_all(&copy)?;
        for e in fs::read_dir(&self.manifests)?.flatten() {
            if e.file_type()?.is_file() {
                fs::copy(e.path(), copy.join(e.file_name()))?;
            }
        }
        self.point_view(node, &copy)
    }

    /// Lets node `node`'s agent see the shared manifests again; it notices at its next
    /// periodic rescan (within 2 s), nothing else being told.
    pub fn thaw_manifests(&self, node: &str) -> Result<()> {
        self.point_view(node, &self.manifests)
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

    fn write_services(&self) -> Result<()> {
        let services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        self.write_manifest(
            "services.yaml",
            &services::services_yaml(&services, &self.pods),
        )
    }

    fn write_routes(&self) -> Result<()> {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        self.write_manifest("routes.yaml", &services::routes_yaml(&routes))
    }

    pub fn service(&self, name: &str) -> SimService {
        self.services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|s| s.spec.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no service {name} in this cluster"))
    }

    /// Marks a backend pod's endpoint ready or not in the Service's EndpointSlices.
    pub fn set_endpoint_ready(&self, service: &str, pod: &str, ready: bool) -> Result<()> {
        {
            let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
            let svc = services
                .iter_mut()
                .find(|s| s.spec.name == service)
                .ok_or_else(|| anyhow!("no service {service}"))?;
            if ready {
                svc.not_ready.remove(pod);
            } else {
                svc.not_ready.insert(pod.to_string());
            }
        }
        self.write_services()
    }

    /// Deletes a Service (and its EndpointSlices) from the cluster.
    pub fn remove_service(&self, service: &str) -> Result<()> {
        self.services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| s.spec.name != service);
        self.write_services()
    }

    pub fn set_routes(&self, routes: Vec<RouteSpec>) -> Result<()> {
        *self.routes.lock().unwrap_or_else(|p| p.into_inner()) = routes;
        self.write_routes()
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

    /// Where the CA listens: node a's fabric address (as a CA Service would be reachable).
    pub fn ca_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(network::underlay(0).0), 15012)
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.work_dir.join("ca")
    }

    /// The node's CA credential file (created on first use).
    pub fn node_token_file(&self, node: &str) -> Result<PathBuf> {
        let path = self.ca_dir().join(format!("token-{node}"));
        if !path.exists() {
            fs::create_dir_all(self.ca_dir())?;
            let token: String = (0..4).map(|_| format!("{:016x}", rand_u64())).collect();
            fs::write(&path, token)?;
        }
        Ok(path)
    }

    /// Starts the CA (`mesh-node ca`) on node a and waits until it serves.
    pub fn start_ca(&self) -> Result<()> {
        let mut tokens = String::new();
        for n in &self.nodes {
            tokens += &format!(
                "{}={}\n",
                n.name,
                fs::read_to_string(self.node_token_file(&n.name)?)?
            );
        }
        fs::write(self.ca_dir().join("tokens"), tokens)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work_dir.join("ca.log"))?;
        let addr = self.ca_addr();
        let mut cmd = self
            .node_placement(&self.nodes[0].name)
            .command(&self.mesh_node)?;
        cmd.args([
            "ca",
            "--listen",
            &addr.to_string(),
            "--server-name",
            &addr.ip().to_string(),
        ])
        .arg("--root-dir")
        .arg(self.ca_dir().join("root"))
        .arg("--manifests")
        .arg(&self.manifests)
        .arg("--node-tokens")
        .arg(self.ca_dir().join("tokens"))
        .args(["--ttl", &self.cert_ttl, "--log-format", "json"])
        .stdout(log.try_clone()?)
        .stderr(log);
        let child = cmd.spawn().context("starting the CA")?;
        *self.ca.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let netns = self.nodes[0].netns.clone();
        let up = wait_for(Duration::from_secs(20), || {
            let root = self.ca_dir().join("root/root.pem");
            let listening = host::in_netns(&netns, move || {
                Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
            })
            .unwrap_or(false);
            (root.exists() && listening).then_some(())
        });
        if up.is_none() {
            bail!(
                "the CA did not start; log:\n{}",
                fs::read_to_string(self.work_dir.join("ca.log")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Stops the CA (SIGKILL), e.g. to show certificates keep serving without it.
    pub fn stop_ca(&self) -> Result<()> {
        if let Some(mut c) = self.ca.lock().unwrap_or_else(|p| p.into_inner()).take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Where the node's agent keeps its workload keys and certificates across
    /// restarts (on a tmpfs the cluster mounts in its work dir).
    pub fn cert_cache_dir(&self, node: &str) -> PathBuf {
        self.work_dir.join("certs").join(node)
    }

    /// A small private tmpfs for the agents' kept keys (they refuse a disk), removed
    /// with the cluster.
    fn mount_cert_cache(&self) -> Result<()> {
        let dir = self.work_dir.join("certs");
        fs::create_dir_all(&dir)?;
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            Some("size=4m,mode=0700"),
        )
        .map_err(|e| anyhow!("mounting a tmpfs at {}: {e}", dir.display()))
    }

    /// Forgets what the node's agent kept across restarts, as a reboot would.
    pub fn clear_cert_cache(&self, node: &str) -> Result<()> {
        let dir = self.cert_cache_dir(node);
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        Ok(())
    }

    /// Where the agents of `node` hand it over to one another (one socket per node).
    pub fn handover_socket(&self, node: &str) -> PathBuf {
        self.work_dir.join(format!("handover-{node}.sock"))
    }

    /// The agent's full command line for `node`.
    pub fn agent_command(&self, node: &SimNode) -> Result<Command> {
        let mut cmd = self.mesh_node_command(node, &["agent", "--node-name", &node.name])?;
        cmd.arg("--manifests")
            .arg(self.manifest_view(&node.name))
            .args([
                "--service-cidr",
                SERVICE_CIDRS[0],
                "--service-cidr",
                SERVICE_CIDRS[1],
            ])
            .arg("--cgroup-root")
            .arg(&node.cgroup)
            .arg("--pin-dir")
            .arg(&node.pin_dir)
            // The node's processes (`node_placement`) live in this namespace.
            .arg("--node-netns")
            .arg(&node.netns)
            .args(["--log-format", "json", "--log-level", "info"])
            .arg("--cert-cache-dir")
            .arg(self.cert_cache_dir(&node.name))
            // Both agents of an upgrade on this node meet here (one per node).
            .arg("--handover-socket")
            .arg(self.handover_socket(&node.name));
        if self.mtls {
            cmd.args(["--ca-addr", &self.ca_addr().to_string()])
                .arg("--ca-root")
                .arg(self.ca_dir().join("root/root.pem"))
                .arg("--ca-token-file")
                .arg(self.node_token_file(&node.name)?);
        }
        cmd.args(&self.agent_args);
        Ok(cmd)
    }

    /// Starts the node's agent (and the CA, if mTLS is on and it is not running) and
    /// waits until the agent reports ready.
    pub fn start_agent(&self, node: &str) -> Result<()> {
        if self.mtls && self.ca.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            self.start_ca()?;
        }
        self.spawn_agent(node)?;
        self.wait_ready(node, Duration::from_secs(20))
    }

    /// Starts the node's agent and returns at once: nothing else is started and
    /// nothing is awaited (e.g. to watch an agent that cannot become ready).
    pub fn spawn_agent(&self, node: &str) -> Result<()> {
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
        Ok(())
    }

    /// Starts every node's agent (and the CA first, when mTLS is on).
    pub fn start_agents(&self) -> Result<()> {
        for n in &self.nodes {
            self.start_agent(&n.name)?;
        }
        Ok(())
    }

    pub fn wait_ready(&self, node: &str, timeout: Duration) -> Result<()> {
        let timeout = host::scaled(timeout);
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

    /// The CA's process, while it runs.
    pub fn ca_pid(&self) -> Option<u32> {
        self.ca
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Child::id)
    }

    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .map(Child::id)
    }

    /// Waits until `check` holds, polling every 20 ms, for at most `timeout` times the
    /// machine's [`host::time_scale`]; returns how long it took (unscaled: compare it
    /// with a [`host::scaled`] bound).
    pub fn eventually(
        &self,
        timeout: Duration,
        mut check: impl FnMut() -> bool,
    ) -> Option<Duration> {
        let start = Instant::now();
        wait_for(timeout, || check().then(|| start.elapsed()))
    }
}

/// Randomness for tokens without a dependency: the kernel's, via /dev/urandom.
fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u64::from_ne_bytes(b)
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The work dir goes with the cluster: show what the agents said before the
            // failure (the test harness prints it with the failing test).
            for n in &self.nodes {
                let log = self.agent_log(&n.name);
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                eprintln!(
                    "--- last lines of the agent log of node {}:\n{tail}",
                    n.name
                );
            }
        }
        let _ = self.stop_ca();
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
