//! Istio's `targetRef` / `targetRefs` (the form of Gateway API's GEP-2648), shared by
//! the security kinds that take it (AuthorizationPolicy, RequestAuthentication), as the
//! user writes it.
//!
//! `kind` and `name` are required by the CRD's schema, as in Istio's (the API server
//! refuses a reference without them), but may be absent when parsed, so that a broken
//! reference in a manifest file still parses (one bad document must not take the whole
//! file with it): the kinds' compilers report it by field.

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

use crate::{
    discovery::peer_authentication::WorkloadSelector, discovery::problem::Problem,
    discovery::problem::ProblemReason, discovery::service_ref::is_service_parent, keys::ObjectKey,
};

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

/// Which pods a policy names, read from its `selector` and `targetRef(s)` the same way
/// for every kind that has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyScope {
    /// The selector's labels; None when it is absent or empty.
    pub labels: Option<BTreeMap<String, String>>,
    /// The Services the targetRefs name; None when no targetRef is written (Some and
    /// empty when none of them can be a target: the policy selects nothing by them).
    pub services: Option<Vec<ObjectKey>>,
}

/// Reads a policy's scope, reporting into `problems` each target that is not a Service
/// of the policy's namespace and `selector` written beside `targetRefs`. Istio rejects
/// the two together (only one may be set); Nodemesh keeps both, so the policy applies
/// to the pods of either: more pods checked, not fewer.
pub fn scope(
    policy: &ObjectKey,
    selector: Option<&WorkloadSelector>,
    target_ref: Option<&PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
    problems: &mut Vec<Problem>,
) -> PolicyScope {
    let labels = selector
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty());
    let refs: Vec<(String, &PolicyTargetReference)> = target_ref
        .map(|r| ("targetRef".to_string(), r))
        .into_iter()
        .chain(
            target_refs
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("targetRefs[{i}]"), r)),
        )
        .collect();
    if refs.is_empty() {
        return PolicyScope {
            labels,
            services: None,
        };
    }
    if labels.is_some() {
        problems.push(Problem {
            field: "selector".into(),
            reason: ProblemReason::ExclusiveFields,
            detail: "selector and targetRefs may not be set together (Istio rejects the policy): Nodemesh applies it to the pods of both; keep one of them".into(),
        });
    }
    let mut services = Vec::new();
    for (field, r) in refs {
        let own = r
            .namespace
            .as_deref()
            .is_none_or(|ns| ns == policy.namespace);
        if is_service_parent(r.group.as_deref(), Some(&r.kind)) && own && !r.name.is_empty() {
            services.push(ObjectKey::new(&policy.namespace, &r.name));
        } else {
            problems.push(Problem {
                field,
                reason: ProblemReason::NotImplemented,
                detail: format!(
                    "only a named Service of the policy's namespace can be a target (this is {}/{} `{}`{}): it selects nothing",
                    r.group.as_deref().unwrap_or(""),
                    r.kind,
                    r.name,
                    r.namespace
                        .as_deref()
                        .map(|ns| format!(" in {ns}"))
                        .unwrap_or_default()
                ),
            });
        }
    }
    PolicyScope {
        labels,
        services: Some(services),
    }
}

/// The schema says `kind` and `name` are required (without the empty defaults that
/// parsing leniently would give them, which the API server would fill in).
fn kind_and_name_required(schema: &mut Schema) {
    const REQUIRED: [&str; 2] = ["kind", "name"];
    if let Some(properties) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) {
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

    fn read(spec: &str) -> (PolicyScope, Vec<(String, ProblemReason)>) {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Spec {
            selector: Option<WorkloadSelector>,
            target_ref: Option<PolicyTargetReference>,
            #[serde(default)]
            target_refs: Vec<PolicyTargetReference>,
        }
        let spec: Spec = serde_yaml::from_str(spec).unwrap();
        let mut problems = Vec::new();
        let scope = scope(
            &ObjectKey::new("apps", "p"),
            spec.selector.as_ref(),
            spec.target_ref.as_ref(),
            &spec.target_refs,
            &mut problems,
        );
        let problems = problems.into_iter().map(|p| (p.field, p.reason)).collect();
        (scope, problems)
    }

    #[test]
    fn selector_and_target_refs_together_are_reported_and_both_kept() {
        let (scope, problems) =
            read("{selector: {matchLabels: {app: a}}, targetRefs: [{kind: Service, name: web}]}");
        assert_eq!(
            scope.labels,
            Some(BTreeMap::from([("app".to_string(), "a".to_string())]))
        );
        assert_eq!(scope.services, Some(vec![ObjectKey::new("apps", "web")]));
        assert_eq!(
            problems,
            [("selector".to_string(), ProblemReason::ExclusiveFields)]
        );
        // An empty selector is no selector: nothing to report.
        let (scope, problems) = read("{selector: {}, targetRef: {kind: Service, name: web}}");
        assert_eq!(scope.labels, None);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn only_a_named_service_of_the_policys_namespace_is_a_target() {
        let (scope, problems) = read(
            "{targetRef: {kind: Service, group: core, name: a}, targetRefs: [{kind: Service, group: '', name: b}, {kind: Gateway, group: gateway.networking.k8s.io, name: gw}, {kind: Service, name: far, namespace: other}, {kind: Service}, {name: c}]}",
        );
        assert_eq!(
            scope.services,
            Some(vec![
                ObjectKey::new("apps", "a"),
                ObjectKey::new("apps", "b")
            ])
        );
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "targetRefs[1]",
                "targetRefs[2]",
                "targetRefs[3]",
                "targetRefs[4]"
            ]
        );
        assert!(problems
            .iter()
            .all(|(_, r)| *r == ProblemReason::NotImplemented));
        // Nothing written: no services at all (not an empty list).
        assert_eq!(read("{}").0, PolicyScope::default());
    }

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
