//! Hostile clients that spend kernel resources from inside a pod (used by the hostile
//! tests through `mesh-testapp`).

use std::{
    collections::BTreeMap,
    io,
    mem::size_of,
    net::SocketAddrV6,
    os::fd::{FromRawFd, OwnedFd},
    time::Instant,
};

use serde::{Deserialize, Serialize};

/// What `park-flood` did: sockets it holds open and how their connects ended.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FloodReport {
    /// Sockets created and held.
    pub opened: u64,
    /// Connect results by outcome (`ok` or the error's name, e.g. `ENETUNREACH`).
    pub outcomes: BTreeMap<String, u64>,
    /// Why it stopped before `count`, if it did (e.g. the fd limit).
    pub stopped: Option<String>,
    pub elapsed_ms: u64,
}

/// Raises this process's open-file limit (soft and, as root, hard) to at least `want`.
pub fn raise_nofile(want: u64) -> io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(());
    }
    lim.rlim_cur = want;
    lim.rlim_max = lim.rlim_max.max(want);
    // SAFETY: valid in-pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(n) => format!("errno {n}"),
        None => e.to_string(),
    }
}

/// One IPv6-only TCP socket, connected (blocking) to `dst`.
fn v6only_connect(dst: &SocketAddrV6) -> (Option<OwnedFd>, io::Result<()>) {
    // SAFETY: plain socket(2); the fd is owned right below.
    let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return (None, Err(io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option buffer.
    let set = unsafe {
        libc::setsockopt(
            raw,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            &one as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as u32,
        )
    };
    if set != 0 {
        return (Some(fd), Err(io::Error::last_os_error()));
    }
    let addr = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: dst.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: dst.ip().octets(),
        },
        sin6_scope_id: 0,
    };
    // SAFETY: valid fd and address of the given length.
    let rc = unsafe {
        libc::connect(
            raw,
            &addr as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_in6>() as u32,
        )
    };
    let result = if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    (Some(fd), result)
}

/// Opens up to `count` IPv6-only sockets and connects each to `dst` (for the attack: a
/// v4-mapped address, which the kernel refuses for such a socket only after the
/// cgroup connect hooks ran). Returns the report and the sockets, which the caller holds.
pub fn park_flood(dst: SocketAddrV6, count: u64) -> (FloodReport, Vec<OwnedFd>) {
    let started = Instant::now();
    let mut report = FloodReport::default();
    if let Err(e) = raise_nofile(count + 256) {
        report.stopped = Some(format!(
            "cannot raise RLIMIT_NOFILE to {}: {e}",
            count + 256
        ));
    }
    let mut held = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (fd, result) = v6only_connect(&dst);
        let Some(fd) = fd else {
            let e = result.err().map(|e| errno_name(&e)).unwrap_or_default();
            let why = format!("socket(): {e} after {} sockets", held.len());
            report.stopped = Some(match report.stopped.take() {
                Some(earlier) => format!("{earlier}; {why}"),
                None => why,
            });
            break;
        };
        let outcome = match result {
            Ok(()) => "ok".to_string(),
            Err(e) => errno_name(&e),
        };
        *report.outcomes.entry(outcome).or_default() += 1;
        held.push(fd);
    }
    report.opened = held.len() as u64;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    (report, held)
}
