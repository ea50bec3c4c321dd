//! What the test app prints (one JSON line) and the harness reads back.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TransferReport {
    /// Every byte sent came back, in order.
    pub ok: bool,
    pub sent: u64,
    pub received: u64,
    /// The client socket's own address and its peer as the kernel reports them: for a
    /// redirected connection the peer is the in-pod outbound listener.
    pub local: Option<String>,
    pub peer: Option<String>,
    pub elapsed_us: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnReport {
    pub succeeded: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RttReport {
    pub count: u64,
    pub size: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub error: Option<String>,
}
