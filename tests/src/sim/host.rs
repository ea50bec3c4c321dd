//! Host plumbing for the simulated cluster: `ip` commands, running code inside a
//! network namespace, cgroup directories, bpffs, and spawning processes "in a pod".

use std::{
    ffi::CString,
    fs,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};

pub const NETNS_DIR: &str = "/var/run/netns";

/// Runs `ip <args>` and fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `f` on a fresh thread that has entered the namespace `netns` (a path).
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| anyhow!("setns: {e}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("thread inside the namespace panicked"))?
}

pub fn sysctl_in(netns: &Path, key_path: &'static str, value: &'static str) -> Result<()> {
    in_netns(netns, move || {
        fs::write(key_path, value).with_context(|| format!("writing {key_path}"))
    })
}

/// The cgroup2 mount, as the agent finds it.
pub fn cgroup2_mount() -> Result<PathBuf> {
    mesh_node::capture::cgroup::cgroup2_mount().map_err(|e| anyhow!("{e}"))
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (as systemd does on a node).
pub fn ensure_bpffs() -> Result<()> {
    let target = Path::new("/sys/fs/bpf");
    if mesh_node::capture::cgroup::ensure_on_bpffs(&target.join("x")).is_ok() {
        return Ok(());
    }
    fs::create_dir_all(target).ok();
    nix::mount::mount(
        Some("bpf"),
        target,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| anyhow!("mounting bpffs at /sys/fs/bpf: {e} (are you root?)"))
}

/// Kills every process in a cgroup subtree and removes its directories, leaves first.
pub fn remove_cgroup_tree(root: &Path) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux >= 5.14) kills the whole subtree at once.
    let _ = fs::write(root.join("cgroup.kill"), "1");
    let deadline = Instant::now() + scaled(Duration::from_secs(5));
    loop {
        match remove_dirs(root) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn remove_dirs(dir: &Path) -> Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_dirs(&e.path())?;
            }
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("removing cgroup {}: {e}", dir.display())),
    }
}

/// Where a process should run: a network namespace and a cgroup.
#[derive(Debug, Clone)]
pub struct Placement {
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

impl Placement {
    /// A command that starts inside this placement: enters the namespace, then joins
    /// the cgroup (so the cgroup programs see its sockets), and dies with its parent.
    /// In that order, no process is ever seen in a pod's cgroup while still in the
    /// harness's own namespace (on a node, a container runtime's processes that join a
    /// pod's cgroup before its namespace are in the node's namespace, which the agent
    /// knows is not a pod's).
    pub fn command(&self, program: &Path) -> Result<Command> {
        let netns = fs::File::open(&self.netns)
            .with_context(|| format!("opening {}", self.netns.display()))?;
        let procs = CString::new(
            self.cgroup
                .join("cgroup.procs")
                .as_os_str()
                .as_encoded_bytes(),
        )
        .context("cgroup path")?;
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null());
        // SAFETY: only async-signal-safe libc calls run between fork and exec; the
        // CString and the namespace file are prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Ok(cmd)
    }
}

/// Binaries built next to the test or tool that uses this crate
/// (`target/<profile>/` for both `target/<profile>/deps/<test>` and `target/<profile>/<bin>`).
pub fn target_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build everything with `cargo xtask build` (or run `cargo xtask test`)",
            path.display()
        );
    }
    Ok(path)
}

/// How many times slower than a normal machine this one runs the cluster:
/// `NODEMESH_TIME_SCALE` (set by `cargo xtask vm`, whose VM emulates its CPU), 1 when
/// unset. Timing bounds are multiplied by it, never dropped.
pub fn time_scale() -> f64 {
    static SCALE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("NODEMESH_TIME_SCALE")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && (1.0..=1000.0).contains(s))
            .unwrap_or(1.0)
    })
}

/// A timing bound as it applies on this machine: `d` times [`time_scale`].
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}

/// Polls `check` every 20 ms until it returns Some or `timeout` (scaled) passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
