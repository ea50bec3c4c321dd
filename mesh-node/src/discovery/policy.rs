//! `AuthorizationPolicy` (`security.nodemesh.io/v1alpha1`): who may connect to which
//! workloads. The type lives here so discovery carries it; enforcement comes with
//! mTLS identities.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.nodemesh.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads in the policy's namespace it applies to; empty selects all of them.
    #[serde(default)]
    pub selector: WorkloadSelector,
    /// ALLOW or DENY. DENY wins; a workload with ALLOW policies denies all else.
    pub action: PolicyAction,
    /// A connection matching any rule matches the policy.
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// Sources; a rule without `from` matches any source.
    #[serde(default)]
    pub from: Vec<PolicySource>,
    /// Destination ports; a rule without `to` matches any port.
    #[serde(default)]
    pub to: Vec<PolicyDestination>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySource {
    /// SPIFFE IDs, e.g. `spiffe://cluster.local/ns/apps/sa/client`.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// `<namespace>/<name>` service accounts.
    #[serde(default)]
    pub service_accounts: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDestination {
    #[serde(default)]
    pub ports: Vec<u16>,
}
