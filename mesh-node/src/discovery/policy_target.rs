//! Istio's `targetRef` / `targetRefs` (the form of Gateway API's GEP-2648), shared by
//! the security kinds that take it (AuthorizationPolicy, RequestAuthentication), as the
//! user writes it.
//!
//! `kind` and `name` are required by the CRD's schema, as in Istio's (the API server
//! refuses a reference without them), but may be absent when parsed, so that a broken
//! reference in a manifest file still parses (one bad document must not take the whole
//! file with it): the kinds' compilers report it by field.

use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

/// A policy's target: a Service of the policy's own namespace (the only kind whose pods
/// Nodemesh serves).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kind_and_name_required)]
pub struct PolicyTargetReference {
    /// `""`, `core` or absent for a core Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service`.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    /// The policy's own namespace when set (others are not allowed, as in Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The schema says `kind` and `name` are required (without the empty defaults that
/// parsing leniently would give them, which the API server would fill in).
fn kind_and_name_required(schema: &mut Schema) {
    const REQUIRED: [&str; 2] = ["kind", "name"];
    if let Some(properties) = schema
        .get_mut("properties")
        .and_then(|p| p.as_object_mut())
    {
        for field in REQUIRED {
            if let Some(p) = properties.get_mut(field).and_then(|p| p.as_object_mut()) {
                p.remove("default");
            }
        }
    }
    schema.insert("required".into(), serde_json::json!(REQUIRED));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_without_kind_or_name_parses_but_the_schema_requires_them() {
        let r: PolicyTargetReference = serde_json::from_str(r#"{"group": ""}"#).unwrap();
        assert_eq!((r.kind.as_str(), r.name.as_str()), ("", ""));
        let schema = serde_json::to_value(schemars::schema_for!(PolicyTargetReference)).unwrap();
        assert_eq!(schema["required"], serde_json::json!(["kind", "name"]));
        assert!(schema["properties"]["kind"].get("default").is_none());
        assert!(schema["properties"]["name"].get("default").is_none());
    }
}
