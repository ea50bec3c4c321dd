//! Circuit breaking on the node proxy: the live occupancy of each destination's
//! connection pool (a DestinationRule's `connectionPool`, compiled in
//! `discovery::connection_pool`), and the permits that bound it.
//!
//! A destination is a backend Service port and DestinationRule subset; its pool is
//! shared by every pod of this node (the limits are per node proxy; Envoy's are per
//! sidecar). What is counted:
//!
//! - **requests** (`http2MaxRequests`): HTTP requests to the destination in flight, from
//!   the moment the proxy admits one until its response body has ended or it fails
//!   (each attempt of a retried request on its own). A request beyond the limit is
//!   answered `503` with flag `UO` at once.
//! - **connections** (`tcp.maxConnections`): L4 connections to the destination open
//!   now; a connection beyond the limit is refused (reset) and counted
//!   (`connection_pool_overflow`, flag `UO`). For HTTP/1.1 upstreams, the upstream
//!   connections *carrying a request* now (one request per connection at a time);
//!   kept-alive idle connections are not counted. HTTP/2 upstreams multiplex on one
//!   connection per endpoint and pod, bounded by `http2MaxRequests`; under
//!   `maxConcurrentStreams` (more connections when one is full) each HTTP/2
//!   connection holds a connection slot while it is open.
//! - **pending** (`http1MaxPendingRequests`): HTTP/1.1 requests admitted but waiting for
//!   a connection slot because `maxConnections` are busy. They are served in arrival
//!   order as slots free up (or give up with the route's timeout or the client); a
//!   request that finds the queue full is answered `503 UO` at once. Without
//!   `maxConnections` nothing ever waits, so `http1MaxPendingRequests` alone bounds
//!   nothing (as in Envoy, where a new connection is opened for each).
//! - **retries** (`http.maxRetries`): retries to the destination outstanding at once,
//!   from the moment the proxy decides to retry (its backoff included) until the
//!   retried attempt's response head or failure is back, as Envoy counts them. A retry
//!   beyond the limit is not made: the client gets what the last attempt brought, with
//!   flag `UO` (Envoy's flag for a retry overflow), and the overflow is counted
//!   (`kind="retries"`).
//!
//! Every permit is a guard: it is returned when dropped, whatever becomes of the
//! request or connection (success, error, timeout, the client going away).
//! A destination whose limits change gets a fresh pool; permits of the old one are
//! returned to it.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use prometheus::{IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    discovery::connection_pool::PoolLimits, keys::ObjectKey, routing::backend::Backend,
    routing::balancer::Pick, routing::resolve::ServiceRoute, telemetry::pool_metrics::PoolMetrics,
};

/// At most this many destinations are remembered; beyond it, idle pools are forgotten
/// (they are made again on their next use).
const MAX_POOLS: usize = 4096;

/// Which limit a request or connection overflowed: the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowKind {
    /// `http2MaxRequests`.
    Requests,
    /// `http1MaxPendingRequests`.
    Pending,
    /// `tcp.maxConnections` (L4).
    Connections,
    /// `http.maxRetries`.
    Retries,
}

impl OverflowKind {
    pub const ALL: [OverflowKind; 4] = [
        OverflowKind::Requests,
        OverflowKind::Pending,
        OverflowKind::Connections,
        OverflowKind::Retries,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OverflowKind::Requests => "requests",
            OverflowKind::Pending => "pending",
            OverflowKind::Connections => "connections",
            OverflowKind::Retries => "retries",
        }
    }

    fn index(self) -> usize {
        match self {
            OverflowKind::Requests => 0,
            OverflowKind::Pending => 1,
            OverflowKind::Connections => 2,
            OverflowKind::Retries => 3,
        }
    }

    fn field(self) -> &'static str {
        match self {
            OverflowKind::Requests => "http2MaxRequests",
            OverflowKind::Pending => "http1MaxPendingRequests",
            OverflowKind::Connections => "tcp.maxConnections",
            OverflowKind::Retries => "http.maxRetries",
        }
    }
}

/// One destination: a backend Service port and subset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Destination {
    pub service: ObjectKey,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.port)?;
        if let Some(s) = &self.subset {
            write!(f, " (subset {s})")?;
        }
        Ok(())
    }
}

