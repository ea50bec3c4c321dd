//! PNG bar charts (plotters, bitmap backend, DejaVu Sans through ab_glyph: no system
//! font libraries needed). Bars are medians, whiskers the min–max of the runs.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::{
    coord::ranged1d::SegmentValue,
    prelude::*,
    style::{register_font, FontStyle},
};

use super::{
    machine::FONT,
    measure::{Metric, ScenarioResults, Stat},
};

struct Panel {
    title: String,
    unit: &'static str,
    bars: Vec<(&'static str, usize, Stat)>,
}

fn metric_panel(results: &[ScenarioResults], m: Metric) -> Panel {
    Panel {
        title: m.label().to_string(),
        unit: m.unit(),
        bars: results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((r.scenario.name(), i, r.stat(m)?)))
            .collect(),
    }
}

fn cost_panel(
    results: &[ScenarioResults],
    title: &str,
    unit: &'static str,
    f: impl Fn(&super::measure::ProxyCost) -> f64,
) -> Panel {
    figure_panel(results, title, unit, |r| Some(f(r.cost.as_ref()?)))
}

/// A panel of one figure measured once per scenario (no range): the scenarios that
/// have it.
fn figure_panel(
    results: &[ScenarioResults],
    title: &str,
    unit: &'static str,
    f: impl Fn(&ScenarioResults) -> Option<f64>,
) -> Panel {
    Panel {
        title: title.to_string(),
        unit,
        bars: results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let v = f(r)?;
                Some((
                    r.scenario.name(),
                    i,
                    Stat {
                        median: v,
                        min: v,
                        max: v,
                        runs: 1,
                    },
                ))
            })
            .collect(),
    }
}

fn load_font() -> Result<()> {
    let bytes = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (apt-get install fonts-dejavu-core)"))?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))
}

/// Draws the panels that have bars side by side; writes nothing when none has (a run of
/// scenarios that measure none of these figures), since a chart of no bars is no chart.
fn draw(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    let panels: Vec<&Panel> = panels.iter().filter(|p| !p.bars.is_empty()).collect();
    if panels.is_empty() {
        return Ok(());
    }
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    // Room under each bar for its scenario's name (names up to 17 letters).
    let most_bars = panels.iter().map(|p| p.bars.len()).max().unwrap_or(0) as u32;
    let panel_width = 400.max(120 * most_bars);
    // And room for the title (22 px type: about 11 px a letter).
    let width = (panel_width * panels.len() as u32).max(11 * title.len() as u32 + 40);
    let root = BitMapBackend::new(path, (width, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    for (area, p) in root.split_evenly((1, panels.len())).iter().zip(&panels) {
        let names: Vec<&str> = p.bars.iter().map(|b| b.0).collect();
        let top = p.bars.iter().map(|b| b.2.max).fold(0.0, f64::max).max(1e-9) * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(55)
            // A segmented a..b range has a slot for b as well: stop one short.
            .build_cartesian_2d((0..names.len().max(2) - 1).into_segmented(), 0f64..top)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(names.len())
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    names.get(*i).copied().unwrap_or("").to_string()
                }
                SegmentValue::Last => String::new(),
            })
            .y_label_formatter(&|y| {
                if top > 10.0 {
                    format!("{y:.0}")
                } else if top > 1.0 {
                    format!("{y:.1}")
                } else {
                    format!("{y:.2}")
                }
            })
            .y_desc(p.unit)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
        let colour = |slot: usize| Palette99::pick(slot).to_rgba();
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .margin(12)
                    .style_func(|x, _| match x {
                        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                            colour(p.bars.get(*i).map(|b| b.1).unwrap_or(0)).filled()
                        }
                        SegmentValue::Last => BLACK.filled(),
                    })
                    .data(p.bars.iter().enumerate().map(|(i, b)| (i, b.2.median))),
            )
            .map_err(|e| err(&e))?;
        chart
            .draw_series(p.bars.iter().enumerate().map(|(i, b)| {
                PathElement::new(
                    vec![
                        (SegmentValue::CenterOf(i), b.2.min),
                        (SegmentValue::CenterOf(i), b.2.max),
                    ],
                    BLACK.stroke_width(2),
                )
            }))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(p.bars.iter().enumerate().map(|(i, b)| {
                let text = if b.2.median >= 100.0 {
                    format!("{:.0}", b.2.median)
                } else {
                    format!("{:.2}", b.2.median)
                };
                Text::new(
                    text,
                    (SegmentValue::Exact(i), b.2.max + top * 0.06),
                    ("sans-serif", 12),
                )
            }))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// Writes throughput.png, latency.png, connections.png, cost.png and scale.png into
/// `dir` (each only when the run measured a figure of it).
pub fn write(dir: &Path, results: &[ScenarioResults]) -> Result<()> {
    load_font()?;
    let m = |metrics: &[Metric]| -> Vec<Panel> {
        metrics.iter().map(|&x| metric_panel(results, x)).collect()
    };
    draw(
        &dir.join("throughput.png"),
        "Throughput (iperf3), higher is better",
        &m(&[Metric::Stream1, Metric::Stream8]),
    )?;
    draw(
        &dir.join("latency.png"),
        "Round-trip time, closed loop, lower is better",
        &m(&[
            Metric::Rtt1p50,
            Metric::Rtt1p99,
            Metric::Rtt1kp50,
            Metric::Rtt1kp99,
        ]),
    )?;
    draw(
        &dir.join("connections.png"),
        "New connections (higher is better) and HTTP at 1,000 rps (lower is better)",
        &m(&[Metric::ConnRate, Metric::HttpP50, Metric::HttpP99]),
    )?;
    draw(
        &dir.join("cost.png"),
        "Proxy cost, lower is better",
        &[
            cost_panel(
                results,
                "CPU per GB moved (both nodes)",
                "CPU s / GB",
                |c| c.cpu_s_per_gb,
            ),
            cost_panel(results, "RSS idle (larger node)", "MB", |c| c.rss_idle_mb),
            cost_panel(results, "RSS under load (larger node)", "MB", |c| {
                c.rss_load_mb
            }),
        ],
    )?;
    draw(
        &dir.join("scale.png"),
        "Holding connections and carrying a steady rate, lower is better",
        &[
            figure_panel(
                results,
                "Memory per held connection (both nodes)",
                "KB",
                |r| r.held_kb_per_conn.map(|(kb, _)| kb),
            ),
            figure_panel(
                results,
                "CPU at 1,000 HTTP req/s (busier node)",
                "vCPU",
                |r| r.vcpu_per_node_at_rate,
            ),
        ],
    )
}
