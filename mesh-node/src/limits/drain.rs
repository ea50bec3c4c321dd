//! The node-wide drain, started once when the agent is told to stop (SIGTERM, SIGINT):
//! the in-pod listeners stop accepting, HTTP connections the agent serves are told to
//! close after the requests in flight (`Connection: close` on HTTP/1.1, GOAWAY on
//! HTTP/2 and HBONE), and what is established runs on until it ends or the agent's
//! `--drain-timeout` cuts it.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use http::{header, HeaderValue, Response, Version};
use tokio::sync::watch;

/// A handle on the drain; clones share it.
#[derive(Clone, Debug)]
pub(crate) struct Drain(Arc<watch::Sender<bool>>);

impl Default for Drain {
    fn default() -> Drain {
        Drain(Arc::new(watch::channel(false).0))
    }
}

impl Drain {
    /// Starts the drain (again: no effect).
    pub(crate) fn start(&self) {
        self.0.send_replace(true);
    }

    pub(crate) fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the drain has started (at once if it has).
    pub(crate) async fn started(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

/// How long a kept-alive HTTP/1.1 connection may sit idle during a drain before it is
/// closed: a client that is sending requests gets `Connection: close` on its next
/// response well before this; closing one it may be writing to would lose a request.
pub(crate) const HTTP1_DRAIN_IDLE: Duration = Duration::from_secs(1);

/// One served HTTP connection's view of the drain. HTTP/2 is told to go away at once
/// (GOAWAY: a client retries the streams the server did not process). HTTP/1.1 gets
/// `Connection: close` on each response from the drain on, and is closed only once
/// idle for [`HTTP1_DRAIN_IDLE`].
pub(crate) struct HttpDrain {
    drain: Drain,
    http2: AtomicBool,
}

impl HttpDrain {
    pub(crate) fn new(drain: &Drain) -> Arc<HttpDrain> {
        Arc::new(HttpDrain {
            drain: drain.clone(),
            http2: AtomicBool::new(false),
        })
    }

    /// Notes a request's protocol.
    pub(crate) fn request(&self, version: Version) {
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
    }

    /// Marks an HTTP/1.x response of a draining agent as the connection's last.
    pub(crate) fn response<B>(&self, version: Version, response: &mut Response<B>) {
        if self.drain.is_draining() && version != Version::HTTP_2 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }

    /// Whether the connection is to be shut down as soon as the drain starts (HTTP/2).
    pub(crate) fn go_away_at_once(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Drain, HttpDrain};

    #[tokio::test]
    async fn every_clone_sees_the_drain_start_once() {
        let drain = Drain::default();
        let other = drain.clone();
        assert!(!other.is_draining());
        let waiting = tokio::spawn(async move { other.started().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "resolved before the drain started");
        drain.start();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a waiter never saw the drain")
            .expect("the waiter panicked");
        drain.start();
        assert!(drain.is_draining());
        // Started already: resolves at once.
        tokio::time::timeout(Duration::from_millis(100), drain.started())
            .await
            .expect("started() waits after the drain began");
    }

    #[test]
    fn http1_responses_carry_connection_close_once_draining_and_http2_goes_away() {
        let drain = Drain::default();
        let http = HttpDrain::new(&drain);
        http.request(http::Version::HTTP_11);
        let mut before = http::Response::new(());
        http.response(http::Version::HTTP_11, &mut before);
        assert!(before.headers().get("connection").is_none());
        assert!(!http.go_away_at_once());
        drain.start();
        let mut after = http::Response::new(());
        http.response(http::Version::HTTP_11, &mut after);
        assert_eq!(after.headers()["connection"], "close");
        let mut h2 = http::Response::new(());
        http.request(http::Version::HTTP_2);
        http.response(http::Version::HTTP_2, &mut h2);
        assert!(h2.headers().get("connection").is_none());
        assert!(http.go_away_at_once());
    }
}
