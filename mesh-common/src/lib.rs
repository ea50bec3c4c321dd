//! Types shared by the Nodemesh eBPF programs (`mesh-ebpf`) and the node agent
//! (`mesh-node`): map keys and values, and the ports both sides agree on.
//!
//! Every address is kept as an [`Ip`]: sixteen bytes in network order, IPv4 as a
//! v4-mapped IPv6 address (`::ffff:a.b.c.d`). One representation means one set of
//! comparisons in the kernel, and IPv4, IPv6 and v4-mapped IPv6 sockets all produce the
//! same keys.
#![no_std]
// See the lints in the workspace's Cargo.toml.
#![warn(clippy::unwrap_used, clippy::expect_used)]

/// In-pod outbound listener (loopback), where connect4/connect6 send enrolled traffic.
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod plaintext inbound listener, where sk_lookup sends inbound TCP.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// In-pod HBONE (mTLS) listener; never captured by sk_lookup.
pub const HBONE_PORT: u16 = 15008;

/// Whether `port` is one of the mesh's own in-pod ports. Nothing the mesh forwards may
/// target one of them: that would be the mesh connecting to itself (a loop), and they are
/// never an application's ports in an enrolled pod.
#[inline(always)]
pub const fn is_mesh_pod_port(port: u16) -> bool {
    port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT || port == HBONE_PORT
}

/// Excluded ports per direction and pod; a zero slot is unused.
pub const MAX_EXCLUDED_PORTS: usize = 8;
/// Excluded outbound CIDRs per pod.
pub const MAX_EXCLUDED_CIDRS: usize = 4;
/// cgroup levels the connect hooks walk up from the caller's cgroup, looking for a held
/// pod (kubelet's pod cgroups sit at level 2 or 3 below the root; deeper roots, such as
/// the simulated cluster's, add a few).
pub const MAX_CGROUP_LEVELS: i32 = 12;

/// Names of the maps, as the eBPF object defines them and bpffs pins them.
pub mod map_names {
    pub const CONFIG: &str = "NM_CONFIG";
    pub const ENROLLED: &str = "NM_ENROLLED";
    /// Per-socket storage (`BPF_MAP_TYPE_SK_STORAGE`): the parked original destination.
    pub const PARKED: &str = "NM_PARKED";
    pub const ORIG_DST: &str = "NM_ORIG_DST";
    /// pod IP -> [`super::InboundPolicy`]. Named anew when its value's layout changed
    /// (`NM_INBOUND_PODS` held the layout without the fail-closed fields): a pin is
    /// only ever read with the layout its name stands for.
    pub const INBOUND_PODS: &str = "NM_INBOUND_POL";
    pub const INBOUND_LISTENERS: &str = "NM_INBOUND_LISTENERS";
    /// Per-CPU counters of connects the eBPF side refused, indexed by [`super::EbpfRefusal`].
    pub const REFUSED: &str = "NM_REFUSED";
    /// Connections the node itself is opening to a captured pod, from connect until
    /// established: sk_lookup leaves exactly these to the normal lookup.
    pub const NODE_FLOWS: &str = "NM_NODE_FLOWS";
    /// cgroup id of a pod of an enrolled namespace that is not enrolled yet -> its
    /// outbound policy: its connects are refused until it is.
    pub const HELD: &str = "NM_HELD";
}

/// Names of the program functions in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SOCK_OPS: &str = "mesh_sockops";
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
}

/// Why the eBPF programs refused (or could not complete) the redirect of an enrolled
/// pod's connection: the index of its counter in `NM_REFUSED`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EbpfRefusal {
    /// connect4/6: no per-socket storage for the original destination (the kernel could
    /// not allocate it); the connect fails with EPERM instead of bypassing the mesh.
    ParkFailed = 0,
    /// sock_ops: `NM_ORIG_DST` refused the re-keyed entry (full); the outbound proxy
    /// then resets the connection (`no_original_destination`).
    OrigDstFull = 1,
    /// sock_ops: a connection of the node's own to a captured pod (a kubelet probe)
    /// could not be recorded in `NM_NODE_FLOWS` (full); the pod's inbound capture then
    /// takes it like any other plaintext connection (STRICT or a policy may refuse it).
    NodeFlowsFull = 2,
    /// connect4/6: a connect from a pod of an enrolled namespace that the agent has not
    /// enrolled yet (its network namespace is not set up yet); refused (EPERM) until it
    /// is, so the pod's first connections never leave the mesh.
    PodNotEnrolled = 3,
}

