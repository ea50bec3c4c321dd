//! Outbound HBONE: HTTP/2 CONNECT over mTLS to `<destination pod IP>:15008`, presenting
//! the source workload's certificate and expecting the destination's identity.
//! Connections are pooled per (source identity, destination identity, destination
//! address) and multiplex many streams. A new connection is made with the connect
//! timeout and TCP keepalive of the DestinationRule of the tunnel that needs it
//! (`tcp.connectTimeout` bounds the TCP connect; the TLS handshake keeps the agent's
//! timeout); tunnels that find a pooled connection use it as it is.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use h2::{client::SendRequest, RecvStream, SendStream};
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::{
    capture::sockets::set_keepalive, capture::sockets::PodSockets,
    discovery::connection_pool::PoolLimits, identity::certificates::CertificateStore,
    identity::Identity, telemetry::metrics::Metrics,
};
use crate::{hbone::tls::client_config, hbone::tls::ALPN_H2, identity::spiffe::TrustBundle};

/// HTTP/2 windows large enough for one stream to fill a fast link.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum HboneError {
    #[error("no certificate for {0} yet (is the CA reachable?)")]
    NoCertificate(Identity),
    #[error("TLS setup: {0}")]
    Setup(String),
    #[error("connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("mTLS handshake with {addr} (expecting {expected}): {reason}")]
    Handshake {
        addr: SocketAddr,
        expected: Identity,
        reason: String,
    },
    #[error("HTTP/2 with {addr}: {reason}")]
    H2 { addr: SocketAddr, reason: String },
    #[error("{addr} refused the tunnel to {target}: HTTP {status}")]
    Refused {
        addr: SocketAddr,
        target: SocketAddr,
        status: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Identity,
    destination: Identity,
    addr: SocketAddr,
}

type Slot = Arc<tokio::sync::Mutex<Option<SendRequest<Bytes>>>>;

/// An open tunnel: its two halves, and the health of the connection it rides on.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub health: TunnelHealth,
}

/// Tells whether the HBONE connection under a tunnel is going away (its server sent
/// GOAWAY: that agent drains) or gone: a kept-alive HTTP connection on such a tunnel
/// takes no new request, so the draining agent sees its streams end.
#[derive(Clone)]
pub struct TunnelHealth(SendRequest<Bytes>);

impl TunnelHealth {
    pub fn going_away(&self) -> bool {
        let mut sender = self.0.clone();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(sender.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
    }
}

/// Removes `key` from the pool if it still maps to `slot`.
fn forget(pool: &Mutex<HashMap<PoolKey, Slot>>, key: &PoolKey, slot: &Slot) {
    let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
    if pool.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
        pool.remove(key);
    }
}

pub struct HboneClient {
    store: Arc<CertificateStore>,
    trust: TrustBundle,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    /// Shared with each connection's driver, which removes its slot when it ends.
    pool: Arc<Mutex<HashMap<PoolKey, Slot>>>,
}

