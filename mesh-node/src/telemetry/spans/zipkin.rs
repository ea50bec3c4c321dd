//! Zipkin's v2 JSON span format (`POST /api/v2/spans`): ids in lower-case hex, times
//! in microseconds, tags as strings, the service in `localEndpoint`.

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use serde::Serialize;

use crate::telemetry::spans::{AttrValue, Span, SpanKind};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinSpan<'a> {
    trace_id: String,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<String>,
    name: &'a str,
    kind: &'static str,
    timestamp: u64,
    duration: u64,
    local_endpoint: Endpoint<'a>,
    tags: BTreeMap<&'a str, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint<'a> {
    service_name: &'a str,
}

fn zipkin_span(s: &Span) -> ZipkinSpan<'_> {
    let mut tags: BTreeMap<&str, String> = s
        .attributes
        .iter()
        .map(|(k, v)| {
            let v = match v {
                AttrValue::Text(t) => t.clone(),
                AttrValue::Int(n) => n.to_string(),
            };
            (k.as_ref(), v)
        })
        .collect();
    if s.error {
        tags.insert("error", "true".into());
    }
    let start = s.start_unix_nanos / 1000;
    ZipkinSpan {
        trace_id: s.trace_id.to_string(),
        id: s.span_id.to_string(),
        parent_id: s.parent_id.map(|p| p.to_string()),
        name: &s.name,
        kind: match s.kind {
            SpanKind::Client => "CLIENT",
            SpanKind::Server => "SERVER",
        },
        timestamp: start,
        // Zipkin wants at least 1 µs.
        duration: (s.end_unix_nanos / 1000).saturating_sub(start).max(1),
        local_endpoint: Endpoint {
            service_name: &s.service,
        },
        tags,
    }
}

/// A batch as the JSON array Zipkin's collector takes.
pub(crate) fn body(spans: &[Arc<Span>]) -> Bytes {
    let spans: Vec<ZipkinSpan<'_>> = spans.iter().map(|s| zipkin_span(s)).collect();
    // Serializing plain strings and numbers cannot fail.
    Bytes::from(serde_json::to_vec(&spans).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use serde_json::{json, Value};

    use super::*;
    use crate::telemetry::trace_context::{SpanId, TraceId};

    #[test]
    fn a_span_reads_as_zipkin_v2() {
        let span = Arc::new(Span {
            service: "server.apps".into(),
            name: "GET server:8080".into(),
            kind: SpanKind::Server,
            trace_id: TraceId([0xab; 16]),
            span_id: SpanId([0x02; 8]),
            parent_id: Some(SpanId([0x01; 8])),
            tracestate: None,
            start_unix_nanos: 1_700_000_000_123_456_789,
            end_unix_nanos: 1_700_000_000_123_456_999,
            attributes: vec![
                (
                    Cow::Borrowed("http.response.status_code"),
                    AttrValue::Int(200),
                ),
                (Cow::Borrowed("http.request.method"), AttrValue::from("GET")),
            ],
            error: false,
        });
        let v: Value = serde_json::from_slice(&body(&[span])).unwrap();
        assert_eq!(
            v,
            json!([{
                "traceId": "abababababababababababababababab",
                "id": "0202020202020202",
                "parentId": "0101010101010101",
                "name": "GET server:8080",
                "kind": "SERVER",
                "timestamp": 1_700_000_000_123_456u64,
                "duration": 1,
                "localEndpoint": {"serviceName": "server.apps"},
                "tags": {"http.request.method": "GET", "http.response.status_code": "200"}
            }])
        );
    }
}
