//! One pod's kept-alive HTTP connections to backend endpoints: idle HTTP/1.1
//! connections (one request at a time each) and one shared HTTP/2 connection per
//! endpoint, each remembered with the authorization policies it was admitted under.
//! Opening connections is `upstream`'s job; this only keeps them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::client::conn;

use crate::{
    discovery::{cluster::Objects, policy::AuthorizationPolicy},
    proxy::http::ProxyBody,
};

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 32;
/// An idle connection older than this is closed rather than reused.
const IDLE_EXPIRY: Duration = Duration::from_secs(60);

/// The authorization policies a connection was admitted under. The destination
/// checks policy when a tunnel opens, so a kept-alive connection is reused only while
/// the policies are the ones it was opened with: tightening a policy reaches new
/// requests at once, not when pooled connections happen to close.
pub(crate) type Policies = Objects<AuthorizationPolicy>;

pub(crate) fn same(a: &Policies, b: &Policies) -> bool {
    Arc::ptr_eq(a, b)
}

struct IdleHttp1 {
    sender: conn::http1::SendRequest<ProxyBody>,
    since: Instant,
    policies: Policies,
    /// Requests sent on it so far (`maxRequestsPerConnection`).
    served: u32,
    /// Closed rather than reused once idle this long (`http.idleTimeout`).
    expiry: Duration,
}

impl IdleHttp1 {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && self.since.elapsed() < self.expiry
    }
}

/// A kept-alive HTTP/1.1 connection taken from the pool, with its request count.
pub(crate) struct Http1Conn {
    pub sender: conn::http1::SendRequest<ProxyBody>,
    pub served: u32,
}

/// How a destination's connections are kept (its DestinationRule's connectionPool).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Reuse {
    /// Close a connection after this many requests (None: no limit).
    pub max_requests: Option<u32>,
    /// Close an idle connection after this long (None: the pool's default).
    pub idle_timeout: Option<Duration>,
}

/// One pod's reusable connections to backend endpoints.
#[derive(Default)]
pub(crate) struct UpstreamPool {
    http1: Mutex<HashMap<SocketAddr, Vec<IdleHttp1>>>,
    http2: Mutex<HashMap<SocketAddr, (conn::http2::SendRequest<ProxyBody>, Policies)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UpstreamPool {
    pub(crate) fn idle_http1(&self, target: SocketAddr, policies: &Policies) -> Option<Http1Conn> {
        let mut pool = lock(&self.http1);
        let list = pool.get_mut(&target)?;
        list.retain(|c| c.usable() && same(&c.policies, policies));
        let ready = list.iter().position(|c| c.sender.is_ready())?;
        let c = list.swap_remove(ready);
        Some(Http1Conn {
            sender: c.sender,
            served: c.served,
        })
    }

    /// Puts a connection back once its response is under way: it turns ready again
    /// when that response has ended. A connection that has carried `reuse.max_requests`
    /// is not kept: dropping its sender closes it once the response has ended.
    pub(crate) fn release_http1(
        &self,
        target: SocketAddr,
        conn: Http1Conn,
        policies: Policies,
        reuse: Reuse,
    ) {
        if reuse.max_requests.is_some_and(|max| conn.served >= max) {
            return;
        }
        let mut pool = lock(&self.http1);
        let list = pool.entry(target).or_default();
        list.retain(|c| !c.sender.is_closed());
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(IdleHttp1 {
                sender: conn.sender,
                since: Instant::now(),
                policies,
                served: conn.served,
                expiry: reuse.idle_timeout.unwrap_or(IDLE_EXPIRY),
            });
        }
    }

    /// Forgets connections that closed, and endpoints left with none (pods come and go).
    pub(crate) fn prune(&self) {
        lock(&self.http1).retain(|_, list| {
            list.retain(IdleHttp1::usable);
            !list.is_empty()
        });
        lock(&self.http2).retain(|_, (s, _)| !s.is_closed());
    }

    /// The shared HTTP/2 connection to `target`, if it is open and was admitted under
    /// `policies`.
    pub(crate) fn shared_http2(
        &self,
        target: SocketAddr,
        policies: &Policies,
    ) -> Option<conn::http2::SendRequest<ProxyBody>> {
        let pool = lock(&self.http2);
        let (sender, admitted) = pool.get(&target)?;
        (!sender.is_closed() && same(admitted, policies)).then(|| sender.clone())
    }

    /// Makes `sender` the HTTP/2 connection to `target` that requests share.
    pub(crate) fn share_http2(
        &self,
        target: SocketAddr,
        sender: conn::http2::SendRequest<ProxyBody>,
        policies: Policies,
    ) {
        lock(&self.http2).insert(target, (sender, policies));
    }
}
