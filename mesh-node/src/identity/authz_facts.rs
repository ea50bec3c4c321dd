//! What an authorization decision knows of a connection to a local pod, and of one
//! HTTP request on it: Istio's `source.*`, `destination.*` and `request.*` attributes.
//! (`identity::authz` re-exports them.)

use std::net::{IpAddr, SocketAddr};

use crate::{identity::jwt::RequestAuth, identity::Identity};

/// What a decision knows of a connection to a local pod: Istio's `source.*` and
/// `destination.*` attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionFacts {
    /// `source.ip` (`ipBlocks`; `remoteIpBlocks` too: no proxy in front forwards one).
    pub source_ip: IpAddr,
    /// The peer's mTLS identity (`source.principal`, `source.namespace`); None:
    /// plaintext, captured on 15006.
    pub peer: Option<Identity>,
    /// `destination.ip` and `destination.port`: the pod address the client asked for.
    pub destination: SocketAddr,
}

/// What a decision knows of one HTTP request on such a connection.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// The path without the query (Istio's `paths` match it).
    pub path: &'a str,
    /// `:authority` or `Host` (Istio's `hosts`), as sent.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The request's valid JWT, if any (`requestPrincipals`, `request.auth.*`).
    pub auth: Option<&'a RequestAuth>,
}
