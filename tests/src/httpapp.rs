//! The HTTP side of the test app: an echo server that reports what it received (as the
//! Gateway API conformance echo server does) and can be told to be slow or to fail,
//! and clients (HTTP/1.1 keep-alive, HTTP/2 prior knowledge, a WebSocket upgrade).

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, client::conn, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use sha1::{Digest, Sha1};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::report::{HttpReport, HttpSample, WebsocketReport};

const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` answer to a `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn websocket_accept(key: &str) -> String {
    let digest = Sha1::digest(format!("{key}{WEBSOCKET_GUID}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("cannot start a tokio runtime: {e}");
            std::process::exit(2)
        })
}

/// Attempts seen per `x-request-id`, for `x-fail-attempts`.
type Attempts = Arc<Mutex<HashMap<String, u32>>>;
/// Requests served, by their host (authority): `GET /__seen` answers them as JSON
/// (`{"hosts": {"web:80": 3}}`) and is not counted itself.
type Seen = Arc<Mutex<BTreeMap<String, u64>>>;

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn echo(
    request: Request<Incoming>,
    peer: SocketAddr,
    pod: Arc<String>,
    attempts: Attempts,
    seen: Seen,
    always: Arc<Behaviour>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    {
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        if request.uri().path() == "/__seen" {
            let report = serde_json::json!({ "pod": *pod, "hosts": *seen });
            let mut r = text(StatusCode::OK, report.to_string());
            r.headers_mut().insert("x-served-by", header_value(&pod));
            return Ok(r);
        }
        *seen.entry(host).or_insert(0) += 1;
    }
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
        .collect();
    if let Some(delay) = always.delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(path) = &always.file {
        let mut r = match std::fs::read(path) {
            Ok(bytes) => {
                let mut r = Response::new(Full::new(Bytes::from(bytes)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(e) => text(StatusCode::NOT_FOUND, format!("{}: {e}\n", path.display())),
        };
        r.headers_mut().insert("x-served-by", header_value(&pod));
        return Ok(r);
    }
    if let Some(forward) = &always.forward {
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let mut r = match call_upstream(forward, &path, request.headers()).await {
            Ok((status, body)) => {
                let upstream: serde_json::Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body).into());
                let report = serde_json::json!({ "pod": *pod, "upstream": upstream });
                text(status, report.to_string())
            }
            Err(e) => text(StatusCode::BAD_GATEWAY, format!("{pod}: {e}\n")),
        };
        r.headers_mut().insert("x-served-by", header_value(&pod));
        return Ok(r);
    }
    if let Some(status) = always.status.and_then(|s| StatusCode::from_u16(s).ok()) {
        let mut r = text(status, format!("{pod} always answers {status}\n"));
        r.headers_mut().insert("x-served-by", header_value(&pod));
        return Ok(r);
    }
    if let Some(key) = request.headers().get("sec-websocket-key").cloned() {
        return Ok(websocket_upgrade(request, &key, pod));
    }
    if let Some(ms) = query.get("delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let fail = request
        .headers()
        .get("x-fail-attempts")
        .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
    if let (Some(fail), Some(id)) = (fail, request.headers().get("x-request-id")) {
        let id = id.to_str().unwrap_or("").to_string();
        let seen = {
            let mut a = attempts.lock().unwrap_or_else(|p| p.into_inner());
            let n = a.entry(id).or_insert(0);
            *n += 1;
            *n
        };
        if seen <= fail {
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("attempt {seen} fails on purpose\n"),
            );
            r.headers_mut().insert("x-served-by", header_value(&pod));
            return Ok(r);
        }
    }
    let status = query
        .get("status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let (parts, body) = request.into_parts();
    let body_bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let v = value.to_str().unwrap_or("<binary>");
        headers
            .entry(name.as_str().to_string())
            .and_modify(|e| {
                e.push(',');
                e.push_str(v);
            })
            .or_insert_with(|| v.to_string());
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let report = serde_json::json!({
        "pod": *pod,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": host,
        "proto": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
        // Who the connection came from, as the server's socket sees it.
        "peer": SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string(),
    });
    let mut r = text(status, report.to_string());
    r.headers_mut().insert("x-served-by", header_value(&pod));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::try_from(s).unwrap_or(HeaderValue::from_static("invalid"))
}

/// Accepts the upgrade, then echoes raw bytes on the upgraded connection.
fn websocket_upgrade(
    mut request: Request<Incoming>,
    key: &HeaderValue,
    pod: Arc<String>,
) -> Response<Full<Bytes>> {
    let accept = websocket_accept(key.to_str().unwrap_or(""));
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let mut io = TokioIo::new(upgraded);
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert("sec-websocket-accept", header_value(&accept));
    h.insert("x-served-by", header_value(&pod));
    r
}

/// How the echo server treats every request (a broken or slow endpoint).
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Answer every request with this status.
    pub status: Option<u16>,
    /// Wait this long before every answer.
    pub delay: Option<Duration>,
    /// Answer every request with this file's contents (read at each request).
    pub file: Option<std::path::PathBuf>,
    /// Serve every request by calling this upstream, passing the trace context on
    /// (an application in the middle of a call chain).
    pub forward: Option<Forward>,
}

/// An upstream the server calls for every request: `http://<host><path>` at `to`.
#[derive(Debug, Clone)]
pub struct Forward {
    pub to: SocketAddr,
    pub host: String,
}

/// The headers an instrumented application passes on to the calls it makes.
const PROPAGATED: [&str; 3] = ["traceparent", "tracestate", "x-request-id"];

/// One GET to the upstream with the request's trace context: its status and body.
async fn call_upstream(
    forward: &Forward,
    path: &str,
    incoming: &http::HeaderMap,
) -> Result<(StatusCode, Bytes), String> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(forward.to))
        .await
        .map_err(|_| format!("connecting to {} timed out", forward.to))?
        .map_err(|e| format!("connecting to {}: {e}", forward.to))?;
    let (mut sender, connection) = conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = Request::get(path)
        .header(header::HOST, forward.host.as_str())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    for name in PROPAGATED {
        if let Some(v) = incoming.get(name) {
            request.headers_mut().insert(name, v.clone());
        }
    }
    let call = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| "the upstream did not answer within 10 s".to_string())?
}

