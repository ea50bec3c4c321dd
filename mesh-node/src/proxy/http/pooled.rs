//! A response from a backend, and for HTTP/1.1 the connection it came on: taken from
//! the pod's pool (or new), driven by the task that reads the response, and given back
//! to the pool when the response body has ended. A body dropped before its end takes
//! its connection with it (closed: hyper cannot reuse a connection mid-response).

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Weak,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::proxy::http::{
    driven::DrivenBody,
    pool::{Http1Conn, Policies, Reuse, UpstreamPool},
};

/// Where a connection goes back when its exchange has ended.
pub(crate) struct Return {
    pub pool: Weak<UpstreamPool>,
    pub target: SocketAddr,
    pub policies: Policies,
    pub reuse: Reuse,
}

/// A response body read from a pooled HTTP/1.1 connection, which it drives.
pub(crate) struct PooledBody {
    body: DrivenBody,
    /// The body has ended: the exchange is over.
    ended: bool,
    conn: Option<(Http1Conn, Return)>,
}

impl PooledBody {
    pub(crate) fn new(body: DrivenBody, conn: Http1Conn, to: Return) -> PooledBody {
        PooledBody {
            body,
            ended: false,
            conn: Some((conn, to)),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A reader may stop at `is_end_stream` without polling for the end.
        if !(self.ended || self.body.is_end_stream()) {
            return;
        }
        if let Some((conn, to)) = self.conn.take() {
            if let Some(pool) = to.pool.upgrade() {
                pool.release_http1(to.target, conn, to.policies, to.reuse);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            // A failed exchange leaves the connection unusable.
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A backend's response body: from a connection with a task of its own (HTTP/2, an
/// upgrade), or from a pooled HTTP/1.1 connection the reader drives.
pub(crate) enum UpstreamBody {
    Spawned(Incoming),
    Pooled(PooledBody),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Spawned(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Pooled(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Spawned(b) => b.is_end_stream(),
            UpstreamBody::Pooled(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Spawned(b) => b.size_hint(),
            UpstreamBody::Pooled(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::Request;
    use http_body_util::{BodyExt, Empty};
    use hyper::client::conn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpStream;

    use super::*;
    use crate::proxy::http::{box_body, driven::DrivenHttp1, test_backend::http1_backend};

    /// A GET on `conn`, its response body given `conn` to return to `pool`.
    async fn get(
        conn: Http1Conn,
        pool: &Arc<UpstreamPool>,
        addr: SocketAddr,
        policies: &Policies,
    ) -> PooledBody {
        let mut conn = conn;
        let request = Request::builder()
            .uri("/")
            .header("host", "web")
            .body(box_body(Empty::<Bytes>::new()))
            .unwrap();
        let response = match conn.conn.try_send(request).await {
            Ok(r) => r,
            Err(_) => panic!("the connection did not take the request"),
        };
        let to = Return {
            pool: Arc::downgrade(pool),
            target: addr,
            policies: policies.clone(),
            reuse: Reuse::default(),
        };
        PooledBody::new(response.into_body(), conn, to)
    }

    #[tokio::test]
    async fn a_connection_goes_back_to_the_pool_when_its_body_has_ended_and_not_before() {
        let addr = http1_backend("hello", None).await.addr;
        let pool = Arc::new(UpstreamPool::default());
        let policies = Policies::default();
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (sender, connection) = conn::http1::handshake(io).await.unwrap();
        let mut conn = Http1Conn {
            conn: DrivenHttp1::new(sender, connection),
            served: 0,
            transport: None,
        };
        for round in 0..3 {
            let body = get(conn, &pool, addr, &policies).await;
            // Mid-response: not in the pool.
            assert_eq!(pool.idle_http1_connections(addr), 0);
            let read = body.collect().await.unwrap().to_bytes();
            assert_eq!(read, "hello");
            // Ended and dropped: back, and the next request takes it again.
            assert_eq!(pool.idle_http1_connections(addr), 1, "round {round}");
            conn = pool
                .idle_http1(addr, &policies)
                .expect("the connection is reusable");
        }
        // A body dropped before its end takes its connection with it.
        let body = get(conn, &pool, addr, &policies).await;
        drop(body);
        assert_eq!(pool.idle_http1_connections(addr), 0);
    }
}
