//! The newcomer's side: take the pin lock at once if it is free; else ask the agent
//! holding it to hand the node over, and take the lock it releases. When the holder
//! does not answer (it crashed, hangs, or is already draining after SIGTERM), wait
//! for the lock as before: the kernel frees it when the holder exits.

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use tracing::{info, warn};

use super::{
    wire::{self, Message},
    HandoverError, HandoverPaths, HandoverView, Inherited,
};
use crate::capture::{
    pin_lock,
    pin_lock::{PinLock, PinLockError},
};

/// How long the holder may take to send its listeners and release the lock.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A hand-over received: the listeners, and the link to the predecessor (it reports
/// its drain on it until it exits).
pub(crate) struct Taken {
    pub inherited: Inherited,
    pub from_pid: u32,
    /// When the predecessor stopped accepting: from then on connections wait in the
    /// sockets' queues until this agent serves them.
    pub released_at: Instant,
    conn: OwnedFd,
}

/// Asks the holder of the pin lock for its listeners (blocking).
fn ask(paths: &HandoverPaths, holder: Option<u32>) -> Result<Taken, HandoverError> {
    let conn = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| HandoverError::io("creating the hand-over socket", e))?;
    let addr = UnixAddr::new(&paths.socket)
        .map_err(|e| HandoverError::io("addressing the hand-over socket", e))?;
    socket::connect(conn.as_raw_fd(), &addr).map_err(|e| HandoverError::NotListening {
        path: paths.socket.clone(),
        source: e.into(),
    })?;
    wire::set_timeouts(&conn, ANSWER_TIMEOUT)?;
    let dir = std::fs::File::open(&paths.pin_dir)
        .map_err(|e| HandoverError::io("opening the pin directory", e))?;
    wire::send(
        &conn,
        &Message::Request {
            version: wire::VERSION,
            pid: std::process::id(),
        },
        &[dir.as_fd().as_raw_fd()],
    )?;
    let mut inherited = Inherited::default();
    loop {
        match wire::recv(&conn)? {
            Some((Message::Listeners { listeners }, fds)) => {
                if listeners.len() != fds.len() {
                    return Err(HandoverError::Protocol(format!(
                        "{} listeners described, {} descriptors sent",
                        listeners.len(),
                        fds.len()
                    )));
                }
                for (info, fd) in listeners.into_iter().zip(fds) {
                    inherited.offer(info, fd);
                }
            }
            Some((Message::Released, _)) => break,
            Some((Message::Refused { reason }, _)) => return Err(HandoverError::Refused(reason)),
            Some((other, _)) => {
                return Err(HandoverError::Protocol(format!(
                    "unexpected before the lock's release: {other:?}"
                )))
            }
            None => {
                return Err(HandoverError::Protocol(
                    "the running agent closed the hand-over before releasing the lock".into(),
                ))
            }
        }
    }
    Ok(Taken {
        inherited,
        from_pid: holder.unwrap_or(0),
        released_at: Instant::now(),
        conn,
    })
}

/// How often a newcomer looks again while the holder has no hand-over socket yet (it
/// is starting) or no more (it drains after SIGTERM).
const RETRY: Duration = Duration::from_millis(200);

/// The pin lock, and the hand-over that came with it, if any.
pub(crate) async fn lock_or_take_over(
    paths: &HandoverPaths,
) -> Result<(PinLock, Option<Taken>), PinLockError> {
    let started = Instant::now();
    let mut announced = false;
    let taken = loop {
        if let Some(lock) = PinLock::try_acquire(&paths.pin_dir)? {
            if announced {
                info!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "the previous agent exited; this one manages the pins now"
                );
            }
            return Ok((lock, None));
        }
        let holder = pin_lock::holder(&paths.pin_dir);
        if paths.socket.as_os_str().is_empty() {
            warn!(pin_dir = %paths.pin_dir.display(), holder_pid = ?holder, "another agent manages this node's pins and hand-overs are off (--handover-socket is empty); waiting for it to exit");
            break None;
        }
        if !announced {
            info!(pin_dir = %paths.pin_dir.display(), holder_pid = ?holder, "another agent manages this node's pins; asking it to hand over");
            announced = true;
        }
        let asked = {
            let paths = paths.clone();
            tokio::task::spawn_blocking(move || ask(&paths, holder))
                .await
                .unwrap_or_else(|e| {
                    Err(HandoverError::Protocol(format!(
                        "the request panicked: {e}"
                    )))
                })
        };
        match asked {
            Ok(taken) => break Some(taken),
            // Not listening (yet, or any more): look again.
            Err(HandoverError::NotListening { .. }) => {
                tokio::time::sleep(RETRY).await;
            }
            Err(e) => {
                warn!(error = %e, holder_pid = ?holder, "no hand-over; waiting for the running agent to exit");
                break None;
            }
        }
    };
    let dir = paths.pin_dir.clone();
    let lock = tokio::task::spawn_blocking(move || PinLock::acquire(&dir))
        .await
        .unwrap_or_else(|e| {
            Err(PinLockError::new(
                &paths.pin_dir,
                std::io::Error::other(e.to_string()),
            ))
        })?;
    let waited_ms = started.elapsed().as_millis() as u64;
    match &taken {
        Some(t) => info!(
            waited_ms,
            from_pid = t.from_pid,
            listeners = t.inherited.len(),
            rejected = t.inherited.rejected,
            "took the node over: the previous agent's listeners are this agent's now"
        ),
        None => info!(
            waited_ms,
            "the previous agent exited; this one manages the pins now"
        ),
    }
    Ok((lock, taken))
}

impl Taken {
    /// Follows the predecessor's drain reports into `view` until it exits (a thread
    /// blocked on the socket; it ends with the predecessor).
    pub(crate) fn follow(self, view: Arc<Mutex<HandoverView>>) {
        let update = move |f: &mut dyn FnMut(&mut HandoverView)| {
            f(&mut view.lock().unwrap_or_else(|p| p.into_inner()));
        };
        let conn = self.conn;
        let spawned = std::thread::Builder::new()
            .name("handover-follow".into())
            .spawn(move || {
                // No timeout: the predecessor reports about once a second while it
                // drains, then idles until it is told to stop.
                let _ = wire::set_timeouts(&conn, Duration::ZERO);
                loop {
                    match wire::recv(&conn) {
                        Ok(Some((Message::Draining { connections }, _))) => {
                            update(&mut |v| v.predecessor_draining = Some(connections))
                        }
                        Ok(Some((Message::Drained { completed, cut }, _))) => update(&mut |v| {
                            v.predecessor_draining = Some(0);
                            v.predecessor_drained = Some((completed, cut));
                        }),
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                update(&mut |v| v.predecessor_exited = true);
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot follow the previous agent's drain");
        }
    }
}
