//! One comparison of two arms on one metric (and class), and the one rule that decides it: the same for
//! `kvab experiment` (per-request samples) and `kvab analyze` (Prometheus histograms).
//!
//! A comparison is decided `faster` when Holm rejects "no difference" at the analysis's level, the
//! interval of the shift excludes zero and the shift is at least `min_effect` of the first arm's median;
//! `equivalent` when the interval, relative to that median, lies inside ±`min_effect`; otherwise
//! `inconclusive`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::binned::Histogram;
use crate::stats::{hodges_lehmann, percentile, shift_interval};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Faster,
    Equivalent,
    Inconclusive,
}

/// What decides a comparison: the family-wise level of this analysis (`alpha`, or `alpha / looks` for
/// an experiment that looks several times) and the smallest relative effect that matters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    pub level: f64,
    pub min_effect: f64,
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
    /// `shift_ms` relative to the first arm's median.
    pub relative: Option<f64>,
    /// `ci_ms` relative to the first arm's median.
    pub relative_ci: Option<[f64; 2]>,
    /// Mann-Whitney U two-sided p-value, and after Holm's correction across every comparison.
    pub p: Option<f64>,
    pub p_adjusted: Option<f64>,
    pub decision: Decision,
    pub faster: Option<String>,
    /// For an inconclusive comparison of samples: an estimate of the further measured requests (both
    /// arms) the interval needs to decide; `null` when no estimate can be made (always for histograms,
    /// whose interval cannot shrink below the buckets' width).
    pub more_requests: Option<u64>,
    /// Histograms only: the most buckets an arm's histogram has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<usize>,
    /// Histograms only: per arm, (bucket upper bound, fraction of the requests at or below it) for every
    /// finite bound: the whole histogram the comparison was made on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdf: Option<BTreeMap<String, Vec<[f64; 2]>>>,
}

