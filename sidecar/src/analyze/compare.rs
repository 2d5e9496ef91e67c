//! The comparisons of the arms' histograms (test, effect, decision) and the verdict on the whole report.
//! No I/O here.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::experiment::report::{Decision, Verdict};
use kvab_judge::stats::format_p;

use super::options::AnalyzeArgs;
use super::report::Report;
use kvab_judge::binned::{mann_whitney, Histogram};

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// `request_duration_ms` (the filter's request start to end of stream) or `time_to_first_byte_ms`
    /// (request start to the first response body byte).
    pub metric: &'static str,
    pub primary: bool,
    pub n: BTreeMap<String, f64>,
    /// Prometheus's interpolated estimate, and the bucket that holds the quantile.
    pub p50: BTreeMap<String, f64>,
    pub p50_bucket: BTreeMap<String, [f64; 2]>,
    pub p90: BTreeMap<String, f64>,
    pub p99: BTreeMap<String, f64>,
    /// Difference of the medians' estimates, second minus first (positive: the first arm is faster).
    pub shift_ms: Option<f64>,
    /// Distribution-free interval of the difference of the medians, widened to bucket edges.
    pub ci_ms: Option<[f64; 2]>,
    pub ci_level_alpha: f64,
    pub relative: Option<f64>,
    pub relative_ci: Option<[f64; 2]>,
    pub p: Option<f64>,
    pub p_adjusted: Option<f64>,
    pub decision: Decision,
    pub faster: Option<String>,
    pub buckets: usize,
    /// Per arm, (bucket upper bound, fraction of the requests at or below it) for every finite bound:
    /// the whole histogram the comparison was made on.
    pub cdf: BTreeMap<String, Vec<[f64; 2]>>,
}

impl Comparison {
    /// `nvlink faster`, `equivalent` or `inconclusive`.
    pub fn decision_text(&self) -> String {
        match (self.decision, &self.faster) {
            (Decision::Faster, Some(arm)) => format!("{arm} faster"),
            (Decision::Equivalent, _) => "equivalent".into(),
            _ => "inconclusive".into(),
        }
    }
}
/// One metric's comparison of the two arms' histograms at Holm's `level` (`p_adjusted`: its Holm-adjusted
/// p-value in the family).
pub fn compare(
    metric: &'static str,
    primary: bool,
    arms: &[String],
    histograms: &[Option<Histogram>],
    p_adjusted: f64,
    level: f64,
    args: &AnalyzeArgs,
) -> Comparison {
    let mut c = Comparison {
        metric,
        primary,
        n: BTreeMap::new(),
        p50: BTreeMap::new(),
        p50_bucket: BTreeMap::new(),
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
        buckets: histograms
            .iter()
            .flatten()
            .map(|h| h.upper.len())
            .max()
            .unwrap_or(0),
        cdf: BTreeMap::new(),
    };
    for (arm, h) in arms.iter().zip(histograms) {
        let Some(h) = h else { continue };
        c.n.insert(arm.clone(), h.total());
        c.cdf.insert(arm.clone(), h.cumulative_fractions());
        if let Some((lo, hi, estimate)) = h.quantile(0.5) {
            c.p50.insert(arm.clone(), estimate);
            c.p50_bucket.insert(arm.clone(), [lo, hi]);
        }
        for (q, map) in [(0.9, &mut c.p90), (0.99, &mut c.p99)] {
            if let Some((_, _, estimate)) = h.quantile(q) {
                map.insert(arm.clone(), estimate);
            }
        }
    }
    let (Some(Some(a)), Some(Some(b))) = (histograms.first(), histograms.get(1)) else {
        return c;
    };
    if a.total() < args.min_requests as f64 || b.total() < args.min_requests as f64 {
        return c;
    }
    c.p = mann_whitney(a, b);
    c.p_adjusted = c.p.map(|_| p_adjusted);
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
    if let (Some(relative), Some([lo, hi]), Some([rlo, rhi])) = (c.relative, c.ci_ms, c.relative_ci)
    {
        if p_adjusted <= args.alpha && (lo > 0.0 || hi < 0.0) && relative.abs() >= args.min_effect {
            c.decision = Decision::Faster;
            c.faster = Some(if relative > 0.0 {
                arms[0].clone()
            } else {
                arms[1].clone()
            });
        } else if rlo > -args.min_effect && rhi < args.min_effect {
            c.decision = Decision::Equivalent;
        }
    }
    c
}

