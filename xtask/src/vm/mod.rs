//! The eBPF end-to-end tests on another kernel: Debian bookworm's own (6.1), in a qemu
//! VM under software emulation (no KVM needed). The host's release build runs in the
//! guest unchanged (same glibc): the test executables and the binaries next to them go
//! in on a per-run payload disk, the guest's init runs them as root, and their output
//! comes back on the second serial port, which is streamed here line by line.
//!
//! Installs what it needs (Debian's qemu-system-x86 and debootstrap), builds the image
//! once per recipe (cached under `target/vm`), and bounds every wait: boot, each test
//! executable, the whole run; on a timeout the VM is killed.

mod image;

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{run, tally, workspace_root};

/// The end-to-end test files run in the VM.
pub(crate) const VM_TESTS: &[&str] = &[
    "redirect",
    "enrollment",
    "lifecycle",
    "mtls",
    "routing",
    "upgrades",
];

/// What the tests find next to their executable's directory (`target_bin`).
const HOST_FILES: &[&str] = &[
    "mesh-node",
    "mesh-testapp",
    "mesh-sim",
    "meshctl",
    "mesh-ebpf.o",
];

const GUEST_RUN: &str = include_str!("guest-run.sh");

/// What the VM's tests reported.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub passed: u64,
    pub failed: u64,
    /// Every test executable exited 0 (a crash or a timeout fails the run even when
    /// no test line says FAILED).
    pub ok: bool,
    pub kernel: String,
}

impl Outcome {
    pub(crate) fn check(&self) -> Result<()> {
        if self.failed > 0 || !self.ok {
            bail!(
                "the end-to-end tests in the VM failed (kernel {}; their output is above, prefixed [vm])",
                self.kernel
            );
        }
        Ok(())
    }
}

/// Knobs, each with a default that fits a 2-core machine (environment overrides).
struct Settings {
    /// Multiplies the tests' timing bounds (NODEMESH_TIME_SCALE in the guest).
    time_scale: String,
    test_threads: u32,
    cpus: u32,
    memory_mb: u32,
    /// qemu's niceness: other builds on the machine keep their share.
    nice: i32,
    boot_timeout: Duration,
    test_timeout: Duration,
    total_timeout: Duration,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            time_scale: env_or("NODEMESH_VM_TIME_SCALE", "10".to_string()),
            test_threads: env_or("NODEMESH_VM_TEST_THREADS", 2),
            cpus: 2,
            memory_mb: 4096,
            nice: env_or("NODEMESH_VM_NICE", 10),
            boot_timeout: Duration::from_secs(env_or("NODEMESH_VM_BOOT_TIMEOUT", 300)),
            test_timeout: Duration::from_secs(env_or("NODEMESH_VM_TEST_TIMEOUT", 1200)),
            total_timeout: Duration::from_secs(env_or("NODEMESH_VM_TIMEOUT", 2700)),
        }
    }
}

/// Prints how long a step took (the lead and CI logs read these).
pub(crate) fn step_done(what: &str, since: Instant) {
    eprintln!(
        "xtask: vm: {what} took {:.1} s",
        since.elapsed().as_secs_f64()
    );
}

