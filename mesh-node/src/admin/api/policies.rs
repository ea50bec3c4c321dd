//! `/policies`: namespace mesh modes and authorization policies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    discovery::policy::PolicyAction, discovery::policy::PolicyRule, keys::ObjectKey, keys::PodKey,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoliciesView {
    pub namespaces: Vec<NamespaceView>,
    pub policies: Vec<PolicyView>,
}

/// How an enrolled namespace takes plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MeshMode {
    /// Plaintext is refused.
    Strict,
    /// Plaintext is accepted beside mutual TLS.
    Permissive,
}

impl MeshMode {
    pub fn of(strict_mtls: bool) -> MeshMode {
        if strict_mtls {
            MeshMode::Strict
        } else {
            MeshMode::Permissive
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MeshMode::Strict => "STRICT",
            MeshMode::Permissive => "PERMISSIVE",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamespaceView {
    pub namespace: String,
    /// The namespace carries the mesh label.
    pub enrolled: bool,
    pub mode: MeshMode,
}

/// One AuthorizationPolicy, with the pods of this node it selects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    pub policy: ObjectKey,
    pub action: PolicyAction,
    /// The selector's labels; empty selects every pod of the namespace.
    pub selector: BTreeMap<String, String>,
    pub rules: Vec<PolicyRule>,
    pub selects_on_this_node: Vec<PodKey>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        admin::api::round_trip::check, discovery::policy::PolicyDestination,
        discovery::policy::PolicySource,
    };

    #[test]
    fn policies_keep_their_wire_form() {
        let view = PoliciesView {
            namespaces: vec![
                NamespaceView {
                    namespace: "apps".into(),
                    enrolled: true,
                    mode: MeshMode::of(false),
                },
                NamespaceView {
                    namespace: "secure".into(),
                    enrolled: true,
                    mode: MeshMode::of(true),
                },
            ],
            policies: vec![PolicyView {
                policy: ObjectKey::new("apps", "deny-intruder"),
                action: PolicyAction::Deny,
                selector: BTreeMap::from([("app".into(), "server".into())]),
                rules: vec![PolicyRule {
                    from: vec![PolicySource {
                        principals: vec!["spiffe://cluster.local/ns/apps/sa/intruder".into()],
                        namespaces: vec![],
                        service_accounts: vec!["apps/intruder".into()],
                    }],
                    to: vec![PolicyDestination { ports: vec![8080] }],
                }],
                selects_on_this_node: vec![ObjectKey::new("apps", "server")],
            }],
        };
        check(
            &view,
            json!({
                "namespaces": [
                    {"namespace": "apps", "enrolled": true, "mode": "PERMISSIVE"},
                    {"namespace": "secure", "enrolled": true, "mode": "STRICT"},
                ],
                "policies": [{
                    "policy": {"namespace": "apps", "name": "deny-intruder"},
                    "action": "DENY",
                    "selector": {"app": "server"},
                    "rules": [{
                        "from": [{
                            "principals": ["spiffe://cluster.local/ns/apps/sa/intruder"],
                            "namespaces": [],
                            "serviceAccounts": ["apps/intruder"],
                        }],
                        "to": [{"ports": [8080]}],
                    }],
                    "selects_on_this_node": [{"namespace": "apps", "name": "server"}],
                }],
            }),
        );
    }
}
