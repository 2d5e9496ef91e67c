//! The guardrails of a comparison: the tails (p90, p99) and the error rates. A guardrail is `within` when
//! its interval shows the arms alike within its own margin, `worse` (naming the arm) when its interval
//! shows one arm worse, `unknown` otherwise. `equivalent` needs every guardrail `within` (for the error
//! rate, non-inferiority both ways at its margin); `faster` is kept from an arm that a guardrail shows
//! worse (`crate::comparison` applies this).
//!
//! Each guardrail is judged on an interval with one-sided coverage `1 − alpha` on each side (a two-sided
//! `1 − 2·alpha` interval): an intersection–union test (Berger 1982), so `equivalent` — every guardrail
//! `within` and the centre's equivalence test — is a claim at level `alpha` without a further correction.

use serde::Serialize;
use statrs::distribution::{ContinuousCDF, Normal};

use crate::binned::Histogram;
use crate::stats::{percentile_of_sorted, quantile_ranks, sorted};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Within,
    Worse,
    Unknown,
}

/// One tail of one comparison: the `quantile` of each arm, the ratio of the second arm's to the first's,
/// and its interval from the arms' distribution-free quantile intervals (an end is `null` when an arm has
/// too few values to bound its quantile on that side).
#[derive(Debug, Clone, Serialize)]
pub struct Tail {
    /// `p90`, `p99`.
    pub quantile: String,
    /// Per arm: the sample quantile (Hyndman–Fan type 7), or Prometheus's estimate for histograms.
    pub values: std::collections::BTreeMap<String, f64>,
    pub ratio: Option<f64>,
    pub ratio_ci: [Option<f64>; 2],
    pub status: Status,
    /// The arm whose tail is worse, when `status` is `worse`.
    pub worse: Option<String>,
}

impl Tail {
    /// `fs's p99 is worse (×6.10 [3.95, 8.20])`, `p99 not shown within the tail margin (×1.02 [0.80, -])`:
    /// ratios as the worse arm's tail over the other's.
    pub fn sentence(&self, arms: &[String]) -> String {
        let tail = self;
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        let first_worse = tail.worse.is_some() && tail.worse.as_ref() == arms.first();
        let (ratio, [lo, hi]) = if first_worse {
            let inv = |v: Option<f64>| v.filter(|v| *v > 0.0).map(|v| 1.0 / v);
            (
                inv(tail.ratio),
                [inv(tail.ratio_ci[1]), inv(tail.ratio_ci[0])],
            )
        } else {
            (tail.ratio, tail.ratio_ci)
        };
        let numbers = format!("×{} [{}, {}]", fmt(ratio), fmt(lo), fmt(hi));
        match (&tail.status, &tail.worse) {
            (Status::Worse, Some(arm)) => format!("{arm}'s {} is worse ({numbers})", tail.quantile),
            _ => format!(
                "{} not shown within the tail margin ({numbers})",
                tail.quantile
            ),
        }
    }

    /// `p90 ok`, `p99 fs worse`, `p99 ?` (not shown either way): how tables show it.
    pub fn short(&self) -> String {
        match (self.status, &self.worse) {
            (Status::Within, _) => format!("{} ok", self.quantile),
            (Status::Worse, Some(arm)) => format!("{} {arm} worse", self.quantile),
            _ => format!("{} ?", self.quantile),
        }
    }
}

/// `0.9` → `p90`, `0.99` → `p99`, `0.999` → `p99.9`.
pub fn quantile_name(q: f64) -> String {
    let percent = format!("{:.3}", 100.0 * q);
    format!("p{}", percent.trim_end_matches('0').trim_end_matches('.'))
}

/// The `1 − 2·alpha` interval of the ratio `ξ_second / ξ_first` from each arm's quantile bounds, each
/// side of each bound at `alpha / 2`; and the status it gives against `margin` (ratio band
/// `(1/(1+margin), 1+margin)`).
fn judged(
    q: f64,
    arms: &[String],
    values: [Option<f64>; 2],
    [(first_lo, first_hi), (second_lo, second_hi)]: [(Option<f64>, Option<f64>); 2],
    margin: f64,
) -> Tail {
    let positive = |v: Option<f64>| v.filter(|v| *v > 0.0 && v.is_finite());
    let low = positive(second_lo)
        .zip(positive(first_hi))
        .map(|(b, a)| b / a);
    let high = positive(second_hi)
        .zip(positive(first_lo))
        .map(|(b, a)| b / a);
    let ratio = match values {
        [Some(a), Some(b)] if a > 0.0 => Some(b / a),
        _ => None,
    };
    let band = 1.0 + margin;
    let (status, worse) = match (low, high) {
        (Some(lo), Some(hi)) if lo > 1.0 / band && hi < band => (Status::Within, None),
        (Some(lo), _) if lo > 1.0 => (Status::Worse, arms.get(1).cloned()),
        (_, Some(hi)) if hi < 1.0 => (Status::Worse, arms.first().cloned()),
        _ => (Status::Unknown, None),
    };
    Tail {
        quantile: quantile_name(q),
        values: arms
            .iter()
            .zip(values)
            .filter_map(|(arm, v)| Some((arm.clone(), v?)))
            .collect(),
        ratio,
        ratio_ci: [low, high],
        status,
        worse,
    }
}

