//! `meshctl node policies`: the tables of mTLS modes by workload and port, and of
//! PeerAuthentications.

use comfy_table::Table;
use mesh_node::admin::api::{PeerAuthLevel, PoliciesView};

use crate::format::{key, table, text};

/// This node's workloads: the mode of their ports, one row per port override.
pub fn workload_modes(v: &PoliciesView) -> Table {
    let mut t = table(&["WORKLOAD", "PORT", "MTLS", "DECIDED BY"]);
    for w in &v.workloads {
        let mut by = text(&w.decided_by);
        if !w.also_selected_by.is_empty() {
            let others: Vec<String> = w.also_selected_by.iter().map(key).collect();
            by = format!("{by}\n(also selected by, younger: {})", others.join(", "));
        }
        t.add_row(vec![key(&w.pod), "*".into(), w.mode.name().into(), by]);
        for p in &w.ports {
            t.add_row(vec![
                String::new(),
                p.port.to_string(),
                p.mode.name().into(),
                text(&p.decided_by),
            ]);
        }
    }
    t
}

pub fn peer_authentications(v: &PoliciesView) -> Table {
    let mut t = table(&["PEERAUTHENTICATION", "LEVEL", "MTLS", "PORTS", "STATUS"]);
    for p in &v.peer_authentications {
        let level = match p.level {
            PeerAuthLevel::Mesh => "mesh".to_string(),
            PeerAuthLevel::Namespace => "namespace".to_string(),
            PeerAuthLevel::Workload => {
                let s: Vec<String> = p
                    .selector
                    .iter()
                    .map(|(k, v)| format!("{k}={}", text(v)))
                    .collect();
                format!("workload {}", s.join(","))
            }
        };
        let ports: Vec<String> = p
            .ports
            .iter()
            .map(|(n, m)| format!("{n}: {}", m.name()))
            .collect();
        let mut status = vec![if p.in_force { "in force" } else { "NOT USED" }.to_string()];
        status.extend(
            p.problems
                .iter()
                .map(|pr| format!("{}: {}: {}", pr.field, pr.reason.as_str(), text(&pr.detail))),
        );
        t.add_row(vec![
            key(&p.policy),
            level,
            p.mode.map_or("UNSET", |m| m.name()).into(),
            if ports.is_empty() {
                "-".into()
            } else {
                ports.join("\n")
            },
            status.join("\n"),
        ]);
    }
    t
}
