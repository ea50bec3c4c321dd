//! Enrollment rules (which namespaces and pods join the mesh) and what the proxy
//! needs to enroll a pod.

use std::{net::IpAddr, str::FromStr};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use mesh_common::{Cidr, InboundPolicy, OutboundPolicy, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS};
use serde::Serialize;

use crate::{
    discovery::cluster::ip_key, discovery::cluster::pod_ips, discovery::cluster::service_account,
    discovery::cluster::ClusterState, keys::PodKey,
};

/// Namespace label that enrolls a namespace (`enabled`); on a pod, `disabled` opts out.
pub const MESH_LABEL: &str = "nodemesh.io/mesh";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "nodemesh.io/exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "nodemesh.io/exclude-outbound-cidrs";
pub const EXCLUDE_INBOUND_PORTS: &str = "nodemesh.io/exclude-inbound-ports";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotEnrolled {
    /// The namespace lacks `nodemesh.io/mesh=enabled`.
    NamespaceNotEnrolled,
    /// The pod's namespace is not known.
    NamespaceUnknown,
    /// The pod carries `nodemesh.io/mesh=disabled`.
    PodOptedOut,
    /// hostNetwork pods share the node's namespace and are never enrolled.
    HostNetwork,
    /// No IP assigned yet.
    NoPodIp,
    /// Succeeded or Failed.
    Finished,
    /// Has a deletion timestamp.
    Terminating,
}

/// Everything the proxy needs to enroll one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    pub key: PodKey,
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    pub outbound: OutboundPolicy,
    pub inbound: InboundPolicy,
    /// Annotation values that could not be used, for the log.
    pub warnings: Vec<String>,
}

impl PodPlan {
    /// Whether `desired` asks for exactly what this enrolled plan does. An empty
    /// `desired.ips` (status has no IP yet) matches the addresses the pod was enrolled
    /// with; otherwise the addresses must be the same set.
    pub fn same_enrollment(&self, desired: &PodPlan) -> bool {
        let mut mine = self.ips.clone();
        let mut wanted = if desired.ips.is_empty() {
            mine.clone()
        } else {
            desired.ips.clone()
        };
        mine.sort();
        wanted.sort();
        mine == wanted
            && PodPlan {
                ips: Vec::new(),
                ..self.clone()
            } == PodPlan {
                ips: Vec::new(),
                ..desired.clone()
            }
    }
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

impl ClusterState {
    /// Whether a pod is enrolled, and if not, why.
    pub fn enrollment(&self, key: &PodKey, pod: &Pod) -> Result<(), NotEnrolled> {
        self.mesh_rules(key, pod)?;
        if pod_ips(pod).is_empty() {
            return Err(NotEnrolled::NoPodIp);
        }
        Ok(())
    }

    /// The enrollment rules, without the pod's address: a pod that passes them is in
    /// the mesh from the start, before its status has an IP (its node's agent reads
    /// the addresses from the pod's namespace, and holds its connections until then).
    pub fn mesh_rules(&self, key: &PodKey, pod: &Pod) -> Result<(), NotEnrolled> {
        let Some(ns) = self.namespace(&key.namespace) else {
            return Err(NotEnrolled::NamespaceUnknown);
        };
        if label(&ns.metadata, MESH_LABEL) != Some("enabled") {
            return Err(NotEnrolled::NamespaceNotEnrolled);
        }
        if label(&pod.metadata, MESH_LABEL) == Some("disabled") {
            return Err(NotEnrolled::PodOptedOut);
        }
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return Err(NotEnrolled::HostNetwork);
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(NotEnrolled::Terminating);
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded") | Some("Failed")) {
            return Err(NotEnrolled::Finished);
        }
        Ok(())
    }

    /// The enrolled pod that owns `ip`: the proxy sends traffic for it over HBONE.
    pub fn meshed_pod(&self, ip: IpAddr) -> Option<(&PodKey, &Pod)> {
        let key = self.pod_by_ip(ip)?;
        let pod = self.pods.get(key)?;
        self.enrollment(key, pod).ok()?;
        Some((key, &**pod))
    }

