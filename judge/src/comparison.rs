//! One comparison of two arms on one metric (and class), and the one rule that decides it: the same for
//! `kvab experiment` (per-request samples) and `kvab analyze` (Prometheus histograms).
//!
//! The effect is a ratio: the second arm's time over the first's (for samples, the exponential of the
//! Hodges–Lehmann shift of log times, with its distribution-free interval; for histograms, the ratio of
//! the medians with an interval from the medians' intervals). A comparison is decided
//! - `faster` when Holm rejects "no difference" at the analysis's level and the ratio's interval at that
//!   level lies wholly beyond the margin: at or above `1 + min_effect` (the first arm faster by at least
//!   the margin) or at or below `1 / (1 + min_effect)` (the second arm faster); and no guardrail shows
//!   the faster arm worse (`crate::guardrail`: its tail, or its error rate; its failures are already in
//!   the comparison, ranked worst, so its error rate holds it back only when shown higher);
//! - `equivalent` when the ratio's `1 − 2·tost_level` interval lies inside `(1/(1+min_effect),
//!   1+min_effect)` (two one-sided tests at `tost_level`) and every guardrail is `within`;
//!   For histograms `equivalent` also needs `min_effect` above the smallest margin the buckets around
//!   the medians allow (`crate::resolution`);
//! - otherwise `inconclusive`, with `blocked` naming the guardrails that held a decision back, and the
//!   smallest effect its window would have found (`crate::power`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::binned::Histogram;
use crate::guardrail::{self, ErrorGuard, Status, Tail};
use crate::power::{detectable_ratio, more_requests};
use crate::resolution::{resolution, Keeping, Resolution};
use crate::stats::stratified::Strata;
use crate::stats::{hodges_lehmann, percentile, shift_interval};

/// The tails every comparison guards.
pub const TAILS: [f64; 2] = [0.9, 0.99];

/// Times at or below this (ms) are taken as it on the log scale: a time of 0 has no logarithm.
const LOG_FLOOR_MS: f64 = 1e-3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Faster,
    Equivalent,
    Inconclusive,
}

