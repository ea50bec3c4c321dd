//! Wires the agent together: preflight, dataplane, discovery, the reconcile loop and
//! the HTTP surfaces.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use mesh_common::NodeConfig;
use thiserror::Error;
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};
use tracing::{info, warn};

use crate::{
    admin::server, admin::state::AdminState, admin::state::LogLevel, capture::cgroup,
    capture::cgroup::MountError, capture::dataplane::Dataplane, capture::dataplane::DataplaneError,
    capture::locator::KubepodsLocator, capture::locator::NetnsDirectory,
    capture::locator::NetnsLocator, capture::netns::Netns, capture::netns::NetnsError,
    capture::netns::NetnsId, capture::pin_lock, capture::pin_lock::PinLock,
    capture::pin_lock::PinLockError, capture::preflight, capture::preflight::PreflightError,
    capture::sockets::PodSockets, config::AgentConfig, config::NetnsLocatorKind, config::Source,
    discovery::apiserver, discovery::apiserver::DiscoveryHealth, discovery::cluster::ClusterState,
    discovery::files, hbone::client::HboneClient, identity::ca::client::CaClient,
    identity::ca::client::Credential, identity::cert_cache::CertCache,
    identity::certificates::CertificateStore, identity::spiffe::TrustBundle, limits,
    limits::drain::Drain, limits::Gate, limits::Listener, proxy::pod::Mesh,
    routing::balancer::Balancer, routing::table::Router, telemetry::connections::ConnectionTable,
    telemetry::metrics::Metrics, workloads::ProxySettings, workloads::Workloads,
};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    PinLock(#[from] PinLockError),
    #[error("waiting for the previous agent to release the pins failed: {0}")]
    PinLockWait(tokio::task::JoinError),
    #[error("cannot read the cookie of the node's network namespace {path}: {source}; run the agent with hostPID (the default --node-netns is the host's, /proc/1/ns/net) or pass the node's namespace as --node-netns")]
    NodeNetns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for the {what}: {source}; is another mesh-node running in this network namespace?")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot find the mesh-node executable to locate mesh-ebpf.o next to it: {0}; pass --ebpf-object")]
    NoObject(std::io::Error),
    #[error("cannot install a signal handler: {0}")]
    Signal(std::io::Error),
    #[error("mutual TLS setup: {0}")]
    Mesh(String),
    #[error("cannot reach the Kubernetes API (in-cluster credentials or KUBECONFIG): {0}; run inside the cluster with the DaemonSet's service account, or use --source files")]
    Kube(kube::Error),
}

/// How often pods are re-checked (retries, vanished namespaces).
const RECHECK: Duration = Duration::from_millis(500);
/// How often pods that are starting (no IP in their status yet) are looked for: the
/// sooner one is enrolled, the shorter its connections are held.
const STARTING_RECHECK: Duration = Duration::from_millis(50);
/// How often unclaimed eBPF map entries are swept, and how old they must be.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
const SWEEP_AGE: Duration = Duration::from_secs(60);
/// A node connection's entry older than this outlived any TCP handshake (SYN retries
/// give up after about two minutes by default).
const NODE_FLOW_AGE: Duration = Duration::from_secs(300);

fn default_object() -> Result<PathBuf, AgentError> {
    let exe = std::env::current_exe().map_err(AgentError::NoObject)?;
    Ok(exe.with_file_name("mesh-ebpf.o"))
}

/// The eBPF side's node settings, and the identity of the node's network namespace.
fn node_config(
    config: &AgentConfig,
    home: &Arc<Netns>,
) -> Result<(NodeConfig, NetnsId), AgentError> {
    let node_netns_err = |source| AgentError::NodeNetns {
        path: config.node_netns.clone(),
        source,
    };
    let node_netns =
        Netns::open(&config.node_netns).map_err(|e| node_netns_err(std::io::Error::other(e)))?;
    let node_netns_id = node_netns.id();
    let node_netns_cookie = PodSockets::new(Arc::new(node_netns), home.clone(), 0)
        .netns_cookie()
        .map_err(node_netns_err)?;
    info!(node_netns = %config.node_netns.display(), node_netns_cookie, "the node's own connections to pods (kubelet probes) are recognised by this namespace");
    let node = NodeConfig {
        socket_mark: config.socket_mark,
        agent_cgroup_id: cgroup::own_cgroup_id()?,
        node_netns_cookie,
        ..NodeConfig::default()
    };
    Ok((node, node_netns_id))
}

