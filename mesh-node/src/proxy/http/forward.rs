//! One HTTP request on an L7-routed Service: pick the rule, apply its filters, choose
//! a backend by weight, send (with timeouts and retries), and shape the response.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    header::{self, HeaderValue},
    request::Parts,
    HeaderMap, Request, Response, StatusCode, Version,
};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::debug;

use crate::{
    discovery::cluster::ClusterState, keys::ObjectKey, proxy::pod::PodContext,
    telemetry::connections::Security,
};
use crate::{
    proxy::http::box_body, proxy::http::held::Held, proxy::http::message::is_idempotent,
    proxy::http::message::is_upgrade, proxy::http::message::request_body,
    proxy::http::message::strip_hop_by_hop, proxy::http::message::RequestBody, proxy::http::mirror,
    proxy::http::pool::StreamSlot, proxy::http::pooled::UpstreamBody, proxy::http::upstream,
    proxy::http::upstream::peer_of, proxy::http::upstream::upstream_request,
    proxy::http::upstream::Protocol, proxy::http::upstream::SendOptions,
    proxy::http::upstream::UpstreamError, proxy::http::ProxyBody, routing::balancer::Outcome,
    routing::hash_key::KeyedRequest, routing::http::filters::authority,
    routing::http::filters::RequestAction, routing::http::matching::PathMatch,
    routing::http::routes::BackendTarget, routing::http::routes::Rule, routing::plan,
    routing::plan::RequestPlan, routing::plan::RequestRefusal, routing::pool::Overflow,
    routing::pool::Pool, routing::pool::RequestPermit, routing::pool::RetryPermit,
    telemetry::outcome::ResponseFlags, telemetry::request::flags, telemetry::request::LoggedBody,
    telemetry::request::RequestLog, telemetry::spans::SpanInFlight, telemetry::spans::SpanKind,
};

/// The longest wait between retries, whatever the backoff doubling reaches.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The Service port a downstream connection was sent to.
#[derive(Debug, Clone)]
pub(crate) struct Frontend {
    pub service: ObjectKey,
    pub port: u16,
    pub want_v6: bool,
    /// The Service port declares HTTP/2 cleartext (`appProtocol: kubernetes.io/h2c`).
    pub backend_http2: bool,
    pub src: SocketAddr,
}

enum Failure {
    /// The chosen backend is invalid: 500.
    Invalid(String),
    /// The chosen backend has no ready endpoint: 503.
    NoEndpoint(ObjectKey),
    Upstream(UpstreamError),
    Timeout,
    /// The destination's connection pool is full (circuit breaking): 503 `UO`.
    Overflow(Overflow),
    /// The last attempt failed and its retry was not made because the destination's
    /// `http.maxRetries` were outstanding: that failure's answer, flag `UO`.
    RetryOverflow {
        last: Box<Failure>,
        overflow: Overflow,
    },
}

impl Failure {
    fn retriable(&self, replayable: bool, idempotent: bool) -> bool {
        match self {
            Failure::Invalid(_)
            | Failure::Upstream(UpstreamError::Denied { .. })
            | Failure::Overflow(_)
            | Failure::RetryOverflow { .. } => false,
            Failure::NoEndpoint(_) => true,
            Failure::Upstream(e) => e.before_sending() || (replayable && idempotent),
            Failure::Timeout => replayable && idempotent,
        }
    }

