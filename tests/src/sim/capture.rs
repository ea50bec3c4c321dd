//! A packet capture inside one of the cluster's namespaces (the fabric, where node-to-
//! node traffic crosses), to check what an observer on the wire would see.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::{anyhow, Result};

/// Everything captured is kept up to this size.
const MAX_CAPTURE: usize = 256 * 1024 * 1024;

/// The socket's receive queue (bytes): frames wait here until the capture thread runs.
const RECEIVE_QUEUE: libc::c_int = 64 * 1024 * 1024;

/// Appends the `n` bytes `recv` returned, up to the capture's size.
fn keep(captured: &mut Vec<u8>, buf: &[u8], n: isize) {
    if n > 0 && captured.len() < MAX_CAPTURE {
        captured.extend_from_slice(&buf[..n as usize]);
    }
}

/// Frames the kernel dropped on this socket since the last call (the call resets it).
fn packet_drops(fd: libc::c_int) -> std::io::Result<u32> {
    let mut stats = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: valid fd, out-buffer of the stated length.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            &mut stats as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stats.tp_drops)
}

pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<u8>>>>,
}

impl Capture {
    /// Starts capturing every frame on every interface of `netns`.
    pub fn start(netns: &Path) -> Result<Capture> {
        let file = std::fs::File::open(netns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<Vec<u8>> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            // SAFETY: plain socket(2); the fd is owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    // Not inherited by the programs the test starts meanwhile.
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                let _ = ready_tx.send(Err(e.to_string()));
                return Err(anyhow!("AF_PACKET socket: {e}"));
            }
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            // A large receive queue, so that a busy machine that schedules this thread
            // late loses nothing: what was dropped is counted below and fails the capture.
            let queue: libc::c_int = RECEIVE_QUEUE;
            // SAFETY: valid fd and option buffers.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &timeout as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                if libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    &queue as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                ) != 0
                {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUF,
                        &queue as *const _ as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as u32,
                    );
                }
            }
            // Counters start now (reading them resets them).
            let _ = packet_drops(fd);
            let _ = ready_tx.send(Ok(()));
            let mut captured = Vec::new();
            let mut buf = vec![0u8; 256 * 1024];
            while !flag.load(Ordering::SeqCst) {
                // SAFETY: buf is valid for its length.
                let n =
                    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                keep(&mut captured, &buf, n);
            }
            // What is still queued was on the wire before `finish`: read it all.
            loop {
                // SAFETY: buf is valid for its length.
                let n = unsafe {
                    libc::recv(
                        fd,
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n <= 0 {
                    break;
                }
                keep(&mut captured, &buf, n);
            }
            let drops = packet_drops(fd);
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
            match drops {
                Ok(0) => {}
                Ok(n) => {
                    return Err(anyhow!(
                        "the capture lost {n} frames: it saw only part of the wire"
                    ))
                }
                Err(e) => return Err(anyhow!("PACKET_STATISTICS: {e}")),
            }
            Ok(captured)
        });
        ready_rx
            .recv()
            .map_err(|_| anyhow!("capture thread died"))?
            .map_err(|e| anyhow!("cannot capture: {e}"))?;
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns the raw frames, concatenated.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .ok_or_else(|| anyhow!("capture already finished"))?
            .join()
            .map_err(|_| anyhow!("capture thread panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
