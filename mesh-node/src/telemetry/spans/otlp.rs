//! OTLP (OpenTelemetry's protocol) for traces: the messages of
//! `opentelemetry/proto/collector/trace/v1` that an exporter sends, written with the
//! field numbers of the published `.proto` files, and the batch encoding for
//! OTLP/HTTP (protobuf body) and OTLP/gRPC (one length-prefixed message).

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use crate::telemetry::spans::{AttrValue, Span, SpanKind};

/// The gRPC method an OTLP/gRPC exporter calls.
pub(crate) const GRPC_EXPORT_PATH: &str =
    "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The instrumentation scope the spans carry.
const SCOPE: &str = "nodemesh";

#[derive(Clone, PartialEq, Message)]
pub(crate) struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct ExportTraceServiceResponse {
    #[prost(message, optional, tag = "1")]
    pub partial_success: Option<ExportTracePartialSuccess>,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct ExportTracePartialSuccess {
    #[prost(int64, tag = "1")]
    pub rejected_spans: i64,
    #[prost(string, tag = "2")]
    pub error_message: String,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<OtlpSpan>,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct InstrumentationScope {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct OtlpSpan {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    #[prost(string, tag = "3")]
    pub trace_state: String,
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    pub name: String,
    /// `Span.SpanKind`: 2 server, 3 client.
    #[prost(int32, tag = "6")]
    pub kind: i32,
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
    /// The W3C trace flags in the low 8 bits.
    #[prost(fixed32, tag = "16")]
    pub flags: u32,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct Status {
    #[prost(string, tag = "2")]
    pub message: String,
    /// `Status.StatusCode`: 0 unset, 1 ok, 2 error.
    #[prost(int32, tag = "3")]
    pub code: i32,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct AnyValue {
    #[prost(oneof = "any_value::Value", tags = "1, 3")]
    pub value: Option<any_value::Value>,
}

pub(crate) mod any_value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub(crate) enum Value {
        #[prost(string, tag = "1")]
        StringValue(String),
        #[prost(int64, tag = "3")]
        IntValue(i64),
    }
}

const KIND_SERVER: i32 = 2;
const KIND_CLIENT: i32 = 3;
const STATUS_ERROR: i32 = 2;
const SAMPLED: u32 = 1;

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
    }
}

fn attribute(key: &str, value: &AttrValue) -> KeyValue {
    let value = match value {
        AttrValue::Text(s) => any_value::Value::StringValue(s.clone()),
        AttrValue::Int(n) => any_value::Value::IntValue(*n),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
    }
}

fn span(s: &Span) -> OtlpSpan {
    OtlpSpan {
        trace_id: s.trace_id.0.to_vec(),
        span_id: s.span_id.0.to_vec(),
        trace_state: s.tracestate.clone().unwrap_or_default(),
        parent_span_id: s.parent_id.map(|p| p.0.to_vec()).unwrap_or_default(),
        name: s.name.clone(),
        kind: match s.kind {
            SpanKind::Client => KIND_CLIENT,
            SpanKind::Server => KIND_SERVER,
        },
        start_time_unix_nano: s.start_unix_nanos,
        end_time_unix_nano: s.end_unix_nanos,
        attributes: s.attributes.iter().map(|(k, v)| attribute(k, v)).collect(),
        status: s.error.then(|| Status {
            message: String::new(),
            code: STATUS_ERROR,
        }),
        flags: SAMPLED,
    }
}

/// One batch as an export request: the spans grouped by the service they belong to.
pub(crate) fn request(spans: &[std::sync::Arc<Span>]) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<&str, Vec<OtlpSpan>> = BTreeMap::new();
    for s in spans {
        by_service.entry(&s.service).or_default().push(span(s));
    }
    ExportTraceServiceRequest {
        resource_spans: by_service
            .into_iter()
            .map(|(service, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![text("service.name", service)],
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE.into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans,
                }],
            })
            .collect(),
    }
}

/// The body of an OTLP/HTTP export (`application/x-protobuf`).
pub(crate) fn http_body(spans: &[std::sync::Arc<Span>]) -> Bytes {
    Bytes::from(request(spans).encode_to_vec())
}

