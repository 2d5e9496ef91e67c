//! A load sweep's "where" in the experiment's report: the grid of decisions (class × load level, each
//! cell's effect and its interval) and per arm the latency-versus-load curve with its knee and goodput, as
//! table text and as HTML (with one median-against-load plot per class).

use std::fmt::Write as _;

use super::experiment::{Report, Samples};
use super::html::{escape, figure};
use super::plots::{finite, median_plot, MedianRow, CONCURRENCY_AXIS, MEDIAN_ALPHA, RATE_AXIS};
use crate::comparison::{Comparison, Decision};
use crate::stats::{median_interval, percentile};
use crate::sweep::Sweep;

/// The workload classes of the grid's rows, in report order, and per row the index of each level's cell
/// (`report.classes`).
fn rows(report: &Report, levels: usize) -> Vec<(String, Vec<Option<usize>>)> {
    let mut rows: Vec<(String, Vec<Option<usize>>)> = Vec::new();
    for (index, class) in report.classes.iter().enumerate() {
        let (Some(name), Some(level)) = (&class.class, class.level) else {
            continue;
        };
        let row = match rows.iter().position(|(n, _)| n == name) {
            Some(row) => row,
            None => {
                rows.push((name.clone(), vec![None; levels]));
                rows.len() - 1
            }
        };
        if let Some(cell) = rows
            .get_mut(row)
            .and_then(|(_, cells)| cells.get_mut(level))
        {
            *cell = Some(index);
        }
    }
    rows
}

/// The primary comparison of the cell `class` (its label).
fn primary<'a>(report: &'a Report, label: &str) -> Option<&'a Comparison> {
    report
        .comparisons
        .iter()
        .find(|c| c.primary && c.class.as_deref() == Some(label))
}

/// `×1.318 [1.280, 1.360] fs faster`: one cell as the text grid shows it.
fn cell_text(c: &Comparison) -> String {
    format!(
        "{} {} {}",
        c.ratio_text(),
        c.ratio_ci_text(),
        c.decision_text()
    )
}

fn knee_text(sweep: &Sweep, knee: Option<usize>) -> String {
    match knee.and_then(|k| sweep.levels.get(k)) {
        Some(level) => format!("at {}", level.label()),
        None => "not reached".into(),
    }
}

/// `load sweep, closed loop: c=1, c=8, c=32 (each with its warm-up and requests)`.
pub fn levels_text(sweep: &Sweep) -> String {
    let kind = match sweep.levels.first().map(|l| l.load) {
        Some("open") => "open loop (Poisson arrivals)",
        _ => "closed loop",
    };
    let labels: Vec<String> = sweep.levels.iter().map(|l| l.label()).collect();
    format!(
        "load sweep, {kind}: {} (each level with its own warm-up and requests)",
        labels.join(", ")
    )
}

fn ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.1}"))
}

/// The sweep's lines of the table printed without `--json`.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let Some(sweep) = &report.sweep else {
        return out;
    };
    let [first, second, ..] = report.arms.as_slice() else {
        return out;
    };
    let _ = writeln!(
        out,
        "{}\nwhere ({second}/{first}, primary metric, ratio [interval] decision):",
        levels_text(sweep)
    );
    for (name, cells) in rows(report, sweep.levels.len()) {
        for (level, cell) in sweep.levels.iter().zip(cells) {
            let label = cell
                .and_then(|i| report.classes.get(i))
                .map(|c| c.label.as_str());
            let shown = label
                .and_then(|l| primary(report, l))
                .map_or("-".into(), cell_text);
            let _ = writeln!(out, "  {name:<10} {:<8} {shown}", level.label());
        }
    }
    let _ = writeln!(out, "load curves (knee: {}):", sweep.knee_rule);
    for curve in &sweep.curves {
        let class = curve
            .class
            .as_deref()
            .map_or(String::new(), |c| format!(", class {c}"));
        let _ = writeln!(
            out,
            "  {}{class}: knee {}",
            curve.arm,
            knee_text(sweep, curve.knee)
        );
        for (level, p) in sweep.levels.iter().zip(&curve.points) {
            let goodput = p
                .goodput
                .map_or(String::new(), |g| format!(", goodput {g:.2}/s"));
            let _ = writeln!(
                out,
                "    {:<8} p50 {} ms, p90 {} ms, {:.2}/s, {:.1} in flight, {}/{} answered{goodput}",
                level.label(),
                ms(p.p50_ms),
                ms(p.p90_ms),
                p.throughput,
                p.in_flight,
                p.answered,
                p.requests
            );
        }
    }
    out
}

