//! The self-contained HTML report of `kvab experiment` (`--html FILE`): the verdict, the run, the
//! assignment check, the comparisons and the plots as inline SVG drawn with `plotters` (no script, no
//! font file, nothing fetched: text in the SVG is left to the browser's fonts).

use std::fmt::Write as _;

use plotters::prelude::*;

use super::report::{per_arm, Report, Samples, Verdict};
use crate::stats::{median_interval, percentile};

const ARM_COLORS: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(230, 115, 0)];
/// Most points drawn of one ECDF: beyond it the curve is sampled evenly (the shape is the same).
const MAX_ECDF_POINTS: usize = 400;

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn color(arm: usize) -> RGBColor {
    ARM_COLORS.get(arm).copied().unwrap_or(BLACK)
}

fn fmt(value: Option<f64>, digits: usize) -> String {
    value.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// The ECDF of a sample as (x, F(x)) steps, at most `MAX_ECDF_POINTS` of them.
fn ecdf(sample: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = sample.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let step = n.div_ceil(MAX_ECDF_POINTS).max(1);
    let mut points: Vec<(f64, f64)> = sorted
        .iter()
        .enumerate()
        .step_by(step)
        .map(|(i, &x)| (x, (i + 1) as f64 / n as f64))
        .collect();
    if let Some(&last) = sorted.last() {
        points.push((last, 1.0));
    }
    points
}

type Draw<'a> = Box<
    dyn FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), String> + 'a,
>;

/// One SVG drawing, or the reason it could not be drawn.
fn svg(width: u32, height: u32, draw: Draw<'_>) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(&root)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

fn ecdf_plot(title: &str, x_label: &str, arms: &[(String, Vec<f64>)]) -> Result<String, String> {
    let all: Vec<f64> = arms.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    let (Some(low), Some(high)) = (percentile(&all, 0.0), percentile(&all, 99.5)) else {
        return Err("no samples".into());
    };
    let high = if high > low { high } else { low + 1.0 };
    let title = title.to_string();
    let x_label = x_label.to_string();
    svg(
        560,
        340,
        Box::new(move |root| {
            let mut chart = ChartBuilder::on(root)
                .caption(title, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(44)
                .build_cartesian_2d(low..high, 0.0..1.0)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc("fraction of requests")
                .draw()
                .map_err(|e| e.to_string())?;
            for (i, (arm, sample)) in arms.iter().enumerate() {
                let points: Vec<(f64, f64)> = ecdf(sample)
                    .into_iter()
                    .map(|(x, y)| (x.min(high), y))
                    .collect();
                let style = color(i).stroke_width(2);
                chart
                    .draw_series(LineSeries::new(points, style))
                    .map_err(|e| e.to_string())?
                    .label(format!("{arm} (n={})", sample.len()))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color(i).stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())
        }),
    )
}

/// (median, interval low, interval high) of one arm's TTFT in one class.
type MedianWithInterval = (f64, f64, f64);
/// A prompt size and, per arm, its TTFT median with interval.
type MedianRow = (f64, Vec<Option<MedianWithInterval>>);

/// TTFT median with its 95 % distribution-free interval against prompt size, per arm (log x axis).
fn median_plot(arms: &[String], rows: &[MedianRow]) -> Result<String, String> {
    let sizes: Vec<f64> = rows.iter().map(|(x, _)| *x).collect();
    let values: Vec<f64> = rows
        .iter()
        .flat_map(|(_, per_arm)| per_arm.iter().flatten().flat_map(|&(_, lo, hi)| [lo, hi]))
        .collect();
    let (Some(&x_min), Some(&x_max)) = (
        sizes.iter().min_by(|a, b| a.total_cmp(b)),
        sizes.iter().max_by(|a, b| a.total_cmp(b)),
    ) else {
        return Err("no class with a prompt size".into());
    };
    let (Some(y_min), Some(y_max)) = (percentile(&values, 0.0), percentile(&values, 100.0)) else {
        return Err("no medians".into());
    };
    let (x_low, x_high) = (x_min / 1.6, x_max * 1.6);
    let pad = ((y_max - y_min) * 0.1).max(1.0);
    let (y_low, y_high) = ((y_min - pad).max(0.0), y_max + pad);
    let arms = arms.to_vec();
    let rows = rows.to_vec();
    svg(
        560,
        340,
        Box::new(move |root| {
            let mut chart = ChartBuilder::on(root)
                .caption(
                    "TTFT median and 95 % interval by prompt size",
                    ("sans-serif", 16),
                )
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d((x_low..x_high).log_scale(), y_low..y_high)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("prompt tokens (log scale)")
                .y_desc("TTFT ms")
                .draw()
                .map_err(|e| e.to_string())?;
            for (i, arm) in arms.iter().enumerate() {
                // Arms side by side at each size, so their bars do not hide each other.
                let offset = if i == 0 { 0.96 } else { 1.04 };
                let points: Vec<(f64, f64, f64, f64)> = rows
                    .iter()
                    .filter_map(|(x, per_arm)| {
                        per_arm
                            .get(i)
                            .copied()
                            .flatten()
                            .map(|(m, lo, hi)| (x * offset, m, lo, hi))
                    })
                    .collect();
                let style = color(i).stroke_width(2);
                chart
                    .draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), style))
                    .map_err(|e| e.to_string())?
                    .label(arm.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color(i).stroke_width(2))
                    });
                chart
                    .draw_series(
                        points
                            .iter()
                            .map(|&(x, _, lo, hi)| PathElement::new(vec![(x, lo), (x, hi)], style)),
                    )
                    .map_err(|e| e.to_string())?;
                chart
                    .draw_series(
                        points
                            .iter()
                            .map(|&(x, m, _, _)| Circle::new((x, m), 3, color(i).filled())),
                    )
                    .map_err(|e| e.to_string())?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())
        }),
    )
}

