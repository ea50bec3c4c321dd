//! `cargo xtask fuzz`: builds every fuzz target of `mesh-node/fuzz` once (cargo fuzz:
//! nightly, libFuzzer, AddressSanitizer, release with debug assertions) and runs each
//! for a bounded time on a scratch copy of its committed seed corpus, so the committed
//! seeds never churn. A crash, a timeout or an out-of-memory fails the run, with the
//! path of the input that reproduces it.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{output_ok, run, workspace_root};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every fuzz target, in the order they run.
pub const TARGETS: [&str; 5] = [
    "hbone_connect",
    "hbone_h2",
    "ca_sign",
    "manifest",
    "http_routes",
];

/// One input slower than this is a hang.
const INPUT_TIMEOUT_S: u64 = 10;

struct Paths {
    fuzz_dir: PathBuf,
    target_dir: PathBuf,
}

impl Paths {
    fn new() -> Paths {
        let root = workspace_root();
        Paths {
            fuzz_dir: root.join("mesh-node/fuzz"),
            // Shared by every run (and kept between runs): one build for all targets.
            target_dir: root.join("target/fuzz"),
        }
    }

    fn seeds(&self, target: &str) -> PathBuf {
        self.fuzz_dir.join("corpus").join(target)
    }

    fn scratch(&self, target: &str) -> PathBuf {
        self.target_dir.join("corpus").join(target)
    }

    fn artifacts(&self, target: &str) -> PathBuf {
        self.target_dir.join("artifacts").join(target)
    }
}

/// `cargo +nightly fuzz <subcommand>` with the fuzz dir and the shared target dir.
fn cargo_fuzz(paths: &Paths, subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args(["+nightly", "fuzz", subcommand, "--fuzz-dir"])
        .arg(&paths.fuzz_dir)
        .arg("--target-dir")
        .arg(&paths.target_dir);
    cmd
}

fn ensure_cargo_fuzz() -> Result<()> {
    let version = output_ok(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if !version.contains(CARGO_FUZZ_VERSION) {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (takes about a minute)");
        run(Command::new("cargo").args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]))?;
    }
    Ok(())
}

fn files_in(dir: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// What libFuzzer's last status line (`#N DONE cov: .. ft: .. corp: ..`) says.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    pub execs: Option<u64>,
    pub cov: Option<u64>,
    pub ft: Option<u64>,
    pub corpus: Option<String>,
    pub exec_per_s: Option<u64>,
}

pub fn summary(line: &str) -> Option<Summary> {
    let rest = line.strip_prefix('#')?;
    let mut words = rest.split_whitespace();
    let execs = Some(words.next()?.parse().ok()?);
    let mut s = Summary {
        execs,
        ..Summary::default()
    };
    let words: Vec<&str> = words.collect();
    for pair in words.windows(2) {
        let number = || pair[1].parse().ok();
        match pair[0] {
            "cov:" => s.cov = number(),
            "ft:" => s.ft = number(),
            "corp:" => s.corpus = Some(pair[1].to_string()),
            "exec/s:" => s.exec_per_s = number(),
            _ => {}
        }
    }
    Some(s)
}

/// Runs `target` for `seconds`; returns the reproducing inputs it left, if any.
fn run_target(paths: &Paths, target: &str, seconds: u64) -> Result<Vec<PathBuf>> {
    let scratch = paths.scratch(target);
    let artifacts = paths.artifacts(target);
    fs::create_dir_all(&scratch)?;
    fs::create_dir_all(&artifacts)?;
    for seed in files_in(&paths.seeds(target)) {
        if let Some(name) = seed.file_name() {
            fs::copy(&seed, scratch.join(name))
                .with_context(|| format!("copying seed {}", seed.display()))?;
        }
    }
    let before = files_in(&artifacts);
    let started = Instant::now();
    let mut child = cargo_fuzz(paths, "run")
        .arg(target)
        .arg(&scratch)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the fuzzer for {target}"))?;
    let mut last = None;
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if let Some(s) = summary(&line) {
                last = Some(s);
            }
        }
    }
    let status = child.wait()?;
    let found: Vec<PathBuf> = files_in(&artifacts).difference(&before).cloned().collect();
    let stats = last.unwrap_or_default();
    println!(
        "xtask: fuzz {target}: {}s, {} execs ({} exec/s), corpus {}, cov {} ft {}, {}",
        started.elapsed().as_secs(),
        stats.execs.unwrap_or(0),
        stats.exec_per_s.unwrap_or(0),
        stats.corpus.as_deref().unwrap_or("?"),
        stats.cov.unwrap_or(0),
        stats.ft.unwrap_or(0),
        if found.is_empty() && status.success() {
            "no findings".to_string()
        } else {
            format!("FAILED ({status})")
        }
    );
    if found.is_empty() && !status.success() {
        bail!("the fuzzer for {target} failed ({status}) without leaving an input");
    }
    Ok(found)
}

/// Builds all targets once, then runs each of `targets` (all when empty) for `seconds`.
pub fn fuzz(targets: &[String], seconds: u64) -> Result<()> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "unknown fuzz target {t}: the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let selected: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    ensure_cargo_fuzz()?;
    let paths = Paths::new();
    eprintln!("xtask: building the fuzz targets");
    let started = Instant::now();
    run(&mut cargo_fuzz(&paths, "build"))?;
    eprintln!(
        "xtask: fuzz targets built in {}s",
        started.elapsed().as_secs()
    );
    let mut findings = Vec::new();
    for target in selected {
        eprintln!("xtask: fuzzing {target} for {seconds}s");
        for input in run_target(&paths, target, seconds)? {
            findings.push((target, input));
        }
    }
    if !findings.is_empty() {
        for (target, input) in &findings {
            println!(
                "xtask: fuzzing {target} found {}; reproduce with `cargo +nightly fuzz run --fuzz-dir mesh-node/fuzz --target-dir target/fuzz {target} {}`",
                input.display(),
                input.display()
            );
        }
        bail!(
            "fuzzing found {} failing input(s): fix each at its root and add a unit test",
            findings.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{summary, Summary};

    #[test]
    fn reads_libfuzzers_last_status_line() {
        let line =
            "#1234567\tDONE   cov: 2345 ft: 6789 corp: 321/45Kb lim: 4096 exec/s: 4115 rss: 412Mb";
        assert_eq!(
            summary(line),
            Some(Summary {
                execs: Some(1234567),
                cov: Some(2345),
                ft: Some(6789),
                corpus: Some("321/45Kb".into()),
                exec_per_s: Some(4115),
            })
        );
        assert_eq!(summary("INFO: Seed: 42"), None);
        assert_eq!(
            summary("###### End of recommended dictionary. ######"),
            None
        );
    }
}
