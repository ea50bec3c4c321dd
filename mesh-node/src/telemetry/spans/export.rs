//! One tracing provider's exporter: a bounded queue the data path hands spans to
//! without waiting, and a task that wakes every [`FLUSH_INTERVAL`], takes what has
//! queued (at most [`MAX_BATCH`] spans per export) and sends it to the collector over
//! a kept connection, each export bounded by the provider's timeout.
//!
//! Spans that do not fit in the queue, and batches that fail, are dropped and counted;
//! nothing is retried, so a collector that is down costs a bounded amount of memory
//! and never slows a request.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::{net::TcpSocket, net::TcpStream, sync::mpsc};
use tracing::debug;

use crate::telemetry::spans::{
    mesh_config::{Protocol, ProviderSpec},
    metrics::{DropReason, SpanMetrics},
    otlp, unix_nanos, zipkin, Span,
};

/// Spans a provider's queue holds; more are dropped (`queue_full`).
pub(crate) const QUEUE_CAPACITY: usize = 2048;
/// Spans in one export.
pub(crate) const MAX_BATCH: usize = 512;
/// How often the exporter sends what has queued.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// The most of a collector's answer that is read.
const MAX_RESPONSE: usize = 64 * 1024;

/// What `meshctl node status` shows of a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExporterStatus {
    pub provider: String,
    pub protocol: String,
    pub endpoint: String,
    /// Spans waiting in the queue now.
    pub queued: u64,
    /// Spans the collector accepted.
    pub sent: u64,
    /// Spans dropped (queue full, export failed).
    pub dropped: u64,
    /// The last export's failure, while exports keep failing.
    pub last_error: Option<String>,
    /// When an export last succeeded (seconds since the Unix epoch).
    pub last_success_unix: Option<u64>,
}

#[derive(Debug, Default)]
struct Health {
    last_error: Option<String>,
    last_success: Option<SystemTime>,
}

/// The counters of one provider (label values resolved once).
#[derive(Debug, Clone)]
struct Counters {
    exported: IntCounter,
    dropped_full: IntCounter,
    dropped_failed: IntCounter,
    dropped_shutdown: IntCounter,
    exports_ok: IntCounter,
    exports_failed: IntCounter,
    queued: IntGauge,
}

impl Counters {
    fn new(m: &SpanMetrics, provider: &str) -> Counters {
        let dropped = |r: DropReason| m.dropped.with_label_values(&[provider, r.label()]);
        Counters {
            exported: m.exported.with_label_values(&[provider]),
            dropped_full: dropped(DropReason::QueueFull),
            dropped_failed: dropped(DropReason::ExportFailed),
            dropped_shutdown: dropped(DropReason::Shutdown),
            exports_ok: m.exports.with_label_values(&[provider, "ok"]),
            exports_failed: m.exports.with_label_values(&[provider, "failed"]),
            queued: m.queued.with_label_values(&[provider]),
        }
    }
}

/// A provider's end of the data path: hands spans to its export task.
#[derive(Debug)]
pub(crate) struct Exporter {
    spec: ProviderSpec,
    queue: mpsc::Sender<Arc<Span>>,
    counters: Counters,
    health: Arc<Mutex<Health>>,
}

impl Exporter {
    /// Starts the provider's export task (on the current runtime).
    pub(crate) fn start(spec: ProviderSpec, metrics: &SpanMetrics, socket_mark: u32) -> Exporter {
        let (queue, spans) = mpsc::channel(QUEUE_CAPACITY);
        let counters = Counters::new(metrics, &spec.name);
        let health = Arc::new(Mutex::new(Health::default()));
        let task = ExportTask {
            spec: spec.clone(),
            socket_mark,
            connection: None,
            counters: counters.clone(),
            health: health.clone(),
        };
        tokio::spawn(task.run(spans));
        Exporter {
            spec,
            queue,
            counters,
            health,
        }
    }

    /// Queues a span; a full queue drops it (counted). Never waits.
    pub(crate) fn submit(&self, span: Arc<Span>) {
        match self.queue.try_send(span) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.counters.dropped_full.inc(),
            Err(mpsc::error::TrySendError::Closed(_)) => self.counters.dropped_shutdown.inc(),
        }
    }

    pub(crate) fn status(&self) -> ExporterStatus {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let c = &self.counters;
        ExporterStatus {
            provider: self.spec.name.clone(),
            protocol: self.spec.protocol.name().into(),
            endpoint: format!("{}:{}", self.spec.host, self.spec.port),
            queued: (self.queue.max_capacity() - self.queue.capacity()) as u64,
            sent: c.exported.get(),
            dropped: c.dropped_full.get() + c.dropped_failed.get() + c.dropped_shutdown.get(),
            last_error: health.last_error.clone(),
            last_success_unix: health.last_success.map(|t| unix_nanos(t) / 1_000_000_000),
        }
    }
}

enum Connection {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    fn is_usable(&self) -> bool {
        match self {
            Connection::Http1(s) => s.is_ready(),
            Connection::Http2(s) => s.is_ready(),
        }
    }
}

struct ExportTask {
    spec: ProviderSpec,
    socket_mark: u32,
    connection: Option<Connection>,
    counters: Counters,
    health: Arc<Mutex<Health>>,
}