fn figure(out: &mut String, plot: &str, caption: &str, drawing: Result<String, String>) {
    let _ = write!(
        out,
        "<figure class=\"plot\" data-plot=\"{}\">",
        escape(plot)
    );
    match drawing {
        // The SVG's accessible title is the caption.
        Ok(svg) => {
            out.push_str(&svg.replacen(">", &format!("><title>{}</title>", escape(caption)), 1))
        }
        Err(why) => {
            let _ = write!(out, "<p class=\"empty\">{}</p>", escape(&why));
        }
    }
    let _ = write!(out, "<figcaption>{}</figcaption></figure>", escape(caption));
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}\
.verdict{padding:.6em 1em;border-radius:6px;font-weight:600}\
.decided{background:#e6f4ea}.inconclusive{background:#fff4e0}.invalid{background:#fde7e9}\
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}\
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.primary td{font-weight:600}\
.warn{color:#b00020;font-weight:600}figure{display:inline-block;margin:.5em}\
figcaption{font-size:.85em;color:#555}.empty{color:#777;font-style:italic}";

/// A whole page in the reports' style: title, the verdict line (coloured by the verdict), then `body`.
pub fn page(title: &str, verdict_line: &str, verdict: Verdict, body: &str) -> String {
    let verdict_class = verdict.word();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>{STYLE}</style></head><body><h1>{title}</h1>\
         <p class=\"verdict {verdict_class}\">verdict: {verdict}</p>{body}</body></html>\n",
        title = escape(title),
        verdict = escape(verdict_line),
    )
}

pub fn render(report: &Report, samples: &Samples) -> String {
    let mut out = String::with_capacity(64 * 1024);
    out.push_str("<ul>");
    let run = &report.run;
    let load = match (run.concurrency, run.rate) {
        (Some(c), _) => format!("closed loop, {c} in flight"),
        (_, Some(r)) => format!("open loop, Poisson arrivals at {r}/s"),
        _ => run.load.to_string(),
    };
    let m = &report.method;
    for item in
        [
            format!(
            "{} {}, {}; {} requests sent ({} warm-up) in {:.1} s ({:.1}/s), stopped by {}; seed {}",
            run.endpoint,
            if run.stream { "streamed" } else { "not streamed" },
            load,
            run.sent,
            run.warmup,
            run.duration_s,
            run.achieved_rate,
            run.stopped_by,
            run.seed
        ),
            format!(
                "α = {}, min effect {:.1} %, until {}: {} of {} look(s), each at {:.4}",
                m.alpha,
                100.0 * m.min_effect,
                m.until,
                m.looks_made,
                m.looks,
                m.look_alpha
            ),
            format!("method: {}", m.description),
        ]
    {
        let _ = write!(out, "<li>{}</li>", escape(&item));
    }
    out.push_str("</ul>");

    let a = &report.assignment;
    let _ = write!(
        out,
        "<h2>Assignment</h2><p{}>planned {}; answered {}; misrouted {}; untagged {}; sample ratio p = {} ({})</p>",
        if a.srm_ok { "" } else { " class=\"warn\"" },
        escape(&per_arm(&a.planned)),
        escape(&per_arm(&a.answered)),
        a.misrouted,
        a.untagged,
        a.srm_p.map_or("–".into(), crate::stats::format_p),
        if a.srm_ok { "ok" } else { "MISMATCH: the routing does not follow the assignment" }
    );
    out.push_str("<h2>Errors</h2><table><tr><th class=\"l\">class</th>");
    for arm in &report.arms {
        let _ = write!(out, "<th>{}</th>", escape(arm));
    }
    out.push_str("<th>p</th><th class=\"l\">codes</th></tr>");
    for e in &report.errors {
        let _ = write!(out, "<tr><td class=\"l\">{}</td>", escape(&e.class));
        for arm in &report.arms {
            let c = e.arms.get(arm).cloned().unwrap_or_default();
            let _ = write!(
                out,
                "<td>{}/{} ({:.1} %)</td>",
                c.errors,
                c.requests,
                100.0 * c.rate
            );
        }
        let codes: Vec<String> = e
            .codes
            .iter()
            .flat_map(|(arm, codes)| {
                codes
                    .iter()
                    .map(move |(code, n)| format!("{arm}: {code} ×{n}"))
            })
            .collect();
        let _ = write!(
            out,
            "<td>{}</td><td class=\"l\">{}</td></tr>",
            e.p.map_or("–".into(), crate::stats::format_p),
            escape(&codes.join("; "))
        );
    }
    out.push_str("</table>");

    out.push_str(
        "<h2>Comparisons</h2><table><tr><th class=\"l\">metric</th><th class=\"l\">class</th>",
    );
    for arm in &report.arms {
        let _ = write!(
            out,
            "<th>n {0}</th><th>p50/p90/p99 {0} (ms)</th>",
            escape(arm)
        );
    }
    out.push_str(
        "<th>shift ms (second − first)</th><th>interval</th><th>relative</th><th>p</th><th>p adjusted</th>\
         <th class=\"l\">decision</th></tr>",
    );
    for c in &report.comparisons {
        let _ = write!(
            out,
            "<tr{}><td class=\"l\">{}{}</td><td class=\"l\">{}</td>",
            if c.primary { " class=\"primary\"" } else { "" },
            c.metric.name(),
            if c.primary { " (primary)" } else { "" },
            escape(&c.class)
        );
        for arm in &report.arms {
            let p = |map: &std::collections::BTreeMap<String, f64>| fmt(map.get(arm).copied(), 1);
            let _ = write!(
                out,
                "<td>{}</td><td>{} / {} / {}</td>",
                c.n.get(arm).copied().unwrap_or(0),
                p(&c.p50),
                p(&c.p90),
                p(&c.p99)
            );
        }
        let decision = c.decision_text();
        let _ =
            write!(
            out,
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td></tr>",
            fmt(c.shift_ms, 2),
            c.ci_ms.map_or("–".into(), |[lo, hi]| format!("[{lo:.2}, {hi:.2}]")),
            c.relative.map_or("–".into(), |r| format!("{:+.1} %", 100.0 * r)),
            c.p.map_or("–".into(), crate::stats::format_p),
            c.p_adjusted.map_or("–".into(), crate::stats::format_p),
            escape(&decision)
        );
    }
    out.push_str("</table>");

    out.push_str("<h2>Time to first token</h2>");
    for class in &samples.classes {
        // Without streaming there is no first token: the primary metric is the end-to-end time.
        let streamed = class.arms.iter().any(|a| !a.ttft_ms.is_empty());
        let (metric, pick): (&str, fn(&super::report::ArmSamples) -> &Vec<f64>) = if streamed {
            ("TTFT", |a| &a.ttft_ms)
        } else {
            ("End-to-end time", |a| &a.e2e_ms)
        };
        let arms: Vec<(String, Vec<f64>)> = class
            .arms
            .iter()
            .map(|a| (a.arm.clone(), pick(a).clone()))
            .collect();
        let caption = format!("{metric} ECDF per arm, class {}", class.label);
        figure(
            &mut out,
            "ttft-ecdf",
            &caption,
            ecdf_plot(&caption, &format!("{metric} ms"), &arms),
        );
    }
    let rows: Vec<MedianRow> = samples
        .classes
        .iter()
        .filter_map(|class| {
            let x = class.prompt_tokens.filter(|x| *x > 0.0)?;
            let per_arm = class
                .arms
                .iter()
                .map(|a| {
                    let median = percentile(&a.ttft_ms, 50.0)?;
                    let (lo, hi) = median_interval(&a.ttft_ms, 0.05)?;
                    Some((median, lo, hi))
                })
                .collect();
            Some((x, per_arm))
        })
        .collect();
    figure(
        &mut out,
        "ttft-vs-prompt",
        "TTFT median with its 95 % distribution-free interval against prompt size, per arm",
        median_plot(&report.arms, &rows),
    );
    out.push_str("<h2>Inter-token latency</h2>");
    let itl: Vec<(String, Vec<f64>)> = report
        .arms
        .iter()
        .enumerate()
        .map(|(i, arm)| {
            let gaps = samples
                .classes
                .iter()
                .flat_map(|c| c.arms.get(i))
                .flat_map(|a| a.itl_ms.iter().copied());
            (arm.clone(), gaps.collect())
        })
        .collect();
    let caption = "ITL ECDF per arm: every gap between content events, all classes (x axis to the 99.5th percentile)";
    figure(
        &mut out,
        "itl",
        caption,
        ecdf_plot("ITL ECDF per arm", "gap between tokens, ms", &itl),
    );
    page(
        &format!("kvab experiment: {}", report.arms.join(" vs ")),
        &report.verdict_line(),
        report.verdict,
        &out,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::experiment::report::*;

    fn report(label: &str) -> Report {
        let arms = vec!["nvlink".to_string(), "fs".to_string()];
        let per_arm =
            |a: f64, b: f64| BTreeMap::from([("nvlink".to_string(), a), ("fs".to_string(), b)]);
        Report {
            verdict: Verdict::Decided,
            reasons: vec![format!("ttft_ms {label}: nvlink faster by 30.0%")],
            arms,
            classes: vec![],
            assignment: Assignment {
                planned: BTreeMap::from([("nvlink".into(), 10), ("fs".into(), 10)]),
                answered: BTreeMap::from([("nvlink".into(), 10), ("fs".into(), 10)]),
                misrouted: 0,
                untagged: 0,
                srm_p: Some(1.0),
                srm_ok: true,
            },
            errors: vec![],
            comparisons: vec![Comparison {
                metric: Metric::Ttft,
                class: label.into(),
                primary: true,
                n: BTreeMap::from([("nvlink".into(), 10), ("fs".into(), 10)]),
                p50: per_arm(100.0, 130.0),
                p90: per_arm(110.0, 140.0),
                p99: per_arm(120.0, 150.0),
                shift_ms: Some(30.0),
                ci_ms: Some([28.0, 32.0]),
                ci_level_alpha: 0.05,
                relative: Some(0.3),
                relative_ci: Some([0.28, 0.32]),
                p: Some(1e-6),
                p_adjusted: Some(4e-6),
                decision: Decision::Faster,
                faster: Some("nvlink".into()),
                more_requests: None,
            }],
            method: Method {
                alpha: 0.05,
                min_effect: 0.05,
                until: "budget",
                looks: 1,
                looks_made: 1,
                look_alpha: 0.05,
                srm_threshold: 0.001,
                description: "m",
            },
            run: Run {
                endpoint: "/v1/chat/completions".into(),
                stream: true,
                load: "closed",
                concurrency: Some(8),
                rate: None,
                seed: 1,
                warmup: 0,
                sent: 20,
                duration_s: 1.0,
                achieved_rate: 20.0,
                stopped_by: "requests",
            },
        }
    }

    fn samples(label: &str) -> Samples {
        let arm = |name: &str, base: f64| ArmSamples {
            arm: name.into(),
            ttft_ms: (0..50).map(|i| base + f64::from(i % 7)).collect(),
            itl_ms: (0..200).map(|i| 2.0 + f64::from(i % 5) * 0.1).collect(),
            e2e_ms: vec![],
        };
        Samples {
            classes: vec![
                ClassSamples {
                    label: label.into(),
                    prompt_tokens: Some(128.0),
                    arms: vec![arm("nvlink", 30.0), arm("fs", 31.0)],
                },
                ClassSamples {
                    label: "8192".into(),
                    prompt_tokens: Some(8192.0),
                    arms: vec![arm("nvlink", 120.0), arm("fs", 155.0)],
                },
            ],
        }
    }

    #[test]
    fn the_report_has_its_three_plots_and_fetches_nothing() {
        let html = render(&report("128"), &samples("128"));
        for plot in ["ttft-ecdf", "ttft-vs-prompt", "itl"] {
            assert!(html.contains(&format!("data-plot=\"{plot}\"")), "{plot}");
        }
        assert_eq!(html.matches("data-plot=\"ttft-ecdf\"").count(), 2);
        assert!(html.matches("<svg").count() >= 4);
        assert!(
            html.contains("<polyline") || html.contains("<path"),
            "no lines drawn"
        );
        assert!(html.contains("nvlink faster"));
        // Nothing to fetch: no script, stylesheet, image or link to another document. (SVG's xmlns
        // URI is a name, not a fetch.)
        let without_xmlns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        for fetch in ["http://", "https://", "<script", "<link", "<img", "url("] {
            assert!(!without_xmlns.contains(fetch), "{fetch}");
        }
    }

    #[test]
    fn names_from_users_are_escaped_and_empty_samples_say_so() {
        let html = render(&report("<b>&\""), &samples("<b>&\""));
        assert!(!html.contains("<b>&\""));
        assert!(html.contains("&lt;b&gt;&amp;&quot;"));
        let empty = render(&report("x"), &Samples::default());
        assert!(empty.contains("no samples") && empty.contains("no class with a prompt size"));
        let no_ttft = Samples {
            classes: vec![ClassSamples {
                label: "a".into(),
                prompt_tokens: Some(1.0),
                arms: vec![ArmSamples {
                    arm: "nvlink".into(),
                    ..ArmSamples::default()
                }],
            }],
        };
        assert!(render(&report("x"), &no_ttft).contains("no samples"));
    }
}
