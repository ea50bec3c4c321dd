//! Inbound HTTP at the destination: a connection to a pod port that policies with HTTP
//! attributes (or a RequestAuthentication) cover is served as HTTP/1.1 or HTTP/2, and
//! each request is authenticated (JWT: 401 when a token fails) and authorized (403
//! `RBAC: access denied`, flag `RBAC`) by this node's agent before it reaches the
//! application. No waypoint: the decision is taken where the destination's identity is
//! vouched for. Bytes that are not HTTP are refused (`not_http`) and the connection
//! closed: fail closed.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::{body::Incoming, client::conn, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Mutex,
};
use tracing::debug;

use crate::{
    discovery::cluster::ClusterState, identity::authz::admit, identity::authz::authorize_request,
    identity::authz::Admission, identity::authz::ConnectionFacts, identity::authz::RequestFacts,
    identity::jwt::Authentication, limits, limits::served::Activity, limits::served::Lifecycle,
    limits::served::Step, limits::Listener, limits::Stage, proxy::http::box_body,
    proxy::http::driven::DrivenHttp1, proxy::http::message::strip_hop_by_hop,
    proxy::http::ProxyBody, proxy::pod::connect_in_pod, proxy::pod::PodContext,
    telemetry::connections::Security, telemetry::inbound_request::InboundRequestLog,
    telemetry::outcome::ConnectionEnd, telemetry::outcome::RefusalReason,
    telemetry::outcome::ResponseFlags, telemetry::spans::SpanInFlight, telemetry::spans::SpanKind,
};

/// The largest request header block (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE; HTTP/1.1's
/// read buffer): more is refused with 431 (HTTP/1.1) or a stream reset (HTTP/2).
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// The inbound decision for a connection to the local pod: [`admit`]'s, the one
/// `meshctl node trace` shows (HTTP for a pod a RequestAuthentication selects, even
/// where the policies alone would allow it at L4).
pub(crate) fn admission(
    ctx: &PodContext,
    state: &ClusterState,
    facts: &ConnectionFacts,
) -> Admission {
    admit(state, &ctx.pod, facts)
}

/// The body of a request the policies refuse, as Istio's proxies answer it.
pub(crate) const RBAC_DENIED_BODY: &str = "RBAC: access denied";

/// The connection into the pod that allowed requests go on, made on the first one.
/// HTTP/1.1 requests come one at a time from the task serving the downstream
/// connection, which also drives the upstream one; HTTP/2 streams are served by tasks
/// of their own and share a spawned connection.
enum Upstream {
    None,
    Http1(DrivenHttp1),
    Http2(conn::http2::SendRequest<ProxyBody>),
}

/// What every request of one inbound connection shares.
struct Connection {
    ctx: Arc<PodContext>,
    facts: ConnectionFacts,
    security: Security,
    upstream: Mutex<Upstream>,
}

