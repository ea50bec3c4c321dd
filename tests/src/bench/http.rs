//! HTTP/1.1 at a fixed request rate: a small hyper server and an open-loop client.
//!
//! Open loop: request i is due at `start + i / rate` whatever happened to earlier
//! requests, and its latency counts from that due time, so a stall shows up in the
//! percentiles instead of silently lowering the rate (coordinated omission).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{client::conn::http1::SendRequest, Request};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HttpLoadReport {
    pub rate: u64,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub connections: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub first_error: Option<String>,
}

type Sender = SendRequest<Empty<Bytes>>;

/// A kept-alive connection idle for longer than this is closed rather than reused. A
/// well-configured client keeps its idle timeout below the server's (the agent's L7
/// proxy closes an HTTP/1.1 connection that has waited its header timeout, 10 s, for
/// a next request), so that a request is never sent just as the server closes the
/// connection; that race fails the request with "connection closed before message
/// completed", which is the client's doing, not the path's.
const CLIENT_IDLE: Duration = Duration::from_secs(5);

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A header every request carries (`name: value`, e.g. a bearer token).
pub type ExtraHeader = (String, String);

async fn request(
    sender: &mut Sender,
    authority: &str,
    headers: &[ExtraHeader],
) -> Result<(), String> {
    let mut req = Request::get("/").header("host", authority);
    for (name, value) in headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(())
}

#[derive(Default)]
struct Tally {
    /// Idle connections, and since when.
    idle: Vec<(Sender, Instant)>,
    latencies_us: Vec<f64>,
    failed: u64,
    connections: u64,
    first_error: Option<String>,
}

/// Sends `rate` requests per second for `seconds` with `headers`, each on an idle
/// keep-alive connection (a new one when all are busy). A plain thread paces the requests:
/// its sleep is precise to tens of microseconds, where tokio's timer rounds to a
/// millisecond and would add that to every latency.
pub fn load(
    addr: SocketAddr,
    rate: u64,
    seconds: u64,
    headers: Vec<ExtraHeader>,
) -> HttpLoadReport {
    let total = rate * seconds;
    let mut report = HttpLoadReport {
        rate,
        sent: total,
        ..Default::default()
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report.failed = total;
            report.first_error = Some(format!("runtime: {e}"));
            return report;
        }
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let authority = addr.to_string();
    let headers = Arc::new(headers);
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + period * i as u32;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let (tally, authority, headers) = (tally.clone(), authority.clone(), headers.clone());
        tasks.push(rt.spawn(async move {
            let idle = {
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                // Most recently used first: once one is too old, so are those under it.
                let fresh = t
                    .idle
                    .pop()
                    .filter(|(_, since)| since.elapsed() < CLIENT_IDLE);
                if fresh.is_none() {
                    t.idle.clear();
                }
                fresh.map(|(s, _)| s)
            };
            let sender = match idle {
                Some(s) if s.is_ready() => Ok(s),
                _ => {
                    tally.lock().unwrap_or_else(|p| p.into_inner()).connections += 1;
                    connect(addr).await
                }
            };
            let result = match sender {
                Ok(mut s) => request(&mut s, &authority, &headers).await.map(|()| s),
                Err(e) => Err(e),
            };
            let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(s) => {
                    t.latencies_us.push(due.elapsed().as_secs_f64() * 1e6);
                    t.idle.push((s, Instant::now()));
                }
                Err(e) => {
                    t.failed += 1;
                    t.first_error.get_or_insert(e);
                }
            }
        }));
    }
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    });
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    t.latencies_us.sort_by(|a, b| a.total_cmp(b));
    report.ok = t.latencies_us.len() as u64;
    report.failed = total - report.ok;
    report.connections = t.connections;
    report.first_error = t.first_error.take();
    report.p50_us = percentile(&t.latencies_us, 0.5);
    report.p99_us = percentile(&t.latencies_us, 0.99);
    report
}

/// The `p` quantile of sorted samples (0 when there are none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_pick_from_sorted_samples() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), 50.0);
        assert_eq!(percentile(&xs, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
