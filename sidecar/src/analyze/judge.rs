//! The judgement: every answer checked, then the design, the sample-ratio check, the error and misroute
//! rates, the comparisons (Holm across the metrics) and the verdict, as one `Report`. No I/O here: the
//! answers come from `fetch`, whatever their source.

use std::collections::BTreeMap;

use crate::experiment::report::Verdict;
use kvab_judge::stats::{holm_adjusted, holm_levels, two_proportion};

use super::compare::{compare, verdict, Comparison};
use super::design::{assignment, design};
use super::fetch::Answers;
use super::options::AnalyzeArgs;
use super::prometheus::Labels;
use super::report::{Method, Rate, Report, Window};
use super::series::{counts, histograms, label};
use kvab_judge::binned::mann_whitney;

pub const METHOD: &str = "increase() of the filter's histograms and counters over the window; Mann-Whitney with \
                      each bucket a group of ties; the difference of medians with distribution-free median \
                      intervals widened to bucket edges (each at half the level); Holm across the metrics; \
                      faster needs the interval to exclude 0 and a difference of at least min_effect; \
                      equivalent needs the interval inside ±min_effect";

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
    counts("kvab_requests_total", requests)?;
    counts("kvab_responses_total", responses)?;
    counts("kvab_served_total", served)?;
    counts("kvab_routed_requests_total", routed)?;

    let design = design(requests, arms);
    let assignment = assignment(requests, arms, &args.split, args.srm_threshold);
    let (errors, errors_p) = errors(responses, arms);
    let misroutes = misroutes(served, arms);
    let routed = (!routed.is_empty()).then(|| {
        routed
            .iter()
            .filter(|(l, _)| arms.iter().any(|a| a == label(l, "requested")))
            .map(|(l, v)| (label(l, "requested").to_string(), *v))
            .collect()
    });

    let mut metrics = vec![
        (
            "request_duration_ms",
            true,
            histograms("kvab_request_duration_milliseconds_bucket", duration, arms)?,
        ),
        (
            "time_to_first_byte_ms",
            false,
            histograms("kvab_time_to_first_byte_milliseconds_bucket", ttfb, arms)?,
        ),
    ];
    for (name, metric, samples) in vllm {
        let found = histograms(metric, samples, arms)?;
        if found.iter().any(Option::is_some) {
            metrics.push((*name, false, found));
        }
    }
    let p_values: Vec<f64> = metrics
        .iter()
        .map(|(_, _, h)| match (&h[0], &h[1]) {
            (Some(a), Some(b)) => mann_whitney(a, b).unwrap_or(1.0),
            _ => 1.0,
        })
        .collect();
    let adjusted = holm_adjusted(&p_values);
    let levels = holm_levels(&p_values, args.alpha);
    let comparisons: Vec<Comparison> = metrics
        .iter()
        .zip(adjusted.iter().zip(&levels))
        .map(|((metric, primary, h), (&p_adjusted, &level))| {
            compare(metric, *primary, arms, h, p_adjusted, level, args)
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
        misroutes,
        routed,
        comparisons,
        method: Method {
            alpha: args.alpha,
            min_effect: args.min_effect,
            min_requests: args.min_requests,
            srm_threshold: args.srm_threshold,
            description: METHOD,
        },
        queries,
    };
    (report.verdict, report.reasons) = verdict(&report, args);
    Ok(report)
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

/// A 5xx, or no response status at all (reset, timeout): the arm failed the request.
fn errors(responses: &[(Labels, f64)], arms: &[String]) -> (BTreeMap<String, Rate>, Option<f64>) {
    let rates = rates(responses, "backend", arms, |l, _| {
        matches!(label(l, "code_class"), "5xx" | "none")
    });
    let get = |arm: &String| {
        rates
            .get(arm)
            .map_or((0, 0), |r| (r.count.round() as u64, r.of.round() as u64))
    };
    let ((x1, n1), (x2, n2)) = (get(&arms[0]), get(&arms[1]));
    (rates, two_proportion(x1, n1, x2, n2))
}

/// Requests tagged for an arm and served by another.
fn misroutes(served: &[(Labels, f64)], arms: &[String]) -> BTreeMap<String, Rate> {
    rates(served, "requested", arms, |l, arm| {
        label(l, "served") != arm
    })
}
