//! Nodemesh eBPF programs.
//!
//! - `mesh_connect4` / `mesh_connect6` (cgroup/connect4, cgroup/connect6): a TCP connect
//!   from an enrolled network namespace is rewritten to the in-pod outbound listener on
//!   loopback; the original destination is parked under the socket cookie.
//! - `mesh_sockops` (sock_ops): once the redirected connection is established, the
//!   original destination is re-keyed by (netns cookie, client address, client port),
//!   which is what the proxy sees on the accepted socket.
//! - `mesh_sock_release` (cgroup/sock_release): a socket that never got established
//!   takes its parked entry with it.
//! - `mesh_sk_lookup` (sk_lookup, attached per pod netns): inbound TCP to a pod goes to
//!   the pod's plaintext inbound listener; the original port stays the local address.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use mesh_common::{
    is_mesh_pod_port, ConnKey, InboundPolicy, Ip, NodeConfig, OrigDst, OutboundPolicy, AF_INET,
    AF_INET6, OUTBOUND_PORT,
};

const IPPROTO_TCP: u32 = 6;
const SK_PASS: u32 = 1;
/// cgroup sock_addr / sock programs: 1 lets the operation proceed.
const ALLOW: i32 = 1;

#[map(name = "NM_CONFIG")]
static NM_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// netns cookie -> outbound policy of an enrolled pod.
#[map(name = "NM_ENROLLED")]
static NM_ENROLLED: HashMap<u64, OutboundPolicy> = HashMap::pinned(16384, 0);

/// socket cookie -> original destination, from connect until ESTABLISHED.
#[map(name = "NM_PENDING_DST")]
static NM_PENDING_DST: HashMap<u64, OrigDst> = HashMap::pinned(65536, 0);

/// client end (netns, addr, port) -> original destination, until the proxy takes it.
#[map(name = "NM_ORIG_DST")]
static NM_ORIG_DST: HashMap<ConnKey, OrigDst> = HashMap::pinned(65536, 0);

/// pod IP -> inbound policy of an enrolled pod on this node.
#[map(name = "NM_INBOUND_PODS")]
static NM_INBOUND_PODS: HashMap<Ip, InboundPolicy> = HashMap::pinned(16384, 0);

/// pod IP -> that pod's plaintext inbound listener (same address family). Not pinned:
/// the sockets belong to the running agent and vanish with it.
#[map(name = "NM_INBOUND_LISTENERS")]
static mut NM_INBOUND_LISTENERS: SockHash<Ip> = SockHash::with_max_entries(16384, 0);

/// Reads an IPv6 context field one 32-bit word at a time, as the verifier requires.
///
/// # Safety
/// `field` must point into a valid program context.
#[inline(always)]
unsafe fn read_ip6(field: &[u32; 4]) -> [u32; 4] {
    [
        read_volatile(&field[0]),
        read_volatile(&field[1]),
        read_volatile(&field[2]),
        read_volatile(&field[3]),
    ]
}

#[inline(always)]
fn node_config() -> Option<&'static NodeConfig> {
    NM_CONFIG.get(0)
}

