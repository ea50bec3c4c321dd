//! Distributed tracing: the spans the proxy records for the HTTP requests it routes
//! (a client span on the source node, a server span on the destination node when it
//! serves the request as HTTP), and where they go.
//!
//! Each tracing provider (an OTLP collector over HTTP or gRPC, or a Zipkin collector)
//! has a bounded queue and one task that exports batches. Recording a span never
//! waits: when a queue is full the span is dropped and counted
//! (`nodemesh_spans_dropped_total`), so a collector that is down or slow never slows
//! a request.

pub(crate) mod export;
pub(crate) mod mesh_config;
pub(crate) mod metrics;
pub(crate) mod otlp;
pub(crate) mod zipkin;

use std::{
    borrow::Cow,
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    keys::PodKey,
    telemetry::{
        spans::export::{Exporter, ExporterStatus},
        trace_context::{RequestTrace, Sampling, SpanId, TraceId},
    },
};

/// `host` and `port` of an authority (`[v6]:port` too).
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
            (h, p.parse().ok())
        }
        _ => (authority, None),
    };
    (host.trim_start_matches('[').trim_end_matches(']'), port)
}

/// OpenTelemetry's `network.protocol.version` of a request's protocol name.
fn protocol_version(protocol: &str) -> &'static str {
    match protocol.to_ascii_lowercase().as_str() {
        "http/2" => "2",
        "http/1.0" => "1.0",
        _ => "1.1",
    }
}

/// Which side of a request a span describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanKind {
    /// The source node's proxy sending the request to a backend.
    Client,
    /// The destination node's proxy serving the request to its pod.
    Server,
}

/// The value of a span attribute.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AttrValue {
    Text(String),
    Int(i64),
}

impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::Text(s)
    }
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        AttrValue::Text(s.to_string())
    }
}

impl From<i64> for AttrValue {
    fn from(n: i64) -> Self {
        AttrValue::Int(n)
    }
}

/// One finished span, as every exporter encodes it.
#[derive(Debug, Clone)]
pub(crate) struct Span {
    /// The service the span belongs to: the workload (`name.namespace`).
    pub service: String,
    pub name: String,
    pub kind: SpanKind,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub tracestate: Option<String>,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(Cow<'static, str>, AttrValue)>,
    /// The request failed (OpenTelemetry's status `ERROR`).
    pub error: bool,
}

/// Nanoseconds since the Unix epoch.
pub(crate) fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// A span in the making: its context and start, its attributes added as the request
/// is routed.
#[derive(Debug, Clone)]
pub(crate) struct SpanBuilder {
    pub kind: SpanKind,
    pub trace: RequestTrace,
    pub started: SystemTime,
    pub attributes: Vec<(Cow<'static, str>, AttrValue)>,
}

impl SpanBuilder {
    pub(crate) fn new(kind: SpanKind, trace: RequestTrace) -> SpanBuilder {
        SpanBuilder {
            kind,
            trace,
            started: SystemTime::now(),
            attributes: Vec::with_capacity(20),
        }
    }

    pub(crate) fn set(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        self.attributes.push((Cow::Borrowed(key), value.into()));
    }

    /// OpenTelemetry's attributes of the request itself, the same on both sides:
    /// method, path, the authority's host and port, the protocol version.
    pub(crate) fn set_request(
        &mut self,
        method: &str,
        path: &str,
        authority: &str,
        protocol: &str,
    ) {
        self.set("http.request.method", method);
        self.set("url.path", path);
        let (host, port) = split_authority(authority);
        self.set("server.address", host);
        if let Some(port) = port {
            self.set("server.port", i64::from(port));
        }
        self.set("network.protocol.version", protocol_version(protocol));
    }

