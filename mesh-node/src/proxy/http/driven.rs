//! An HTTP/1.1 client connection with no task of its own: it is polled by the task that
//! sends on it, while that task waits for the connection to be ready, for the response,
//! and for each chunk of the response body. A request and its response then cross no
//! task boundary: two wake-ups of another task (and, on a multi-threaded runtime, often
//! of another thread) fewer per request than with the connection spawned.
//!
//! Only for a connection one task uses at a time (one downstream HTTP/1.1 connection
//! forwarding to one upstream): the socket wakes whichever task polled it last.

use std::{
    future::{poll_fn, Future},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1};

use crate::proxy::http::ProxyBody;

type ConnectionFuture = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// The connection's own future, polled by whoever waits on the connection; gone once it
/// has ended (closed by either side, or failed).
#[derive(Clone)]
struct Driver(Arc<Mutex<Option<ConnectionFuture>>>);

impl Driver {
    /// Lets the connection read and write what it can; `cx` is woken when it can do more.
    fn poll(&self, cx: &mut Context<'_>) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(connection) = slot.as_mut() {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP/1.1 connection to the application ended");
                }
                *slot = None;
            }
        }
    }
}

/// A handshaken HTTP/1.1 connection, driven by its user.
pub(crate) struct DrivenHttp1 {
    sender: http1::SendRequest<ProxyBody>,
    driver: Driver,
}

impl DrivenHttp1 {
    pub(crate) fn new<IO>(
        sender: http1::SendRequest<ProxyBody>,
        connection: http1::Connection<IO, ProxyBody>,
    ) -> DrivenHttp1
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        DrivenHttp1 {
            sender,
            driver: Driver(Arc::new(Mutex::new(Some(Box::pin(connection))))),
        }
    }

    /// Waits until the connection can take a request; an error once it has closed.
    pub(crate) async fn ready(&mut self) -> hyper::Result<()> {
        let (sender, driver) = (&mut self.sender, &self.driver);
        poll_fn(|cx| {
            driver.poll(cx);
            sender.poll_ready(cx)
        })
        .await
    }

    /// Sends `request`; its response, whose body drives the connection while it is read.
    pub(crate) async fn send(
        &mut self,
        request: Request<ProxyBody>,
    ) -> hyper::Result<Response<DrivenBody>> {
        let driver = self.driver.clone();
        let mut response = std::pin::pin!(self.sender.send_request(request));
        let response = poll_fn(|cx| {
            driver.poll(cx);
            response.as_mut().poll(cx)
        })
        .await?;
        Ok(response.map(|body| DrivenBody { body, driver }))
    }
}

/// A response body from a [`DrivenHttp1`] connection, which it polls while read.
pub(crate) struct DrivenBody {
    body: Incoming,
    driver: Driver,
}

impl Body for DrivenBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.driver.poll(cx);
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
