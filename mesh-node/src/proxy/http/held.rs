//! A response body that holds its request's connection-pool permit (and its HTTP/2
//! stream under `maxConcurrentStreams`) until the body has ended (or is dropped): an
//! HTTP/1.1 connection is busy, a stream open, and a request in flight, until its
//! response has been read whole.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::{
    proxy::http::{pool::StreamSlot, BoxError, ProxyBody},
    routing::pool::RequestPermit,
};

pub(crate) struct Held {
    body: ProxyBody,
    permit: Option<RequestPermit>,
    stream: Option<StreamSlot>,
}

impl Held {
    pub(crate) fn new(
        body: ProxyBody,
        permit: Option<RequestPermit>,
        stream: Option<StreamSlot>,
    ) -> Held {
        Held {
            body,
            permit,
            stream,
        }
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
            this.stream = None;
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
