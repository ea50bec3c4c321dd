//! `/policies`: mTLS modes (by namespace, by workload of this node and port, and the
//! PeerAuthentications behind them) and authorization policies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::discovery::{authorization::Action, authorization::PolicyKind, mtls::MtlsMode};
use crate::{
    discovery::policy::PolicyAction, discovery::policy::PolicyRule, discovery::problem::Problem,
    keys::ObjectKey, keys::PodKey,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoliciesView {
    pub namespaces: Vec<NamespaceView>,
    /// The effective mTLS mode of each enrolled workload of this node.
    #[serde(default)]
    pub workloads: Vec<WorkloadMtlsView>,
    /// Every PeerAuthentication, in force or not.
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthenticationView>,
    /// Nodemesh's own AuthorizationPolicies as written.
    pub policies: Vec<PolicyView>,
    /// Each enrolled workload of this node and the AuthorizationPolicies (both kinds)
    /// that apply to it.
    #[serde(default)]
    pub authorization: Vec<WorkloadAuthzView>,
}

/// The AuthorizationPolicies that apply to one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadAuthzView {
    pub pod: PodKey,
    pub policies: Vec<AuthzPolicyView>,
}

/// One AuthorizationPolicy as compiled, for one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthzPolicyView {
    /// Istio's or Nodemesh's own kind.
    pub kind: PolicyKind,
    pub policy: ObjectKey,
    #[serde(flatten)]
    pub action: Action,
    /// Whether a rule has HTTP attributes (its connections are served as HTTP).
    pub l7: bool,
    /// What could not be compiled (it fails closed).
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamespaceView {
    pub namespace: String,
    /// The namespace carries the mesh label.
    pub enrolled: bool,
    /// The mode of its pods that no workload PeerAuthentication selects.
    pub mode: MtlsMode,
    /// What decided `mode`.
    #[serde(default)]
    pub decided_by: String,
}

/// One workload's mode for its ports, and the ports its PeerAuthentication overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadMtlsView {
    pub pod: PodKey,
    /// Every port without a port-level mode.
    pub mode: MtlsMode,
    pub decided_by: String,
    pub ports: Vec<PortMtlsView>,
    /// Younger workload policies that select the pod too and are not used for it.
    pub also_selected_by: Vec<ObjectKey>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortMtlsView {
    pub port: u16,
    pub mode: MtlsMode,
    pub decided_by: String,
}

/// Where a PeerAuthentication applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerAuthLevel {
    Mesh,
    Namespace,
    Workload,
}

/// One PeerAuthentication as the agent reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerAuthenticationView {
    pub policy: ObjectKey,
    pub level: PeerAuthLevel,
    /// The selector's labels (workload level).
    pub selector: BTreeMap<String, String>,
    /// `mtls.mode`; None: UNSET (inherits).
    pub mode: Option<MtlsMode>,
    /// `portLevelMtls` modes that apply (UNSET ports inherit: absent).
    pub ports: BTreeMap<u16, MtlsMode>,
    /// False: shadowed by an older policy, or ignored.
    pub in_force: bool,
    pub problems: Vec<Problem>,
    pub selects_on_this_node: Vec<PodKey>,
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
                    mode: MtlsMode::Permissive,
                    decided_by: "no PeerAuthentication or label (default)".into(),
                },
                NamespaceView {
                    namespace: "secure".into(),
                    enrolled: true,
                    mode: MtlsMode::Strict,
                    decided_by: "label nodemesh.io/mtls of namespace secure".into(),
                },
            ],
            workloads: vec![WorkloadMtlsView {
                pod: ObjectKey::new("apps", "server"),
                mode: MtlsMode::Strict,
                decided_by: "PeerAuthentication apps/server (workload)".into(),
                ports: vec![PortMtlsView {
                    port: 9090,
                    mode: MtlsMode::Disable,
                    decided_by: "PeerAuthentication apps/server (portLevelMtls 9090)".into(),
                }],
                also_selected_by: vec![ObjectKey::new("apps", "younger")],
            }],
            peer_authentications: vec![PeerAuthenticationView {
                policy: ObjectKey::new("apps", "server"),
                level: PeerAuthLevel::Workload,
                selector: BTreeMap::from([("app".into(), "server".into())]),
                mode: Some(MtlsMode::Strict),
                ports: BTreeMap::from([(9090, MtlsMode::Disable)]),
                in_force: true,
                problems: vec![Problem::not_implemented("x".into(), "y")],
                selects_on_this_node: vec![ObjectKey::new("apps", "server")],
            }],
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
            authorization: vec![WorkloadAuthzView {
                pod: ObjectKey::new("apps", "server"),
                policies: vec![AuthzPolicyView {
                    kind: PolicyKind::Istio,
                    policy: ObjectKey::new("apps", "ext"),
                    action: Action::Custom {
                        provider: Some("opa".into()),
                    },
                    l7: true,
                    problems: vec![],
                }],
            }],
        };
        check(
            &view,
            json!({
                "namespaces": [
                    {"namespace": "apps", "enrolled": true, "mode": "PERMISSIVE",
                     "decided_by": "no PeerAuthentication or label (default)"},
                    {"namespace": "secure", "enrolled": true, "mode": "STRICT",
                     "decided_by": "label nodemesh.io/mtls of namespace secure"},
                ],
                "workloads": [{
                    "pod": {"namespace": "apps", "name": "server"},
                    "mode": "STRICT",
                    "decided_by": "PeerAuthentication apps/server (workload)",
                    "ports": [{"port": 9090, "mode": "DISABLE",
                               "decided_by": "PeerAuthentication apps/server (portLevelMtls 9090)"}],
                    "also_selected_by": [{"namespace": "apps", "name": "younger"}],
                }],
                "peer_authentications": [{
                    "policy": {"namespace": "apps", "name": "server"},
                    "level": "workload",
                    "selector": {"app": "server"},
                    "mode": "STRICT",
                    "ports": {"9090": "DISABLE"},
                    "in_force": true,
                    "problems": [{"field": "x", "reason": "not_implemented",
                                  "detail": "y is not implemented by Nodemesh yet: it is not applied"}],
                    "selects_on_this_node": [{"namespace": "apps", "name": "server"}],
                }],
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
                "authorization": [{
                    "pod": {"namespace": "apps", "name": "server"},
                    "policies": [{
                        "kind": "Istio",
                        "policy": {"namespace": "apps", "name": "ext"},
                        "action": "CUSTOM",
                        "provider": "opa",
                        "l7": true,
                        "problems": [],
                    }],
                }],
            }),
        );
    }
}
