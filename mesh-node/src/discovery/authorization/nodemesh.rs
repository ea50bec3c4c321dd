//! Nodemesh's own `security.nodemesh.io/v1alpha1` AuthorizationPolicy (L4: principals,
//! namespaces, service accounts, ports) translated into the model, deciding as it did:
//!
//! - a source matches if ANY of its lists does (Istio's fields must all match), so each
//!   list becomes a source of its own; a source with no lists matches anyone;
//! - full SPIFFE principals (`spiffe://td/ns/a/sa/b`) become Istio's `td/ns/a/sa/b`;
//!   `ns/sa` service accounts match that account in any trust domain;
//! - a destination without ports matches nothing (a rule whose destinations all lack
//!   ports matches nothing, and is left out).

use super::{
    Action, CompiledPolicy, Field, Operation, PolicyId, PolicyKind, Rule, RuleBody, Source,
    StringMatch, Target,
};
use crate::{
    discovery::policy::AuthorizationPolicy, discovery::policy::PolicyAction,
    discovery::policy::PolicyRule, discovery::policy::PolicySource, keys::ObjectKey,
};

fn any_of(matches: Vec<StringMatch>) -> Field<StringMatch> {
    Field {
        any_of: matches,
        none_of: Vec::new(),
    }
}

fn sources(s: &PolicySource) -> Vec<Source> {
    let mut out = Vec::new();
    if !s.principals.is_empty() {
        let principals = s
            .principals
            .iter()
            .map(|p| StringMatch::Exact(p.strip_prefix("spiffe://").unwrap_or(p).to_string()))
            .collect();
        out.push(Source {
            principals: any_of(principals),
            ..Source::default()
        });
    }
    if !s.namespaces.is_empty() {
        let namespaces = s.namespaces.iter().cloned().map(StringMatch::Exact);
        out.push(Source {
            namespaces: any_of(namespaces.collect()),
            ..Source::default()
        });
    }
    if !s.service_accounts.is_empty() {
        let accounts = s.service_accounts.iter().map(|sa| {
            let (ns, name) = sa.split_once('/').unwrap_or(("", sa));
            StringMatch::Suffix(format!("/ns/{ns}/sa/{name}"))
        });
        out.push(Source {
            principals: any_of(accounts.collect()),
            ..Source::default()
        });
    }
    if out.is_empty() {
        out.push(Source::default());
    }
    out
}

/// None: the rule matches nothing (left out: a policy matches when any rule does).
fn rule(r: &PolicyRule) -> Option<Rule> {
    let to: Vec<Operation> =
        r.to.iter()
            .filter(|d| !d.ports.is_empty())
            .map(|d| Operation {
                ports: Field {
                    any_of: d.ports.clone(),
                    none_of: Vec::new(),
                },
                ..Operation::default()
            })
            .collect();
    if !r.to.is_empty() && to.is_empty() {
        return None;
    }
    Some(Rule::Match(RuleBody {
        from: r.from.iter().flat_map(sources).collect(),
        to,
        when: Vec::new(),
    }))
}

/// Translates one Nodemesh policy.
pub fn translate(key: &ObjectKey, policy: &AuthorizationPolicy) -> CompiledPolicy {
    let spec = &policy.spec;
    let action = match spec.action {
        PolicyAction::Allow => Action::Allow,
        PolicyAction::Deny => Action::Deny,
    };
    let rules = spec.rules.iter().filter_map(rule).collect();
    CompiledPolicy {
        id: PolicyId {
            kind: PolicyKind::Nodemesh,
            key: key.clone(),
        },
        action,
        targets: vec![Target::Labels(spec.selector.match_labels.clone())],
        rules,
        problems: Vec::new(),
    }
}
