//! The judgement: every answer checked, then the design, the sample-ratio check, the error and misroute
//! rates, the comparisons (Holm across the metrics) and the verdict, as one `Report`. No I/O here: the
//! answers come from `fetch`, whatever their source.

use kvab_contract::metrics::{self, source};
use std::collections::BTreeMap;

use kvab_judge::sequential::{self, Boundary};
use kvab_judge::stats::{format_p, holm_adjusted, holm_levels, two_proportion};

use super::design::{assignment, design};
use super::fetch::Answers;
use super::options::AnalyzeArgs;
use super::prometheus::Labels;
use super::series::{counts, histograms, is_compared, label, without_source, ALL};
use kvab_judge::binned::mann_whitney;
use kvab_judge::comparison::{of_histograms, Comparison, InFamily, Rule};
use kvab_judge::guardrail::{self, ErrorGuard};
use kvab_judge::report::production::{Method, Rate, Report, Window};
use kvab_judge::resolution::Keeping;
use kvab_judge::verdict::{verdict, Findings, Verdict};

pub const METHOD: &str = "increase() of the filter's histograms and counters over the window; Mann-Whitney with \
                      each bucket a group of ties; the ratio of medians with distribution-free median intervals \
                      widened to bucket edges; Holm across the metrics; faster needs the ratio's interval at the \
                      Holm level beyond 1+min_effect; equivalent needs its 1-2*alpha interval inside the margin \
                      and every guardrail within; guardrails: p90 and p99 (order-statistic intervals on the \
                      buckets, tail_margin) and the error rate (5xx or no answer, Newcombe's score interval, \
                      error_margin)";

/// Which of `--looks` looks a run over `window` is, and its level: the look its window's end reaches from
/// the start, one every `--look-every` (the last once past it), alpha spent over the looks at their planned
/// fractions by `--boundary` (`sequential::levels`). One look, or `--boundary always-valid` (whose level
/// comes from the window's requests: `always_valid_level`): alpha.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Look {
    pub look: u32,
    pub level: f64,
}

pub fn look(args: &AnalyzeArgs, window: &Window) -> Look {
    let (looks, alpha) = (args.looks.max(1), args.alpha);
    let Some(every) = args.look_every.filter(|_| looks > 1) else {
        return Look {
            look: 1,
            level: alpha,
        };
    };
    let reached = ((window.end - window.start) / every.as_secs_f64()).ceil();
    let look = (reached.max(1.0) as u32).min(looks);
    let fractions: Vec<f64> = (1..=look)
        .map(|j| f64::from(j) / f64::from(looks))
        .collect();
    let level = sequential::levels(args.boundary, alpha, &fractions)
        .last()
        .copied()
        .unwrap_or(0.0);
    Look { look, level }
}

/// With `--boundary always-valid`: the level of the confidence sequence at the window's `split`-assigned
/// requests over `--plan-requests` (its clock: the information of every comparison grows with them).
fn always_valid_level(args: &AnalyzeArgs, split: f64) -> Option<f64> {
    let plan = args
        .plan_requests
        .filter(|_| args.boundary == Boundary::AlwaysValid)?;
    sequential::levels(Boundary::AlwaysValid, args.alpha, &[split / plan as f64])
        .first()
        .copied()
}

/// The report on the answers: every value checked first (`stats::count`, `Histogram::from_cumulative`),
/// so input that is no count or no histogram is an error naming its series, never a verdict.
pub fn judge(
    answers: &Answers,
    args: &AnalyzeArgs,
    window: Window,
    queries: Vec<String>,
) -> Result<Report, String> {
    let at = look(args, &window);
    judge_at(answers, args, window, at, queries)
}

