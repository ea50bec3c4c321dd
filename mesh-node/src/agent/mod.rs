//! Wires the agent together: preflight, dataplane, discovery, the reconcile loop and
//! the HTTP surfaces.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use mesh_common::NodeConfig;
use thiserror::Error;
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

mod stop;

pub use crate::limits::memory::one_heap_per_core;

use stop::{next_request, Draining, NodeListeners, Signals, Stop};

use crate::{
    admin::server, admin::state::AdminState, admin::state::LogLevel, capture::cgroup,
    capture::cgroup::MountError, capture::dataplane::Dataplane, capture::dataplane::DataplaneError,
    capture::locator::KubepodsLocator, capture::locator::NetnsDirectory,
    capture::locator::NetnsLocator, capture::netns::Netns, capture::netns::NetnsError,
    capture::netns::NetnsId, capture::pin_lock, capture::pin_lock::PinLockError,
    capture::preflight, capture::preflight::PreflightError, capture::sockets::netns_cookie_of,
    capture::sockets::PodSockets, config::AgentConfig, config::NetnsLocatorKind, config::Source,
    discovery::apiserver, discovery::apiserver::DiscoveryHealth, discovery::cluster::ClusterState,
    discovery::files, handover::giver::HandoverServer, handover::taker, handover::HandoverPaths,
    handover::HandoverView, handover::Inherited, handover::ListenerInfo,
    hbone::client::HboneClient, identity::ca::client::CaClient, identity::ca::client::Credential,
    identity::cert_cache::CertCache, identity::certificates::CertificateStore,
    identity::spiffe::TrustBundle, limits, limits::drain::Drain, limits::Gate, limits::Listener,
    proxy::pod::Mesh, routing::balancer::Balancer, routing::table::Router,
    telemetry::connections::ConnectionTable, telemetry::metrics::Metrics, workloads::ProxySettings,
    workloads::Workloads,
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
    #[error(transparent)]
    MeshConfig(#[from] crate::telemetry::spans::mesh_config::MeshConfigError),
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

/// The node's tracing, from `--mesh-config`: each provider's exporter started, the
/// fields Nodemesh does not implement reported.
fn start_tracing(
    config: &AgentConfig,
    metrics: &Metrics,
) -> Result<crate::telemetry::spans::Tracer, AgentError> {
    use crate::telemetry::spans::mesh_config::{MeshConfig, TracingConfig};
    let tracing = match &config.mesh_config {
        Some(path) => MeshConfig::load(path)?.tracing()?,
        None => TracingConfig::default(),
    };
    for field in &tracing.unsupported {
        warn!(%field, "the mesh configuration sets a field Nodemesh does not implement; it has no effect");
        metrics
            .config_problems
            .with_label_values(&["MeshConfig", "not_implemented"])
            .inc();
    }
    let tracer =
        crate::telemetry::spans::Tracer::start(&tracing, &metrics.spans, config.socket_mark);
    if !tracing.providers.is_empty() {
        info!(providers = ?tracing.providers.iter().map(|p| format!("{} ({} {}:{})", p.name, p.protocol.name(), p.host, p.port)).collect::<Vec<_>>(), default = ?tracing.default_providers, sampling_percent = tracing.default_sampling, "tracing providers configured");
    }
    Ok(tracer)
}

/// How long a port the previous agent held may stay taken after it released the pins
/// (its sockets close as it exits, after its lock may have been released).
const BIND_RETRY: Duration = Duration::from_secs(3);

/// A node listener: the predecessor's, when it handed one over at `addr` in this
/// agent's namespace, else a new one. A descriptor of it is kept for a successor.
async fn bind(
    what: &'static str,
    addr: SocketAddr,
    inherited: &mut Inherited,
    node: &mut NodeListeners,
) -> Result<TcpListener, AgentError> {
    let bind_err = |source| AgentError::Bind { what, addr, source };
    let own_cookie = match node.own_netns_cookie {
        Some(cookie) => cookie,
        None => {
            let probe = std::net::UdpSocket::bind(("127.0.0.1", 0)).map_err(bind_err)?;
            let cookie = netns_cookie_of(probe.as_raw_fd()).map_err(bind_err)?;
            node.own_netns_cookie = Some(cookie);
            cookie
        }
    };
    let listener = match inherited.take(own_cookie, addr) {
        Some(l) => TcpListener::from_std(l).map_err(bind_err)?,
        None => bind_new(what, addr).await?,
    };
    let local = listener.local_addr().map_err(bind_err)?;
    let fd = listener.as_fd().try_clone_to_owned().map_err(bind_err)?;
    let info = ListenerInfo {
        netns_cookie: own_cookie,
        addr: local,
    };
    node.kept.push((info, fd));
    Ok(listener)
}

async fn bind_new(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
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
    let signals = Signals::install()?;
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

    // The first full scan before the node is taken: reconciling an empty state would
    // unenroll every pod, and a predecessor handing over its listeners stops
    // accepting until this agent has enrolled its pods, so nothing slow comes after.
    if state_rx.changed().await.is_err() {
        warn!("discovery stopped before its first scan");
    }

    let cgroup_root = cgroup::resolve_cgroup_root(&config.cgroup_root)?;
    let home = Arc::new(Netns::current_thread()?);
    let object = match &config.ebpf_object {
        Some(p) => p.clone(),
        None => default_object()?,
    };
    let (node, node_netns) = node_config(&config, &home)?;
    // An agent runs: load and verify the programs now, so that the predecessor's
    // listeners wait only for the attachment and the enrollment.
    let prepared = match pin_lock::holder(&config.pin_dir) {
        Some(_) => Dataplane::prepare(&object, &config.pin_dir)
            .inspect_err(
                |e| info!(error = %e, "eBPF programs are loaded once the node is taken over"),
            )
            .ok(),
        None => None,
    };

    // Before anything touches the pins; held until this agent hands the node over or
    // exits. A running agent asked for a hand-over gives its listeners with the lock.
    let handover_paths = HandoverPaths {
        socket: config.handover_socket.clone(),
        pin_dir: config.pin_dir.clone(),
    };
    let (pin_lock, taken) = taker::lock_or_take_over(&handover_paths).await?;
    let mut pin_lock = Some(pin_lock);
    let handover_view = Arc::new(Mutex::new(HandoverView::default()));
    let mut inherited = Inherited::default();
    let mut released_at = taken.as_ref().map(|t| t.released_at);
    if let Some(mut taken) = taken {
        let mut view = handover_view.lock().unwrap_or_else(|p| p.into_inner());
        view.took_over_from = Some(taken.from_pid);
        view.inherited_listeners = taken.inherited.len();
        drop(view);
        inherited = std::mem::take(&mut taken.inherited);
        taken.follow(handover_view.clone());
        metrics
            .handovers
            .with_label_values(&["taker", "taken_over"])
            .inc();
    }
    let dataplane = Arc::new(match prepared {
        Some(prepared) => {
            Dataplane::attach(prepared, &object, &config.pin_dir, &cgroup_root, node)?
        }
        None => Dataplane::load(&object, &config.pin_dir, &cgroup_root, node)?,
    });

    let mut node_listeners = NodeListeners::default();
    let admin_listener = bind(
        "admin API",
        config.admin_addr,
        &mut inherited,
        &mut node_listeners,
    )
    .await?;
    let metrics_listener = bind(
        "metrics",
        config.metrics_addr,
        &mut inherited,
        &mut node_listeners,
    )
    .await?;
    let ready_listener = bind(
        "readiness probe",
        config.readiness_addr,
        &mut inherited,
        &mut node_listeners,
    )
    .await?;
    let balancer = Arc::new(Balancer::new().with_outlier_metrics(metrics.outliers.clone()));
    let pools = Arc::new(crate::routing::pool::ConnectionPools::new(Some(
        metrics.pools.clone(),
    )));
    let tracer = Arc::new(start_tracing(&config, &metrics)?);
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
        tracer: tracer.clone(),
        started: std::time::Instant::now(),
        handover: handover_view.clone(),
    });
    let scraped = admin_state.clone();
    let gate = |which| Gate::new(which, config.http_limits(), metrics.clone());
    node_listeners.servers.push(tokio::spawn(server::serve(
        admin_listener,
        gate(Listener::Admin),
        move |m, p, q| server::admin_route(&admin_state, m, p, q),
    )));
    node_listeners.servers.push(tokio::spawn(server::serve(
        metrics_listener,
        gate(Listener::Metrics),
        move |m, p, _| {
            server::metrics_route(m, p, || {
                crate::admin::health::refresh(&scraped);
                server::metrics_response(&scraped.metrics)
            })
        },
    )));
    let (r, d, dp, stopping) = (
        ready.clone(),
        discovery.clone(),
        dataplane.clone(),
        metrics.clone(),
    );
    let certs = mesh.as_ref().map(|m| m.certificates.clone());
    node_listeners.servers.push(tokio::spawn(server::serve(
        ready_listener,
        gate(Listener::Readiness),
        move |m, p, _| {
            server::readiness_route(m, p, || {
                server::readiness(stopping.draining.get() == 1, &r, &d, &dp, certs.as_deref())
            })
        },
    )));

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
            tracer: tracer.clone(),
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

    workloads.inherit(inherited);
    let mut handover_server = if config.handover_socket.as_os_str().is_empty() {
        None
    } else {
        HandoverServer::bind(&handover_paths, metrics.clone())
            .inspect_err(|e| warn!(error = %e, "no hand-over socket: a newer agent on this node will wait for this one to exit"))
            .ok()
    };

    let mut applied = Arc::new(ClusterState::default());
    let mut recheck = tokio::time::interval(RECHECK);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut giver = None;
    while giver.is_none() {
        let state = state_rx.borrow_and_update().clone();
        if !Arc::ptr_eq(&state, &applied) {
            metrics
                .state_last_update
                .set(crate::admin::state::unix_now());
            applied = state.clone();
        }
        workloads.reconcile(&state);
        status_tx.send_replace(Arc::new(workloads.status(&state)));
        if let Some(at) = released_at.take() {
            let gap_ms = at.elapsed().as_millis() as u64;
            handover_view
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .accept_gap_ms = Some(gap_ms);
            info!(
                gap_ms,
                "serving the inherited listeners: connections waited in their queues meanwhile"
            );
        }
        if !ready.swap(true, Ordering::Relaxed) {
            info!(node = %config.node_name, "agent ready");
        }
        let stop = tokio::select! {
            changed = state_rx.changed() => {
                if changed.is_err() {
                    warn!("discovery stopped; keeping the last state");
                    recheck.tick().await;
                }
                None
            }
            _ = tokio::time::sleep(STARTING_RECHECK), if workloads.starting() => None,
            _ = recheck.tick() => {
                workloads.check_netns();
                for (kind, stale) in discovery.staleness(std::time::Instant::now()) {
                    metrics.discovery_stale_seconds.with_label_values(&[kind.name()]).set(stale);
                }
                None
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
                crate::limits::memory::return_free_pages();
                None
            }
            _ = signals.at_least(1) => Some(Stop::Signal),
            Some(request) = next_request(&mut handover_server) => Some(Stop::HandOver(request)),
        };
        match stop {
            None => {}
            Some(Stop::Signal) => break,
            Some(Stop::HandOver(request)) => {
                if let Ok(g) = stop::hand_over(
                    request,
                    &mut workloads,
                    &mut node_listeners,
                    &mut handover_server,
                    &mut pin_lock,
                    &metrics,
                ) {
                    handover_view
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .handed_over_to = Some(g.pid);
                    giver = Some(g);
                }
            }
        }
    }
    ready.store(false, Ordering::Relaxed);
    // A newcomer asking now is told no: it waits for the lock instead.
    drop(handover_server);
    let draining = Draining {
        workloads: &mut workloads,
        drain: &drain_signal,
        connections: &connections_view,
        metrics: &metrics,
        timeout: config.drain_timeout,
        signals: &signals,
        handed_over: giver.is_some(),
    };
    let (open, cut) = draining
        .run(|left| {
            if let Some(g) = &giver {
                g.draining(left);
            }
        })
        .await;
    if let Some(g) = &giver {
        g.drained(open - cut, cut);
        if signals.count() == 0 {
            info!("handed over and drained; waiting for SIGTERM to exit");
            signals.at_least(1).await;
        }
    }
    // The pod listeners and links go before the lock, so the next agent never finds
    // a port of ours still taken.
    drop(workloads);
    info!("shutting down; pinned eBPF state stays for the next start");
    drop(pin_lock);
    crate::telemetry::access_log::flush(Duration::from_secs(2));
    Ok(())
}
