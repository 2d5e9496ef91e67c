//! The self-contained HTML report of `kvab experiment` (`--html FILE`): the verdict, the run, the
//! assignment check, the error rates, the comparisons and the plots as inline SVG drawn with `plotters`
//! (no script, no font file, nothing fetched: text in the SVG is left to the browser's fonts, and its
//! layout is `plotters`' estimate without font metrics).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::experiment::{ArmSamples, Report, Samples};
pub use super::page::{escape, figure, page};
use super::plots::{ecdf_plot, median_plot, medians, MedianRow, MEDIAN_ALPHA, PROMPT_AXIS};
use crate::stats::format_p;
use crate::verdict::per_arm;

fn fmt(value: Option<f64>, digits: usize) -> String {
    value.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn run_facts(out: &mut String, report: &Report) {
    let run = &report.run;
    let load = match (run.concurrency, run.rate, &report.sweep) {
        (_, _, Some(sweep)) => sweep.levels_text(),
        (Some(c), _, _) => format!("closed loop, {c} in flight"),
        (_, Some(r), _) => format!("open loop, Poisson arrivals at {r}/s"),
        _ => run.load.to_string(),
    };
    let m = &report.method;
    let arms = match report.arms.as_slice() {
        [first, second] => format!(
            "arms: {first} (first), {second} (second); shifts are {second} − {first}: positive when {first} is faster"
        ),
        arms => format!("arms: {}", arms.join(", ")),
    };
    let items = [
        arms,
        format!(
            "{} {}, {}; {} requests sent ({} warm-up) in {:.1} s ({:.1}/s measured), stopped by {}; seed {}",
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
            "α = {}, min effect {:.1} %, until {}: {} of {} look(s){}, the last at α = {:.4}",
            m.alpha,
            100.0 * m.min_effect,
            m.until,
            m.looks_made,
            m.looks,
            m.boundary_note(),
            m.look_alpha
        ),
        format!("method: {}", m.description),
        format!("workload: {}", report.workload.text()),
    ];
    let judged = run
        .judged_from
        .as_ref()
        .map(|file| format!("judged from the records in {file} (no traffic sent)"));
    let reuse = report.workload.reuse_lines().into_iter();
    out.push_str("<ul>");
    for item in items
        .into_iter()
        .chain(reuse.map(|line| format!("reuse by construction, {line}")))
        .chain(judged)
    {
        let _ = write!(out, "<li>{}</li>", escape(&item));
    }
    out.push_str("</ul>");
}

fn classes(out: &mut String, report: &Report) {
    out.push_str(
        "<h2>Classes</h2><table><tr><th class=\"l\">class</th><th>prompt tokens asked</th>\
         <th>prompt tokens measured (mean)</th><th>measured requests</th></tr>",
    );
    for c in &report.classes {
        let _ = write!(
            out,
            "<tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.label),
            c.prompt_tokens.map_or("–".into(), |t| t.to_string()),
            fmt(c.measured_prompt_tokens, 1),
            c.requests
        );
    }
    out.push_str("</table>");
}

fn assignment(out: &mut String, report: &Report) {
    let a = &report.assignment;
    let _ = write!(
        out,
        "<h2>Assignment</h2><p class=\"{}\">planned {}; reached {}; answered {}; misrouted {}; \
         untagged {}; sample ratio p = {} ({}, threshold {})</p>",
        if a.srm_ok { "ok" } else { "warn" },
        escape(&per_arm(&a.planned)),
        escape(&per_arm(&a.reached)),
        escape(&per_arm(&a.answered)),
        a.misrouted,
        a.untagged,
        a.srm_p.map_or("–".into(), format_p),
        if a.srm_ok {
            "ok"
        } else {
            "MISMATCH: the routing does not follow the assignment"
        },
        report.method.srm_threshold
    );
}

fn errors(out: &mut String, report: &Report) {
    out.push_str("<h2>Errors</h2><table><tr><th class=\"l\">class</th>");
    for arm in &report.arms {
        let _ = write!(out, "<th>{}</th>", escape(arm));
    }
    let _ = write!(
        out,
        "<th>p</th><th class=\"l\">guardrail <small>({} − {}, error margin {:.1} pp)</small></th>\
         <th class=\"l\">codes</th></tr>",
        escape(report.arms.get(1).map_or("", String::as_str)),
        escape(report.arms.first().map_or("", String::as_str)),
        100.0 * report.method.error_margin
    );
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
            "<td>{}</td><td class=\"l{}\">{}</td><td class=\"l\">{}</td></tr>",
            e.p.map_or("–".into(), format_p),
            if e.guardrail.worse.is_some() {
                " warn"
            } else {
                ""
            },
            escape(&e.guardrail.summary()),
            escape(&codes.join("; "))
        );
    }
    out.push_str("</table>");
}

