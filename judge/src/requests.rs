//! The judgement of an experiment from its outcomes, with no I/O (the calibration suite,
//! judge/tests/calibration, runs it on simulated experiments).
//!
//! Every assigned request counts (intention to treat): a request that failed or timed out enters the
//! time to first token and the end-to-end time of its assigned arm ranked worst, at `--max-time`; the
//! per-token metrics (ITL, TPOT) are of answered requests. Per class and metric: the Mann-Whitney
//! p-value, Holm's correction across every comparison, and each comparison made and decided by
//! `comparison::of_samples` (the one rule, `crate::comparison`) with the class's error guardrail. Each
//! analysis runs at `look_alpha`: alpha for one analysis, its look's share of alpha when the run looks
//! several times (`crate::sequential`). Also the assignment check and
//! the error rates per class, which the tool turns into findings for the verdict (`crate::verdict`).

use std::collections::BTreeMap;

use crate::comparison::{of_samples, Comparison, Decision, InFamily, Rule};
use crate::guardrail;
use crate::report::experiment::{
    ArmSamples, Assignment, ClassSamples, ErrorCount, ErrorRates, Samples,
};
use crate::stats::stratified::Strata;
use crate::stats::{holm_adjusted, holm_levels, mann_whitney_u, split_test, two_proportion};

pub use crate::outcome::Outcome;

/// A per-request metric of an experiment; `name` is how comparisons and reports call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    Ttft,
    Itl,
    Tpot,
    E2e,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Ttft => "ttft_ms",
            Metric::Itl => "itl_ms",
            Metric::Tpot => "tpot_ms",
            Metric::E2e => "e2e_ms",
        }
    }
}

/// What the analysis needs to know of the design.
#[derive(Debug, Clone)]
pub struct Design {
    pub arms: Vec<String>,
    pub classes: Vec<String>,
    /// Nominal prompt size per class, when synthetic.
    pub prompt_tokens: Vec<Option<u32>>,
    pub stream: bool,
    /// The level of this analysis: alpha, or its look's share of it (`crate::sequential`).
    pub look_alpha: f64,
    pub min_effect: f64,
    pub srm_threshold: f64,
    /// `--max-time` in ms: where a failed request is ranked.
    pub max_time_ms: f64,
    /// The tails' relative margin (`Rule::tail_margin`).
    pub tail_margin: f64,
    /// The error guardrail's margin: a difference of error rates, as a fraction of requests.
    pub error_margin: f64,
    /// The requests of a class per stratum of the analysis (consecutive in measured order: `STRATUM`),
    /// 0 for one stratum (the unstratified analysis).
    pub stratum: usize,
    /// Per class, whether each of its requests is a unit of randomization of its own, or the first of one:
    /// false for a conversation's later turns (the conversation was assigned, not its turns). The
    /// assignment check counts units. Empty: every class's requests are units.
    pub unit_start: Vec<bool>,
}

/// The requests of a class per stratum: 4 of `kvab experiment`'s assignment blocks of 4 (its default
/// `--block`), 8 per arm. A load that drifts over the run is shared within a stratum, and the test and
/// the intervals compare each request only with those of its stratum (`crate::stats::stratified`).
/// Smaller strata lose power where nothing drifts (strata of one block: a true ×1.10 found in 48 % of
/// the calibration's runs against 55 %), larger ones keep more of a drift (docs/experiment.md).
pub const STRATUM: usize = 16;

#[derive(Debug, Clone)]
pub struct Analysis {
    pub assignment: Assignment,
    pub errors: Vec<ErrorRates>,
    pub comparisons: Vec<Comparison>,
    /// Mean `usage.prompt_tokens` per class.
    pub measured_prompt_tokens: Vec<Option<f64>>,
    pub requests_per_class: Vec<u64>,
}

