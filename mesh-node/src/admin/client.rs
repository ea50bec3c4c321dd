//! A minimal HTTP/1.1 client for the admin API (used by meshctl), over a TCP
//! connection or any other byte stream (a Kubernetes port-forward).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

#[derive(Debug, Error)]
pub enum AdminClientError {
    #[error("cannot reach the mesh-node admin API at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("the admin API at {addr} answered {status}: {body}")]
    Status {
        addr: String,
        status: u16,
        body: String,
    },
}

/// One request on an established stream to the admin API; `addr` names it in errors.
pub async fn exchange<S>(
    stream: S,
    addr: &str,
    method: Method,
    path_and_query: &str,
) -> Result<String, AdminClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let unreachable = |reason: String| AdminClientError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .map_err(|e| unreachable(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status >= 400 {
        return Err(AdminClientError::Status {
            addr: addr.to_string(),
            status,
            body,
        });
    }
    Ok(body)
}

/// One request to the admin API at `addr`, all within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    timeout: Duration,
) -> Result<String, AdminClientError> {
    let name = addr.to_string();
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| AdminClientError::Unreachable {
                addr: name.clone(),
                reason: e.to_string(),
            })?;
        exchange(stream, &name, method, path_and_query).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| AdminClientError::Unreachable {
            addr: name.clone(),
            reason: format!("no answer within {timeout:?}"),
        })?
}