/// A request or connection the pool turned away.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("the connection pool of {destination} is full: {} ({limit}) reached; raise it in the DestinationRule's connectionPool or add capacity", .kind.field())]
pub struct Overflow {
    pub destination: Destination,
    pub kind: OverflowKind,
    pub limit: u32,
}

struct Gauges {
    requests: IntGauge,
    connections: IntGauge,
    pending: IntGauge,
    retries: IntGauge,
    overflows: [IntCounter; 4],
}

/// The live state of one destination's pool.
pub struct Pool {
    destination: Destination,
    limits: PoolLimits,
    /// Slots for connections (L4) or HTTP/1.1 requests on a connection; None: no limit.
    slots: Option<Arc<Semaphore>>,
    requests: AtomicU64,
    connections: AtomicU64,
    pending: AtomicU64,
    retries: AtomicU64,
    overflows: [AtomicU64; 4],
    gauges: Option<Gauges>,
}

/// Adds one to `counter` if it is below `limit` (None: no limit).
fn take(counter: &AtomicU64, limit: Option<u32>) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match limit {
            Some(l) if n >= u64::from(l) => None,
            _ => Some(n + 1),
        })
        .is_ok()
}

fn give_back(counter: &AtomicU64) {
    // Never below zero, whatever the order of drops.
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
}

impl Pool {
    fn new(destination: Destination, limits: PoolLimits, metrics: Option<&PoolMetrics>) -> Pool {
        let gauges = metrics.map(|m| {
            let fqdn = format!(
                "{}.{}.svc.cluster.local",
                destination.service.name, destination.service.namespace
            );
            let port = destination.port.to_string();
            let base = [
                fqdn.as_str(),
                destination.service.name.as_str(),
                destination.service.namespace.as_str(),
                port.as_str(),
                destination.subset.as_deref().unwrap_or(""),
            ];
            fn with<'a>(base: [&'a str; 5], kind: &'a str) -> [&'a str; 6] {
                let [a, b, c, d, e] = base;
                [a, b, c, d, e, kind]
            }
            Gauges {
                requests: m.active.with_label_values(&with(base, "requests")),
                connections: m.active.with_label_values(&with(base, "connections")),
                pending: m.pending.with_label_values(&base),
                retries: m.active.with_label_values(&with(base, "retries")),
                overflows: OverflowKind::ALL
                    .map(|k| m.overflows.with_label_values(&with(base, k.as_str()))),
            }
        });
        Pool {
            slots: limits
                .max_connections
                .map(|n| Arc::new(Semaphore::new((n as usize).min(Semaphore::MAX_PERMITS)))),
            destination,
            limits,
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            overflows: Default::default(),
            gauges,
        }
    }

    fn overflow(&self, kind: OverflowKind, limit: Option<u32>) -> Overflow {
        self.overflows[kind.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(g) = &self.gauges {
            g.overflows[kind.index()].inc();
        }
        Overflow {
            destination: self.destination.clone(),
            kind,
            limit: limit.unwrap_or(u32::MAX),
        }
    }

    fn connection_slot(self: &Arc<Self>, slot: Option<OwnedSemaphorePermit>) -> ConnectionPermit {
        self.connections.fetch_add(1, Ordering::AcqRel);
        if let Some(g) = &self.gauges {
            g.connections.inc();
        }
        ConnectionPermit {
            pool: self.clone(),
            _slot: slot,
        }
    }

    /// Admits an L4 connection, or refuses it when `maxConnections` are open.
    pub fn connection(self: &Arc<Self>) -> Result<ConnectionPermit, Overflow> {
        let slot = match &self.slots {
            None => None,
            Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| {
                self.overflow(OverflowKind::Connections, self.limits.max_connections)
            })?),
        };
        Ok(self.connection_slot(slot))
    }

    /// Admits an HTTP request: at once when under `http2MaxRequests` and (HTTP/1.1) a
    /// connection slot is free; after waiting in the pending queue when the slots are
    /// busy and the queue has room; otherwise an [`Overflow`] at once. Cancelling the
    /// wait (dropping the future) returns everything taken.
    pub async fn request(self: &Arc<Self>, http1: bool) -> Result<RequestPermit, Overflow> {
        if !take(&self.requests, self.limits.max_requests) {
            return Err(self.overflow(OverflowKind::Requests, self.limits.max_requests));
        }
        if let Some(g) = &self.gauges {
            g.requests.inc();
        }
        let mut permit = RequestPermit {
            pool: self.clone(),
            connection: None,
        };
        let Some(slots) = self.slots.as_ref().filter(|_| http1) else {
            return Ok(permit);
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if !take(&self.pending, self.limits.max_pending_requests) {
                    return Err(
                        self.overflow(OverflowKind::Pending, self.limits.max_pending_requests)
                    );
                }
                let _waiting = Pending::new(self.clone());
                // The semaphore is never closed: an error cannot happen, and would be
                // an overflow rather than a wait without end.
                slots.clone().acquire_owned().await.map_err(|_| {
                    self.overflow(OverflowKind::Pending, self.limits.max_pending_requests)
                })?
            }
        };
        permit.connection = Some(self.connection_slot(Some(slot)));
        Ok(permit)
    }

    /// Admits a retry of a request to this destination, or refuses it when
    /// `http.maxRetries` retries are outstanding. The permit is held from the decision
    /// to retry until the retried attempt has its answer (or is dropped).
    pub fn retry(self: &Arc<Self>) -> Result<RetryPermit, Overflow> {
        if !take(&self.retries, self.limits.max_retries) {
            return Err(self.overflow(OverflowKind::Retries, self.limits.max_retries));
        }
        if let Some(g) = &self.gauges {
            g.retries.inc();
        }
        Ok(RetryPermit { pool: self.clone() })
    }

    /// Occupancy now and overflows so far, for the admin API.
    pub fn occupancy(&self) -> Occupancy {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let over = |k: OverflowKind| n(&self.overflows[k.index()]);
        Occupancy {
            active_requests: n(&self.requests),
            active_connections: n(&self.connections),
            pending_requests: n(&self.pending),
            active_retries: n(&self.retries),
            overflows: Overflows {
                requests: over(OverflowKind::Requests),
                pending: over(OverflowKind::Pending),
                connections: over(OverflowKind::Connections),
                retries: over(OverflowKind::Retries),
            },
        }
    }

    pub fn view(&self) -> PoolView {
        PoolView {
            destination: self.destination.clone(),
            limits: self.limits,
            occupancy: self.occupancy(),
        }
    }
}

