//! What one HTTP request leaves behind: an access-log line and the request metrics,
//! written when its response body ends (or is abandoned), so durations and byte
//! counts cover the whole exchange.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::Serialize;

use crate::{
    keys::ObjectKey, keys::PodKey, telemetry::access_log, telemetry::connections::Security,
    telemetry::metrics::Metrics, telemetry::metrics::RequestLabels,
    telemetry::outcome::ResponseFlags, telemetry::request_line::as_text,
    telemetry::request_line::as_text_or_null, telemetry::request_line::RequestLine,
    telemetry::request_line::RequestSummary, telemetry::spans::SpanInFlight,
    telemetry::trace_context::TraceId,
};

/// The response flags a request can end with, under the names the HTTP path uses.
pub(crate) mod flags {
    use crate::telemetry::outcome::ResponseFlags;

    pub(crate) const NONE: ResponseFlags = ResponseFlags::None;
    /// No route rule matched.
    pub(crate) const NO_ROUTE: ResponseFlags = ResponseFlags::NoRoute;
    /// No healthy upstream: the chosen backend has no ready endpoint.
    pub(crate) const NO_HEALTHY_UPSTREAM: ResponseFlags = ResponseFlags::NoHealthyUpstream;
    /// Connecting to the upstream failed.
    pub(crate) const UPSTREAM_CONNECT_FAILURE: ResponseFlags =
        ResponseFlags::UpstreamConnectFailure;
    /// The upstream did not answer in time.
    pub(crate) const UPSTREAM_TIMEOUT: ResponseFlags = ResponseFlags::UpstreamTimeout;
    /// Retries exhausted on a retriable response.
    pub(crate) const RETRY_LIMIT: ResponseFlags = ResponseFlags::RetryLimit;
    /// Answered by the proxy itself (redirect, invalid rule).
    pub(crate) const LOCAL_REPLY: ResponseFlags = ResponseFlags::LocalReply;
    /// The destination's authorization policy refused the tunnel.
    pub(crate) const DENIED: ResponseFlags = ResponseFlags::Denied;
    /// The downstream went away before the response ended.
    pub(crate) const DOWNSTREAM_CLOSED: ResponseFlags = ResponseFlags::DownstreamClosed;
    /// The route's fault injection answered instead of a backend.
    pub(crate) const FAULT_INJECTED: ResponseFlags = ResponseFlags::FaultInjected;
    /// The route's fault injection delayed the request.
    pub(crate) const DELAY_INJECTED: ResponseFlags = ResponseFlags::DelayInjected;
    /// The destination's connection pool was full (circuit breaking).
    pub(crate) const UPSTREAM_OVERFLOW: ResponseFlags = ResponseFlags::UpstreamOverflow;
}

/// The facts of one request, filled in as it is routed.
#[derive(Debug, Clone)]
pub(crate) struct RequestLog {
    pub started: Instant,
    pub pod: PodKey,
    pub src: SocketAddr,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub protocol: &'static str,
    pub trace_id: TraceId,
    /// The client span, when this request's trace is recorded.
    pub span: Option<SpanInFlight>,
    /// Whether the request is written to the access log (Telemetry `accessLogging`).
    pub access_log: bool,
    pub service: ObjectKey,
    pub rule: String,
    pub backend: Option<ObjectKey>,
    pub upstream: Option<SocketAddr>,
    pub source_principal: String,
    pub destination_principal: Option<String>,
    pub destination_workload: Option<PodKey>,
    pub security: Security,
    pub retries: u32,
    pub flags: ResponseFlags,
    pub detail: String,
}

