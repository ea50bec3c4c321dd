//! A downstream (application) connection to an HTTP-routed Service: HTTP/1.1 or HTTP/2
//! prior knowledge, told apart by the first bytes, each request handed to the router.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use crate::{
    limits, limits::served::Activity, limits::served::Lifecycle, limits::served::Step,
    limits::Listener, limits::PodSlot, limits::Refusal, limits::Stage, proxy::pod::PodContext,
    telemetry::connections::ByteCounters, telemetry::connections::ConnectionInfo,
    telemetry::outcome::ConnectionEnd,
};
use crate::{
    proxy::http::box_body, proxy::http::forward::handle, proxy::http::forward::Frontend,
    proxy::http::BoxError, proxy::http::ProxyBody,
};

/// Counts the bytes of the downstream connection for its record and TCP metrics.
struct Counted {
    stream: TcpStream,
    counters: Arc<ByteCounters>,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.counters
            .to_server
            .fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            this.counters
                .to_client
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A response body that keeps its request's budget slot until it ends.
struct Held {
    body: ProxyBody,
    _slot: PodSlot,
}

impl Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// 503 for a request past the pod's bound, counted as `pod_connection_limit`.
fn over_budget(ctx: &PodContext) -> Response<ProxyBody> {
    let reason = Refusal::PodConnectionLimit;
    ctx.metrics
        .refused
        .with_label_values(&[reason.name()])
        .inc();
    limits::count_refusal(&ctx.metrics, Listener::Http, reason);
    debug!(pod = %ctx.pod, limit = ctx.limits.max_connections, "HTTP/2 request refused: the pod is at its connection bound");
    let text = format!(
        "nodemesh: this pod has {} connections and requests in flight, its bound (--max-connections-per-pod)\n",
        ctx.limits.max_connections
    );
    let mut response = Response::new(box_body(Full::new(Bytes::from(text))));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response
}

/// The largest request header block on the L7 proxy (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE).
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// Serves `stream` until the application closes it; the connection is recorded like
/// any other outbound connection, its requests each get their own log line. Its first
/// request must arrive within the header timeout (HTTP/1.1: every request head), and a
/// connection with no request in flight for the HTTP idle timeout is closed gracefully.
pub(crate) async fn serve(
    stream: TcpStream,
    info: ConnectionInfo,
    frontend: Frontend,
    ctx: Arc<PodContext>,
) {
    let conn = ctx.connections.open(info);
    let frontend = Arc::new(frontend);
    let limits = ctx.limits;
    let activity = Activity::new(&ctx.drain);
    let service = {
        let (ctx, activity) = (ctx.clone(), activity.clone());
        service_fn(move |request: Request<Incoming>| {
            let in_flight = activity.begin(request.version());
            let (ctx, frontend) = (ctx.clone(), frontend.clone());
            async move {
                // An HTTP/2 connection carries many requests at once, each of which
                // may hold an upstream connection: each takes a slot of the pod's
                // outbound budget until its response ends. (An HTTP/1.1 connection's
                // one request is covered by the connection's own slot.)
                let slot = match request.version() {
                    Version::HTTP_2 => match ctx.budget.admit(Listener::Http) {
                        Some(slot) => Some(slot),
                        None => return Ok(over_budget(&ctx)),
                    },
                    _ => None,
                };
                let mut response = handle(request, ctx, frontend).await?;
                in_flight.respond(&mut response);
                Ok::<_, Infallible>(match slot {
                    Some(slot) => response.map(|body| box_body(Held { body, _slot: slot })),
                    None => response,
                })
            }
        })
    };
    let io = TokioIo::new(Counted {
        stream,
        counters: conn.shared_counters(),
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .max_concurrent_streams(limits.max_streams())
        .max_header_list_size(MAX_HEADER_LIST);
    let serving = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(serving);
    let mut lifecycle = Lifecycle::new(&activity, &limits, &ctx.metrics, Listener::Http);
    let result = loop {
        tokio::select! {
            result = serving.as_mut() => break result,
            step = lifecycle.next() => match step {
                Step::Close => serving.as_mut().graceful_shutdown(),
                Step::NoRequest => {
                    debug!(pod = %ctx.pod, "no request within the header timeout; closing");
                    conn.close(ConnectionEnd::HeaderTimeout);
                    return;
                }
            },
        }
    };
    match result {
        Ok(()) => conn.close(ConnectionEnd::CompletedHttp),
        Err(e) => {
            debug!(pod = %ctx.pod, error = %e, "downstream HTTP connection ended with an error");
            let timed_out = e
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout);
            if timed_out {
                limits::count_timeout(&ctx.metrics, Listener::Http, Stage::Header);
                conn.close(ConnectionEnd::HeaderTimeout);
                return;
            }
            ctx.metrics
                .refused
                .with_label_values(&["http_protocol_error"])
                .inc();
            conn.close(ConnectionEnd::HttpError(e.to_string()));
        }
    }
}
