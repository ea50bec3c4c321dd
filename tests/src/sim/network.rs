//! The simulated cluster's network: a fabric bridge joining the nodes, a pod bridge
//! (`cbr0`) per node, one veth per pod. Node i owns 10.77.i.0/24 and fd00:77:i::/64;
//! the fabric is 192.168.77.0/24 and fd77::/64. Addresses only exist inside the
//! namespaces the harness creates, so clusters never collide with each other.

use std::{
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use super::host::{ip, netns_path, sysctl_in};

/// Underlay ("fabric") addresses of node i.
pub fn underlay(i: u8) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(192, 168, 77, 10 + i),
        Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 10 + u16::from(i)),
    )
}

/// Addresses of host `k` of node i's pod subnet (1 is the node itself).
pub fn pod_subnet_host(node: u8, k: u8) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(10, 77, node, k),
        Ipv6Addr::new(0xfd00, 0x77, u16::from(node), 0, 0, 0, 0, u16::from(k)),
    )
}

/// `ip -n <ns> <args>`.
fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    ip(&full)
}

/// A veth pair created directly in its two namespaces (names never touch the host's).
fn veth(name: &str, ns: &str, peer: &str, peer_ns: &str) -> Result<()> {
    ip(&[
        "link", "add", name, "netns", ns, "type", "veth", "peer", "name", peer, "netns", peer_ns,
    ])
}

/// Adds both addresses (IPv6 without duplicate detection, so it is usable at once)
/// and brings the device up.
fn address(ns: &str, dev: &str, v4: Ipv4Addr, v6: Ipv6Addr, v4_len: u8) -> Result<()> {
    ip_in(ns, &["addr", "add", &format!("{v4}/{v4_len}"), "dev", dev])?;
    ip_in(
        ns,
        &["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"],
    )?;
    ip_in(ns, &["link", "set", dev, "up"])
}

fn bridge(ns: &str, name: &str) -> Result<()> {
    ip_in(ns, &["link", "add", name, "type", "bridge"])?;
    ip_in(ns, &["link", "set", name, "up"])
}

pub fn create_fabric(fabric: &str) -> Result<()> {
    ip(&["netns", "add", fabric])?;
    bridge(fabric, "br0")
}

