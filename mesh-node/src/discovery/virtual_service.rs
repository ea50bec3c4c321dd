//! Istio's `VirtualService` (`networking.istio.io` v1, v1beta1 and v1alpha3: one
//! schema, Istio's field names) for Services inside the mesh. Discovery carries it as
//! written; `routing::http::virtual_service` compiles it into the same route table as
//! HTTPRoute, and reports what it cannot apply.
//!
//! Fields Nodemesh does not implement are kept (as `serde_json::Value`) so that they
//! are reported, never silently ignored: [`VirtualServiceSpec::unimplemented`].

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The versions Istio serves the kind at; one schema for all of them.
pub const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// The gateway name that binds a VirtualService to the mesh's sidecars (here: the node
/// proxy); absent `gateways` means the same.
pub const MESH_GATEWAY: &str = "mesh";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "VirtualService",
    plural = "virtualservices",
    shortname = "vs",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Services the rules apply to: a short name (in the VirtualService's namespace),
    /// `name.namespace`, `name.namespace.svc` or `name.namespace.svc.cluster.local`.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Where the rules apply: absent, or containing `mesh`, for the node proxy. A
    /// VirtualService bound only to gateways is ignored (and says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateways: Option<Vec<String>>,
    /// HTTP routes, in order: the first whose match holds routes the request.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// TCP routes, in order.
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// Not implemented (reported): TLS routes by SNI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub tls: Option<serde_json::Value>,
    /// Not implemented (reported): visibility across namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub export_to: Option<serde_json::Value>,
}

/// A field kept as written: any JSON (the CRD keeps it unpruned).
fn any_value(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any of them must hold (none: every request).
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<HttpRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<HttpRewrite>,
    /// e.g. `10s`, `1.5s`, `300ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    /// Delays and aborts injected into a share of the requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFaultInjection>,
    /// A copy of each request (of `mirrorPercentage`, all when absent) goes here; its
    /// answer is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Destination>,
    /// Mirrors, each with its own share (Istio's newer field; with `mirror` too, both
    /// apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirrors: Option<Vec<HttpMirrorPolicy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<Percent>,
    /// Deprecated whole-number share of `mirror`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percent: Option<u32>,
    /// Not implemented (reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub cors_policy: Option<serde_json::Value>,
    /// Not implemented (reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub delegate: Option<serde_json::Value>,
    /// Not implemented (reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub direct_response: Option<serde_json::Value>,
}

/// A share of requests: 0 to 100, with a fraction (`0.1` is one in a thousand).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, JsonSchema)]
pub struct Percent {
    pub value: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpFaultInjection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Istio's rule: without `percentage` (or the deprecated `percent`) no request is
/// delayed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// e.g. `5s`, `1.5s`, `200ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_delay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    /// Deprecated whole-number share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Not implemented (reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exponential_delay: Option<String>,
}

/// Istio's rule: without `percentage` no request is aborted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// 200 to 599.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    /// Not implemented (reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// Not implemented (reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    /// All requests when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

/// Exactly one of `exact`, `prefix`, `regex` (RE2 syntax, matching the whole value).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// Header names in lower case.
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// The Service port the request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Not implemented (reported): the rest of Istio's match fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub scheme: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub authority: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub source_labels: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub source_namespace: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub without_headers: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub ignore_uri_case: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub gateways: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// A Service: short name (in the VirtualService's namespace), `name.namespace`,
    /// `name.namespace.svc` or the FQDN.
    pub host: String,
    /// A DestinationRule subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Destination,
    /// Relative share (Istio: of 100); absent with one destination means all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Headers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOperations>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperations>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// 301 unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_code: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    /// Replaces the part of the path the `uri` match matched (the whole path for an
    /// exact or regex match, the prefix for a prefix match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    /// Retries after the first attempt.
    pub attempts: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Comma-separated: `5xx`, `gateway-error`, `connect-failure`, `refused-stream`,
    /// `reset`, `retriable-status-codes`, and status codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpRoute {
    /// Any of them must hold (none: every connection). Only `port` is implemented.
    #[serde(default, rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct L4MatchAttributes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Not implemented (reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub destination_subnets: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub source_labels: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub source_namespace: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_value")]
    pub gateways: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    pub destination: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

/// The CRD for clusters without Istio's own: the kind at every version Istio serves it
/// (v1 stored), one schema. Where Istio's CRDs are installed, leave them: Nodemesh
/// reads whichever version the API server serves.
pub fn crd(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use kube::CustomResourceExt;
    crate::discovery::crd_versions::at_versions(VirtualService::crd(), &VERSIONS)
}

impl VirtualServiceSpec {
    /// Whether the rules apply to the mesh (the node proxy): `gateways` absent, empty,
    /// or naming `mesh`.
    pub fn binds_mesh(&self) -> bool {
        match &self.gateways {
            None => true,
            Some(g) => g.is_empty() || g.iter().any(|g| g == MESH_GATEWAY),
        }
    }

    /// Fields present that Nodemesh does not implement, as paths (`http[0].fault`).
    pub fn unimplemented(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut note = |present: bool, path: String| {
            if present {
                out.push(path);
            }
        };
        note(self.tls.is_some(), "tls".into());
        note(self.export_to.is_some(), "exportTo".into());
        for (i, r) in self.http.iter().enumerate() {
            for (field, present) in [
                (
                    "fault.delay.exponentialDelay",
                    r.fault
                        .as_ref()
                        .and_then(|f| f.delay.as_ref())
                        .is_some_and(|d| d.exponential_delay.is_some()),
                ),
                (
                    "fault.abort.grpcStatus",
                    r.fault
                        .as_ref()
                        .and_then(|f| f.abort.as_ref())
                        .is_some_and(|a| a.grpc_status.is_some()),
                ),
                (
                    "fault.abort.http2Error",
                    r.fault
                        .as_ref()
                        .and_then(|f| f.abort.as_ref())
                        .is_some_and(|a| a.http2_error.is_some()),
                ),
                ("corsPolicy", r.cors_policy.is_some()),
                ("delegate", r.delegate.is_some()),
                ("directResponse", r.direct_response.is_some()),
            ] {
                note(present, format!("http[{i}].{field}"));
            }
            for (j, m) in r.matches.iter().enumerate() {
                for (field, present) in [
                    ("scheme", m.scheme.is_some()),
                    ("authority", m.authority.is_some()),
                    ("sourceLabels", m.source_labels.is_some()),
                    ("sourceNamespace", m.source_namespace.is_some()),
                    ("withoutHeaders", m.without_headers.is_some()),
                    ("ignoreUriCase", m.ignore_uri_case.is_some()),
                    ("gateways", m.gateways.is_some()),
                ] {
                    note(present, format!("http[{i}].match[{j}].{field}"));
                }
            }
        }
        for (i, r) in self.tcp.iter().enumerate() {
            for (j, m) in r.matches.iter().enumerate() {
                for (field, present) in [
                    ("destinationSubnets", m.destination_subnets.is_some()),
                    ("sourceLabels", m.source_labels.is_some()),
                    ("sourceNamespace", m.source_namespace.is_some()),
                    ("gateways", m.gateways.is_some()),
                ] {
                    note(present, format!("tcp[{i}].match[{j}].{field}"));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