    fn response(&self) -> (StatusCode, ResponseFlags, String) {
        match self {
            Failure::Invalid(reason) => (StatusCode::INTERNAL_SERVER_ERROR, flags::LOCAL_REPLY, reason.clone()),
            Failure::NoEndpoint(b) => (
                StatusCode::SERVICE_UNAVAILABLE,
                flags::NO_HEALTHY_UPSTREAM,
                format!("backend Service {b} has no ready endpoint; check its pods' readiness and its EndpointSlices"),
            ),
            Failure::Upstream(e @ UpstreamError::Denied { .. }) => {
                (StatusCode::FORBIDDEN, flags::DENIED, e.to_string())
            }
            Failure::Upstream(e) if e.before_sending() => {
                (StatusCode::SERVICE_UNAVAILABLE, flags::UPSTREAM_CONNECT_FAILURE, e.to_string())
            }
            Failure::Upstream(e) => (StatusCode::BAD_GATEWAY, flags::UPSTREAM_CONNECT_FAILURE, e.to_string()),
            Failure::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                flags::UPSTREAM_TIMEOUT,
                "the backend did not answer within the route's timeout".into(),
            ),
            Failure::Overflow(o) => (
                StatusCode::SERVICE_UNAVAILABLE,
                flags::UPSTREAM_OVERFLOW,
                o.to_string(),
            ),
            Failure::RetryOverflow { last, overflow } => {
                let (status, _, text) = last.response();
                (
                    status,
                    flags::UPSTREAM_OVERFLOW,
                    format!("{text}; not retried: {overflow}"),
                )
            }
        }
    }
}

