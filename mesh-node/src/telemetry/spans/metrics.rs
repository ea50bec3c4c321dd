//! The tracing exporters' metrics, per provider: spans exported, spans dropped (by
//! reason), export attempts (by result) and spans waiting in the queue.

use prometheus::{IntCounterVec, IntGaugeVec, Opts};

use crate::telemetry::metrics::CatalogRegistry;

/// Why a span was not exported (`reason` of `nodemesh_spans_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// The provider's queue was full (the collector is slow or down).
    QueueFull,
    /// Its batch could not be delivered (refused, timed out, unreachable).
    ExportFailed,
    /// The agent stopped before it was exported.
    Shutdown,
}

impl DropReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::ExportFailed => "export_failed",
            DropReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Clone)]
pub struct SpanMetrics {
    pub exported: IntCounterVec,
    pub dropped: IntCounterVec,
    pub exports: IntCounterVec,
    pub queued: IntGaugeVec,
}

fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &CatalogRegistry,
    made: prometheus::Result<M>,
) -> M {
    let m = made.unwrap_or_else(|e| panic!("a span metric is malformed: {e}"));
    registry
        .register(Box::new(m.clone()))
        .unwrap_or_else(|e| panic!("a span metric is registered twice: {e}"));
    m
}

impl SpanMetrics {
    pub(crate) fn new(registry: &CatalogRegistry) -> SpanMetrics {
        SpanMetrics {
            exported: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "nodemesh_spans_exported_total",
                        "Spans a tracing provider's collector accepted, by provider.",
                    ),
                    &["provider"],
                ),
            ),
            dropped: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "nodemesh_spans_dropped_total",
                        "Spans recorded but not exported, by provider and reason (queue_full, export_failed, shutdown).",
                    ),
                    &["provider", "reason"],
                ),
            ),
            exports: registered(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "nodemesh_span_exports_total",
                        "Batches sent to a tracing provider, by provider and result (ok, failed).",
                    ),
                    &["provider", "result"],
                ),
            ),
            queued: registered(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "nodemesh_spans_queued",
                        "Spans waiting to be exported, by provider.",
                    ),
                    &["provider"],
                ),
            ),
        }
    }
}