impl Analysis {
    /// Every primary comparison decided (and there is at least one).
    pub fn decided(&self) -> bool {
        let mut primary = self.comparisons.iter().filter(|c| c.primary).peekable();
        primary.peek().is_some() && primary.all(|c| c.decision != Decision::Inconclusive)
    }
}

impl Design {
    fn metrics(&self) -> Vec<(Metric, bool)> {
        if self.stream {
            vec![
                (Metric::Ttft, true),
                (Metric::Itl, false),
                (Metric::Tpot, false),
                (Metric::E2e, false),
            ]
        } else {
            vec![(Metric::E2e, true)]
        }
    }
}

fn value(outcome: &Outcome, metric: Metric) -> Option<f64> {
    match metric {
        Metric::Ttft => outcome.ttft_ms,
        Metric::Itl => outcome.median_itl_ms(),
        Metric::Tpot => outcome.tpot_ms(),
        Metric::E2e => Some(outcome.e2e_ms),
    }
}

/// The values of a metric for (class, arm): requests answered by their own arm without error, then, for
/// the times to an answer (TTFT, end-to-end), every failed request at `max_time_ms`; with the stratum
/// of each value (`strata[i]`: the `i`-th outcome's) and how many failed (the last values).
struct Values {
    values: Vec<f64>,
    strata: Vec<usize>,
    failures: u64,
}

fn values(
    outcomes: &[Outcome],
    strata: &[usize],
    class: usize,
    arm: usize,
    metric: Metric,
    max_time_ms: f64,
) -> Values {
    let mine = || {
        outcomes
            .iter()
            .zip(strata)
            .filter(move |(o, _)| o.class == class && o.assigned == arm)
    };
    let (mut values, mut in_strata): (Vec<f64>, Vec<usize>) = mine()
        .filter(|(o, _)| o.counts())
        .filter_map(|(o, &s)| value(o, metric).map(|v| (v, s)))
        .filter(|(v, _)| v.is_finite())
        .unzip();
    let mut failures = 0;
    if matches!(metric, Metric::Ttft | Metric::E2e) {
        for (_, &s) in mine().filter(|(o, _)| o.failed()) {
            values.push(max_time_ms);
            in_strata.push(s);
            failures += 1;
        }
    }
    Values {
        values,
        strata: in_strata,
        failures,
    }
}

/// Each outcome's stratum: its place among the outcomes of its class, in the order given, divided by
/// `stratum` (all 0 when `stratum` is 0).
fn strata(outcomes: &[Outcome], classes: usize, stratum: usize) -> Vec<usize> {
    let mut seen = vec![0usize; classes.max(1)];
    outcomes
        .iter()
        .map(|o| match seen.get_mut(o.class) {
            Some(n) if stratum > 0 => {
                *n += 1;
                (*n - 1) / stratum
            }
            _ => 0,
        })
        .collect()
}

