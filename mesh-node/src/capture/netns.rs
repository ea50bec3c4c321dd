//! A network namespace handle and the one operation the agent needs on it: run a short
//! closure (creating a socket) with the calling thread inside the namespace, then come
//! back. Sockets keep the namespace they were created in, whichever thread uses them.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsFd,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::sched::{setns, CloneFlags};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source} (is the pod still running?)")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace file")]
    NotNetns { path: PathBuf },
    #[error("cannot enter network namespace {id}: {source}")]
    Enter { id: NetnsId, source: nix::Error },
}

/// Identity of a namespace: device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

#[derive(Debug)]
pub struct Netns {
    file: File,
    id: NetnsId,
}

/// nsfs magic number (linux/magic.h).
const NSFS_MAGIC: i64 = 0x6e73_6673;

impl Netns {
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let open_err = |source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| open_err(e.into()))?;
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
            return Err(NetnsError::NotNetns {
                path: path.to_path_buf(),
            });
        }
        let meta = file.metadata().map_err(open_err)?;
        Ok(Netns {
            file,
            id: NetnsId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    /// The namespace of the calling thread.
    pub fn current_thread() -> Result<Netns, NetnsError> {
        Netns::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// The open namespace file (for attaching sk_lookup programs).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` with the calling thread in this namespace, then returns the thread to
    /// `home`. Keep `f` short and non-blocking: it runs on whatever thread calls this.
    pub fn run<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            id: self.id,
            source,
        })?;
        let out = f();
        if let Err(e) = setns(home.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A thread stuck in a pod's namespace would silently put later sockets
            // there; nothing sane can continue from that.
            panic!(
                "cannot return to the agent's network namespace {}: {e}",
                home.id
            );
        }
        Ok(out)
    }
}

/// Whether an interface address can be a pod's address: not loopback, link-local,
/// multicast or unspecified.
pub(crate) fn is_pod_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || link_local)
        }
    }
}

impl Netns {
    /// The pod addresses of this namespace's interfaces ([`is_pod_address`]), IPv4
    /// first: what a pod has before its status says so.
    pub fn addresses(&self, home: &Netns) -> Result<Vec<IpAddr>, NetnsError> {
        let found = self.run(home, nix::ifaddrs::getifaddrs)?;
        let mut ips: Vec<IpAddr> = found
            .map_err(|source| NetnsError::Enter {
                id: self.id,
                source,
            })?
            .filter_map(|a| {
                let addr = a.address?;
                addr.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| addr.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .filter(|ip| is_pod_address(*ip))
            .collect();
        ips.sort_by_key(|ip| (ip.is_ipv6(), *ip));
        ips.dedup();
        Ok(ips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_netns_inode() -> u64 {
        std::fs::metadata("/proc/thread-self/ns/net")
            .expect("procfs")
            .ino()
    }

    /// Creates a fresh namespace on a throwaway thread and hands back a handle to it.
    fn new_namespace() -> Netns {
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare needs root");
            Netns::current_thread().expect("open own netns")
        })
        .join()
        .expect("thread")
    }

    #[test]
    fn run_enters_the_namespace_and_comes_back() {
        let home = Netns::current_thread().unwrap();
        let pod = new_namespace();
        assert_ne!(pod.id(), home.id());
        let inside = pod.run(&home, thread_netns_inode).unwrap();
        assert_eq!(inside, pod.id().ino);
        assert_eq!(thread_netns_inode(), home.id().ino);
    }

    #[test]
    fn sockets_keep_the_namespace_they_were_made_in() {
        use socket2::{Domain, Socket, Type};
        let home = Netns::current_thread().unwrap();
        let pod = new_namespace();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr: std::net::SocketAddr = listener.local_addr().unwrap();
        // Made inside the pod namespace, connected after the thread came back home:
        // the socket still lives in the pod, where this listener does not exist.
        let made_in_pod = pod
            .run(&home, || Socket::new(Domain::IPV4, Type::STREAM, None))
            .unwrap()
            .unwrap();
        assert!(made_in_pod.connect(&addr.into()).is_err());
        let made_at_home = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        assert!(made_at_home.connect(&addr.into()).is_ok());
    }

    #[test]
    fn a_namespace_reports_its_own_pod_addresses_only() {
        let home = Netns::current_thread().unwrap();
        let pod = new_namespace();
        assert_eq!(pod.addresses(&home).unwrap(), Vec::<IpAddr>::new());
        assert!(is_pod_address("10.1.2.3".parse().unwrap()));
        assert!(is_pod_address("fd00::5".parse().unwrap()));
        for not in [
            "127.0.0.1",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "ff02::1",
            "0.0.0.0",
        ] {
            assert!(!is_pod_address(not.parse().unwrap()), "{not}");
        }
    }

    #[test]
    fn opening_a_regular_file_is_refused() {
        let err = Netns::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
        let err = Netns::open(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(err.to_string().contains("is the pod still running"));
    }
}