impl ExportTask {
    async fn run(mut self, mut spans: mpsc::Receiver<Arc<Span>>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Everything queued now, a batch at a time. The task does not wait on the
            // queue itself, so recording a span never wakes it.
            loop {
                while batch.len() < MAX_BATCH {
                    match spans.try_recv() {
                        Ok(s) => batch.push(s),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            if !batch.is_empty() {
                                self.export(&batch).await;
                            }
                            return;
                        }
                    }
                }
                self.counters.queued.set(spans.len() as i64);
                if batch.is_empty() {
                    break;
                }
                let full = batch.len() == MAX_BATCH;
                self.export(&batch).await;
                batch.clear();
                if !full {
                    break;
                }
            }
        }
    }

    async fn export(&mut self, batch: &[Arc<Span>]) {
        let result = match tokio::time::timeout(self.spec.timeout, self.send(batch)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.spec.timeout)),
        };
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(rejected) => {
                let accepted = (batch.len() as u64).saturating_sub(rejected);
                self.counters.exported.inc_by(accepted);
                self.counters
                    .dropped_failed
                    .inc_by(batch.len() as u64 - accepted);
                self.counters.exports_ok.inc();
                health.last_error = None;
                health.last_success = Some(SystemTime::now());
            }
            Err(why) => {
                // The connection may hold a half-sent request: start afresh.
                self.connection = None;
                self.counters.dropped_failed.inc_by(batch.len() as u64);
                self.counters.exports_failed.inc();
                crate::warn_limited!(provider = %self.spec.name, endpoint = %format!("{}:{}", self.spec.host, self.spec.port), spans = batch.len(), error = %why, "spans dropped: the tracing provider's collector did not take them");
                health.last_error = Some(why);
            }
        }
    }

    /// Sends one batch; returns how many spans the collector said it rejected.
    async fn send(&mut self, batch: &[Arc<Span>]) -> Result<u64, String> {
        let (path, content_type, body) = match &self.spec.protocol {
            Protocol::OtlpHttp { path } => (
                path.as_str(),
                "application/x-protobuf",
                otlp::http_body(batch),
            ),
            Protocol::OtlpGrpc => (
                otlp::GRPC_EXPORT_PATH,
                "application/grpc",
                otlp::grpc_body(batch),
            ),
            Protocol::Zipkin { path } => (path.as_str(), "application/json", zipkin::body(batch)),
        };
        let authority = match self.spec.host.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => format!("[{v6}]:{}", self.spec.port),
            Err(_) => format!("{}:{}", self.spec.host, self.spec.port),
        };
        let grpc = self.spec.protocol == Protocol::OtlpGrpc;
        let mut request = Request::post(if grpc {
            format!("http://{authority}{path}")
        } else {
            path.to_string()
        })
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body))
        .map_err(|e| format!("building the request: {e}"))?;
        if grpc {
            request
                .headers_mut()
                .insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            let host = HeaderValue::try_from(authority).map_err(|e| e.to_string())?;
            request.headers_mut().insert(header::HOST, host);
        }
        let mut connection = match self.connection.take() {
            Some(c) if c.is_usable() => c,
            _ => self.connect().await?,
        };
        let response = match &mut connection {
            Connection::Http1(s) => s.send_request(request).await,
            Connection::Http2(s) => s.send_request(request).await,
        }
        .map_err(|e| format!("sending: {e}"))?;
        let status = response.status();
        let grpc_status_header = response.headers().get("grpc-status").cloned();
        let collected = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        let trailers_status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .cloned();
        let body = collected.to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(format!("the collector answered {status}: {}", text.trim()));
        }
        let rejected = match &self.spec.protocol {
            Protocol::OtlpGrpc => {
                let code = trailers_status.or(grpc_status_header);
                match code.as_ref().and_then(|v| v.to_str().ok()) {
                    Some("0") => {}
                    other => return Err(format!("gRPC status {}", other.unwrap_or("missing"))),
                }
                body.get(5..).map(otlp::rejected_spans).unwrap_or(0)
            }
            Protocol::OtlpHttp { .. } => otlp::rejected_spans(&body),
            Protocol::Zipkin { .. } => 0,
        };
        self.connection = Some(connection);
        Ok(u64::try_from(rejected.max(0)).unwrap_or(0))
    }

    async fn connect(&self) -> Result<Connection, String> {
        let addrs: Vec<_> = tokio::net::lookup_host((self.spec.host.as_str(), self.spec.port))
            .await
            .map_err(|e| format!("resolving {}: {e}", self.spec.host))?
            .collect();
        let mut last = format!("{} resolved to no address", self.spec.host);
        for addr in addrs {
            match self.connect_to(addr).await {
                Ok(tcp) => {
                    let io = TokioIo::new(tcp);
                    return if self.spec.protocol == Protocol::OtlpGrpc {
                        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                            .await
                            .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                debug!(%addr, error = %e, "connection to a tracing collector ended");
                            }
                        });
                        Ok(Connection::Http2(sender))
                    } else {
                        let (sender, conn) = http1::handshake(io)
                            .await
                            .map_err(|e| format!("HTTP/1.1 handshake with {addr}: {e}"))?;
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                debug!(%addr, error = %e, "connection to a tracing collector ended");
                            }
                        });
                        Ok(Connection::Http1(sender))
                    };
                }
                Err(e) => last = format!("connecting to {addr}: {e}"),
            }
        }
        Err(last)
    }

    /// A TCP connection carrying the agent's mark, so the connect hooks leave it alone.
    async fn connect_to(&self, addr: std::net::SocketAddr) -> std::io::Result<TcpStream> {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM,
            Some(SockProtocol::TCP),
        )?;
        socket.set_mark(self.socket_mark)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        TcpSocket::from_std_stream(socket.into())
            .connect(addr)
            .await
    }
}