impl EbpfRefusal {
    pub const ALL: [EbpfRefusal; 4] = [
        EbpfRefusal::ParkFailed,
        EbpfRefusal::OrigDstFull,
        EbpfRefusal::NodeFlowsFull,
        EbpfRefusal::PodNotEnrolled,
    ];
    /// Slots in `NM_REFUSED` (room for reasons added later without a layout change).
    pub const SLOTS: u32 = 8;

    /// The `reason` label of its counter.
    pub const fn name(self) -> &'static str {
        match self {
            EbpfRefusal::ParkFailed => "ebpf_park_failed",
            EbpfRefusal::OrigDstFull => "ebpf_orig_dst_full",
            EbpfRefusal::NodeFlowsFull => "ebpf_node_flows_full",
            EbpfRefusal::PodNotEnrolled => "ebpf_pod_not_enrolled",
        }
    }
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// An IP address in network byte order; IPv4 is stored v4-mapped.
///
/// The words hold the address bytes in memory order (the way the kernel hands
/// `user_ip6`/`local_ip6` to BPF programs), so they are compared, never interpreted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ip {
    pub words: [u32; 4],
}

/// `0000:ffff` as the third word of a v4-mapped address, in memory order.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Ip {
    /// Wraps an IPv4 address given as the kernel's network-order `u32`.
    #[inline(always)]
    pub const fn from_v4_be(addr: u32) -> Ip {
        Ip {
            words: [0, 0, V4_MAPPED_WORD, addr],
        }
    }

    #[inline(always)]
    pub const fn from_v6_words(words: [u32; 4]) -> Ip {
        Ip { words }
    }

    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == V4_MAPPED_WORD
    }

    /// The IPv4 address (network-order `u32`) when this is v4-mapped.
    #[inline(always)]
    pub const fn v4_be(&self) -> u32 {
        self.words[3]
    }

    /// 127.0.0.0/8, ::1, and the unspecified addresses (which Linux treats as local).
    #[inline(always)]
    pub const fn is_loopback_or_unspecified(&self) -> bool {
        if self.is_v4_mapped() {
            let first_octet = self.words[3].to_ne_bytes()[0];
            return first_octet == 127 || self.words[3] == 0;
        }
        let upper_zero = self.words[0] == 0 && self.words[1] == 0 && self.words[2] == 0;
        upper_zero && (self.words[3] == 0 || self.words[3] == u32::from_ne_bytes([0, 0, 0, 1]))
    }

    #[inline(always)]
    pub const fn is_zero(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == 0 && self.words[3] == 0
    }

    pub const fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.words[i].to_ne_bytes();
            out[i * 4] = b[0];
            out[i * 4 + 1] = b[1];
            out[i * 4 + 2] = b[2];
            out[i * 4 + 3] = b[3];
            i += 1;
        }
        out
    }

    pub const fn from_bytes(b: [u8; 16]) -> Ip {
        let mut words = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            words[i] = u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
            i += 1;
        }
        Ip { words }
    }
}

/// A CIDR in the 128-bit space of [`Ip`] (an IPv4 /24 is stored as /120).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cidr {
    pub addr: Ip,
    pub prefix_len: u8,
    pub in_use: u8,
    pub _pad: [u8; 2],
}

