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
            // SAFETY: valid fd and option buffer.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &timeout as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            let _ = ready_tx.send(Ok(()));
            let mut captured = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::SeqCst) {
                // SAFETY: buf is valid for its length.
                let n =
                    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                if n > 0 && captured.len() < MAX_CAPTURE {
                    captured.extend_from_slice(&buf[..n as usize]);
                }
            }
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
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
