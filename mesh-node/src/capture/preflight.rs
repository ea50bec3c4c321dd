//! Checks run before anything is loaded, so a missing privilege or kernel feature is
//! one clear sentence instead of a failed syscall deep inside.

use std::fs;

use thiserror::Error;

/// Capability bits (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error("mesh-node must run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN, plus CAP_SYS_PTRACE with --netns-locator kubepods (missing: {missing}); run it with sudo or grant those capabilities")]
    Privileges { missing: String },
    #[error("cannot read /proc/self/status to check capabilities: {0}")]
    Status(std::io::Error),
}

/// The effective capability set, from /proc/self/status.
fn effective_caps() -> Result<u64, PreflightError> {
    let status = fs::read_to_string("/proc/self/status").map_err(PreflightError::Status)?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .unwrap_or("0");
    Ok(u64::from_str_radix(hex, 16).unwrap_or(0))
}

/// `opens_other_processes`: the kubepods locator opens `/proc/<pid>/ns/net` of pod
/// processes, which run as other users; the kernel allows that only with CAP_SYS_PTRACE.
pub fn missing_capabilities(caps: u64, opens_other_processes: bool) -> Vec<&'static str> {
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN also grants BPF on kernels before 5.8 and is needed for setns anyway.
    if !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if opens_other_processes && !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    missing
}

pub fn check_privileges(opens_other_processes: bool) -> Result<(), PreflightError> {
    let missing = missing_capabilities(effective_caps()?, opens_other_processes);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// The running kernel's release string, for error messages.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// What each program needs, for the error when the kernel refuses one.
pub fn kernel_requirement(program: &str) -> &'static str {
    match program {
        "mesh_connect4" | "mesh_connect6" => {
            "cgroup/connect4 and connect6 with bpf_get_netns_cookie, bpf_get_current_ancestor_cgroup_id (5.7) and socket storage (Linux >= 5.8)"
        }
        "mesh_sockops" => {
            "sock_ops with bpf_get_netns_cookie (5.15), socket storage, TCP_CONNECT_CB and bpf_sock_ops_cb_flags_set (Linux >= 5.15)"
        }
        "mesh_sk_lookup" => "sk_lookup programs and BPF links on network namespaces (Linux >= 5.9)",
        _ => "Linux >= 5.15",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything_and_nobody_has_nothing() {
        assert!(missing_capabilities(u64::MAX, true).is_empty());
        assert_eq!(
            missing_capabilities(0, false),
            vec!["CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_BPF"]
        );
        let sys_admin_and_net = (1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN);
        assert!(missing_capabilities(sys_admin_and_net, false).is_empty());
        assert_eq!(
            missing_capabilities(sys_admin_and_net, true),
            vec!["CAP_SYS_PTRACE"]
        );
    }
}