/// How long a port the previous agent held may stay taken after it released the pins
/// (its sockets close as it exits, after its lock may have been released).
const BIND_RETRY: Duration = Duration::from_secs(3);

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    let deadline = tokio::time::Instant::now() + BIND_RETRY;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(source) => return Err(AgentError::Bind { what, addr, source }),
        }
    }
}

/// The pin directory's lock: at once, or once the agent holding it has exited.
async fn lock_pins(pin_dir: &std::path::Path) -> Result<PinLock, AgentError> {
    if let Some(lock) = PinLock::try_acquire(pin_dir)? {
        return Ok(lock);
    }
    let holder = pin_lock::holder(pin_dir);
    warn!(pin_dir = %pin_dir.display(), holder_pid = ?holder, "another agent manages this node's pins; waiting for it to exit");
    let dir = pin_dir.to_path_buf();
    let started = std::time::Instant::now();
    let lock = tokio::task::spawn_blocking(move || PinLock::acquire(&dir))
        .await
        .map_err(AgentError::PinLockWait)??;
    info!(
        waited_ms = started.elapsed().as_millis() as u64,
        "the previous agent exited; this one manages the pins now"
    );
    Ok(lock)
}

/// Proxied connections open now (counted, not listed: polled while draining).
fn live(connections: &ConnectionTable) -> usize {
    let (outbound, inbound) = connections.live_counts();
    outbound + inbound
}