/// What decides a comparison: the family-wise level of this analysis (`alpha`, or its look's share of
/// alpha for an experiment that looks several times, `crate::sequential`) for `faster`, the level of the
/// equivalence test and the guardrails (the same level, not divided across the family: every part of an
/// `equivalent` must hold, see `crate::guardrail`), the smallest relative effect that matters and the
/// guardrails' margins.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    pub level: f64,
    pub tost_level: f64,
    pub min_effect: f64,
    /// The tails' margin, relative: a tail is `within` when its ratio's interval is inside
    /// `(1/(1+tail_margin), 1+tail_margin)`.
    pub tail_margin: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// `ttft_ms`, `itl_ms`, `tpot_ms`, `e2e_ms` (experiment); `request_duration_ms`,
    /// `time_to_first_byte_ms` and vLLM's histograms (analyze).
    pub metric: &'static str,
    /// The prompt class (experiment); absent where the traffic is judged as one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Primary comparisons decide the verdict.
    pub primary: bool,
    /// Requests per arm (for histograms, Prometheus's `increase()` rounded to whole requests).
    pub n: BTreeMap<String, u64>,
    /// Sample percentiles, or Prometheus's interpolated estimates for histograms.
    pub p50: BTreeMap<String, f64>,
    /// Histograms only: the bucket that holds each arm's median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_bucket: Option<BTreeMap<String, [f64; 2]>>,
    pub p90: BTreeMap<String, f64>,
    pub p99: BTreeMap<String, f64>,
    /// Second arm minus first (positive: the first arm is faster): the Hodges–Lehmann shift of samples,
    /// the difference of the medians' estimates of histograms.
    pub shift_ms: Option<f64>,
    /// Its distribution-free interval at `1 − ci_level_alpha` (for histograms widened to bucket edges).
    pub ci_ms: Option<[f64; 2]>,
    pub ci_level_alpha: f64,
    /// The second arm's time over the first's (above 1: the first arm is faster).
    pub ratio: Option<f64>,
    /// Its interval at `1 − ci_level_alpha` (Holm's level): `faster` needs it wholly beyond the margin.
    /// For histograms its upper end is unbounded (`null`) when the first arm's median may be 0.
    pub ratio_ci: Option<[f64; 2]>,
    /// Its interval at `1 − 2·tost_alpha`: `equivalent` needs it inside the margin.
    pub equivalence_ci: Option<[f64; 2]>,
    pub tost_alpha: f64,
    /// `ratio − 1`: the first arm's advantage as a fraction (negative: the second arm's).
    pub relative: Option<f64>,
    /// `ratio_ci − 1`.
    pub relative_ci: Option<[f64; 2]>,
    /// Samples only: per arm, the failed requests among `n` (ranked worst, at `--max-time`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures: Option<BTreeMap<String, u64>>,
    /// The tails guarded (`TAILS`), each with its ratio, interval and status.
    pub tails: Vec<Tail>,
    /// What held a decision back, one sentence per guardrail (empty when nothing did).
    pub blocked: Vec<String>,
    /// Mann-Whitney U two-sided p-value, and after Holm's correction across every comparison.
    pub p: Option<f64>,
    pub p_adjusted: Option<f64>,
    pub decision: Decision,
    pub faster: Option<String>,
    /// For an inconclusive comparison of samples: an estimate of the further measured requests (both
    /// arms) the interval needs to decide; `null` when no estimate can be made (always for histograms,
    /// whose interval cannot shrink below the buckets' width), or when a guardrail held the decision
    /// back (`blocked`: a narrower interval of the ratio would not clear it).
    pub more_requests: Option<u64>,
    /// For an inconclusive comparison: the smallest ratio, either way, its window would have decided
    /// `faster` with 80 % power (`crate::power::detectable_ratio`); `null` when decided or unbounded.
    pub detectable_ratio: Option<f64>,
    /// Histograms only: how finely the buckets know each median and the smallest margin of
    /// equivalence that allows (`crate::resolution`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    /// Histograms only: the most buckets an arm's histogram has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<usize>,
    /// Histograms only: per arm, (bucket upper bound, fraction of the requests at or below it) for every
    /// finite bound: the whole histogram the comparison was made on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdf: Option<BTreeMap<String, Vec<[f64; 2]>>>,
}

impl Comparison {
    /// `level`: the Holm level this comparison's intervals are made at.
    fn new(
        metric: &'static str,
        class: Option<String>,
        primary: bool,
        level: f64,
        rule: Rule,
    ) -> Self {
        Comparison {
            metric,
            class,
            primary,
            n: BTreeMap::new(),
            p50: BTreeMap::new(),
            p50_bucket: None,
            p90: BTreeMap::new(),
            p99: BTreeMap::new(),
            shift_ms: None,
            ci_ms: None,
            ci_level_alpha: level,
            ratio: None,
            ratio_ci: None,
            equivalence_ci: None,
            tost_alpha: rule.tost_level,
            relative: None,
            relative_ci: None,
            failures: None,
            tails: Vec::new(),
            blocked: Vec::new(),
            p: None,
            p_adjusted: None,
            decision: Decision::Inconclusive,
            faster: None,
            more_requests: None,
            detectable_ratio: None,
            resolution: None,
            buckets: None,
            cdf: None,
        }
    }