    /// Plans for every pod on `node` the rules enroll, including pods whose status has
    /// no IP yet (their plan's `ips` is empty).
    pub fn enrolled_on_node(&self, node: &str) -> Vec<PodPlan> {
        self.pods_on_node(node)
            .filter(|(key, pod)| self.mesh_rules(key, pod).is_ok())
            .map(|(key, pod)| plan(key, pod))
            .collect()
    }
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn parse_ports(text: &str, what: &str, warnings: &mut Vec<String>) -> [u16; MAX_EXCLUDED_PORTS] {
    let mut ports = [0u16; MAX_EXCLUDED_PORTS];
    let mut n = 0;
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(p) if p != 0 && n < MAX_EXCLUDED_PORTS => {
                ports[n] = p;
                n += 1;
            }
            Ok(_) if n >= MAX_EXCLUDED_PORTS => warnings.push(format!(
                "{what}: at most {MAX_EXCLUDED_PORTS} ports; `{item}` ignored"
            )),
            _ => warnings.push(format!("{what}: `{item}` is not a port (1-65535); ignored")),
        }
    }
    ports
}

fn parse_cidr(item: &str) -> Option<Cidr> {
    let (addr, len) = item.split_once('/')?;
    let ip = IpAddr::from_str(addr).ok()?;
    let len: u8 = len.parse().ok()?;
    let prefix_len = match ip {
        IpAddr::V4(_) if len <= 32 => 96 + len,
        IpAddr::V6(_) if len <= 128 => len,
        _ => return None,
    };
    Some(Cidr {
        addr: ip_key(ip),
        prefix_len,
        in_use: 1,
        _pad: [0; 2],
    })
}

fn parse_cidrs(text: &str, warnings: &mut Vec<String>) -> [Cidr; MAX_EXCLUDED_CIDRS] {
    let mut cidrs = [Cidr::default(); MAX_EXCLUDED_CIDRS];
    let mut n = 0;
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match parse_cidr(item) {
            Some(c) if n < MAX_EXCLUDED_CIDRS => {
                cidrs[n] = c;
                n += 1;
            }
            Some(_) => warnings.push(format!(
                "{EXCLUDE_OUTBOUND_CIDRS}: at most {MAX_EXCLUDED_CIDRS} CIDRs; `{item}` ignored"
            )),
            None => warnings.push(format!(
                "{EXCLUDE_OUTBOUND_CIDRS}: `{item}` is not a CIDR like 10.0.0.0/8; ignored"
            )),
        }
    }
    cidrs
}