/// Serves HTTP/1.1 and HTTP/2 prior knowledge on every address; prints `ready`.
pub fn serve(listen: Vec<SocketAddr>, pod: String, always: Behaviour) -> ! {
    let rt = runtime();
    let always = Arc::new(always);
    rt.block_on(async move {
        let pod = Arc::new(pod);
        let attempts: Attempts = Arc::default();
        let seen: Seen = Arc::default();
        let mut listeners = Vec::new();
        for addr in &listen {
            match bind(*addr) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    eprintln!("cannot listen on {addr}: {e}");
                    std::process::exit(1);
                }
            }
        }
        println!("ready");
        let mut tasks = Vec::new();
        for listener in listeners {
            let (pod, attempts, seen) = (pod.clone(), attempts.clone(), seen.clone());
            let always = always.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((stream, peer)) = listener.accept().await {
                    let (pod, attempts, seen) = (pod.clone(), attempts.clone(), seen.clone());
                    let always = always.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |r| {
                            let (pod, attempts, seen) =
                                (pod.clone(), attempts.clone(), seen.clone());
                            echo(r, peer, pod, attempts, seen, always.clone())
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    std::process::exit(1)
}

/// Binds like most servers: `[::]` takes IPv4 and IPv6.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// What the client sends.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub connect: SocketAddr,
    pub path: String,
    pub host: String,
    pub method: Method,
    pub headers: Vec<(String, String)>,
    pub count: u64,
    pub http2: bool,
    /// Give each request its own `x-request-id` (`<prefix>-<n>`).
    pub request_ids: Option<String>,
    pub body_bytes: usize,
    pub timeout: Duration,
}

enum Sender {
    Http1(conn::http1::SendRequest<Full<Bytes>>),
    Http2(conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(opts: &ClientOptions) -> Result<Sender, String> {
    let stream = TcpStream::connect(opts.connect)
        .await
        .map_err(|e| format!("connect {}: {e}", opts.connect))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if opts.http2 {
        let (sender, connection) = conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(connection);
        Ok(Sender::Http2(sender))
    } else {
        let (sender, connection) = conn::http1::handshake(io)
            .await
            .map_err(|e| format!("http1 handshake: {e}"))?;
        tokio::spawn(connection);
        Ok(Sender::Http1(sender))
    }
}

fn build(opts: &ClientOptions, n: u64) -> Result<Request<Full<Bytes>>, String> {
    let uri = if opts.http2 {
        format!("http://{}{}", opts.host, opts.path)
    } else {
        opts.path.clone()
    };
    let mut b = Request::builder().method(opts.method.clone()).uri(uri);
    if !opts.http2 {
        b = b.header(header::HOST, &opts.host);
    }
    for (k, v) in &opts.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    if let Some(prefix) = &opts.request_ids {
        b = b.header("x-request-id", format!("{prefix}-{n}"));
    }
    b.body(Full::new(Bytes::from(vec![b'x'; opts.body_bytes])))
        .map_err(|e| e.to_string())
}

async fn one(sender: &mut Sender, request: Request<Full<Bytes>>) -> Result<HttpSample, String> {
    let response = match sender {
        Sender::Http1(s) => {
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(request).await
        }
        Sender::Http2(s) => {
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(request).await
        }
    }
    .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(HttpSample {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Sends `count` requests one after another on one kept-alive connection
/// (reconnecting if the server closes it) and summarizes the answers.
pub fn client(opts: ClientOptions) -> HttpReport {
    runtime().block_on(async move {
        let started = Instant::now();
        let mut report = HttpReport::default();
        let mut sender = None;
        let mut latencies = Vec::with_capacity(opts.count as usize);
        for n in 0..opts.count {
            if sender.is_none() {
                match connect(&opts).await {
                    Ok(s) => sender = Some(s),
                    Err(e) => {
                        report.errors += 1;
                        report.first_error.get_or_insert(e);
                        continue;
                    }
                }
            }
            let Some(s) = sender.as_mut() else { continue };
            let t = Instant::now();
            let outcome = match build(&opts, n) {
                Ok(req) => tokio::time::timeout(opts.timeout, one(s, req))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into())),
                Err(e) => Err(e),
            };
            report.requests += 1;
            match outcome {
                Ok(sample) => {
                    latencies.push(t.elapsed().as_micros() as u64);
                    *report.statuses.entry(sample.status).or_insert(0) += 1;
                    let pod = sample
                        .headers
                        .get("x-served-by")
                        .cloned()
                        .unwrap_or_else(|| "-".into());
                    *report.pods.entry(pod).or_insert(0) += 1;
                    let echoed = serde_json::from_str::<serde_json::Value>(&sample.body).ok();
                    if let Some(peer) = echoed.as_ref().and_then(|b| b["peer"].as_str()) {
                        *report.peers.entry(peer.to_string()).or_insert(0) += 1;
                    }
                    if report.samples.len() < 3 {
                        report.samples.push(sample);
                    }
                }
                Err(e) => {
                    report.errors += 1;
                    report.first_error.get_or_insert(e);
                    sender = None;
                }
            }
        }
        latencies.sort_unstable();
        report.p50_us = percentile(&latencies, 0.5);
        report.p99_us = percentile(&latencies, 0.99);
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        report
    })
}

/// Upgrades to WebSocket at `path`, checks the accept key, then sends `message` and
/// expects it echoed.
pub fn websocket(connect_to: SocketAddr, host: &str, path: &str, message: &str) -> WebsocketReport {
    let key = base64::engine::general_purpose::STANDARD.encode(b"nodemesh-test-key");
    let expected = websocket_accept(&key);
    runtime().block_on(async move {
        let mut report = WebsocketReport::default();
        let result: Result<(), String> = async {
            let mut stream = TcpStream::connect(connect_to).await.map_err(|e| e.to_string())?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut byte).await.map_err(|e| e.to_string())?;
                if n == 0 || head.len() > 16 * 1024 {
                    return Err("connection closed before the upgrade answer".into());
                }
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            report.status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            report.accept_ok = head.lines().any(|l| {
                l.to_ascii_lowercase().starts_with("sec-websocket-accept:")
                    && l.split_once(':').map(|(_, v)| v.trim()) == Some(expected.as_str())
            });
            stream.write_all(message.as_bytes()).await.map_err(|e| e.to_string())?;
            let mut echoed = vec![0u8; message.len()];
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
                .await
                .map_err(|_| "no echo within 5 s".to_string())?
                .map_err(|e| e.to_string())?;
            report.echoed = String::from_utf8_lossy(&echoed).into_owned();
            Ok(())
        }
        .await;
        report.error = result.err();
        report
    })
}
