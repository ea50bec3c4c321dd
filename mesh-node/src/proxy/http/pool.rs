//! One pod's kept-alive HTTP connections to backend endpoints: idle HTTP/1.1
//! connections (one request at a time each: a connection leaves the pool while an
//! exchange has it, and nobody polls it while it idles here; the sweep notices a
//! close by the peer) and shared HTTP/2 connections, each
//! remembered with the authorization policies it was admitted under. HTTP/2: one
//! connection per endpoint, or, under a DestinationRule's `maxConcurrentStreams`, as
//! many as it takes to keep each at that many streams in flight (a request takes a
//! connection with a free stream, or has a new one opened); of those, at most one idle
//! connection is kept. Opening connections is `upstream`'s job; this only keeps them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::client::conn;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    discovery::{cluster::Objects, policy::AuthorizationPolicy},
    hbone::client::TunnelHealth,
    proxy::http::{driven::DrivenHttp1, ProxyBody},
};

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 32;
/// An idle connection older than this is closed rather than reused.
const IDLE_EXPIRY: Duration = Duration::from_secs(60);
/// How often a pod's idle connections are looked at: one idle past its expiry is
/// closed within this much more (`http.idleTimeout`).
pub(crate) const IDLE_SWEEP: Duration = Duration::from_secs(1);

/// The authorization policies a connection was admitted under. The destination
/// checks policy when a tunnel opens, so a kept-alive connection is reused only while
/// the policies are the ones it was opened with: tightening a policy reaches new
/// requests at once, not when pooled connections happen to close.
pub(crate) type Policies = Objects<AuthorizationPolicy>;

pub(crate) fn same(a: &Policies, b: &Policies) -> bool {
    Arc::ptr_eq(a, b)
}

struct IdleHttp1 {
    conn: DrivenHttp1,
    since: Instant,
    policies: Policies,
    /// Requests sent on it so far (`maxRequestsPerConnection`).
    served: u32,
    /// Closed rather than reused once idle this long (`http.idleTimeout`).
    expiry: Duration,
    /// The HBONE connection under it, if any.
    transport: Option<TunnelHealth>,
}

/// Whether a connection over `transport` may take another request: not when the HBONE
/// connection under it is going away (the agent at the other end drains).
fn transport_usable(transport: &Option<TunnelHealth>) -> bool {
    !transport.as_ref().is_some_and(TunnelHealth::going_away)
}

impl IdleHttp1 {
    /// Whether it may be reused: open (a close by the peer while it idled is seen
    /// here), not expired, and not over a draining tunnel.
    fn usable(&self) -> bool {
        self.since.elapsed() < self.expiry
            && transport_usable(&self.transport)
            && !self.conn.closed()
    }
}

/// An HTTP/1.1 connection while one request has it (taken from the pool, or new),
/// with its request count.
pub(crate) struct Http1Conn {
    pub conn: DrivenHttp1,
    pub served: u32,
    /// The HBONE connection under it, if any.
    pub transport: Option<TunnelHealth>,
}

/// How a destination's connections are kept (its DestinationRule's connectionPool).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Reuse {
    /// Close a connection after this many requests (None: no limit).
    pub max_requests: Option<u32>,
    /// Close an idle connection after this long (None: the pool's default).
    pub idle_timeout: Option<Duration>,
}

/// A stream in flight on an HTTP/2 connection bounded by `maxConcurrentStreams`,
/// returned when dropped (when the response body has ended, or the request failed).
#[derive(Debug)]
pub(crate) struct StreamSlot(
    // Held for its `Drop`.
    #[allow(dead_code)] OwnedSemaphorePermit,
);

struct SharedHttp2 {
    sender: conn::http2::SendRequest<ProxyBody>,
    policies: Policies,
    /// Its streams in flight at most (`maxConcurrentStreams`; None: no bound of ours,
    /// the one connection per endpoint).
    limit: Option<u32>,
    /// Its free streams under `limit`.
    streams: Arc<Semaphore>,
    /// The HBONE connection under it, if any.
    transport: Option<TunnelHealth>,
}