/// Shared by connect4 and connect6: decides whether to redirect and parks the
/// original destination. Returns true when the caller must rewrite the address.
#[inline(always)]
fn should_redirect(ctx: &SockAddrContext, dst: &Ip, port: u16) -> bool {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands sock_addr programs a valid context.
    let (protocol, sk) = unsafe { ((*sa).protocol, (*sa).__bindgen_anon_1.sk) };
    if protocol != IPPROTO_TCP || dst.is_loopback_or_unspecified() {
        return false;
    }
    let Some(config) = node_config() else {
        return false;
    };
    if !sk.is_null() {
        // SAFETY: non-null socket pointer from the context.
        let mark = unsafe { (*sk).mark };
        if config.socket_mark != 0 && mark == config.socket_mark {
            return false;
        }
    }
    // SAFETY: plain helper calls.
    let (cgroup, netns) = unsafe {
        (
            bpf_get_current_cgroup_id(),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    if config.agent_cgroup_id != 0 && cgroup == config.agent_cgroup_id {
        return false;
    }
    // SAFETY: the value is only read.
    let Some(policy) = (unsafe { NM_ENROLLED.get(&netns) }) else {
        return false;
    };
    if policy.excludes(dst, port) {
        return false;
    }
    let family = if dst.is_v4_mapped() {
        AF_INET
    } else {
        AF_INET6
    };
    let orig = OrigDst {
        addr: *dst,
        port,
        family,
        _pad: 0,
        // SAFETY: plain helper call.
        created_ns: unsafe { bpf_ktime_get_ns() },
    };
    // SAFETY: plain helper call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // No room to remember the destination: leave the connection alone rather than
    // redirect it to a proxy that cannot know where it was going.
    NM_PENDING_DST.insert(&cookie, &orig, 0).is_ok()
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; user_ip4/user_port are in network order.
    let (ip, port) = unsafe { ((*sa).user_ip4, u16::from_be((*sa).user_port as u16)) };
    if should_redirect(&ctx, &Ip::from_v4_be(ip), port) {
        // SAFETY: connect4 may rewrite the destination.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
            (*sa).user_port = OUTBOUND_PORT.to_be() as u32;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; user_ip6 words/user_port are in network order.
    let (words, port) = unsafe {
        (
            read_ip6(&(*sa).user_ip6),
            u16::from_be((*sa).user_port as u16),
        )
    };
    let dst = Ip::from_v6_words(words);
    if should_redirect(&ctx, &dst, port) {
        // A v4-mapped destination travels as IPv4: send it to the IPv4 listener.
        let target = if dst.is_v4_mapped() {
            Ip::from_v4_be(u32::from_ne_bytes([127, 0, 0, 1]))
        } else {
            Ip::from_v6_words([0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])])
        };
        // SAFETY: connect6 may rewrite the destination, one 32-bit word at a time.
        unsafe {
            (*sa).user_ip6[0] = target.words[0];
            (*sa).user_ip6[1] = target.words[1];
            (*sa).user_ip6[2] = target.words[2];
            (*sa).user_ip6[3] = target.words[3];
            (*sa).user_port = OUTBOUND_PORT.to_be() as u32;
        }
    }
    ALLOW
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 0;
    }
    // SAFETY: plain helper call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out before the entry is removed.
    let Some(orig) = (unsafe { NM_PENDING_DST.get(&cookie) }).copied() else {
        return 0;
    };
    let ops = ctx.ops;
    // Both families are read unconditionally: a load whose context offset depends on a
    // branch is rejected by the verifier ("dereference of modified ctx ptr").
    // SAFETY: valid context; volatile keeps each load at its own constant offset.
    let (family, ip4, ip6) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_ip6(&(*ops).local_ip6),
        )
    };
    let addr = if family == AF_INET as u32 {
        Ip::from_v4_be(ip4)
    } else {
        Ip::from_v6_words(ip6)
    };
    let key = ConnKey {
        // SAFETY: plain helper call.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        port: ctx.local_port() as u16,
        _pad: [0; 3],
    };
    let _ = NM_ORIG_DST.insert(&key, &orig, 0);
    let _ = NM_PENDING_DST.remove(&cookie);
    0
}

#[cgroup_sock(sock_release)]
pub fn mesh_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: plain helper call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = NM_PENDING_DST.remove(&cookie);
    ALLOW
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: the kernel hands sk_lookup programs a valid context.
    let (protocol, family, port) = unsafe { ((*l).protocol, (*l).family, (*l).local_port as u16) };
    // The mesh's own ports are never captured: nothing can be steered into a listener
    // with one of them as its "original destination".
    if protocol != IPPROTO_TCP || is_mesh_pod_port(port) {
        return SK_PASS;
    }
    // SAFETY: as above; both families are read unconditionally (see mesh_sockops).
    let (local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&(*l).local_ip4),
            read_volatile(&(*l).remote_ip4),
            read_ip6(&(*l).local_ip6),
            read_ip6(&(*l).remote_ip6),
        )
    };
    let (local, remote) = if family == AF_INET as u32 {
        (Ip::from_v4_be(local4), Ip::from_v4_be(remote4))
    } else {
        (Ip::from_v6_words(local6), Ip::from_v6_words(remote6))
    };
    // Traffic from inside the pod (the agent's own connections to the app included,
    // which come from the pod's address) and from the node (kubelet probes) is left
    // to the normal socket lookup.
    if remote.is_loopback_or_unspecified() || remote == local {
        return SK_PASS;
    }
    if node_config().is_some_and(|c| c.is_node_addr(&remote)) {
        return SK_PASS;
    }
    // SAFETY: the value is only read.
    match unsafe { NM_INBOUND_PODS.get(&local) } {
        Some(policy) if !policy.excludes(port) => {}
        _ => return SK_PASS,
    }
    // No listener (agent restarting): fall back to the normal lookup.
    // SAFETY: the map is only touched through this call in this program.
    let listeners = unsafe { &mut *core::ptr::addr_of_mut!(NM_INBOUND_LISTENERS) };
    let _ = listeners.redirect_sk_lookup(&ctx, local, 0);
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
