//! Keeps the enrolled pods of this node in step with the cluster state: for each one,
//! listeners inside its namespace, an sk_lookup link, and its eBPF map entries; for a
//! pod that leaves (or whose namespace vanishes), all of that removed. Enrolling one pod
//! is `enroll.rs`; what the admin API shows of each, `status.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_common::{InboundPolicy, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use tokio_rustls::TlsAcceptor;

use crate::{
    capture::dataplane::Dataplane, capture::dataplane::DataplaneError, capture::holds::Holds,
    capture::locator::NetnsLocator, capture::netns::Netns, capture::netns::NetnsError,
    capture::netns::NetnsId, capture::sk_lookup::PodLink, capture::sockets::PodSockets,
    discovery::cluster::ip_key, discovery::cluster::ClusterState, discovery::cluster::PodPlan,
    discovery::mtls::MtlsMode, handover::Inherited, handover::ListenerInfo, hbone, identity::authz,
    identity::Identity, keys::PodKey, proxy::inbound, proxy::outbound, proxy::pod::Mesh,
    proxy::pod::PodContext, routing::balancer::Balancer, routing::table::Router,
    telemetry::connections::ConnectionTable, telemetry::metrics::Metrics,
};

mod enroll;
mod status;

use enroll::inbound_policy;
pub use status::WorkloadStatus;

#[derive(Debug, Error)]
pub(crate) enum EnrollError {
    #[error("{0}")]
    Locate(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("the pod's network namespace {0} has no address yet")]
    NoAddress(String),
}

impl EnrollError {
    fn reason(&self) -> &'static str {
        match self {
            EnrollError::Locate(_) | EnrollError::Netns(_) | EnrollError::NoAddress(_) => {
                "netns_unavailable"
            }
            EnrollError::Io { .. } => "listener_failed",
            EnrollError::Dataplane(_) => "dataplane_failed",
        }
    }
}

impl EnrollError {
    /// The pod has no namespace (or no address in it) yet: normal while it starts.
    fn not_started(&self) -> bool {
        matches!(
            self,
            EnrollError::Locate(_) | EnrollError::Netns(_) | EnrollError::NoAddress(_)
        )
    }
}

const VANISHED: &str = "network namespace vanished";

/// How long a pod that left the mesh keeps its listeners once nothing is redirected or
/// captured to them any more: connections the kernel steered to them just before (still
/// in an accept queue, their original destinations still parked) and tunnels that peers
/// with a slightly older view of the cluster open to its HBONE port are served instead
/// of reset. A pod enrolled again meanwhile takes its listeners back.
const DRAIN: Duration = Duration::from_secs(10);

/// Settings every pod's listeners share.
pub(crate) struct ProxySettings {
    pub node: String,
    pub socket_mark: u32,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// The node's routing table (service address ranges and the trust domain in it).
    pub router: Arc<Router>,
    pub balancer: Arc<Balancer>,
    /// Every destination's connection pool on this node (circuit breaking).
    pub pools: Arc<crate::routing::pool::ConnectionPools>,
    /// Mutual TLS (absent when no CA is configured).
    pub mesh: Option<Arc<Mesh>>,
    pub trust_domain: String,
    pub http_routes: Arc<crate::routing::http::routes::RouteCache>,
    /// Bounds of each pod's proxying.
    pub limits: crate::limits::PodLimits,
    /// Request authentication (JWT) for the node's workloads.
    pub jwt: Arc<crate::identity::jwt::JwtAuthenticator>,
    /// The node's tracing (spans and where they go).
    pub tracer: Arc<crate::telemetry::spans::Tracer>,
    /// Connections the agent opens as a local pod (JWKS fetches): it knows every pod.
    pub dialer: Arc<crate::proxy::dial::MeshDialer>,
    /// The agent's drain (SIGTERM).
    pub drain: crate::limits::drain::Drain,
}