/// Drains: the listeners close, HTTP connections are told to close, and the agent
/// waits until no proxied connection is left, `timeout` passes, or a second signal
/// comes. Returns (open at the start, cut at the end).
async fn drain(
    workloads: &mut Workloads,
    drain: &Drain,
    connections: &ConnectionTable,
    metrics: &Metrics,
    timeout: Duration,
    mut again: impl std::future::Future<Output = ()> + Unpin,
) -> (usize, usize) {
    drain.start();
    metrics.draining.set(1);
    let closed = workloads.stop_accepting();
    let open = live(connections);
    info!(
        listeners = closed,
        connections = open,
        timeout_s = timeout.as_secs_f64(),
        "draining: listeners closed, waiting for open connections to end"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let left = loop {
        let left = live(connections);
        if left == 0 {
            break 0;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(deadline) => break live(connections),
            _ = &mut again => {
                info!("second signal: ending the drain now");
                break live(connections);
            }
        }
    };
    let cut = left.min(open);
    metrics
        .drained_connections
        .with_label_values(&["completed"])
        .inc_by((open - cut) as u64);
    metrics
        .drained_connections
        .with_label_values(&["cut"])
        .inc_by(cut as u64);
    if cut > 0 {
        warn!(
            cut,
            completed = open - cut,
            "drain timeout: cutting the connections still open"
        );
    } else {
        info!(completed = open, "drained: every connection ended");
    }
    (open, cut)
}

/// The CA client, certificate store and HBONE client, when a CA is configured.
fn mesh(config: &AgentConfig, metrics: &Arc<Metrics>) -> Result<Option<Arc<Mesh>>, AgentError> {
    let Some(addr) = config.ca_addr else {
        warn!("no --ca-addr: traffic between meshed pods is proxied but NOT encrypted");
        return Ok(None);
    };
    let read = |what: &str, path: &Option<PathBuf>| -> Result<(PathBuf, String), AgentError> {
        let path = path
            .as_ref()
            .ok_or_else(|| AgentError::Mesh(format!("--ca-addr needs --{what}")))?;
        std::fs::read_to_string(path)
            .map(|text| (path.clone(), text))
            .map_err(|e| AgentError::Mesh(format!("--{what} {}: {e}", path.display())))
    };
    let (_, root) = read("ca-root", &config.ca_root)?;
    // Read now to fail early; the client rereads it for every request, as the kubelet
    // renews projected tokens before they expire.
    let (token_file, _) = read("ca-token-file", &config.ca_token_file)?;
    let credential = Credential::TokenFile(token_file);
    let client = CaClient::new(addr, config.ca_server_name.as_deref(), &root, credential)
        .map_err(|e| AgentError::Mesh(e.to_string()))?;
    let trust = TrustBundle::from_pem(&root).map_err(AgentError::Mesh)?;
    let certificates = CertificateStore::new(
        Arc::new(client),
        metrics.clone(),
        trust.clone(),
        cert_cache(&config.cert_cache_dir),
    );
    Ok(Some(Arc::new(Mesh {
        hbone: HboneClient::new(
            certificates.clone(),
            trust.clone(),
            metrics.clone(),
            config.connect_timeout,
        ),
        certificates,
        trust,
        trust_domain: config.trust_domain.clone(),
    })))
}

/// The directory keeping keys and certificates across restarts, when usable.
fn cert_cache(dir: &std::path::Path) -> Option<CertCache> {
    if dir.as_os_str().is_empty() {
        info!("--cert-cache-dir is empty: workload keys live in memory only; a restart while the CA is down leaves pods without certificates");
        return None;
    }
    match CertCache::open(dir) {
        Ok(cache) => {
            info!(dir = %dir.display(), "workload keys and certificates are kept here across restarts");
            Some(cache)
        }
        Err(e) => {
            warn!(error = %e, "workload keys live in memory only; a restart while the CA is down leaves pods without certificates");
            None
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT. Pinned maps and links stay in place on
/// exit, so redirection state survives a restart.
pub async fn run(config: AgentConfig, log_level: LogLevel) -> Result<(), AgentError> {
    preflight::check_privileges(config.netns_locator == NetnsLocatorKind::Kubepods)?;
    if let Err(e) = limits::raise_fd_limit() {
        warn!(error = %e, "cannot raise the descriptor limit (RLIMIT_NOFILE); keeping the inherited one");
    }
    cgroup::ensure_on_bpffs(&config.pin_dir)?;
    // Before anything touches the pins; held until the very end of this function.
    let pin_lock = lock_pins(&config.pin_dir).await?;
    let cgroup_root = cgroup::resolve_cgroup_root(&config.cgroup_root)?;
    let home = Arc::new(Netns::current_thread()?);
    let object = match &config.ebpf_object {
        Some(p) => p.clone(),
        None => default_object()?,
    };
    let (node, node_netns) = node_config(&config, &home)?;
    let dataplane = Arc::new(Dataplane::load(
        &object,
        &config.pin_dir,
        &cgroup_root,
        node,
    )?);

    let admin_listener = bind("admin API", config.admin_addr).await?;
    let metrics_listener = bind("metrics", config.metrics_addr).await?;
    let ready_listener = bind("readiness probe", config.readiness_addr).await?;
    let mut terminate =
        tokio::signal::unix::signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut interrupt =
        tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;

    let metrics = Arc::new(Metrics::new());
    limits::init_metrics(&metrics);
    let mesh = mesh(&config, &metrics)?;
    let connections = ConnectionTable::new(metrics.clone());
    let connections_view = connections.clone();
    let ready = Arc::new(AtomicBool::new(false));
    let discovery = Arc::new(DiscoveryHealth::default());
    let (state_tx, mut state_rx) = watch::channel(Arc::new(ClusterState::default()));
    let (status_tx, status_rx) = watch::channel(Arc::new(Vec::new()));

    match (config.source, &config.manifests) {
        (Source::Files, Some(dir)) => {
            discovery.all_synced();
            tokio::spawn(files::watch_directory(
                dir.clone(),
                config.root_namespace.clone(),
                state_tx,
                metrics.clone(),
            ));
        }
        (Source::Files, None) => unreachable!("clap requires --manifests with --source files"),
        (Source::Kube, _) => {
            let client = kube::Client::try_default()
                .await
                .map_err(AgentError::Kube)?;
            tokio::spawn(apiserver::run(
                client,
                state_tx,
                metrics.clone(),
                discovery.clone(),
                config.root_namespace.clone(),
            ));
        }
    }

    let balancer = Arc::new(Balancer::new().with_outlier_metrics(metrics.outliers.clone()));
    let pools = Arc::new(crate::routing::pool::ConnectionPools::new(Some(
        metrics.pools.clone(),
    )));
    // Request authentication: the keys of every jwksUri this node's pods need.
    let jwt = crate::identity::jwt::JwtAuthenticator::counted(metrics.clone(), config.jwks_refresh);
    let admin_state = Arc::new(AdminState {
        config: config.clone(),
        dataplane: dataplane.clone(),
        connections: connections.clone(),
        metrics: metrics.clone(),
        workloads: status_rx,
        ready: ready.clone(),
        discovery: discovery.clone(),
        state: state_rx.clone(),
        certificates: mesh.as_ref().map(|m| m.certificates.clone()),
        log_level,
        balancer: balancer.clone(),
        pools: pools.clone(),
        jwt: jwt.clone(),
        started: std::time::Instant::now(),
    });
    let scraped = admin_state.clone();
    let gate = |which| Gate::new(which, config.http_limits(), metrics.clone());
    tokio::spawn(server::serve(
        admin_listener,
        gate(Listener::Admin),
        move |m, p, q| server::admin_route(&admin_state, m, p, q),
    ));
    tokio::spawn(server::serve(
        metrics_listener,
        gate(Listener::Metrics),
        move |m, p, _| {
            server::metrics_route(m, p, || {
                crate::admin::health::refresh(&scraped);
                server::metrics_response(&scraped.metrics)
            })
        },
    ));
    let (r, d, dp, stopping) = (
        ready.clone(),
        discovery.clone(),
        dataplane.clone(),
        metrics.clone(),
    );
    let certs = mesh.as_ref().map(|m| m.certificates.clone());
    tokio::spawn(server::serve(
        ready_listener,
        gate(Listener::Readiness),
        move |m, p, _| {
            server::readiness_route(m, p, || {
                server::readiness(stopping.draining.get() == 1, &r, &d, &dp, certs.as_deref())
            })
        },
    ));

    // The jwksUri keys are fetched through the mesh, as the pods would.
    let dialer = crate::proxy::dial::MeshDialer::new();
    crate::identity::jwt::fetcher::spawn(
        &jwt,
        state_rx.clone(),
        config.node_name.clone(),
        dialer.clone(),
    );
    let drain_signal = Drain::default();
    let mut workloads = Workloads::new(
        ProxySettings {
            node: config.node_name.clone(),
            socket_mark: config.socket_mark,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            router: Arc::new(Router::new(
                Arc::new(config.service_cidrs.clone()),
                mesh.as_ref().map(|m| m.trust_domain.clone()),
            )),
            balancer,
            pools,
            mesh: mesh.clone(),
            trust_domain: config.trust_domain.clone(),
            http_routes: Arc::new(crate::routing::http::routes::RouteCache::counted(
                metrics.route_config_problems.clone(),
            )),
            limits: config.pod_limits(),
            jwt: jwt.clone(),
            dialer: dialer.clone(),
            drain: drain_signal.clone(),
        },
        home.clone(),
        dataplane.clone(),
        match config.netns_locator {
            NetnsLocatorKind::Kubepods => Box::new(KubepodsLocator {
                cgroup_root: Some(cgroup_root.clone()),
                not_pods: vec![home.id(), node_netns],
                ..KubepodsLocator::default()
            }) as Box<dyn NetnsLocator>,
            NetnsLocatorKind::NetnsDir => Box::new(NetnsDirectory {
                dir: config.netns_dir.clone(),
            }),
        },
        connections,
        metrics.clone(),
        state_rx.clone(),
    );

    // Wait for the first full scan: reconciling an empty state would unenroll every
    // pod a previous run left enrolled.
    if state_rx.changed().await.is_err() {
        warn!("discovery stopped before its first scan");
    }
    let mut applied = Arc::new(ClusterState::default());
    let mut recheck = tokio::time::interval(RECHECK);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        let state = state_rx.borrow_and_update().clone();
        if !Arc::ptr_eq(&state, &applied) {
            metrics
                .state_last_update
                .set(crate::admin::state::unix_now());
            applied = state.clone();
        }
        workloads.reconcile(&state);
        status_tx.send_replace(Arc::new(workloads.status(&state)));
        if !ready.swap(true, Ordering::Relaxed) {
            info!(node = %config.node_name, "agent ready");
        }
        tokio::select! {
            changed = state_rx.changed() => {
                if changed.is_err() {
                    warn!("discovery stopped; keeping the last state");
                    recheck.tick().await;
                }
            }
            _ = tokio::time::sleep(STARTING_RECHECK), if workloads.starting() => {}
            _ = recheck.tick() => {
                workloads.check_netns();
                for (kind, stale) in discovery.staleness(std::time::Instant::now()) {
                    metrics.discovery_stale_seconds.with_label_values(&[kind.name()]).set(stale);
                }
            }
            _ = sweep.tick() => {
                let removed = dataplane.sweep_stale(SWEEP_AGE);
                if removed > 0 {
                    info!(removed, "swept unclaimed original-destination entries");
                }
                let removed = dataplane.sweep_node_flows(NODE_FLOW_AGE);
                if removed > 0 {
                    info!(removed, "swept node-connection entries that outlived their handshake");
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    ready.store(false, Ordering::Relaxed);
    let again = Box::pin(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    });
    drain(
        &mut workloads,
        &drain_signal,
        &connections_view,
        &metrics,
        config.drain_timeout,
        again,
    )
    .await;
    // The pod listeners and links go before the lock, so the next agent never finds
    // a port of ours still taken.
    drop(workloads);
    info!("shutting down; pinned eBPF state stays for the next start");
    drop(pin_lock);
    Ok(())
}