/// Runs `cmd` with its output in `log`; on failure the log's tail is in the error.
pub(crate) fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let shown = format!("{cmd:?}");
    let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!(
            "{shown} failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail(log, 20)
        );
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The VM stage of `cargo xtask test`: skipped when a test filter was given (the
/// developer is iterating on host tests; `cargo xtask vm -- <filter>` runs it alone).
pub(crate) fn stage(extra: &[String]) -> Result<Outcome> {
    if !extra.is_empty() {
        eprintln!("xtask: vm: skipped (a test filter was given; `cargo xtask vm -- <filter>` runs the VM stage)");
        return Ok(Outcome {
            ok: true,
            ..Outcome::default()
        });
    }
    run_tests(extra)
}

/// Builds (or reuses) the image, then runs [`VM_TESTS`] in the VM with `filter`.
pub(crate) fn run_tests(filter: &[String]) -> Result<Outcome> {
    let started = Instant::now();
    let settings = Settings::from_env();
    let root = workspace_root();
    let vm_dir = root.join("target/vm");
    fs::create_dir_all(&vm_dir)?;
    eprintln!(
        "xtask: vm: the eBPF end-to-end tests ({}) on Debian {}'s kernel",
        VM_TESTS.join(", "),
        image::SUITE
    );
    let t = Instant::now();
    with_sbin_on_path();
    ensure_host_packages()?;
    step_done("host packages", t);
    let image = image::ensure(&vm_dir)?;
    let t = Instant::now();
    let tests = test_executables(&root)?;
    let payload = make_payload(&vm_dir, &root, &tests, filter, &settings)?;
    step_done("payload disk", t);
    let outcome = boot_and_run(&vm_dir, &image, &payload, &settings);
    step_done("VM stage", started);
    outcome
}

/// debootstrap, mkfs.ext4 and what debootstrap runs (chroot) live in sbin, which a
/// non-login shell's PATH may lack.
fn with_sbin_on_path() {
    let path = std::env::var("PATH").unwrap_or_default();
    let missing: Vec<&str> = ["/usr/sbin", "/sbin"]
        .into_iter()
        .filter(|d| !path.split(':').any(|p| p == *d))
        .collect();
    if !missing.is_empty() {
        // Set before any thread of ours reads the environment concurrently.
        std::env::set_var("PATH", format!("{path}:{}", missing.join(":")));
    }
}

/// qemu and debootstrap from Debian's packages, installed when missing.
fn ensure_host_packages() -> Result<()> {
    const NEEDED: &[(&str, &str)] = &[
        ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
        ("debootstrap", "/usr/sbin/debootstrap"),
        ("e2fsprogs", "/sbin/mkfs.ext4"),
        ("binutils", "/usr/bin/strip"),
    ];
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: vm: installing {} (apt)", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing))
}

/// The release test executables of [`VM_TESTS`] (built if needed), by test name.
fn test_executables(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args([
        "test",
        "--release",
        "-p",
        "mesh-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for t in VM_TESTS {
        cmd.args(["--test", t]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the VM's test executables failed ({})", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        if let (Some(exe), true) = (msg["executable"].as_str(), VM_TESTS.contains(&name)) {
            found.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    let mut ordered = Vec::new();
    for t in VM_TESTS {
        let Some(i) = found.iter().position(|(n, _)| n == t) else {
            bail!("cargo did not report the test executable of {t}");
        };
        ordered.push(found.swap_remove(i));
    }
    Ok(ordered)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A small ext4 disk with `release/` laid out as on the host (executables without
/// their debug info) and `run.sh`.
fn make_payload(
    vm_dir: &Path,
    root: &Path,
    tests: &[(String, PathBuf)],
    filter: &[String],
    settings: &Settings,
) -> Result<PathBuf> {
    let dir = vm_dir.join("payload");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let deps = dir.join("release/deps");
    fs::create_dir_all(&deps)?;
    let release = root.join("target/release");
    for name in HOST_FILES {
        let src = release.join(name);
        if !src.exists() {
            bail!(
                "{} is missing: `cargo xtask build` builds it",
                src.display()
            );
        }
        copy_stripped(&src, &dir.join("release").join(name))?;
    }
    let mut entries = Vec::new();
    for (name, exe) in tests {
        let file = exe.file_name().context("test executable name")?;
        copy_stripped(exe, &deps.join(file))?;
        entries.push(format!("{name}:release/deps/{}", file.to_string_lossy()));
    }
    let filter: Vec<String> = filter.iter().map(|f| shell_quote(f)).collect();
    let script = format!(
        "NM_TESTS={}\nNM_TIME_SCALE={}\nNM_TEST_THREADS={}\nNM_TEST_TIMEOUT={}\nNM_PROBE_TIMEOUT={}\nset -- {}\n{GUEST_RUN}",
        shell_quote(&entries.join(" ")),
        shell_quote(&settings.time_scale),
        settings.test_threads,
        settings.test_timeout.as_secs(),
        60,
        filter.join(" "),
    );
    fs::write(dir.join("run.sh"), script)?;
    let size_mb = dir_bytes(&dir) / (1 << 20) * 5 / 4 + 64;
    let img = vm_dir.join("payload.img");
    run_logged(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "payload", "-d"])
            .arg(&dir)
            .arg(&img)
            .arg(format!("{size_mb}M")),
        &vm_dir.join("payload-mkfs.log"),
    )?;
    fs::remove_dir_all(&dir)?;
    Ok(img)
}

/// Copies an executable without its debug sections (the guest reads less); an eBPF
/// object (its BTF is needed) or anything `strip` refuses is copied as it is.
fn copy_stripped(src: &Path, dst: &Path) -> Result<()> {
    let is_object = src.extension().is_some_and(|e| e == "o");
    let stripped = !is_object
        && Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(dst)
            .arg(src)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !stripped {
        fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

extern "C" {
    fn nice(inc: i32) -> i32;
    fn prctl(option: i32, ...) -> i32;
    fn getrusage(who: i32, usage: *mut [i64; 18]) -> i32;
}
const PR_SET_PDEATHSIG: i32 = 1;
const SIGKILL: i32 = 9;
const RUSAGE_CHILDREN: i32 = -1;

/// CPU seconds (user + system) of the children this process has waited for: the
/// VM's cost independent of how busy the machine was.
fn children_cpu_seconds() -> f64 {
    // struct rusage on x86_64 Linux: two timevals (seconds, microseconds), 14 longs.
    let mut usage = [0i64; 18];
    // SAFETY: the buffer has the size and layout of struct rusage.
    if unsafe { getrusage(RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    (usage[0] + usage[2]) as f64 + (usage[1] + usage[3]) as f64 / 1e6
}

/// Boots the VM on `image` with `payload` and streams the guest's output until it
/// powers off, or kills it when a bound passes.
fn boot_and_run(
    vm_dir: &Path,
    image: &image::Image,
    payload: &Path,
    settings: &Settings,
) -> Result<Outcome> {
    let console = vm_dir.join("console.log");
    let results = vm_dir.join("results.log");
    for f in [&console, &results] {
        let _ = fs::remove_file(f);
    }
    let qemu_log = fs::File::create(vm_dir.join("qemu.log"))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    // One host thread for all vCPUs: with a thread per vCPU, every cross-CPU wakeup in
    // the guest waits for the host to schedule another thread, and loopback round trips
    // ran 20 times slower on this 2-core machine under load.
    cmd.args(["-accel", "tcg,thread=single", "-cpu", "max", "-smp"])
        .arg(settings.cpus.to_string())
        .arg("-m")
        .arg(settings.memory_mb.to_string())
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        // no_timer_check: under emulation on a loaded host the kernel's IO-APIC timer
        // check can miss its ticks and panic the boot ("IO-APIC + timer doesn't work").
        .arg("-append")
        .arg(format!(
            "root=/dev/vda rw console=ttyS0 panic=-1 quiet no_timer_check init={}",
            image.init
        ))
        // The cached image is never written: the guest's writes go to a snapshot.
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,snapshot=on",
            image.rootfs.display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            payload.display()
        ))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone()?)
        .stderr(qemu_log);
    let niceness = settings.nice;
    // SAFETY: nice and prctl are async-signal-safe; nothing else runs before exec.
    unsafe {
        cmd.pre_exec(move || {
            nice(niceness);
            // qemu dies with xtask, even if xtask is killed.
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            Ok(())
        });
    }
    let started = Instant::now();
    let cpu_before = children_cpu_seconds();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let mut reader = LineReader::default();
    let mut outcome = Outcome::default();
    let mut booted = false;
    let mut done: Option<i32> = None;
    let result = loop {
        let exited = child.try_wait()?;
        for line in reader.read_new(&results) {
            println!("[vm] {line}");
            tally(&line, &mut outcome.passed, &mut outcome.failed);
            if let Some(kernel) = line.strip_prefix("NODEMESH-VM booted kernel=") {
                booted = true;
                outcome.kernel = kernel.trim().to_string();
                step_done("boot to the test runner", started);
            }
            if let Some(rc) = line.strip_prefix("NODEMESH-VM done rc=") {
                done = rc.trim().parse().ok();
            }
        }
        if let Some(status) = exited {
            break match done {
                Some(rc) => Ok(rc),
                None => Err(anyhow::anyhow!(
                    "the VM stopped ({status}) before its tests finished"
                )),
            };
        }
        let elapsed = started.elapsed();
        if !booted && elapsed > settings.boot_timeout {
            break Err(anyhow::anyhow!(
                "the VM did not reach its test runner within {:?}",
                settings.boot_timeout
            ));
        }
        if elapsed > settings.total_timeout {
            break Err(anyhow::anyhow!(
                "the VM run passed its bound of {:?} (NODEMESH_VM_TIMEOUT)",
                settings.total_timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    if child.try_wait()?.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    step_done("VM run (boot, tests, power-off)", started);
    eprintln!(
        "xtask: vm: qemu used {:.0} s of CPU ({} vCPUs)",
        children_cpu_seconds() - cpu_before,
        settings.cpus
    );
    match result {
        Ok(rc) => {
            outcome.ok = rc == 0;
            eprintln!(
                "xtask: vm: kernel {}: {} passed, {} failed{}",
                outcome.kernel,
                outcome.passed,
                outcome.failed,
                if outcome.ok {
                    ""
                } else {
                    " (a test executable failed)"
                }
            );
            Ok(outcome)
        }
        Err(e) => bail!(
            "{e}; last console lines ({}):\n{}\nqemu: {}",
            console.display(),
            tail(&console, 30),
            tail(&vm_dir.join("qemu.log"), 5)
        ),
    }
}

/// Reads the lines appended to a file since the last call (a partial last line waits).
#[derive(Default)]
struct LineReader {
    offset: u64,
    partial: String,
}

impl LineReader {
    fn read_new(&mut self, path: &Path) -> Vec<String> {
        let Ok(mut f) = fs::File::open(path) else {
            return Vec::new();
        };
        let mut bytes = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut bytes).is_err() {
            return Vec::new();
        }
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let mut lines = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            lines.push(line.trim_end_matches(['\n', '\r']).to_string());
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_filters_for_the_guest_shell() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn reads_only_whole_new_lines() {
        let path = std::env::temp_dir().join(format!("xtask-lines-{}", std::process::id()));
        fs::write(&path, "one\r\ntw").unwrap();
        let mut r = LineReader::default();
        assert_eq!(r.read_new(&path), vec!["one"]);
        fs::write(&path, "one\r\ntwo\nthree\n").unwrap();
        assert_eq!(r.read_new(&path), vec!["two", "three"]);
        assert!(r.read_new(&path).is_empty());
        let _ = fs::remove_file(&path);
    }
}
