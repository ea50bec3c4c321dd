//! An HTTP/1.1 client connection with no task of its own: it is polled by the task that
//! sends on it, while that task waits for the connection to be ready, for the response,
//! and for each chunk of the response body. A request and its response then cross no
//! task boundary: two wake-ups of another task (and, on a multi-threaded runtime, often
//! of another thread) fewer per request than with the connection spawned.
//!
//! The connection and what the task waits for on it are polled under one
//! [`InlineWake`]: the connection waking the response's reader (the same task) makes
//! it poll again at once instead of rescheduling the task.
//!
//! Only for a connection one task uses at a time (one downstream HTTP/1.1 connection
//! forwarding to one upstream, or a pooled connection while one request has it): the
//! socket wakes whichever task polled it last.

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

use crate::proxy::{http::ProxyBody, inline_wake::InlineWake};

type ConnectionFuture = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// The connection's own future, polled by whoever waits on the connection (with what
/// it waits for, under one [`InlineWake`]); gone once it has ended (closed by either
/// side, or failed).
#[derive(Clone)]
struct Driver(Arc<Driven>);

struct Driven {
    connection: Mutex<Option<ConnectionFuture>>,
    wake: Arc<InlineWake>,
}

impl Driver {
    fn new(connection: ConnectionFuture) -> Driver {
        Driver(Arc::new(Driven {
            connection: Mutex::new(Some(connection)),
            wake: Arc::default(),
        }))
    }

    /// Lets the connection read and write what it can; `cx` is woken when it can do more.
    fn poll_connection(&self, cx: &mut Context<'_>) {
        let mut slot = self.0.connection.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(connection) = slot.as_mut() {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP/1.1 connection ended");
                }
                *slot = None;
            }
        }
    }

    /// Polls the connection once with a waker that wakes nobody (nobody waits on it).
    fn poll_unattended(&self) {
        self.0.wake.poll_unattended(|cx| self.poll_connection(cx));
    }

    /// Polls the connection, then `then` (what the task waits for on it).
    fn drive<T>(
        &self,
        cx: &mut Context<'_>,
        mut then: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.0.wake.poll(cx, |inner| {
            self.poll_connection(inner);
            then(inner)
        })
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
            driver: Driver::new(Box::pin(connection)),
        }
    }

    /// Whether the connection has closed. It is polled once first, so that an end the
    /// peer sent while nobody polled it is seen: only for a connection nobody waits on
    /// (one kept idle in a pool).
    pub(crate) fn closed(&self) -> bool {
        self.driver.poll_unattended();
        self.sender.is_closed()
    }

    /// Sends `request` if the connection can take it at once; gives it back unsent if
    /// the connection has closed or is still busy with an earlier exchange.
    pub(crate) async fn try_send(
        &mut self,
        request: Request<ProxyBody>,
    ) -> Result<Response<DrivenBody>, NotSent> {
        let (sender, driver) = (&mut self.sender, &self.driver);
        let ready = poll_fn(|cx| Poll::Ready(driver.drive(cx, |cx| sender.poll_ready(cx)))).await;
        if !matches!(ready, Poll::Ready(Ok(()))) {
            return Err(NotSent::Unsent(Box::new(request)));
        }
        let driver = self.driver.clone();
        let mut response = std::pin::pin!(self.sender.try_send_request(request));
        match poll_fn(|cx| driver.drive(cx, |cx| response.as_mut().poll(cx))).await {
            Ok(response) => Ok(response.map(|body| DrivenBody { body, driver })),
            Err(mut e) => match e.take_message() {
                Some(unsent) => Err(NotSent::Unsent(Box::new(unsent))),
                None => Err(NotSent::Failed(e.into_error())),
            },
        }
    }

    /// Waits until the connection can take a request; an error once it has closed.
    pub(crate) async fn ready(&mut self) -> hyper::Result<()> {
        let (sender, driver) = (&mut self.sender, &self.driver);
        poll_fn(|cx| driver.drive(cx, |cx| sender.poll_ready(cx))).await
    }

    /// Sends `request`; its response, whose body drives the connection while it is read.
    pub(crate) async fn send(
        &mut self,
        request: Request<ProxyBody>,
    ) -> hyper::Result<Response<DrivenBody>> {
        let driver = self.driver.clone();
        let mut response = std::pin::pin!(self.sender.send_request(request));
        let response = poll_fn(|cx| driver.drive(cx, |cx| response.as_mut().poll(cx))).await?;
        Ok(response.map(|body| DrivenBody { body, driver }))
    }
}

/// Why [`DrivenHttp1::try_send`] did not get a response.
pub(crate) enum NotSent {
    /// The request did not go out (the connection had closed or was busy): it may be
    /// sent on another connection.
    Unsent(Box<Request<ProxyBody>>),
    /// It went out, or may have, and failed.
    Failed(hyper::Error),
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
        let this = &mut *self;
        this.driver
            .drive(cx, |cx| Pin::new(&mut this.body).poll_frame(cx))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
