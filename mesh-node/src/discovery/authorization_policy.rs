//! Istio's `AuthorizationPolicy` (`security.istio.io` v1 and v1beta1: one schema): who
//! may do what to which workloads, as the user writes it.
//!
//! The types here are the wire form, written from Istio's API reference with Istio's
//! field names. Actions, ports, CIDRs and `when` keys stay text so that a broken policy
//! still parses: `discovery::authorization` compiles them into Nodemesh's one policy
//! model, reporting what it cannot compile by name and field, and failing closed.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::discovery::peer_authentication::{WorkloadSelector, ISTIO_SECURITY, VERSIONS};
pub use crate::discovery::policy_target::PolicyTargetReference;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "ap",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The pods of the policy's namespace it applies to (by labels). Absent or empty:
    /// every pod of the namespace (in the root namespace: of every namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single form of `targetRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Services (core group, kind `Service`, same namespace) whose pods it applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// `ALLOW` (the default), `DENY`, `AUDIT` or `CUSTOM` (not supported: the workloads
    /// it selects are denied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The extension provider of a `CUSTOM` policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
    /// A request matching any rule matches the policy. No rules: matches nothing (an
    /// ALLOW policy without rules denies everything).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Matches when `from`, `to` and `when` all match; an empty list matches anything.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Any of these sources.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    /// Any of these operations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    /// Every one of these conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct From {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct To {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// Every field set must match (and no `not…` field); strings take Istio's exact,
/// `prefix*`, `*suffix` and `*` forms.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities without `spiffe://`, e.g. `cluster.local/ns/default/sa/web`
    /// (mutual TLS only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT principals, `<iss>/<sub>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// The peer's namespace (mutual TLS only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// The source IP: addresses or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// The original client IP (no proxy in front forwards one: the source IP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// The request's host (`:authority`/`Host`), compared without regard to case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// The workload's ports, as strings (a YAML file's numbers are read as text).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "texts"
    )]
    pub ports: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "texts"
    )]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// The request path without its query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// Strings, or numbers read as their text (`ports: [8080]` in a YAML file).
fn texts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Number(i64),
        Text(String),
    }
    let raw: Vec<Text> = Vec::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|t| match t {
            Text::Number(n) => n.to_string(),
            Text::Text(t) => t,
        })
        .collect())
}

/// One of Istio's "Authorization Policy conditions".
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// e.g. `request.headers[User-Agent]`, `source.ip`, `request.auth.claims[iss]`.
    pub key: String,
    /// Any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// None of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// The CRD, served at every version of [`VERSIONS`] with one schema, stored as v1.
pub fn crd() -> CustomResourceDefinition {
    crate::discovery::crd_versions::at_versions(AuthorizationPolicy::crd(), &VERSIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_serves_v1_and_v1beta1_and_stores_v1() {
        let crd = crd();
        let names: Vec<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, VERSIONS);
        assert!(crd.spec.versions[0].storage && !crd.spec.versions[1].storage);
        assert_eq!(crd.spec.group, ISTIO_SECURITY);
        assert_eq!(crd.spec.names.plural, "authorizationpolicies");
    }

    #[test]
    fn a_policy_with_broken_fields_still_parses() {
        let spec: AuthorizationPolicySpec = serde_yaml::from_str(
            "action: deny\nrules:\n- to: [{operation: {ports: [http, 8080]}}]\n  when: [{key: bogus, values: [x]}]\n",
        )
        .unwrap();
        assert_eq!(spec.action.as_deref(), Some("deny"));
        assert_eq!(
            spec.rules[0].to[0].operation.as_ref().unwrap().ports,
            ["http", "8080"]
        );
    }
}