pub fn analyze(design: &Design, outcomes: &[Outcome]) -> Analysis {
    let assignment = assignment(design, outcomes);
    let errors: Vec<ErrorRates> = (0..design.classes.len())
        .map(|c| error_rates(design, outcomes, c))
        .collect();

    // Comparisons first without the decision: Holm needs every p-value.
    struct Raw {
        metric: Metric,
        class: usize,
        primary: bool,
        first: Values,
        second: Values,
        p: Option<f64>,
    }
    let strata = strata(outcomes, design.classes.len(), design.stratum);
    let mut raw = Vec::new();
    for (class, _) in design.classes.iter().enumerate() {
        for (metric, primary) in design.metrics() {
            let [first, second] =
                [0, 1].map(|arm| values(outcomes, &strata, class, arm, metric, design.max_time_ms));
            // van Elteren's test within the strata (Mann-Whitney's with one).
            let p = Strata::new(
                [&first.values, &second.values],
                [&first.strata, &second.strata],
            )
            .and_then(|s| s.test())
            .map(|t| t.p_value)
            .or_else(|| mann_whitney_u(&first.values, &second.values).map(|t| t.p_value));
            raw.push(Raw {
                metric,
                class,
                primary,
                first,
                second,
                p,
            });
        }
    }
    // Comparisons without a test (no samples) count as p = 1 in the family: they are reported.
    let p_values: Vec<f64> = raw.iter().map(|r| r.p.unwrap_or(1.0)).collect();
    let adjusted = holm_adjusted(&p_values);
    let levels = holm_levels(&p_values, design.look_alpha);

    let rule = Rule {
        level: design.look_alpha,
        tost_level: design.look_alpha,
        min_effect: design.min_effect,
        tail_margin: design.tail_margin,
    };
    let comparisons = raw
        .iter()
        .zip(adjusted.iter().zip(&levels))
        .map(|(r, (&p_adjusted, &level))| {
            of_samples(
                r.metric.name(),
                design.classes.get(r.class).cloned(),
                r.primary,
                &design.arms,
                [&r.first.values, &r.second.values],
                Some([&r.first.strata, &r.second.strata]),
                matches!(r.metric, Metric::Ttft | Metric::E2e)
                    .then_some([r.first.failures, r.second.failures]),
                InFamily {
                    p: r.p,
                    p_adjusted,
                    level,
                },
                rule,
                errors.get(r.class).map(|e: &ErrorRates| &e.guardrail),
            )
        })
        .collect();

    let requests_per_class = (0..design.classes.len())
        .map(|c| outcomes.iter().filter(|o| o.class == c).count() as u64)
        .collect();
    let measured_prompt_tokens = (0..design.classes.len())
        .map(|c| {
            let tokens: Vec<f64> = outcomes
                .iter()
                .filter(|o| o.class == c)
                .filter_map(|o| o.prompt_tokens.map(|t| t as f64))
                .collect();
            (!tokens.is_empty()).then(|| tokens.iter().sum::<f64>() / tokens.len() as f64)
        })
        .collect();
    Analysis {
        assignment,
        errors,
        comparisons,
        measured_prompt_tokens,
        requests_per_class,
    }
}

fn assignment(design: &Design, outcomes: &[Outcome]) -> Assignment {
    let mut planned = vec![0u64; design.arms.len()];
    let mut answered = vec![0u64; design.arms.len()];
    let mut reached = vec![0u64; design.arms.len()];
    let (mut misrouted, mut untagged) = (0, 0);
    for o in outcomes {
        let unit = design.unit_start.get(o.class).copied().unwrap_or(true);
        if unit {
            planned[o.assigned] += 1;
            reached[o.assigned] += u64::from(o.reached());
        }
        match o.served {
            Some(served) => {
                answered[served] += u64::from(unit);
                misrouted += u64::from(served != o.assigned);
            }
            None => untagged += 1,
        }
    }
    // Per assigned arm, the requests that reached it against those assigned to it: a failed answer with
    // the arm's tag reached it; an answer from another arm, or one untagged, did not.
    let weights: Vec<f64> = planned.iter().map(|&n| n as f64).collect();
    let srm_p = split_test(&reached, &weights).map(|t| t.p_value);
    let named = |counts: &[u64]| {
        design
            .arms
            .iter()
            .cloned()
            .zip(counts.iter().copied())
            .collect()
    };
    Assignment {
        planned: named(&planned),
        answered: named(&answered),
        reached: named(&reached),
        misrouted,
        untagged,
        srm_p,
        srm_ok: srm_p.is_some_and(|p| p >= design.srm_threshold),
    }
}