    /// The one rule (see the module's documentation). `arms`: the first and second arm; `errors`: the
    /// error-rate guardrail of the requests compared, where there is one.
    fn decide(&mut self, arms: &[String], rule: Rule, errors: Option<&ErrorGuard>) {
        self.decision = Decision::Inconclusive;
        self.faster = None;
        self.blocked.clear();
        self.relative = self.ratio.map(|r| r - 1.0);
        self.relative_ci = self.ratio_ci.map(|[lo, hi]| [lo - 1.0, hi - 1.0]);
        let band = 1.0 + rule.min_effect;
        let faster = match (self.p_adjusted, self.ratio_ci) {
            (Some(p), Some([lo, hi])) if p <= rule.level => {
                if lo >= band {
                    arms.first()
                } else if hi <= 1.0 / band {
                    arms.get(1)
                } else {
                    None
                }
            }
            _ => None,
        };
        if let Some(arm) = faster {
            let held: Vec<String> = self
                .tails
                .iter()
                .filter(|t| t.status == Status::Worse && t.worse.as_ref() == Some(arm))
                .map(|t| t.sentence(arms))
                .chain(
                    errors
                        .filter(|g| g.status == Status::Worse && g.worse.as_ref() == Some(arm))
                        .map(|g| g.sentence(arms)),
                )
                .collect();
            if held.is_empty() {
                self.decision = Decision::Faster;
                self.faster = Some(arm.clone());
            } else {
                self.blocked = held;
            }
            return;
        }
        let centre_equivalent = self
            .equivalence_ci
            .is_some_and(|[lo, hi]| lo > 1.0 / band && hi < band);
        if centre_equivalent {
            self.blocked = self
                .tails
                .iter()
                .filter(|t| t.status != Status::Within)
                .map(|t| t.sentence(arms))
                .chain(
                    errors
                        .filter(|g| g.status != Status::Within)
                        .map(|g| g.sentence(arms)),
                )
                .collect();
            if self.blocked.is_empty() {
                self.decision = Decision::Equivalent;
            }
        }
    }

    /// `×1.300`: the ratio as tables show it.
    pub fn ratio_text(&self) -> String {
        self.ratio.map_or("-".into(), |r| format!("×{r:.3}"))
    }

    /// `×1.083`: `detectable_ratio` as tables show it, `-` without one.
    pub fn detectable_text(&self) -> String {
        self.detectable_ratio
            .map_or("-".into(), |r| format!("×{r:.3}"))
    }

    /// Why the resolution refuses `equivalent`, when it does.
    fn refused(&self) -> Option<&str> {
        self.resolution.as_ref()?.refused.as_deref()
    }

    /// `[1.280, 1.320]`, `[2.000, ∞]`: `ratio_ci` as tables show it.
    pub fn ratio_ci_text(&self) -> String {
        let end = |v: f64| {
            if v.is_finite() {
                format!("{v:.3}")
            } else {
                "∞".into()
            }
        };
        self.ratio_ci
            .map_or("-".into(), |[lo, hi]| format!("[{}, {}]", end(lo), end(hi)))
    }

    /// `p90 ok, p99 fs worse`: the tails as tables show them.
    pub fn tails_text(&self) -> String {
        let tails: Vec<String> = self.tails.iter().map(Tail::short).collect();
        if tails.is_empty() {
            "-".into()
        } else {
            tails.join(", ")
        }
    }

    /// `nvlink faster`, `equivalent`, `inconclusive (~N more requests)`, `inconclusive (guardrail)` (held
    /// back by a guardrail: `blocked` says which).
    pub fn decision_text(&self) -> String {
        match (self.decision, &self.faster) {
            (Decision::Faster, Some(arm)) => format!("{arm} faster"),
            (Decision::Equivalent, _) => "equivalent".into(),
            _ if !self.blocked.is_empty() => "inconclusive (guardrail)".into(),
            _ => match (self.more_requests, self.refused()) {
                (Some(more), _) => format!("inconclusive (~{more} more requests)"),
                (None, Some(_)) => "inconclusive (resolution)".into(),
                (None, None) => "inconclusive".into(),
            },
        }
    }

    /// The comparison as a reason of the verdict: `ttft_ms short: nvlink faster by 12.3% [8.1%, 16.0%]`,
    /// `request_duration_ms: equivalent (×1.004 [0.981, 1.028])`, `ttft_ms 128: inconclusive: fs's p99 is
    /// worse (×6.10 [3.95, 8.20])`.
    /// When requests failed: ` (fs: 40 of 80 failed, ranked at --max-time)`.
    pub fn reason(&self) -> String {
        format!("{}{}", self.decision_reason(), self.failures_note())
    }