/// The body of an OTLP/gRPC export: one uncompressed length-prefixed message.
pub(crate) fn grpc_body(spans: &[std::sync::Arc<Span>]) -> Bytes {
    let message = request(spans).encode_to_vec();
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(&message);
    out.freeze()
}

/// Spans the collector said it rejected in an OTLP response body (0 when the body
/// is empty or says nothing of it).
pub(crate) fn rejected_spans(body: &[u8]) -> i64 {
    ExportTraceServiceResponse::decode(body)
        .ok()
        .and_then(|r| r.partial_success)
        .map(|p| p.rejected_spans)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::{borrow::Cow, sync::Arc};

    use super::*;
    use crate::telemetry::trace_context::{SpanId, TraceId};

    fn sample(service: &str) -> Arc<Span> {
        Arc::new(Span {
            service: service.into(),
            name: "GET web.apps.svc.cluster.local".into(),
            kind: SpanKind::Client,
            trace_id: TraceId([7; 16]),
            span_id: SpanId([2; 8]),
            parent_id: Some(SpanId([1; 8])),
            tracestate: Some("vendor=x".into()),
            start_unix_nanos: 1_000,
            end_unix_nanos: 2_000,
            attributes: vec![
                (Cow::Borrowed("http.request.method"), AttrValue::from("GET")),
                (
                    Cow::Borrowed("http.response.status_code"),
                    AttrValue::Int(503),
                ),
            ],
            error: true,
        })
    }

    /// The first bytes of the encoding, checked by hand against the `.proto` field
    /// numbers and wire types: ExportTraceServiceRequest.resource_spans (1, LEN) →
    /// ResourceSpans.resource (1, LEN) → Resource.attributes (1, LEN) → KeyValue.key
    /// (1, LEN) "service.name".
    #[test]
    fn the_encoding_starts_with_the_resource_of_the_first_service() {
        let body = http_body(&[sample("client.apps")]);
        assert_eq!(body[0], 0x0a);
        let len = prost::decode_length_delimiter(&body[1..]).unwrap();
        let after_len = 1 + prost::length_delimiter_len(len);
        assert_eq!(after_len + len, body.len(), "one ResourceSpans");
        assert_eq!(body[after_len], 0x0a, "ResourceSpans.resource");
        let key = b"\x0a\x0cservice.name";
        assert!(body.windows(key.len()).any(|w| w == key));
    }

    #[test]
    fn spans_group_by_service_and_read_back() {
        let spans = [sample("b.apps"), sample("a.apps"), sample("b.apps")];
        let decoded = ExportTraceServiceRequest::decode(http_body(&spans)).unwrap();
        assert_eq!(decoded.resource_spans.len(), 2);
        let first = &decoded.resource_spans[0];
        assert_eq!(
            first.resource.as_ref().unwrap().attributes[0],
            text("service.name", "a.apps")
        );
        let s = &decoded.resource_spans[1].scope_spans[0].spans;
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].trace_id, vec![7; 16]);
        assert_eq!(s[0].parent_span_id, vec![1; 8]);
        assert_eq!((s[0].kind, s[0].flags), (KIND_CLIENT, 1));
        assert_eq!(s[0].status.as_ref().map(|s| s.code), Some(STATUS_ERROR));
        assert_eq!(s[0].trace_state, "vendor=x");
        assert_eq!(
            s[0].attributes[1].value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(503))
        );
    }

    #[test]
    fn a_grpc_body_is_one_uncompressed_length_prefixed_message() {
        let spans = [sample("a.apps")];
        let body = grpc_body(&spans);
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert_eq!((body[0], len), (0, body.len() - 5));
        assert_eq!(&body[5..], &http_body(&spans)[..]);
    }

    #[test]
    fn a_partial_success_reports_its_rejected_spans() {
        let r = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 3,
                error_message: "too old".into(),
            }),
        };
        assert_eq!(rejected_spans(&r.encode_to_vec()), 3);
        assert_eq!(rejected_spans(b""), 0);
        assert_eq!(rejected_spans(b"\xff\xff"), 0);
    }
}
