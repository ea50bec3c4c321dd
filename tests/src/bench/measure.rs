//! Running the measurements: rounds that visit every scenario in turn (so drift on a
//! shared machine spreads over all of them), and the proxies' CPU and memory.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{
    http::HttpLoadReport,
    scenarios::{App, Bed, Scenario},
};
use crate::{
    report::{ChurnReport, RttReport},
    sim::host::Placement,
};

/// Everything measured per run. Units are in [`Metric::unit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    Stream1,
    Stream8,
    Rtt1p50,
    Rtt1p99,
    Rtt1p999,
    Rtt1kp50,
    Rtt1kp99,
    Rtt1kp999,
    HttpP50,
    HttpP99,
    ConnRate,
}

impl Metric {
    pub const ALL: [Metric; 11] = [
        Metric::Stream1,
        Metric::Stream8,
        Metric::Rtt1p50,
        Metric::Rtt1p99,
        Metric::Rtt1p999,
        Metric::Rtt1kp50,
        Metric::Rtt1kp99,
        Metric::Rtt1kp999,
        Metric::HttpP50,
        Metric::HttpP99,
        Metric::ConnRate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::Stream1 => "throughput, 1 stream",
            Metric::Stream8 => "throughput, 8 streams",
            Metric::Rtt1p50 => "1 B RTT p50",
            Metric::Rtt1p99 => "1 B RTT p99",
            Metric::Rtt1p999 => "1 B RTT p99.9",
            Metric::Rtt1kp50 => "1 KB RTT p50",
            Metric::Rtt1kp99 => "1 KB RTT p99",
            Metric::Rtt1kp999 => "1 KB RTT p99.9",
            Metric::HttpP50 => "HTTP @1000 rps p50",
            Metric::HttpP99 => "HTTP @1000 rps p99",
            Metric::ConnRate => "new connections",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Stream1 | Metric::Stream8 => "Gbit/s",
            Metric::ConnRate => "conn/s",
            _ => "µs",
        }
    }

    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Stream1 | Metric::Stream8 | Metric::ConnRate)
    }
}

/// Median with the range of a set of runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Stat {
        let mut xs = samples.to_vec();
        xs.sort_by(|a, b| a.total_cmp(b));
        let n = xs.len();
        if n == 0 {
            return Stat::default();
        }
        let median = if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        };
        Stat {
            median,
            min: xs[0],
            max: xs[n - 1],
            runs: n,
        }
    }
}

/// The proxies' cost: CPU summed over both nodes, memory of the larger side.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyCost {
    pub cpu_s_per_gb: f64,
    pub rss_idle_mb: f64,
    /// Anonymous (private) part of the idle RSS: the rest is mostly the binary's code
    /// pages, shared with every other process running the same binary.
    pub anon_idle_mb: f64,
    pub rss_load_mb: f64,
    pub rss_after_mb: f64,
    /// Anonymous (private) part of the RSS after.
    pub anon_after_mb: f64,
}

pub struct ScenarioResults {
    pub scenario: Scenario,
    pub samples: BTreeMap<Metric, Vec<f64>>,
    pub cost: Option<ProxyCost>,
    /// KB of proxy RSS (both nodes) per idle connection held, and how many were held
    /// (see `scale`).
    pub held_kb_per_conn: Option<(f64, u64)>,
    /// vCPU of the busier node at a fixed [`Plan::http_rate`] (see `scale`).
    pub vcpu_per_node_at_rate: Option<f64>,
    cpu_ticks: u64,
    bytes: u64,
}

impl ScenarioResults {
    pub fn stat(&self, m: Metric) -> Option<Stat> {
        self.samples.get(&m).map(|xs| Stat::of(xs))
    }
    fn push(&mut self, m: Metric, v: f64) {
        self.samples.entry(m).or_default().push(v);
    }
}

/// How much to measure; the defaults keep a whole bench under 15 minutes on 2 cores.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub rounds: usize,
    pub iperf_seconds: u64,
    pub round_trips: u64,
    pub connections: u64,
    pub http_rate: u64,
    pub http_seconds: u64,
    /// Idle connections held at once for the memory-per-connection figure.
    pub held_connections: u64,
    /// How long the fixed HTTP rate runs for the CPU-per-rate figure.
    pub cost_http_seconds: u64,
}

impl Default for Plan {
    fn default() -> Plan {
        Plan {
            rounds: 5,
            iperf_seconds: 3,
            round_trips: 5000,
            connections: 2000,
            http_rate: 1000,
            http_seconds: 3,
            held_connections: 10_000,
            cost_http_seconds: 30,
        }
    }
}

