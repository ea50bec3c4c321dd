//! What the test app prints (one JSON line) and the harness reads back.

use std::collections::BTreeMap;

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

/// A starting app's connection attempts, one fresh connection each, in order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FirstConnectReport {
    /// Each attempt, with `elapsed_us` counted from the app's start to the attempt's end.
    pub attempts: Vec<TransferReport>,
    /// Milliseconds from the app's start to its first successful transfer.
    pub first_ok_ms: Option<u64>,
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

/// One HTTP response as the client saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HttpSample {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl HttpSample {
    /// The echo server's report of what it received (pod, path, host, headers).
    pub fn echo(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A run of HTTP requests: answers by status and by the pod that served them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HttpReport {
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub statuses: BTreeMap<u16, u64>,
    /// By `x-served-by` (the echo server's pod; `-` when absent).
    pub pods: BTreeMap<String, u64>,
    /// The first few responses in full.
    pub samples: Vec<HttpSample>,
    /// Answers by the connection they came on as the echo server saw it (its `peer`:
    /// one entry per connection the server accepted).
    #[serde(default)]
    pub peers: BTreeMap<String, u64>,
    pub p50_us: u64,
    pub p99_us: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WebsocketReport {
    pub status: u16,
    /// The server's Sec-WebSocket-Accept matched the key sent.
    pub accept_ok: bool,
    pub echoed: String,
    pub error: Option<String>,
}

/// Many connections held open at once (`mesh-testapp flood`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FloodReport {
    /// Connections open after their first step (connect, and the echo or hello).
    pub opened: u64,
    pub connect_failed: u64,
    /// Echo mode: round trips that came back, and those that did not.
    pub echo_ok: u64,
    pub echo_failed: u64,
    pub first_error: Option<String>,
    /// Time to open them all.
    pub open_ms: u64,
    /// Open connections the peer then closed, and those still open at the end.
    pub closed_by_peer: u64,
    pub still_open: u64,
    /// When, after its opening, the first and last of them were closed.
    pub closed_after_ms_min: Option<u64>,
    pub closed_after_ms_max: Option<u64>,
    pub elapsed_ms: u64,
}