/// As `judge`, at a look already found (`look`: the levels of many looks are computed once).
pub fn judge_at(
    answers: &Answers,
    args: &AnalyzeArgs,
    window: Window,
    at: Look,
    queries: Vec<String>,
) -> Result<Report, String> {
    let arms = &args.arms;
    let Answers {
        duration,
        ttfb,
        requests,
        responses,
        served,
        routed,
        vllm,
    } = answers;
    counts(metrics::REQUESTS, requests)?;
    counts(metrics::RESPONSES, responses)?;
    counts(metrics::SERVED, served)?;
    counts(metrics::ROUTED_REQUESTS, routed)?;

    let Look { look, level } = at;
    let design = design(requests, arms);
    let compared = design.compared;
    let assignment = assignment(requests, arms, &args.split, args.srm_threshold);
    let split: f64 = assignment.split.values().sum();
    let level = always_valid_level(args, split).unwrap_or(level);
    let (errors, errors_p, error_guardrail) = errors(responses, arms, compared, level, args);
    let misroutes = misroutes(served, arms);
    let routed = (!routed.is_empty()).then(|| {
        routed
            .iter()
            .filter(|(l, _)| {
                arms.iter()
                    .any(|a| a == label(l, metrics::label::REQUESTED))
            })
            .map(|(l, v)| (label(l, metrics::label::REQUESTED).to_string(), *v))
            .collect()
    });

    // The filter's histograms are Envoy's (whole milliseconds, two significant digits); vLLM's bin
    // the values themselves.
    let mut metrics = vec![
        (
            "request_duration_ms",
            true,
            histograms(metrics::REQUEST_DURATION_BUCKET, duration, arms, compared)?,
            Keeping::Envoy,
        ),
        (
            "time_to_first_byte_ms",
            false,
            histograms(metrics::TIME_TO_FIRST_BYTE_BUCKET, ttfb, arms, compared)?,
            Keeping::Envoy,
        ),
    ];
    // vLLM's histograms count every request its pods served: in a randomized window they join the
    // comparisons only when every request in it was split-assigned.
    let vllm_mixed = compared == source::SPLIT && design.other_requests > 0.0;
    let mut vllm_left_out = Vec::new();
    for (name, metric, samples) in vllm {
        let found = histograms(metric, samples, arms, ALL)?;
        if found.iter().any(Option::is_some) {
            if vllm_mixed {
                vllm_left_out.push(*name);
            } else {
                metrics.push((*name, false, found, Keeping::Exact));
            }
        }
    }
    let unlabelled = without_source(duration, arms) || without_source(ttfb, arms);
    let p_values: Vec<Option<f64>> = metrics
        .iter()
        .map(|(_, _, h, _)| match (&h[0], &h[1]) {
            (Some(a), Some(b)) => mann_whitney(a, b),
            _ => None,
        })
        .collect();
    let family: Vec<f64> = p_values.iter().map(|p| p.unwrap_or(1.0)).collect();
    let adjusted = holm_adjusted(&family);
    let levels = holm_levels(&family, level);
    let rule = Rule {
        level,
        tost_level: level,
        min_effect: args.min_effect,
        tail_margin: args.tail_margin,
    };
    let comparisons: Vec<Comparison> = metrics
        .iter()
        .zip(p_values.iter().zip(adjusted.iter().zip(&levels)))
        .map(
            |((metric, primary, h, keeping), (&p, (&p_adjusted, &level)))| {
                let family = InFamily {
                    p,
                    p_adjusted,
                    level,
                };
                let guard = Some(&error_guardrail);
                of_histograms(
                    metric,
                    *primary,
                    arms,
                    h,
                    family,
                    rule,
                    args.min_requests,
                    *keeping,
                    guard,
                )
            },
        )
        .collect();
    // Per primary metric, the arms with fewer requests than --min-requests (Prometheus's counts, before
    // they are rounded for the report).
    let few: Vec<Vec<(String, f64)>> = metrics
        .iter()
        .filter(|(_, primary, _, _)| *primary)
        .map(|(_, _, h, _)| {
            arms.iter()
                .zip(h)
                .map(|(arm, h)| (arm.clone(), h.as_ref().map_or(0.0, |h| h.total())))
                .filter(|(_, n)| *n < args.min_requests as f64)
                .collect()
        })
        .collect();

    let mut report = Report {
        verdict: Verdict::Inconclusive,
        reasons: Vec::new(),
        arms: arms.clone(),
        window,
        design,
        assignment,
        errors,
        errors_p,
        error_guardrail,
        misroutes,
        routed,
        comparisons,
        method: Method {
            alpha: args.alpha,
            looks: args.looks.max(1),
            look,
            look_alpha: level,
            boundary: args.boundary,
            plan_requests: args.plan_requests,
            min_effect: args.min_effect,
            tail_margin: args.tail_margin,
            error_margin: args.error_margin,
            min_requests: args.min_requests,
            srm_threshold: args.srm_threshold,
            description: METHOD,
        },
        queries,
    };
    let mut findings = findings(&report, &few, args);
    if let Some(plan) = report.method.plan_requests {
        findings.context.push(format!(
            "always-valid: {split:.0} split-assigned requests of the {plan} planned, level {} of alpha {} \
             (re-runs over this window make no more false claims)",
            format_p(level),
            args.alpha
        ));
    }
    if report.method.looks > 1 {
        findings.context.push(format!(
            "look {} of {}, one every {} s from the window's start: level {} of alpha {}",
            look,
            report.method.looks,
            args.look_every.map_or(0, |d| d.as_secs()),
            format_p(level),
            args.alpha
        ));
    }
    if unlabelled && compared == source::SPLIT {
        findings.caveats.push(
            "the latency histograms carry no source label (a kvab filter that did not tell split-assigned \
             requests apart): the split's requests cannot be compared alone, so no randomized verdict"
                .into(),
        );
    }
    if !vllm_left_out.is_empty() {
        findings.notes.push(format!(
            "{} left out: vLLM's histograms count every request its pods served, and {:.0} request(s) in the \
             window were not split-assigned",
            vllm_left_out.join(", "),
            report.design.other_requests
        ));
    }
    (report.verdict, report.reasons) = verdict(findings, &report.comparisons);
    Ok(report)
}

