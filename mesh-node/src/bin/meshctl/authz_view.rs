//! `meshctl node policies`: per workload of this node, the AuthorizationPolicies (Istio's
//! and Nodemesh's own) that apply to it, their action, whether they are decided per
//! HTTP request, and what in them could not be compiled (it fails closed).

use comfy_table::Table;
use mesh_node::admin::api::{Action, PoliciesView};

use crate::format::{key, table, text};

fn action(a: &Action) -> String {
    match a {
        Action::Custom { provider } => format!(
            "CUSTOM ({}): DENIES ALL, not supported",
            text(provider.as_deref().unwrap_or("no provider"))
        ),
        Action::Unknown { written } => format!("`{}`: DENIES ALL, unknown", text(written)),
        other => other.name().to_string(),
    }
}

pub fn workload_policies(v: &PoliciesView) -> Table {
    let mut t = table(&[
        "WORKLOAD",
        "AUTHORIZATIONPOLICY",
        "KIND",
        "ACTION",
        "L7",
        "PROBLEMS",
    ]);
    for w in &v.authorization {
        if w.policies.is_empty() {
            t.add_row(vec![
                key(&w.pod),
                "(none: allowed)".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for (i, p) in w.policies.iter().enumerate() {
            let problems: Vec<String> = p
                .problems
                .iter()
                .map(|pr| format!("{}: {}: {}", pr.field, pr.reason.as_str(), text(&pr.detail)))
                .collect();
            t.add_row(vec![
                if i == 0 { key(&w.pod) } else { String::new() },
                key(&p.policy),
                p.kind.api_group().into(),
                action(&p.action),
                if p.l7 { "yes" } else { "no" }.into(),
                if problems.is_empty() {
                    "-".into()
                } else {
                    problems.join("\n")
                },
            ]);
        }
    }
    t
}
