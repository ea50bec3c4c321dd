//! The key a consistent-hash policy hashes, taken from a request (a header, a cookie,
//! a query parameter, the client's IP) or a connection (the client's IP), and the
//! cookie the proxy makes up when `httpCookie.ttl` asks for one (as Envoy: its value
//! derived from the client's address, so requests racing on one connection get the
//! same cookie; set with `Path` when given, `Max-Age` unless the ttl is 0, and
//! `HttpOnly`).

use std::net::{IpAddr, SocketAddr};

use http::{header, request::Parts, HeaderValue};

use crate::{
    discovery::cluster::canonical,
    discovery::consistent_hash::{HashKey, HashPolicy},
    routing::hash_ring::xxh64,
};

/// What a request offers to hash.
#[derive(Debug, Clone, Copy)]
pub struct KeyedRequest<'a> {
    pub parts: &'a Parts,
    /// The client's address as the proxy accepted it (a made-up cookie derives from
    /// it).
    pub src: SocketAddr,
    /// The client pod's IP (`useSourceIp`).
    pub source_ip: IpAddr,
}

/// The hash of a request's key, and the cookie to set on its response.
#[derive(Debug, Default)]
pub(crate) struct RequestHash {
    /// None: the request lacks the key (balanced at random).
    pub hash: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
}

/// The hash of a client's IP address.
pub(crate) fn source_hash(ip: IpAddr) -> u64 {
    xxh64(canonical(ip).to_string().as_bytes(), 0)
}

/// The hash of a connection from `src` under `policy` (only `useSourceIp` can key a
/// connection).
pub(crate) fn connection_hash(policy: Option<&HashPolicy>, src: IpAddr) -> Option<u64> {
    match policy?.key {
        HashKey::SourceIp => Some(source_hash(src)),
        _ => None,
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (quotes removed).
fn cookie<'p>(parts: &'p Parts, name: &str) -> Option<&'p str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
}

/// The raw value of query parameter `name` (`?name` alone: empty).
fn query_parameter<'p>(parts: &'p Parts, name: &str) -> Option<&'p str> {
    parts.uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The hash of `request`'s key under `policy`, and the cookie to set when the policy
/// makes one up.
pub(crate) fn request_hash(policy: &HashPolicy, request: &KeyedRequest<'_>) -> RequestHash {
    let parts = request.parts;
    let hash = |bytes: &[u8]| Some(xxh64(bytes, 0));
    match &policy.key {
        HashKey::Header { name } => {
            let mut values = parts.headers.get_all(name.as_str()).iter().peekable();
            if values.peek().is_none() {
                return RequestHash::default();
            }
            let joined: Vec<&[u8]> = values.map(HeaderValue::as_bytes).collect();
            RequestHash {
                hash: hash(&joined.join(&b","[..])),
                set_cookie: None,
            }
        }
        HashKey::QueryParameter { name } => RequestHash {
            hash: query_parameter(parts, name).and_then(|v| hash(v.as_bytes())),
            set_cookie: None,
        },
        HashKey::SourceIp => RequestHash {
            hash: Some(source_hash(request.source_ip)),
            set_cookie: None,
        },
        HashKey::Cookie { name, path, ttl_ms } => {
            if let Some(v) = cookie(parts, name) {
                return RequestHash {
                    hash: hash(v.as_bytes()),
                    set_cookie: None,
                };
            }
            let Some(ttl_ms) = ttl_ms else {
                return RequestHash::default();
            };
            let value = format!("{:016x}", xxh64(request.src.to_string().as_bytes(), 0));
            let mut text = format!("{name}={value}");
            if *ttl_ms > 0 {
                text.push_str(&format!("; Max-Age={}", ttl_ms.div_ceil(1000)));
            }
            if let Some(p) = path {
                text.push_str(&format!("; Path={p}"));
            }
            text.push_str("; HttpOnly");
            RequestHash {
                hash: hash(value.as_bytes()),
                // (Name and path were checked to be tokens and printable ASCII.)
                set_cookie: HeaderValue::try_from(text).ok(),
            }
        }
    }
}

#[cfg(test)]
#[path = "hash_key_tests.rs"]
mod tests;