    pub(crate) fn finish(
        self,
        service: String,
        name: String,
        elapsed: Duration,
        error: bool,
    ) -> Span {
        let start = unix_nanos(self.started);
        Span {
            service,
            name,
            kind: self.kind,
            trace_id: self.trace.trace_id,
            span_id: self.trace.span,
            parent_id: self.trace.parent,
            tracestate: self.trace.tracestate,
            start_unix_nanos: start,
            end_unix_nanos: start.saturating_add(elapsed.as_nanos() as u64),
            attributes: self.attributes,
            error,
        }
    }
}

/// A span being recorded for one request, and the settings that say where it goes.
#[derive(Debug, Clone)]
pub(crate) struct SpanInFlight {
    pub builder: SpanBuilder,
    settings: Arc<TracingSettings>,
}

impl SpanInFlight {
    /// Reads the request's trace context and writes the one the next hop sees; a span
    /// is begun when the trace is sampled and the pod's tracing is on.
    pub(crate) fn begin(
        kind: SpanKind,
        settings: &Arc<TracingSettings>,
        headers: &mut http::HeaderMap,
    ) -> (TraceId, Option<SpanInFlight>) {
        let trace = crate::telemetry::trace_context::begin(headers, settings.sampling());
        let trace_id = trace.trace_id;
        if !trace.recorded {
            return (trace_id, None);
        }
        let mut builder = SpanBuilder::new(kind, trace);
        settings.tag(&mut builder, headers);
        let span = SpanInFlight {
            builder,
            settings: settings.clone(),
        };
        (trace_id, Some(span))
    }

    /// Ends the span of `workload`'s side of the request and hands it to the
    /// providers; the span belongs to the service `<name>.<namespace>`.
    pub(crate) fn end(self, workload: &PodKey, name: String, elapsed: Duration, error: bool) {
        let service = format!("{}.{}", workload.name, workload.namespace);
        let span = self.builder.finish(service, name, elapsed, error);
        self.settings.record(span);
    }
}

/// How one pod's requests are traced: the sampling and the providers spans go to.
#[derive(Debug, Default)]
pub(crate) struct TracingSettings {
    /// Percentage of requests without trace context that are sampled (0 to 100);
    /// `None`: tracing is off for the pod.
    pub sampling: Option<f64>,
    pub exporters: Vec<Arc<Exporter>>,
    /// Tags added to every span, by name (`customTags`).
    pub custom_tags: BTreeMap<String, CustomTag>,
}

/// A tag added to a pod's spans (Istio's `customTags`).
#[derive(Debug, Clone, PartialEq)]
pub enum CustomTag {
    /// A fixed value.
    Literal(String),
    /// The value of a request header (or a default when it is absent).
    Header {
        name: http::HeaderName,
        default: Option<String>,
    },
}

impl TracingSettings {
    pub(crate) fn sampling(&self) -> Sampling {
        match self.sampling {
            Some(p) if !self.exporters.is_empty() => Sampling::Percent(p),
            _ => Sampling::Off,
        }
    }

    /// Hands a finished span to every provider (never waits).
    pub(crate) fn record(&self, span: Span) {
        let span = Arc::new(span);
        for exporter in &self.exporters {
            exporter.submit(span.clone());
        }
    }

    /// The custom tags of a request (headers read before the request is sent on).
    pub(crate) fn tag(&self, builder: &mut SpanBuilder, headers: &http::HeaderMap) {
        for (key, tag) in &self.custom_tags {
            let value = match tag {
                CustomTag::Literal(v) => Some(v.clone()),
                CustomTag::Header { name, default } => headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .or_else(|| default.clone()),
            };
            if let Some(v) = value {
                builder
                    .attributes
                    .push((Cow::Owned(key.clone()), AttrValue::Text(v)));
            }
        }
    }
}

/// What Telemetry resources say of one side's spans; `None` leaves the broader level's
/// choice (the mesh configuration's, at the top).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TracingOverride {
    pub providers: Option<Vec<String>>,
    pub sampling: Option<f64>,
    pub disabled: Option<bool>,
    pub custom_tags: BTreeMap<String, CustomTag>,
}

impl TracingOverride {
    /// `narrower` (a namespace's over the mesh's, a workload's over a namespace's)
    /// laid over this one, field by field.
    pub(crate) fn overlay(&mut self, narrower: &TracingOverride) {
        if narrower.providers.is_some() {
            self.providers = narrower.providers.clone();
        }
        if narrower.sampling.is_some() {
            self.sampling = narrower.sampling;
        }
        if narrower.disabled.is_some() {
            self.disabled = narrower.disabled;
        }
        self.custom_tags.extend(narrower.custom_tags.clone());
    }

