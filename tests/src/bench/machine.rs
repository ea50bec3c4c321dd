//! What the bench ran on, and the Debian packages it needs (installed when missing).

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Result};

/// Font the charts are drawn with (fonts-dejavu-core).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Program and the Debian package that ships it.
const NEEDED: [(&str, &str); 4] = [
    ("iperf3", "iperf3"),
    ("stunnel4", "stunnel4"),
    ("haproxy", "haproxy"),
    (FONT, "fonts-dejavu-core"),
];

fn present(what: &str) -> bool {
    if what.starts_with('/') {
        return Path::new(what).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(what).is_file()))
        .unwrap_or(false)
}

fn apt(args: &[&str]) -> bool {
    Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Installs the missing tools from Debian's packages, saying so.
pub fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(what, _)| !present(what))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "    installing from Debian's packages: {}",
        missing.join(" ")
    );
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&missing);
    // An old or missing package list is the usual failure: refresh it once and retry.
    let installed = apt(&args) || (apt(&["update"]) && apt(&args));
    if !installed {
        bail!(
            "could not install {}: install them with apt-get and run the bench again",
            missing.join(" ")
        );
    }
    Ok(())
}

pub struct Machine {
    pub date: String,
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
    pub kernel: String,
    pub os: String,
    pub load_start: String,
    pub tools: String,
}

/// The first line of the command's output (stdout, then stderr) containing `pattern`.
fn first_line(cmd: &str, args: &[&str], pattern: &str) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty() && l.contains(pattern))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
            .unwrap_or_default();
        let os = fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default();
        let tools = [
            first_line("iperf3", &["--version"], "iperf"),
            first_line("stunnel4", &["-version"], "stunnel"),
            first_line("haproxy", &["-v"], "version"),
        ]
        .join("; ");
        Machine {
            date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"], ""),
            cpu,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory,
            kernel: first_line("uname", &["-r"], ""),
            os,
            load_start: load_average(),
            tools,
        }
    }
}
