//! The destination of a trace: an address, or a Service name as cluster DNS would
//! answer it (`name`, `name.ns`, `name.ns.svc`, `name.ns.svc.<domain>`).

use std::net::{IpAddr, SocketAddr};

use crate::{discovery::cluster::service_ips, discovery::cluster::ClusterState, keys::ObjectKey};

/// `ip:port`, `[v6]:port` or `service[.namespace[.svc[.domain]]]:port`; a bare
/// Service name is looked up in `namespace` (the source pod's), as DNS search does.
pub(crate) fn parse_destination(
    state: &ClusterState,
    namespace: &str,
    text: &str,
) -> Result<(SocketAddr, Option<ObjectKey>), String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok((addr, None));
    }
    let bad = || {
        format!("`{text}` is not host:port; give an address (10.96.0.10:80, [fd00::1]:80) or a Service (web.apps:80)")
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok((SocketAddr::new(ip, port), None));
    }
    let mut labels = host.split('.');
    let name = labels.next().filter(|n| !n.is_empty()).ok_or_else(bad)?;
    let ns = labels.next().unwrap_or(namespace);
    if let Some(svc) = labels.next() {
        if svc != "svc" {
            return Err(format!(
                "`{host}` is not a Service name (name.namespace.svc.<cluster domain>)"
            ));
        }
    }
    let key = ObjectKey::new(ns, name);
    let service = state.services.get(&key).ok_or_else(|| {
        format!("no Service {key} in this agent's state; check `meshctl node services`")
    })?;
    // DNS answers A before AAAA for dual-stack Services: prefer IPv4 likewise.
    let ips = service_ips(service);
    let vip = ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(ips.first())
        .copied()
        .ok_or_else(|| {
            format!("Service {key} has no cluster IP (headless?): trace a pod address instead")
        })?;
    Ok((SocketAddr::new(vip, port), Some(key)))
}
