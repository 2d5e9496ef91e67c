//! A load sweep's "where" in the experiment's HTML report: the grid of decisions (class × load level, each
//! cell's effect and its interval) and per arm the latency-versus-load curve with its knee and goodput,
//! with one median-against-load plot per class (the table's text of them: `Report::sweep_text`).

use std::fmt::Write as _;

use super::experiment::{ms_text, ArmSamples, Report, Samples};
use super::page::{escape, figure};
use super::plots::{median_plot, medians, MedianRow, CONCURRENCY_AXIS, MEDIAN_ALPHA, RATE_AXIS};
use crate::comparison::Decision;

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
    let rows = report.grid_rows();
    for (name, cells) in &rows {
        let _ = write!(out, "<tr><td class=\"l\">{}</td>", escape(name));
        for cell in cells {
            let label = cell
                .and_then(|i| report.classes.get(i))
                .map(|c| c.label.as_str());
            match label.and_then(|l| report.primary_of(l)) {
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
                ms_text(p.p50_ms),
                ms_text(p.p90_ms)
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
                let pick: fn(&ArmSamples) -> &Vec<f64> = if report.run.stream {
                    |a| &a.ttft_ms
                } else {
                    |a| &a.e2e_ms
                };
                Some((x, medians(&class.arms, pick)))
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