fn error_rates(design: &Design, outcomes: &[Outcome], class: usize) -> ErrorRates {
    let mut counts = vec![ErrorCount::default(); design.arms.len()];
    let mut codes: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.class == class) {
        let count = &mut counts[o.assigned];
        count.requests += 1;
        if let Some(error) = &o.error {
            count.errors += 1;
            *codes
                .entry(design.arms[o.assigned].clone())
                .or_default()
                .entry(error.clone())
                .or_default() += 1;
        }
    }
    for c in &mut counts {
        c.rate = if c.requests > 0 {
            c.errors as f64 / c.requests as f64
        } else {
            0.0
        };
    }
    let p = two_proportion(
        counts[0].errors,
        counts[0].requests,
        counts[1].errors,
        counts[1].requests,
    );
    let guardrail = guardrail::errors(
        &design.arms,
        (counts[0].errors, counts[0].requests),
        (counts[1].errors, counts[1].requests),
        design.look_alpha,
        design.error_margin,
    );
    ErrorRates {
        class: design.classes[class].clone(),
        arms: design.arms.iter().cloned().zip(counts).collect(),
        p,
        codes,
        guardrail,
    }
}

/// The raw timings for the plots (requests that count, per class and arm).
pub fn samples(design: &Design, analysis: &Analysis, outcomes: &[Outcome]) -> Samples {
    let classes = design
        .classes
        .iter()
        .enumerate()
        .map(|(c, label)| ClassSamples {
            label: label.clone(),
            prompt_tokens: analysis
                .measured_prompt_tokens
                .get(c)
                .copied()
                .flatten()
                .or(design
                    .prompt_tokens
                    .get(c)
                    .copied()
                    .flatten()
                    .map(f64::from)),
            arms: design
                .arms
                .iter()
                .enumerate()
                .map(|(a, arm)| {
                    let counted = || {
                        outcomes
                            .iter()
                            .filter(move |o| o.class == c && o.assigned == a && o.counts())
                    };
                    ArmSamples {
                        arm: arm.clone(),
                        ttft_ms: counted().filter_map(|o| o.ttft_ms).collect(),
                        itl_ms: counted().flat_map(|o| o.itl_ms.iter().copied()).collect(),
                        e2e_ms: counted().map(|o| o.e2e_ms).collect(),
                    }
                })
                .collect(),
        })
        .collect();
    Samples { classes }
}

