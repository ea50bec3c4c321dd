//! Istio's `RequestAuthentication` (`security.istio.io` v1 and v1beta1: one schema):
//! which JSON Web Tokens a workload accepts, where requests carry them, and who signs
//! them — as the user writes it.
//!
//! The types here are the wire form, with Istio's field names. URIs, durations and the
//! inline JWKS stay text so that a broken policy still parses: `discovery::request_auth`
//! checks them, reports the policy by name, and indexes what selects each pod.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::discovery::peer_authentication::{WorkloadSelector, ISTIO_SECURITY, VERSIONS};
pub use crate::discovery::policy_target::PolicyTargetReference;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "RequestAuthentication",
    plural = "requestauthentications",
    shortname = "ra",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// The pods of the policy's namespace it applies to (by labels). Absent or empty:
    /// every pod of the namespace (of the mesh, in the root namespace). Not with
    /// `targetRef(s)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// One Service (kind `Service`, core group) whose pods the policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Services whose pods the policy applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// The issuers whose tokens are accepted, one rule each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// One issuer: how its tokens are found, checked and passed on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The `iss` a token must carry to be checked by this rule.
    #[serde(default)]
    pub issuer: String,
    /// Accepted `aud` values: the token must carry one of them. Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the issuer's public keys (a JWKS document) are fetched from, by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The issuer's public keys inline, a JWKS document as a JSON string (wins over
    /// `jwksUri`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers that carry the token (default: `Authorization: Bearer <token>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters that carry the token (default: `access_token`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Cookies that carry the token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// A header to set to the verified token's payload (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the request passed on (default: it is removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_original_token: Option<bool>,
    /// Claims copied to request headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Time allowed to fetch `jwksUri` (a duration such as `5s`; default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    #[serde(default)]
    pub name: String,
    /// Text before the token in the header's value, e.g. `Bearer `.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    #[serde(default)]
    pub header: String,
    #[serde(default)]
    pub claim: String,
}

/// Labels as in `WorkloadSelector` (re-used from PeerAuthentication).
pub type Labels = BTreeMap<String, String>;

/// The CRD, served at every version of [`VERSIONS`] with one schema, stored as v1.
pub fn crd() -> CustomResourceDefinition {
    crate::discovery::crd_versions::at_versions(RequestAuthentication::crd(), &VERSIONS)
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
        assert_eq!(crd.spec.names.plural, "requestauthentications");
    }

    #[test]
    fn istios_example_parses() {
        let spec: RequestAuthenticationSpec = serde_yaml::from_str(
            r#"
selector: {matchLabels: {app: httpbin}}
jwtRules:
- issuer: "issuer-foo"
  jwksUri: https://example.com/.well-known/jwks.json
  fromHeaders: [{name: x-jwt-assertion, prefix: "Bearer "}]
  fromParams: [my_token]
  outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}]
  forwardOriginalToken: true
  timeout: 3s
"#,
        )
        .unwrap();
        let rule = &spec.jwt_rules[0];
        assert_eq!(rule.issuer, "issuer-foo");
        assert_eq!(rule.from_headers[0].prefix.as_deref(), Some("Bearer "));
        assert_eq!(rule.forward_original_token, Some(true));
        assert_eq!(rule.output_claim_to_headers[0].claim, "sub");
    }
}