/// The sweep's section of the HTML report: the grid, the curves' table and a plot per class.
pub fn html(out: &mut String, report: &Report, samples: &Samples) {
    let Some(sweep) = &report.sweep else {
        return;
    };
    let [first, second, ..] = report.arms.as_slice() else {
        return;
    };
    let _ = write!(
        out,
        "<h2>Where</h2><p>The primary metric's ratio {} / {} in each cell, with its interval and decision \
         (one family: Holm across every cell).</p><table class=\"grid\"><tr><th class=\"l\">class</th>",
        escape(second),
        escape(first)
    );
    for level in &sweep.levels {
        let _ = write!(out, "<th>{}</th>", escape(&level.label()));
    }
    out.push_str("</tr>");
    let rows = rows(report, sweep.levels.len());
    for (name, cells) in &rows {
        let _ = write!(out, "<tr><td class=\"l\">{}</td>", escape(name));
        for cell in cells {
            let label = cell
                .and_then(|i| report.classes.get(i))
                .map(|c| c.label.as_str());
            match label.and_then(|l| primary(report, l)) {
                Some(c) => {
                    let tone = match c.decision {
                        Decision::Faster => "decided",
                        Decision::Equivalent => "equivalent",
                        Decision::Inconclusive => "inconclusive",
                    };
                    let _ = write!(
                        out,
                        "<td class=\"{tone}\">{} <small>{}</small><br>{}</td>",
                        escape(&c.ratio_text()),
                        escape(&c.ratio_ci_text()),
                        escape(&c.decision_text())
                    );
                }
                None => out.push_str("<td>–</td>"),
            }
        }
        out.push_str("</tr>");
    }
    let _ = write!(
        out,
        "</table><h2>Load curves</h2><p>Knee: {}.</p><table><tr><th class=\"l\">arm</th>\
         <th class=\"l\">class</th><th class=\"l\">level</th><th>requests</th><th>answered</th><th>per second</th><th>in flight</th>\
         <th>p50 ms</th><th>p90 ms</th>{}</tr>",
        escape(&sweep.knee_rule),
        if sweep.slo.is_some() { "<th>within SLO</th><th>goodput /s</th>" } else { "" }
    );
    for curve in &sweep.curves {
        for (level, (p, facts)) in curve.points.iter().zip(&sweep.levels).enumerate() {
            let knee = if curve.knee == Some(level) {
                " (knee)"
            } else {
                ""
            };
            let _ = write!(
                out,
                "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}{knee}</td><td>{}</td>\
                 <td>{}</td><td>{:.2}</td><td>{:.1}</td><td>{}</td><td>{}</td>",
                escape(&curve.arm),
                escape(curve.class.as_deref().unwrap_or("all")),
                escape(&facts.label()),
                p.requests,
                p.answered,
                p.throughput,
                p.in_flight,
                ms(p.p50_ms),
                ms(p.p90_ms)
            );
            if let (Some(met), Some(goodput)) = (p.slo_met, p.goodput) {
                let _ = write!(out, "<td>{met}</td><td>{goodput:.2}</td>");
            }
            out.push_str("</tr>");
        }
    }
    out.push_str("</table>");
    let metric = if report.run.stream {
        "TTFT"
    } else {
        "End-to-end time"
    };
    for (name, cells) in &rows {
        let plotted: Vec<MedianRow> = cells
            .iter()
            .zip(&sweep.levels)
            .filter_map(|(cell, level)| {
                let class = samples.classes.get((*cell)?)?;
                // The x axis: requests in flight (closed loop) or per second (open loop).
                let x = level.concurrency.map(f64::from).or(level.rate)?;
                let per_arm = class
                    .arms
                    .iter()
                    .map(|a| {
                        let sample = finite(if report.run.stream {
                            &a.ttft_ms
                        } else {
                            &a.e2e_ms
                        });
                        let median = percentile(&sample, 50.0)?;
                        let (lo, hi) = median_interval(&sample, MEDIAN_ALPHA)?;
                        Some((median, lo, hi))
                    })
                    .collect();
                Some((x, per_arm))
            })
            .collect();
        let axis = match sweep.levels.first().and_then(|l| l.rate) {
            Some(_) => &RATE_AXIS,
            None => &CONCURRENCY_AXIS,
        };
        figure(
            out,
            "load-curve",
            &format!(
                "{metric} median with its {:.0} % interval against load, per arm, class {name}",
                100.0 * (1.0 - MEDIAN_ALPHA)
            ),
            median_plot(metric, &report.arms, &plotted, axis),
        );
    }
}
