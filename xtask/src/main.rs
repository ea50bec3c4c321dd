//! `cargo xtask build|test|demo|bench`: one place that knows how Nodemesh is built.
//!
//! Everything uses the release profile and the workspace target dir, so the test,
//! demo and bench steps reuse one build.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod fuzz;
mod vm;

const BPF_LINKER_VERSION: &str = "0.10.0";

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object and every binary (release).
    Build,
    /// Check formatting and clippy, build, then run every test: unit tests and the eBPF
    /// end-to-end tests (root), the eBPF end-to-end tests again in a VM on Debian
    /// bookworm's kernel (6.1), then every fuzz target for 30 s (the VM and the fuzzing
    /// not when a test filter is given).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then run only the VM stage of `test`: the eBPF end-to-end tests on Debian
    /// bookworm's kernel (6.1) in a qemu VM (root; installs qemu and debootstrap).
    Vm {
        /// Extra arguments for the test executables in the VM, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then run the demo on the embedded simulated cluster (root).
    Demo,
    /// Build the fuzz targets (cargo fuzz, nightly) and run each for a bounded time.
    Fuzz {
        /// Targets to run (default: all).
        targets: Vec<String>,
        /// How long each target runs.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Build, then run benchmarks: `cluster` (default; the data path on the simulated
    /// cluster, root), `state` (discovery state at scale, no root needed) or `policy`
    /// (what a DestinationRule adds to each request's routing, no root needed).
    Bench {
        #[arg(value_enum, default_value_t = BenchKind::Cluster)]
        kind: BenchKind,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchKind {
    Cluster,
    State,
    Policy,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn output_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs what the eBPF build needs and is missing, saying so.
fn ensure_toolchain() -> Result<()> {
    let toolchains = output_ok(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain (eBPF programs need build-std)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output_ok(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly (needed for -Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = output_ok(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (matches nightly's LLVM; takes about a minute)");
        run(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ]))?;
    }
    Ok(())
}

fn build() -> Result<()> {
    let root = workspace_root();
    ensure_toolchain()?;
    eprintln!("xtask: building the eBPF programs");
    run(Command::new("cargo")
        .current_dir(root.join("mesh-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(root.join("target/ebpf")))?;
    let object = root.join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf");
    let release = root.join("target/release");
    std::fs::create_dir_all(&release)?;
    std::fs::copy(&object, release.join("mesh-ebpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    eprintln!("xtask: building the agent, meshctl and the test tools");
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--workspace",
        "--bins",
    ]))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} needs root (eBPF, network namespaces, cgroups): run it with sudo");
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn sim(args: &[&str]) -> Result<()> {
    run(Command::new(workspace_root().join("target/release/mesh-sim")).args(args))
}

/// Sums cargo's `test result: ok. N passed; M failed; ...` lines.
fn tally(line: &str, passed: &mut u64, failed: &mut u64) {
    let Some(rest) = line.strip_prefix("test result: ") else {
        return;
    };
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        if let (Some(kind), Some(n)) = (words.next(), words.next()) {
            let n: u64 = n.parse().unwrap_or(0);
            match kind {
                "passed" => *passed += n,
                "failed" => *failed += n,
                _ => {}
            }
        }
    }
}

/// The checks of the lint stage (run from the workspace root), each with what to do
/// when it fails.
const LINT_CHECKS: &[(&str, &str)] = &[
    ("cargo fmt --all -- --check", "run `cargo fmt --all`"),
    // Workspaces of their own, which `--all` does not reach.
    (
        "cargo fmt --manifest-path mesh-ebpf/Cargo.toml -- --check",
        "run `cargo fmt --manifest-path mesh-ebpf/Cargo.toml`",
    ),
    (
        "cargo fmt --manifest-path mesh-node/fuzz/Cargo.toml -- --check",
        "run `cargo fmt --manifest-path mesh-node/fuzz/Cargo.toml`",
    ),
    // Release, as the build is: clippy reuses its build scripts and proc macros.
    (
        "cargo clippy --release --all-targets -- -D warnings",
        "fix what clippy reports above (`cargo clippy --release --all-targets --fix \
         --allow-dirty` applies the suggestions it can)",
    ),
];

/// The first stage of `test`: formatting and lints, a failure naming its fix.
fn lint() -> Result<()> {
    for (tool, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if output_ok(Command::new("cargo").args([tool, "--version"])).is_none() {
            eprintln!("xtask: adding {component} to the toolchain (the lint stage runs it)");
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    eprintln!("xtask: checking formatting (cargo fmt) and lints (cargo clippy)");
    for (command, fix) in LINT_CHECKS {
        let mut words = command.split_whitespace();
        let status = Command::new(words.next().unwrap_or("cargo"))
            .current_dir(workspace_root())
            .args(words)
            .status()
            .with_context(|| format!("starting `{command}`"))?;
        if !status.success() {
            bail!("`{command}` failed ({status}): {fix}, then run the tests again");
        }
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    require_root("cargo xtask test")?;
    lint()?;
    build()?;
    eprintln!("xtask: running all tests (unit and eBPF end-to-end)");
    let mut child = Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "test",
            "--release",
            "--workspace",
            "--lib",
            "--bins",
            "--tests",
            // Every test binary runs even when one fails: the count covers them all.
            "--no-fail-fast",
            "--",
        ])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
            println!("{line}");
            tally(&line, &mut passed, &mut failed);
        }
    }
    let status = child.wait()?;
    // Whatever happened, leave no simulated cluster behind.
    let swept = sim(&["sweep"]);
    let in_vm = vm::stage(extra);
    if let Ok(o) = &in_vm {
        (passed, failed) = (passed + o.passed, failed + o.failed);
    }
    println!("xtask: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    in_vm?.check()?;
    swept?;
    if extra.is_empty() {
        fuzz::fuzz(&[], FUZZ_SECONDS)
    } else {
        eprintln!("xtask: fuzzing skipped (a test filter was given); `cargo xtask fuzz` runs it");
        Ok(())
    }
}

/// How long `cargo xtask test` runs each fuzz target.
const FUZZ_SECONDS: u64 = 30;

fn vm_only(filter: &[String]) -> Result<()> {
    require_root("cargo xtask vm")?;
    build()?;
    let outcome = vm::run_tests(filter)?;
    println!(
        "xtask: {} passed, {} failed",
        outcome.passed, outcome.failed
    );
    outcome.check()
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Task::Build => build(),
        Task::Test { args } => test(&args),
        Task::Vm { args } => vm_only(&args),
        Task::Demo => require_root("cargo xtask demo")
            .and_then(|_| build())
            .and_then(|_| sim(&["demo"])),
        Task::Fuzz { targets, seconds } => fuzz::fuzz(&targets, seconds),
        Task::Bench {
            kind: BenchKind::Cluster,
        } => require_root("cargo xtask bench")
            .and_then(|_| build())
            .and_then(|_| {
                let out = workspace_root().join("docs/benchmarks");
                sim(&["bench", "--out", &out.to_string_lossy()])
            }),
        Task::Bench {
            kind: BenchKind::State,
        } => run(Command::new("cargo").current_dir(workspace_root()).args([
            "bench",
            "-p",
            "mesh-node",
            "--bench",
            "state",
        ])),
        Task::Bench {
            kind: BenchKind::Policy,
        } => run(Command::new("cargo").current_dir(workspace_root()).args([
            "bench",
            "-p",
            "mesh-node",
            "--bench",
            "request_policy",
        ])),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tally;

    #[test]
    fn sums_cargo_test_result_lines() {
        let (mut p, mut f) = (0, 0);
        tally("test result: ok. 19 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.21s", &mut p, &mut f);
        tally(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored",
            &mut p,
            &mut f,
        );
        tally("running 4 tests", &mut p, &mut f);
        assert_eq!((p, f), (22, 2));
    }
}
