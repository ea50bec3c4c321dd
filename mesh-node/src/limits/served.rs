//! One HTTP connection the agent serves (outbound from a pod, or inbound at the
//! destination), driven to its end under the listener's limits and the agent's drain:
//! its first request within the header timeout; closed gracefully once no request has
//! been in flight for the HTTP idle timeout; and from the drain on, told to go away at
//! once (HTTP/2: GOAWAY, a client retries the streams the server did not take) or
//! answered with `Connection: close` and closed once idle for [`HTTP1_DRAIN_IDLE`]
//! (HTTP/1.1: closing a connection the client may be writing to would lose a request).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http::{header, HeaderValue, Response, Version};
use tokio::time::Instant;

use crate::{
    limits::count_timeout, limits::drain::Drain, limits::Listener, limits::PodLimits,
    limits::Stage, telemetry::metrics::Metrics,
};

/// How long a kept-alive HTTP/1.1 connection may sit idle during a drain before it is
/// closed: a client that is sending requests gets `Connection: close` on its next
/// response well before this.
pub(crate) const HTTP1_DRAIN_IDLE: Duration = Duration::from_secs(1);

/// What one served connection has done so far, shared by its requests.
pub(crate) struct Activity {
    drain: Drain,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    /// When the connection opened, then when the last request's response head was
    /// ready.
    last: Mutex<Instant>,
    http2: AtomicBool,
}

/// One request in flight; ends when its response head is ready ([`InFlight::respond`])
/// or the request fails (dropped).
pub(crate) struct InFlight {
    activity: Arc<Activity>,
    version: Version,
}

impl InFlight {
    /// The response head is ready: an HTTP/1.x response of a draining agent is marked
    /// as the connection's last (`Connection: close`), and the request ends.
    pub(crate) fn respond<B>(self, response: &mut Response<B>) {
        if self.activity.drain.is_draining() && self.version != Version::HTTP_2 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.activity.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    pub(crate) fn new(drain: &Drain) -> Arc<Activity> {
        Arc::new(Activity {
            drain: drain.clone(),
            requests: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            http2: AtomicBool::new(false),
        })
    }

    /// A request of `version` begins.
    pub(crate) fn begin(self: &Arc<Self>, version: Version) -> InFlight {
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            activity: self.clone(),
            version,
        }
    }

    /// Requests begun on the connection so far.
    pub(crate) fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn idle_for(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && self.last().elapsed() >= idle
    }
}

/// What the connection's driver does next.
pub(crate) enum Step {
    /// Shut the connection down gracefully (GOAWAY; HTTP/1.1: after the response in
    /// flight).
    Close,
    /// No request came within the header timeout (counted): drop the connection.
    NoRequest,
}

/// The timeouts and the drain of one served connection (see the module's text). Its
/// driver serves the connection and acts on each [`Lifecycle::next`] step:
///
/// ```text
/// loop { select! { r = serving => break r, step = lifecycle.next() => act(step) } }
/// ```
pub(crate) struct Lifecycle<'a> {
    activity: &'a Activity,
    limits: &'a PodLimits,
    metrics: &'a Metrics,
    listener: Listener,
    first_request_by: Instant,
    draining: bool,
    closing: bool,
}

impl<'a> Lifecycle<'a> {
    /// Timeouts are counted for `listener`.
    pub(crate) fn new(
        activity: &'a Activity,
        limits: &'a PodLimits,
        metrics: &'a Metrics,
        listener: Listener,
    ) -> Lifecycle<'a> {
        Lifecycle {
            activity,
            limits,
            metrics,
            listener,
            first_request_by: Instant::now() + limits.header_timeout,
            draining: false,
            closing: false,
        }
    }

    /// The next step; never resolves once the connection is closing. Cancel-safe:
    /// the state changes only as a step is returned.
    pub(crate) async fn next(&mut self) -> Step {
        let activity = self.activity;
        loop {
            if self.closing {
                return std::future::pending().await;
            }
            let mut check = if activity.requests() == 0 {
                self.first_request_by
            } else {
                activity.last() + self.limits.http_idle_timeout
            };
            if self.draining {
                check = check.min(activity.last() + HTTP1_DRAIN_IDLE);
            }
            tokio::select! {
                _ = activity.drain.started(), if !self.draining => {
                    self.draining = true;
                    if activity.http2.load(Ordering::Relaxed) {
                        self.closing = true;
                        return Step::Close;
                    }
                }
                _ = tokio::time::sleep_until(check) => {
                    if self.draining && activity.idle_for(HTTP1_DRAIN_IDLE) {
                        self.closing = true;
                        return Step::Close;
                    }
                    if activity.requests() == 0 {
                        count_timeout(self.metrics, self.listener, Stage::Header);
                        self.closing = true;
                        return Step::NoRequest;
                    }
                    if activity.idle_for(self.limits.http_idle_timeout) {
                        count_timeout(self.metrics, self.listener, Stage::Idle);
                        self.closing = true;
                        return Step::Close;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_responses_carry_connection_close_once_draining_and_http2_goes_away() {
        let drain = Drain::default();
        let activity = Activity::new(&drain);
        let mut before = Response::new(());
        activity.begin(Version::HTTP_11).respond(&mut before);
        assert!(before.headers().get("connection").is_none());
        assert!(!activity.http2.load(Ordering::Relaxed));
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);
        drain.start();
        let mut after = Response::new(());
        activity.begin(Version::HTTP_11).respond(&mut after);
        assert_eq!(after.headers()["connection"], "close");
        let h2_request = activity.begin(Version::HTTP_2);
        assert!(activity.http2.load(Ordering::Relaxed));
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 1);
        let mut h2 = Response::new(());
        h2_request.respond(&mut h2);
        assert!(h2.headers().get("connection").is_none());
        assert_eq!(activity.in_flight.load(Ordering::Relaxed), 0);
    }
}
