//! HTTP connections from one pod to backend endpoints: over HBONE when the endpoint is
//! a meshed pod, plain TCP otherwise; kept alive and reused (HTTP/1.1: one request at a
//! time per connection; HTTP/2: one shared connection per endpoint).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Request, Response};
use hyper::{body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::HBONE_PORT;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use crate::proxy::http::ProxyBody;
use crate::{
    discovery::cluster::ClusterState, discovery::cluster::Objects,
    discovery::policy::AuthorizationPolicy, hbone::client::HboneError, hbone::io::H2Io,
    identity::Identity, proxy::outbound::meshed_identity, proxy::pod::PodContext,
    telemetry::connections::Security,
};

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 32;
/// An idle connection older than this is closed rather than reused.
const IDLE_EXPIRY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

#[derive(Debug, Error)]
pub enum UpstreamError {
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
}

impl UpstreamError {
    /// True when the request certainly never reached the backend (safe to retry
    /// whatever its method).
    pub fn before_sending(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::Handshake { .. }
        )
    }
}

/// The byte stream under an upstream HTTP connection.
enum Transport {
    Tcp(TcpStream),
    Hbone(Box<H2Io>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Hbone(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
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
            Transport::Hbone(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Hbone(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Hbone(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Who answers at an endpoint, as far as the proxy can tell before connecting.
#[derive(Debug, Clone)]
pub struct Peer {
    pub security: Security,
    pub identity: Option<Identity>,
    /// The authorization policies of the snapshot this was judged from.
    policies: Policies,
}

/// The security the connection to `target` will have, judged from `state`.
pub fn peer_of(ctx: &PodContext, state: &ClusterState, target: SocketAddr) -> Peer {
    let identity = ctx
        .mesh
        .as_ref()
        .and_then(|mesh| meshed_identity(state, mesh, target.ip()));
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

async fn open_transport(
    ctx: &PodContext,
    target: SocketAddr,
    peer: &Peer,
) -> Result<Transport, UpstreamError> {
    let failed = |reason: String| UpstreamError::Connect { target, reason };
    match (&ctx.mesh, &peer.identity) {
        (Some(mesh), Some(destination)) => {
            let hbone_addr = SocketAddr::new(target.ip(), HBONE_PORT);
            let (send, recv) = mesh
                .hbone
                .open(&ctx.sockets, &ctx.identity, destination, hbone_addr, target)
                .await
                .map_err(|e| match e {
                    HboneError::Refused { status: 403, .. } => UpstreamError::Denied { target },
                    e => failed(e.to_string()),
                })?;
            Ok(Transport::Hbone(Box::new(H2Io::new(send, recv))))
        }
        _ => {
            let tcp = ctx
                .sockets
                .connect(target, ctx.connect_timeout)
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(Transport::Tcp(tcp))
        }
    }
}

/// The authorization policies a connection was admitted under. The destination
/// checks policy when a tunnel opens, so a kept-alive connection is reused only while
/// the policies are the ones it was opened with: tightening a policy reaches new
/// requests at once, not when pooled connections happen to close.
type Policies = Objects<AuthorizationPolicy>;

fn same(a: &Policies, b: &Policies) -> bool {
    Arc::ptr_eq(a, b)
}

struct IdleHttp1 {
    sender: conn::http1::SendRequest<ProxyBody>,
    since: Instant,
    policies: Policies,
}

/// One pod's reusable connections to backend endpoints.
#[derive(Default)]
pub struct UpstreamPool {
    http1: Mutex<HashMap<SocketAddr, Vec<IdleHttp1>>>,
    http2: Mutex<HashMap<SocketAddr, (conn::http2::SendRequest<ProxyBody>, Policies)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UpstreamPool {
    fn idle_http1(
        &self,
        target: SocketAddr,
        policies: &Policies,
    ) -> Option<conn::http1::SendRequest<ProxyBody>> {
        let mut pool = lock(&self.http1);
        let list = pool.get_mut(&target)?;
        list.retain(|c| {
            !c.sender.is_closed() && c.since.elapsed() < IDLE_EXPIRY && same(&c.policies, policies)
        });
        let ready = list.iter().position(|c| c.sender.is_ready())?;
        Some(list.swap_remove(ready).sender)
    }

    /// Puts a connection back once its response is under way: it turns ready again
    /// when that response has ended.
    fn release_http1(
        &self,
        target: SocketAddr,
        sender: conn::http1::SendRequest<ProxyBody>,
        policies: Policies,
    ) {
        let mut pool = lock(&self.http1);
        let list = pool.entry(target).or_default();
        list.retain(|c| !c.sender.is_closed());
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(IdleHttp1 {
                sender,
                since: Instant::now(),
                policies,
            });
        }
    }

    /// Forgets connections that closed, and endpoints left with none (pods come and go).
    fn prune(&self) {
        lock(&self.http1).retain(|_, list| {
            list.retain(|c| !c.sender.is_closed() && c.since.elapsed() < IDLE_EXPIRY);
            !list.is_empty()
        });
        lock(&self.http2).retain(|_, (s, _)| !s.is_closed());
    }

    async fn new_http1(
        ctx: &PodContext,
        target: SocketAddr,
        peer: &Peer,
    ) -> Result<conn::http1::SendRequest<ProxyBody>, UpstreamError> {
        let io = TokioIo::new(open_transport(ctx, target, peer).await?);
        let (sender, connection) = conn::http1::handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake { target, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                debug!(%target, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn http2(
        &self,
        ctx: &PodContext,
        target: SocketAddr,
        peer: &Peer,
        policies: &Policies,
    ) -> Result<conn::http2::SendRequest<ProxyBody>, UpstreamError> {
        if let Some((s, admitted)) = lock(&self.http2).get(&target) {
            if !s.is_closed() && same(admitted, policies) {
                return Ok(s.clone());
            }
        }
        self.prune();
        let io = TokioIo::new(open_transport(ctx, target, peer).await?);
        let (sender, connection) = conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|source| UpstreamError::Handshake { target, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%target, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        lock(&self.http2).insert(target, (sender.clone(), policies.clone()));
        Ok(sender)
    }

    /// Sends `request` to `target`, reusing a connection when one is free. A request a
    /// reused connection could not take (the backend closed it meanwhile) goes out once
    /// more on a new connection. Upgrade requests always get their own connection.
    pub async fn send(
        &self,
        ctx: &PodContext,
        target: SocketAddr,
        peer: &Peer,
        protocol: Protocol,
        request: Request<ProxyBody>,
        upgrade: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let failed = |source| UpstreamError::Request { target, source };
        let policies = peer.policies.clone();
        if protocol == Protocol::Http2 {
            let mut sender = self.http2(ctx, target, peer, &policies).await?;
            return sender.send_request(request).await.map_err(failed);
        }
        let mut request = request;
        if !upgrade {
            while let Some(mut sender) = self.idle_http1(target, &policies) {
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        self.release_http1(target, sender, policies);
                        return Ok(response);
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => request = unsent,
                        None => return Err(failed(e.into_error())),
                    },
                }
            }
        }
        self.prune();
        let mut sender = Self::new_http1(ctx, target, peer).await?;
        let response = sender.send_request(request).await.map_err(failed)?;
        if !upgrade {
            self.release_http1(target, sender, policies);
        }
        Ok(response)
    }
}
