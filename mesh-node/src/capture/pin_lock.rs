//! One agent manages a node's pins at a time: it holds an exclusive `flock` on the pin
//! directory itself (bpffs holds no regular files) for as long as it runs. The kernel
//! releases the lock when the holder exits, however it exits, so a crashed agent never
//! blocks its successor; a newcomer that finds the lock held waits for it.

use std::{
    fs::File,
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
#[error("cannot lock the pin directory {dir}: {source}; check that it exists on a bpf filesystem and that no other process than a mesh-node agent locks it")]
pub struct PinLockError {
    dir: PathBuf,
    source: io::Error,
}

impl PinLockError {
    pub(crate) fn new(dir: &Path, source: io::Error) -> PinLockError {
        PinLockError {
            dir: dir.to_path_buf(),
            source,
        }
    }
}

/// The held lock: released when dropped (or when the process ends).
#[derive(Debug)]
pub(crate) struct PinLock {
    _dir: File,
}

/// Opens the pin directory, creating it on first start (the bpffs it lives on was
/// checked before).
fn open(dir: &Path) -> Result<File, PinLockError> {
    std::fs::create_dir_all(dir).map_err(|source| PinLockError {
        dir: dir.to_path_buf(),
        source,
    })?;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|source| PinLockError {
            dir: dir.to_path_buf(),
            source,
        })
}

fn flock(file: &File, dir: &Path, blocking: bool) -> Result<bool, PinLockError> {
    let op = libc::LOCK_EX | if blocking { 0 } else { libc::LOCK_NB };
    loop {
        // SAFETY: flock on a descriptor this function borrows.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !blocking => return Ok(false),
            _ => {
                return Err(PinLockError {
                    dir: dir.to_path_buf(),
                    source: e,
                })
            }
        }
    }
}

impl PinLock {
    /// The lock, or None when another process holds it.
    pub(crate) fn try_acquire(dir: &Path) -> Result<Option<PinLock>, PinLockError> {
        let file = open(dir)?;
        Ok(flock(&file, dir, false)?.then_some(PinLock { _dir: file }))
    }

    /// Waits for the lock (blocks the calling thread).
    pub(crate) fn acquire(dir: &Path) -> Result<PinLock, PinLockError> {
        let file = open(dir)?;
        flock(&file, dir, true)?;
        Ok(PinLock { _dir: file })
    }
}

/// The process holding a flock on `dir`, from /proc/locks (None when none does, or it
/// cannot be told).
pub fn holder(dir: &Path) -> Option<u32> {
    let meta = std::fs::metadata(dir).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// Reads `/proc/locks` lines such as `1: FLOCK  ADVISORY  WRITE 4242 00:1e:1234 0 EOF`
/// (device as hex major:minor, then the inode).
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flock = fields.get(1) == Some(&"FLOCK");
        let at = fields.iter().position(|f| *f == want)?;
        let pid = fields.get(at.checked_sub(1)?)?.parse().ok()?;
        flock.then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 10 00:1e:99 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:1e:1234 0 EOF\n";
        let dev = libc::makedev(0, 0x1e);
        assert_eq!(holder_in(locks, dev, 1234), Some(4242));
        assert_eq!(holder_in(locks, dev, 99), None, "a POSIX lock is not ours");
        assert_eq!(holder_in(locks, dev, 7), None);
        assert_eq!(holder_in("garbage\n\n", dev, 1234), None);
    }

    #[test]
    fn a_second_lock_on_the_directory_is_refused_until_the_first_is_dropped() {
        // Created by the first lock, as on an agent's first start.
        let dir = std::env::temp_dir().join(format!("nodemesh-pin-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        let first = PinLock::try_acquire(&dir)
            .expect("lock")
            .expect("the first lock");
        // flock locks belong to open file descriptions: a second open conflicts even
        // within one process, as a second agent's would.
        assert!(PinLock::try_acquire(&dir).expect("lock").is_none());
        assert_eq!(holder(&dir), Some(std::process::id()));
        drop(first);
        assert!(PinLock::try_acquire(&dir).expect("lock").is_some());
        let _ = std::fs::remove_dir(&dir);
    }
}
