//! Bounds on every listener the agent and the CA own, so that idle, slow or greedy
//! clients cannot exhaust the process: a connection cap per listener (and per source
//! address on the node's HTTP listeners), a handshake/header timeout, an idle timeout,
//! a budget of proxied connections per pod, and the process's descriptor limit.
//!
//! A connection over a cap is accepted and closed at once (never queued), and counted
//! in `nodemesh_listener_refused_total{listener,reason}`.

pub(crate) mod drain;
pub(crate) mod gate;
pub(crate) mod http;
pub(crate) mod io;
pub(crate) mod memory;
pub(crate) mod mirror_slots;
pub(crate) mod served;

use std::{
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus::IntGauge;
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::info;

use crate::telemetry::metrics::Metrics;

pub(crate) use gate::Gate;

/// The listeners the limits apply to (the `listener` label of their metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Listener {
    /// The admin API (127.0.0.1:15000).
    Admin,
    /// Prometheus metrics (:15020).
    Metrics,
    /// The readiness probe (:15021).
    Readiness,
    /// The CA (`mesh-node ca`, :15012).
    Ca,
    /// A pod's outbound listener (15001).
    Outbound,
    /// A pod's plaintext inbound listener (15006).
    Inbound,
    /// A pod's HBONE listener (15008).
    Hbone,
    /// The L7 proxy of HTTP-routed Services (connections from 15001).
    Http,
}

impl Listener {
    const ALL: [Listener; 8] = [
        Listener::Admin,
        Listener::Metrics,
        Listener::Readiness,
        Listener::Ca,
        Listener::Outbound,
        Listener::Inbound,
        Listener::Hbone,
        Listener::Http,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Listener::Admin => "admin",
            Listener::Metrics => "metrics",
            Listener::Readiness => "readiness",
            Listener::Ca => "ca",
            Listener::Outbound => "outbound",
            Listener::Inbound => "inbound",
            Listener::Hbone => "hbone",
            Listener::Http => "http",
        }
    }

    /// The in-pod listener on `port` (its connections draw from that budget); any
    /// other port counts as inbound.
    pub(crate) fn in_pod(port: u16) -> Listener {
        match port {
            mesh_common::OUTBOUND_PORT => Listener::Outbound,
            mesh_common::HBONE_PORT => Listener::Hbone,
            _ => Listener::Inbound,
        }
    }
}

/// Why a connection was refused at a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // each names the limit that refused
pub(crate) enum Refusal {
    /// The listener has as many connections as it allows.
    ConnectionLimit,
    /// This source address has as many connections as one source may have.
    SourceLimit,
    /// The pod has as many proxied connections (or HBONE streams) as it may have.
    PodConnectionLimit,
}

impl Refusal {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::SourceLimit => "source_limit",
            Refusal::PodConnectionLimit => "pod_connection_limit",
        }
    }
}

/// Where a connection was cut for being too slow or idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// TLS (and, for HBONE, the HTTP/2 preface) not done in time.
    Handshake,
    /// No complete request head in time (a new connection, or a kept-alive one).
    Header,
    /// No bytes either way (or no request in flight) for the idle timeout.
    Idle,
}

impl Stage {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stage::Handshake => "handshake",
            Stage::Header => "header",
            Stage::Idle => "idle",
        }
    }
}

/// Counts a connection refused at a cap (the refusal's log line is debug: the counter
/// is the signal, and a flood must not become a flood of log lines).
pub(crate) fn count_refusal(metrics: &Metrics, listener: Listener, refusal: Refusal) {
    metrics
        .listener_refused
        .with_label_values(&[listener.name(), refusal.name()])
        .inc();
}

pub(crate) fn count_timeout(metrics: &Metrics, listener: Listener, stage: Stage) {
    metrics
        .listener_timeouts
        .with_label_values(&[listener.name(), stage.name()])
        .inc();
}

/// Registers every listener's series at zero, so dashboards see them before a refusal.
pub(crate) fn init_metrics(metrics: &Metrics) {
    for l in Listener::ALL {
        metrics.listener_connections.with_label_values(&[l.name()]);
    }
}

/// Limits of one node listener (admin, metrics, readiness, the CA).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ListenerLimits {
    /// Time to finish the TLS handshake (when there is one) and send a request head.
    pub header_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_per_source: usize,
}