pub(super) fn check(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `plan.rounds` rounds over `scenarios`; prints one line per scenario and round.
pub fn run(
    bed: &Bed,
    scenarios: &[Scenario],
    plan: Plan,
    stop: &AtomicBool,
) -> Result<Vec<ScenarioResults>> {
    let mut results: Vec<ScenarioResults> = scenarios
        .iter()
        .map(|&scenario| ScenarioResults {
            scenario,
            samples: BTreeMap::new(),
            // The L7 scenario shares nodemesh-l4's agents: their cost is reported there.
            cost: (!bed.proxy_pids(scenario).is_empty() && !scenario.http_only())
                .then(ProxyCost::default),
            held_kb_per_conn: None,
            vcpu_per_node_at_rate: None,
            cpu_ticks: 0,
            bytes: 0,
        })
        .collect();
    for r in &mut results {
        let pids = bed.proxy_pids(r.scenario);
        if let Some(cost) = &mut r.cost {
            cost.rss_idle_mb = max_rss_mb(&pids);
            cost.anon_idle_mb = pids
                .iter()
                .filter_map(|&p| status_mb(p, "RssAnon:"))
                .fold(0.0, f64::max);
        }
        // Warm-up: pools, session caches and page cache, not counted.
        if r.scenario.http_only() {
            continue;
        }
        let placement = bed.cluster.pod(r.scenario.client_pod()).placement();
        churn(
            bed,
            &placement,
            bed.target(r.scenario, App::Echo),
            200,
            1024,
        )?;
        rtt(bed, r.scenario, 1024, 500)?;
    }
    for round in 1..=plan.rounds {
        for r in &mut results {
            check(stop)?;
            one_round(bed, r, plan)?;
            println!(
                "    round {round}/{}: {:<12} {}",
                plan.rounds,
                r.scenario.name(),
                brief(r)
            );
        }
    }
    // Long enough for the agents' periodic return of freed memory (every 10 s).
    thread::sleep(Duration::from_secs(11));
    for r in &mut results {
        let pids = bed.proxy_pids(r.scenario);
        let (ticks, bytes) = (r.cpu_ticks, r.bytes);
        if let Some(cost) = &mut r.cost {
            cost.rss_after_mb = max_rss_mb(&pids);
            cost.anon_after_mb = pids
                .iter()
                .filter_map(|&p| status_mb(p, "RssAnon:"))
                .fold(0.0, f64::max);
            cost.cpu_s_per_gb = ticks as f64 / clock_ticks() / (bytes as f64 / 1e9).max(1e-9);
        }
    }
    Ok(results)
}

fn brief(r: &ScenarioResults) -> String {
    let last = |m| {
        r.samples
            .get(&m)
            .and_then(|v| v.last())
            .copied()
            .unwrap_or(0.0)
    };
    format!(
        "{:.2}/{:.2} Gbit/s, 1 KB RTT p50 {:.0} µs, {:.0} conn/s, HTTP p50 {:.0} µs",
        last(Metric::Stream1),
        last(Metric::Stream8),
        last(Metric::Rtt1kp50),
        last(Metric::ConnRate),
        last(Metric::HttpP50)
    )
}

fn one_round(bed: &Bed, r: &mut ScenarioResults, plan: Plan) -> Result<()> {
    let s = r.scenario;
    let placement = bed.cluster.pod(s.client_pod()).placement();
    if s.http_only() {
        let h = http_load(bed, &placement, s, bed.target(s, App::Http), plan)?;
        r.push(Metric::HttpP50, h.p50_us);
        r.push(Metric::HttpP99, h.p99_us);
        return Ok(());
    }
    let pids = bed.proxy_pids(s);
    for (streams, metric) in [(1, Metric::Stream1), (8, Metric::Stream8)] {
        let cpu_before = cpu_ticks(&pids);
        let sampler = RssSampler::start(pids.clone());
        let run = iperf(
            &placement,
            bed.target(s, App::Iperf),
            streams,
            plan.iperf_seconds,
        )
        .with_context(|| format!("{}: iperf3 with {streams} stream(s)", s.name()))?;
        let peak = sampler.stop();
        r.cpu_ticks += cpu_ticks(&pids).saturating_sub(cpu_before);
        r.bytes += run.bytes;
        r.push(metric, run.bits_per_s / 1e9);
        if let Some(cost) = &mut r.cost {
            cost.rss_load_mb = cost.rss_load_mb.max(peak);
        }
    }
    for (size, metrics) in [
        (1, [Metric::Rtt1p50, Metric::Rtt1p99, Metric::Rtt1p999]),
        (
            1024,
            [Metric::Rtt1kp50, Metric::Rtt1kp99, Metric::Rtt1kp999],
        ),
    ] {
        let rep = rtt(bed, s, size, plan.round_trips)?;
        for (m, v) in metrics
            .into_iter()
            .zip([rep.p50_us, rep.p99_us, rep.p999_us])
        {
            r.push(m, v);
        }
    }
    let c = churn(
        bed,
        &placement,
        bed.target(s, App::Echo),
        plan.connections,
        1024,
    )?;
    r.push(
        Metric::ConnRate,
        c.succeeded as f64 / (c.elapsed_ms.max(1) as f64 / 1e3),
    );
    let h = http_load(bed, &placement, s, bed.target(s, App::Http), plan)?;
    r.push(Metric::HttpP50, h.p50_us);
    r.push(Metric::HttpP99, h.p99_us);
    Ok(())
}

fn rtt(bed: &Bed, s: Scenario, size: u64, count: u64) -> Result<RttReport> {
    let rep = bed
        .cluster
        .rtt(s.client_pod(), bed.target(s, App::Echo), size, count)?;
    if let Some(e) = &rep.error {
        bail!("{}: {size} B round trips failed: {e}", s.name());
    }
    Ok(rep)
}

fn churn(
    bed: &Bed,
    placement: &Placement,
    dst: SocketAddr,
    count: u64,
    size: u64,
) -> Result<ChurnReport> {
    let (dst, count, size) = (dst.to_string(), count.to_string(), size.to_string());
    let rep: ChurnReport = bed.cluster.testapp_report(
        placement,
        &[
            "churn",
            "--connect",
            &dst,
            "--count",
            &count,
            "--size",
            &size,
        ],
    )?;
    if rep.failed > 0 {
        bail!(
            "connections to {dst} failed: {} ({:?})",
            rep.failed,
            rep.first_error
        );
    }
    Ok(rep)
}

pub(super) fn http_load(
    bed: &Bed,
    placement: &Placement,
    scenario: Scenario,
    dst: SocketAddr,
    plan: Plan,
) -> Result<HttpLoadReport> {
    let (dst, rate, secs) = (
        dst.to_string(),
        plan.http_rate.to_string(),
        plan.http_seconds.to_string(),
    );
    let headers = bed.http_headers(scenario);
    let mut args = vec![
        "http-load",
        "--connect",
        &dst,
        "--rate",
        &rate,
        "--seconds",
        &secs,
    ];
    for h in &headers {
        args.extend(["--header", h.as_str()]);
    }
    let rep: HttpLoadReport = bed.cluster.testapp_report(placement, &args)?;
    if rep.failed > 0 {
        bail!(
            "HTTP requests to {dst} failed: {} of {} ({:?})",
            rep.failed,
            rep.sent,
            rep.first_error
        );
    }
    Ok(rep)
}

struct IperfRun {
    bits_per_s: f64,
    bytes: u64,
}

/// One iperf3 run from `placement`; retried briefly while the server is still busy
/// with the previous test.
fn iperf(placement: &Placement, dst: SocketAddr, streams: u32, seconds: u64) -> Result<IperfRun> {
    let mut last_error = String::new();
    for _ in 0..5 {
        let out = placement
            .command(std::path::Path::new("iperf3"))?
            .args(["-c", &dst.ip().to_string(), "-p", &dst.port().to_string()])
            .args(["-P", &streams.to_string(), "-t", &seconds.to_string(), "-J"])
            .output()
            .context("running iperf3")?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let sum = &v["end"]["sum_received"];
        if let (Some(bps), Some(bytes)) = (sum["bits_per_second"].as_f64(), sum["bytes"].as_u64()) {
            return Ok(IperfRun {
                bits_per_s: bps,
                bytes,
            });
        }
        last_error = v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned());
        thread::sleep(Duration::from_millis(300));
    }
    bail!("iperf3 to {dst}: {last_error}")
}