impl SharedHttp2 {
    fn idle(&self) -> bool {
        self.limit
            .is_some_and(|l| self.streams.available_permits() >= l as usize)
    }
}

/// One pod's reusable connections to backend endpoints.
#[derive(Default)]
pub(crate) struct UpstreamPool {
    http1: Mutex<HashMap<SocketAddr, Vec<IdleHttp1>>>,
    http2: Mutex<HashMap<SocketAddr, Vec<SharedHttp2>>>,
}

fn streams(limit: Option<u32>) -> Arc<Semaphore> {
    let n = limit.map_or(0, |l| (l as usize).min(Semaphore::MAX_PERMITS));
    Arc::new(Semaphore::new(n))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UpstreamPool {
    /// The most recently used idle connection to `target` that can be reused under
    /// `policies`; the ones passed over (closed, expired, of other policies) are let go.
    pub(crate) fn idle_http1(&self, target: SocketAddr, policies: &Policies) -> Option<Http1Conn> {
        let mut pool = lock(&self.http1);
        let list = pool.get_mut(&target)?;
        while let Some(c) = list.pop() {
            if same(&c.policies, policies) && c.usable() {
                return Some(Http1Conn {
                    conn: c.conn,
                    served: c.served,
                    transport: c.transport,
                });
            }
        }
        None
    }

    /// Keeps a connection whose exchange has ended for the next request. A connection
    /// that has carried `reuse.max_requests` is not kept: dropping it closes it.
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
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(IdleHttp1 {
                conn: conn.conn,
                since: Instant::now(),
                policies,
                served: conn.served,
                expiry: reuse.idle_timeout.unwrap_or(IDLE_EXPIRY),
                transport: conn.transport,
            });
        }
    }

    /// Forgets connections that closed, and endpoints left with none (pods come and go).
    pub(crate) fn prune(&self) {
        lock(&self.http1).retain(|_, list| {
            list.retain(IdleHttp1::usable);
            !list.is_empty()
        });
        lock(&self.http2).retain(|_, list| {
            list.retain(|c| !c.sender.is_closed() && transport_usable(&c.transport));
            !list.is_empty()
        });
    }

    /// A stream on a shared HTTP/2 connection to `target` admitted under `policies`:
    /// the connection (None without a `limit` and its slot with one), or None when
    /// there is no such connection or every one has `limit` streams in flight.
    /// Connections of other policies or another limit are let go (their streams in
    /// flight go on), and so are idle ones beyond the first.
    pub(crate) fn http2_stream(
        &self,
        target: SocketAddr,
        policies: &Policies,
        limit: Option<u32>,
    ) -> Option<(conn::http2::SendRequest<ProxyBody>, Option<StreamSlot>)> {
        let mut pool = lock(&self.http2);
        let list = pool.get_mut(&target)?;
        list.retain(|c| {
            !c.sender.is_closed()
                && transport_usable(&c.transport)
                && same(&c.policies, policies)
                && c.limit == limit
        });
        let mut idle = 0;
        list.retain(|c| {
            let keep = !c.idle() || idle == 0;
            idle += usize::from(c.idle());
            keep
        });
        for c in list.iter() {
            if c.limit.is_none() {
                return Some((c.sender.clone(), None));
            }
            if let Ok(slot) = c.streams.clone().try_acquire_owned() {
                return Some((c.sender.clone(), Some(StreamSlot(slot))));
            }
        }
        None
    }

    /// Shares `sender`, a new HTTP/2 connection to `target`, and takes its first stream
    /// (under `limit`). Without a limit it replaces the endpoint's connection.
    pub(crate) fn share_http2(
        &self,
        target: SocketAddr,
        sender: conn::http2::SendRequest<ProxyBody>,
        transport: Option<TunnelHealth>,
        policies: Policies,
        limit: Option<u32>,
    ) -> Option<StreamSlot> {
        let streams = streams(limit);
        let slot = match limit {
            Some(_) => Some(StreamSlot(streams.clone().try_acquire_owned().ok()?)),
            None => None,
        };
        let mut pool = lock(&self.http2);
        let list = pool.entry(target).or_default();
        if limit.is_none() {
            list.clear();
        }
        list.push(SharedHttp2 {
            sender,
            policies,
            limit,
            streams,
            transport,
        });
        slot
    }

    /// Idle HTTP/1.1 connections kept to `target` (tests).
    #[cfg(test)]
    pub(crate) fn idle_http1_connections(&self, target: SocketAddr) -> usize {
        lock(&self.http1).get(&target).map_or(0, Vec::len)
    }

    /// HTTP/2 connections kept to `target` (tests).
    #[cfg(test)]
    pub(crate) fn http2_connections(&self, target: SocketAddr) -> usize {
        lock(&self.http2).get(&target).map_or(0, Vec::len)
    }
}

