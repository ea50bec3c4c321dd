//! One HTTP/1.1 connection of a node listener (admin, metrics, readiness, the CA)
//! served under its limits: a complete request head within the header timeout (on a
//! new connection and between kept-alive requests), no stall longer than the idle
//! timeout, and a bounded head.

use std::sync::atomic::Ordering;

use hyper::{body::Incoming, server::conn::http1, service::HttpService};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{limits::count_timeout, limits::io::IdleIo, limits::Gate, limits::Stage};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The largest request head (and read buffer) of the node's HTTP listeners.
pub(crate) const MAX_HEAD: usize = 32 * 1024;

/// Serves `io` with `service` until the client is done or a limit cuts it; timeouts
/// are counted under the gate's listener.
pub(crate) async fn serve_http1<I, S>(io: I, service: S, gate: &Gate) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming>,
    S::Error: Into<BoxError>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<BoxError>,
{
    let limits = gate.limits();
    let (io, idle) = IdleIo::new(io, limits.idle_timeout);
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = &result {
        if e.is_timeout() {
            count_timeout(gate.metrics(), gate.listener(), Stage::Header);
        } else if idle.load(Ordering::Relaxed) {
            count_timeout(gate.metrics(), gate.listener(), Stage::Idle);
        }
    }
    result
}
