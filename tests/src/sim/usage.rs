//! What an agent process holds right now: open file descriptors and resident memory.
//! The hostile tests compare these before, during and after an attack.

use std::{fmt, fs};

use anyhow::{Context, Result};

use super::SimCluster;

/// Open descriptors and resident set of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub fds: usize,
    pub rss_kib: u64,
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} fds, {} MiB RSS", self.fds, self.rss_kib / 1024)
    }
}

/// Reads `/proc/<pid>`: the number of entries in `fd/` and `VmRSS` of `status`.
pub fn process_usage(pid: u32) -> Result<Usage> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count();
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")?;
    Ok(Usage { fds, rss_kib })
}

impl SimCluster {
    /// The node agent's current descriptors and memory.
    pub fn agent_usage(&self, node: &str) -> Result<Usage> {
        let pid = self
            .agent_pid(node)
            .with_context(|| format!("no agent running on node {node}"))?;
        process_usage(pid)
    }
}

#[cfg(test)]
mod tests {
    use super::process_usage;

    #[test]
    fn reads_this_process() {
        let before = process_usage(std::process::id()).unwrap();
        let files: Vec<_> = (0..8)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        let during = process_usage(std::process::id()).unwrap();
        assert!(during.fds >= before.fds + 8, "{before} -> {during}");
        assert!(during.rss_kib > 0);
        drop(files);
    }
}