impl RequestLog {
    fn finish(mut self, metrics: &Metrics, status: u16, bytes_out: u64, aborted: bool) {
        let flags = if aborted && self.flags == flags::NONE {
            flags::DOWNSTREAM_CLOSED
        } else {
            self.flags
        };
        let code = status.to_string();
        let (dst_name, dst_ns) = self
            .destination_workload
            .as_ref()
            .map(|p| (p.name.as_str(), p.namespace.as_str()))
            .unwrap_or(("unknown", "unknown"));
        let backend = self.backend.as_ref().unwrap_or(&self.service);
        let labels = RequestLabels {
            reporter: "source",
            source_workload: &self.pod.name,
            source_workload_namespace: &self.pod.namespace,
            source_principal: &self.source_principal,
            destination_workload: dst_name,
            destination_workload_namespace: dst_ns,
            destination_principal: self.destination_principal.as_deref().unwrap_or("unknown"),
            destination_service: backend.service_fqdn(),
            destination_service_name: &backend.name,
            destination_service_namespace: &backend.namespace,
            response_code: &code,
            response_flags: flags,
            connection_security_policy: self.security.label(),
        };
        let values = labels.values();
        let elapsed = self.started.elapsed();
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        metrics.requests.with_label_values(&values).inc();
        metrics
            .request_duration
            .with_label_values(&values)
            .observe(elapsed_ms);
        let summary = RequestSummary {
            pod: &self.pod,
            source_address: self.src,
            method: &self.method,
            path: &self.path,
            authority: &self.authority,
            request_protocol: self.protocol,
            duration_ms: elapsed_ms,
        };
        let fields = SourceFields {
            received_bytes: bytes_out,
            service: &self.service,
            route: &self.rule,
            backend: self.backend.as_ref(),
            upstream_address: self.upstream,
            retries: self.retries,
            trace_id: self.trace_id.to_string(),
            detail: &self.detail,
        };
        if self.access_log {
            access_log::write(&RequestLine::new(values, status, summary, fields));
        }
        if let Some(span) = self.span.take() {
            self.end_span(span, status, flags, elapsed);
        }
    }

    /// The client span: OpenTelemetry's HTTP client attributes and the mesh's.
    fn end_span(
        self,
        mut span: SpanInFlight,
        status: u16,
        outcome: ResponseFlags,
        elapsed: Duration,
    ) {
        let b = &mut span.builder;
        let service = self.service.service_fqdn();
        let name = format!("{} {service}", self.method);
        b.set_request(&self.method, &self.path, &self.authority, self.protocol);
        b.set("http.response.status_code", i64::from(status));
        if let Some(up) = self.upstream {
            b.set("network.peer.address", up.ip().to_string());
            b.set("network.peer.port", i64::from(up.port()));
        }
        if self.retries > 0 {
            b.set("http.request.resend_count", i64::from(self.retries));
        }
        b.set("nodemesh.source.workload", self.pod.to_string());
        b.set("nodemesh.source.principal", self.source_principal);
        b.set("nodemesh.destination.service", service);
        if let Some(w) = &self.destination_workload {
            b.set("nodemesh.destination.workload", w.to_string());
        }
        if let Some(p) = self.destination_principal {
            b.set("nodemesh.destination.principal", p);
        }
        b.set("nodemesh.route", self.rule);
        if let Some(backend) = &self.backend {
            b.set("nodemesh.backend", backend.service_fqdn());
        }
        b.set("nodemesh.response_flags", outcome.to_string());
        b.set("nodemesh.retries", i64::from(self.retries));
        b.set("nodemesh.connection_security_policy", self.security.label());
        if !self.detail.is_empty() {
            b.set("nodemesh.detail", self.detail);
        }
        // OpenTelemetry: a client span of a 4xx or 5xx answer, or of none, failed.
        let error = status >= 400 || outcome != flags::NONE;
        span.end(&self.pod, name, elapsed, error);
    }
}

/// The source side's fields of a request's access-log line.
#[derive(Serialize)]
struct SourceFields<'a> {
    received_bytes: u64,
    #[serde(serialize_with = "as_text")]
    service: &'a ObjectKey,
    route: &'a str,
    #[serde(serialize_with = "as_text_or_null")]
    backend: Option<&'a ObjectKey>,
    upstream_address: Option<SocketAddr>,
    retries: u32,
    trace_id: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    detail: &'a str,
}