/// The measured request counts at which `--until decided` analyses: `looks` evenly spaced points.
pub fn look_points(requests: u64, looks: u32) -> Vec<u64> {
    (1..=u64::from(looks))
        .map(|k| (k * requests).div_ceil(u64::from(looks)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn outcome(class: usize, assigned: usize, served: Option<usize>, e2e: f64) -> Outcome {
        Outcome {
            class,
            assigned,
            served,
            status: Some(200),
            e2e_ms: e2e,
            ..Outcome::default()
        }
    }

    fn design() -> Design {
        Design {
            arms: vec!["nvlink".into(), "fs".into()],
            classes: vec!["128".into()],
            prompt_tokens: vec![Some(128)],
            stream: false,
            look_alpha: 0.05,
            min_effect: 0.05,
            srm_threshold: 0.001,
            max_time_ms: 60_000.0,
            tail_margin: 0.25,
            error_margin: 0.02,
            stratum: STRATUM,
            unit_start: Vec::new(),
        }
    }

    #[test]
    fn misroutes_are_excluded_from_timings_and_fail_the_sample_ratio_check() {
        // Every request for nvlink is served by fs.
        let outcomes: Vec<Outcome> = (0..200)
            .map(|i| outcome(0, i % 2, Some(1), 10.0 + (i % 7) as f64))
            .collect();
        let analysis = analyze(&design(), &outcomes);
        assert_eq!(analysis.assignment.misrouted, 100);
        assert_eq!(analysis.assignment.answered["fs"], 200);
        assert!(!analysis.assignment.srm_ok);
        let c = &analysis.comparisons[0];
        assert_eq!(c.n["nvlink"], 0);
        assert_eq!(c.decision, Decision::Inconclusive);
    }

    #[test]
    fn a_clear_difference_is_faster_and_a_tiny_one_is_equivalent() {
        // 200 requests per arm: enough to show error rates (none here) within the 2 % margin.
        let slow: Vec<Outcome> = (0..400)
            .map(|i| {
                outcome(
                    0,
                    i % 2,
                    Some(i % 2),
                    if i % 2 == 0 { 10.0 } else { 20.0 } + (i % 13) as f64 * 0.1,
                )
            })
            .collect();
        let c = &analyze(&design(), &slow).comparisons[0];
        assert_eq!(
            (c.decision, c.faster.as_deref()),
            (Decision::Faster, Some("nvlink"))
        );
        assert!(c.shift_ms.unwrap() > 9.0 && c.ci_ms.unwrap()[0] > 0.0);
        // 400 per arm: enough to bound each arm's p99 (368 at the 5 % level).
        let same: Vec<Outcome> = (0..800)
            .map(|i| outcome(0, i % 2, Some(i % 2), 100.0 + ((i / 2) % 17) as f64 * 0.1))
            .collect();
        let analysis = analyze(&design(), &same);
        assert_eq!(analysis.comparisons[0].decision, Decision::Equivalent);
        assert!(analysis.decided());
        // With half as many, the p99 cannot be bounded: not equivalent, and the report says why.
        let analysis = analyze(&design(), &same[..400]);
        let c = &analysis.comparisons[0];
        assert_eq!(c.decision, Decision::Inconclusive);
        assert!(
            c.reason().contains("p99 not shown within the tail margin"),
            "{}",
            c.reason()
        );
    }

    #[test]
    fn errors_are_counted_per_assigned_arm_with_their_codes() {
        let mut outcomes: Vec<Outcome> = (0..100)
            .map(|i| outcome(0, i % 2, Some(i % 2), 10.0))
            .collect();
        for o in outcomes.iter_mut().filter(|o| o.assigned == 1).take(20) {
            o.error = Some("status 503".into());
            o.status = Some(503);
        }
        let e = &analyze(&design(), &outcomes).errors[0];
        assert_eq!((e.arms["fs"].errors, e.arms["fs"].requests), (20, 50));
        assert_eq!(e.codes["fs"]["status 503"], 20);
        assert!(e.p.unwrap() < 0.001);
    }

    #[test]
    fn every_assigned_request_counts_and_the_guardrails_name_the_worse_arm() {
        // Arms alike in their typical time; fs answers every 12th request 503 (8 %).
        let failing: Vec<Outcome> = (0..1600)
            .map(|i| {
                let mut o = outcome(0, i % 2, Some(i % 2), 100.0 + ((i / 2) % 17) as f64 * 0.1);
                if i % 2 == 1 && (i / 2) % 12 == 0 {
                    o.error = Some("status 503".into());
                    o.status = Some(503);
                }
                o
            })
            .collect();
        let analysis = analyze(&design(), &failing);
        let c = &analysis.comparisons[0];
        assert_eq!(c.failures.as_ref().unwrap()["fs"], 67);
        assert_eq!(c.n["fs"], 800, "failures are among the requests compared");
        assert_ne!(c.decision, Decision::Equivalent);
        let guard = &analysis.errors[0].guardrail;
        assert_eq!(guard.worse.as_deref(), Some("fs"));
        assert!(c.reason().contains("fs fails more"), "{}", c.reason());
        // The tails are of the answered requests: failures are the error guardrail's, not a tail.
        assert!(
            c.tails
                .iter()
                .all(|t| t.status == guardrail::Status::Within),
            "{:?}",
            c.tails
        );
        // The failed answers carry fs's tag: they reached it, the sample ratio holds.
        assert!(analysis.assignment.srm_ok);

        // fs stalls every 10th request ×6.
        let stalling: Vec<Outcome> = (0..1600)
            .map(|i| {
                let base = 100.0 + ((i / 2) % 17) as f64 * 0.1;
                let stalled = i % 2 == 1 && (i / 2) % 10 == 0;
                outcome(
                    0,
                    i % 2,
                    Some(i % 2),
                    if stalled { 6.0 * base } else { base },
                )
            })
            .collect();
        let c = &analyze(&design(), &stalling).comparisons[0];
        assert_ne!(c.decision, Decision::Equivalent);
        let p99 = c.tails.iter().find(|t| t.quantile == "p99").unwrap();
        assert_eq!(p99.worse.as_deref(), Some("fs"), "{p99:?}");
        assert!(c.reason().contains("fs's p99 is worse"), "{}", c.reason());
    }

    #[test]
    fn strata_are_consecutive_requests_of_a_class_and_take_a_drift_out() {
        // Two classes interleaved: each class's requests are numbered on their own.
        let two: Vec<Outcome> = (0..8).map(|i| outcome(i % 2, 0, Some(0), 1.0)).collect();
        assert_eq!(strata(&two, 2, 2), [0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(strata(&two, 2, 0), [0; 8]);
        // fs is 1.06× nvlink; the load steps ×2 every 64 requests, shared by both arms (balanced
        // blocks of 4). Unstratified, the steps widen the ratio's interval (pairs across a step are far
        // from the ratio); within strata of 16 no pair crosses a step.
        let times = |i: usize| {
            let load = if (i / 64) % 2 == 1 { 2.0 } else { 1.0 };
            let arm = if i % 4 == 1 || i % 4 == 2 { 1.06 } else { 1.0 };
            let mut z = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^= z >> 31;
            let spread = (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            load * arm * 100.0 * (0.6 * spread).exp()
        };
        let drifting: Vec<Outcome> = (0..1600)
            .map(|i| {
                let assigned = usize::from(i % 4 == 1 || i % 4 == 2);
                outcome(0, assigned, Some(assigned), times(i))
            })
            .collect();
        let stratified = &analyze(&design(), &drifting).comparisons[0];
        let unstratified = &analyze(
            &Design {
                stratum: 0,
                ..design()
            },
            &drifting,
        )
        .comparisons[0];
        let width = |c: &Comparison| {
            let [lo, hi] = c.ratio_ci.unwrap();
            hi / lo
        };
        assert!(
            width(stratified).ln() < 0.6 * width(unstratified).ln(),
            "{:?} against {:?}",
            stratified.ratio_ci,
            unstratified.ratio_ci
        );
        let [lo, hi] = stratified.ratio_ci.unwrap();
        assert!(lo <= 1.06 && 1.06 <= hi, "{lo} {hi}");
        assert!(stratified.p.unwrap() < unstratified.p.unwrap());
    }

    #[test]
    fn the_effect_is_a_ratio_with_an_interval_that_must_clear_the_margin() {
        // fs takes 1.10× nvlink's time on every request: the ratio, not the shift over a median.
        let times = |arm: usize, i: usize| {
            let base = 80.0 + ((i / 2) * 7 % 41) as f64;
            if arm == 1 {
                1.1 * base
            } else {
                base
            }
        };
        let outcomes: Vec<Outcome> = (0..800)
            .map(|i| outcome(0, i % 2, Some(i % 2), times(i % 2, i)))
            .collect();
        let c = &analyze(&design(), &outcomes).comparisons[0];
        let [lo, hi] = c.ratio_ci.unwrap();
        assert!(lo <= 1.1 && 1.1 <= hi, "{lo} {hi}");
        assert!((c.ratio.unwrap() - 1.1).abs() < 0.01);
        assert_eq!(c.faster.as_deref(), Some("nvlink"));
        // A true ×1.04 with a 5 % margin is never "faster by at least 5 %".
        let small: Vec<Outcome> = (0..800)
            .map(|i| {
                let t = times(0, i) * if i % 2 == 1 { 1.04 } else { 1.0 };
                outcome(0, i % 2, Some(i % 2), t)
            })
            .collect();
        let c = &analyze(&design(), &small).comparisons[0];
        assert_ne!(c.decision, Decision::Faster, "{:?}", c.ratio_ci);
    }
}
