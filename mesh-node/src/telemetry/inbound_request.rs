//! What one request judged at the destination leaves behind: a line in the access log
//! and `nodemesh_requests_total` / `nodemesh_request_duration_milliseconds` with
//! `reporter="destination"`, written when the response head is ready (the L7 inbound
//! path answers or forwards; the body is the application's).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    keys::PodKey, telemetry::access_log, telemetry::connections::Security,
    telemetry::metrics::Metrics, telemetry::metrics::RequestLabels,
    telemetry::outcome::ResponseFlags, telemetry::request_line::RequestLine,
    telemetry::request_line::RequestSummary, telemetry::spans::SpanInFlight,
};

/// The facts of one request to a local pod served as HTTP by its policies.
#[derive(Debug, Clone)]
pub(crate) struct InboundRequestLog {
    pub started: Instant,
    /// The local pod the request is for.
    pub pod: PodKey,
    pub src: SocketAddr,
    /// The source pod, when the state knows its address.
    pub source_workload: Option<PodKey>,
    /// The peer's SPIFFE ID (`unknown` for plaintext).
    pub source_principal: Option<String>,
    pub destination_principal: String,
    pub security: Security,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub protocol: &'static str,
    /// The JWT's `iss/sub`, when a valid one came with the request.
    pub request_principal: Option<String>,
    /// The policy that decided, and why.
    pub policy: Option<String>,
    pub detail: String,
    /// AUDIT policies that matched the request.
    pub audited: Vec<String>,
    /// The server span, when this request's trace is recorded.
    pub span: Option<SpanInFlight>,
    /// Whether the request is written to the access log (Telemetry `accessLogging`).
    pub access_log: bool,
}

impl InboundRequestLog {
    pub(crate) fn finish(&mut self, metrics: &Metrics, status: u16, flags: ResponseFlags) {
        let code = status.to_string();
        let (src_name, src_ns) = self
            .source_workload
            .as_ref()
            .map(|p| (p.name.as_str(), p.namespace.as_str()))
            .unwrap_or(("unknown", "unknown"));
        let labels = RequestLabels {
            reporter: "destination",
            source_workload: src_name,
            source_workload_namespace: src_ns,
            source_principal: self.source_principal.as_deref().unwrap_or("unknown"),
            destination_workload: &self.pod.name,
            destination_workload_namespace: &self.pod.namespace,
            destination_principal: &self.destination_principal,
            destination_service: "unknown".into(),
            destination_service_name: "unknown",
            destination_service_namespace: "unknown",
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
        let fields = DestinationFields {
            request_principal: self.request_principal.as_deref(),
            policy: self.policy.as_deref(),
            detail: &self.detail,
            audited: &self.audited,
        };
        if self.access_log {
            access_log::write(&RequestLine::new(values, status, summary, fields));
        }
        if let Some(span) = self.span.take() {
            self.end_span(span, status, flags, elapsed);
        }
    }

    /// The server span: OpenTelemetry's HTTP server attributes and the mesh's.
    fn end_span(
        &self,
        mut span: SpanInFlight,
        status: u16,
        flags: ResponseFlags,
        elapsed: Duration,
    ) {
        let b = &mut span.builder;
        b.set_request(&self.method, &self.path, &self.authority, self.protocol);
        b.set("http.response.status_code", i64::from(status));
        b.set("client.address", self.src.ip().to_string());
        if let Some(w) = &self.source_workload {
            b.set("nodemesh.source.workload", w.to_string());
        }
        if let Some(p) = &self.source_principal {
            b.set("nodemesh.source.principal", p.as_str());
        }
        b.set("nodemesh.destination.workload", self.pod.to_string());
        b.set(
            "nodemesh.destination.principal",
            self.destination_principal.as_str(),
        );
        if let Some(p) = &self.request_principal {
            b.set("nodemesh.request_principal", p.as_str());
        }
        if let Some(p) = &self.policy {
            b.set("nodemesh.policy", p.as_str());
        }
        b.set("nodemesh.response_flags", flags.to_string());
        b.set("nodemesh.connection_security_policy", self.security.label());
        if !self.detail.is_empty() {
            b.set("nodemesh.detail", self.detail.as_str());
        }
        let name = match self.authority.as_str() {
            "" => self.method.clone(),
            authority => format!("{} {authority}", self.method),
        };
        // OpenTelemetry: a server span failed when it answered 5xx.
        let error = status >= 500;
        span.end(&self.pod, name, elapsed, error);
    }
}

/// The destination side's fields of a request's access-log line.
#[derive(Serialize)]
struct DestinationFields<'a> {
    request_principal: Option<&'a str>,
    policy: Option<&'a str>,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    audited: &'a [String],
}
