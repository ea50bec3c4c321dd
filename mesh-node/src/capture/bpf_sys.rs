//! The few bpf(2) commands aya 0.13 does not expose for cgroup and netns programs:
//! creating a cgroup or netns link we can pin, swapping the program inside a pinned
//! link, pinning and opening pinned objects, asking a cgroup what is attached to it,
//! and walking the kernel's links.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;

/// `BPF_SK_LOOKUP` in `enum bpf_attach_type`.
pub const ATTACH_SK_LOOKUP: u32 = 36;
/// `BPF_LINK_TYPE_NETNS` in `enum bpf_link_type`.
const LINK_TYPE_NETNS: u32 = 5;

/// Attach types used by Nodemesh (values of `enum bpf_attach_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CgroupAttachType {
    SockOps = 3,
    Inet4Connect = 10,
    Inet6Connect = 11,
    InetSockRelease = 34,
}

/// `union bpf_attr` is at most a few hundred bytes; every command reads only its prefix.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 144])
    }
    fn u32_at(&mut self, offset: usize, v: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, offset: usize, v: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[offset..offset + 4]);
        u32::from_ne_bytes(b)
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of sufficient size for every
    // command used here, and any pointers stored in it outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd_result(ret: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nobody else owns.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// BPF_LINK_CREATE for a cgroup attach type: a link that can be pinned and updated.
pub fn cgroup_link_create(
    prog: impl AsFd,
    cgroup: impl AsFd,
    attach: CgroupAttachType,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32_at(0, prog.as_fd().as_raw_fd() as u32)
        .u32_at(4, cgroup.as_fd().as_raw_fd() as u32)
        .u32_at(8, attach as u32);
    bpf(BPF_LINK_CREATE, &mut attr).map(fd_result)
}

/// BPF_LINK_CREATE of an sk_lookup program on a network namespace (`netns`: an open
/// nsfs file): a link that can be pinned, outliving the process that made it.
pub fn netns_sk_lookup_link_create(prog: impl AsFd, netns: impl AsFd) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32_at(0, prog.as_fd().as_raw_fd() as u32)
        .u32_at(4, netns.as_fd().as_raw_fd() as u32)
        .u32_at(8, ATTACH_SK_LOOKUP);
    bpf(BPF_LINK_CREATE, &mut attr).map(fd_result)
}