    fn failures_note(&self) -> String {
        let failed: Vec<String> = self
            .failures
            .iter()
            .flatten()
            .filter(|(_, n)| **n > 0)
            .map(|(arm, n)| format!("{arm}: {n} of {} failed", self.n.get(arm).unwrap_or(&0)))
            .collect();
        if failed.is_empty() {
            String::new()
        } else {
            format!(" ({}, ranked at --max-time)", failed.join(", "))
        }
    }

    fn decision_reason(&self) -> String {
        let what = match &self.class {
            Some(class) => format!("{} {class}", self.metric),
            None => self.metric.to_string(),
        };
        match (self.decision, &self.faster, self.ratio, self.ratio_ci) {
            (Decision::Faster, Some(arm), Some(ratio), Some([lo, hi])) => {
                // As the faster arm's advantage: the slower arm's time over the faster's, minus one.
                let (r, lo, hi) = if ratio >= 1.0 {
                    (ratio, lo, hi)
                } else {
                    (1.0 / ratio, 1.0 / hi, 1.0 / lo)
                };
                let percent = |v: f64| {
                    if v.is_finite() {
                        format!("{:.1}%", 100.0 * (v - 1.0))
                    } else {
                        "∞".into()
                    }
                };
                format!(
                    "{what}: {arm} faster by {} [{}, {}]",
                    percent(r),
                    percent(lo),
                    percent(hi)
                )
            }
            (Decision::Equivalent, ..) => match (self.ratio, self.equivalence_ci) {
                (Some(r), Some([lo, hi])) => {
                    format!("{what}: equivalent (×{r:.3} [{lo:.3}, {hi:.3}])")
                }
                _ => format!("{what}: equivalent"),
            },
            _ if !self.blocked.is_empty() => {
                format!("{what}: inconclusive: {}", self.blocked.join(", "))
            }
            _ => {
                let detectable = self
                    .detectable_ratio
                    .map_or(String::new(), |r| format!(" (80 % power from ×{r:.3})"));
                let refused = self
                    .refused()
                    .map_or(String::new(), |why| format!("; {why}"));
                format!("{what}: inconclusive{detectable}{refused}")
            }
        }
    }
}

/// Where a comparison sits in its family: its Mann-Whitney p-value, that p-value after Holm's
/// correction, and the Holm level it is judged at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InFamily {
    pub p: Option<f64>,
    pub p_adjusted: f64,
    pub level: f64,
}

