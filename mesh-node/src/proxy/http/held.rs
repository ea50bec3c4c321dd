//! A response body that holds its request's connection-pool permit until the body has
//! ended (or is dropped): an HTTP/1.1 connection is busy, and a request in flight,
//! until its response has been read whole.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::{
    proxy::http::{BoxError, ProxyBody},
    routing::pool::RequestPermit,
};

pub(crate) struct Held {
    body: ProxyBody,
    permit: Option<RequestPermit>,
}

impl Held {
    pub(crate) fn new(body: ProxyBody, permit: Option<RequestPermit>) -> Held {
        Held { body, permit }
    }
}

impl Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.permit = None;
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