/// BPF_LINK_UPDATE: atomically replaces the program behind an existing link.
pub fn link_update(link: impl AsFd, new_prog: impl AsFd) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32_at(0, link.as_fd().as_raw_fd() as u32)
        .u32_at(4, new_prog.as_fd().as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// BPF_OBJ_PIN: pins a map, program or link at `path` (on bpffs).
pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = Attr::new();
    attr.u64_at(0, c.as_ptr() as u64)
        .u32_at(8, fd.as_fd().as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// BPF_OBJ_GET: opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = Attr::new();
    attr.u64_at(0, c.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut attr).map(fd_result)
}

/// Ids of the programs attached to `cgroup` for one attach type (not inherited ones).
pub fn cgroup_prog_ids(cgroup: impl AsFd, attach: CgroupAttachType) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = Attr::new();
    attr.u32_at(0, cgroup.as_fd().as_raw_fd() as u32)
        .u32_at(4, attach as u32)
        .u64_at(16, ids.as_mut_ptr() as u64)
        .u32_at(24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = attr.read_u32(24) as usize;
    ids.truncate(count.min(64));
    Ok(ids)
}

/// The first 128 bytes of the `bpf_*_info` of a map, program or link, as u32 words.
fn obj_info(fd: impl AsFd) -> io::Result<[u32; 32]> {
    let mut info = [0u32; 32];
    let mut attr = Attr::new();
    attr.u32_at(0, fd.as_fd().as_raw_fd() as u32)
        .u32_at(4, std::mem::size_of_val(&info) as u32)
        .u64_at(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The kernel id of a map, program or link (the second u32 of each `bpf_*_info`).
pub fn obj_id(fd: impl AsFd) -> io::Result<u32> {
    let info = obj_info(fd)?;
    Ok(info[1])
}

/// Ids of the maps the program `prog_id` uses (`bpf_prog_info.nr_map_ids` and
/// `map_ids`, at byte offsets 52 and 56), at most 64.
pub fn prog_map_ids(prog_id: u32) -> io::Result<Vec<u32>> {
    let mut attr = Attr::new();
    attr.u32_at(0, prog_id);
    let prog = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(fd_result)?;
    let mut ids = vec![0u32; 64];
    let mut info = [0u32; 32];
    info[13] = ids.len() as u32;
    let ptr = (ids.as_mut_ptr() as u64).to_ne_bytes();
    info[14] = u32::from_ne_bytes([ptr[0], ptr[1], ptr[2], ptr[3]]);
    info[15] = u32::from_ne_bytes([ptr[4], ptr[5], ptr[6], ptr[7]]);
    let mut attr = Attr::new();
    attr.u32_at(0, prog.as_raw_fd() as u32)
        .u32_at(4, std::mem::size_of_val(&info) as u32)
        .u64_at(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    ids.truncate((info[13] as usize).min(64));
    Ok(ids)
}

/// The name of the map `map_id` (`bpf_map_info.name`, 16 bytes at offset 24).
pub fn map_name(map_id: u32) -> io::Result<String> {
    let mut attr = Attr::new();
    attr.u32_at(0, map_id);
    let map = bpf(BPF_MAP_GET_FD_BY_ID, &mut attr).map(fd_result)?;
    let info = obj_info(&map)?;
    let bytes: Vec<u8> = info[6..10].iter().flat_map(|w| w.to_ne_bytes()).collect();
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// For a link: (link id, program id) — `bpf_link_info` starts with type, id, prog_id.
pub fn link_ids(fd: impl AsFd) -> io::Result<(u32, u32)> {
    let info = obj_info(fd)?;
    Ok((info[1], info[2]))
}

/// What the kernel says about a network-namespace link (`bpf_link_info.netns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetnsLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// Inode of the namespace; 0 once the namespace is gone (the kernel detached it).
    pub netns_ino: u32,
    pub attach_type: u32,
}

/// The netns part of a link's info; None for a link of another type.
pub fn netns_link_info(fd: impl AsFd) -> io::Result<Option<NetnsLinkInfo>> {
    let info = obj_info(fd)?;
    // bpf_link_info: type, id, prog_id, then the 8-byte aligned union at offset 16,
    // whose netns member is { netns_ino, attach_type }.
    Ok((info[0] == LINK_TYPE_NETNS).then_some(NetnsLinkInfo {
        link_id: info[1],
        prog_id: info[2],
        netns_ino: info[4],
        attach_type: info[5],
    }))
}

/// Every link of the kernel that is an sk_lookup link (for counting attachments).
/// Links that go away while being walked are skipped.
pub fn sk_lookup_links() -> io::Result<Vec<NetnsLinkInfo>> {
    let mut found = Vec::new();
    let mut id = 0u32;
    loop {
        let mut attr = Attr::new();
        attr.u32_at(0, id);
        match bpf(BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => id = attr.read_u32(4),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(found),
            Err(e) => return Err(e),
        }
        let mut attr = Attr::new();
        attr.u32_at(0, id);
        let fd = match bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) {
            Ok(ret) => fd_result(ret),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        if let Some(info) = netns_link_info(&fd)? {
            if info.attach_type == ATTACH_SK_LOOKUP {
                found.push(info);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_missing_pin_is_an_error_not_a_panic() {
        let err = obj_get(Path::new("/nonexistent/nodemesh/pin")).unwrap_err();
        assert!(matches!(
            err.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::EPERM) | Some(libc::ENOSYS)
        ));
    }

    #[test]
    fn attr_fields_land_at_their_offsets() {
        let mut a = Attr::new();
        a.u32_at(4, 7).u64_at(16, 0x0102_0304_0506_0708);
        assert_eq!(a.read_u32(4), 7);
        assert_eq!(a.read_u32(16), 0x0506_0708);
    }
}
