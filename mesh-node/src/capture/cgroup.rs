//! Finding the cgroup v2 hierarchy and bpffs from /proc/self/mountinfo (hosts mount
//! cgroup2 at /sys/fs/cgroup or, in hybrid layouts, /sys/fs/cgroup/unified).

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MountError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("no cgroup2 filesystem is mounted (checked /proc/self/mountinfo); mount one with `mount -t cgroup2 none /sys/fs/cgroup` (cgroup v2 needs Linux >= 4.5)")]
    NoCgroup2,
    #[error("{path} is not on a bpf filesystem; mount bpffs with `mount -t bpf bpf /sys/fs/bpf` or pass --pin-dir on one")]
    NotBpffs { path: PathBuf },
    #[error("cgroup root {path} does not exist or is not a directory: create it or pass an existing --cgroup-root")]
    MissingCgroup { path: PathBuf },
}

/// One line of mountinfo, reduced to what we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let fs_type = right.split_whitespace().next()?;
            Some(Mount {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fs_type.to_string(),
            })
        })
        .collect()
}

fn mounts() -> Result<Vec<Mount>, MountError> {
    let path = "/proc/self/mountinfo";
    let text = fs::read_to_string(path).map_err(|source| MountError::Read {
        path: path.into(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// The cgroup2 mount point of this machine.
pub fn cgroup2_mount() -> Result<PathBuf, MountError> {
    mounts()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .ok_or(MountError::NoCgroup2)
}

/// Resolves `--cgroup-root`: absolute paths are kept, relative ones are under the mount.
pub fn resolve_cgroup_root(configured: &Path) -> Result<PathBuf, MountError> {
    let path = if configured.is_absolute() {
        configured.to_path_buf()
    } else {
        cgroup2_mount()?.join(configured)
    };
    if !path.is_dir() {
        return Err(MountError::MissingCgroup { path });
    }
    Ok(path)
}

/// Checks that `dir` (or its closest existing ancestor) is on a bpffs mount.
pub fn ensure_on_bpffs(dir: &Path) -> Result<(), MountError> {
    let bpf_mounts: Vec<PathBuf> = mounts()?
        .into_iter()
        .filter(|m| m.fs_type == "bpf")
        .map(|m| m.mount_point)
        .collect();
    if bpf_mounts
        .iter()
        .any(|m| dir.starts_with(m) && dir != Path::new("/"))
    {
        Ok(())
    } else {
        Err(MountError::NotBpffs {
            path: dir.to_path_buf(),
        })
    }
}

/// The cgroup v2 id of this process: the inode of its cgroup directory.
pub fn own_cgroup_id() -> Result<u64, MountError> {
    let path = "/proc/self/cgroup";
    let text = fs::read_to_string(path).map_err(|source| MountError::Read {
        path: path.into(),
        source,
    })?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim_start_matches('/');
    let dir = cgroup2_mount()?.join(relative);
    fs::metadata(&dir)
        .map(|m| m.ino())
        .map_err(|source| MountError::Read {
            path: dir.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
50 25 0:40 / /sys/fs/bpf rw,relatime shared:20 - bpf bpf rw,mode=700
60 30 0:50 / /mnt/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn finds_cgroup2_and_bpf_mounts() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].fs_type, "cgroup2");
        assert_eq!(m[2].fs_type, "bpf");
        assert_eq!(m[3].mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse_mountinfo("nonsense\n\n1 2 3\n").is_empty());
    }
}
