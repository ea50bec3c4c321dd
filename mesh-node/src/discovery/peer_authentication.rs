//! Istio's `PeerAuthentication` (`security.istio.io` v1 and v1beta1: one schema): whether
//! a workload takes plaintext beside mutual TLS, as the user writes it.
//!
//! The types here are the wire form, written from Istio's API reference with Istio's
//! field names. Modes and port keys stay text so that a broken policy still parses:
//! `discovery::mtls` checks them, reports the policy by name, and decides each pod's
//! and port's effective mode.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// The API group of Istio's security kinds.
pub const ISTIO_SECURITY: &str = "security.istio.io";
/// The versions we serve and read, storage version first (one schema for all).
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    shortname = "pa",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// The pods of the policy's namespace it applies to (by labels). Absent or empty:
    /// every pod of the namespace (of the mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode for every port; absent or `UNSET` inherits from the level above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Modes by the workload's own port (the port the pod listens on, not a Service's),
    /// for policies with a selector only.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "port_keys"
    )]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

/// `portLevelMtls` keys as text: YAML writes them as numbers (`8080:`), JSON as
/// strings; anything else stays text for the check to report.
fn port_keys<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, MutualTls>, D::Error> {
    #[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
    #[serde(untagged)]
    enum Key {
        Number(i64),
        Text(String),
    }
    let raw: BTreeMap<Key, MutualTls> = BTreeMap::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let k = match k {
                Key::Number(n) => n.to_string(),
                Key::Text(t) => t,
            };
            (k, v)
        })
        .collect())
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a pod must all carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MutualTls {
    /// `STRICT`, `PERMISSIVE`, `DISABLE` or `UNSET` (the default: inherit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// The CRD, served at every version of [`VERSIONS`] with one schema, stored as v1.
pub fn crd() -> CustomResourceDefinition {
    crate::discovery::crd_versions::at_versions(PeerAuthentication::crd(), &VERSIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_serves_v1_and_v1beta1_and_stores_v1() {
        let crd = crd();
        let names: Vec<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, VERSIONS);
        let stored: Vec<&str> = crd
            .spec
            .versions
            .iter()
            .filter(|v| v.storage)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(stored, ["v1"]);
        assert_eq!(crd.spec.group, ISTIO_SECURITY);
        assert_eq!(crd.spec.names.plural, "peerauthentications");
    }

    #[test]
    fn a_policy_with_a_broken_mode_and_port_still_parses() {
        let spec: PeerAuthenticationSpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"app": "x"}},
            "mtls": {"mode": "strict"},
            "portLevelMtls": {"http": {"mode": "DISABLE"}, "8080": {}},
        }))
        .unwrap();
        assert_eq!(spec.mtls.unwrap().mode.as_deref(), Some("strict"));
        assert_eq!(spec.port_level_mtls.len(), 2);
        // YAML writes ports as numbers.
        let spec: PeerAuthenticationSpec =
            serde_yaml::from_str("portLevelMtls: {8080: {mode: DISABLE}}").unwrap();
        assert_eq!(
            spec.port_level_mtls["8080"].mode.as_deref(),
            Some("DISABLE")
        );
    }
}
