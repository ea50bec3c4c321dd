//! The Kubernetes YAML the simulated cluster feeds its agents: ordinary Namespace and
//! Pod manifests, as `kubectl get -o yaml` would show them.

use super::cluster::SimPod;

pub fn namespaces_yaml(namespaces: &[(String, bool)], strict: &[String]) -> String {
    namespaces
        .iter()
        .map(|(name, enrolled)| {
            let mut labels = String::new();
            if *enrolled {
                labels += "\n    nodemesh.io/mesh: enabled";
            }
            if strict.contains(name) {
                labels += "\n    nodemesh.io/mtls: strict";
            }
            let labels = if labels.is_empty() {
                labels
            } else {
                format!("\n  labels:{labels}")
            };
            format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn yaml_map(items: &[(String, String)]) -> String {
    items
        .iter()
        .map(|(k, v)| format!("\n    {k}: \"{v}\""))
        .collect()
}

/// The pods; those named in `unpublished` without an IP in their status (Pending, as
/// before the kubelet reports one).
pub fn pods_yaml(pods: &[SimPod], unpublished: &[String]) -> String {
    pods.iter()
        .map(|p| {
            let s = &p.spec;
            let status = if unpublished.contains(&s.name) {
                "status:\n  phase: Pending\n".to_string()
            } else {
                format!(
                    "status:\n  phase: Running\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: \"{}\"\n",
                    p.ipv4, p.ipv4, p.ipv6
                )
            };
            let annotations = if s.annotations.is_empty() {
                String::new()
            } else {
                format!("\n  annotations:{}", yaml_map(&s.annotations))
            };
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  labels:{}{annotations}\n\
                 spec:\n  nodeName: {}\n  serviceAccountName: {}\n  containers:\n  - name: app\n    image: mesh-testapp\n{status}",
                s.name,
                s.namespace,
                p.uid,
                yaml_map(&s.labels),
                s.node,
                s.service_account,
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}
