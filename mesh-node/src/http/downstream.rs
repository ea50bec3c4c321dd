//! A downstream (application) connection to an HTTP-routed Service: HTTP/1.1 or HTTP/2
//! prior knowledge, told apart by the first bytes, each request handed to the router.

use std::{
    io,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use super::proxy::{handle, Frontend};
use crate::{connections::ConnectionInfo, forward::PodContext, relay::ByteCounters};

/// Counts the bytes of the downstream connection for its record and TCP metrics.
struct Counted {
    stream: TcpStream,
    counters: Arc<ByteCounters>,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.counters
            .to_server
            .fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            this.counters
                .to_client
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Serves `stream` until the application closes it; the connection is recorded like
/// any other outbound connection, its requests each get their own log line.
pub async fn serve(
    stream: TcpStream,
    info: ConnectionInfo,
    frontend: Frontend,
    ctx: Arc<PodContext>,
) {
    let conn = ctx.connections.open(info);
    let frontend = Arc::new(frontend);
    let service = {
        let ctx = ctx.clone();
        service_fn(move |request| handle(request, ctx.clone(), frontend.clone()))
    };
    let io = TokioIo::new(Counted {
        stream,
        counters: conn.shared_counters(),
    });
    let result = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(io, service)
        .await;
    match result {
        Ok(()) => conn.close("completed (http)"),
        Err(e) => {
            debug!(pod = %ctx.pod, error = %e, "downstream HTTP connection ended with an error");
            ctx.metrics
                .refused
                .with_label_values(&["http_protocol_error"])
                .inc();
            conn.close(format!("http_error: {e}"));
        }
    }
}