/// Creates node i: namespace, uplink to the fabric, pod bridge, forwarding on.
/// Returns the node's address on its pod bridge (what pods see as their gateway).
pub fn create_node(fabric: &str, ns: &str, i: u8) -> Result<(Ipv4Addr, Ipv6Addr)> {
    ip(&["netns", "add", ns])?;
    let port = format!("n{i}");
    veth(&port, fabric, "eth0", ns)?;
    ip_in(fabric, &["link", "set", &port, "master", "br0", "up"])?;
    let (u4, u6) = underlay(i);
    address(ns, "eth0", u4, u6, 24)?;
    ip_in(ns, &["link", "set", "lo", "up"])?;
    bridge(ns, "cbr0")?;
    let (v4, v6) = pod_subnet_host(i, 1);
    address(ns, "cbr0", v4, v6, 24)?;
    let path = netns_path(ns);
    sysctl_in(&path, "/proc/sys/net/ipv4/ip_forward", "1")?;
    sysctl_in(&path, "/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
    Ok((v4, v6))
}

/// Routes node `other`'s pod subnets from node namespace `ns` over the fabric.
pub fn route_to_node(ns: &str, other: u8) -> Result<()> {
    let (u4, u6) = underlay(other);
    ip_in(
        ns,
        &[
            "route",
            "add",
            &format!("10.77.{other}.0/24"),
            "via",
            &u4.to_string(),
        ],
    )?;
    ip_in(
        ns,
        &[
            "-6",
            "route",
            "add",
            &format!("fd00:77:{other}::/64"),
            "via",
            &u6.to_string(),
        ],
    )
}

/// Creates a pod namespace as host `k` of node i's subnet, plugged into `cbr0`.
pub fn create_pod(node_ns: &str, pod_ns: &str, node: u8, k: u8) -> Result<(Ipv4Addr, Ipv6Addr)> {
    ip(&["netns", "add", pod_ns])?;
    let port = format!("p{k}");
    veth(&port, node_ns, "eth0", pod_ns)?;
    ip_in(node_ns, &["link", "set", &port, "master", "cbr0", "up"])?;
    let (v4, v6) = pod_subnet_host(node, k);
    address(pod_ns, "eth0", v4, v6, 24)?;
    ip_in(pod_ns, &["link", "set", "lo", "up"])?;
    let (gw4, gw6) = pod_subnet_host(node, 1);
    ip_in(
        pod_ns,
        &["route", "add", "default", "via", &gw4.to_string()],
    )?;
    ip_in(
        pod_ns,
        &["-6", "route", "add", "default", "via", &gw6.to_string()],
    )?;
    Ok((v4, v6))
}

/// Installs `nft` (Debian's `nftables`) when it is missing, saying so.
fn ensure_nft() -> Result<()> {
    let present = |p: &str| std::path::Path::new(p).exists();
    if ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .iter()
        .any(|p| present(p))
    {
        return Ok(());
    }
    eprintln!("mesh-sim: installing nftables from Debian's packages (NodePort-style NAT)");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = ["install", "-y", "--no-install-recommends", "nftables"];
    if !(apt(&install) || (apt(&["update"]) && apt(&install))) {
        bail!("cannot install nftables: install it with apt-get (the NodePort tests need `nft`)");
    }
    Ok(())
}

/// NodePort-style NAT in node namespace `ns`, as kube-proxy sets it up: TCP to the
/// node's own address `host` on `node_port` is DNATed to the pod's `port` and
/// masqueraded, so it reaches the pod from the node's address on the pod bridge, the
/// same address the node's own connections leave from. These packets are forwarded,
/// never a socket of the node.
pub fn node_port(
    ns: &str,
    host: (Ipv4Addr, Ipv6Addr),
    node_port: u16,
    pod: (Ipv4Addr, Ipv6Addr),
    port: u16,
) -> Result<()> {
    ensure_nft()?;
    let (h4, h6) = host;
    let (p4, p6) = pod;
    let rules = format!(
        "table inet nodemesh_sim_nodeport {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tip daddr {h4} tcp dport {node_port} dnat ip to {p4}:{port}\n\
         \t\tip6 daddr {h6} tcp dport {node_port} dnat ip6 to [{p6}]:{port}\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tct status dnat ip daddr {p4} tcp dport {port} masquerade\n\
         \t\tct status dnat ip6 daddr {p6} tcp dport {port} masquerade\n\
         \t}}\n\
         }}\n"
    );
    nft(ns, &rules)
}

/// Loads an nft ruleset into namespace `ns`.
fn nft(ns: &str, rules: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns} failed: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Drops the first SYN of every connection to `port` in namespace `ns` (the SYN's
/// retransmit gets through), as a lossy network would.
pub fn drop_first_syn(ns: &str, port: u16) -> Result<()> {
    ensure_nft()?;
    let rules = format!(
        "table inet nodemesh_sim_lossy {{\n\
         \tset seen4 {{ type ipv4_addr . inet_service; flags dynamic; }}\n\
         \tset seen6 {{ type ipv6_addr . inet_service; flags dynamic; }}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\ttcp dport {port} tcp flags & (syn | ack) == syn ip saddr . tcp sport @seen4 accept\n\
         \t\ttcp dport {port} tcp flags & (syn | ack) == syn ip6 saddr . tcp sport @seen6 accept\n\
         \t\ttcp dport {port} tcp flags & (syn | ack) == syn meta nfproto ipv4 add @seen4 {{ ip saddr . tcp sport }} drop\n\
         \t\ttcp dport {port} tcp flags & (syn | ack) == syn meta nfproto ipv6 add @seen6 {{ ip6 saddr . tcp sport }} drop\n\
         \t}}\n\
         }}\n"
    );
    nft(ns, &rules)
}

/// Drops every SYN to `port` in namespace `ns`: connects to it hang (until the
/// connecting side gives up), as to a host that has gone dark.
pub fn drop_syns(ns: &str, port: u16) -> Result<()> {
    ensure_nft()?;
    let rules = format!(
        "table inet nodemesh_sim_dark {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\ttcp dport {port} tcp flags & (syn | ack) == syn drop\n\
         \t}}\n\
         }}\n"
    );
    nft(ns, &rules)
}

impl super::SimCluster {
    fn pod_netns_name(&self, pod: &str) -> Result<String> {
        Ok(self
            .pod(pod)
            .netns
            .file_name()
            .and_then(|f| f.to_str())
            .context("pod namespace name")?
            .to_string())
    }

    /// Every SYN to `pod`'s `port` is lost (see [`drop_syns`]).
    pub fn drop_syns(&self, pod: &str, port: u16) -> Result<()> {
        drop_syns(&self.pod_netns_name(pod)?, port)
    }

    /// The first SYN of each connection to `pod`'s `port` is lost (see [`drop_first_syn`]).
    pub fn drop_first_syn(&self, pod: &str, port: u16) -> Result<()> {
        drop_first_syn(&self.pod_netns_name(pod)?, port)
    }

    /// A NodePort on `node`: its own address (`host_ipv4`/`host_ipv6`) at `node_port`
    /// leads to `pod`'s `port`, DNATed and masqueraded as kube-proxy does.
    pub fn node_port(&self, node: &str, node_port: u16, pod: &str, port: u16) -> Result<()> {
        let n = self.node(node);
        let p = self.pod(pod);
        let ns = n
            .netns
            .file_name()
            .and_then(|f| f.to_str())
            .context("node namespace name")?;
        self::node_port(
            ns,
            (n.host_ipv4, n.host_ipv6),
            node_port,
            (p.ipv4, p.ipv6),
            port,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(underlay(1).0, Ipv4Addr::new(192, 168, 77, 11));
        assert_eq!(underlay(1).1.to_string(), "fd77::b");
        assert_eq!(pod_subnet_host(1, 2).0, Ipv4Addr::new(10, 77, 1, 2));
        assert_eq!(pod_subnet_host(1, 2).1.to_string(), "fd00:77:1::2");
    }
}