impl Cidr {
    #[inline(always)]
    pub fn contains(&self, ip: &Ip) -> bool {
        if self.in_use == 0 {
            return false;
        }
        let mut i = 0;
        while i < 4 {
            let start = (i as u32) * 32;
            let len = self.prefix_len as u32;
            let bits = if len <= start {
                0
            } else if len - start >= 32 {
                32
            } else {
                len - start
            };
            let mask = match bits {
                0 => 0,
                32 => u32::MAX,
                b => (u32::MAX << (32 - b)).to_be(),
            };
            if (self.addr.words[i] ^ ip.words[i]) & mask != 0 {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// Value of `NM_ENROLLED`, keyed by the pod's network-namespace cookie (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OutboundPolicy {
    /// Destination ports never redirected (0 = unused slot).
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
    /// Destination CIDRs never redirected.
    pub excluded_cidrs: [Cidr; MAX_EXCLUDED_CIDRS],
}

impl OutboundPolicy {
    #[inline(always)]
    pub fn excludes(&self, ip: &Ip, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_EXCLUDED_PORTS {
            if self.excluded_ports[i] != 0 && self.excluded_ports[i] == port {
                return true;
            }
            i += 1;
        }
        let mut c = 0;
        while c < MAX_EXCLUDED_CIDRS {
            if self.excluded_cidrs[c].contains(ip) {
                return true;
            }
            c += 1;
        }
        false
    }
}

/// Ports whose fail mode differs from the pod's (see [`InboundPolicy`]).
pub const MAX_FAIL_EXCEPTIONS: usize = 8;

/// Value of `NM_INBOUND_POL` (formerly `NM_INBOUND_PODS`), keyed by a pod IP ([`Ip`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InboundPolicy {
    /// Local ports whose inbound traffic goes straight to the app (0 = unused slot).
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
    /// Ports whose fail mode is the opposite of `closed_without_agent` (0 = unused).
    pub fail_exceptions: [u16; MAX_FAIL_EXCEPTIONS],
    /// 1: when no agent listens for the pod (its listener is gone from the sockhash),
    /// sk_lookup drops inbound TCP instead of passing it to the app: the pod's inbound
    /// is governed (STRICT, or selected by a policy). 0: passed (PERMISSIVE, no policy).
    pub closed_without_agent: u8,
    pub _pad: [u8; 7],
}

impl InboundPolicy {
    #[inline(always)]
    pub fn excludes(&self, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_EXCLUDED_PORTS {
            if self.excluded_ports[i] != 0 && self.excluded_ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether inbound TCP to `port` is dropped while no agent listens for the pod.
    #[inline(always)]
    pub fn fails_closed(&self, port: u16) -> bool {
        let mut exception = false;
        let mut i = 0;
        while i < MAX_FAIL_EXCEPTIONS {
            if self.fail_exceptions[i] != 0 && self.fail_exceptions[i] == port {
                exception = true;
            }
            i += 1;
        }
        (self.closed_without_agent != 0) != exception
    }

    /// Sets the fail mode: `closed` for every port but `exceptions`, which get the
    /// other. More exceptions than fit: with `closed` the extra ports stay closed; with
    /// open, every port is closed. Either way nothing governed fails open; returns
    /// false when that widening happened.
    pub fn set_fail_mode(&mut self, closed: bool, exceptions: impl Iterator<Item = u16>) -> bool {
        self.closed_without_agent = closed as u8;
        self.fail_exceptions = [0; MAX_FAIL_EXCEPTIONS];
        for (n, port) in exceptions.enumerate() {
            if n == MAX_FAIL_EXCEPTIONS {
                if !closed {
                    self.closed_without_agent = 1;
                    self.fail_exceptions = [0; MAX_FAIL_EXCEPTIONS];
                }
                return false;
            }
            self.fail_exceptions[n] = port;
        }
        true
    }
}

/// The single entry of `NM_CONFIG`: node-wide settings written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// SO_MARK the agent sets on its own sockets; such connects are never redirected.
    pub socket_mark: u32,
    pub _pad: u32,
    /// cgroup v2 id of the agent; connects from it are never redirected (0 = unset).
    pub agent_cgroup_id: u64,
    /// Cookie of the node's own network namespace (where the agent runs). TCP
    /// connections that sockets of this namespace open to a captured pod (kubelet
    /// probes) are recorded in `NM_NODE_FLOWS` and not captured; 0 = none are.
    pub node_netns_cookie: u64,
}

/// Key of `NM_NODE_FLOWS`: one TCP connection between a socket of the node and a pod
/// of this node, as both ends see it (the pod's sk_lookup and the node's sock_ops).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeFlow {
    /// The pod's address (the connection's destination).
    pub pod: Ip,
    /// The node socket's address, whichever it left from (the bridge's, the uplink's).
    pub peer: Ip,
    /// Host byte order.
    pub pod_port: u16,
    /// Host byte order.
    pub peer_port: u16,
    pub _pad: u32,
}

/// Key of `NM_ORIG_DST`: the client end of a redirected connection, as the proxy sees
/// it from the accepted socket (peer address and port), in the client's netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub addr: Ip,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u16; 3],
}

/// Value of `NM_PARKED` (per-socket storage of the connecting socket) and `NM_ORIG_DST`:
/// where the application wanted to go.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub addr: Ip,
    /// Host byte order.
    pub port: u16,
    /// AF_INET for IPv4 and v4-mapped destinations, AF_INET6 otherwise.
    pub family: u16,
    pub _pad: u32,
    /// bpf_ktime_get_ns() when recorded; lets the agent expire entries nobody claimed.
    pub created_ns: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and no
    // pointers, so any bit pattern of their size is a valid value.
    unsafe impl aya::Pod for Ip {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OutboundPolicy {}
    // SAFETY: as above.
    unsafe impl aya::Pod for InboundPolicy {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDst {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> Ip {
        Ip::from_v4_be(u32::from_ne_bytes(a))
    }

