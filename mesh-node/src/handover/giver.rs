//! The running agent's side: a Unix socket that newcomers ask on. A request is
//! checked (the peer's user, the message, the pin-directory proof) on a blocking
//! thread with a 2 s bound, one at a time, before the agent's main loop sees it; a
//! refused one is counted and logged at a bounded rate, and the agent runs on.

use std::{
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
        unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    },
    sync::Arc,
    time::Duration,
};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};
use tracing::info;

use super::{
    wire::{self, ListenerInfo, Message},
    HandoverError, HandoverPaths,
};
use crate::telemetry::metrics::Metrics;

/// How long a newcomer has to send its request once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A checked request from a newcomer, waiting for the agent to answer it.
pub(crate) struct Request {
    conn: OwnedFd,
    pub pid: u32,
}

/// The hand-over socket, listening; closed when dropped.
pub(crate) struct HandoverServer {
    requests: mpsc::Receiver<Request>,
    task: JoinHandle<()>,
}

impl Drop for HandoverServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HandoverServer {
    /// Listens at `paths.socket` (its directory created 0700 if missing; a socket left
    /// there by an earlier agent is replaced: only the pin lock's holder binds it).
    pub(crate) fn bind(
        paths: &HandoverPaths,
        metrics: Arc<Metrics>,
    ) -> Result<HandoverServer, HandoverError> {
        let at = &paths.socket;
        if let Some(dir) = paths.socket.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .map_err(HandoverError::io_at("creating the directory of", at))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(HandoverError::io_at("restricting the directory of", at))?;
            }
        }
        match std::fs::symlink_metadata(&paths.socket) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(&paths.socket).map_err(HandoverError::io_at("removing the stale socket", at))?
            }
            Ok(_) => {
                return Err(HandoverError::io(
                    "the hand-over socket's path is taken by something else than a socket; remove it or pass another --handover-socket",
                    std::io::ErrorKind::AlreadyExists,
                ))
            }
            Err(_) => {}
        }
        let listener = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(HandoverError::io_at("creating", at))?;
        let addr = UnixAddr::new(&paths.socket).map_err(HandoverError::io_at("addressing", at))?;
        socket::bind(listener.as_raw_fd(), &addr).map_err(HandoverError::io_at("binding", at))?;
        std::fs::set_permissions(&paths.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(HandoverError::io_at("restricting", at))?;
        socket::listen(
            &listener,
            socket::Backlog::new(4).unwrap_or(socket::Backlog::MAXCONN),
        )
        .map_err(HandoverError::io_at("listening on", at))?;
        let pin_dir = std::fs::metadata(&paths.pin_dir)
            .map_err(HandoverError::io_at("reading the pin directory for", at))?;
        let proof = (pin_dir.dev(), pin_dir.ino());
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open, and the same
        // descriptor, until the AsyncFd is dropped.
        let listener = unsafe { AsyncFd::register(listener) }.map_err(|e| {
            HandoverError::io_at("registering", at)(std::io::Error::other(e.to_string()))
        })?;
        let (tx, requests) = mpsc::channel(1);
        let task = tokio::spawn(serve(listener, proof, tx, metrics));
        info!(socket = %paths.socket.display(), "hand-over socket listening: a newer agent on this node takes over from here");
        Ok(HandoverServer { requests, task })
    }

    /// The next checked request (cancel-safe: it waits in a channel).
    pub(crate) async fn next(&mut self) -> Option<Request> {
        self.requests.recv().await
    }
}

