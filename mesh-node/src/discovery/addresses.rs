//! Addresses as the agent compares them (IPv4-mapped IPv6 as IPv4, one key form for
//! the eBPF maps), and what a Pod or Service carries: its IPs, its service account.

use std::{
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use k8s_openapi::api::core::v1::{Pod, Service};
use mesh_common::Ip;

/// IPv4-mapped IPv6 becomes IPv4, so lookups compare like with like.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

pub fn ip_key(ip: IpAddr) -> Ip {
    let v6: Ipv6Addr = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    Ip::from_bytes(v6.octets())
}

pub fn ip_from_key(ip: &Ip) -> IpAddr {
    canonical(IpAddr::V6(Ipv6Addr::from(ip.to_bytes())))
}

fn parse_ips<'a>(texts: impl Iterator<Item = &'a str>) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for t in texts {
        if let Ok(ip) = IpAddr::from_str(t) {
            let ip = canonical(ip);
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    ips
}

/// The pod's IPs: status.podIPs, falling back to status.podIP.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    if listed.is_empty() {
        parse_ips(status.pod_ip.as_deref().into_iter())
    } else {
        parse_ips(listed.into_iter())
    }
}

/// The pod's service account (its identity); Kubernetes defaults it to `default`.
pub fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default")
}

/// The Service's virtual IPs: spec.clusterIPs, falling back to spec.clusterIP.
pub fn service_ips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = service.spec.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if listed.is_empty() {
        parse_ips(spec.cluster_ip.as_deref().into_iter())
    } else {
        parse_ips(listed.into_iter())
    }
}
