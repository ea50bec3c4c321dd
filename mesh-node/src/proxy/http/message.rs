//! What one proxied request carries from hop to hop: the hop-by-hop headers removed,
//! upgrades recognised, and the request body kept whole when it may be sent more than
//! once (retries, mirrors).

use bytes::Bytes;
use http::{
    header::{self, HeaderName, HeaderValue},
    request::Parts,
    HeaderMap, Method, Request, Version,
};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use crate::proxy::http::{box_body, ProxyBody};

/// Request bodies up to this size are kept so a retry can resend them (and a mirror
/// get a copy).
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// The request body, kept when it may be sent more than once.
pub(crate) enum RequestBody {
    Replayable(Bytes),
    Streaming(Option<Incoming>),
}

impl RequestBody {
    pub(crate) fn take(&mut self) -> ProxyBody {
        match self {
            RequestBody::Replayable(b) => box_body(Full::new(b.clone())),
            RequestBody::Streaming(b) => match b.take() {
                Some(b) => box_body(b),
                None => box_body(Empty::new()),
            },
        }
    }
}

pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)
}

/// Removes headers that describe one hop's connection (RFC 9110 §7.6.1); an upgrade
/// keeps `Connection: upgrade` and `Upgrade` so the backend can accept it.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .filter(|n| !(keep_upgrade && *n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        headers.remove(n);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

pub(crate) async fn request_body(
    body: Incoming,
    parts: &Parts,
    keep: bool,
) -> Result<RequestBody, String> {
    use http_body::Body as _;
    let small = body.is_end_stream()
        || body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_REPLAY_BODY);
    if !(keep && small) {
        return Ok(RequestBody::Streaming(Some(body)));
    }
    let collected = body.collect().await.map_err(|e| {
        format!(
            "reading the request body of {} {} failed: {e}",
            parts.method,
            parts.uri.path()
        )
    })?;
    Ok(RequestBody::Replayable(collected.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_but_an_upgrade_keeps_its_own() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private, upgrade"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-app", HeaderValue::from_static("stays"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1, "{plain:?}");
        assert!(plain.contains_key("x-app"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(!h.contains_key("x-private"));
    }
}
