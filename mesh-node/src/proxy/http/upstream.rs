//! HTTP connections from one pod to backend endpoints: over HBONE when the endpoint is
//! a meshed pod, plain TCP otherwise; kept alive and reused (HTTP/1.1: one request at a
//! time per connection; HTTP/2: shared connections, see `pool`).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::{header, request::Parts, HeaderValue, Request, Response, Uri, Version};
use hyper::client::conn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::HBONE_PORT;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use crate::{
    capture::sockets::set_keepalive, discovery::cluster::ClusterState,
    discovery::connection_pool::PoolLimits, hbone::client::HboneError, hbone::client::TunnelHealth,
    hbone::io::H2Io, identity::Identity, proxy::http::driven::DrivenHttp1,
    proxy::http::driven::NotSent, proxy::http::pool::Http1Conn, proxy::http::pool::Policies,
    proxy::http::pool::Reuse, proxy::http::pool::StreamSlot, proxy::http::pooled::PooledBody,
    proxy::http::pooled::Return, proxy::http::pooled::UpstreamBody, proxy::pod::hbone_outcome,
    proxy::pod::PodContext, routing::balancer::Outcome, routing::balancer::Pick,
    routing::plan::Endpoint, routing::pool::Overflow, routing::pool::Pool,
    telemetry::connections::Security,
};
use crate::{proxy::http::ProxyBody, routing::http::filters::Filters};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

#[derive(Debug, Error)]
pub(crate) enum UpstreamError {
    #[error("{target} refused the connection: its authorization policy denies this workload")]
    Denied { target: SocketAddr },
    #[error("connecting to {target} failed: {reason}")]
    Connect { target: SocketAddr, reason: String },
    #[error("HTTP handshake with {target} failed: {source}")]
    Handshake {
        target: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to {target} failed: {source}")]
    Request {
        target: SocketAddr,
        source: hyper::Error,
    },
    /// Every HTTP/2 connection to the endpoint has `maxConcurrentStreams` in flight and
    /// the destination's `tcp.maxConnections` are open.
    #[error(transparent)]
    Overflow(Overflow),
}

impl UpstreamError {
    /// True when the request certainly never reached the backend (safe to retry
    /// whatever its method).
    pub(crate) fn before_sending(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::Handshake { .. }
        )
    }
}

/// The byte stream under an upstream HTTP connection.
enum Transport {
    Tcp(TcpStream),
    Hbone(Box<H2Io>, TunnelHealth),
}