/// Two arms' samples of one metric and class, compared: percentiles, the Hodges–Lehmann shift with its
/// distribution-free interval at the Holm level, the same on log times for the ratio (and its
/// equivalence interval), the tails, and the decision. `failures`: how many of each arm's values are
/// failed requests, ranked worst: the last ones of its slice. The tails are of the answered requests
/// (the values before them): failures are the error guardrail's, and a tail of failures ranked at
/// `--max-time` would say nothing of the arm's times. `errors`: the class's error guardrail.
#[allow(clippy::too_many_arguments)]
pub fn of_samples<'a>(
    metric: &'static str,
    class: Option<String>,
    primary: bool,
    arms: &[String],
    [first, second]: [&'a [f64]; 2],
    strata: Option<[&[usize]; 2]>,
    failures: Option<[u64; 2]>,
    family: InFamily,
    rule: Rule,
    errors: Option<&ErrorGuard>,
) -> Comparison {
    let mut c = Comparison::new(metric, class, primary, family.level, rule);
    for (arm, v) in arms.iter().zip([first, second]) {
        c.n.insert(arm.clone(), v.len() as u64);
        for (q, map) in [(50.0, &mut c.p50), (90.0, &mut c.p90), (99.0, &mut c.p99)] {
            if let Some(x) = percentile(v, q) {
                map.insert(arm.clone(), x);
            }
        }
    }
    c.failures = failures.map(|f| arms.iter().cloned().zip(f).collect());
    let (log_first, log_second) = (log_times(first), log_times(second));
    let exp = |(lo, hi): (f64, f64)| [lo.exp(), hi.exp()];
    match strata {
        // Within strata: each stratum's pairs alone (`crate::stats::stratified`).
        Some(strata) if strata.iter().flat_map(|s| s.iter()).any(|&s| s > 0) => {
            let times = Strata::new([first, second], strata);
            let logs = Strata::new([&log_first, &log_second], strata);
            c.shift_ms = times.as_ref().and_then(Strata::shift);
            c.ci_ms = times
                .as_ref()
                .and_then(|t| t.interval(family.level))
                .map(|(lo, hi)| [lo, hi]);
            c.ratio = logs.as_ref().and_then(Strata::shift).map(f64::exp);
            c.ratio_ci = logs
                .as_ref()
                .and_then(|l| l.interval(family.level))
                .map(exp);
            c.equivalence_ci = logs
                .as_ref()
                .and_then(|l| l.interval(2.0 * rule.tost_level))
                .map(exp);
        }
        _ => {
            c.shift_ms = hodges_lehmann(first, second);
            c.ci_ms = shift_interval(first, second, family.level).map(|(lo, hi)| [lo, hi]);
            c.ratio = hodges_lehmann(&log_first, &log_second).map(f64::exp);
            c.ratio_ci = shift_interval(&log_first, &log_second, family.level).map(exp);
            c.equivalence_ci =
                shift_interval(&log_first, &log_second, 2.0 * rule.tost_level).map(exp);
        }
    }
    let [failed_first, failed_second] = failures.unwrap_or([0, 0]);
    let answered = |v: &'a [f64], failed: u64| {
        let n = v
            .len()
            .saturating_sub(usize::try_from(failed).unwrap_or(usize::MAX));
        v.get(..n).unwrap_or(v)
    };
    let answered = [
        answered(first, failed_first),
        answered(second, failed_second),
    ];
    c.tails = guardrail::of_samples(&TAILS, arms, answered, rule.tost_level, rule.tail_margin);
    c.p = family.p;
    c.p_adjusted = family.p.map(|_| family.p_adjusted);
    c.decide(arms, rule, errors);
    // A guardrail that holds the decision back is not cleared by a narrower interval of the ratio.
    if c.decision == Decision::Inconclusive && c.blocked.is_empty() {
        let n = (first.len() + second.len()) as u64;
        let intervals = [c.ratio_ci, c.equivalence_ci];
        c.more_requests = more_requests(c.ratio, intervals, rule.min_effect, n);
    }
    c.detectable_ratio = detectable(&c, rule);
    c
}

/// `detectable_ratio` of an inconclusive comparison.
fn detectable(c: &Comparison, rule: Rule) -> Option<f64> {
    (c.decision == Decision::Inconclusive)
        .then(|| detectable_ratio(c.ratio_ci, c.ci_level_alpha, rule.min_effect))
        .flatten()
}

/// Times on the log scale (at least `LOG_FLOOR_MS`).
fn log_times(times: &[f64]) -> Vec<f64> {
    times.iter().map(|x| x.max(LOG_FLOOR_MS).ln()).collect()
}

/// The ratio of two arms' times as comparisons estimate it: the second arm's over the first's, the
/// exponential of the Hodges–Lehmann shift of log times. `None` when an arm has no time.
pub fn ratio_of_samples(first: &[f64], second: &[f64]) -> Option<f64> {
    hodges_lehmann(&log_times(first), &log_times(second)).map(f64::exp)
}