/// What the window shows besides its comparisons, for the one verdict rule (`kvab_judge::verdict`): a
/// sample-ratio mismatch makes it invalid; a window that is not randomized, or has too little traffic
/// (`few`: per primary metric, the arms under --min-requests), cannot decide; differing error rates and
/// misrouted requests are noted.
fn findings(report: &Report, few: &[Vec<(String, f64)>], args: &AnalyzeArgs) -> Findings {
    let mut f = Findings::default();
    if report.assignment.srm_ok == Some(false) {
        let counts: Vec<String> = report
            .assignment
            .split
            .iter()
            .map(|(a, n)| format!("{a} {n:.0}"))
            .collect();
        f.invalid.push(format!(
            "sample-ratio mismatch: split-assigned requests {} against the weights of --split (p={}): the filter's \
             split is not what --split says, or requests are lost on one arm",
            counts.join(", "),
            report.assignment.srm_p.map_or("-".into(), format_p)
        ));
    }
    let design = &report.design;
    let percent = |share: Option<f64>| 100.0 * share.unwrap_or(0.0);
    match design.kind {
        "randomized" => {
            let left_out = 100.0 - percent(design.split_share);
            f.context.push(if left_out >= 0.5 {
                format!(
                    "randomized: the {:.0} % of tagged requests assigned by the split's random draw are \
                     compared alone; the other {left_out:.0} % (header-chosen, default) are left out",
                    percent(design.split_share)
                )
            } else {
                "randomized: every tagged request was assigned by the split's random draw".into()
            })
        }
        "sticky" => f.caveats.push(format!(
            "sticky: {:.0} % of tagged requests were assigned by their key (split.keyHeader), so every \
             request of a key went to one arm: the key is the unit of randomization, and Prometheus holds no \
             per-key data, so requests judged one by one would claim far more certainty than the keys give; \
             no randomized verdict (randomize requests, or run kvab experiment)",
            percent(design.key_share)
        )),
        "none" => f.caveats.push("no tagged request in the window".into()),
        kind => f.caveats.push(format!(
            "{kind}: no request was assigned by the split; {:.0} % of tagged requests chose their arm by \
             header (clients chose): the arms saw different clients, prompts and moments, so a difference \
             may come from who sends to which arm and is no verdict (use onMissing: split, or kvab \
             experiment)",
            percent(design.header_share)
        )),
    }
    for arms in few.iter().filter(|arms| !arms.is_empty()) {
        let named: Vec<String> = arms.iter().map(|(a, n)| format!("{a} {n:.0}")).collect();
        f.caveats.push(format!(
            "too little traffic in the window: {} request(s), fewer than --min-requests {}",
            named.join(", "),
            args.min_requests
        ));
    }
    if let Some(p) = report.errors_p.filter(|p| *p < args.alpha) {
        f.notes.push(format!(
            "error rates differ between the arms (p={})",
            format_p(p)
        ));
    }
    let misrouted: f64 = report.misroutes.values().map(|r| r.count).sum();
    if misrouted > 0.0 {
        f.notes.push(format!(
            "{misrouted:.0} request(s) served by another arm than tagged"
        ));
    }
    f
}

/// Per arm (the `key` label), how many of the samples' counts there are and how many `counted` picks.
fn rates(
    samples: &[(Labels, f64)],
    key: &str,
    arms: &[String],
    counted: impl Fn(&Labels, &str) -> bool,
) -> BTreeMap<String, Rate> {
    arms.iter()
        .map(|arm| {
            let (mut of, mut count) = (0.0, 0.0);
            for (labels, value) in samples.iter().filter(|(l, _)| label(l, key) == arm) {
                of += value;
                if counted(labels, arm) {
                    count += value;
                }
            }
            let rate = (of > 0.0).then(|| count / of);
            (arm.clone(), Rate { of, count, rate })
        })
        .collect()
}

/// A 5xx, or no response status at all (reset, timeout): the arm failed the request. The rates (of the
/// `compared` requests), their two-proportion p-value and the error guardrail.
fn errors(
    responses: &[(Labels, f64)],
    arms: &[String],
    compared: &str,
    level: f64,
    args: &AnalyzeArgs,
) -> (BTreeMap<String, Rate>, Option<f64>, ErrorGuard) {
    let responses: Vec<(Labels, f64)> = responses
        .iter()
        .filter(|(l, _)| is_compared(l, compared))
        .cloned()
        .collect();
    let rates = rates(&responses, metrics::label::BACKEND, arms, |l, _| {
        metrics::FAILED_CODE_CLASSES.contains(&label(l, metrics::label::CODE_CLASS))
    });
    let get = |arm: &String| {
        rates
            .get(arm)
            .map_or((0, 0), |r| (r.count.round() as u64, r.of.round() as u64))
    };
    let ((x1, n1), (x2, n2)) = (get(&arms[0]), get(&arms[1]));
    let guard = guardrail::errors(arms, (x1, n1), (x2, n2), level, args.error_margin);
    (rates, two_proportion(x1, n1, x2, n2), guard)
}

/// Requests tagged for an arm and served by another.
fn misroutes(served: &[(Labels, f64)], arms: &[String]) -> BTreeMap<String, Rate> {
    rates(served, metrics::label::REQUESTED, arms, |l, arm| {
        label(l, metrics::label::SERVED) != arm
    })
}