impl Transport {
    fn health(&self) -> Option<TunnelHealth> {
        match self {
            Transport::Tcp(_) => None,
            Transport::Hbone(_, health) => Some(health.clone()),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Hbone(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Transport::Hbone(s, _) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Hbone(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Hbone(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Who answers at an endpoint, as far as the proxy can tell before connecting.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub security: Security,
    pub identity: Option<Identity>,
    /// The authorization policies of the snapshot this was judged from.
    policies: Policies,
}

/// Who answers at the planned `endpoint`, with the authorization policies of `state`
/// (the snapshot it was planned from).
pub(crate) fn peer_of(state: &ClusterState, endpoint: &Endpoint) -> Peer {
    let identity = endpoint.transport().identity().cloned();
    Peer {
        security: if identity.is_some() {
            Security::MutualTls
        } else {
            Security::None
        },
        identity,
        policies: state.authorization_policies.clone(),
    }
}

/// How one request is sent: an upgrade gets a connection of its own; the destination's
/// connection pool settings (DestinationRule) shape the connections, and its node-wide
/// pool (when it bounds anything) gives HTTP/2 connections opened under
/// `maxConcurrentStreams` their `tcp.maxConnections` slots.
#[derive(Clone, Default)]
pub(crate) struct SendOptions {
    pub upgrade: bool,
    pub limits: PoolLimits,
    pub pool: Option<Arc<Pool>>,
}

/// A response, and the HTTP/2 stream it holds under `maxConcurrentStreams` (to be held
/// until its body has ended).
pub(crate) struct Sent {
    pub response: Response<UpstreamBody>,
    pub stream: Option<StreamSlot>,
}

impl Sent {
    fn http1(response: Response<UpstreamBody>) -> Sent {
        Sent {
            response,
            stream: None,
        }
    }
}

impl SendOptions {
    fn reuse(&self) -> Reuse {
        Reuse {
            max_requests: self.limits.max_requests_per_connection,
            idle_timeout: self.limits.idle_timeout,
        }
    }
}

async fn open_transport(
    ctx: &PodContext,
    target: SocketAddr,
    peer: &Peer,
    pick: &Pick,
    limits: &PoolLimits,
) -> Result<Transport, UpstreamError> {
    match (&ctx.mesh, &peer.identity) {
        (Some(mesh), Some(destination)) => {
            let hbone_addr = SocketAddr::new(target.ip(), HBONE_PORT);
            let tunnel = mesh
                .hbone
                .open(
                    &ctx.sockets,
                    &ctx.identity,
                    destination,
                    hbone_addr,
                    target,
                    limits,
                )
                .await
                .map_err(|e| {
                    if let Some(outcome) = hbone_outcome(&e) {
                        pick.report(outcome);
                    }
                    match e {
                        HboneError::Refused { status: 403, .. } => UpstreamError::Denied { target },
                        e => UpstreamError::Connect {
                            target,
                            reason: e.to_string(),
                        },
                    }
                })?;
            Ok(Transport::Hbone(
                Box::new(H2Io::new(tunnel.send, tunnel.recv)),
                tunnel.health,
            ))
        }
        _ => {
            let timeout = limits.connect_timeout.unwrap_or(ctx.connect_timeout);
            let tcp = ctx.sockets.connect(target, timeout).await.map_err(|e| {
                pick.report(Outcome::ConnectFailed);
                UpstreamError::Connect {
                    target,
                    reason: e.to_string(),
                }
            })?;
            if let Some(k) = &limits.tcp_keepalive {
                set_keepalive(&tcp, k);
            }
            Ok(Transport::Tcp(tcp))
        }
    }
}

/// Reports a new connection's HTTP handshake: connected (with the time since
/// `started`), or failed to connect.
fn handshaken<T>(
    result: Result<T, hyper::Error>,
    target: SocketAddr,
    pick: &Pick,
    started: Instant,
) -> Result<T, UpstreamError> {
    match result {
        Ok(t) => {
            pick.report(Outcome::Connected {
                latency: started.elapsed(),
            });
            Ok(t)
        }
        Err(source) => {
            pick.report(Outcome::ConnectFailed);
            Err(UpstreamError::Handshake { target, source })
        }
    }
}

/// A new HTTP/1.1 connection to `target`: driven by its user, or, for an upgrade, with
/// a task of its own (the upgraded connection outlives the exchange).
async fn new_http1(
    ctx: &PodContext,
    target: SocketAddr,
    peer: &Peer,
    pick: &Pick,
    limits: &PoolLimits,
    upgrade: bool,
) -> Result<(NewHttp1, Option<TunnelHealth>), UpstreamError> {
    let started = Instant::now();
    let transport = open_transport(ctx, target, peer, pick, limits).await?;
    let health = transport.health();
    let io = TokioIo::new(transport);
    let (sender, connection) = handshaken(conn::http1::handshake(io).await, target, pick, started)?;
    if !upgrade {
        return Ok((
            NewHttp1::Driven(DrivenHttp1::new(sender, connection)),
            health,
        ));
    }
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(%target, error = %e, "upstream HTTP/1.1 connection ended");
        }
    });
    Ok((NewHttp1::Spawned(sender), health))
}

enum NewHttp1 {
    Driven(DrivenHttp1),
    Spawned(conn::http1::SendRequest<ProxyBody>),
}

/// A stream to `target` on a shared HTTP/2 connection with room for it, or on a new
/// one. Under `maxConcurrentStreams`, each connection opened holds a slot of the
/// destination's `tcp.maxConnections` while it is open; none free is an overflow.
async fn http2(
    ctx: &PodContext,
    target: SocketAddr,
    peer: &Peer,
    policies: &Policies,
    pick: &Pick,
    opts: &SendOptions,
) -> Result<(conn::http2::SendRequest<ProxyBody>, Option<StreamSlot>), UpstreamError> {
    let limits = &opts.limits;
    let limit = limits.max_concurrent_streams;
    if let Some(found) = ctx.http_upstreams.http2_stream(target, policies, limit) {
        return Ok(found);
    }
    let slot = match (&opts.pool, limit) {
        (Some(pool), Some(_)) => Some(pool.connection().map_err(UpstreamError::Overflow)?),
        _ => None,
    };
    ctx.http_upstreams.prune();
    let started = Instant::now();
    let transport = open_transport(ctx, target, peer, pick, limits).await?;
    let health = transport.health();
    let io = TokioIo::new(transport);
    let (sender, connection) = handshaken(
        conn::http2::handshake(TokioExecutor::new(), io).await,
        target,
        pick,
        started,
    )?;
    tokio::spawn(async move {
        // The connection's place in the pool, given back when it closes.
        let _slot = slot;
        if let Err(e) = connection.await {
            debug!(%target, error = %e, "upstream HTTP/2 connection ended");
        }
    });
    let stream =
        ctx.http_upstreams
            .share_http2(target, sender.clone(), health, policies.clone(), limit);
    Ok((sender, stream))
}

/// Sends `request` to `target`, reusing a connection when one is free. A request a
/// reused connection could not take (the backend closed it meanwhile) goes out once
/// more on a new connection. Upgrade requests always get their own connection. A new
/// connection's outcome (connected or not) is reported to `pick`. An HTTP/1.1
/// connection that has carried `maxRequestsPerConnection` requests is closed; an
/// HTTP/2 request under `maxConcurrentStreams` holds its stream in what it returns.
pub(crate) async fn send(
    ctx: &PodContext,
    target: SocketAddr,
    peer: &Peer,
    protocol: Protocol,
    request: Request<ProxyBody>,
    opts: SendOptions,
    pick: &Pick,
) -> Result<Sent, UpstreamError> {
    let failed = |source| UpstreamError::Request { target, source };
    let policies = peer.policies.clone();
    if protocol == Protocol::Http2 {
        let (mut sender, stream) = http2(ctx, target, peer, &policies, pick, &opts).await?;
        let response = sender.send_request(request).await.map_err(failed)?;
        return Ok(Sent {
            response: response.map(UpstreamBody::Spawned),
            stream,
        });
    }
    let back = |conn| {
        let to = Return {
            pool: Arc::downgrade(&ctx.http_upstreams),
            target,
            policies: policies.clone(),
            reuse: opts.reuse(),
        };
        move |body| UpstreamBody::Pooled(PooledBody::new(body, conn, to))
    };
    let mut request = request;
    if !opts.upgrade {
        while let Some(mut conn) = ctx.http_upstreams.idle_http1(target, &policies) {
            match conn.conn.try_send(request).await {
                Ok(response) => {
                    conn.served = conn.served.saturating_add(1);
                    return Ok(Sent::http1(response.map(back(conn))));
                }
                Err(NotSent::Unsent(unsent)) => request = *unsent,
                Err(NotSent::Failed(e)) => return Err(failed(e)),
            }
        }
    }
    ctx.http_upstreams.prune();
    let (new, transport) = new_http1(ctx, target, peer, pick, &opts.limits, opts.upgrade).await?;
    match new {
        NewHttp1::Spawned(mut sender) => {
            let response = sender.send_request(request).await.map_err(failed)?;
            Ok(Sent::http1(response.map(UpstreamBody::Spawned)))
        }
        NewHttp1::Driven(mut conn) => {
            let response = conn.send(request).await.map_err(failed)?;
            let conn = Http1Conn {
                conn,
                served: 1,
                transport,
            };
            Ok(Sent::http1(response.map(back(conn))))
        }
    }
}

/// The request as a backend receives it (one attempt, or a mirrored copy): `authority`
/// is the HTTP/2 URI's, and the HTTP/1.1 `Host` when the request has none.
pub(crate) fn upstream_request(
    parts: &Parts,
    body: ProxyBody,
    protocol: Protocol,
    backend_filters: &Filters,
    authority: &str,
) -> Result<Request<ProxyBody>, String> {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut headers = parts.headers.clone();
    backend_filters.apply_backend_request(&mut headers);
    let (uri, version) = match protocol {
        Protocol::Http1 => {
            if !headers.contains_key(header::HOST) && !authority.is_empty() {
                let host = HeaderValue::try_from(authority).map_err(|_| "bad authority")?;
                headers.insert(header::HOST, host);
            }
            (
                path.parse::<Uri>().map_err(|e| e.to_string())?,
                Version::HTTP_11,
            )
        }
        Protocol::Http2 => {
            headers.remove(header::HOST);
            let uri = format!("http://{authority}{path}");
            (
                uri.parse::<Uri>().map_err(|e| format!("`{uri}`: {e}"))?,
                Version::HTTP_2,
            )
        }
    };
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(request)
}
