//! L7 routing on the node proxy: outbound connections to a Service that an HTTPRoute
//! names (GAMMA) are served as HTTP/1.1 or HTTP/2 and routed per request, with no
//! extra hop. Everything else stays L4.

pub(crate) mod downstream;
pub(crate) mod driven;
pub(crate) mod forward;
pub(crate) mod held;
pub(crate) mod message;
pub(crate) mod mirror;
pub(crate) mod pool;
pub(crate) mod pooled;
#[cfg(test)]
pub(crate) mod test_backend;
pub(crate) mod upstream;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends, whatever its source.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub(crate) fn box_body<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}
