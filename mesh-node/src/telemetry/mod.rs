//! Telemetry: metrics, the access log, the table of live and recent connections, how a
//! connection ended (and its response flags), what one HTTP request leaves behind,
//! trace context, and rate-limited logging.

pub mod access_log;
pub mod connections;
pub mod log_limit;
pub mod metrics;
pub mod outcome;
pub mod request;
pub mod trace_context;