/// Two arms' histograms of one metric, compared: Prometheus's quantile estimates with the median's
/// bucket, the difference and the ratio of the medians with intervals widened to bucket edges, the tails,
/// and the decision. An arm with fewer than `min_requests` requests is shown but not tested.
/// `family.p`: the histograms' `binned::mann_whitney` p-value, which Holm's correction needed first;
/// `keeping`: how the values were kept before they were binned; `equivalent` is refused where the
/// buckets around the medians allow no margin as small as `min_effect` (`crate::resolution`);
/// `errors`: the window's error guardrail.
#[allow(clippy::too_many_arguments)]
pub fn of_histograms(
    metric: &'static str,
    primary: bool,
    arms: &[String],
    histograms: &[Option<Histogram>],
    family: InFamily,
    rule: Rule,
    min_requests: u64,
    keeping: Keeping,
    errors: Option<&ErrorGuard>,
) -> Comparison {
    let level = family.level;
    let mut c = Comparison::new(metric, None, primary, level, rule);
    c.buckets = Some(
        histograms
            .iter()
            .flatten()
            .map(|h| h.upper.len())
            .max()
            .unwrap_or(0),
    );
    let (mut p50_bucket, mut cdf) = (BTreeMap::new(), BTreeMap::new());
    for (arm, h) in arms.iter().zip(histograms) {
        let Some(h) = h else { continue };
        c.n.insert(arm.clone(), h.total().round() as u64);
        cdf.insert(arm.clone(), h.cumulative_fractions());
        if let Some((lo, hi, estimate)) = h.quantile(0.5) {
            c.p50.insert(arm.clone(), estimate);
            p50_bucket.insert(arm.clone(), [lo, hi]);
        }
        for (q, map) in [(0.9, &mut c.p90), (0.99, &mut c.p99)] {
            if let Some((_, _, estimate)) = h.quantile(q) {
                map.insert(arm.clone(), estimate);
            }
        }
    }
    c.p50_bucket = Some(p50_bucket);
    c.cdf = Some(cdf);
    let (Some(Some(a)), Some(Some(b))) = (histograms.first(), histograms.get(1)) else {
        return c;
    };
    if a.total() < min_requests as f64 || b.total() < min_requests as f64 {
        return c;
    }
    c.p = family.p;
    c.p_adjusted = c.p.map(|_| family.p_adjusted);
    c.tails = TAILS
        .iter()
        .map(|&q| guardrail::of_histograms(q, arms, [a, b], rule.tost_level, rule.tail_margin))
        .collect();
    let (Some((_, _, median_a)), Some((_, _, median_b))) = (a.quantile(0.5), b.quantile(0.5))
    else {
        return c;
    };
    c.shift_ms = Some(median_b - median_a);
    if median_a > 0.0 {
        c.ratio = Some(median_b / median_a);
    }
    // Each median's two-sided interval at `alpha`: the difference's and the ratio's ends then each hold
    // with probability ≥ 1 − alpha (one-sided), together ≥ 1 − 2·alpha.
    let bounds = |alpha: f64| -> Option<([f64; 2], Option<[f64; 2]>)> {
        let (a_lo, a_hi) = a.median_interval(alpha)?;
        let (b_lo, b_hi) = b.median_interval(alpha)?;
        let difference = [b_lo - a_hi, b_hi - a_lo];
        // A median in the first bucket has 0 as its lower edge: the ratio is then unbounded above
        // (`null` in JSON), which still lets it show the first arm faster.
        let ratio = (a_hi > 0.0).then(|| {
            let high = if a_lo > 0.0 {
                b_hi / a_lo
            } else {
                f64::INFINITY
            };
            [b_lo / a_hi, high]
        });
        difference.iter().all(|v| v.is_finite()).then_some((
            difference,
            ratio.filter(|[lo, hi]| lo.is_finite() && !hi.is_nan()),
        ))
    };
    // The Holm-level intervals: each median at half the level, both hold with probability ≥ 1 − level.
    if let Some((difference, ratio)) = bounds(level / 2.0) {
        c.ci_ms = Some(difference);
        c.ratio_ci = ratio;
    }
    c.equivalence_ci = bounds(rule.tost_level).and_then(|(_, ratio)| ratio);
    c.decide(arms, rule, errors);
    let resolution = resolution(arms, [a, b], keeping, rule.min_effect);
    if resolution.refused.is_some() && c.decision == Decision::Equivalent {
        c.decision = Decision::Inconclusive;
    }
    c.resolution = Some(resolution);
    c.detectable_ratio = detectable(&c, rule);
    c
}
