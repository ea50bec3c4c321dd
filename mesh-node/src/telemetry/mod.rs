//! Telemetry: metrics, the access log, the table of live and recent connections, how a
//! connection ended (and its response flags), what one HTTP request leaves behind,
//! trace context and the spans recorded for it, and rate-limited logging.

pub(crate) mod access_log;
pub(crate) mod connections;
pub(crate) mod inbound_request;
pub(crate) mod log_limit;
pub(crate) mod metrics;
pub(crate) mod outcome;
pub(crate) mod pool_metrics;
pub(crate) mod request;
pub(crate) mod request_line;
pub(crate) mod spans;
pub(crate) mod trace_context;
