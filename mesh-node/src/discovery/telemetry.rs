//! Istio's `Telemetry` (`telemetry.istio.io` v1 and v1alpha1, one schema; the
//! `networking.istio.io/v1alpha3` spelling is read too): how the mesh's tracing and
//! access logging behave for the whole mesh (root namespace, no selector), a namespace
//! (no selector) or some workloads (selector) — as the user writes it.
//!
//! `discovery::telemetry_index` checks each resource, reports what Nodemesh does not
//! implement, and resolves what applies to a pod.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::discovery::peer_authentication::WorkloadSelector;
pub use crate::discovery::policy_target::PolicyTargetReference;

pub const ISTIO_TELEMETRY: &str = "telemetry.istio.io";
/// The versions served and read, storage version first (one schema for all).
pub const VERSIONS: [&str; 2] = ["v1", "v1alpha1"];

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "telemetry.istio.io",
    version = "v1",
    kind = "Telemetry",
    plural = "telemetries",
    shortname = "telemetry",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// The pods of the resource's namespace it applies to. Absent: every pod of the
    /// namespace (of the mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Not implemented (reported): use `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Not implemented (reported): use `selector`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// How requests are traced (the first entry for each side applies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tracing: Vec<Tracing>,
    /// Whether requests and connections are written to the access log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_logging: Vec<AccessLogging>,
    /// Not implemented (reported): the agent's metrics are always on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tracing {
    /// Which side's spans this entry is for (default both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#match: Option<TracingSelector>,
    /// Tracing providers by name (the agent's `--mesh-config` defines them). Only the
    /// first is used by Istio; Nodemesh sends to each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    /// Percentage (0 to 100) of requests without trace context that are sampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_sampling_percentage: Option<f64>,
    /// No spans at all (true), or spans again under a narrower resource (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_span_reporting: Option<bool>,
    /// Tags added to every span: a literal, or a request header.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_tags: BTreeMap<String, CustomTag>,
    /// Not implemented (reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_request_id_for_trace_sampling: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TracingSelector {
    /// `CLIENT_AND_SERVER` (default), `CLIENT` or `SERVER`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderRef {
    #[serde(default)]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomTag {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub literal: Option<LiteralTag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderTag>,
    /// Not implemented (reported): the agent's environment is not the workload's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LiteralTag {
    #[serde(default)]
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderTag {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_value: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogging {
    /// Not implemented (reported): both sides log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#match: Option<serde_json::Value>,
    /// Access-log providers by name: the agent has one log, which any name means.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    /// No access log (true), or the log again under a narrower resource (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// Not implemented (reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<serde_json::Value>,
}

/// The CRD, served at every version of [`VERSIONS`] with one schema, stored as v1.
pub fn crd() -> CustomResourceDefinition {
    crate::discovery::crd_versions::at_versions(Telemetry::crd(), &VERSIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_serves_v1_and_v1alpha1_and_stores_v1() {
        let crd = crd();
        let names: Vec<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, VERSIONS);
        assert!(crd.spec.versions[0].storage && !crd.spec.versions[1].storage);
        assert_eq!(crd.spec.group, ISTIO_TELEMETRY);
        assert_eq!(crd.spec.names.plural, "telemetries");
    }

    #[test]
    fn istios_examples_parse() {
        let spec: TelemetrySpec = serde_yaml::from_str(
            r#"
selector: {matchLabels: {app: reviews}}
tracing:
- match: {mode: SERVER}
  providers: [{name: zipkin}]
  randomSamplingPercentage: 10.5
  disableSpanReporting: false
  customTags:
    env: {literal: {value: prod}}
    user: {header: {name: x-user, defaultValue: anonymous}}
accessLogging:
- providers: [{name: envoy}]
  disabled: true
"#,
        )
        .unwrap();
        assert_eq!(spec.tracing[0].random_sampling_percentage, Some(10.5));
        assert_eq!(
            spec.tracing[0].custom_tags["user"]
                .header
                .as_ref()
                .unwrap()
                .default_value,
            Some("anonymous".into())
        );
        assert_eq!(spec.access_logging[0].disabled, Some(true));
    }
}