/// The tails at `quantiles` of two arms' samples (values in any order; each arm sorted once).
pub fn of_samples(
    quantiles: &[f64],
    arms: &[String],
    [first, second]: [&[f64]; 2],
    alpha: f64,
    margin: f64,
) -> Vec<Tail> {
    let (first, second) = (sorted(first), sorted(second));
    let bounds = |sorted: &[f64], q: f64| {
        let (lo, hi) = quantile_ranks(sorted.len() as u64, q, alpha);
        let at = |rank: Option<u64>| {
            rank.and_then(|r| sorted.get((r as usize).checked_sub(1)?).copied())
        };
        (at(lo), at(hi))
    };
    quantiles
        .iter()
        .map(|&q| {
            let estimate = |sorted: &[f64]| percentile_of_sorted(sorted, 100.0 * q);
            judged(
                q,
                arms,
                [estimate(&first), estimate(&second)],
                [bounds(&first, q), bounds(&second, q)],
                margin,
            )
        })
        .collect()
}

/// The `q`-quantile tail of two arms' histograms: each arm's quantile bounded by bucket edges.
pub fn of_histograms(
    q: f64,
    arms: &[String],
    [first, second]: [&Histogram; 2],
    alpha: f64,
    margin: f64,
) -> Tail {
    let estimate = |h: &Histogram| h.quantile(q).map(|(_, _, e)| e);
    let bounds = |h: &Histogram| h.quantile_interval(q, alpha);
    judged(
        q,
        arms,
        [estimate(first), estimate(second)],
        [bounds(first), bounds(second)],
        margin,
    )
}

/// The error-rate guardrail of two arms: the difference of their error rates (second − first) with the
/// Newcombe hybrid score interval (Newcombe 1998, method 10: Wilson intervals of each rate combined),
/// each side at one-sided `alpha`; `within` inside ±`margin` (absolute, a fraction of requests).
#[derive(Debug, Clone, Serialize)]
pub struct ErrorGuard {
    /// Second arm's error rate minus the first's.
    pub difference: Option<f64>,
    pub difference_ci: Option<[f64; 2]>,
    pub margin: f64,
    pub status: Status,
    pub worse: Option<String>,
}

impl ErrorGuard {
    /// `fs fails more (+8.0 pp [+5.1, +11.2])` (the worse arm's error rate minus the other's), `error rates
    /// not shown within 2.0 pp (+0.0 pp [-2.6, +2.6])` (the second arm's minus the first's).
    pub fn sentence(&self, arms: &[String]) -> String {
        let guard = self;
        let first = guard.worse.is_some() && guard.worse.as_ref() == arms.first();
        let (d, [lo, hi]) = match (guard.difference, guard.difference_ci) {
            (Some(d), Some([lo, hi])) if first => (-d, [-hi, -lo]),
            (Some(d), Some(ci)) => (d, ci),
            _ => return "error rates not measured".into(),
        };
        let numbers = format!(
            "{:+.1} pp [{:+.1}, {:+.1}]",
            100.0 * d,
            100.0 * lo,
            100.0 * hi
        );
        match (guard.status, &guard.worse) {
            (Status::Worse, Some(arm)) => format!("{arm} fails more ({numbers})"),
            _ => format!(
                "error rates not shown within {:.1} pp ({numbers})",
                100.0 * guard.margin
            ),
        }
    }

    /// `+8.0 pp [+3.9, +14.9], margin 2.0 pp: fs worse` (the second arm's rate minus the first's).
    pub fn summary(&self) -> String {
        let verdict = match (self.status, &self.worse) {
            (Status::Within, _) => "within".to_string(),
            (Status::Worse, Some(arm)) => format!("{arm} worse"),
            _ => "not shown either way".to_string(),
        };
        match (self.difference, self.difference_ci) {
            (Some(d), Some([lo, hi])) => format!(
                "{:+.1} pp [{:+.1}, {:+.1}], margin {:.1} pp: {verdict}",
                100.0 * d,
                100.0 * lo,
                100.0 * hi,
                100.0 * self.margin
            ),
            _ => "no requests to compare".into(),
        }
    }
}

