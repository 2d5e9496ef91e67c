//! The judgement: every answer checked, then the design, the sample-ratio check, the error and misroute
//! rates, the comparisons (Holm across the metrics) and the verdict, as one `Report`. No I/O here: the
//! answers come from `fetch`, whatever their source.

use kvab_contract::metrics;
use std::collections::BTreeMap;

use kvab_judge::stats::{format_p, holm_adjusted, holm_levels, two_proportion};

use super::design::{assignment, design};
use super::fetch::Answers;
use super::options::AnalyzeArgs;
use super::prometheus::Labels;
use super::series::{counts, histograms, label};
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

/// The report on the answers: every value checked first (`stats::count`, `Histogram::from_cumulative`),
/// so input that is no count or no histogram is an error naming its series, never a verdict.
pub fn judge(
    answers: &Answers,
    args: &AnalyzeArgs,
    window: Window,
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

    let design = design(requests, arms);
    let assignment = assignment(requests, arms, &args.split, args.srm_threshold);
    let (errors, errors_p, error_guardrail) = errors(responses, arms, args);
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
            histograms(metrics::REQUEST_DURATION_BUCKET, duration, arms)?,
            Keeping::Envoy,
        ),
        (
            "time_to_first_byte_ms",
            false,
            histograms(metrics::TIME_TO_FIRST_BYTE_BUCKET, ttfb, arms)?,
            Keeping::Envoy,
        ),
    ];
    for (name, metric, samples) in vllm {
        let found = histograms(metric, samples, arms)?;
        if found.iter().any(Option::is_some) {
            metrics.push((*name, false, found, Keeping::Exact));
        }
    }
    let p_values: Vec<Option<f64>> = metrics
        .iter()
        .map(|(_, _, h, _)| match (&h[0], &h[1]) {
            (Some(a), Some(b)) => mann_whitney(a, b),
            _ => None,
        })
        .collect();
    let family: Vec<f64> = p_values.iter().map(|p| p.unwrap_or(1.0)).collect();
    let adjusted = holm_adjusted(&family);
    let levels = holm_levels(&family, args.alpha);
    let rule = Rule {
        level: args.alpha,
        tost_level: args.alpha,
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
            min_effect: args.min_effect,
            tail_margin: args.tail_margin,
            error_margin: args.error_margin,
            min_requests: args.min_requests,
            srm_threshold: args.srm_threshold,
            description: METHOD,
        },
        queries,
    };
    (report.verdict, report.reasons) = verdict(findings(&report, &few, args), &report.comparisons);
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
    match report.design.kind {
        "randomized" => f.context.push(format!(
            "randomized: {:.0} % of tagged requests were assigned by the filter's split",
            100.0 * report.design.split_share.unwrap_or(0.0)
        )),
        "none" => f.caveats.push("no tagged request in the window".into()),
        kind => f.caveats.push(format!(
            "{kind}: {:.0} % of tagged requests chose their arm by header (clients chose), only {:.0} % by the \
             split; the arms saw different clients, prompts and moments, so a difference may come from who \
             sends to which arm and is no verdict (use onMissing: split, or kvab experiment)",
            100.0 * report.design.header_share.unwrap_or(0.0),
            100.0 * report.design.split_share.unwrap_or(0.0)
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

/// A 5xx, or no response status at all (reset, timeout): the arm failed the request. The rates, their
/// two-proportion p-value and the error guardrail.
fn errors(
    responses: &[(Labels, f64)],
    arms: &[String],
    args: &AnalyzeArgs,
) -> (BTreeMap<String, Rate>, Option<f64>, ErrorGuard) {
    let rates = rates(responses, metrics::label::BACKEND, arms, |l, _| {
        matches!(label(l, metrics::label::CODE_CLASS), "5xx" | "none")
    });
    let get = |arm: &String| {
        rates
            .get(arm)
            .map_or((0, 0), |r| (r.count.round() as u64, r.of.round() as u64))
    };
    let ((x1, n1), (x2, n2)) = (get(&arms[0]), get(&arms[1]));
    let guard = guardrail::errors(arms, (x1, n1), (x2, n2), args.alpha, args.error_margin);
    (rates, two_proportion(x1, n1, x2, n2), guard)
}

/// Requests tagged for an arm and served by another.
fn misroutes(served: &[(Labels, f64)], arms: &[String]) -> BTreeMap<String, Rate> {
    rates(served, metrics::label::REQUESTED, arms, |l, arm| {
        label(l, metrics::label::SERVED) != arm
    })
}
