//! Nodemesh eBPF programs.
//!
//! - `mesh_connect4` / `mesh_connect6` (cgroup/connect4, cgroup/connect6): a TCP connect
//!   from an enrolled network namespace is rewritten to the in-pod outbound listener on
//!   loopback; the original destination is parked in the connecting socket's own storage
//!   (`NM_PARKED`). When it cannot be parked the connect fails (EPERM): an enrolled
//!   pod's connection never leaves the mesh.
//!   A connect from a pod the agent holds (an enrolled namespace's pod that is not
//!   enrolled yet, found by its cgroup) fails too (EPERM) until the pod is enrolled.
//! - `mesh_sockops` (sock_ops): once the redirected connection is established, the
//!   original destination is re-keyed by (netns cookie, client address, client port),
//!   which is what the proxy sees on the accepted socket. It also records the TCP
//!   connections the node's own sockets open to a captured pod (kubelet probes), from
//!   the moment the SYN is about to leave until ESTABLISHED or close (`NM_NODE_FLOWS`).
//! - `mesh_sk_lookup` (sk_lookup, attached per pod netns through a pinned link): inbound
//!   TCP to a pod goes to the pod's plaintext inbound listener; the original port stays
//!   the local address. With no listener (no agent runs), a governed pod's inbound is
//!   dropped and only a PERMISSIVE pod with no policy falls back to the normal lookup.
//!   Only the node's own connections (exactly their 4-tuples) are left alone: never a
//!   source address, which forwarded traffic (NodePort, hostPort) is NATed to as well.
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_ktime_get_ns, bpf_sk_storage_delete, bpf_sk_storage_get,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use mesh_common::{
    is_mesh_pod_port, ConnKey, EbpfRefusal, InboundPolicy, Ip, NodeConfig, NodeFlow, OrigDst,
    OutboundPolicy, AF_INET, AF_INET6, MAX_CGROUP_LEVELS, OUTBOUND_PORT,
};

const IPPROTO_TCP: u32 = 6;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
/// cgroup sock_addr / sock programs: 1 lets the operation proceed, 0 fails it (EPERM).
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map(name = "NM_CONFIG")]
static NM_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// netns cookie -> outbound policy of an enrolled pod.
#[map(name = "NM_ENROLLED")]
static NM_ENROLLED: HashMap<u64, OutboundPolicy> = HashMap::pinned(16384, 0);

/// The original destination of a redirected socket, from connect until ESTABLISHED,
/// kept in that socket's own storage (`BPF_MAP_TYPE_SK_STORAGE`).
///
/// Why per-socket storage and not a node-wide hash: a socket can sit between connect and
/// ESTABLISHED for as long as its owner keeps it open (a connect the kernel refuses after
/// this hook ran, e.g. an IPv6-only socket to a v4-mapped address, never gets there), so
/// any shared table can be filled by one pod, and then every other pod's connects would
/// have nowhere to park. Here each socket carries its own entry and the kernel frees it
/// with the socket: there is no capacity to run out of, and a pod can only spend its
/// own sockets. (If the kernel cannot allocate an entry, that one connect fails closed.)
///
/// Defined the BTF way (libbpf's `.maps` convention) because the kernel creates sk
/// storage maps only with BTF ids for key and value, which the legacy `maps` section
/// of aya-ebpf 0.1 cannot carry; aya 0.13 loads both kinds from one object.
#[no_mangle]
#[link_section = ".maps"]
static NM_PARKED: ParkedMap = ParkedMap {
    r#type: core::ptr::null(),
    map_flags: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    pinning: core::ptr::null(),
};

/// BPF_MAP_TYPE_SK_STORAGE
const MAP_TYPE_SK_STORAGE: usize = 24;
/// BPF_F_NO_PREALLOC: required for sk storage.
const MAP_F_NO_PREALLOC: usize = 1;
/// LIBBPF_PIN_BY_NAME: pinned under the agent's pin directory like the other maps.
const PIN_BY_NAME: usize = 1;
const SK_STORAGE_GET_F_CREATE: u64 = 1;