/// Wilson's score interval of `x / n` at `z`.
fn wilson(x: u64, n: u64, z: f64) -> (f64, f64) {
    let (x, n) = (x as f64, n as f64);
    let p = x / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// `x1` errors of `n1` requests (first arm) against `x2` of `n2` (second arm).
pub fn errors(
    arms: &[String],
    (x1, n1): (u64, u64),
    (x2, n2): (u64, u64),
    alpha: f64,
    margin: f64,
) -> ErrorGuard {
    let mut guard = ErrorGuard {
        difference: None,
        difference_ci: None,
        margin,
        status: Status::Unknown,
        worse: None,
    };
    if n1 == 0 || n2 == 0 || x1 > n1 || x2 > n2 || !(alpha > 0.0 && alpha < 0.5) {
        return guard;
    }
    let z = Normal::standard().inverse_cdf(1.0 - alpha);
    let (p1, p2) = (x1 as f64 / n1 as f64, x2 as f64 / n2 as f64);
    let ((l1, u1), (l2, u2)) = (wilson(x1, n1, z), wilson(x2, n2, z));
    let d = p2 - p1;
    let lo = d - ((p2 - l2).powi(2) + (u1 - p1).powi(2)).sqrt();
    let hi = d + ((u2 - p2).powi(2) + (p1 - l1).powi(2)).sqrt();
    guard.difference = Some(d);
    guard.difference_ci = Some([lo, hi]);
    (guard.status, guard.worse) = if lo > -margin && hi < margin {
        (Status::Within, None)
    } else if lo > 0.0 {
        (Status::Worse, arms.get(1).cloned())
    } else if hi < 0.0 {
        (Status::Worse, arms.first().cloned())
    } else {
        (Status::Unknown, None)
    };
    guard
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn arms() -> Vec<String> {
        vec!["nvlink".into(), "fs".into()]
    }

    #[test]
    fn quantiles_are_named_as_reports_print_them() {
        assert_eq!(quantile_name(0.9), "p90");
        assert_eq!(quantile_name(0.99), "p99");
        assert_eq!(quantile_name(0.999), "p99.9");
    }

    #[test]
    fn a_stalled_tail_is_worse_and_named_and_alike_tails_are_within() {
        let base: Vec<f64> = (0..2000).map(|i| 100.0 + (i % 50) as f64).collect();
        // Every tenth request of fs stalls ×6.
        let stalled: Vec<f64> = base
            .iter()
            .enumerate()
            .map(|(i, v)| if i % 10 == 0 { 6.0 * v } else { *v })
            .collect();
        let [tail] = of_samples(&[0.99], &arms(), [&base, &stalled], 0.05, 0.25)
            .try_into()
            .unwrap();
        assert_eq!(
            (tail.status, tail.worse.as_deref()),
            (Status::Worse, Some("fs"))
        );
        assert!(tail.ratio_ci[0].unwrap() > 4.0, "{tail:?}");
        let [same] = of_samples(&[0.9], &arms(), [&base, &base], 0.05, 0.25)
            .try_into()
            .unwrap();
        assert_eq!(same.status, Status::Within, "{same:?}");
        // Too few values to bound a p99: unknown, with the unbounded end null.
        let [few] = of_samples(&[0.99], &arms(), [&base[..50], &base[..50]], 0.05, 0.25)
            .try_into()
            .unwrap();
        assert_eq!(few.status, Status::Unknown);
        assert_eq!(few.ratio_ci[1], None);
    }

    #[test]
    fn the_error_guardrail_names_the_arm_that_fails_more() {
        // R's PropCIs::diffscoreci / Newcombe's table II example 1: 56/70 against 48/80 has the 95 %
        // interval (0.0524, 0.3339) for p1 − p2; here z is one-sided 2.5 %.
        let g = errors(&arms(), (48, 80), (56, 70), 0.025, 0.01);
        let [lo, hi] = g.difference_ci.unwrap();
        assert!(
            (lo - 0.0524).abs() < 5e-4 && (hi - 0.3339).abs() < 5e-4,
            "{lo} {hi}"
        );
        assert_eq!((g.status, g.worse.as_deref()), (Status::Worse, Some("fs")));
        // No errors on either arm, enough requests: within 1 percentage point.
        let clean = errors(&arms(), (0, 1000), (0, 1000), 0.05, 0.01);
        assert_eq!(clean.status, Status::Within);
        // Too few requests to show it.
        let few = errors(&arms(), (0, 100), (0, 100), 0.05, 0.01);
        assert_eq!(few.status, Status::Unknown);
        // nvlink fails less: fs is the worse arm, named.
        let less = errors(&arms(), (0, 500), (40, 500), 0.05, 0.01);
        assert_eq!(
            (less.status, less.worse.as_deref()),
            (Status::Worse, Some("fs"))
        );
    }
}
