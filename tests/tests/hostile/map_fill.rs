//! The eBPF maps behind the redirect: a pod that fills them must not take other pods'
//! connections out of the mesh. When the redirect cannot be completed, the connection
//! fails (closed); it never goes to its destination directly.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::{SocketAddr, SocketAddrV6},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Stdio,
    time::{Duration, Instant},
};

use mesh_node::capture::bpf_sys;
use mesh_tests::{
    flood::FloodReport,
    report::TransferReport,
    sim::{capture, host, ClusterSpec, PodSpec, Process, SimCluster},
};

/// More sockets than the node-wide parking table had entries (65,536), held by
/// several processes (one process may hold 20,000 descriptors here, and an unprivileged
/// pod cannot raise its hard limit).
const ATTACK_SOCKETS: u64 = 66_000;
const ATTACK_PROCESSES: u64 = 4;
const OUTBOUND_V4: &str = "127.0.0.1:15001";
const MARKER: &str = "victim-plaintext-marker-7f3a";

fn spec() -> ClusterSpec {
    let mut spec = ClusterSpec::two_nodes();
    spec.pods.push(PodSpec::new("attacker", "apps", "a"));
    spec
}

/// `nodemesh_connections_refused_total{reason}` on a node (0 when absent).
fn refused(cluster: &SimCluster, node: &str, reason: &str) -> u64 {
    let text = cluster.scrape_metrics(node).unwrap();
    let prefix = format!("nodemesh_connections_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// The machine's unreclaimable kernel slab (sockets and their BPF storage live there),
/// for the figures only: it is machine-wide.
fn kernel_slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SUnreclaim:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A victim's connection either went through the mesh (its peer is the in-pod
/// outbound listener) or failed; connected anywhere else, it bypassed the mesh.
fn bypassed(report: &TransferReport) -> bool {
    report.peer.is_some() && report.peer.as_deref() != Some(OUTBOUND_V4)
}

/// Starts one flood process of `count` sockets in `pod` and waits for its report (all
/// sockets open).
fn start_flood(
    cluster: &SimCluster,
    pod: &str,
    dst: SocketAddrV6,
    count: u64,
) -> (Process, FloodReport) {
    let testapp = host::target_bin("mesh-testapp").unwrap();
    let mut cmd = cluster.pod(pod).placement().command(&testapp).unwrap();
    cmd.args([
        "park-flood",
        "--connect",
        &dst.to_string(),
        "--count",
        &count.to_string(),
        "--hold-seconds",
        "600",
    ])
    .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let process = Process(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let report: FloodReport =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("flood report {line:?}: {e}"));
    (process, report)
}

/// What `NM_PARKED` holds for a few of `pid`'s sockets (None: no entry), read through
/// copies of its descriptors (a socket-storage map is looked up by socket fd).
fn parked_of(map: &OwnedFd, pid: u32, sample: usize) -> Vec<Option<[u8; 40]>> {
    // SAFETY: pidfd_open(2) on a live child; the fd is owned right below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor nobody else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let sockets: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .take(sample)
        .collect();
    sockets
        .into_iter()
        .map(|fd| {
            // SAFETY: pidfd_getfd(2) duplicates the child's descriptor into ours.
            let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
            assert!(
                copy >= 0,
                "pidfd_getfd: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh descriptor nobody else owns.
            let copy = unsafe { OwnedFd::from_raw_fd(copy as i32) };
            let mut value = [0u8; 40];
            map_lookup(map, &copy.as_raw_fd().to_ne_bytes(), &mut value)
                .ok()
                .map(|()| value)
        })
        .collect()
}

#[test]
fn a_pod_parking_66000_connects_does_not_take_other_pods_out_of_the_mesh() {
    let cluster = SimCluster::create(spec()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let server = cluster.pod("server");
    let dst = server.addr4(8080);

    let warmup = cluster.transfer("client", dst, 4096).unwrap();
    assert!(warmup.ok, "before the attack: {warmup:?}");
    assert_eq!(warmup.peer.as_deref(), Some(OUTBOUND_V4));
    let maps_before = cluster.map_entries("a").unwrap();
    let usage_before = cluster.agent_usage("a").unwrap();
    let slab_before = kernel_slab_kib();

    let capture = capture::Capture::start(&cluster.fabric).unwrap();
    let mapped = SocketAddrV6::new(server.ipv4.to_ipv6_mapped(), 8080, 0, 0);
    let mut attack = Vec::new();
    let mut opened = 0;
    for _ in 0..ATTACK_PROCESSES {
        let (process, flood) = start_flood(
            &cluster,
            "attacker",
            mapped,
            ATTACK_SOCKETS / ATTACK_PROCESSES,
        );
        eprintln!("attack: {flood:?}");
        opened += flood.opened;
        attack.push(process);
    }
    assert_eq!(
        opened, ATTACK_SOCKETS,
        "the attacker could not open its sockets"
    );
    let maps_during = cluster.map_entries("a").unwrap();
    // Every attacking socket did get its own parked entry (the attack exercises the
    // path), holding the destination it asked for.
    let parked_map = bpf_sys::obj_get(&cluster.node("a").pin_dir.join("maps/NM_PARKED")).unwrap();
    let parked: Vec<Option<[u8; 40]>> = attack
        .iter()
        .flat_map(|p| parked_of(&parked_map, p.0.id(), 8))
        .collect();
    let usage_during = cluster.agent_usage("a").unwrap();
    let slab_during = kernel_slab_kib();

    // Other enrolled pods of the node, while the attacker holds its sockets.
    let victims = 40;
    let (mut failed, mut leaked) = (0, Vec::new());
    for _ in 0..victims {
        let r = cluster
            .transfer_marked("client", dst, 16 * 1024, MARKER)
            .unwrap();
        if bypassed(&r) {
            leaked.push(r);
        } else if !r.ok {
            failed += 1;
        }
    }
    let wire = capture.finish().unwrap();
    let refused_park = refused(&cluster, "a", "ebpf_park_failed");

    drop(attack);
    let started = Instant::now();
    let back = cluster.eventually(Duration::from_secs(20), || {
        cluster.map_entries("a").ok().as_ref() == Some(&maps_before)
    });
    let usage_after = cluster.agent_usage("a").unwrap();
    eprintln!(
        "kernel slab: {} MiB before, {} MiB during, {} MiB after",
        slab_before / 1024,
        slab_during / 1024,
        kernel_slab_kib() / 1024
    );
    eprintln!(
        "maps before {maps_before:?}\n     during {maps_during:?}\n      after {:?} ({:?} after the attacker closed)\n\
         agent before {usage_before}, during {usage_during}, after {usage_after}\n\
         victims: {victims} connections, {failed} failed, {} bypassed the mesh; \
         ebpf_park_failed {refused_park}",
        cluster.map_entries("a").unwrap(),
        started.elapsed(),
        leaked.len()
    );

    assert!(
        leaked.is_empty(),
        "{} of {victims} connections of another enrolled pod went straight to the server, \
         past the mesh: {:?}",
        leaked.len(),
        leaked.first()
    );
    assert!(
        !capture::contains(&wire, MARKER.as_bytes()),
        "the victims' payload crossed the fabric in plaintext"
    );
    assert_eq!(
        failed, 0,
        "the attacker's sockets cost other pods their connections"
    );
    let client_ip = cluster.pod("client").ipv4.to_string();
    let meshed = || {
        cluster
            .closed_connections("b")
            .unwrap()
            .iter()
            .filter(|c| {
                c["source_identity"] == "spiffe://cluster.local/ns/apps/sa/client"
                    && c["security"] == "mutual_tls"
                    && c["src"]
                        .as_str()
                        .and_then(|s| s.parse::<SocketAddr>().ok())
                        .is_some_and(|s| s.ip().to_string() == client_ip)
            })
            .count()
    };
    // Node b records a connection a moment after both its sides closed: wait (bounded)
    // for the last victims' records.
    let meshed = host::wait_for(Duration::from_secs(2), || {
        let n = meshed();
        (n > victims).then_some(n)
    })
    .unwrap_or_else(meshed);
    assert!(
        meshed > victims,
        "the destination agent recorded {meshed} mTLS connections from the client \
         (expected the warm-up and all {victims} victims)"
    );
    assert!(
        back.is_some(),
        "the maps did not return to their baseline after the attack"
    );
    assert!(
        usage_after.fds <= usage_before.fds + 16,
        "agent fds: {usage_before} -> {usage_after}"
    );
    assert_eq!(parked.len(), 8 * ATTACK_PROCESSES as usize);
    for value in &parked {
        let value = value.expect("an attacking socket without a parked entry");
        assert_eq!(&value[..16], &mapped.ip().octets(), "parked address");
        assert_eq!(
            u16::from_ne_bytes([value[16], value[17]]),
            8080,
            "parked port"
        );
    }
}

/// The pod's own sockets cannot get parking space (its per-socket memory allowance is
/// too small for the entry): its connects fail with EPERM and are counted, none leaves
/// unredirected, and other pods are unaffected.
#[test]
fn a_connect_whose_destination_cannot_be_parked_fails_closed() {
    let cluster = SimCluster::create(spec()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    let host_optmem = std::fs::read_to_string("/proc/sys/net/core/optmem_max").unwrap();
    host::sysctl_in(
        &cluster.pod("attacker").netns,
        "/proc/sys/net/core/optmem_max",
        "8",
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/core/optmem_max").unwrap(),
        host_optmem,
        "net.core.optmem_max is not per network namespace on this kernel (needs 6.9)"
    );

    let before = refused(&cluster, "a", "ebpf_park_failed");
    for target in [dst, cluster.pod("server").addr6(8080)] {
        let r = cluster.transfer("attacker", target, 4096).unwrap();
        assert!(!r.ok && r.peer.is_none(), "to {target}: {r:?}");
        let error = r.error.unwrap_or_default();
        assert!(
            error.contains("os error 1)"),
            "the connect must fail with EPERM: {error}"
        );
    }
    let counted = refused(&cluster, "a", "ebpf_park_failed") - before;
    assert_eq!(counted, 2, "each refused connect counted once");

    let r = cluster.transfer("client", dst, 4096).unwrap();
    assert!(r.ok, "another pod keeps working: {r:?}");
    assert_eq!(r.peer.as_deref(), Some(OUTBOUND_V4));
}

/// Fills the node's NM_ORIG_DST with entries of a netns that does not exist; returns
/// how many were added.
fn fill_orig_dst(map: &OwnedFd) -> u32 {
    let now = mesh_node::capture::dataplane::monotonic_ns();
    let mut added = 0u32;
    for i in 0..70_000u32 {
        // ConnKey: netns cookie, address, port + padding. OrigDst: address, port,
        // family, padding, created_ns.
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&u64::MAX.to_ne_bytes());
        key[8..12].copy_from_slice(&i.to_ne_bytes());
        let mut value = [0u8; 40];
        value[32..].copy_from_slice(&now.to_ne_bytes());
        match map_update(map, &key, &value) {
            Ok(()) => added += 1,
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => break,
            Err(e) => panic!("filling NM_ORIG_DST: {e}"),
        }
    }
    added
}

fn unfill_orig_dst(map: &OwnedFd, count: u32) {
    for i in 0..count {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&u64::MAX.to_ne_bytes());
        key[8..12].copy_from_slice(&i.to_ne_bytes());
        let _ = map_delete(map, &key);
    }
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf_elem(cmd: libc::c_long, map: &OwnedFd, key: &[u8], value: u64) -> std::io::Result<()> {
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value,
        flags: 0,
    };
    // SAFETY: bpf(2) with an attribute block that points at live buffers of the map's
    // key and value sizes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn map_lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> std::io::Result<()> {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    bpf_elem(BPF_MAP_LOOKUP_ELEM, map, key, value.as_mut_ptr() as u64)
}

fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    bpf_elem(BPF_MAP_UPDATE_ELEM, map, key, value.as_ptr() as u64)
}

fn map_delete(map: &OwnedFd, key: &[u8]) -> std::io::Result<()> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    bpf_elem(BPF_MAP_DELETE_ELEM, map, key, 0)
}

/// With the table of re-keyed destinations full, a redirected connection cannot be
/// matched to its destination: the proxy resets it (counted), it never goes out
/// directly, and readiness names the map.
#[test]
fn a_full_original_destination_map_resets_connections_and_makes_the_agent_unready() {
    let cluster = SimCluster::create(spec()).unwrap();
    cluster.start_agents().unwrap();
    let _server = cluster.serve("server", 8080).unwrap();
    let dst = cluster.pod("server").addr4(8080);
    let maps_before: HashMap<String, u64> = cluster.map_entries("a").unwrap();
    let map = bpf_sys::obj_get(&cluster.node("a").pin_dir.join("maps/NM_ORIG_DST")).unwrap();
    let before_no_dst = refused(&cluster, "a", "no_original_destination");
    let before_full = refused(&cluster, "a", "ebpf_orig_dst_full");

    let added = fill_orig_dst(&map);
    eprintln!("NM_ORIG_DST filled with {added} entries");
    let capture = capture::Capture::start(&cluster.fabric).unwrap();
    let mut failed = 0;
    for _ in 0..5 {
        let r = cluster
            .transfer_marked("client", dst, 4096, MARKER)
            .unwrap();
        assert!(!bypassed(&r), "went past the mesh: {r:?}");
        failed += usize::from(!r.ok);
    }
    let wire = capture.finish().unwrap();
    assert_eq!(
        failed, 5,
        "with no original destination the proxy must reset"
    );
    assert!(!capture::contains(&wire, MARKER.as_bytes()));
    assert_eq!(
        refused(&cluster, "a", "ebpf_orig_dst_full") - before_full,
        5,
        "each counted by the eBPF side"
    );
    assert_eq!(
        refused(&cluster, "a", "no_original_destination") - before_no_dst,
        5,
        "and by the proxy"
    );
    // Readiness recounts the maps at most once a second.
    let mut last = (0, String::new());
    let unready = cluster.eventually(Duration::from_secs(5), || {
        last = cluster.admin_raw("a", "GET", "/healthz/ready").unwrap();
        last.0 == 503
    });
    assert!(unready.is_some(), "still ready with the map full: {last:?}");
    assert!(
        last.1.contains("NM_ORIG_DST"),
        "readiness names the map: {}",
        last.1
    );
    eprintln!("readiness: {}", last.1.trim());

    unfill_orig_dst(&map, added);
    let ready = cluster.eventually(Duration::from_secs(5), || {
        matches!(
            cluster.admin_raw("a", "GET", "/healthz/ready"),
            Ok((200, _))
        )
    });
    assert!(ready.is_some(), "ready again once the map has room");
    let r = cluster.transfer("client", dst, 4096).unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(cluster.map_entries("a").unwrap(), maps_before);
}