    #[test]
    fn v4_mapped_round_trips_through_bytes() {
        let ip = v4([10, 1, 2, 3]);
        assert!(ip.is_v4_mapped());
        let b = ip.to_bytes();
        assert_eq!(&b[10..], &[0xff, 0xff, 10, 1, 2, 3]);
        assert_eq!(Ip::from_bytes(b), ip);
    }

    #[test]
    fn loopback_and_unspecified_are_recognised() {
        assert!(v4([127, 0, 0, 1]).is_loopback_or_unspecified());
        assert!(v4([127, 9, 9, 9]).is_loopback_or_unspecified());
        assert!(v4([0, 0, 0, 0]).is_loopback_or_unspecified());
        assert!(!v4([10, 0, 0, 1]).is_loopback_or_unspecified());
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(Ip::from_bytes(one).is_loopback_or_unspecified());
        assert!(Ip::from_bytes([0; 16]).is_loopback_or_unspecified());
        let mut other = [0u8; 16];
        other[0] = 0xfd;
        other[15] = 1;
        assert!(!Ip::from_bytes(other).is_loopback_or_unspecified());
    }

    #[test]
    fn cidr_matches_by_prefix() {
        let net = Cidr {
            addr: v4([10, 20, 0, 0]),
            prefix_len: 96 + 16,
            in_use: 1,
            _pad: [0; 2],
        };
        assert!(net.contains(&v4([10, 20, 255, 1])));
        assert!(!net.contains(&v4([10, 21, 0, 1])));
        let odd = Cidr {
            prefix_len: 96 + 13,
            ..net
        };
        assert!(odd.contains(&v4([10, 23, 1, 1])));
        assert!(!odd.contains(&v4([10, 28, 1, 1])));
        let unused = Cidr { in_use: 0, ..net };
        assert!(!unused.contains(&v4([10, 20, 0, 1])));
    }

    #[test]
    fn policies_exclude_listed_ports_only() {
        let mut p = OutboundPolicy::default();
        p.excluded_ports[0] = 5432;
        assert!(p.excludes(&v4([1, 1, 1, 1]), 5432));
        assert!(!p.excludes(&v4([1, 1, 1, 1]), 80));
        let mut i = InboundPolicy::default();
        i.excluded_ports[3] = 9090;
        assert!(i.excludes(9090));
        assert!(!i.excludes(0), "empty slots never match");
    }

    #[test]
    fn fail_mode_is_per_port_and_overflow_fails_closed() {
        let mut p = InboundPolicy::default();
        assert!(!p.fails_closed(80), "PERMISSIVE, no policy: open");
        assert!(p.set_fail_mode(false, [8443].into_iter()));
        assert!(p.fails_closed(8443) && !p.fails_closed(80) && !p.fails_closed(0));
        assert!(p.set_fail_mode(true, [9090].into_iter()));
        assert!(p.fails_closed(80) && !p.fails_closed(9090));
        // Open by default with more STRICT ports than fit: every port closed.
        assert!(!p.set_fail_mode(false, 1..=9));
        assert!(p.fails_closed(80) && p.fails_closed(9));
        // Closed with more open ports than fit: the ones that do not fit stay closed.
        assert!(!p.set_fail_mode(true, 1..=9));
        assert!(!p.fails_closed(1) && p.fails_closed(9) && p.fails_closed(80));
    }
}