/// A request waiting for a connection slot; counted until dropped.
struct Pending(Arc<Pool>);

impl Pending {
    fn new(pool: Arc<Pool>) -> Pending {
        if let Some(g) = &pool.gauges {
            g.pending.inc();
        }
        Pending(pool)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        give_back(&self.0.pending);
        if let Some(g) = &self.0.gauges {
            g.pending.dec();
        }
    }
}

/// A connection (L4), or the connection slot of an HTTP/1.1 request, in use: returned
/// when dropped.
pub struct ConnectionPermit {
    pool: Arc<Pool>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        give_back(&self.pool.connections);
        if let Some(g) = &self.pool.gauges {
            g.connections.dec();
        }
    }
}

impl fmt::Debug for ConnectionPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionPermit({})", self.pool.destination)
    }
}

/// An admitted HTTP request: returned when dropped.
pub struct RequestPermit {
    pool: Arc<Pool>,
    connection: Option<ConnectionPermit>,
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.connection.take();
        give_back(&self.pool.requests);
        if let Some(g) = &self.pool.gauges {
            g.requests.dec();
        }
    }
}

impl fmt::Debug for RequestPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestPermit({})", self.pool.destination)
    }
}

/// An outstanding retry (`http.maxRetries`): returned when dropped.
pub struct RetryPermit {
    pool: Arc<Pool>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        give_back(&self.pool.retries);
        if let Some(g) = &self.pool.gauges {
            g.retries.dec();
        }
    }
}

impl fmt::Debug for RetryPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RetryPermit({})", self.pool.destination)
    }
}

