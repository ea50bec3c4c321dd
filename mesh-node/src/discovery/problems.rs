//! Reporting what is wrong with, or not implemented for, the configuration objects of
//! a new state (DestinationRules, PeerAuthentications, AuthorizationPolicies,
//! RequestAuthentications): each problem logged with the object's name (rate-limited) and counted in `nodemesh_config_problems_total{kind,reason}` once
//! per version of the object, not once per snapshot. `meshctl node services` shows
//! them too.

use std::collections::HashMap;

use crate::{
    discovery::authorization::PolicyKind, discovery::cluster::ClusterState,
    discovery::cluster::Kind, discovery::traffic_policy::Problem, keys::ObjectKey,
    telemetry::metrics::Metrics,
};

/// What was last reported per object: only a change is reported again.
#[derive(Debug, Default)]
pub struct ProblemReporter {
    reported: HashMap<(Kind, ObjectKey), Vec<Problem>>,
}

impl ProblemReporter {
    pub fn new() -> ProblemReporter {
        ProblemReporter::default()
    }

    /// Reports the problems of `state`'s rules that were not reported before; returns
    /// how many problems were new.
    pub fn report(&mut self, state: &ClusterState, metrics: &Metrics) -> usize {
        let rules = state.compiled_rules.iter().map(|(key, rule)| {
            let applied = if rule.is_valid() {
                "the rest of the rule applies"
            } else {
                "the rule is rejected: the Service keeps its default policy"
            };
            (Kind::DestinationRule, key, &rule.problems, applied)
        });
        let peer = state.peer_authentication.compiled.iter().map(|(key, pa)| {
            let applied = if pa.in_force {
                "the rest of the policy applies"
            } else {
                "the policy is not used"
            };
            (Kind::PeerAuthentication, key, &pa.problems, applied)
        });
        let authz = state.authorization.policies.values().map(|p| {
            let kind = match p.id.kind {
                PolicyKind::Istio => Kind::IstioAuthorizationPolicy,
                PolicyKind::Nodemesh => Kind::AuthorizationPolicy,
            };
            let applied = "what cannot be compiled fails closed (see detail)";
            (kind, &p.id.key, &p.problems, applied)
        });
        let request = state
            .request_authentication
            .compiled
            .iter()
            .map(|(key, ra)| {
                (
                    Kind::RequestAuthentication,
                    key,
                    &ra.problems,
                    "the rest of the policy applies",
                )
            });
        let telemetry = state.telemetry.compiled.iter().map(|(key, t)| {
            (
                Kind::Telemetry,
                key,
                &t.problems,
                "the rest of the resource applies",
            )
        });
        let mut new = 0;
        let mut reported = HashMap::new();
        for (kind, key, problems, applied) in rules
            .chain(peer)
            .chain(authz)
            .chain(request)
            .chain(telemetry)
        {
            if problems.is_empty() {
                continue;
            }
            let id = (kind, key.clone());
            if self.reported.get(&id) != Some(problems) {
                new += problems.len();
                log(kind, key, problems, applied, metrics);
            }
            reported.insert(id, problems.clone());
        }
        self.reported = reported;
        new
    }
}

fn log(kind: Kind, key: &ObjectKey, problems: &[Problem], applied: &str, metrics: &Metrics) {
    let kind = kind.name();
    for p in problems {
        metrics
            .config_problems
            .with_label_values(&[kind, p.reason.as_str()])
            .inc();
        crate::warn_limited!(
            kind,
            object = %key,
            field = %p.field,
            reason = p.reason.as_str(),
            detail = %p.detail,
            "{applied}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::files::parse_manifest;

    const RULES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: broken, namespace: apps}
spec: {host: web, trafficPolicy: {outlierDetection: {baseEjectionTime: soon}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: fine, namespace: apps}
spec: {host: api, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
"#;

    #[test]
    fn problems_are_counted_once_per_version_with_their_reason() {
        let metrics = Metrics::new();
        let mut r = ProblemReporter::new();
        let state = ClusterState::from_objects(parse_manifest(RULES).unwrap());
        assert_eq!(r.report(&state, &metrics), 1);
        assert_eq!(r.report(&state, &metrics), 0, "same problems: not again");
        let count = metrics
            .config_problems
            .with_label_values(&["DestinationRule", "bad_duration"])
            .get();
        assert_eq!(count, 1);
        // The broken rule is not in force; the fine one is.
        assert!(state
            .destination_rule_for(&ObjectKey::new("apps", "web"))
            .is_none());
        assert!(state
            .destination_rule_for(&ObjectKey::new("apps", "api"))
            .is_some());
    }

    #[test]
    fn peer_authentication_problems_are_counted_under_their_kind() {
        let metrics = Metrics::new();
        let mut r = ProblemReporter::new();
        let text = format!(
            "{RULES}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {{name: broken, namespace: apps}}\nspec: {{mtls: {{mode: STRICT}}, portLevelMtls: {{8080: {{mode: DISABLE}}}}}}\n"
        );
        let state = ClusterState::from_objects(parse_manifest(&text).unwrap());
        assert_eq!(r.report(&state, &metrics), 2, "one per kind, same name");
        assert_eq!(r.report(&state, &metrics), 0);
        let count = metrics
            .config_problems
            .with_label_values(&["PeerAuthentication", "invalid_field"])
            .get();
        assert_eq!(count, 1);
    }
}