/// Closes `pool`'s idle connections once past their idle timeout, every
/// [`IDLE_SWEEP`], for as long as the pool exists (`pool` is its owner's).
pub(crate) async fn close_idle<T: Send + Sync + 'static>(
    owner: std::sync::Weak<T>,
    pool: fn(&T) -> &UpstreamPool,
) {
    loop {
        tokio::time::sleep(IDLE_SWEEP).await;
        let Some(owner) = owner.upgrade() else {
            return;
        };
        pool(&owner).prune();
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper::{service::service_fn, Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::proxy::http::{
        box_body,
        test_backend::{http1_backend, Backend},
    };

    /// An HTTP/2 server on loopback answering every request at once.
    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let ok = service_fn(|_r| async {
                        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), ok)
                        .await;
                });
            }
        });
        addr
    }

    async fn connect(addr: SocketAddr) -> conn::http2::SendRequest<ProxyBody> {
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (sender, connection) = conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(connection);
        sender
    }

    async fn get(sender: &mut conn::http2::SendRequest<ProxyBody>) -> u16 {
        let request = Request::builder()
            .uri("http://web/")
            .version(http::Version::HTTP_2)
            .body(box_body(Empty::<Bytes>::new()))
            .unwrap();
        sender
            .send_request(request)
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn max_concurrent_streams_takes_a_connection_with_room_or_asks_for_another() {
        let addr = server().await;
        let pool = UpstreamPool::default();
        let policies = Policies::default();
        let limit = Some(2);
        assert!(pool.http2_stream(addr, &policies, limit).is_none());
        let first = pool
            .share_http2(addr, connect(addr).await, None, policies.clone(), limit)
            .expect("the opener holds the first stream");
        let (mut sender, second) = pool.http2_stream(addr, &policies, limit).unwrap();
        assert!(second.is_some());
        assert_eq!(get(&mut sender).await, 200);
        // Two in flight on it: a third request needs another connection.
        assert!(pool.http2_stream(addr, &policies, limit).is_none());
        let third = pool.share_http2(addr, connect(addr).await, None, policies.clone(), limit);
        assert!(third.is_some());
        assert_eq!(pool.http2_connections(addr), 2);
        let (_, fourth) = pool.http2_stream(addr, &policies, limit).unwrap();
        assert!(pool.http2_stream(addr, &policies, limit).is_none());
        // A stream ends: its connection has room again.
        drop(first);
        let (mut sender, fifth) = pool.http2_stream(addr, &policies, limit).unwrap();
        assert!(fifth.is_some());
        assert_eq!(get(&mut sender).await, 200);
        // All streams end: of the idle connections one is kept.
        drop((second, third, fourth, fifth));
        let again = pool.http2_stream(addr, &policies, limit).unwrap();
        assert_eq!(pool.http2_connections(addr), 1);
        drop(again);
        // Another limit (the DestinationRule changed): the old connections go.
        assert!(pool.http2_stream(addr, &policies, Some(5)).is_none());
        assert_eq!(pool.http2_connections(addr), 0);
    }

    #[tokio::test]
    async fn without_a_limit_requests_share_one_connection_per_endpoint() {
        let addr = server().await;
        let pool = UpstreamPool::default();
        let policies = Policies::default();
        assert!(pool
            .share_http2(addr, connect(addr).await, None, policies.clone(), None)
            .is_none());
        for _ in 0..10 {
            let (mut sender, slot) = pool.http2_stream(addr, &policies, None).unwrap();
            assert!(slot.is_none());
            assert_eq!(get(&mut sender).await, 200);
        }
        assert!(pool
            .share_http2(addr, connect(addr).await, None, policies.clone(), None)
            .is_none());
        assert_eq!(pool.http2_connections(addr), 1);
        // Other policies: not reused.
        assert!(pool
            .http2_stream(addr, &Policies::default(), None)
            .is_none());
    }

    async fn http1_connect(addr: SocketAddr) -> DrivenHttp1 {
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (sender, connection) = conn::http1::handshake(io).await.unwrap();
        DrivenHttp1::new(sender, connection)
    }

    /// A GET on `conn`, its body read whole.
    async fn http1_get(conn: &mut DrivenHttp1) -> u16 {
        use http_body_util::BodyExt;
        let request = Request::builder()
            .uri("/")
            .header("host", "web")
            .body(box_body(Empty::<Bytes>::new()))
            .unwrap();
        let response = conn.send(request).await.unwrap();
        let status = response.status().as_u16();
        response.into_body().collect().await.unwrap();
        status
    }

    #[tokio::test]
    async fn an_idle_http1_connection_the_backend_closed_is_let_go_by_the_sweep() {
        // The backend closes each connection 100 ms after it opened (as servers close
        // kept-alive ones); nobody polls the pooled connection meanwhile: the sweep
        // sees the close and drops it.
        let addr = http1_backend("", Some(Duration::from_millis(100)))
            .await
            .addr;
        let pool = Arc::new(UpstreamPool::default());
        let policies = Policies::default();
        let mut conn = http1_connect(addr).await;
        assert_eq!(http1_get(&mut conn).await, 200);
        let kept = Http1Conn {
            conn,
            served: 1,
            transport: None,
        };
        pool.release_http1(addr, kept, policies.clone(), Reuse::default());
        // Reused at once: the same connection.
        let mut again = pool.idle_http1(addr, &policies.clone()).unwrap();
        assert_eq!(http1_get(&mut again.conn).await, 200);
        pool.release_http1(addr, again, policies.clone(), Reuse::default());
        assert_eq!(pool.idle_http1_connections(addr), 1);
        let _sweep = tokio::spawn(close_idle(Arc::downgrade(&pool), |p| p));
        let started = Instant::now();
        while pool.idle_http1_connections(addr) != 0 {
            assert!(
                started.elapsed() < Duration::from_millis(100) + IDLE_SWEEP * 2,
                "a connection the backend closed is still pooled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // And a request finds none to reuse (nor a dead one).
        assert!(pool.idle_http1(addr, &policies).is_none());
    }

    #[tokio::test]
    async fn an_idle_http1_connection_is_closed_by_the_sweep_once_past_its_idle_timeout() {
        let Backend { addr, ended } = http1_backend("", None).await;
        let pool = Arc::new(UpstreamPool::default());
        let mut conn = http1_connect(addr).await;
        assert_eq!(http1_get(&mut conn).await, 200);
        let reuse = Reuse {
            max_requests: None,
            idle_timeout: Some(Duration::from_millis(200)),
        };
        pool.release_http1(
            addr,
            Http1Conn {
                conn,
                served: 1,
                transport: None,
            },
            Policies::default(),
            reuse,
        );
        assert_eq!(pool.idle_http1_connections(addr), 1);
        let sweep = tokio::spawn(close_idle(Arc::downgrade(&pool), |p| p));
        // Nobody asks the pool for a connection: the sweep alone closes it, within
        // the idle timeout and one sweep.
        let started = Instant::now();
        while ended.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                started.elapsed() < Duration::from_millis(200) + IDLE_SWEEP * 2,
                "the idle connection is still open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pool.idle_http1_connections(addr), 0);
        // The sweep ends with its pool.
        drop(pool);
        tokio::time::timeout(IDLE_SWEEP * 3, sweep)
            .await
            .expect("the sweep outlives its pool")
            .unwrap();
    }
}
