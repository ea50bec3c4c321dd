//! The traffic policy of a trace's backends: for a backend that balances by
//! consistent hash, the key the connection or request offers and the endpoint that
//! key lands on now, computed with the data path's own key functions, ring and
//! outlier state (so the prediction cannot drift from what traffic does).

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::{
    discovery::consistent_hash::HashPolicy, keys::ObjectKey, routing::backend::LbPolicy,
    routing::balancer::Balancer, routing::hash_key::connection_hash,
    routing::hash_key::request_hash, routing::hash_key::KeyedRequest, routing::resolve::Backend,
};

/// What a trace knows of the traffic a backend would be chosen for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Keys<'a> {
    /// An L4 connection from the client pod's IP (None: unknown).
    Connection(Option<IpAddr>),
    /// An HTTP request given by its attributes.
    Request(KeyedRequest<'a>),
    /// HTTP requests, none given: the key is each request's own.
    AnyRequest,
}

/// Where a consistent-hash backend sends the traced connection or request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct HashStep {
    pub backend: ObjectKey,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Shown as `meshctl` shows it (`header x-user, ring hash 1024`).
    #[serde(serialize_with = "as_text")]
    pub policy: HashPolicy,
    /// The key's hash (in hex on the wire); None: the connection or request offers no
    /// key.
    #[serde(serialize_with = "as_hex")]
    pub hash: Option<u64>,
    /// The endpoint the key lands on now (ejected endpoints skipped).
    pub endpoint: Option<SocketAddr>,
    pub note: String,
}

/// The hash step of `backend`, when it balances by consistent hash.
pub(crate) fn hash_step(
    backend: &Backend,
    keys: Keys<'_>,
    balancer: Option<&Balancer>,
) -> Option<HashStep> {
    let policy = backend
        .policy
        .consistent_hash
        .as_ref()
        .filter(|_| backend.policy.load_balancer == LbPolicy::ConsistentHash)?;
    let (hash, set_cookie) = match keys {
        Keys::Connection(source) => (
            source.and_then(|ip| connection_hash(Some(policy), ip)),
            None,
        ),
        Keys::Request(request) => {
            let h = request_hash(policy, &request);
            (h.hash, h.set_cookie)
        }
        Keys::AnyRequest => (None, None),
    };
    // Away from a live balancer nothing is ejected: the ring alone decides.
    let endpoint = hash.and_then(|h| match balancer {
        Some(b) => b.hashed_endpoint(backend, h),
        None => Balancer::ring_endpoint(backend, h),
    });
    let note = match (keys, hash, endpoint) {
        (_, Some(h), Some(ep)) => format!("the key hashes to {h:016x}: endpoint {ep}"),
        (_, Some(h), None) => {
            format!("the key hashes to {h:016x}, but no endpoint is ready or every one is ejected")
        }
        (Keys::AnyRequest, None, _) => format!(
            "each request's {} is its key: give the request's headers or path to see where one lands",
            policy.key
        ),
        (Keys::Connection(_), None, _) => format!(
            "a connection has no {}: connections are balanced at random",
            policy.key
        ),
        (Keys::Request(_), None, _) if set_cookie.is_some() => format!(
            "the request has no {}: balanced at random, and the response sets one",
            policy.key
        ),
        (Keys::Request(_), None, _) => format!(
            "the request has no {}: balanced at random",
            policy.key
        ),
    };
    Some(HashStep {
        backend: backend.service.clone(),
        subset: backend.subset.clone(),
        policy: policy.clone(),
        hash,
        endpoint,
        note,
    })
}

fn as_text<S: serde::Serializer>(policy: &HashPolicy, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(policy)
}

fn as_hex<S: serde::Serializer>(hash: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match hash {
        Some(h) => s.collect_str(&format_args!("{h:016x}")),
        None => s.serialize_none(),
    }
}