/// The BTF map definition: only the types of its fields matter (array lengths carry the
/// numbers), which is what a loader reads from the object's BTF.
#[repr(C)]
pub struct ParkedMap {
    r#type: *const [i32; MAP_TYPE_SK_STORAGE],
    map_flags: *const [i32; MAP_F_NO_PREALLOC],
    key: *const i32,
    value: *const OrigDst,
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: never dereferenced; the pointers only describe types to the loader.
unsafe impl Sync for ParkedMap {}

#[inline(always)]
fn parked_map() -> *mut c_void {
    &NM_PARKED as *const ParkedMap as *mut c_void
}

/// Connects the eBPF side refused, per CPU, indexed by [`EbpfRefusal`]; the agent sums
/// them into `nodemesh_connections_refused_total`.
#[map(name = "NM_REFUSED")]
static NM_REFUSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(EbpfRefusal::SLOTS, 0);

#[inline(always)]
fn count_refusal(reason: EbpfRefusal) {
    if let Some(slot) = NM_REFUSED.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot; programs do not migrate CPUs while running.
        unsafe { *slot += 1 };
    }
}

/// client end (netns, addr, port) -> original destination, until the proxy takes it.
///
/// Node-wide, but an entry only exists between a redirected connection's ESTABLISHED and
/// the agent's accept (which removes it), so a pod holds at most about its 15001 accept
/// backlog here. Full anyway: the connection gets no entry and the proxy resets it
/// (counted as `ebpf_orig_dst_full` and `no_original_destination`): closed, never open.
#[map(name = "NM_ORIG_DST")]
static NM_ORIG_DST: HashMap<ConnKey, OrigDst> = HashMap::pinned(65536, 0);

/// pod IP -> inbound policy of an enrolled pod on this node (`NM_INBOUND_PODS` in
/// builds before the fail-closed fields; that pin is retired).
#[map(name = "NM_INBOUND_POL")]
static NM_INBOUND_PODS: HashMap<Ip, InboundPolicy> = HashMap::pinned(16384, 0);

/// The node's own connections to captured pods (kubelet probes), keyed by their
/// 4-tuple, value: when recorded. An entry lives from the SYN (sock_ops
/// TCP_CONNECT_CB, local port chosen) until ESTABLISHED or close (sock_ops), so SYN
/// retransmits find it too; only sockets of the node's network namespace, seen by the
/// cgroup programs at the node's cgroup root, add entries. Full: that connection is
/// captured like any other (fail closed: STRICT or a policy may refuse it), counted.
#[map(name = "NM_NODE_FLOWS")]
static NM_NODE_FLOWS: HashMap<NodeFlow, u64> = HashMap::pinned(16384, 0);

/// cgroup id of a pod the agent holds -> its outbound policy. A pod of an enrolled
/// namespace is held from the moment its cgroup exists until it is enrolled: its
/// connects fail (EPERM) rather than leave the mesh unredirected.
#[map(name = "NM_HELD")]
static NM_HELD: HashMap<u64, OutboundPolicy> = HashMap::pinned(16384, 0);

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
    // SAFETY: the caller guarantees `field` is in a valid program context.
    unsafe {
        [
            read_volatile(&field[0]),
            read_volatile(&field[1]),
            read_volatile(&field[2]),
            read_volatile(&field[3]),
        ]
    }
}

#[inline(always)]
fn node_config() -> Option<&'static NodeConfig> {
    NM_CONFIG.get(0)
}

/// What a connect hook does with a connect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Not ours: leave the destination alone.
    Pass,
    /// Parked: rewrite the destination to the outbound listener.
    Redirect,
    /// Ours, but the original destination could not be parked: fail the connect.
    Refuse,
}

