//! Handing a node over from one agent to the next (an upgrade) without closing a
//! listening socket: the running agent (the giver) passes the newcomer (the taker) its
//! in-pod and node listening sockets as descriptors over a Unix socket, stops
//! accepting, releases the pin lock and drains; the taker accepts on the very same
//! sockets. Connections that arrive in between wait in the sockets' accept queues, so
//! none is refused, and the eBPF maps that point at the in-pod listeners stay valid.
//!
//! Why descriptors rather than SO_REUSEPORT: a reuseport group splits new connections
//! between old and new sockets, and closing the old ones resets whatever waits in their
//! queues; the sk_lookup map would also have to be switched socket by socket. One
//! socket passed on has one queue, nothing to switch and nothing to lose.
//!
//! Who may ask: a process of the agent's user that sends a descriptor of the pin
//! directory (it can reach the pins, so it could already do anything this would give
//! it). `giver.rs` answers; `taker.rs` asks; `wire.rs` is the message format.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::PathBuf,
};

use thiserror::Error;

use crate::capture::sockets::netns_cookie_of;

pub(crate) mod giver;
pub(crate) mod taker;
mod wire;

pub(crate) use wire::ListenerInfo;

#[derive(Debug, Error)]
pub(crate) enum HandoverError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("nothing listens on the hand-over socket {path}: {source}")]
    NotListening {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hand-over protocol: {0}")]
    Protocol(String),
    #[error("the running agent refused the hand-over: {0}")]
    Refused(String),
}

impl HandoverError {
    pub(super) fn io(what: &str, source: impl Into<std::io::Error>) -> HandoverError {
        HandoverError::Io {
            what: what.into(),
            source: source.into(),
        }
    }

    /// For `map_err`: an I/O error doing `what` with `path` (`what` is followed by
    /// the path).
    pub(super) fn io_at<'a, E: Into<std::io::Error>>(
        what: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(E) -> HandoverError + 'a {
        move |source| HandoverError::io(&format!("{what} {}", path.display()), source)
    }
}

/// The hand-over socket of a pin directory: given by `--handover-socket`.
#[derive(Debug, Clone)]
pub(crate) struct HandoverPaths {
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
}

/// Listening sockets a predecessor handed over, until their owners claim them; what
/// is left unclaimed closes when this is dropped.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    listeners: HashMap<(u64, SocketAddr), OwnedFd>,
    /// Descriptors that were not what their description said (closed).
    pub rejected: usize,
}

impl Inherited {
    /// Keeps `fd` if it is a listening TCP socket bound to `info.addr` in the namespace
    /// of `info.netns_cookie`; anything else is closed and counted.
    pub(crate) fn offer(&mut self, info: ListenerInfo, fd: OwnedFd) {
        if is_listener_at(&fd, info) {
            self.listeners.insert((info.netns_cookie, info.addr), fd);
        } else {
            self.rejected += 1;
        }
    }

    /// The listener at `addr` in the namespace of `netns_cookie`, if one was handed over.
    pub(crate) fn take(
        &mut self,
        netns_cookie: u64,
        addr: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let fd = self.listeners.remove(&(netns_cookie, addr))?;
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    pub(crate) fn len(&self) -> usize {
        self.listeners.len()
    }

    /// Closes every listener not taken (pods that left meanwhile).
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.listeners.len();
        self.listeners.clear();
        n
    }
}

/// Whether `fd` is a listening TCP socket at `info.addr` in `info.netns_cookie`'s
/// namespace (the taker checks every descriptor it is given).
fn is_listener_at(fd: &OwnedFd, info: ListenerInfo) -> bool {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};
    let listening = getsockopt(&fd.as_fd(), sockopt::AcceptConn).unwrap_or(false);
    let stream = getsockopt(&fd.as_fd(), sockopt::SockType).ok() == Some(SockType::Stream);
    let addr = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::V4((*v4).into()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
        });
    let cookie = netns_cookie_of(fd.as_raw_fd()).ok();
    listening && stream && addr == Some(info.addr) && cookie == Some(info.netns_cookie)
}

/// What the admin API shows of a hand-over this agent took part in.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HandoverView {
    /// This agent took the node over from process `from_pid`.
    pub took_over_from: Option<u32>,
    /// Listeners it inherited (in-pod and node).
    pub inherited_listeners: usize,
    /// How long no agent accepted: from the predecessor's release to this agent's
    /// pods served again (connections waited in the sockets' queues meanwhile).
    pub accept_gap_ms: Option<u64>,
    /// Connections the predecessor still drains (last report).
    pub predecessor_draining: Option<usize>,
    /// The predecessor's drain ended: (completed, cut).
    pub predecessor_drained: Option<(usize, usize)>,
    /// The predecessor's process has exited (its hand-over socket closed).
    pub predecessor_exited: bool,
    /// This agent handed the node over to process `to_pid` and drains.
    pub handed_over_to: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listener_at_the_described_address_and_namespace_is_kept() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cookie = netns_cookie_of(listener.as_raw_fd()).unwrap();
        let fd = || OwnedFd::from(listener.try_clone().unwrap());
        let mut inherited = Inherited::default();
        inherited.offer(
            ListenerInfo {
                netns_cookie: cookie + 1,
                addr,
            },
            fd(),
        );
        let mut other = addr;
        other.set_port(addr.port().wrapping_add(1));
        inherited.offer(
            ListenerInfo {
                netns_cookie: cookie,
                addr: other,
            },
            fd(),
        );
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        inherited.offer(
            ListenerInfo {
                netns_cookie: cookie,
                addr,
            },
            OwnedFd::from(file),
        );
        let connected = std::net::TcpStream::connect(addr).unwrap();
        inherited.offer(
            ListenerInfo {
                netns_cookie: cookie,
                addr: connected.local_addr().unwrap(),
            },
            OwnedFd::from(connected),
        );
        assert_eq!(inherited.rejected, 4);
        assert_eq!(inherited.len(), 0);
        inherited.offer(
            ListenerInfo {
                netns_cookie: cookie,
                addr,
            },
            fd(),
        );
        assert_eq!(inherited.len(), 1);
        assert!(inherited.take(cookie, other).is_none());
        let taken = inherited.take(cookie, addr).expect("the listener");
        assert_eq!(taken.local_addr().unwrap(), addr);
    }
}