    pub(crate) fn is_empty(&self) -> bool {
        *self == TracingOverride::default()
    }
}

/// What applies to one pod's telemetry after every level (mesh, namespace, workload).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetryPolicy {
    /// For the spans of the pod's outgoing requests (source side).
    pub client: TracingOverride,
    /// For the spans of requests to the pod (destination side).
    pub server: TracingOverride,
    /// Whether the pod's requests and connections are logged (`None`: they are).
    pub access_log: Option<bool>,
}

impl TelemetryPolicy {
    pub(crate) fn overlay(&mut self, narrower: &TelemetryPolicy) {
        self.client.overlay(&narrower.client);
        self.server.overlay(&narrower.server);
        if narrower.access_log.is_some() {
            self.access_log = narrower.access_log;
        }
    }

    pub(crate) fn logs(&self) -> bool {
        self.access_log != Some(false)
    }
}

/// The node's tracing: the providers of its configuration and the settings each pod
/// gets.
#[derive(Debug, Default)]
pub(crate) struct Tracer {
    /// Every configured provider, by name.
    pub providers: BTreeMap<String, Arc<Exporter>>,
    /// What a pod gets when no Telemetry resource applies.
    pub default: Arc<TracingSettings>,
    /// The mesh configuration's default providers and sampling.
    default_providers: Vec<String>,
    default_sampling: f64,
}

impl Tracer {
    /// Starts an exporter for every provider of the configuration; pods get the
    /// default providers at the default sampling.
    pub(crate) fn start(
        config: &mesh_config::TracingConfig,
        metrics: &metrics::SpanMetrics,
        socket_mark: u32,
    ) -> Tracer {
        let providers: BTreeMap<String, Arc<Exporter>> = config
            .providers
            .iter()
            .map(|p| {
                let exporter = Exporter::start(p.clone(), metrics, socket_mark);
                (p.name.clone(), Arc::new(exporter))
            })
            .collect();
        let exporters: Vec<_> = config
            .default_providers
            .iter()
            .filter_map(|name| providers.get(name).cloned())
            .collect();
        let default = TracingSettings {
            sampling: (!exporters.is_empty()).then_some(config.default_sampling),
            exporters,
            custom_tags: BTreeMap::new(),
        };
        Tracer {
            providers,
            default: Arc::new(default),
            default_providers: config.default_providers.clone(),
            default_sampling: config.default_sampling,
        }
    }

    /// The settings for one side of a pod's requests, given the Telemetry resources
    /// that apply to it (none: the mesh configuration's defaults).
    pub(crate) fn settings(&self, policy: &TracingOverride) -> Arc<TracingSettings> {
        if policy.is_empty() {
            return self.default.clone();
        }
        let names = policy.providers.as_ref().unwrap_or(&self.default_providers);
        let exporters: Vec<_> = names
            .iter()
            .filter_map(|n| {
                let found = self.providers.get(n).cloned();
                if found.is_none() {
                    crate::warn_limited!(provider = %n, "a Telemetry resource names a tracing provider the agent's --mesh-config does not define: its spans are not sent; add it to extensionProviders");
                }
                found
            })
            .collect();
        let on = !exporters.is_empty() && policy.disabled != Some(true);
        Arc::new(TracingSettings {
            sampling: on.then(|| policy.sampling.unwrap_or(self.default_sampling)),
            exporters,
            custom_tags: policy.custom_tags.clone(),
        })
    }

    /// The state of each provider's export, for `meshctl node status`.
    pub(crate) fn status(&self) -> Vec<ExporterStatus> {
        self.providers.values().map(|e| e.status()).collect()
    }
}
