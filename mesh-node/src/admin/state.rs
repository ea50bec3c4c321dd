//! What the admin API reads: the agent's parts it shows, the log filter it can change,
//! and the one answer to "is this agent ready, and if not, why".

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;

use crate::{
    capture::dataplane::Dataplane, config::AgentConfig, discovery::apiserver::DiscoveryHealth,
    discovery::cluster::ClusterState, identity::certificates::CertificateStore,
    routing::balancer::Balancer, telemetry::connections::ConnectionTable,
    telemetry::metrics::Metrics, workloads::WorkloadStatus,
};

/// Seconds since the Unix epoch, as the admin views report times.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Installs a new log filter, or says why it is invalid.
type ApplyFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Changes the log filter at runtime.
pub struct LogLevel {
    current: Mutex<String>,
    apply: ApplyFilter,
}

impl LogLevel {
    pub fn new(
        initial: &str,
        apply: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> LogLevel {
        LogLevel {
            current: Mutex::new(initial.to_string()),
            apply: Box::new(apply),
        }
    }

    pub fn get(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn set(&self, level: &str) -> Result<(), String> {
        (self.apply)(level)?;
        if let Ok(mut c) = self.current.lock() {
            *c = level.to_string();
        }
        Ok(())
    }
}

/// What the admin API reads.
pub struct AdminState {
    pub config: AgentConfig,
    pub dataplane: Arc<Dataplane>,
    pub connections: Arc<ConnectionTable>,
    pub metrics: Arc<Metrics>,
    pub workloads: watch::Receiver<Arc<Vec<WorkloadStatus>>>,
    pub ready: Arc<AtomicBool>,
    pub discovery: Arc<DiscoveryHealth>,
    pub state: watch::Receiver<Arc<ClusterState>>,
    pub certificates: Option<Arc<CertificateStore>>,
    pub log_level: LogLevel,
    pub balancer: Arc<Balancer>,
    /// The node's connection pools (circuit breaking occupancy).
    pub pools: Arc<crate::routing::pool::ConnectionPools>,
    /// The node's request authenticator (JWKS), for traces of requests with a JWT.
    pub jwt: Arc<crate::identity::jwt::JwtAuthenticator>,
    /// The node's tracing (exporter health for `meshctl node status`).
    pub(crate) tracer: Arc<crate::telemetry::spans::Tracer>,
    pub started: Instant,
    /// A hand-over this agent took part in (taker or giver).
    pub handover: Arc<std::sync::Mutex<crate::handover::HandoverView>>,
}

/// The discovery part of readiness: a kind whose list or watch has failed too long.
pub fn discovery_unready_reason(discovery: &DiscoveryHealth) -> Option<String> {
    discovery
        .unready_reason(Instant::now())
        .map(|why| format!("discovery: {why}"))
}

/// Why the agent is not ready (None: ready).
pub fn unready_reason(
    draining: bool,
    ready: &AtomicBool,
    discovery: &DiscoveryHealth,
    dataplane: &Dataplane,
    certificates: Option<&CertificateStore>,
) -> Option<String> {
    if draining {
        return Some("draining: the agent is stopping (SIGTERM); its listeners are closed".into());
    }
    if !ready.load(Ordering::Relaxed) {
        return Some("eBPF or first reconcile pending".into());
    }
    if let Some(why) = crate::limits::fd_exhaustion() {
        return Some(why);
    }
    discovery_unready_reason(discovery)
        .or_else(|| dataplane.pressure_reason())
        .or_else(|| certificates.and_then(CertificateStore::unready_reason))
}
