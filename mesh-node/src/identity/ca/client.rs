//! The agent's side of the CA: POST a CSR over HTTPS with the node's token.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{
    identity::ca::protocol::ErrorResponse, identity::ca::protocol::SignRequest,
    identity::ca::protocol::SignResponse, identity::ca::protocol::SIGN_PATH,
};
use crate::{identity::pem, identity::Identity};

#[derive(Debug, Error)]
pub enum CaClientError {
    #[error("CA client setup: {0}")]
    Setup(String),
    #[error("cannot reach the CA at {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("the CA refused ({status}): {error}")]
    Refused { status: u16, error: String },
    #[error("the CA answered something unexpected: {0}")]
    Protocol(String),
    #[error("cannot read the CA token {path}: {source} (it is the agent's projected service-account token; check the DaemonSet's ca-token volume)")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the agent shows the CA.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A fixed token (the embedded mode's per-node token).
    Token(String),
    /// A token file read afresh for every request: a projected service-account token,
    /// which the kubelet replaces before it expires.
    TokenFile(PathBuf),
}

impl From<&str> for Credential {
    fn from(token: &str) -> Credential {
        Credential::Token(token.trim().to_string())
    }
}

impl From<&String> for Credential {
    fn from(token: &String) -> Credential {
        Credential::from(token.as_str())
    }
}

impl Credential {
    async fn token(&self) -> Result<String, CaClientError> {
        match self {
            Credential::Token(t) => Ok(t.clone()),
            Credential::TokenFile(path) => tokio::fs::read_to_string(path)
                .await
                .map(|t| t.trim().to_string())
                .map_err(|source| CaClientError::Token {
                    path: path.clone(),
                    source,
                }),
        }
    }
}

pub struct CaClient {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    credential: Credential,
    timeout: Duration,
}

impl CaClient {
    /// `server_name` defaults to the address's IP (the CA certificate must name it).
    pub fn new(
        addr: SocketAddr,
        server_name: Option<&str>,
        root_pem: &str,
        credential: impl Into<Credential>,
    ) -> Result<CaClient, CaClientError> {
        let server_name = match server_name {
            Some(n) => ServerName::try_from(n.to_string())
                .map_err(|e| CaClientError::Setup(format!("server name `{n}`: {e}")))?,
            None => ServerName::IpAddress(addr.ip().into()),
        };
        Ok(CaClient {
            addr,
            server_name,
            tls: TlsConnector::from(pem::client_config(root_pem).map_err(CaClientError::Setup)?),
            credential: credential.into(),
            timeout: Duration::from_secs(10),
        })
    }

    /// Asks for a certificate for `identity`; returns (certificate PEM, root PEM).
    pub async fn sign(
        &self,
        identity: &Identity,
        csr: &str,
    ) -> Result<(String, String), CaClientError> {
        let unreachable = |reason: String| CaClientError::Unreachable {
            addr: self.addr,
            reason,
        };
        let body = serde_json::to_vec(&SignRequest {
            identity: identity.to_string(),
            csr: csr.to_string(),
        })
        .map_err(|e| CaClientError::Protocol(e.to_string()))?;
        let token = self.credential.token().await?;
        let exchange = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let tls = self
                .tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| unreachable(format!("TLS: {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(conn);
            let req = Request::builder()
                .method(Method::POST)
                .uri(SIGN_PATH)
                .header(hyper::header::HOST, self.addr.to_string())
                .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| CaClientError::Protocol(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            if status != StatusCode::OK {
                let error = serde_json::from_slice::<ErrorResponse>(&bytes)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
                return Err(CaClientError::Refused {
                    status: status.as_u16(),
                    error,
                });
            }
            let r: SignResponse = serde_json::from_slice(&bytes)
                .map_err(|e| CaClientError::Protocol(e.to_string()))?;
            Ok((r.certificate, r.root))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
    }
}

/// Shared handle.
pub type SharedCaClient = Arc<CaClient>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_file_is_read_again_for_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let credential = Credential::TokenFile(path.clone());
        assert_eq!(credential.token().await.unwrap(), "first-token");
        std::fs::write(&path, "renewed-token").unwrap();
        assert_eq!(credential.token().await.unwrap(), "renewed-token");
        std::fs::remove_file(&path).unwrap();
        let err = credential.token().await.unwrap_err().to_string();
        assert!(err.contains("projected service-account token"), "{err}");
    }
}