/// Shared by connect4 and connect6: decides whether to redirect and parks the
/// original destination.
#[inline(always)]
fn verdict(ctx: &SockAddrContext, dst: &Ip, port: u16) -> Verdict {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands sock_addr programs a valid context.
    let (protocol, sk) = unsafe { ((*sa).protocol, (*sa).__bindgen_anon_1.sk) };
    if protocol != IPPROTO_TCP || dst.is_loopback_or_unspecified() {
        return Verdict::Pass;
    }
    let Some(config) = node_config() else {
        return Verdict::Pass;
    };
    if !sk.is_null() {
        // SAFETY: non-null socket pointer from the context.
        let mark = unsafe { (*sk).mark };
        if config.socket_mark != 0 && mark == config.socket_mark {
            return Verdict::Pass;
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
        return Verdict::Pass;
    }
    // SAFETY: the value is only read.
    let Some(policy) = (unsafe { NM_ENROLLED.get(&netns) }) else {
        return match held_policy() {
            Some(held) if !held.excludes(dst, port) => {
                count_refusal(EbpfRefusal::PodNotEnrolled);
                Verdict::Refuse
            }
            _ => Verdict::Pass,
        };
    };
    if policy.excludes(dst, port) {
        return Verdict::Pass;
    }
    let family = if dst.is_v4_mapped() {
        AF_INET
    } else {
        AF_INET6
    };
    if sk.is_null() {
        count_refusal(EbpfRefusal::ParkFailed);
        return Verdict::Refuse;
    }
    // SAFETY: sk is the context's socket; the map is the sk storage map above.
    let slot = unsafe {
        bpf_sk_storage_get(
            parked_map(),
            sk as *mut c_void,
            core::ptr::null_mut(),
            SK_STORAGE_GET_F_CREATE,
        )
    } as *mut OrigDst;
    if slot.is_null() {
        // No room to remember the destination: the connect fails. Letting it through
        // unredirected would take an enrolled pod's traffic past the mesh.
        count_refusal(EbpfRefusal::ParkFailed);
        return Verdict::Refuse;
    }
    // SAFETY: the helper returned this socket's value, sized for OrigDst.
    unsafe {
        *slot = OrigDst {
            addr: *dst,
            port,
            family,
            _pad: 0,
            created_ns: bpf_ktime_get_ns(),
        };
    }
    Verdict::Redirect
}

/// The outbound policy of the held pod whose cgroup contains the caller (its own
/// cgroup or an ancestor: kubelet puts each container in a cgroup below the pod's).
#[inline(always)]
fn held_policy() -> Option<&'static OutboundPolicy> {
    let mut level = 1;
    while level <= MAX_CGROUP_LEVELS {
        // SAFETY: plain helper call; 0 means the caller's cgroup is not that deep.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return None;
        }
        // SAFETY: the value is only read.
        if let Some(policy) = unsafe { NM_HELD.get(&id) } {
            return Some(policy);
        }
        level += 1;
    }
    None
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; user_ip4/user_port are in network order.
    let (ip, port) = unsafe { ((*sa).user_ip4, u16::from_be((*sa).user_port as u16)) };
    match verdict(&ctx, &Ip::from_v4_be(ip), port) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => DENY,
        Verdict::Redirect => {
            // SAFETY: connect4 may rewrite the destination.
            unsafe {
                (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
                (*sa).user_port = OUTBOUND_PORT.to_be() as u32;
            }
            ALLOW
        }
    }
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
    match verdict(&ctx, &dst, port) {
        Verdict::Pass => return ALLOW,
        Verdict::Refuse => return DENY,
        Verdict::Redirect => {}
    }
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
    ALLOW
}

/// The socket's own and its peer's address and port, as sock_ops sees them. A
/// dual-stack socket talking IPv4 (v4-mapped) reports the IPv4 fields, which the
/// kernel fills for it, so both ends of a connection produce the same [`Ip`]s.
#[inline(always)]
fn sock_ops_tuple(ctx: &SockOpsContext) -> (Ip, u16, Ip, u16) {
    let ops = ctx.ops;
    // Every field is read unconditionally: a load whose context offset depends on a
    // branch is rejected by the verifier ("dereference of modified ctx ptr").
    // SAFETY: valid context; volatile keeps each load at its own constant offset.
    let (family, local4, remote4, local6, remote6, local_port, remote_port) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).remote_ip4),
            read_ip6(&(*ops).local_ip6),
            read_ip6(&(*ops).remote_ip6),
            read_volatile(&(*ops).local_port),
            read_volatile(&(*ops).remote_port),
        )
    };
    let remote6 = Ip::from_v6_words(remote6);
    let (local, remote) = if family == AF_INET as u32 || remote6.is_v4_mapped() {
        (Ip::from_v4_be(local4), Ip::from_v4_be(remote4))
    } else {
        (Ip::from_v6_words(local6), remote6)
    };
    // local_port is in host order; remote_port in network order in the upper half.
    (
        local,
        local_port as u16,
        remote,
        u32::from_be(remote_port) as u16,
    )
}

/// TCP_CONNECT_CB (the SYN is about to leave, the local port is chosen): a socket of
/// the node's own namespace connecting to a captured pod records the connection, so
/// the pod's sk_lookup leaves exactly this 4-tuple alone (kubelet probes).
#[inline(always)]
fn record_node_flow(ctx: &SockOpsContext) {
    let Some(config) = node_config() else {
        return;
    };
    // SAFETY: plain helper call.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if config.node_netns_cookie == 0 || netns != config.node_netns_cookie {
        return;
    }
    let key = node_flow(ctx);
    // SAFETY: the value is only read.
    if unsafe { NM_INBOUND_PODS.get(&key.pod) }.is_none() {
        return;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if NM_NODE_FLOWS.insert(&key, &now, 0).is_err() {
        // Full: the pod's inbound capture takes this connection like any other.
        count_refusal(EbpfRefusal::NodeFlowsFull);
        return;
    }
    // Tell us when it closes, should it never get established.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
}