/// The verdict on a report and its reasons, in order: a sample-ratio mismatch first (invalid), then the
/// design, the traffic and the primary comparison, error rates and misroutes.
pub fn verdict(report: &Report, args: &AnalyzeArgs) -> (Verdict, Vec<String>) {
    let mut reasons = Vec::new();
    if report.assignment.srm_ok == Some(false) {
        let counts: Vec<String> = report
            .assignment
            .split
            .iter()
            .map(|(a, n)| format!("{a} {n:.0}"))
            .collect();
        reasons.push(format!(
            "sample-ratio mismatch: split-assigned requests {} against the weights of --split (p={}): the filter's \
             split is not what --split says, or requests are lost on one arm",
            counts.join(", "),
            report.assignment.srm_p.map_or("-".into(), format_p)
        ));
        return (Verdict::Invalid, reasons);
    }
    let mut inconclusive = false;
    match report.design.kind {
        "randomized" => reasons.push(format!(
            "randomized: {:.0} % of tagged requests were assigned by the filter's split",
            100.0 * report.design.split_share.unwrap_or(0.0)
        )),
        "none" => {
            reasons.push("no tagged request in the window".into());
            inconclusive = true;
        }
        kind => {
            reasons.push(format!(
                "{kind}: {:.0} % of tagged requests chose their arm by header (clients chose), only {:.0} % by the \
                 split; the arms saw different clients, prompts and moments, so a difference may come from who \
                 sends to which arm and is no verdict (use onMissing: split, or kvab experiment)",
                100.0 * report.design.header_share.unwrap_or(0.0),
                100.0 * report.design.split_share.unwrap_or(0.0)
            ));
            inconclusive = true;
        }
    }
    for c in &report.comparisons {
        let few: Vec<String> = args
            .arms
            .iter()
            .filter(|a| c.n.get(*a).copied().unwrap_or(0.0) < args.min_requests as f64)
            .map(|a| format!("{a} {:.0}", c.n.get(a).copied().unwrap_or(0.0)))
            .collect();
        if c.primary && !few.is_empty() {
            reasons.push(format!(
                "too little traffic in the window: {} request(s), fewer than --min-requests {}",
                few.join(", "),
                args.min_requests
            ));
            inconclusive = true;
        }
        if c.primary {
            reasons.push(match (&c.decision, &c.faster) {
                (Decision::Faster, Some(arm)) => format!(
                    "{}: {arm} faster by {:.1}% (median)",
                    c.metric,
                    100.0 * c.relative.unwrap_or(0.0).abs()
                ),
                (Decision::Equivalent, _) => format!("{}: equivalent", c.metric),
                _ => format!("{}: inconclusive", c.metric),
            });
        }
    }
    if let Some(p) = report.errors_p.filter(|p| *p < args.alpha) {
        reasons.push(format!(
            "error rates differ between the arms (p={})",
            format_p(p)
        ));
    }
    let misrouted: f64 = report.misroutes.values().map(|r| r.count).sum();
    if misrouted > 0.0 {
        reasons.push(format!(
            "{misrouted:.0} request(s) served by another arm than tagged"
        ));
    }
    let decided = report
        .comparisons
        .iter()
        .filter(|c| c.primary)
        .all(|c| c.decision != Decision::Inconclusive);
    if inconclusive || !decided {
        (Verdict::Inconclusive, reasons)
    } else {
        (Verdict::Decided, reasons)
    }
}