/// A response body that writes the request's log line and metrics when it ends.
pub(crate) struct LoggedBody<B: Body<Data = Bytes> + Unpin> {
    inner: B,
    log: Option<(RequestLog, Arc<Metrics>, u16)>,
    bytes: u64,
}

impl<B: Body<Data = Bytes> + Unpin> LoggedBody<B> {
    pub(crate) fn new(inner: B, log: RequestLog, metrics: Arc<Metrics>, status: u16) -> Self {
        LoggedBody {
            inner,
            log: Some((log, metrics, status)),
            bytes: 0,
        }
    }

    fn done(&mut self, aborted: bool) {
        if let Some((log, metrics, status)) = self.log.take() {
            log.finish(&metrics, status, self.bytes, aborted);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for LoggedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.done(false);
                }
            }
            Poll::Ready(None) => self.done(false),
            Poll::Ready(Some(Err(_))) => self.done(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body<Data = Bytes> + Unpin> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        // hyper drops a body it never polled (HEAD, 204, 304) or one whose client left.
        let aborted = !self.inner.is_end_stream();
        self.done(aborted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request label with a value of its own, so a label paired with another's
    /// value shows in the metric line.
    #[test]
    fn each_request_label_carries_its_own_value() {
        let metrics = Metrics::new();
        let log = RequestLog {
            started: Instant::now(),
            pod: PodKey::new("apps", "client"),
            src: "10.0.1.1:40000".parse().unwrap(),
            method: "GET".into(),
            path: "/".into(),
            authority: "web".into(),
            protocol: "HTTP/1.1",
            trace_id: TraceId([0x0a; 16]),
            span: None,
            access_log: true,
            service: ObjectKey::new("apps", "web"),
            rule: "apps/web-route rule 0".into(),
            backend: Some(ObjectKey::new("shop", "web-v2")),
            upstream: Some("10.0.2.2:8080".parse().unwrap()),
            source_principal: "spiffe://cluster.local/ns/apps/sa/client".into(),
            destination_principal: Some("spiffe://cluster.local/ns/shop/sa/server".into()),
            destination_workload: Some(PodKey::new("shop", "server")),
            security: Security::MutualTls,
            retries: 0,
            flags: flags::UPSTREAM_TIMEOUT,
            detail: String::new(),
        };
        log.finish(&metrics, 504, 0, false);
        let text = metrics.encode();
        let labels = "connection_security_policy=\"mutual_tls\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/server\",destination_service=\"web-v2.shop.svc.cluster.local\",destination_service_name=\"web-v2\",destination_service_namespace=\"shop\",destination_workload=\"server\",destination_workload_namespace=\"shop\",reporter=\"source\",response_code=\"504\",response_flags=\"UT\",source_principal=\"spiffe://cluster.local/ns/apps/sa/client\",source_workload=\"client\",source_workload_namespace=\"apps\"";
        assert!(
            text.contains(&format!("nodemesh_requests_total{{{labels}}} 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "nodemesh_request_duration_milliseconds_count{{{labels}}} 1\n"
            )),
            "{text}"
        );
    }

    #[test]
    fn a_response_cut_short_is_flagged_downstream_closed() {
        let metrics = Metrics::new();
        let log = RequestLog {
            started: Instant::now(),
            pod: PodKey::new("apps", "client"),
            src: "10.0.1.1:40000".parse().unwrap(),
            method: "GET".into(),
            path: "/".into(),
            authority: "web".into(),
            protocol: "HTTP/1.1",
            trace_id: TraceId([1; 16]),
            span: None,
            access_log: true,
            service: ObjectKey::new("apps", "web"),
            rule: String::new(),
            backend: None,
            upstream: None,
            source_principal: "unknown".into(),
            destination_principal: None,
            destination_workload: None,
            security: Security::None,
            retries: 0,
            flags: flags::NONE,
            detail: String::new(),
        };
        log.finish(&metrics, 200, 0, true);
        let text = metrics.encode();
        assert!(
            text.contains("response_code=\"200\",response_flags=\"DC\""),
            "{text}"
        );
    }
}