struct RunningPod {
    plan: PodPlan,
    netns_path: PathBuf,
    netns_id: NetnsId,
    cookie: u64,
    /// Every listener's address, and a descriptor of it for a hand-over.
    listeners: Vec<(SocketAddr, OwnedFd)>,
    /// The plaintext inbound listeners (IPv4, IPv6), to capture to them again when a
    /// draining pod is enrolled again.
    inbound: [Option<OwnedFd>; 2],
    tasks: Vec<JoinHandle<()>>,
    /// Pinned: the pod's capture outlives the agent (`capture::sk_lookup`).
    sk_lookup: PodLink,
    /// What sk_lookup applies to the pod's addresses, as last written.
    inbound_policy: InboundPolicy,
}

/// A pod that left the mesh, its listeners still serving until `until`.
struct Draining {
    pod: RunningPod,
    until: Instant,
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        // Closes the listeners; connections already accepted run on in their own tasks.
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(crate) struct Workloads {
    settings: ProxySettings,
    home: Arc<Netns>,
    dataplane: Arc<Dataplane>,
    locator: Box<dyn NetnsLocator>,
    connections: Arc<ConnectionTable>,
    metrics: Arc<Metrics>,
    state: watch::Receiver<Arc<ClusterState>>,
    running: BTreeMap<PodKey, RunningPod>,
    draining: BTreeMap<PodKey, Draining>,
    failures: BTreeMap<PodKey, String>,
    holds: Holds,
    /// Pods without an IP in their status that are not enrolled yet (starting).
    starting: usize,
    /// Pods came or went since the maps were last pruned (true at start, for the
    /// leftovers of a previous run).
    prune_due: bool,
    /// Listeners a predecessor handed over, until the first reconcile claims them.
    inherited: std::sync::Mutex<Inherited>,
}

impl Workloads {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        settings: ProxySettings,
        home: Arc<Netns>,
        dataplane: Arc<Dataplane>,
        locator: Box<dyn NetnsLocator>,
        connections: Arc<ConnectionTable>,
        metrics: Arc<Metrics>,
        state: watch::Receiver<Arc<ClusterState>>,
    ) -> Workloads {
        Workloads {
            settings,
            home,
            dataplane,
            locator,
            connections,
            metrics,
            state,
            running: BTreeMap::new(),
            draining: BTreeMap::new(),
            failures: BTreeMap::new(),
            holds: Holds::default(),
            starting: 0,
            prune_due: true,
            inherited: Default::default(),
        }
    }