impl Comparison {
    fn new(metric: &'static str, class: Option<String>, primary: bool, level: f64) -> Self {
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
            relative: None,
            relative_ci: None,
            p: None,
            p_adjusted: None,
            decision: Decision::Inconclusive,
            faster: None,
            more_requests: None,
            buckets: None,
            cdf: None,
        }
    }

    /// The one rule (see the module's documentation). `arms`: the first and second arm.
    fn decide(&mut self, arms: &[String], rule: Rule) {
        self.decision = Decision::Inconclusive;
        self.faster = None;
        let (Some(p_adjusted), Some(relative), Some([lo, hi]), Some([rlo, rhi])) =
            (self.p_adjusted, self.relative, self.ci_ms, self.relative_ci)
        else {
            return;
        };
        if p_adjusted <= rule.level && (lo > 0.0 || hi < 0.0) && relative.abs() >= rule.min_effect {
            // shift = second − first: positive means the first arm is faster.
            let faster = if relative > 0.0 {
                arms.first()
            } else {
                arms.get(1)
            };
            if let Some(arm) = faster {
                self.decision = Decision::Faster;
                self.faster = Some(arm.clone());
                return;
            }
        }
        if rlo > -rule.min_effect && rhi < rule.min_effect {
            self.decision = Decision::Equivalent;
        }
    }

    /// `nvlink faster`, `equivalent`, `inconclusive (~N more requests)`.
    pub fn decision_text(&self) -> String {
        match (self.decision, &self.faster) {
            (Decision::Faster, Some(arm)) => format!("{arm} faster"),
            (Decision::Equivalent, _) => "equivalent".into(),
            _ => match self.more_requests {
                Some(more) => format!("inconclusive (~{more} more requests)"),
                None => "inconclusive".into(),
            },
        }
    }

    /// The comparison as a reason of the verdict: `ttft_ms short: nvlink faster by 12.3%`,
    /// `request_duration_ms: equivalent`.
    pub fn reason(&self) -> String {
        let what = match &self.class {
            Some(class) => format!("{} {class}", self.metric),
            None => self.metric.to_string(),
        };
        match (self.decision, &self.faster) {
            (Decision::Faster, Some(arm)) => format!(
                "{what}: {arm} faster by {:.1}%",
                100.0 * self.relative.unwrap_or(0.0).abs()
            ),
            (Decision::Equivalent, _) => format!("{what}: equivalent"),
            _ => format!("{what}: inconclusive"),
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
/// distribution-free interval at the Holm level, and the decision.
pub fn of_samples(
    metric: &'static str,
    class: Option<String>,
    primary: bool,
    arms: &[String],
    [first, second]: [&[f64]; 2],
    family: InFamily,
    rule: Rule,
) -> Comparison {
    let mut c = Comparison::new(metric, class, primary, family.level);
    for (arm, v) in arms.iter().zip([first, second]) {
        c.n.insert(arm.clone(), v.len() as u64);
        for (q, map) in [(50.0, &mut c.p50), (90.0, &mut c.p90), (99.0, &mut c.p99)] {
            if let Some(x) = percentile(v, q) {
                map.insert(arm.clone(), x);
            }
        }
    }
    let base = percentile(first, 50.0);
    let ci = shift_interval(first, second, family.level);
    c.shift_ms = hodges_lehmann(first, second);
    c.ci_ms = ci.map(|(lo, hi)| [lo, hi]);
    if let Some(base) = base.filter(|b| *b > 0.0) {
        c.relative = c.shift_ms.map(|s| s / base);
        c.relative_ci = c.ci_ms.map(|[lo, hi]| [lo / base, hi / base]);
    }
    c.p = family.p;
    c.p_adjusted = family.p.map(|_| family.p_adjusted);
    c.decide(arms, rule);
    if c.decision == Decision::Inconclusive {
        let n = (first.len() + second.len()) as u64;
        c.more_requests = more_requests(rule.min_effect, n, ci, c.shift_ms, base);
    }
    c
}

/// Two arms' histograms of one metric, compared: Prometheus's quantile estimates with the median's
/// bucket, the difference of the medians with an interval widened to bucket edges, and the decision.
/// An arm with fewer than `min_requests` requests is shown but not tested. `family.p`: the histograms'
/// `binned::mann_whitney` p-value, which Holm's correction needed first.
pub fn of_histograms(
    metric: &'static str,
    primary: bool,
    arms: &[String],
    histograms: &[Option<Histogram>],
    family: InFamily,
    rule: Rule,
    min_requests: u64,
) -> Comparison {
    let level = family.level;
    let mut c = Comparison::new(metric, None, primary, level);
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
    let (Some((_, _, median_a)), Some((_, _, median_b))) = (a.quantile(0.5), b.quantile(0.5))
    else {
        return c;
    };
    c.shift_ms = Some(median_b - median_a);
    // Each median's interval at half the level: both hold together with probability ≥ 1 − level.
    if let (Some((a_lo, a_hi)), Some((b_lo, b_hi))) = (
        a.median_interval(level / 2.0),
        b.median_interval(level / 2.0),
    ) {
        let (lo, hi) = (b_lo - a_hi, b_hi - a_lo);
        if lo.is_finite() && hi.is_finite() {
            c.ci_ms = Some([lo, hi]);
        }
    }
    if median_a > 0.0 {
        c.relative = c.shift_ms.map(|s| s / median_a);
        c.relative_ci = c.ci_ms.map(|[lo, hi]| [lo / median_a, hi / median_a]);
    }
    c.decide(arms, rule);
    c
}

/// Further requests (this class, both arms) until the interval is narrow enough to decide, assuming its
/// width shrinks as 1/√n: to exclude zero when the shift is at least the margin, else to fit inside it.
fn more_requests(
    min_effect: f64,
    n: u64,
    ci: Option<(f64, f64)>,
    shift: Option<f64>,
    base: Option<f64>,
) -> Option<u64> {
    let ((lo, hi), shift, base) = (ci?, shift?, base?);
    let half = (hi - lo) / 2.0;
    let margin = min_effect * base;
    let target = if shift.abs() >= margin {
        shift.abs()
    } else {
        margin - shift.abs()
    };
    if !(target > 0.0 && half > 0.0 && n > 0) {
        return None;
    }
    let factor = (half / target).powi(2);
    let more = (n as f64 * (factor - 1.0)).ceil();
    (more.is_finite() && more < 1e12).then(|| more.max(1.0) as u64)
}
