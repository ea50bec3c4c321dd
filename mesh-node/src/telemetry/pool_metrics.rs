//! Circuit breaking's metrics: overflows of a destination's connection pool, and its
//! occupancy (requests and connections in use, requests waiting), per destination
//! Service port and subset of this node proxy.

use prometheus::{IntCounterVec, IntGaugeVec, Opts};

use crate::telemetry::metrics::CatalogRegistry;

/// Labels of the pool metrics: the destination (Istio's names, plus the port and the
/// DestinationRule subset, empty without one). Bounded by the cluster's Services.
pub(crate) const POOL_LABELS: [&str; 5] = [
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_port",
    "destination_subset",
];

/// The metrics a connection pool updates (the pools hold a copy).
#[derive(Clone)]
pub struct PoolMetrics {
    /// Requests answered 503 and connections refused because a pool was full, by
    /// destination and `kind` (`requests`, `pending`, `connections`), and retries not
    /// made because `http.maxRetries` were outstanding (`retries`).
    pub overflows: IntCounterVec,
    /// Requests (`kind="requests"`), connections (`kind="connections"`) and retries
    /// (`kind="retries"`) in use now.
    pub active: IntGaugeVec,
    /// Requests waiting for a connection now.
    pub pending: IntGaugeVec,
}

fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &CatalogRegistry,
    made: prometheus::Result<M>,
) -> M {
    let m = made.unwrap_or_else(|e| panic!("a pool metric is malformed: {e}"));
    registry
        .register(Box::new(m.clone()))
        .unwrap_or_else(|e| panic!("a pool metric is registered twice: {e}"));
    m
}

impl PoolMetrics {
    pub(crate) fn new(registry: &CatalogRegistry) -> PoolMetrics {
        let [a, b, c, d, e] = POOL_LABELS;
        PoolMetrics {
            overflows: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "nodemesh_pool_overflows_total",
                        "Requests answered 503 (UO), connections refused and retries not made because a destination's connection pool was full, by kind.",
                    ),
                    &[a, b, c, d, e, "kind"],
                ),
            ),
            active: registered(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "nodemesh_pool_active",
                        "Requests (kind=requests), connections (kind=connections) or retries (kind=retries) in use now in a destination's connection pool.",
                    ),
                    &[a, b, c, d, e, "kind"],
                ),
            ),
            pending: registered(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "nodemesh_pool_pending_requests",
                        "Requests waiting for a connection now in a destination's connection pool (http1MaxPendingRequests).",
                    ),
                    &POOL_LABELS,
                ),
            ),
        }
    }

    /// A registry of its own (unit tests).
    #[cfg(test)]
    pub(crate) fn unregistered() -> PoolMetrics {
        PoolMetrics::new(&CatalogRegistry::new())
    }
}