fn local_reply(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut response = Response::new(box_body(Full::new(Bytes::from(text))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Serves `io`, a connection (plaintext, or an HBONE stream already accepted) to
/// `facts.destination` of the local pod, until it ends; returns how it ended. The first
/// request must come within the header timeout, and a connection with no request for
/// the HTTP idle timeout is closed.
pub(crate) async fn serve<IO>(
    io: IO,
    facts: ConnectionFacts,
    ctx: Arc<PodContext>,
    security: Security,
) -> ConnectionEnd
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(Connection {
        ctx: ctx.clone(),
        facts,
        security,
        upstream: Mutex::new(Upstream::None),
    });
    let activity = Activity::new(&ctx.drain);
    let service = {
        let (shared, activity) = (shared.clone(), activity.clone());
        service_fn(move |request: Request<Incoming>| {
            let in_flight = activity.begin(request.version());
            let shared = shared.clone();
            async move {
                let mut response = handle(request, &shared).await;
                in_flight.respond(&mut response);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let limits = ctx.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_LIST as usize);
    builder
        .http2()
        .max_concurrent_streams(limits.max_streams())
        .max_header_list_size(MAX_HEADER_LIST);
    let serving = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(serving);
    let mut lifecycle = Lifecycle::new(&activity, &limits, &ctx.metrics, Listener::Http);
    let result = loop {
        tokio::select! {
            result = serving.as_mut() => break result,
            step = lifecycle.next() => match step {
                Step::Close => serving.as_mut().graceful_shutdown(),
                Step::NoRequest => return ConnectionEnd::HeaderTimeout,
            },
        }
    };
    match result {
        Ok(()) => ConnectionEnd::CompletedHttp,
        Err(e) => {
            let timed_out = e
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout);
            if timed_out {
                limits::count_timeout(&ctx.metrics, Listener::Http, Stage::Header);
                return ConnectionEnd::HeaderTimeout;
            }
            let served = activity.requests() > 0;
            // Nothing HTTP came at all: the port's policies need HTTP, so this is
            // refused, not relayed.
            if !served {
                let reason = RefusalReason::NotHttp;
                ctx.metrics
                    .refused
                    .with_label_values(&[reason.name()])
                    .inc();
                crate::warn_limited!(pod = %ctx.pod, src = %shared.facts.source_ip, dst = %shared.facts.destination, reason = reason.name(), error = %e, "inbound connection refused: not HTTP, and policies judge each request on this port");
                return ConnectionEnd::Refused(reason);
            }
            ctx.metrics
                .refused
                .with_label_values(&["http_protocol_error"])
                .inc();
            debug!(pod = %ctx.pod, src = %shared.facts.source_ip, error = %e, "inbound HTTP connection ended with an error");
            ConnectionEnd::HttpError(e.to_string())
        }
    }
}

/// `:authority` (HTTP/2, absolute URIs) or `Host`, as sent.
fn host_of(parts: &http::request::Parts) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

async fn handle(request: Request<Incoming>, c: &Connection) -> Response<ProxyBody> {
    let ctx = &c.ctx;
    let state = ctx.state.borrow().clone();
    let (mut parts, body) = request.into_parts();
    // Before authentication reads the headers: a custom tag sees them as sent.
    let telemetry = state.telemetry_for(&ctx.pod);
    let tracing = ctx.tracer.settings(&telemetry.server);
    let (_, span) = SpanInFlight::begin(SpanKind::Server, &tracing, &mut parts.headers);
    let mut log = InboundRequestLog {
        started: Instant::now(),
        pod: ctx.pod.clone(),
        src: SocketAddr::new(c.facts.source_ip, 0),
        source_workload: state.pod_by_ip(c.facts.source_ip).cloned(),
        source_principal: c.facts.peer.as_ref().map(|p| p.to_string()),
        destination_principal: ctx.identity.to_string(),
        security: c.security,
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        authority: host_of(&parts),
        protocol: protocol_name(parts.version),
        request_principal: None,
        policy: None,
        detail: String::new(),
        audited: Vec::new(),
        span,
        access_log: telemetry.logs(),
    };
    let auth = match ctx.jwt.authenticate(&state, &ctx.pod, &mut parts) {
        Authentication::NoToken => None,
        Authentication::Valid(auth) => Some(auth),
        Authentication::Invalid(why) => {
            log.detail = format!("JWT: {why}");
            crate::warn_limited!(pod = %ctx.pod, src = %c.facts.source_ip, reason = %why, "request refused: its JWT failed verification");
            log.finish(&ctx.metrics, 401, ResponseFlags::Denied);
            let mut response = local_reply(
                StatusCode::UNAUTHORIZED,
                format!("Jwt verification fails: {why}"),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"nodemesh\", error=\"invalid_token\""),
            );
            return response;
        }
    };
    log.request_principal = auth.as_ref().map(|a| a.principal.clone());
    // Policies see the request as authentication left it (as Istio's do): the token
    // header removed, claim headers set, and a client's own value for them dropped.
    let verdict = authorize_request(
        &state,
        &ctx.pod,
        &c.facts,
        &RequestFacts {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            host: &log.authority,
            headers: &parts.headers,
            auth: auth.as_ref(),
        },
    );
    for policy in &verdict.audited {
        tracing::info!(pod = %ctx.pod, src = %c.facts.source_ip, method = %log.method, path = %log.path, policy = %policy, allowed = verdict.allowed, "AUDIT policy matched");
    }
    log.audited = verdict.audited.clone();
    log.policy = verdict.policy.clone();
    log.detail = verdict.detail.clone();
    if !verdict.allowed {
        crate::warn_limited!(pod = %ctx.pod, src = %c.facts.source_ip, method = %log.method, path = %log.path, policy = verdict.policy.as_deref().unwrap_or(""), reason = %verdict.detail, "request denied by authorization policy");
        log.finish(&ctx.metrics, 403, ResponseFlags::Denied);
        return local_reply(StatusCode::FORBIDDEN, RBAC_DENIED_BODY.into());
    }
    drop(state);
    let keep_upgrade = false;
    strip_hop_by_hop(&mut parts.headers, keep_upgrade);
    let upstream_request = Request::from_parts(parts, box_body(body));
    match send(c, upstream_request).await {
        Ok(response) => {
            let (mut head, body) = response.into_parts();
            strip_hop_by_hop(&mut head.headers, false);
            log.finish(&ctx.metrics, head.status.as_u16(), ResponseFlags::None);
            Response::from_parts(head, body)
        }
        Err(why) => {
            debug!(pod = %ctx.pod, dst = %c.facts.destination, error = %why, "the application did not answer");
            log.detail = why.clone();
            log.finish(&ctx.metrics, 503, ResponseFlags::UpstreamConnectFailure);
            local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("nodemesh: {} did not answer: {why}\n", c.facts.destination),
            )
        }
    }
}

/// Sends an allowed request to the application on this connection's upstream
/// connection (made on first use, in the request's HTTP version; made again if the
/// application closed it).
async fn send(c: &Connection, request: Request<ProxyBody>) -> Result<Response<ProxyBody>, String> {
    let mut upstream = c.upstream.lock().await;
    let http2 = request.version() == Version::HTTP_2;
    let usable = match &mut *upstream {
        Upstream::Http1(s) => !http2 && s.ready().await.is_ok(),
        Upstream::Http2(s) => http2 && s.ready().await.is_ok(),
        Upstream::None => false,
    };
    if !usable {
        *upstream = connect(c, http2).await?;
    }
    match &mut *upstream {
        Upstream::Http1(s) => s
            .send(request)
            .await
            .map(|r| r.map(box_body))
            .map_err(|e| e.to_string()),
        Upstream::Http2(s) => {
            let mut s = s.clone();
            drop(upstream);
            s.send_request(request)
                .await
                .map(|r| r.map(box_body))
                .map_err(|e| e.to_string())
        }
        Upstream::None => Err("no connection".into()),
    }
}

/// How long a handshake with the application may take.
const APP_HANDSHAKE: Duration = Duration::from_secs(10);

async fn connect(c: &Connection, http2: bool) -> Result<Upstream, String> {
    let target = c.facts.destination;
    let tcp = connect_in_pod(&c.ctx, target, &Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let io = TokioIo::new(tcp);
    let handshake = async {
        if http2 {
            let (sender, connection) = conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    debug!(%target, error = %e, "inbound HTTP/2 connection to the application ended");
                }
            });
            Ok(Upstream::Http2(sender))
        } else {
            let (sender, connection) = conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Upstream::Http1(DrivenHttp1::new(sender, connection)))
        }
    };
    tokio::time::timeout(APP_HANDSHAKE, handshake)
        .await
        .map_err(|_| format!("no HTTP handshake with {target} within {APP_HANDSHAKE:?}"))?
}