fn comparisons(out: &mut String, report: &Report) {
    let shift = match report.arms.as_slice() {
        [first, second, ..] => format!("shift ms ({second} − {first})"),
        _ => "shift ms".into(),
    };
    out.push_str(
        "<h2>Comparisons</h2><table><tr><th class=\"l\">metric</th><th class=\"l\">class</th>",
    );
    for arm in &report.arms {
        let _ = write!(
            out,
            "<th>n {0}</th><th>p50 / p90 / p99 {0} (ms)</th>",
            escape(arm)
        );
    }
    let ratio = match report.arms.as_slice() {
        [first, second, ..] => format!("ratio {second} / {first}"),
        _ => "ratio".into(),
    };
    let _ = write!(
        out,
        "<th>{}</th><th>interval</th><th>{}</th><th>equivalence interval</th><th>tails</th>\
         <th>p</th><th>p adjusted</th><th class=\"l\">decision</th>\
         <th>detectable <small>(80 % power)</small></th></tr>",
        escape(&shift),
        escape(&ratio)
    );
    for c in &report.comparisons {
        let _ = write!(
            out,
            "<tr{}><td class=\"l\">{}{}</td><td class=\"l\">{}</td>",
            if c.primary { " class=\"primary\"" } else { "" },
            c.metric,
            if c.primary { " (primary)" } else { "" },
            escape(c.class.as_deref().unwrap_or("-"))
        );
        for arm in &report.arms {
            let p = |map: &BTreeMap<String, f64>| fmt(map.get(arm).copied(), 1);
            let _ = write!(
                out,
                "<td>{}</td><td>{} / {} / {}</td>",
                c.n.get(arm).copied().unwrap_or(0),
                p(&c.p50),
                p(&c.p90),
                p(&c.p99)
            );
        }
        let interval = c.ci_ms.map_or("–".into(), |[lo, hi]| {
            format!(
                "[{lo:.2}, {hi:.2}] <small>{:.2} %</small>",
                100.0 * (1.0 - c.ci_level_alpha)
            )
        });
        let equivalence = c.equivalence_ci.map_or("–".into(), |[lo, hi]| {
            format!(
                "[{lo:.3}, {hi:.3}] <small>{:.0} %</small>",
                100.0 * (1.0 - 2.0 * c.tost_alpha)
            )
        });
        let failed = c
            .failures
            .iter()
            .flatten()
            .filter(|(_, n)| **n > 0)
            .map(|(arm, n)| format!("{arm}: {n} failed, ranked worst"))
            .collect::<Vec<_>>();
        let notes: Vec<String> = c.blocked.iter().cloned().chain(failed).collect();
        let _ = write!(
            out,
            "<td>{}</td><td>{interval}</td><td>{} <small>{}</small></td><td>{equivalence}</td>\
             <td class=\"l\">{}</td><td>{}</td><td>{}</td><td class=\"l\">{}{}</td><td>{}</td></tr>",
            fmt(c.shift_ms, 2),
            escape(&c.ratio_text()),
            escape(&c.ratio_ci_text()),
            escape(&c.tails_text()),
            c.p.map_or("–".into(), format_p),
            c.p_adjusted.map_or("–".into(), format_p),
            escape(&c.decision_text()),
            if notes.is_empty() {
                String::new()
            } else {
                format!("<br><small>{}</small>", escape(&notes.join("; ")))
            },
            escape(&c.detectable_text())
        );
    }
    out.push_str("</table>");
}

