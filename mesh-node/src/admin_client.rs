//! A minimal HTTP/1.1 client for the admin API (used by meshctl).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;

#[derive(Debug, Error)]
pub enum AdminClientError {
    #[error("cannot reach the mesh-node admin API at {addr}: {reason}; is mesh-node running on this node, and is --admin-addr right?")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("the admin API at {addr} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
}

pub async fn request(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    timeout: Duration,
) -> Result<String, AdminClientError> {
    let unreachable = |reason: String| AdminClientError::Unreachable { addr, reason };
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, addr.to_string())
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
            return Err(AdminClientError::Status { addr, status, body });
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
}
