//! An HTTP/1.1 backend on loopback for the connection pool's tests.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub(crate) struct Backend {
    pub addr: SocketAddr,
    /// Its connections that have ended.
    pub ended: Arc<AtomicUsize>,
}

/// Answers `body` to every request at once; with a `lifetime`, closes each connection
/// that long after it opened (as a server closing kept-alive connections does).
pub(crate) async fn http1_backend(body: &'static str, lifetime: Option<Duration>) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ended = Arc::new(AtomicUsize::new(0));
    let counter = ended.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let answer = service_fn(move |_r| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let serving = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), answer);
                match lifetime {
                    Some(t) => drop(tokio::time::timeout(t, serving).await),
                    None => drop(serving.await),
                }
                counter.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Backend { addr, ended }
}