pub(super) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime from the text of `/proc/<pid>/stat`, in clock ticks.
fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name (which may hold spaces and parentheses) start
    // at `state`; utime and stime are the 12th and 13th of them.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime of the processes, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter().map(|&pid| cpu_ticks_of(pid)).sum()
}

/// User + system clock ticks of one process so far (0 if it is gone).
pub(super) fn cpu_ticks_of(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat_ticks(&stat))
        .unwrap_or(0)
}

/// RSS of `pids` together, in kB.
pub(super) fn rss_kb(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&p| status_mb(p, "VmRSS:"))
        .map(|mb| (mb * 1024.0) as u64)
        .sum()
}

/// A `kB` field of `/proc/<pid>/status` (e.g. `VmRSS:`), in MB.
fn status_mb(pid: u32, field: &str) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn max_rss_mb(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|&p| status_mb(p, "VmRSS:"))
        .fold(0.0, f64::max)
}

/// Samples the largest RSS every 100 ms while a run is under way.
struct RssSampler {
    done: Arc<AtomicBool>,
    thread: thread::JoinHandle<f64>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> RssSampler {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = thread::spawn(move || {
            let mut peak: f64 = 0.0;
            let deadline = Instant::now() + Duration::from_secs(600);
            while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                peak = peak.max(max_rss_mb(&pids));
                thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        RssSampler { done, thread }
    }

    fn stop(self) -> f64 {
        self.done.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_gives_median_and_range() {
        let odd = Stat::of(&[5.0, 1.0, 3.0]);
        assert_eq!((odd.median, odd.min, odd.max, odd.runs), (3.0, 1.0, 5.0, 3));
        let even = Stat::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!(even.median, 2.5);
        assert_eq!(Stat::of(&[]).runs, 0);
    }

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces() {
        let stat = "42 (tokio (rt) w) S 1 42 42 0 -1 4194560 100 0 0 0 250 70 0 0 20 0 4 0 1";
        assert_eq!(stat_ticks(stat), Some(320));
        assert_eq!(stat_ticks("garbage"), None);
    }
}