/// The `NM_NODE_FLOWS` key of a socket of the node connecting to a pod (the remote end).
#[inline(always)]
fn node_flow(ctx: &SockOpsContext) -> NodeFlow {
    let (local, local_port, remote, remote_port) = sock_ops_tuple(ctx);
    NodeFlow {
        pod: remote,
        peer: local,
        pod_port: remote_port,
        peer_port: local_port,
        _pad: 0,
    }
}

/// ESTABLISHED or closed: the pod's side has looked the connection up for good, or it
/// never will; the entry goes (and with it the state callback this socket asked for).
#[inline(always)]
fn forget_node_flow(ctx: &SockOpsContext) {
    if ctx.cb_flags() & BPF_SOCK_OPS_STATE_CB_FLAG == 0 {
        return;
    }
    if NM_NODE_FLOWS.remove(&node_flow(ctx)).is_ok() {
        let flags = ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG;
        let _ = ctx.set_cb_flags(flags as i32);
    }
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => record_node_flow(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            forget_node_flow(&ctx);
            rekey_parked(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => forget_node_flow(&ctx),
        _ => {}
    }
    0
}

/// ESTABLISHED: a redirected connection's parked original destination is re-keyed by
/// what the proxy sees on the accepted socket.
#[inline(always)]
fn rekey_parked(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // SAFETY: valid context; the socket pointer may be null and is checked.
    let sk = unsafe { read_volatile(&(*ops).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return;
    }
    // SAFETY: sk comes from the context; no creation, only a lookup.
    let slot =
        unsafe { bpf_sk_storage_get(parked_map(), sk as *mut c_void, core::ptr::null_mut(), 0) }
            as *const OrigDst;
    if slot.is_null() {
        return;
    }
    // SAFETY: the helper returned this socket's value; copied before it is freed.
    let orig = unsafe { *slot };
    // SAFETY: as above; the entry's work is done either way.
    unsafe { bpf_sk_storage_delete(parked_map(), sk as *mut c_void) };
    let (addr, local_port, _, remote_port) = sock_ops_tuple(ctx);
    // Only a connection that went to the outbound listener is the proxy's to claim (the
    // socket may have been parked, refused by the kernel, then connected elsewhere).
    if remote_port != OUTBOUND_PORT {
        return;
    }
    let key = ConnKey {
        // SAFETY: plain helper call.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        port: local_port,
        _pad: [0; 3],
    };
    if NM_ORIG_DST.insert(&key, &orig, 0).is_err() {
        // The proxy will find nothing for this connection and reset it.
        count_refusal(EbpfRefusal::OrigDstFull);
    }
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: the kernel hands sk_lookup programs a valid context; remote_port is a
    // 16-bit field in network order.
    let (protocol, family, port, remote_port) = unsafe {
        (
            (*l).protocol,
            (*l).family,
            (*l).local_port as u16,
            u16::from_be(read_volatile(&(*l).remote_port)),
        )
    };
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
    // which come from the pod's address) is left to the normal socket lookup.
    if remote.is_loopback_or_unspecified() || remote == local {
        return SK_PASS;
    }
    // SAFETY: the value is only read.
    let closed_without_agent = match unsafe { NM_INBOUND_PODS.get(&local) } {
        Some(policy) if !policy.excludes(port) => policy.fails_closed(port),
        _ => return SK_PASS,
    };
    // So is a connection the node's own sockets opened (kubelet probes): recognised by
    // its exact 4-tuple, recorded on the node's side, whatever address it left from.
    // Forwarded traffic NATed to a node address (NodePort, hostPort) has no entry.
    let flow = NodeFlow {
        pod: local,
        peer: remote,
        pod_port: port,
        peer_port: remote_port,
        _pad: 0,
    };
    // SAFETY: the value is only read.
    if unsafe { NM_NODE_FLOWS.get(&flow) }.is_some() {
        return SK_PASS;
    }
    // SAFETY: the map is only touched through this call in this program.
    let listeners = unsafe { &mut *core::ptr::addr_of_mut!(NM_INBOUND_LISTENERS) };
    if listeners.redirect_sk_lookup(&ctx, local, 0).is_ok() {
        return SK_PASS;
    }
    // No listener: no agent runs (its sockets closed with it; this program stays
    // attached through its pinned link). A governed pod's inbound is dropped (the
    // client sees a reset) rather than reaching the app unchecked; the others fall back
    // to the normal lookup.
    if closed_without_agent {
        SK_DROP
    } else {
        SK_PASS
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