pub fn plan(key: &PodKey, pod: &Pod) -> PodPlan {
    let ips = pod_ips(pod);
    let mut warnings: Vec<String> = pod
        .status
        .iter()
        .flat_map(|s| s.pod_ips.iter().flatten())
        .map(|p| p.ip.as_str())
        .chain(pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()))
        .filter(|t| IpAddr::from_str(t).is_err())
        .map(|t| format!("status.podIPs has an invalid address `{t}`"))
        .collect();
    let outbound = OutboundPolicy {
        excluded_ports: annotation(pod, EXCLUDE_OUTBOUND_PORTS)
            .map(|t| parse_ports(t, EXCLUDE_OUTBOUND_PORTS, &mut warnings))
            .unwrap_or_default(),
        excluded_cidrs: annotation(pod, EXCLUDE_OUTBOUND_CIDRS)
            .map(|t| parse_cidrs(t, &mut warnings))
            .unwrap_or_default(),
    };
    let inbound = InboundPolicy {
        excluded_ports: annotation(pod, EXCLUDE_INBOUND_PORTS)
            .map(|t| parse_ports(t, EXCLUDE_INBOUND_PORTS, &mut warnings))
            .unwrap_or_default(),
        ..InboundPolicy::default()
    };
    PodPlan {
        key: key.clone(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        ips,
        service_account: service_account(pod).to_string(),
        outbound,
        inbound,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        discovery::cluster::canonical, discovery::cluster::ip_from_key,
        discovery::files::parse_manifest,
    };

    fn state(yaml: &str) -> ClusterState {
        ClusterState::from_objects(parse_manifest(yaml).expect("valid yaml"))
    }

    const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: apps, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: apps
  uid: uid-web
  annotations:
    nodemesh.io/exclude-outbound-ports: "5432, 6379, nope"
    nodemesh.io/exclude-outbound-cidrs: "10.96.0.0/12,fd00::/8,bad/99"
    nodemesh.io/exclude-inbound-ports: "9090"
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}, {ip: "fd00:1::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: apps, labels: {nodemesh.io/mesh: disabled}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: apps}
spec: {nodeName: node-a, hostNetwork: true, containers: [{name: c, image: x}]}
status: {podIP: 192.168.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: plain}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: apps}
spec: {nodeName: node-b, containers: [{name: c, image: x}]}
status: {podIP: 10.2.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: apps}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
"#;

    fn reason(s: &ClusterState, name: &str) -> Result<(), NotEnrolled> {
        let key = PodKey {
            namespace: s
                .pods
                .keys()
                .find(|k| k.name == name)
                .unwrap()
                .namespace
                .clone(),
            name: name.into(),
        };
        s.enrollment(&key, &s.pods[&key])
    }

    #[test]
    fn enrollment_follows_labels_and_pod_kind() {
        let s = state(BASE);
        assert_eq!(reason(&s, "web"), Ok(()));
        assert_eq!(reason(&s, "batch"), Err(NotEnrolled::PodOptedOut));
        assert_eq!(reason(&s, "host"), Err(NotEnrolled::HostNetwork));
        assert_eq!(reason(&s, "other"), Err(NotEnrolled::NamespaceNotEnrolled));
        assert_eq!(reason(&s, "pending"), Err(NotEnrolled::NoPodIp));
        // A pod without an IP yet is still the agent's to enroll (from its namespace).
        let plans = s.enrolled_on_node("node-a");
        let names: Vec<&str> = plans.iter().map(|p| p.key.name.as_str()).collect();
        assert_eq!(names, ["pending", "web"]);
        assert!(plans[0].ips.is_empty());
        assert!(s.enrolled_on_node("node-c").is_empty());
        assert_eq!(s.enrolled_on_node("node-b")[0].key.name, "remote");
    }

    #[test]
    fn plan_reads_ips_and_exclusions_and_reports_bad_values() {
        let s = state(BASE);
        let p = &s.enrolled_on_node("node-a")[1];
        assert_eq!(p.uid, "uid-web");
        assert_eq!(p.service_account, "web");
        assert_eq!(
            p.ips,
            vec![
                "10.1.0.2".parse::<IpAddr>().unwrap(),
                "fd00:1::2".parse().unwrap()
            ]
        );
        assert_eq!(&p.outbound.excluded_ports[..3], &[5432, 6379, 0]);
        let svc = ip_key("10.100.1.1".parse().unwrap());
        assert!(p.outbound.excludes(&svc, 80));
        assert!(!p
            .outbound
            .excludes(&ip_key("10.200.0.1".parse().unwrap()), 80));
        assert!(p.outbound.excludes(&ip_key("fd12::1".parse().unwrap()), 80));
        assert!(p.inbound.excludes(9090));
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
        assert!(p.warnings.iter().any(|w| w.contains("`nope`")));
        assert!(p.warnings.iter().any(|w| w.contains("`bad/99`")));
    }

    #[test]
    fn an_ip_appearing_in_status_does_not_change_an_enrollment() {
        let s = state(BASE);
        let web = s.enrolled_on_node("node-a")[1].clone();
        let pending = PodPlan {
            ips: Vec::new(),
            ..web.clone()
        };
        assert!(web.same_enrollment(&pending), "no IP in status yet");
        let mut reversed = web.clone();
        reversed.ips.reverse();
        assert!(web.same_enrollment(&reversed), "the order does not matter");
        let mut moved = web.clone();
        moved.ips = vec!["10.1.0.9".parse().unwrap()];
        assert!(!web.same_enrollment(&moved));
        let mut annotated = pending.clone();
        annotated.inbound.excluded_ports[0] = 1;
        assert!(!web.same_enrollment(&annotated));
    }

    #[test]
    fn ip_keys_round_trip_and_v4_mapped_is_canonical() {
        for text in ["10.1.2.3", "fd00::5"] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(ip_from_key(&ip_key(ip)), ip);
        }
        let mapped: IpAddr = "::ffff:10.1.0.2".parse().unwrap();
        assert_eq!(canonical(mapped), "10.1.0.2".parse::<IpAddr>().unwrap());
        let s = state(BASE);
        assert_eq!(s.pod_by_ip(mapped).map(|k| k.name.as_str()), Some("web"));
        assert_eq!(
            s.pod_by_ip("fd00:1::2".parse().unwrap())
                .map(|k| k.name.as_str()),
            Some("web")
        );
    }
}
