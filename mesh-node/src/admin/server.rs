//! The agent's HTTP surfaces: the admin API (JSON, localhost), Prometheus metrics, and
//! readiness. Each is a small route table over one shared server loop.

use std::{
    convert::Infallible,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::debug;

use crate::{
    admin::api::ConnectionsView, admin::api::ErrorView, admin::api::IndexView,
    admin::api::LogLevelView, admin::health, admin::state::unready_reason,
    admin::state::AdminState, admin::trace::HttpAttributes, admin::trace::TraceError, admin::views,
    admin::views::services_view, capture::dataplane::Dataplane,
    discovery::apiserver::DiscoveryHealth, identity::certificates::CertificateStore, limits,
    limits::Gate, telemetry::metrics::Metrics,
};

pub(crate) type HttpResponse = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> HttpResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json_response(value: &impl Serialize) -> HttpResponse {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode: {e}"),
        ),
    }
}

fn error(status: StatusCode, message: &str) -> HttpResponse {
    let body = serde_json::to_string(&ErrorView {
        error: message.to_string(),
    })
    .unwrap_or_default();
    respond(status, "application/json", body)
}

/// Decodes `%XX` and `+` in a query component.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query_params(query)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn trace_response(state: &AdminState, query: Option<&str>) -> HttpResponse {
    let params = query_params(query);
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let (Some(pod), Some(to)) = (get("pod"), get("to")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "pass ?pod=<namespace>/<name>&to=<host>:<port>",
        );
    };
    let http = HttpAttributes {
        method: get("method"),
        path: get("path"),
        headers: params
            .iter()
            .filter(|(k, _)| k == "header")
            .filter_map(|(_, v)| v.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    };
    match views::run_trace(state, &pod, &to, http) {
        Ok(trace) => json_response(&trace),
        Err(e @ TraceError::UnknownPod(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

const ENDPOINTS: [&str; 16] = [
    "/status",
    "/workloads",
    "/services",
    "/routes",
    "/certs",
    "/policies",
    "/connections",
    "/bpf",
    "/trace?pod=<ns>/<name>&to=<host>:<port>",
    "/discovery",
    "/config_dump",
    "/logging",
    "/access-log/flush",
    "/healthz/ready",
    "/stats/prometheus",
    "/",
];

pub(crate) fn admin_route(
    state: &AdminState,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> HttpResponse {
    match (method, path) {
        (&Method::GET, "/") => json_response(&IndexView {
            endpoints: ENDPOINTS.map(String::from).to_vec(),
        }),
        (&Method::GET, "/status") => json_response(&views::status(state)),
        (&Method::GET, "/routes") => json_response(&views::routes(state)),
        (&Method::GET, "/policies") => json_response(&views::policies(state)),
        (&Method::GET, "/trace") => trace_response(state, query),
        (&Method::GET, "/workloads") => json_response(&**state.workloads.borrow()),
        (&Method::GET, "/connections") => json_response(&ConnectionsView {
            live: state.connections.live(),
            closed: state.connections.closed(),
        }),
        (&Method::GET, "/bpf") => json_response(&views::bpf(state)),
        (&Method::GET, "/config_dump") => json_response(&state.config),
        (&Method::GET, "/logging") => json_response(&LogLevelView {
            level: state.log_level.get(),
        }),
        (&Method::POST, "/logging") => match query_param(query, "level") {
            Some(level) => match state.log_level.set(&level) {
                Ok(()) => json_response(&LogLevelView { level }),
                Err(e) => error(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid level `{level}`: {e}"),
                ),
            },
            None => error(
                StatusCode::BAD_REQUEST,
                "pass the new filter as ?level=debug",
            ),
        },
        (&Method::POST, "/access-log/flush") => {
            let flushed = flush_access_log();
            json_response(&serde_json::json!({ "flushed": flushed }))
        }
        (&Method::GET, "/healthz/ready") => readiness(
            state.metrics.draining.get() == 1,
            &state.ready,
            &state.discovery,
            &state.dataplane,
            state.certificates.as_deref(),
        ),
        (&Method::GET, "/discovery") => json_response(&state.discovery.snapshot()),
        (&Method::GET, "/certs") => json_response(
            &state
                .certificates
                .as_ref()
                .map(|c| c.status())
                .unwrap_or_default(),
        ),
        (&Method::GET, "/services") => json_response(&services_view(
            &state.state.borrow(),
            &state.config.service_cidrs,
            &state.balancer.picks(),
            Some(&state.balancer),
            Some(&state.pools),
        )),
        (&Method::GET, "/stats/prometheus") => {
            health::refresh(state);
            metrics_response(&state.metrics)
        }
        (_, path) => admin_method_not_allowed(path).unwrap_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint; try one of {ENDPOINTS:?}"),
            )
        }),
    }
}

/// Writes out the access log lines queued so far (they are otherwise written within
/// the writer's linger): for whoever reads the log right after a request. Waits at most
/// a second, off the runtime's workers when it runs on one.
fn flush_access_log() -> bool {
    let wait = || crate::telemetry::access_log::flush(Duration::from_secs(1));
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        _ => wait(),
    }
}

/// 405 for a known admin path asked with a method it does not answer.
fn admin_method_not_allowed(path: &str) -> Option<HttpResponse> {
    let known = ENDPOINTS.iter().any(|e| e.split('?').next() == Some(path));
    known.then(|| match path {
        "/logging" => method_not_allowed("GET, POST"),
        "/access-log/flush" => method_not_allowed("POST"),
        _ => method_not_allowed("GET"),
    })
}

pub(crate) fn readiness(
    draining: bool,
    ready: &AtomicBool,
    discovery: &DiscoveryHealth,
    dataplane: &Dataplane,
    certificates: Option<&CertificateStore>,
) -> HttpResponse {
    match unready_reason(draining, ready, discovery, dataplane, certificates) {
        None => respond(StatusCode::OK, "text/plain", "ready\n"),
        Some(why) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {why}\n"),
        ),
    }
}

