//! HTTP connections from one pod to backend endpoints: over HBONE when the endpoint is
//! a meshed pod, plain TCP otherwise; kept alive and reused (HTTP/1.1: one request at a
//! time per connection; HTTP/2: one shared connection per endpoint).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
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
    discovery::cluster::ClusterState, hbone::client::HboneError, hbone::io::H2Io,
    identity::Identity, proxy::http::pool::Policies, proxy::pod::PodContext,
    routing::transport::meshed_identity, telemetry::connections::Security,
};

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
        .and_then(|mesh| meshed_identity(state, &mesh.trust_domain, target.ip()));
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
    ctx: &PodContext,
    target: SocketAddr,
    peer: &Peer,
    policies: &Policies,
) -> Result<conn::http2::SendRequest<ProxyBody>, UpstreamError> {
    if let Some(sender) = ctx.http_upstreams.shared_http2(target, policies) {
        return Ok(sender);
    }
    ctx.http_upstreams.prune();
    let io = TokioIo::new(open_transport(ctx, target, peer).await?);
    let (sender, connection) = conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .map_err(|source| UpstreamError::Handshake { target, source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(%target, error = %e, "upstream HTTP/2 connection ended");
        }
    });
    ctx.http_upstreams
        .share_http2(target, sender.clone(), policies.clone());
    Ok(sender)
}

/// Sends `request` to `target`, reusing a connection when one is free. A request a
/// reused connection could not take (the backend closed it meanwhile) goes out once
/// more on a new connection. Upgrade requests always get their own connection.
pub async fn send(
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
        let mut sender = http2(ctx, target, peer, &policies).await?;
        return sender.send_request(request).await.map_err(failed);
    }
    let mut request = request;
    if !upgrade {
        while let Some(mut sender) = ctx.http_upstreams.idle_http1(target, &policies) {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    ctx.http_upstreams.release_http1(target, sender, policies);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(failed(e.into_error())),
                },
            }
        }
    }
    ctx.http_upstreams.prune();
    let mut sender = new_http1(ctx, target, peer).await?;
    let response = sender.send_request(request).await.map_err(failed)?;
    if !upgrade {
        ctx.http_upstreams.release_http1(target, sender, policies);
    }
    Ok(response)
}