/// Requests, connections and retries turned away so far, by the limit they met.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Overflows {
    /// `http2MaxRequests`.
    pub requests: u64,
    /// `http1MaxPendingRequests`.
    pub pending: u64,
    /// `tcp.maxConnections` (L4).
    pub connections: u64,
    /// `http.maxRetries`: retries not made.
    pub retries: u64,
}

/// A pool's occupancy on this node (admin API, `meshctl node services`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Occupancy {
    /// HTTP requests in flight.
    pub active_requests: u64,
    /// L4 connections open, or HTTP/1.1 connections carrying a request.
    pub active_connections: u64,
    /// HTTP/1.1 requests waiting for a connection.
    pub pending_requests: u64,
    /// Retries outstanding (`http.maxRetries`).
    pub active_retries: u64,
    pub overflows: Overflows,
}

/// A pool's limits and state.
#[derive(Debug, Clone, Serialize)]
pub struct PoolView {
    #[serde(flatten)]
    pub destination: Destination,
    pub limits: PoolLimits,
    #[serde(flatten)]
    pub occupancy: Occupancy,
}

/// Pools by backend Service, then by port and subset.
type ByService = HashMap<ObjectKey, HashMap<(u16, Option<String>), Arc<Pool>>>;

/// Every destination's pool on this node.
#[derive(Default)]
pub struct ConnectionPools {
    pools: Mutex<ByService>,
    metrics: Option<PoolMetrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ConnectionPools {
    pub fn new(metrics: Option<PoolMetrics>) -> ConnectionPools {
        ConnectionPools {
            pools: Mutex::default(),
            metrics,
        }
    }

    /// The pool of `backend` when its policy bounds requests or connections (None:
    /// nothing to count).
    pub fn pool(&self, backend: &Backend) -> Option<Arc<Pool>> {
        let limits = backend
            .policy
            .connection_pool
            .filter(PoolLimits::bounds_anything)?;
        let key = (backend.port, backend.subset.clone());
        let mut pools = lock(&self.pools);
        if let Some(p) = pools
            .get(&backend.service)
            .and_then(|ports| ports.get(&key))
            .filter(|p| p.limits == limits)
        {
            return Some(p.clone());
        }
        if pools.values().map(HashMap::len).sum::<usize>() >= MAX_POOLS {
            for ports in pools.values_mut() {
                ports.retain(|_, p| Arc::strong_count(p) > 1);
            }
            pools.retain(|_, ports| !ports.is_empty());
        }
        let destination = Destination {
            service: backend.service.clone(),
            port: backend.port,
            subset: backend.subset.clone(),
        };
        let pool = Arc::new(Pool::new(destination, limits, self.metrics.as_ref()));
        pools
            .entry(backend.service.clone())
            .or_default()
            .insert(key, pool.clone());
        Some(pool)
    }

    /// The occupancy of `backend`'s pool, if it has one in use.
    pub fn occupancy(&self, backend: &Backend) -> Option<Occupancy> {
        let limits = backend.policy.connection_pool?;
        let pools = lock(&self.pools);
        pools
            .get(&backend.service)?
            .get(&(backend.port, backend.subset.clone()))
            .filter(|p| p.limits == limits)
            .map(|p| p.occupancy())
    }

    /// Every pool's state, by destination.
    pub fn view(&self) -> Vec<PoolView> {
        let pools = lock(&self.pools);
        let mut out: Vec<PoolView> = pools
            .values()
            .flat_map(|ports| ports.values().map(|p| p.view()))
            .collect();
        out.sort_by(|a, b| {
            (
                &a.destination.service,
                a.destination.port,
                &a.destination.subset,
            )
                .cmp(&(
                    &b.destination.service,
                    b.destination.port,
                    &b.destination.subset,
                ))
        });
        out
    }
}

/// The backend of `route` an L4 pick came from (the one named by the pick that has its
/// endpoint; the first such when subsets overlap).
pub fn backend_of<'r>(route: &'r ServiceRoute, pick: &Pick) -> Option<&'r Backend> {
    route
        .eligible()
        .find(|b| b.service == *pick.backend && b.endpoints.contains(&pick.endpoint))
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