pub(crate) fn metrics_response(metrics: &Metrics) -> HttpResponse {
    respond(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        metrics.encode(),
    )
}

/// Serves HTTP/1.1 on `listener`, answering every request with `route`, under the
/// gate's limits: over its caps a connection is accepted and closed at once.
pub(crate) async fn serve<F>(listener: TcpListener, gate: Arc<Gate>, route: F)
where
    F: Fn(&Method, &str, Option<&str>) -> HttpResponse + Send + Sync + 'static,
{
    let route = Arc::new(route);
    loop {
        let (stream, peer) = limits::accept(&listener, gate.listener(), gate.metrics()).await;
        let admitted = match gate.admit(peer.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                debug!(listener = gate.listener().name(), %peer, reason = refusal.name(), "connection refused at the cap");
                drop(stream);
                continue;
            }
        };
        let (route, gate) = (route.clone(), gate.clone());
        tokio::spawn(async move {
            let _admitted = admitted;
            let service = service_fn(move |req: Request<Incoming>| {
                let route = route.clone();
                async move {
                    Ok::<_, Infallible>(route(req.method(), req.uri().path(), req.uri().query()))
                }
            });
            if let Err(e) = limits::http::serve_http1(stream, service, &gate).await {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// The metrics listener's routes: `GET /metrics` (and `/stats/prometheus`) only.
pub(crate) fn metrics_route(
    method: &Method,
    path: &str,
    scrape: impl FnOnce() -> HttpResponse,
) -> HttpResponse {
    match path {
        "/metrics" | "/stats/prometheus" if is_read(method) => scrape(),
        "/metrics" | "/stats/prometheus" => method_not_allowed("GET"),
        _ => error(StatusCode::NOT_FOUND, "metrics are at GET /metrics"),
    }
}

/// The readiness listener's route: `GET /healthz/ready` only.
pub(crate) fn readiness_route(
    method: &Method,
    path: &str,
    ready: impl FnOnce() -> HttpResponse,
) -> HttpResponse {
    match path {
        "/healthz/ready" if is_read(method) => ready(),
        "/healthz/ready" => method_not_allowed("GET"),
        _ => error(StatusCode::NOT_FOUND, "readiness is at GET /healthz/ready"),
    }
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("this endpoint answers {allow} only"),
    );
    r.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(allow),
    );
    r
}

#[cfg(test)]
mod route_tests {
    use super::*;

    fn ok() -> HttpResponse {
        respond(StatusCode::OK, "text/plain", "ok")
    }

    #[test]
    fn metrics_and_readiness_answer_only_their_method_and_path() {
        assert_eq!(metrics_route(&Method::GET, "/metrics", ok).status(), 200);
        assert_eq!(
            metrics_route(&Method::GET, "/stats/prometheus", ok).status(),
            200
        );
        assert_eq!(metrics_route(&Method::POST, "/metrics", ok).status(), 405);
        assert_eq!(
            metrics_route(&Method::GET, "/healthz/ready", ok).status(),
            404
        );
        assert_eq!(
            readiness_route(&Method::GET, "/healthz/ready", ok).status(),
            200
        );
        assert_eq!(
            readiness_route(&Method::HEAD, "/healthz/ready", ok).status(),
            200
        );
        assert_eq!(
            readiness_route(&Method::DELETE, "/healthz/ready", ok).status(),
            405
        );
        assert_eq!(readiness_route(&Method::GET, "/metrics", ok).status(), 404);
        assert_eq!(readiness_route(&Method::GET, "/", ok).status(), 404);
    }

    #[test]
    fn admin_paths_refuse_other_methods() {
        assert_eq!(
            admin_method_not_allowed("/status").map(|r| r.status()),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert!(admin_method_not_allowed("/logging").is_some());
        assert!(admin_method_not_allowed("/nope").is_none());
    }
}