pub fn render(report: &Report, samples: &Samples) -> String {
    let mut out = String::with_capacity(64 * 1024);
    run_facts(&mut out, report);
    // A load sweep's answer first: where each arm is faster.
    super::grid::html(&mut out, report, samples);
    classes(&mut out, report);
    assignment(&mut out, report);
    errors(&mut out, report);
    comparisons(&mut out, report);

    // Without streaming there is no first token: the primary metric is the end-to-end time.
    let streamed = report.run.stream
        || samples
            .classes
            .iter()
            .any(|c| c.arms.iter().any(|a| !a.ttft_ms.is_empty()));
    let (metric, pick): (&str, fn(&ArmSamples) -> &Vec<f64>) = if streamed {
        ("TTFT", |a| &a.ttft_ms)
    } else {
        ("End-to-end time", |a| &a.e2e_ms)
    };
    let _ = write!(out, "<h2>{metric}</h2>");
    if samples.classes.is_empty() {
        figure(
            &mut out,
            "ttft-ecdf",
            &format!("{metric} ECDF per arm"),
            Err("no samples".into()),
        );
    }
    for class in &samples.classes {
        let arms: Vec<(String, Vec<f64>)> = class
            .arms
            .iter()
            .map(|a| (a.arm.clone(), pick(a).clone()))
            .collect();
        let caption = format!("{metric} ECDF per arm, class {}", class.label);
        figure(
            &mut out,
            "ttft-ecdf",
            &format!("{caption} (x axis to the 99.5th percentile)"),
            ecdf_plot(&caption, &format!("{metric} ms"), &arms),
        );
    }
    // In a load sweep, against prompt size at the lightest level (the load curves show the rest).
    let lightest = |i: usize| {
        report
            .classes
            .get(i)
            .is_none_or(|c| c.level.unwrap_or(0) == 0)
    };
    let rows: Vec<MedianRow> = samples
        .classes
        .iter()
        .enumerate()
        .filter(|(i, _)| lightest(*i))
        .map(|(_, class)| class)
        .filter_map(|class| {
            let x = class.prompt_tokens.filter(|x| x.is_finite() && *x > 0.0)?;
            Some((x, medians(&class.arms, pick)))
        })
        .collect();
    figure(
        &mut out,
        "ttft-vs-prompt",
        &format!(
            "{metric} median with its {:.0} % distribution-free interval against prompt size, per arm",
            100.0 * (1.0 - MEDIAN_ALPHA)
        ),
        median_plot(metric, &report.arms, &rows, &PROMPT_AXIS),
    );

    out.push_str("<h2>Inter-token latency</h2>");
    let itl: Vec<(String, Vec<f64>)> = report
        .arms
        .iter()
        .map(|arm| {
            let gaps = samples
                .classes
                .iter()
                .filter_map(|c| c.arms.iter().find(|a| a.arm == *arm))
                .flat_map(|a| a.itl_ms.iter().copied());
            (arm.clone(), gaps.collect())
        })
        .collect();
    figure(
        &mut out,
        "itl",
        "ITL ECDF per arm: every gap between content events, all classes (x axis to the 99.5th percentile)",
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
    use crate::comparison::{Comparison, Decision};
    use crate::report::experiment::*;

    fn arms_of() -> Vec<String> {
        vec!["nvlink".into(), "fs".into()]
    }

    fn report(label: &str) -> Report {
        let arms = vec!["nvlink".to_string(), "fs".to_string()];
        let per_arm =
            |a: f64, b: f64| BTreeMap::from([("nvlink".to_string(), a), ("fs".to_string(), b)]);
        let counts = |a: u64, b: u64| BTreeMap::from([("nvlink".into(), a), ("fs".into(), b)]);
        Report {
            verdict: crate::verdict::Verdict::Decided,
            reasons: vec![format!("ttft_ms {label}: nvlink faster by 30.0%")],
            arms,
            classes: vec![Class {
                label: label.into(),
                class: None,
                level: None,
                turn: None,
                prompt_tokens: Some(128),
                measured_prompt_tokens: Some(131.5),
                requests: 100,
            }],
            assignment: Assignment {
                planned: counts(50, 50),
                answered: counts(50, 50),
                reached: counts(50, 50),
                misrouted: 0,
                untagged: 0,
                srm_p: Some(1.0),
                srm_ok: true,
            },
            errors: vec![ErrorRates {
                class: label.into(),
                arms: BTreeMap::from([(
                    "fs".into(),
                    ErrorCount {
                        requests: 50,
                        errors: 1,
                        rate: 0.02,
                    },
                )]),
                p: Some(0.3),
                codes: BTreeMap::from([("fs".into(), BTreeMap::from([("status 503".into(), 1)]))]),
                guardrail: crate::guardrail::errors(&arms_of(), (0, 50), (1, 50), 0.05, 0.02),
            }],
            comparisons: vec![Comparison {
                metric: "ttft_ms",
                class: Some(label.into()),
                primary: true,
                n: counts(50, 49),
                p50: per_arm(100.0, 130.0),
                p90: per_arm(110.0, 140.0),
                p99: per_arm(120.0, 150.0),
                shift_ms: Some(30.0),
                ci_ms: Some([28.0, 32.0]),
                ci_level_alpha: 0.025,
                ratio: Some(1.3),
                ratio_ci: Some([1.28, 1.32]),
                equivalence_ci: Some([1.285, 1.315]),
                tost_alpha: 0.05,
                relative: Some(0.3),
                relative_ci: Some([0.28, 0.32]),
                failures: Some(counts(0, 1)),
                tails: crate::guardrail::of_samples(
                    &[0.9],
                    &arms_of(),
                    [&[100.0; 50], &[130.0; 50]],
                    0.05,
                    0.25,
                ),
                blocked: Vec::new(),
                p: Some(1e-6),
                p_adjusted: Some(4e-6),
                decision: Decision::Faster,
                faster: Some("nvlink".into()),
                more_requests: None,
                detectable_ratio: None,
                resolution: None,
                p50_bucket: None,
                buckets: None,
                cdf: None,
            }],
            method: Method {
                alpha: 0.05,
                min_effect: 0.05,
                tail_margin: 0.25,
                error_margin: 0.02,
                max_time_s: 60.0,
                until: "budget",
                looks: 1,
                boundary: crate::sequential::Boundary::ObrienFleming,
                looks_made: 1,
                look_alpha: 0.05,
                stratum: 16,
                srm_threshold: 0.001,
                description: "the method",
            },
            run: Run {
                endpoint: "/v1/chat/completions".into(),
                stream: true,
                load: "closed",
                concurrency: Some(8),
                rate: None,
                seed: 1,
                warmup: 0,
                sent: 100,
                duration_s: 1.0,
                achieved_rate: 100.0,
                stopped_by: "requests",
                judged_from: None,
            },
            sweep: None,
            workload: crate::reuse::Workload {
                shapes: vec![crate::reuse::Shape::Unique],
                reuse: Vec::new(),
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

    /// The figures of one kind: (whole `<figure>`, its SVG if drawn).
    fn figures<'a>(html: &'a str, plot: &str) -> Vec<&'a str> {
        let open = format!("<figure class=\"plot\" data-plot=\"{plot}\">");
        html.match_indices(&open)
            .map(|(start, _)| {
                let end = html[start..].find("</figure>").unwrap() + start;
                &html[start..end]
            })
            .collect()
    }

    #[test]
    fn the_report_has_its_three_plots_and_fetches_nothing() {
        let html = render(&report("128"), &samples("128"));
        assert!(html.starts_with("<!doctype html>") && html.ends_with("</html>\n"));
        for (plot, count) in [("ttft-ecdf", 2), ("ttft-vs-prompt", 1), ("itl", 1)] {
            let found = figures(&html, plot);
            assert_eq!(found.len(), count, "{plot}");
            for figure in found {
                // A drawing with lines, its title first, and a caption.
                let svg = &figure[figure.find("<svg").unwrap()..];
                let title = svg.find('>').unwrap() + 1;
                assert!(
                    svg[title..].starts_with("<title>"),
                    "{plot}: {}",
                    &svg[..200]
                );
                assert!(svg.contains("<polyline") || svg.contains("<path"), "{plot}");
                assert!(svg.contains("</svg><figcaption>"), "{plot}");
            }
        }
        assert_eq!(html.matches("<svg").count(), 4);
        assert!(html.contains(
            "<td class=\"l\">nvlink faster<br><small>fs: 1 failed, ranked worst</small></td>"
        ));
        assert!(html.contains("<th>ratio fs / nvlink</th>"));
        assert!(html.contains("<td>×1.300 <small>[1.280, 1.320]</small></td>"));
        assert!(html.contains("<td>[1.285, 1.315] <small>90 %</small></td>"));
        assert!(html.contains("<td class=\"l\">p90 fs worse</td>"));
        assert!(html.contains("margin 2.0 pp: not shown either way"));
        assert!(html.contains("<tr class=\"primary\"><td class=\"l\">ttft_ms (primary)</td>"));
        assert!(html.contains("shift ms (fs − nvlink)"));
        assert!(html.contains("[28.00, 32.00] <small>97.50 %</small>"));
        assert!(html.contains("fs: status 503 ×1") && html.contains("1/50 (2.0 %)"));
        assert!(html.contains("<td>128</td><td>131.5</td><td>100</td>"));
        assert!(html.contains("<p class=\"ok\">planned fs 50, nvlink 50;"));
        assert!(html.contains("method: the method"));
        // Nothing to fetch: no script, stylesheet, image, frame or link to another document. The only
        // URI is the SVG namespace of each drawing, which is a name, not a fetch.
        let xmlns = "xmlns=\"http://www.w3.org/2000/svg\"";
        assert_eq!(html.matches(xmlns).count(), 4);
        let rest = html.replace(xmlns, "");
        let fetches = "http: https: // <script <link <img <image <iframe <object <embed href src= url( @import";
        for fetch in fetches.split(' ') {
            assert!(!rest.contains(fetch), "{fetch}");
        }
    }

    #[test]
    fn names_from_users_are_escaped() {
        let label = "<b>&\"'";
        let mut report = report(label);
        report.arms = vec!["<i>a".into(), "b&".into()];
        let mut samples = samples(label);
        for class in &mut samples.classes {
            class.arms[0].arm = "<i>a".into();
            class.arms[1].arm = "b&".into();
        }
        let html = render(&report, &samples);
        assert!(!html.contains("<b>") && !html.contains("<i>"));
        assert!(html.contains("&lt;b&gt;&amp;&quot;&#39;"));
        // In the SVG too: the ECDF's title and the legends.
        assert!(html.contains("class &lt;b&gt;&amp;"));
        assert!(html.contains("&lt;i&gt;a (n=50)") && html.contains("b&amp; (n=50)"));
    }

    #[test]
    fn a_mismatch_is_a_warning() {
        let mut report = report("128");
        report.verdict = crate::verdict::Verdict::Invalid;
        report.assignment.srm_ok = false;
        report.assignment.srm_p = Some(1e-9);
        let html = render(&report, &samples("128"));
        assert!(html.contains("<p class=\"verdict invalid\">"));
        assert!(html.contains("<p class=\"warn\">planned") && html.contains("MISMATCH"));
    }

    #[test]
    fn empty_samples_say_so() {
        let empty = render(&report("x"), &Samples::default());
        for plot in ["ttft-ecdf", "ttft-vs-prompt", "itl"] {
            let found = figures(&empty, plot);
            assert_eq!(found.len(), 1, "{plot}");
            assert!(found[0].contains("<p class=\"empty\">"), "{plot}");
        }
        assert!(empty.contains("no samples") && empty.contains("no class with a prompt size"));
        assert!(!empty.contains("<svg"));

        // An arm with nothing (all misrouted), values that are not numbers, one class without a size.
        let odd = Samples {
            classes: vec![
                ClassSamples {
                    label: "a".into(),
                    prompt_tokens: Some(1.0),
                    arms: vec![
                        ArmSamples {
                            arm: "nvlink".into(),
                            ..ArmSamples::default()
                        },
                        ArmSamples {
                            arm: "fs".into(),
                            ttft_ms: vec![f64::NAN, 5.0, f64::INFINITY, 5.0],
                            itl_ms: vec![f64::NAN],
                            e2e_ms: vec![],
                        },
                    ],
                },
                ClassSamples {
                    label: "file".into(),
                    prompt_tokens: None,
                    arms: vec![],
                },
            ],
        };
        let html = render(&report("x"), &odd);
        assert_eq!(figures(&html, "ttft-ecdf").len(), 2);
        assert!(figures(&html, "ttft-ecdf")[0].contains("<svg"));
        assert!(figures(&html, "ttft-ecdf")[1].contains("no samples"));
        assert!(figures(&html, "ttft-vs-prompt")[0].contains("too few for a median interval"));
        assert!(figures(&html, "itl")[0].contains("no samples"));

        let not_streamed = Samples {
            classes: vec![ClassSamples {
                label: "a".into(),
                prompt_tokens: Some(64.0),
                arms: vec![ArmSamples {
                    arm: "nvlink".into(),
                    e2e_ms: (0..20).map(f64::from).collect(),
                    ..ArmSamples::default()
                }],
            }],
        };
        let mut report = report("a");
        report.run.stream = false;
        let html = render(&report, &not_streamed);
        assert!(html.contains("End-to-end time ECDF per arm, class a"));
        assert!(figures(&html, "ttft-vs-prompt")[0].contains("<svg"));
    }
}