/// What bounds each enrolled pod's proxying (shared by its listeners).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PodLimits {
    /// Time to finish a handshake (HBONE: TLS and the HTTP/2 preface) or send a
    /// request head (L7 proxy).
    pub header_timeout: Duration,
    /// An L7 connection with no request in flight for this long is closed.
    pub http_idle_timeout: Duration,
    /// Proxied connections per pod and direction (outbound: 15001; inbound: 15006 and
    /// HBONE streams); also the HTTP/2 concurrent-stream limit of HBONE and the L7 proxy.
    pub max_connections: usize,
    /// HBONE connections (TLS sessions, each carrying streams) a pod's 15008 holds.
    pub max_hbone_connections: usize,
}

impl PodLimits {
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS for one connection: no more than the pod
    /// could take anyway, so the pod's budget, not the stream limit, decides.
    pub fn max_streams(&self) -> u32 {
        u32::try_from(self.max_connections).unwrap_or(u32::MAX)
    }
}

/// One pod's budget for one kind of connection, and the gauge of what is open.
struct Pool {
    permits: Arc<Semaphore>,
    gauge: IntGauge,
}

impl Pool {
    fn new(size: usize, listener: Listener, metrics: &Metrics) -> Pool {
        Pool {
            permits: Arc::new(Semaphore::new(size.min(Semaphore::MAX_PERMITS))),
            gauge: metrics
                .listener_connections
                .with_label_values(&[listener.name()]),
        }
    }

    fn take(&self) -> Option<PodSlot> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.gauge.inc();
        Some(PodSlot {
            _permit: permit,
            gauge: self.gauge.clone(),
        })
    }
}

/// One connection's (or stream's) place in its pod's budget, held by its task.
pub(crate) struct PodSlot {
    _permit: OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Drop for PodSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// One pod's budgets. Outbound and inbound are separate, so that a flood of
/// connections *to* a pod cannot stop the pod from making its own, and the reverse.
pub(crate) struct PodBudget {
    outbound: Pool,
    inbound: Pool,
    hbone: Pool,
}

impl PodBudget {
    pub(crate) fn new(limits: &PodLimits, metrics: &Metrics) -> PodBudget {
        PodBudget {
            outbound: Pool::new(limits.max_connections, Listener::Outbound, metrics),
            inbound: Pool::new(limits.max_connections, Listener::Inbound, metrics),
            hbone: Pool::new(limits.max_hbone_connections, Listener::Hbone, metrics),
        }
    }

    /// A slot for one connection of `listener` (HBONE: the TLS session), or None when
    /// the pod is at its bound.
    pub(crate) fn admit(&self, listener: Listener) -> Option<PodSlot> {
        match listener {
            Listener::Outbound | Listener::Http => self.outbound.take(),
            Listener::Hbone => self.hbone.take(),
            _ => self.inbound.take(),
        }
    }

