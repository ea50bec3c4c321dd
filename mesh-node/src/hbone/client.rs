//! Outbound HBONE: HTTP/2 CONNECT over mTLS to `<destination pod IP>:15008`, presenting
//! the source workload's certificate and expecting the destination's identity.
//! Connections are pooled per (source identity, destination identity, destination
//! address) and multiplex many streams.

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

use super::tls::{client_config, TrustBundle, ALPN_H2};
use crate::{
    certificates::CertificateStore, identity::Identity, metrics::Metrics, sockets::PodSockets,
};

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

pub struct HboneClient {
    store: Arc<CertificateStore>,
    trust: TrustBundle,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    pool: Mutex<HashMap<PoolKey, Slot>>,
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
            pool: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a tunnel to `target` through the HBONE port at `addr`.
    pub async fn open(
        &self,
        sockets: &PodSockets,
        source: &Identity,
        destination: &Identity,
        addr: SocketAddr,
        target: SocketAddr,
    ) -> Result<(SendStream<Bytes>, RecvStream), HboneError> {
        let key = PoolKey {
            source: source.clone(),
            destination: destination.clone(),
            addr,
        };
        let slot = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        // One handshake per key, however many connections start at once.
        let mut pooled = slot.lock().await;
        let ready = match pooled.take() {
            Some(sender) => sender.ready().await.ok(),
            None => None,
        };
        let sender = match ready {
            Some(s) => s,
            None => self.handshake(sockets, source, destination, addr).await?,
        };
        *pooled = Some(sender.clone());
        drop(pooled);

        let h2_err = |e: h2::Error| HboneError::H2 {
            addr,
            reason: e.to_string(),
        };
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .map_err(|e| HboneError::H2 {
                addr,
                reason: e.to_string(),
            })?;
        let mut sender = sender;
        let (response, send) = sender.send_request(request, false).map_err(h2_err)?;
        let response = response.await.map_err(h2_err)?;
        if response.status() != http::StatusCode::OK {
            return Err(HboneError::Refused {
                addr,
                target,
                status: response.status().as_u16(),
            });
        }
        Ok((send, response.into_body()))
    }

    async fn handshake(
        &self,
        sockets: &PodSockets,
        source: &Identity,
        destination: &Identity,
        addr: SocketAddr,
    ) -> Result<SendRequest<Bytes>, HboneError> {
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
        let tcp = sockets
            .connect(addr, self.connect_timeout)
            .await
            .map_err(|e| HboneError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let handshake_err = |reason: String| HboneError::Handshake {
            addr,
            expected: destination.clone(),
            reason,
        };
        self.metrics.hbone_handshakes.inc();
        let tls = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(config).connect(ServerName::IpAddress(addr.ip().into()), tcp),
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
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%addr, error = %e, "pooled HBONE connection ended");
            }
        });
        debug!(%addr, %source, %destination, "new HBONE connection");
        Ok(sender)
    }
}