fn local_response(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut response = Response::new(box_body(Full::new(Bytes::from(format!(
        "nodemesh: {text}\n"
    )))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn logged(
    mut log: RequestLog,
    ctx: &PodContext,
    response: Response<ProxyBody>,
) -> Response<ProxyBody> {
    let status = response.status().as_u16();
    if log.flags == flags::NONE && status >= 500 && log.detail.is_empty() {
        log.detail = "backend answered with an error".into();
    }
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        box_body(LoggedBody::new(body, log, ctx.metrics.clone(), status)),
    )
}

fn reply(
    mut log: RequestLog,
    ctx: &PodContext,
    status: StatusCode,
    flag: ResponseFlags,
    text: String,
) -> Response<ProxyBody> {
    if status.is_server_error() {
        crate::warn_limited!(pod = %log.pod, service = %log.service, route = %log.rule, %status, reason = %text, "request answered by the proxy");
    }
    log.flags = flag;
    log.detail = text.clone();
    logged(log, ctx, local_response(status, &text))
}

struct Attempt {
    response: Response<UpstreamBody>,
    backend: BackendTarget,
    /// The consistent-hash cookie the proxy made up, to set on the response.
    set_cookie: Option<HeaderValue>,
    /// The request's place in its destination's connection pool, held until the
    /// response body ends.
    permit: Option<RequestPermit>,
    /// Its stream on an HTTP/2 connection under `maxConcurrentStreams`, held as long.
    stream: Option<StreamSlot>,
}

/// Sends one attempt to the next weighted backend of `rule`.
/// What every attempt of one request shares: routed once, against one snapshot.
struct Exchange<'a> {
    ctx: &'a PodContext,
    frontend: &'a Frontend,
    state: &'a Arc<ClusterState>,
    rule: &'a Rule,
    parts: &'a Parts,
    upgrade: bool,
}

/// One attempt; `tried` is set to the connection pool of the backend it went to (None:
/// its policy bounds nothing), against which a retry of it is counted.
async fn attempt(
    x: &Exchange<'_>,
    body: &mut RequestBody,
    log: &mut RequestLog,
    tried: &mut Option<Arc<Pool>>,
) -> Result<Attempt, Failure> {
    let Exchange {
        ctx,
        frontend,
        state,
        rule,
        parts,
        upgrade,
    } = *x;
    *tried = None;
    let keys = KeyedRequest {
        parts,
        src: frontend.src,
        source_ip: ctx.client_ip(frontend.src, frontend.want_v6),
    };
    let planned = plan::request_keyed(
        &ctx.router.table(state),
        state,
        &ctx.balancer,
        &ctx.splits,
        &frontend.service,
        frontend.port,
        rule,
        Some(&keys),
    );
    // The chosen backend is logged whatever becomes of the request.
    let chosen = planned
        .as_ref()
        .map_or_else(|r| r.target(), |p| Some(p.target));
    if let Some(target) = chosen {
        log.backend = Some(target.backend.service.clone());
    }
    let RequestPlan {
        target,
        endpoint,
        pick,
        set_cookie,
    } = planned.map_err(|refusal| match refusal {
        RequestRefusal::NoWeightedBackend => Failure::Invalid(format!(
            "rule {} has no backend with a positive weight",
            rule.describe()
        )),
        RequestRefusal::InvalidBackend { reason, .. } => Failure::Invalid(reason.to_string()),
        RequestRefusal::NoReadyEndpoint { target } => {
            Failure::NoEndpoint(target.backend.service.clone())
        }
    })?;
    let peer = peer_of(state, &endpoint);
    log.upstream = Some(endpoint.addr);
    log.destination_workload = endpoint.pod().cloned();
    log.destination_principal = peer.identity.as_ref().map(|i| i.to_string());
    log.security = peer.security;
    let protocol = if parts.version == Version::HTTP_2 || frontend.backend_http2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    *tried = ctx.pools.pool(&target.backend);
    let permit = match tried {
        Some(pool) => Some(
            pool.request(protocol == Protocol::Http1)
                .await
                .map_err(Failure::Overflow)?,
        ),
        None => None,
    };
    let request = upstream_request(
        parts,
        body.take(),
        protocol,
        &target.filters,
        &authority(parts).unwrap_or_default(),
    )
    .map_err(Failure::Invalid)?;
    let sent = Instant::now();
    let opts = SendOptions {
        upgrade,
        limits: target.backend.policy.connection_pool.unwrap_or_default(),
        pool: tried.clone(),
    };
    let send = upstream::send(ctx, endpoint.addr, &peer, protocol, request, opts, &pick);
    let response = match rule.backend_timeout {
        Some(t) => tokio::time::timeout(t, send).await.map_err(|_| {
            pick.report(Outcome::Timeout);
            Failure::Timeout
        })?,
        None => send.await,
    }
    .map_err(|e| match e {
        UpstreamError::Overflow(o) => Failure::Overflow(o),
        e => {
            if let UpstreamError::Request { .. } = e {
                pick.report(Outcome::Reset);
            }
            Failure::Upstream(e)
        }
    })?;
    let upstream::Sent { response, stream } = response;
    pick.report(Outcome::Http {
        status: response.status().as_u16(),
        latency: sent.elapsed(),
    });
    drop(pick);
    Ok(Attempt {
        response,
        backend: target.clone(),
        set_cookie,
        permit,
        stream,
    })
}

/// Attempts until one succeeds, the retry policy is spent, a failure is final, or the
/// destination has `http.maxRetries` retries outstanding (the last attempt's answer
/// stands, flag `UO`). A retry holds its permit from the decision, through the backoff,
/// until its attempt has its answer; dropping this future (timeout, client gone)
/// returns it.
async fn attempts(
    x: &Exchange<'_>,
    mut body: RequestBody,
    log: &mut RequestLog,
) -> Result<Attempt, Failure> {
    let Exchange {
        ctx,
        frontend,
        rule,
        parts,
        upgrade,
        ..
    } = *x;
    let replayable = matches!(body, RequestBody::Replayable(_));
    let idempotent = is_idempotent(&parts.method);
    let policy = rule.retry.as_ref().filter(|_| !upgrade);
    let mut retries_left = policy.map(|p| p.attempts).unwrap_or(0);
    let mut backoff = policy.map(|p| p.backoff).unwrap_or_default();
    let mut tried = None;
    let mut retrying: Option<RetryPermit> = None;
    loop {
        let result = attempt(x, &mut body, log, &mut tried).await;
        // The retried attempt (if this was one) has its answer.
        drop(retrying.take());
        let retry = match (&result, policy) {
            (_, None) => false,
            (Ok(a), Some(p)) => replayable && p.codes.contains(&a.response.status().as_u16()),
            (Err(f), Some(_)) => f.retriable(replayable, idempotent),
        };
        if !retry || retries_left == 0 {
            if retry {
                log.flags = if result.is_ok() {
                    flags::RETRY_LIMIT
                } else {
                    log.flags
                };
            }
            return result;
        }
        if let Some(pool) = &tried {
            match pool.retry() {
                Ok(permit) => retrying = Some(permit),
                Err(overflow) => {
                    debug!(pod = %log.pod, %overflow, "retry not made");
                    return match result {
                        Ok(a) => {
                            log.flags = flags::UPSTREAM_OVERFLOW;
                            log.detail = format!("not retried: {overflow}");
                            Ok(a)
                        }
                        Err(last) => Err(Failure::RetryOverflow {
                            last: Box::new(last),
                            overflow,
                        }),
                    };
                }
            }
        }
        if let Err(Failure::Upstream(e)) = &result {
            debug!(pod = %log.pod, error = %e, "retrying");
        }
        // This attempt is over: its response (and its place in the pool) goes now, not
        // after the backoff.
        drop(result);
        retries_left -= 1;
        log.retries += 1;
        ctx.metrics
            .request_retries
            .with_label_values(&[&frontend.service.to_string()])
            .inc();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF.max(backoff));
    }
}