    /// A slot for one inbound HBONE stream (it counts as an inbound connection).
    pub(crate) fn admit_stream(&self) -> Option<PodSlot> {
        self.inbound.take()
    }
}

// ---- descriptors ---------------------------------------------------------------

/// When accepts last failed for lack of descriptors (ms since the epoch; 0: never),
/// on which listener, and with which errno. The fd table is the process's, so this
/// is process-wide state.
static EXHAUSTED_AT_MS: AtomicU64 = AtomicU64::new(0);
static EXHAUSTED_LISTENER: AtomicU8 = AtomicU8::new(0);
static EXHAUSTED_ERRNO: AtomicU64 = AtomicU64::new(0);

/// How long readiness stays failed after the last EMFILE/ENFILE.
const EXHAUSTION_MEMORY: Duration = Duration::from_secs(5);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why the agent is not ready because of descriptors: accepts failed with EMFILE or
/// ENFILE within the last 5 s. Clears by itself once accepts succeed again.
pub(crate) fn fd_exhaustion() -> Option<String> {
    let at = EXHAUSTED_AT_MS.load(Ordering::Relaxed);
    if at == 0 {
        return None;
    }
    let ago = now_ms().saturating_sub(at);
    if ago > EXHAUSTION_MEMORY.as_millis() as u64 {
        return None;
    }
    let listener = Listener::ALL
        .get(EXHAUSTED_LISTENER.load(Ordering::Relaxed) as usize)
        .map_or("a", |l| l.name());
    let which = match EXHAUSTED_ERRNO.load(Ordering::Relaxed) as i32 {
        libc::ENFILE => "the system's file table is full (ENFILE)",
        _ => "the agent is at its descriptor limit (EMFILE)",
    };
    Some(format!(
        "accepts on the {listener} listener failed {ago} ms ago: {which}; see nodemesh_accept_errors_total and raise the limit (LimitNOFILE) or lower --max-connections-per-pod"
    ))
}

/// Counts and logs a failed accept; EMFILE/ENFILE make readiness fail for a while.
pub(crate) fn accept_failed(metrics: &Metrics, listener: Listener, error: &std::io::Error) {
    let errno = error.raw_os_error();
    let kind = match errno {
        Some(libc::EMFILE) => "emfile",
        Some(libc::ENFILE) => "enfile",
        _ => "other",
    };
    metrics
        .accept_errors
        .with_label_values(&[listener.name(), kind])
        .inc();
    if let Some(e @ (libc::EMFILE | libc::ENFILE)) = errno {
        let index = Listener::ALL
            .iter()
            .position(|l| *l == listener)
            .unwrap_or(0);
        EXHAUSTED_LISTENER.store(index as u8, Ordering::Relaxed);
        EXHAUSTED_ERRNO.store(e as u64, Ordering::Relaxed);
        EXHAUSTED_AT_MS.store(now_ms(), Ordering::Relaxed);
    }
    crate::warn_limited!(listener = listener.name(), error = %error, "accept failed; retrying");
}

/// Accepts the next connection, pausing briefly after errors (EMFILE would otherwise
/// spin: the pending connection stays queued until a descriptor frees).
pub(crate) async fn accept(
    listener: &TcpListener,
    which: Listener,
    metrics: &Metrics,
) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                accept_failed(metrics, which, &e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The descriptor limit before and after [`raise_fd_limit`], and the hard limit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FdLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (the inherited soft limit is often
/// 1024), and logs both.
pub(crate) fn raise_fd_limit() -> std::io::Result<FdLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft_before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let raised = FdLimit {
        soft_before,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    };
    info!(
        soft_before = raised.soft_before,
        soft = raised.soft,
        hard = raised.hard,
        "descriptor limit (RLIMIT_NOFILE)"
    );
    Ok(raised)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_budget_refuses_past_its_bound_and_returns_permits() {
        let limits = PodLimits {
            header_timeout: Duration::from_secs(1),
            http_idle_timeout: Duration::from_secs(1),
            max_connections: 2,
            max_hbone_connections: 1,
        };
        let budget = PodBudget::new(&limits, &Metrics::new());
        let a = budget.admit(Listener::Outbound).unwrap();
        let _b = budget.admit(Listener::Http).unwrap();
        assert!(budget.admit(Listener::Outbound).is_none());
        // Directions are separate budgets: inbound still has room.
        let _s = budget.admit_stream().unwrap();
        let _i = budget.admit(Listener::Inbound).unwrap();
        assert!(budget.admit_stream().is_none());
        let _h = budget.admit(Listener::Hbone).unwrap();
        assert!(budget.admit(Listener::Hbone).is_none());
        drop(a);
        assert!(budget.admit(Listener::Outbound).is_some());
    }

    #[test]
    fn exhaustion_is_reported_then_forgotten() {
        let metrics = Metrics::new();
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        accept_failed(&metrics, Listener::Metrics, &emfile);
        let why = fd_exhaustion().unwrap();
        assert!(why.contains("EMFILE") && why.contains("metrics"), "{why}");
        EXHAUSTED_AT_MS.store(now_ms() - 6_000, Ordering::Relaxed);
        assert_eq!(fd_exhaustion(), None);
    }

    #[test]
    fn the_soft_descriptor_limit_reaches_the_hard_one() {
        let limit = raise_fd_limit().unwrap();
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.soft >= limit.soft_before);
    }

    #[test]
    fn in_pod_listeners_are_told_apart_by_port() {
        assert_eq!(Listener::in_pod(15001), Listener::Outbound);
        assert_eq!(Listener::in_pod(15006), Listener::Inbound);
        assert_eq!(Listener::in_pod(15008), Listener::Hbone);
    }
}