async fn serve(
    listener: AsyncFd<OwnedFd>,
    proof: (u64, u64),
    requests: mpsc::Sender<Request>,
    metrics: Arc<Metrics>,
) {
    let refused = |reason: &str| {
        metrics
            .handovers
            .with_label_values(&["giver", "refused"])
            .inc();
        crate::warn_limited!(reason, "hand-over request refused");
    };
    loop {
        let Ok(mut ready) = listener.readable().await else {
            return;
        };
        let conn = match socket::accept4(listener.get_ref().as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(fd) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            Err(nix::errno::Errno::EAGAIN) => {
                ready.clear_ready();
                continue;
            }
            Err(_) => {
                // EMFILE and the like: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match tokio::task::spawn_blocking(move || check(conn, proof)).await {
            Ok(Ok(request)) => {
                if requests.send(request).await.is_err() {
                    return;
                }
            }
            Ok(Err(reason)) => refused(&reason),
            Err(_) => refused("the check panicked"),
        }
    }
}

/// Reads and checks one request; on refusal the peer is told why.
fn check(conn: OwnedFd, proof: (u64, u64)) -> Result<Request, String> {
    let refuse = |conn: &OwnedFd, reason: String| {
        let _ = wire::send(
            conn,
            &Message::Refused {
                reason: reason.clone(),
            },
            &[],
        );
        reason
    };
    wire::set_timeouts(&conn, REQUEST_TIMEOUT).map_err(|e| e.to_string())?;
    let cred = socket::getsockopt(&conn, socket::sockopt::PeerCredentials)
        .map_err(|e| format!("no peer credentials: {e}"))?;
    if cred.uid() != nix::unistd::geteuid().as_raw() {
        return Err(refuse(
            &conn,
            format!("peer uid {} is not the agent's", cred.uid()),
        ));
    }
    let (message, fds) = match wire::recv(&conn) {
        Ok(Some(m)) => m,
        Ok(None) => return Err("the peer closed before asking".into()),
        Err(e) => return Err(refuse(&conn, e.to_string())),
    };
    let Message::Request { version, pid } = message else {
        return Err(refuse(&conn, "the first message must be a request".into()));
    };
    if version != wire::VERSION {
        return Err(refuse(
            &conn,
            format!(
                "version {version} requested, this agent speaks {}",
                wire::VERSION
            ),
        ));
    }
    let proved = match fds.as_slice() {
        [dir] => nix::sys::stat::fstat(dir.as_fd()).is_ok_and(|s| {
            (s.st_dev, s.st_ino) == proof && s.st_mode & libc::S_IFMT == libc::S_IFDIR
        }),
        _ => false,
    };
    if !proved {
        return Err(refuse(
            &conn,
            "the request must carry a descriptor of this node's pin directory".into(),
        ));
    }
    Ok(Request { conn, pid })
}

impl Request {
    /// Sends the listening sockets (blocking; bounded by the socket's timeouts). On
    /// success the agent must stop accepting and then call [`Giver::released`].
    pub(crate) fn give(
        self,
        listeners: &[(ListenerInfo, BorrowedFd<'_>)],
    ) -> Result<Giver, HandoverError> {
        for batch in listeners.chunks(wire::FDS_PER_MESSAGE) {
            let infos = batch.iter().map(|(info, _)| *info).collect();
            let fds: Vec<RawFd> = batch.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            wire::send(&self.conn, &Message::Listeners { listeners: infos }, &fds)?;
        }
        Ok(Giver {
            conn: self.conn,
            pid: self.pid,
        })
    }
}

/// The link to the successor while this agent drains: reports are best effort.
pub(crate) struct Giver {
    conn: OwnedFd,
    pub pid: u32,
}

impl Giver {
    /// This agent no longer accepts and no longer holds the pin lock.
    pub(crate) fn released(&self) {
        let _ = wire::send(&self.conn, &Message::Released, &[]);
        // From here on progress reports are best effort: never block the drain.
        let _ = nix::fcntl::fcntl(
            &self.conn,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
    }

    pub(crate) fn draining(&self, connections: usize) {
        let _ = wire::send(&self.conn, &Message::Draining { connections }, &[]);
    }

    pub(crate) fn drained(&self, completed: usize, cut: usize) {
        let _ = wire::send(&self.conn, &Message::Drained { completed, cut }, &[]);
    }
}
