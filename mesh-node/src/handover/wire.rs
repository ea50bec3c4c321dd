//! The hand-over's messages on a Unix SOCK_SEQPACKET socket: one JSON message per
//! packet (bounded), descriptors riding along as SCM_RIGHTS. Blocking, with send and
//! receive timeouts on the socket: both ends run it on a blocking thread.

use std::{
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use super::HandoverError;

/// A message's largest size: a node's worth of listener descriptions in batches of
/// [`FDS_PER_MESSAGE`] fits many times over.
pub(super) const MAX_MESSAGE: usize = 16 * 1024;
/// Descriptors sent with one message (the kernel allows up to 253).
pub(super) const FDS_PER_MESSAGE: usize = 32;

/// What the two agents say to each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Message {
    /// Newcomer → running agent: "hand me your listeners". Carries a descriptor of
    /// the pin directory, proof that the sender can reach the pins already.
    Request { version: u32, pid: u32 },
    /// Running agent → newcomer: listening sockets, one descriptor each, in order.
    Listeners { listeners: Vec<ListenerInfo> },
    /// Running agent → newcomer: it stopped accepting and released the pin lock.
    Released,
    /// Running agent → newcomer: connections it still serves, while it drains.
    Draining { connections: usize },
    /// Running agent → newcomer: its drain ended.
    Drained { completed: usize, cut: usize },
    /// Either way: no hand-over, and why.
    Refused { reason: String },
}

/// One listening socket handed over: its namespace's cookie and its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ListenerInfo {
    pub netns_cookie: u64,
    pub addr: SocketAddr,
}

/// The version of [`Message`]s this build speaks.
pub(super) const VERSION: u32 = 1;

pub(super) fn set_timeouts(fd: &OwnedFd, timeout: Duration) -> Result<(), HandoverError> {
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    socket::setsockopt(fd, socket::sockopt::ReceiveTimeout, &tv)
        .and_then(|()| socket::setsockopt(fd, socket::sockopt::SendTimeout, &tv))
        .map_err(|e| HandoverError::io("setting the hand-over socket's timeouts", e))
}

/// Sends one message with `fds` attached.
pub(super) fn send(fd: &OwnedFd, message: &Message, fds: &[RawFd]) -> Result<(), HandoverError> {
    let bytes = serde_json::to_vec(message)
        .map_err(|e| HandoverError::io("encoding a hand-over message", std::io::Error::other(e)))?;
    if bytes.len() > MAX_MESSAGE || fds.len() > FDS_PER_MESSAGE {
        return Err(HandoverError::Protocol(format!(
            "a message of {} bytes with {} descriptors exceeds the bounds",
            bytes.len(),
            fds.len()
        )));
    }
    let iov = [IoSlice::new(&bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(HandoverError::io("sending a hand-over message", e)),
        }
    }
}

/// Receives one message and the descriptors that came with it (closed when dropped).
/// None at end of stream. A message too long, truncated descriptors or text that is
/// not a [`Message`] are protocol errors (the descriptors received are closed).
pub(super) fn recv(fd: &OwnedFd) -> Result<Option<(Message, Vec<OwnedFd>)>, HandoverError> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let (len, flags, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match socket::recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs().map_err(|e| {
                    HandoverError::io("reading a hand-over message's descriptors", e)
                })? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: the kernel just installed these descriptors in this
                        // process for us; nothing else owns them.
                        fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                    }
                }
                break (msg.bytes, msg.flags, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(HandoverError::io("receiving a hand-over message", e)),
        }
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) || len > MAX_MESSAGE {
        return Err(HandoverError::Protocol(format!(
            "a message over {MAX_MESSAGE} bytes or {FDS_PER_MESSAGE} descriptors"
        )));
    }
    let message = serde_json::from_slice(&buf[..len])
        .map_err(|e| HandoverError::Protocol(format!("not a hand-over message: {e}")))?;
    Ok(Some((message, fds)))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    #[test]
    fn messages_and_descriptors_cross_intact_and_garbage_is_refused() {
        let (a, b) = pair();
        let file = std::fs::File::open("/proc/self/stat").expect("a file");
        let message = Message::Listeners {
            listeners: vec![ListenerInfo {
                netns_cookie: 7,
                addr: "127.0.0.1:15001".parse().unwrap(),
            }],
        };
        send(&a, &message, &[file.as_fd().as_raw_fd()]).expect("send");
        let (got, fds) = recv(&b).expect("recv").expect("a message");
        assert_eq!(got, message);
        assert_eq!(fds.len(), 1);

        // Not JSON, and JSON of another shape: protocol errors, not panics.
        nix::unistd::write(&a, b"\xff\x00garbage").unwrap();
        assert!(matches!(recv(&b), Err(HandoverError::Protocol(_))));
        nix::unistd::write(&a, br#"{"type":"listeners","listeners":"no"}"#).unwrap();
        assert!(matches!(recv(&b), Err(HandoverError::Protocol(_))));
        // Over the bound: refused whole, not read in part.
        nix::unistd::write(&a, &vec![b' '; MAX_MESSAGE + 10]).unwrap();
        assert!(matches!(recv(&b), Err(HandoverError::Protocol(_))));

        drop(a);
        assert!(recv(&b).expect("end of stream").is_none());
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (_a, b) = pair();
        set_timeouts(&b, Duration::from_millis(50)).unwrap();
        let started = std::time::Instant::now();
        assert!(recv(&b).is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
