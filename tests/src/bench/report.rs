//! The results as markdown (`docs/benchmarks/README.md`) and as printed ratios.

use std::fmt::Write as _;

use super::{
    machine::Machine,
    measure::{Metric, Plan, ScenarioResults, Stat},
    scenarios::Scenario,
};

pub struct Report<'a> {
    pub machine: &'a Machine,
    pub results: &'a [ScenarioResults],
    pub plan: Plan,
    pub minutes: f64,
    pub load_end: String,
}

fn fmt_value(m: Metric, v: f64) -> String {
    match m.unit() {
        "Gbit/s" => format!("{v:.2}"),
        _ => format!("{v:.0}"),
    }
}

fn fmt_stat(m: Metric, s: Stat) -> String {
    format!(
        "{} ({}–{})",
        fmt_value(m, s.median),
        fmt_value(m, s.min),
        fmt_value(m, s.max)
    )
}

/// A goal's name, its target, and what this run measured (shown, met).
type GoalRow = (&'static str, &'static str, Option<(String, bool)>);

impl Report<'_> {
    fn get(&self, s: Scenario) -> Option<&ScenarioResults> {
        self.results.iter().find(|r| r.scenario == s)
    }

    fn median(&self, s: Scenario, m: Metric) -> Option<f64> {
        self.get(s)?.stat(m).map(|x| x.median)
    }

    /// The peer with the best median for `m`.
    fn best_peer(&self, m: Metric) -> Option<(Scenario, f64)> {
        self.results
            .iter()
            .filter(|r| r.scenario.is_peer())
            .filter_map(|r| Some((r.scenario, r.stat(m)?.median)))
            .reduce(|a, b| {
                let b_better = if m.higher_is_better() {
                    b.1 > a.1
                } else {
                    b.1 < a.1
                };
                if b_better {
                    b
                } else {
                    a
                }
            })
    }

    /// "0.70x" for rates; "+46 µs" added over direct for latencies.
    fn versus_direct(&self, s: Scenario, m: Metric) -> String {
        match (self.median(s, m), self.median(Scenario::Direct, m)) {
            (Some(v), Some(d)) if m.higher_is_better() => format!("{:.2}x", v / d),
            (Some(v), Some(d)) => format!("{:+.0} µs", v - d),
            _ => "–".into(),
        }
    }

    /// Ratios and added latency of the mesh against direct and the best peer.
    pub fn ratios(&self) -> String {
        let mesh = Scenario::NodemeshL4;
        let mut t = String::from(
            "| metric | nodemesh-l4 vs direct | best peer vs direct | nodemesh-l4 vs best peer |\n\
             | --- | --- | --- | --- |\n",
        );
        for m in Metric::ALL {
            let Some(v) = self.median(mesh, m) else {
                continue;
            };
            let (peer, vs_peer) = match self.best_peer(m) {
                Some((p, pv)) if m.higher_is_better() => (
                    format!("{} {}", p.name(), self.versus_direct(p, m)),
                    format!("{:.2}x", v / pv),
                ),
                Some((p, pv)) => (
                    format!("{} {}", p.name(), self.versus_direct(p, m)),
                    format!("{:+.0} µs", v - pv),
                ),
                None => ("–".into(), "–".into()),
            };
            let _ = writeln!(
                t,
                "| {} | {} | {peer} | {vs_peer} |",
                m.label(),
                self.versus_direct(mesh, m)
            );
        }
        let l7 =
            |m| Some(self.median(Scenario::NodemeshL7, m)? - self.median(Scenario::NodemeshL4, m)?);
        if let (Some(p50), Some(p99)) = (l7(Metric::HttpP50), l7(Metric::HttpP99)) {
            let _ = writeln!(
                t,
                "\nHTTP routing on the node proxy (nodemesh-l7) adds {p50:+.0} µs p50 and {p99:+.0} µs p99 \
                 per request over nodemesh-l4 at the same fixed rate (goal: ≤ 60 µs p50).",
            );
        }
        let authz = |m| {
            Some(
                self.median(Scenario::NodemeshL7Authz, m)?
                    - self.median(Scenario::NodemeshL4, m)?,
            )
        };
        if let (Some(p50), Some(p99)) = (authz(Metric::HttpP50), authz(Metric::HttpP99)) {
            let _ = writeln!(
                t,
                "\nL7 authorization at the destination (nodemesh-l7-authz) adds {p50:+.0} µs p50 and \
                 {p99:+.0} µs p99 per request over nodemesh-l4 at the same fixed rate (goal: ≤ 40 µs p50).",
            );
        }
        let jwt = |m| {
            Some(self.median(Scenario::NodemeshL7Jwt, m)? - self.median(Scenario::NodemeshL4, m)?)
        };
        if let (Some(p50), Some(p99)) = (jwt(Metric::HttpP50), jwt(Metric::HttpP99)) {
            let _ = writeln!(
                t,
                "\nThe same with a JWT verified per request (nodemesh-l7-jwt) adds {p50:+.0} µs p50 and \
                 {p99:+.0} µs p99 per request over nodemesh-l4 (goal: ≤ 60 µs p50).",
            );
        }
        t
    }

    /// The goals (issue 18), from this same run: rates as ratios to direct, latencies
    /// as µs added, memory and CPU of the agents.
    pub fn goals(&self) -> String {
        let (mesh, l7, direct) = (Scenario::NodemeshL4, Scenario::NodemeshL7, Scenario::Direct);
        let ratio = |m| Some(self.median(mesh, m)? / self.median(direct, m)?);
        let added = |a, b, m| Some(self.median(a, m)? - self.median(b, m)?);
        let cost = self.get(mesh).and_then(|r| r.cost);
        let yes_no = |ok: bool| if ok { "yes" } else { "**no**" };
        let rate = |x: Option<f64>, goal: f64| x.map(|r| (format!("{r:.2}x"), r >= goal));
        let micros = |x: Option<f64>, goal: f64| x.map(|v| (format!("{v:+.0} µs"), v <= goal));
        let rows: [GoalRow; 11] = [
            (
                "single stream vs direct",
                ">= 0.6x",
                rate(ratio(Metric::Stream1), 0.6),
            ),
            (
                "new connections/s vs direct",
                ">= 0.6x",
                rate(ratio(Metric::ConnRate), 0.6),
            ),
            (
                "1 KB round trip, added p50",
                "<= +30 µs",
                micros(added(mesh, direct, Metric::Rtt1kp50), 30.0),
            ),
            (
                "HTTP through an HTTPRoute, added over L4, p50",
                "<= +40 µs",
                micros(added(l7, mesh, Metric::HttpP50), 40.0),
            ),
            (
                "HTTP through an HTTPRoute, added over L4, p99",
                "<= +100 µs",
                micros(added(l7, mesh, Metric::HttpP99), 100.0),
            ),
            (
                "8 streams vs direct",
                ">= 0.45x",
                rate(ratio(Metric::Stream8), 0.45),
            ),
            (
                "agent RSS idle (larger node)",
                "<= 12 MB",
                cost.map(|c| (format!("{:.1} MB", c.rss_idle_mb), c.rss_idle_mb <= 12.0)),
            ),
            (
                "agent RSS after load (larger node)",
                "<= idle + 5 MB",
                cost.map(|c| {
                    (
                        format!("{:.1} MB", c.rss_after_mb),
                        c.rss_after_mb <= c.rss_idle_mb + 5.0,
                    )
                }),
            ),
            (
                "CPU per GB moved, both nodes",
                "<= 1.5 s",
                cost.map(|c| (format!("{:.2} s", c.cpu_s_per_gb), c.cpu_s_per_gb <= 1.5)),
            ),
            (
                "memory per held connection, both nodes",
                "<= 12 KB",
                self.get(mesh)
                    .and_then(|r| r.held_kb_per_conn)
                    .map(|(kb, _)| (format!("{kb:.1} KB"), kb <= 12.0)),
            ),
            (
                "CPU at 1,000 req/s through an HTTPRoute, busier node",
                "<= 0.05 vCPU",
                self.get(l7)
                    .and_then(|r| r.vcpu_per_node_at_rate)
                    .map(|v| (format!("{v:.3} vCPU"), v <= 0.05)),
            ),
        ];
        let mut t = String::from("| goal | target | measured | met |\n| --- | --- | --- | --- |\n");
        for (goal, target, got) in rows {
            let (value, met) = match got {
                Some((v, ok)) => (v, yes_no(ok)),
                None => ("–".into(), "–"),
            };
            let _ = writeln!(t, "| {goal} | {target} | {value} | {met} |");
        }
        t
    }

    /// Memory per held connection and CPU at a fixed request rate, per scenario.
    fn scale_table(&self) -> String {
        let mut t = String::from(
            "| scenario | KB per held connection, both nodes (connections held) | vCPU of the busier node at 1,000 HTTP req/s |\n\
             | --- | --- | --- |\n",
        );
        for r in self.results {
            if r.held_kb_per_conn.is_none() && r.vcpu_per_node_at_rate.is_none() {
                continue;
            }
            let held = r
                .held_kb_per_conn
                .map(|(kb, n)| format!("{kb:.1} ({n})"))
                .unwrap_or_else(|| "–".into());
            let vcpu = r
                .vcpu_per_node_at_rate
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(t, "| {} | {held} | {vcpu} |", r.scenario.name());
        }
        t
    }

    fn results_table(&self) -> String {
        let mut t = String::from("| metric |");
        for r in self.results {
            let _ = write!(t, " {} |", r.scenario.name());
        }
        t += "\n| --- |";
        t += &" --- |".repeat(self.results.len());
        t += "\n";
        for m in Metric::ALL {
            let _ = write!(t, "| {} ({}) |", m.label(), m.unit());
            for r in self.results {
                let cell = r
                    .stat(m)
                    .map(|s| fmt_stat(m, s))
                    .unwrap_or_else(|| "–".into());
                let _ = write!(t, " {cell} |");
            }
            t += "\n";
        }
        t
    }

    fn cost_table(&self) -> String {
        let mut t = String::from(
            "| scenario | CPU s per GB moved (both nodes) | RSS idle (MB) | of which private (MB) | RSS under load (MB) | RSS after (MB) | of which private (MB) |\n\
             | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for r in self.results {
            if let Some(c) = r.cost {
                let _ = writeln!(
                    t,
                    "| {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    r.scenario.name(),
                    c.cpu_s_per_gb,
                    c.rss_idle_mb,
                    c.anon_idle_mb,
                    c.rss_load_mb,
                    c.rss_after_mb,
                    c.anon_after_mb
                );
            }
        }
        t
    }

    pub fn markdown(&self) -> String {
        let m = self.machine;
        let mut md = String::new();
        let _ = writeln!(md, "# Nodemesh benchmarks\n");
        let _ = writeln!(
            md,
            "Generated by `cargo xtask bench` on {} in {:.1} minutes; regenerate with the same command \
             (root; it installs iperf3, stunnel4, haproxy and fonts-dejavu-core from Debian's packages \
             when missing). Client pod on node a, server pod on node b of the simulated 2-node cluster \
             (network namespaces joined by veths and bridges). Every figure is the median of {} runs, \
             with the range (min–max) in brackets; the rounds visit every scenario in turn, so drift \
             spreads over all of them. Absolute numbers on a shared machine drift: read the ratios.\n",
            m.date, self.minutes, self.plan.rounds
        );
        let _ = writeln!(md, "## Machine\n");
        let _ = writeln!(md, "- CPU: {} ({} cores online)", m.cpu, m.cores);
        let _ = writeln!(md, "- memory: {}; kernel {}; {}", m.memory, m.kernel, m.os);
        let _ = writeln!(
            md,
            "- load average at start: {}; at the end: {}",
            m.load_start, self.load_end
        );
        let _ = writeln!(md, "- tools: {}\n", m.tools);
        let _ = writeln!(md, "## Scenarios\n\n| scenario | path |\n| --- | --- |");
        for r in self.results {
            let _ = writeln!(
                md,
                "| {} | {} |",
                r.scenario.name(),
                r.scenario.description()
            );
        }
        let _ = writeln!(
            md,
            "\nThroughput: iperf3 ({s} s per run). Round trips: the test app's closed loop on one \
             connection, 1 byte and 1 KB, {rt} each per run. New connections: connect, 1 KB each way, \
             close, one after another, {c} per run. HTTP: open-loop HTTP/1.1 client at a fixed {rate} \
             requests/s for {hs} s on keep-alive connections, latency counted from each request's due time.\n",
            s = self.plan.iperf_seconds,
            rt = self.plan.round_trips,
            c = self.plan.connections,
            rate = self.plan.http_rate,
            hs = self.plan.http_seconds,
        );
        let _ = writeln!(md, "## Results\n\n{}", self.results_table());
        let _ = writeln!(
            md,
            "## Ratios\n\nRates as a fraction of direct; latencies as µs added to direct.\n\n{}",
            self.ratios()
        );
        let _ = writeln!(md, "## Goals\n\n{}", self.goals());
        let _ = writeln!(
            md,
            "## Proxy cost\n\nCPU: user + system time of the proxy processes on both nodes over the iperf3 runs, \
             per GB received by iperf3. RSS: the larger of the two nodes' processes, idle before \
             the first run (and its anonymous, private part: the rest is mostly code pages shared with every \
             process running the same binary), peak during the throughput runs, and 11 s after the last run (the agents return freed memory to the kernel every 10 s).\n\n{}",
            self.cost_table()
        );
        let _ = writeln!(
            md,
            "## Holding connections, carrying a steady rate\n\nMemory: the proxies' RSS on both nodes \
             while {} idle connections are held open through the path (each after one echoed ping), minus \
             their RSS before, per connection held. CPU: user + system time of the busier node's proxy \
             while an open-loop HTTP/1.1 client sends {} requests/s on kept-alive connections for {} s \
             (nodemesh-l7: through the HTTPRoute, parsed and routed per request; the others relay the \
             same requests as bytes). The bench's agents allow 16,384 connections per pod and direction \
             (`--max-connections-per-pod`; the default is 4,096).\n\n{}",
            self.plan.held_connections,
            self.plan.http_rate,
            self.plan.cost_http_seconds,
            self.scale_table()
        );
        let _ = writeln!(
            md,
            "## Charts\n\n![throughput](throughput.png)\n\n![round trips](latency.png)\n\n\
             ![connections and HTTP](connections.png)\n\n![proxy cost](cost.png)\n\n\
             ![holding connections and a steady rate](scale.png)\n"
        );
        let _ = writeln!(
            md,
            "## Where the time goes\n\nSee [profile.md](profile.md) for a profile of the agent on \
             the connection path and the throughput path, and what would close the gaps."
        );
        md
    }
}
