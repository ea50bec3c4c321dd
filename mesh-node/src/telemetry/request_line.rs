//! One HTTP request's access-log line, encoded straight from the request's facts: the
//! metric labels (Istio's names), then the fields of the reporting side. No JSON tree
//! is built on the way (the line used to be a map of owned values, a few dozen
//! allocations per request).

use std::{fmt::Display, net::SocketAddr};

use serde::{ser::SerializeMap, Serialize, Serializer};

use crate::{keys::PodKey, telemetry::metrics::RequestLabels};

/// The labels as fields of the line; `response_code` is left to the line, which writes
/// it as a number.
struct LabelFields<'a>([&'a str; 13]);

impl Serialize for LabelFields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (name, value) in RequestLabels::NAMES.iter().zip(self.0) {
            if *name != "response_code" {
                map.serialize_entry(name, value)?;
            }
        }
        map.end()
    }
}

/// What both sides' lines say of a request.
#[derive(Serialize)]
pub(crate) struct RequestSummary<'a> {
    /// The local pod: the client's on the source side, the server's at the destination.
    #[serde(serialize_with = "as_text")]
    pub pod: &'a PodKey,
    pub source_address: SocketAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub request_protocol: &'static str,
    pub duration_ms: f64,
}

/// A request's line: `{"log":"access","kind":"request", <labels>, "response_code": N,
/// <summary>, <fields of the reporting side>}`.
#[derive(Serialize)]
pub(crate) struct RequestLine<'a, F: Serialize> {
    log: &'static str,
    kind: &'static str,
    #[serde(flatten)]
    labels: LabelFields<'a>,
    response_code: u16,
    #[serde(flatten)]
    summary: RequestSummary<'a>,
    #[serde(flatten)]
    fields: F,
}

impl<'a, F: Serialize> RequestLine<'a, F> {
    /// The line of a request with these metric label `values` ([`RequestLabels::values`]).
    pub(crate) fn new(
        values: [&'a str; 13],
        status: u16,
        summary: RequestSummary<'a>,
        fields: F,
    ) -> Self {
        RequestLine {
            log: "access",
            kind: "request",
            labels: LabelFields(values),
            response_code: status,
            summary,
            fields,
        }
    }
}

/// Serializes a value as its `Display` text.
pub(crate) fn as_text<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Serializes an optional value as its `Display` text, or null.
pub(crate) fn as_text_or_null<T: Display, S: Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Fields {
        #[serde(serialize_with = "as_text_or_null")]
        upstream_address: Option<std::net::SocketAddr>,
        #[serde(skip_serializing_if = "str::is_empty")]
        detail: &'static str,
    }

    #[test]
    fn a_line_carries_the_labels_one_numeric_code_and_the_fields() {
        let pod = crate::keys::ObjectKey::new("apps", "web");
        let labels = RequestLabels {
            reporter: "source",
            source_workload: "web",
            source_workload_namespace: "apps",
            source_principal: "spiffe://cluster.local/ns/apps/sa/web",
            destination_workload: "api",
            destination_workload_namespace: "apps",
            destination_principal: "unknown",
            destination_service: "api.apps.svc.cluster.local".into(),
            destination_service_name: "api",
            destination_service_namespace: "apps",
            response_code: "503",
            response_flags: crate::telemetry::outcome::ResponseFlags::NoHealthyUpstream,
            connection_security_policy: "mutual_tls",
        };
        let summary = RequestSummary {
            pod: &pod,
            source_address: "10.0.0.2:40000".parse().unwrap(),
            method: "GET",
            path: "/",
            authority: "api",
            request_protocol: "HTTP/1.1",
            duration_ms: 1.5,
        };
        let fields = Fields {
            upstream_address: None,
            detail: "",
        };
        let line = RequestLine::new(labels.values(), 503, summary, fields);
        let line = serde_json::to_value(line).unwrap();
        let object = line.as_object().unwrap();
        assert_eq!(line["log"], "access");
        assert_eq!(line["kind"], "request");
        for name in RequestLabels::NAMES {
            assert!(object.contains_key(name), "{name} missing from {line}");
        }
        assert_eq!(line["response_code"], 503, "a number, once");
        assert_eq!(line["response_flags"], "UH");
        assert_eq!(line["pod"], "apps/web");
        assert!(line["upstream_address"].is_null());
        assert!(object.get("detail").is_none(), "empty detail left out");
        assert_eq!(line["source_address"], "10.0.0.2:40000");
        assert_eq!(object.len(), 2 + 13 + 7 + 1);
    }
}
