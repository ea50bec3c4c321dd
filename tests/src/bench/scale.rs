//! What the proxies pay to hold connections and to carry a steady request rate:
//! memory per connection with [`Plan::held_connections`] idle connections held open
//! through the path (one echoed ping each, then nothing), and CPU at a fixed 1,000
//! HTTP requests/s on kept-alive connections for [`Plan::cost_http_seconds`].

use std::{
    sync::atomic::AtomicBool,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{
    measure::{check, clock_ticks, cpu_ticks_of, http_load, rss_kb, Plan, ScenarioResults},
    scenarios::{App, Bed},
};
use crate::conn_flood::FloodMode;

/// Measures both figures for every scenario with proxies; a scenario whose
/// measurement fails gets none (and says why), the others go on.
pub fn run(
    bed: &Bed,
    results: &mut [ScenarioResults],
    plan: Plan,
    stop: &AtomicBool,
) -> Result<()> {
    for r in results.iter_mut() {
        if bed.proxy_pids(r.scenario).is_empty() {
            continue;
        }
        check(stop)?;
        if !r.scenario.http_only() && plan.held_connections > 0 {
            match held(bed, r, plan) {
                Ok((kb, held)) => {
                    println!(
                        "    {:<18} {kb:.1} KB per held connection ({held} held)",
                        r.scenario.name()
                    );
                    r.held_kb_per_conn = Some((kb, held));
                }
                Err(e) => println!("    {:<18} held connections: {e:#}", r.scenario.name()),
            }
        }
        check(stop)?;
        if plan.cost_http_seconds == 0 {
            continue;
        }
        match cpu_at_rate(bed, r, plan) {
            Ok(vcpu) => {
                println!(
                    "    {:<18} {vcpu:.3} vCPU (busier node) at {} HTTP req/s",
                    r.scenario.name(),
                    plan.http_rate
                );
                r.vcpu_per_node_at_rate = Some(vcpu);
            }
            Err(e) => println!("    {:<18} CPU at a fixed rate: {e:#}", r.scenario.name()),
        }
    }
    Ok(())
}

/// RSS growth of the proxies (both nodes) per connection held, in KB, and how many
/// were held.
fn held(bed: &Bed, r: &ScenarioResults, plan: Plan) -> Result<(f64, u64)> {
    let s = r.scenario;
    let pids = bed.proxy_pids(s);
    let placement = bed.cluster.pod(s.client_pod()).placement();
    let before = rss_kb(&pids);
    let flood = bed.cluster.flood_from(
        &placement,
        bed.target(s, App::Echo),
        plan.held_connections as usize,
        FloodMode::Echo,
        120,
    )?;
    let opened = flood.opened.echo_ok;
    if opened < plan.held_connections / 2 {
        let why = flood.opened.first_error.clone();
        flood.stop();
        bail!("only {opened} connections held ({why:?})");
    }
    // Let the proxies' buffers and tasks settle.
    thread::sleep(Duration::from_secs(2));
    let holding = rss_kb(&pids);
    flood.stop();
    // The connections close before the next measurement.
    thread::sleep(Duration::from_secs(2));
    Ok((
        holding.saturating_sub(before) as f64 / opened as f64,
        opened,
    ))
}

/// The busier node's CPU (vCPU) while the scenario carries `plan.http_rate` requests/s.
fn cpu_at_rate(bed: &Bed, r: &ScenarioResults, plan: Plan) -> Result<f64> {
    let s = r.scenario;
    let pids = bed.proxy_pids(s);
    let placement = bed.cluster.pod(s.client_pod()).placement();
    let plan = Plan {
        http_seconds: plan.cost_http_seconds,
        ..plan
    };
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks_of(p)).collect();
    let started = Instant::now();
    http_load(bed, &placement, s, bed.target(s, App::Http), plan)?;
    let secs = started.elapsed().as_secs_f64();
    let busiest = pids
        .iter()
        .zip(&before)
        .map(|(&p, &b)| cpu_ticks_of(p).saturating_sub(b))
        .max()
        .unwrap_or(0);
    Ok(busiest as f64 / clock_ticks() / secs)
}