    /// Enrolls new pods, removes departed or changed ones, and retries failed ones.
    pub(crate) fn reconcile(&mut self, state: &ClusterState) {
        let desired: BTreeMap<PodKey, PodPlan> = state
            .enrolled_on_node(&self.settings.node)
            .into_iter()
            .map(|p| (p.key.clone(), p))
            .collect();
        let leaving: Vec<PodKey> = self
            .running
            .iter()
            .filter(|(k, r)| !desired.get(*k).is_some_and(|d| r.plan.same_enrollment(d)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in leaving {
            if let Some(plan) = desired.get(&key) {
                // Enrolled again below with its new plan: held meanwhile, so that not
                // one of its connects leaves unredirected.
                self.holds.hold(&self.dataplane, &*self.locator, plan);
            }
            self.remove(&key, "no longer enrolled on this node");
        }
        self.end_drains(Instant::now());
        self.failures.retain(|k, _| desired.contains_key(k));
        if let Some(mesh) = &self.settings.mesh {
            // Prefetch certificates as pods land; forget identities whose last pod left.
            let identities = desired.values().map(|p| self.identity(p)).collect();
            mesh.certificates.set_identities(&identities);
        }
        self.starting = 0;
        for (key, plan) in &desired {
            if self.running.contains_key(key) {
                continue;
            }
            let key = key.clone();
            if let Some(draining) = self.draining.remove(&key) {
                if self.revive(plan, &draining.pod) {
                    info!(pod = %key, "pod enrolled again; its draining listeners serve on");
                    self.failures.remove(&key);
                    self.running.insert(key, draining.pod);
                    self.prune_due = true;
                    continue;
                }
                self.finish_drain(&key, draining.pod);
            }
            if !self.failures.contains_key(&key) {
                for w in &plan.warnings {
                    warn!(pod = %key, warning = %w, "pod annotation ignored");
                }
            }
            match self.enroll(plan.clone(), inbound_policy(state, plan)) {
                Ok(running) => {
                    info!(
                        pod = %key,
                        netns = %running.netns_path.display(),
                        netns_cookie = running.cookie,
                        ips = ?running.plan.ips,
                        "pod enrolled"
                    );
                    self.holds.release(&self.dataplane, &key);
                    self.failures.remove(&key);
                    self.running.insert(key, running);
                    self.prune_due = true;
                }
                Err(e) if plan.ips.is_empty() && e.not_started() => {
                    // Normal while a pod starts: no namespace (or address) yet.
                    self.starting += 1;
                    let held = self.holds.hold(&self.dataplane, &*self.locator, plan);
                    let text = if held {
                        format!("starting: connections held until enrolled ({e})")
                    } else {
                        format!("starting: no cgroup yet ({e})")
                    };
                    self.failures.insert(key, text);
                }
                Err(e) => {
                    self.holds.hold(&self.dataplane, &*self.locator, plan);
                    let vanished = self
                        .failures
                        .get(&key)
                        .is_some_and(|f| f.starts_with(VANISHED));
                    if vanished && matches!(e, EnrollError::Netns(_) | EnrollError::Locate(_)) {
                        // Still gone: keep saying why it left rather than the retry error.
                        continue;
                    }
                    // Reported once per distinct error; retried on every reconcile.
                    let text = e.to_string();
                    if self.failures.get(&key) != Some(&text) {
                        self.metrics
                            .enroll_failures
                            .with_label_values(&[e.reason()])
                            .inc();
                        warn!(pod = %key, error = %text, "cannot enroll pod; will retry");
                    }
                    self.failures.insert(key, text);
                }
            }
        }
        self.sync_inbound_policies(state);
        let running = &self.running;
        self.holds.prune(&self.dataplane, |k| {
            desired.contains_key(k) && !running.contains_key(k)
        });
        if std::mem::take(&mut self.prune_due) {
            self.prune_maps();
        }
        let unclaimed = crate::capture::dataplane::lock(&self.inherited).clear();
        if unclaimed > 0 {
            info!(
                listeners = unclaimed,
                "closed handed-over listeners no enrolled pod claimed (pods that left)"
            );
        }
    }

    /// Listeners a predecessor handed over: pods enrolled by the next reconcile take
    /// theirs instead of opening new ones; what no pod claims then is closed.
    pub(crate) fn inherit(&mut self, inherited: Inherited) {
        *crate::capture::dataplane::lock(&self.inherited) = inherited;
    }

    /// Every in-pod listener of the running pods, for a successor.
    pub(crate) fn listeners_to_hand_over(&self) -> Vec<(ListenerInfo, BorrowedFd<'_>)> {
        self.running
            .values()
            .flat_map(|pod| {
                pod.listeners.iter().map(|(addr, fd)| {
                    let info = ListenerInfo {
                        netns_cookie: pod.cookie,
                        addr: *addr,
                    };
                    (info, fd.as_fd())
                })
            })
            .collect()
    }

    /// Whether pods are starting (no IP in their status, not enrolled yet): the agent
    /// then looks for them more often than every recheck.
    /// The drain's first step: every in-pod listener closes (the accept loops end and
    /// the kept plaintext inbound descriptors are dropped), so new connections are
    /// refused at once instead of waiting in a backlog nobody serves; the connections
    /// already accepted run on in their own tasks. Maps, pins and links stay as they are
    /// for the next agent. Returns how many listeners closed.
    pub(crate) fn stop_accepting(&mut self) -> usize {
        let mut closed = 0;
        for pod in self
            .running
            .values_mut()
            .chain(self.draining.values_mut().map(|d| &mut d.pod))
        {
            for t in &pod.tasks {
                t.abort();
            }
            closed += pod.listeners.len();
            pod.listeners.clear();
            pod.inbound = [None, None];
        }
        closed
    }

    pub(crate) fn starting(&self) -> bool {
        self.starting > 0
    }

    fn identity(&self, plan: &PodPlan) -> Identity {
        Identity::new(
            &self.settings.trust_domain,
            &plan.key.namespace,
            &plan.service_account,
        )
    }

    /// Drops pods whose network namespace is gone (or was replaced by a new one).
    /// The path found at enrollment is checked first; only when it no longer opens
    /// the same namespace (e.g. that process exited) is the pod located again.
    pub(crate) fn check_netns(&mut self) {
        let mut vanished = Vec::new();
        for (key, r) in self.running.iter_mut() {
            if Netns::open(&r.netns_path).is_ok_and(|ns| ns.id() == r.netns_id) {
                continue;
            }
            let relocated = self
                .locator
                .locate(&r.plan)
                .map_err(|e| e.to_string())
                .and_then(|path| {
                    Netns::open(&path)
                        .map(|ns| (path, ns))
                        .map_err(|e| e.to_string())
                });
            match relocated {
                Ok((path, ns)) if ns.id() == r.netns_id => r.netns_path = path,
                Ok((_, ns)) => vanished.push((
                    key.clone(),
                    format!("namespace replaced ({} -> {})", r.netns_id, ns.id()),
                )),
                Err(e) => vanished.push((key.clone(), e)),
            }
        }
        for (key, why) in vanished {
            if let Some(r) = self.running.get(&key) {
                // Still scheduled here: held until it is enrolled in its new namespace.
                self.holds.hold(&self.dataplane, &*self.locator, &r.plan);
            }
            self.metrics.netns_vanished.inc();
            warn!(pod = %key, reason = %why, "pod network namespace vanished; removing its listeners and map entries");
            self.remove(&key, VANISHED);
            // Nothing can arrive through a namespace that is gone: no drain.
            if let Some(d) = self.draining.remove(&key) {
                self.finish_drain(&key, d.pod);
            }
            self.failures.insert(key, format!("{VANISHED}: {why}"));
        }
    }

    /// Stops redirecting and capturing the pod's connections at once; its listeners
    /// drain (see [`DRAIN`]) before they close.
    fn remove(&mut self, key: &PodKey, why: &str) {
        let Some(pod) = self.running.remove(key) else {
            return;
        };
        self.prune_due = true;
        if let Err(e) = self.dataplane.stop_redirecting(pod.cookie) {
            warn!(pod = %key, error = %e, "cannot remove enrollment entry");
        }
        for ip in &pod.plan.ips {
            if let Err(e) = self.dataplane.release_inbound(ip_key(*ip)) {
                warn!(pod = %key, error = %e, "cannot remove inbound entry");
            }
        }
        // The link detaches when the drain ends (or with this agent, whichever first).
        if let Err(e) = pod.sk_lookup.unpin() {
            warn!(pod = %key, error = %e, "cannot remove the pod's sk_lookup pin");
        }
        info!(pod = %key, reason = why, drain_ms = DRAIN.as_millis() as u64, "pod removed from the mesh; its listeners drain");
        let until = Instant::now() + DRAIN;
        if let Some(old) = self.draining.insert(key.clone(), Draining { pod, until }) {
            self.finish_drain(key, old.pod);
        }
    }

    /// Closes the listeners of pods whose drain is over.
    fn end_drains(&mut self, now: Instant) {
        let over: Vec<PodKey> = self
            .draining
            .iter()
            .filter(|(_, d)| d.until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in over {
            if let Some(d) = self.draining.remove(&key) {
                self.finish_drain(&key, d.pod);
            }
        }
    }

    /// Closes a drained pod's listeners (connections already accepted run on) and
    /// forgets destinations still parked for it.
    fn finish_drain(&mut self, key: &PodKey, pod: RunningPod) {
        let cookie = pod.cookie;
        drop(pod);
        if !self.running.values().any(|r| r.cookie == cookie) {
            if let Err(e) = self.dataplane.unenroll(cookie) {
                warn!(pod = %key, error = %e, "cannot remove parked destinations");
            }
        }
        self.prune_due = true;
        info!(pod = %key, "drained pod's listeners closed");
    }

    /// Takes a draining pod back into the mesh when nothing about it changed (same
    /// plan, same namespace): its listeners never closed, so only redirection and
    /// capture come back. False: it is to be closed and enrolled anew.
    fn revive(&self, plan: &PodPlan, pod: &RunningPod) -> bool {
        let same_netns = Netns::open(&pod.netns_path).is_ok_and(|ns| ns.id() == pod.netns_id);
        if pod.plan != *plan || !same_netns {
            return false;
        }
        let inbound =
            [pod.inbound[0].as_ref(), pod.inbound[1].as_ref()].map(|f| f.map(|f| f.as_fd()));
        match self
            .capture(plan, &pod.inbound_policy, pod.cookie, inbound)
            .and_then(|()| {
                pod.sk_lookup
                    .repin()
                    .map_err(|source| DataplaneError::AttachNetns {
                        netns: plan.key.to_string(),
                        source,
                    })
            }) {
            Ok(()) => true,
            Err(e) => {
                warn!(pod = %plan.key, error = %e, "cannot take a draining pod back; enrolling it anew");
                false
            }
        }
    }

    /// Captures the pod's inbound addresses into its plaintext listeners (IPv4, IPv6)
    /// and, last, starts redirecting its outbound connections. Undone on failure.
    fn capture(
        &self,
        plan: &PodPlan,
        policy: &InboundPolicy,
        cookie: u64,
        inbound: [Option<BorrowedFd<'_>>; 2],
    ) -> Result<(), DataplaneError> {
        let attempt = || -> Result<(), DataplaneError> {
            for ip in &plan.ips {
                let listener = if ip.is_ipv4() {
                    &inbound[0]
                } else {
                    &inbound[1]
                };
                if let Some(l) = listener {
                    self.dataplane.capture_inbound(ip_key(*ip), policy, l)?;
                }
            }
            // Last: outbound redirection starts only once everything is listening.
            self.dataplane.enroll(cookie, &plan.outbound)
        };
        let result = attempt();
        if result.is_err() {
            for ip in &plan.ips {
                let _ = self.dataplane.release_inbound(ip_key(*ip));
            }
        }
        result
    }

    /// Keeps each running pod's fail mode (what its inbound does while no agent runs)
    /// in step with the policies, which change live.
    fn sync_inbound_policies(&mut self, state: &ClusterState) {
        for (key, r) in self.running.iter_mut() {
            let wanted = inbound_policy(state, &r.plan);
            if wanted == r.inbound_policy {
                continue;
            }
            let captured = r.plan.ips.iter().map(|ip| ip_key(*ip));
            let result = captured
                .filter(|ip| self.dataplane.inbound_policy(*ip).is_some())
                .try_for_each(|ip| self.dataplane.update_inbound_policy(ip, &wanted));
            match result {
                Ok(()) => r.inbound_policy = wanted,
                // Retried on the next reconcile.
                Err(e) => warn!(pod = %key, error = %e, "cannot update the pod's inbound policy"),
            }
        }
    }

    /// Removes map entries and sk_lookup pins no running pod owns: leftovers of a
    /// previous agent run (pods that left meanwhile), or of a removal that failed
    /// half-way.
    fn prune_maps(&self) {
        let cookies: BTreeSet<u64> = self.running.values().map(|r| r.cookie).collect();
        let keep: Vec<u64> = cookies.iter().copied().collect();
        self.dataplane.remove_sk_lookup_pins_except(&keep);
        for cookie in self.dataplane.enrolled_cookies() {
            if !cookies.contains(&cookie) {
                info!(netns_cookie = cookie, "removing stale enrollment entry");
                if let Err(e) = self.dataplane.unenroll(cookie) {
                    warn!(netns_cookie = cookie, error = %e, "cannot remove stale enrollment entry");
                }
            }
        }
        let ips: BTreeSet<_> = self
            .running
            .values()
            .flat_map(|r| r.plan.ips.iter().map(|ip| ip_key(*ip)))
            .map(|k| k.to_bytes())
            .collect();
        for ip in self.dataplane.inbound_pod_ips() {
            if !ips.contains(&ip.to_bytes()) {
                if let Err(e) = self.dataplane.release_inbound(ip) {
                    warn!(error = %e, "cannot remove stale inbound entry");
                }
            }
        }
    }
}