impl HboneClient {
    pub fn new(
        store: Arc<CertificateStore>,
        trust: TrustBundle,
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
    ) -> HboneClient {
        HboneClient {
            store,
            trust,
            metrics,
            connect_timeout,
            pool: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Opens a tunnel to `target` through the HBONE port at `addr`; a new connection
    /// is made with `limits`' connect timeout (None: the agent's) and keepalive.
    pub async fn open(
        &self,
        sockets: &PodSockets,
        source: &Identity,
        destination: &Identity,
        addr: SocketAddr,
        target: SocketAddr,
        limits: &PoolLimits,
    ) -> Result<Tunnel, HboneError> {
        let key = PoolKey {
            source: source.clone(),
            destination: destination.clone(),
            addr,
        };
        // A pooled connection whose server is going away (GOAWAY: its agent handed
        // the node over, or drains) refuses new streams without processing them:
        // such a tunnel is opened once more, on a new connection.
        let mut retried = false;
        loop {
            let (sender, pooled) = self.sender(sockets, &key, limits).await?;
            match request_tunnel(sender, addr, target).await {
                Err(TunnelFailure::Unprocessed(e)) if pooled && !retried => {
                    debug!(%addr, error = %e, "pooled HBONE connection going away; opening the tunnel on a new one");
                    retried = true;
                    self.drop_pooled(&key).await;
                }
                Err(TunnelFailure::Unprocessed(e) | TunnelFailure::Failed(e)) => return Err(e),
                Ok(tunnel) => return Ok(tunnel),
            }
        }
    }

    /// A ready connection for `key`: the pooled one (true), or a new one.
    async fn sender(
        &self,
        sockets: &PodSockets,
        key: &PoolKey,
        limits: &PoolLimits,
    ) -> Result<(SendRequest<Bytes>, bool), HboneError> {
        let slot = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        // One handshake per key, however many connections start at once.
        let mut pooled = slot.lock().await;
        let ready = match pooled.take() {
            Some(sender) => sender.ready().await.ok(),
            None => None,
        };
        let (sender, reused) = match ready {
            Some(s) => (s, true),
            None => match self.handshake(sockets, key, &slot, limits).await {
                Ok(s) => (s, false),
                Err(e) => {
                    // Nothing to pool: an unreachable destination leaves no slot behind.
                    forget(&self.pool, key, &slot);
                    return Err(e);
                }
            },
        };
        *pooled = Some(sender.clone());
        Ok((sender, reused))
    }

    /// Empties `key`'s slot (its connection is going away).
    async fn drop_pooled(&self, key: &PoolKey) {
        let slot = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        if let Some(slot) = slot {
            slot.lock().await.take();
        }
    }

    async fn handshake(
        &self,
        sockets: &PodSockets,
        key: &PoolKey,
        slot: &Slot,
        limits: &PoolLimits,
    ) -> Result<SendRequest<Bytes>, HboneError> {
        let connect_timeout = limits.connect_timeout.unwrap_or(self.connect_timeout);
        let (source, destination, addr) = (&key.source, &key.destination, key.addr);
        if self
            .store
            .wait(source, Duration::from_secs(5))
            .await
            .is_none()
        {
            return Err(HboneError::NoCertificate(source.clone()));
        }
        let config = client_config(
            self.store.clone(),
            source.clone(),
            destination.clone(),
            &self.trust,
        )
        .map_err(HboneError::Setup)?;
        let tcp =
            sockets
                .connect(addr, connect_timeout)
                .await
                .map_err(|e| HboneError::Connect {
                    addr,
                    reason: e.to_string(),
                })?;
        if let Some(k) = &limits.tcp_keepalive {
            set_keepalive(&tcp, k);
        }
        let handshake_err = |reason: String| HboneError::Handshake {
            addr,
            expected: destination.clone(),
            reason,
        };
        self.metrics.hbone_handshakes.inc();
        let tls = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(config).connect(
                ServerName::IpAddress(addr.ip().into()),
                super::buffered(tcp),
            ),
        )
        .await
        .map_err(|_| handshake_err("timed out".into()))?
        .map_err(|e| handshake_err(e.to_string()))?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(handshake_err("peer did not negotiate ALPN h2".into()));
        }
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(tls)
            .await
            .map_err(|e| HboneError::H2 {
                addr,
                reason: e.to_string(),
            })?;
        let (pool, key, slot) = (Arc::downgrade(&self.pool), key.clone(), slot.clone());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%addr, error = %e, "pooled HBONE connection ended");
            }
            // Forget the slot, so pods that come and go leave nothing behind. (A slot
            // already holding a newer connection is dropped too: its streams go on,
            // and the next tunnel for this key simply handshakes again.)
            if let Some(pool) = pool.upgrade() {
                forget(&pool, &key, &slot);
            }
        });
        debug!(%addr, %source, %destination, "new HBONE connection");
        Ok(sender)
    }
}

/// Why a tunnel did not open.
enum TunnelFailure {
    /// The server did not process the stream (GOAWAY, REFUSED_STREAM): safe to retry.
    Unprocessed(HboneError),
    Failed(HboneError),
}

/// Sends the CONNECT for `target` on `sender`'s connection.
async fn request_tunnel(
    mut sender: SendRequest<Bytes>,
    addr: SocketAddr,
    target: SocketAddr,
) -> Result<Tunnel, TunnelFailure> {
    let h2_err = |e: h2::Error| {
        let unprocessed = e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM);
        let e = HboneError::H2 {
            addr,
            reason: e.to_string(),
        };
        if unprocessed {
            TunnelFailure::Unprocessed(e)
        } else {
            TunnelFailure::Failed(e)
        }
    };
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .map_err(|e| {
            TunnelFailure::Failed(HboneError::H2 {
                addr,
                reason: e.to_string(),
            })
        })?;
    let (response, send) = sender.send_request(request, false).map_err(h2_err)?;
    let response = response.await.map_err(h2_err)?;
    if response.status() != http::StatusCode::OK {
        return Err(TunnelFailure::Failed(HboneError::Refused {
            addr,
            target,
            status: response.status().as_u16(),
        }));
    }
    Ok(Tunnel {
        send,
        recv: response.into_body(),
        health: TunnelHealth(sender),
    })
}
