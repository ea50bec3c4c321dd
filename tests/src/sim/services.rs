//! Services of the simulated cluster. The harness plays the endpoints controller: each
//! Service gets an IPv4 and an IPv6 EndpointSlice listing its backend pods, with their
//! readiness as the test sets it. TCPRoutes split a Service between others (GAMMA).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use super::cluster::SimPod;

/// The service address ranges the agents are told about.
pub const SERVICE_CIDRS: [&str; 2] = ["10.96.0.0/16", "fd00:96::/112"];

#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub port: u16,
    pub target_port: u16,
    /// Pods backing the Service.
    pub pods: Vec<String>,
    pub annotations: Vec<(String, String)>,
    /// A second port (`alt`): service port → target port.
    pub alt_port: Option<(u16, u16)>,
}

impl ServiceSpec {
    pub fn new(
        name: &str,
        namespace: &str,
        port: u16,
        target_port: u16,
        pods: &[&str],
    ) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            namespace: namespace.into(),
            port,
            target_port,
            pods: pods.iter().map(|p| p.to_string()).collect(),
            annotations: Vec::new(),
            alt_port: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    pub namespace: String,
    /// The Service (and port) whose traffic the route splits.
    pub parent: String,
    pub port: u16,
    /// Backend Service names and weights.
    pub backends: Vec<(String, u32)>,
}

/// A Service as the cluster currently has it.
#[derive(Debug, Clone)]
pub struct SimService {
    pub spec: ServiceSpec,
    pub vip4: Ipv4Addr,
    pub vip6: Ipv6Addr,
    /// Backend pods whose endpoints are marked not ready.
    pub not_ready: BTreeSet<String>,
}

impl SimService {
    /// The `i`-th Service gets 10.96.0.(10+i) and fd00:96::(10+i).
    pub fn new(spec: ServiceSpec, i: usize) -> SimService {
        let host = 10 + i as u16;
        SimService {
            vip4: Ipv4Addr::new(10, 96, (host >> 8) as u8, host as u8),
            vip6: Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, host),
            spec,
            not_ready: BTreeSet::new(),
        }
    }

    pub fn addr4(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.vip4), self.spec.port)
    }

    pub fn addr6(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.vip6), self.spec.port)
    }
}

fn annotations_yaml(items: &[(String, String)]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let body: String = items
        .iter()
        .map(|(k, v)| format!("\n    {k}: \"{v}\""))
        .collect();
    format!("\n  annotations:{body}")
}

fn slice_yaml(svc: &SimService, pods: &[SimPod], v6: bool) -> String {
    let s = &svc.spec;
    let family = if v6 { "IPv6" } else { "IPv4" };
    let endpoints: String = s
        .pods
        .iter()
        .filter_map(|name| pods.iter().find(|p| p.spec.name == *name))
        .map(|p| {
            let ip = if v6 { p.ipv6.to_string() } else { p.ipv4.to_string() };
            let ready = !svc.not_ready.contains(&p.spec.name);
            format!(
                "\n- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}}}\n  nodeName: {}\n  targetRef: {{kind: Pod, namespace: {}, name: {}}}",
                p.spec.node, p.spec.namespace, p.spec.name
            )
        })
        .collect();
    let endpoints = if endpoints.is_empty() {
        " []".to_string()
    } else {
        endpoints
    };
    let alt = s
        .alt_port
        .map(|(_, target)| format!("- name: alt\n  port: {target}\n  protocol: TCP\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-{}\n  namespace: {}\n  labels:\n    kubernetes.io/service-name: {}\n\
         addressType: {family}\nports:\n- name: tcp\n  port: {}\n  protocol: TCP\n{alt}endpoints:{endpoints}\n",
        s.name,
        family.to_lowercase(),
        s.namespace,
        s.name,
        s.target_port
    )
}

pub fn services_yaml(services: &[SimService], pods: &[SimPod]) -> String {
    services
        .iter()
        .flat_map(|svc| {
            let s = &svc.spec;
            let alt = s
                .alt_port
                .map(|(port, target)| format!("  - name: alt\n    port: {port}\n    targetPort: {target}\n"))
                .unwrap_or_default();
            let service = format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}{}\n\
                 spec:\n  clusterIP: {}\n  clusterIPs: [\"{}\", \"{}\"]\n  ipFamilies: [IPv4, IPv6]\n  ports:\n  - name: tcp\n    port: {}\n    targetPort: {}\n{alt}",
                s.name,
                s.namespace,
                annotations_yaml(&s.annotations),
                svc.vip4,
                svc.vip4,
                svc.vip6,
                s.port,
                s.target_port
            );
            [service, slice_yaml(svc, pods, false), slice_yaml(svc, pods, true)]
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

pub fn routes_yaml(routes: &[RouteSpec]) -> String {
    routes
        .iter()
        .map(|r| {
            let backends: String = r
                .backends
                .iter()
                .map(|(name, weight)| format!("\n    - name: {name}\n      port: {}\n      weight: {weight}", r.port))
                .collect();
            format!(
                "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n  name: {}\n  namespace: {}\n\
                 spec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: {}\n    port: {}\n  rules:\n  - backendRefs:{backends}\n",
                r.name, r.namespace, r.parent, r.port
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}