fn apply_response_headers(headers: &mut HeaderMap, rule: &Rule, backend: Option<&BackendTarget>) {
    rule.filters.apply_response(headers);
    if let Some(b) = backend {
        b.filters.apply_response(headers);
    }
}

/// Joins the two upgraded halves (e.g. a WebSocket) once both sides have switched.
fn splice_upgrade(
    downstream: hyper::upgrade::OnUpgrade,
    response: &mut Response<UpstreamBody>,
    pod: String,
) {
    let upstream = hyper::upgrade::on(response);
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                    debug!(%pod, error = %e, "upgraded connection ended");
                }
            }
            Err(e) => crate::warn_limited!(%pod, error = %e, "protocol upgrade failed"),
        }
    });
}

/// Serves one request of a downstream connection.
pub(crate) async fn handle(
    mut request: Request<Incoming>,
    ctx: Arc<PodContext>,
    frontend: Arc<Frontend>,
) -> Result<Response<ProxyBody>, Infallible> {
    let upgrade = is_upgrade(&request);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    let state = ctx.state.borrow().clone();
    let telemetry = state.telemetry_for(&ctx.pod);
    let tracing = ctx.tracer.settings(&telemetry.client);
    let (trace_id, span) = SpanInFlight::begin(SpanKind::Client, &tracing, &mut parts.headers);
    let mut log = RequestLog {
        started: std::time::Instant::now(),
        pod: ctx.pod.clone(),
        src: frontend.src,
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        authority: authority(&parts).unwrap_or_default(),
        protocol: if parts.version == Version::HTTP_2 {
            "http/2"
        } else {
            "http/1.1"
        },
        trace_id,
        span,
        access_log: telemetry.logs(),
        service: frontend.service.clone(),
        rule: String::new(),
        backend: None,
        upstream: None,
        source_principal: ctx.identity.to_string(),
        destination_principal: None,
        destination_workload: None,
        security: Security::None,
        retries: 0,
        flags: flags::NONE,
        detail: String::new(),
    };
    let table = ctx
        .http_routes
        .table(&state, &frontend.service, frontend.port, frontend.want_v6);
    let Some((matched, rule)) = table.select(&parts) else {
        let text = format!(
            "no HTTPRoute rule for {}:{} matches {} {}; check the route's matches with `meshctl node routes`",
            frontend.service, frontend.port, parts.method, parts.uri.path()
        );
        return Ok(reply(
            log,
            &ctx,
            StatusCode::NOT_FOUND,
            flags::NO_ROUTE,
            text,
        ));
    };
    let (matched, rule): (PathMatch, Arc<Rule>) = (matched.path.clone(), rule.clone());
    log.rule = rule.describe();
    if let Some(reason) = &rule.invalid {
        let text = format!("rule {} is invalid: {reason}", rule.describe());
        return Ok(reply(
            log,
            &ctx,
            StatusCode::INTERNAL_SERVER_ERROR,
            flags::LOCAL_REPLY,
            text,
        ));
    }
    if let Some(fault) = &rule.fault {
        let draw = fault.draw();
        if let Some(delay) = draw.delay {
            tokio::time::sleep(delay).await;
            log.flags = flags::DELAY_INJECTED;
        }
        if let Some(status) = draw.abort {
            let text = format!("fault injected by rule {}", rule.describe());
            return Ok(reply(log, &ctx, status, flags::FAULT_INJECTED, text));
        }
    }
    match rule.filters.apply_request(&mut parts, &matched) {
        Ok(RequestAction::Forward) => {}
        Ok(RequestAction::Redirect { status, location }) => {
            let mut response = local_response(status, &format!("redirecting to {location}"));
            if let Ok(v) = HeaderValue::try_from(location.as_str()) {
                response.headers_mut().insert(header::LOCATION, v);
            }
            apply_response_headers(response.headers_mut(), &rule, None);
            log.flags = flags::LOCAL_REPLY;
            return Ok(logged(log, &ctx, response));
        }
        Err(e) => {
            return Ok(reply(
                log,
                &ctx,
                StatusCode::INTERNAL_SERVER_ERROR,
                flags::LOCAL_REPLY,
                e,
            ));
        }
    }
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let keep = rule.retry.is_some() || !rule.mirrors.is_empty();
    let body = match request_body(body, &parts, keep).await {
        Ok(b) => b,
        Err(e) => {
            return Ok(reply(
                log,
                &ctx,
                StatusCode::BAD_REQUEST,
                flags::DOWNSTREAM_CLOSED,
                e,
            ))
        }
    };
    if !rule.mirrors.is_empty() && !upgrade {
        let whole = match &body {
            RequestBody::Replayable(bytes) => Some(bytes),
            RequestBody::Streaming(_) => None,
        };
        mirror::copy(&ctx, &state, &rule, &parts, whole);
    }
    let exchange = Exchange {
        ctx: &ctx,
        frontend: &frontend,
        state: &state,
        rule: &rule,
        parts: &parts,
        upgrade,
    };
    let run = attempts(&exchange, body, &mut log);
    let result = match rule.request_timeout {
        Some(t) => tokio::time::timeout_at(Instant::now() + t, run)
            .await
            .unwrap_or(Err(Failure::Timeout)),
        None => run.await,
    };
    match result {
        Ok(Attempt {
            mut response,
            backend,
            set_cookie,
            permit,
            stream,
        }) => {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(down) = downstream_upgrade {
                    splice_upgrade(down, &mut response, ctx.pod.to_string());
                }
            } else {
                strip_hop_by_hop(response.headers_mut(), false);
            }
            apply_response_headers(response.headers_mut(), &rule, Some(&backend));
            if let Some(cookie) = set_cookie {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            let (parts, body) = response.into_parts();
            let body = box_body(Held::new(box_body(body), permit, stream));
            Ok(logged(log, &ctx, Response::from_parts(parts, body)))
        }
        Err(failure) => {
            let (status, flag, text) = failure.response();
            Ok(reply(log, &ctx, status, flag, text))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;

    #[test]
    fn requests_keep_their_authority_in_both_protocols() {
        let parts = Request::builder()
            .uri("/a?b=1")
            .header("host", "echo")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let none = crate::routing::http::filters::Filters::default();
        // As an attempt sends it: the request's own authority.
        let own = authority(&parts).unwrap();
        let h1 =
            upstream_request(&parts, box_body(Empty::new()), Protocol::Http1, &none, &own).unwrap();
        assert_eq!(h1.uri(), "/a?b=1");
        assert_eq!(h1.headers().get("host").unwrap(), "echo");
        let h2 =
            upstream_request(&parts, box_body(Empty::new()), Protocol::Http2, &none, &own).unwrap();
        assert_eq!(h2.uri(), "http://echo/a?b=1");
        assert!(h2.headers().get("host").is_none());
    }
}
