//! How finely a histogram knows its median, and the smallest margin of equivalence that allows.
//!
//! The filter's latency histograms are Envoy's, and Envoy keeps less than its buckets promise:
//! - the filter records whole milliseconds (`filter/wasm/src/http.rs`: nanoseconds / 1,000,000, rounded
//!   down);
//! - Envoy stores each value in a log-linear histogram (libcircllhist) with two significant digits:
//!   `ThreadLocalHistogramImpl::recordValue` calls `hist_insert_intscale(h, value, 0, 1)`
//!   (envoyproxy/envoy source/common/stats/thread_local_store.cc), and `int_scale_to_hist_bucket`
//!   (openhistogram/libcircllhist src/circllhist.c) divides the value by 10 until it is below 100: 150
//!   to 159 ms share one cell, 1,500 to 1,599 ms another;
//! - each Prometheus bucket `le=X` counts the cells in order while a cell's lower edge, computed in
//!   floating point as `val/10.0 · 10^exp` (`hist_bucket_to_double`), is at most `X`: libcircllhist's
//!   `hist_approx_count_below_inclusive` (openhistogram/libcircllhist src/circllhist.c at 4281902 and
//!   cae4d7a, 2022-12), which Envoy 1.40.0 (the Envoy `local/` runs) follows: measured with upstream
//!   times of 101 to 114 ms, `le="100"` counted the cell [100, 110), `le="110"` did not count
//!   [110, 120) and `le="111"` did. So a bound counts up to the end of the cell it falls in (`le="150"`
//!   holds the times below 160 ms, `le="105"` those below 110), and the edges whose lower edge is
//!   computed a hair above itself (110, 220, 440, 490, 830, 880, 930, 980 ms on x86-64 doubles) count
//!   only up to themselves: `le="110"` counts what `le="100"` counts.
//!
//! `Keeping::Envoy` takes all this into account: a bucket `(lo, hi]` holds, in true times, `[T(lo),
//! T(hi))` where `T(X)` is where Envoy's count at `X` really ends (`envoy_edge`). `Keeping::Exact` is
//! for histograms that bin the values themselves (vLLM's `prometheus_client` histograms). The judge's
//! quantiles and intervals read the bounds as Prometheus does (at most `X`); the resolution here reads
//! them as Envoy fills them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::binned::Histogram;

/// How a histogram's values were kept before they were counted in its buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keeping {
    /// Envoy's histograms of the filter's whole milliseconds, two significant digits (see the module).
    Envoy,
    /// The buckets count the values themselves.
    Exact,
}

/// The last Envoy cell of a recorded whole-millisecond value `r`: its (val, exp) as libcircllhist's
/// `int_scale_to_hist_bucket(r, 0)` makes it, and the true times it holds, `[low, high)` ms.
fn envoy_cell(r: u64) -> (u64, i32, f64, f64) {
    if r == 0 {
        return (0, 0, 0.0, 1.0);
    }
    if r < 10 {
        // Scaled up: val 10·r, exp 0 (1.0 to 9.0, each 0.1 wide); a whole millisecond holds [r, r + 1).
        return (10 * r, 0, r as f64, r as f64 + 1.0);
    }
    let (mut val, mut exp, mut step) = (r, 1, 1u64);
    while val >= 100 {
        val /= 10;
        exp += 1;
        step *= 10;
    }
    let low = (val * step) as f64;
    (val, exp, low, low + step as f64)
}

/// A cell's lower edge as libcircllhist computes it (`hist_bucket_to_double`): `val/10.0 · 10^exp`, 0
/// for the zero cell.
fn computed_lower(val: u64, exp: i32) -> f64 {
    if val == 0 {
        return 0.0;
    }
    // libcircllhist's power_of_ten table: exact doubles (10^exp is an integer below 2^53 here).
    let power = (0..exp).fold(1.0, |p, _| p * 10.0);
    (val as f64 / 10.0) * power
}

/// The next recorded value after `r`'s cell.
fn next_cell(r: u64) -> u64 {
    let (_, _, _, high) = envoy_cell(r);
    high as u64
}

/// Where Envoy's count at bucket bound `bound` really ends: the count holds exactly the requests whose
/// true time is below the returned value (0: none; `None`: every finite time, for `+Inf` or a bound
/// beyond what can be recorded).
pub fn envoy_edge(bound: f64) -> Option<f64> {
    if !bound.is_finite() || bound > 1e15 {
        return None;
    }
    if bound < 0.0 {
        return Some(0.0);
    }
    // The walk of hist_approx_count_below_inclusive: cells in order, stopping at the first whose lower
    // edge is over the bound. A bound at most 10^15 ms leaves at most ~1,300 cells to walk.
    let mut r = 0u64;
    let mut edge = 0.0;
    loop {
        let (val, exp, _, high) = envoy_cell(r);
        if computed_lower(val, exp) > bound {
            return Some(edge);
        }
        edge = high;
        r = next_cell(r);
    }
}

/// The bounds of an ascending list whose Envoy count is always the one of the bound before it (both
/// end at the same cell edge, `envoy_edge`): their buckets stay empty.
pub fn envoy_redundant(bounds: &[f64]) -> Vec<f64> {
    bounds
        .windows(2)
        .filter(|pair| envoy_edge(pair[0]) == envoy_edge(pair[1]))
        .map(|pair| pair[1])
        .collect()
}

/// The width of Envoy's cell holding the true time `ms`.
pub fn envoy_cell_width(ms: f64) -> f64 {
    let (_, _, low, high) = envoy_cell(ms.max(0.0).floor() as u64);
    high - low
}

/// The true times a bucket `(lower, upper]` of a histogram kept so holds: `[lower', upper')`. For
/// `Envoy`, each bound where Envoy's count really ends (`envoy_edge`), the first bucket from 0; a
/// bucket Envoy leaves empty (both bounds inside one cell) is taken as the cell around its lower bound.
fn kept_bucket(lower: f64, upper: f64, first: bool, keeping: Keeping) -> (f64, f64) {
    match keeping {
        Keeping::Exact => (lower, upper),
        Keeping::Envoy => {
            let low = if first {
                lower.min(0.0)
            } else {
                envoy_edge(lower).unwrap_or(f64::INFINITY)
            };
            let high = envoy_edge(upper).unwrap_or(f64::INFINITY);
            (low, high.max(low + envoy_cell_width(low)))
        }
    }
}

/// The relative resolution of a histogram around its median: the width of the bucket holding it (as the
/// values were kept), over its lower edge: the factor `1 + r` within which the median is known however
/// many requests there are. `None` with no median, or when the bucket is unbounded (the last, or from 0).
pub fn median_resolution(h: &Histogram, keeping: Keeping) -> Option<f64> {
    let (lower, upper, _) = h.quantile(0.5)?;
    let first = h.upper.first() == Some(&upper);
    let (low, high) = kept_bucket(lower, upper, first, keeping);
    let r = high / low - 1.0;
    (low > 0.0 && r.is_finite()).then_some(r)
}

/// The smallest margin of equivalence two medians known to factors `1 + a` and `1 + b` allow: their
/// ratio is known at best to a range spanning `(1 + a)(1 + b)`, which fits inside `(1/(1+m), 1+m)` only
/// when `(1 + m)² > (1 + a)(1 + b)`.
pub fn smallest_margin(a: f64, b: f64) -> f64 {
    ((1.0 + a) * (1.0 + b)).sqrt() - 1.0
}

/// What a comparison of histograms can show at its resolution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resolution {
    /// Per arm: the relative width of the bucket holding its median (`median_resolution`); `null` when
    /// it is unbounded.
    pub median: BTreeMap<String, Option<f64>>,
    /// The smallest `--min-effect` for which `equivalent` can be shown (`smallest_margin`); `null` when
    /// an arm's resolution is unbounded.
    pub smallest_margin: Option<f64>,
    /// When `--min-effect` is not above `smallest_margin`: why `equivalent` cannot be (or was not) decided,
    /// one sentence naming the numbers.
    pub refused: Option<String>,
}

/// `arms`' resolutions and the smallest margin they allow, with the refusal when `min_effect` is not
/// above it.
pub fn resolution(
    arms: &[String],
    histograms: [&Histogram; 2],
    keeping: Keeping,
    min_effect: f64,
) -> Resolution {
    let per_arm: Vec<Option<f64>> = histograms
        .iter()
        .map(|h| median_resolution(h, keeping))
        .collect();
    let smallest = match per_arm.as_slice() {
        [Some(a), Some(b)] => Some(smallest_margin(*a, *b)),
        _ => None,
    };
    let percent = |r: &Option<f64>| r.map_or("unbounded".into(), |r| format!("{:.1} %", 100.0 * r));
    let widths: Vec<String> = arms
        .iter()
        .zip(&per_arm)
        .map(|(arm, r)| format!("{} ({arm})", percent(r)))
        .collect();
    let refused = smallest.is_none_or(|m| min_effect <= m).then(|| {
        format!(
            "equivalent within {:.1} % cannot be shown at this resolution: the medians' buckets are {} \
             wide, allowing {}",
            100.0 * min_effect,
            widths.join(" and "),
            smallest.map_or("no margin at all".into(), |m| format!(
                "no margin below {:.1} %",
                100.0 * m
            ))
        )
    });
    Resolution {
        median: arms.iter().cloned().zip(per_arm).collect(),
        smallest_margin: smallest,
        refused,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::comparison::{of_histograms, Decision, InFamily, Rule};

    fn histogram(upper: &[f64], counts: &[f64]) -> Histogram {
        Histogram {
            upper: upper.to_vec(),
            counts: counts.to_vec(),
        }
    }

    #[test]
    fn envoy_keeps_two_significant_digits_of_whole_milliseconds() {
        assert_eq!(envoy_cell(7), (70, 0, 7.0, 8.0));
        assert_eq!(envoy_cell(42), (42, 1, 42.0, 43.0));
        assert_eq!(envoy_cell(157), (15, 2, 150.0, 160.0));
        assert_eq!(envoy_cell(1_234), (12, 3, 1_200.0, 1_300.0));
        assert_eq!(envoy_cell_width(150.7), 10.0);
        assert_eq!(envoy_cell_width(99.9), 1.0);
        assert_eq!(envoy_cell_width(2_500.0), 100.0);
    }

    #[test]
    fn a_bound_counts_to_the_end_of_its_cell() {
        // As Envoy 1.40.0 was measured to count: le="100" holds [100, 110), le="110" not [110, 120).
        for (bound, edge) in [
            (1.0, 2.0),
            (49.0, 50.0),
            (50.0, 51.0),
            (99.0, 100.0),
            (100.0, 110.0),
            (105.0, 110.0),
            (111.0, 120.0),
            (120.0, 130.0),
            (150.0, 160.0),
            (159.0, 160.0),
            (225.0, 230.0),
            (441.0, 450.0),
            (500.0, 510.0),
            (1_000.0, 1_100.0),
            (1_499.0, 1_500.0),
            (60_000.0, 61_000.0),
        ] {
            assert_eq!(envoy_edge(bound), Some(edge), "{bound}");
        }
        // Below 10 ms a cell is 0.1 wide in Envoy's units and a whole millisecond in true time: 2.5
        // counts the recorded 2, the times below 3 ms. le="0" counts the recorded zeros.
        assert_eq!(envoy_edge(2.5), Some(3.0));
        assert_eq!(envoy_edge(0.0), Some(1.0));
        assert_eq!(envoy_edge(-1.0), Some(0.0));
        assert_eq!(envoy_edge(f64::INFINITY), None);
        // 11/10.0 · 100 is 110.00000000000001 in doubles: le="110" stops before the cell [110, 120).
        for quirk in [110.0, 220.0, 440.0, 490.0, 830.0, 880.0, 930.0, 980.0] {
            assert_eq!(envoy_edge(quirk), Some(quirk), "{quirk}");
        }
        assert_eq!(
            envoy_redundant(&[90.0, 100.0, 105.0, 110.0, 115.0, 120.0]),
            vec![105.0, 110.0]
        );
    }

    #[test]
    fn the_median_bucket_is_never_finer_than_envoys_cells() {
        // Bounds every 10 ms, the median in the bucket (140, 150], which Envoy fills with [150, 160):
        // 10/150 (binned as they were: 10/140).
        let h = histogram(&[130.0, 140.0, 150.0, f64::INFINITY], &[1.0, 3.0, 5.0, 1.0]);
        let r = median_resolution(&h, Keeping::Envoy).unwrap();
        assert!((r - 10.0 / 150.0).abs() < 1e-12, "{r}");
        let exact = median_resolution(&h, Keeping::Exact).unwrap();
        assert!((exact - 10.0 / 140.0).abs() < 1e-12, "{exact}");
        // A bound at 105 does not make (100, 110] finer: Envoy fills (100, 105] with nothing and
        // (105, 115] with [110, 120): a median there is known to 10/110.
        let h = histogram(&[100.0, 105.0, 115.0, f64::INFINITY], &[4.0, 0.0, 5.0, 1.0]);
        assert!((median_resolution(&h, Keeping::Envoy).unwrap() - 10.0 / 110.0).abs() < 1e-12);
        assert!((median_resolution(&h, Keeping::Exact).unwrap() - 10.0 / 105.0).abs() < 1e-12);
        // A bucket Envoy leaves empty, (100, 105], holding the median of other data: taken as the
        // cell [110, 120).
        let h = histogram(&[100.0, 105.0, f64::INFINITY], &[4.0, 5.0, 1.0]);
        assert!((median_resolution(&h, Keeping::Envoy).unwrap() - 10.0 / 110.0).abs() < 1e-12);
        // Unbounded: the first bucket (from 0) and the last.
        let h = histogram(&[100.0, f64::INFINITY], &[9.0, 1.0]);
        assert_eq!(median_resolution(&h, Keeping::Envoy), None);
        let h = histogram(&[100.0, f64::INFINITY], &[1.0, 9.0]);
        assert_eq!(median_resolution(&h, Keeping::Exact), None);
    }

    #[test]
    fn the_smallest_margin_is_the_geometric_mean_of_the_bins() {
        assert!((smallest_margin(0.1, 0.1) - 0.1).abs() < 1e-12);
        let m = smallest_margin(10.0 / 150.0, 0.1);
        assert!((m - (16.0f64 / 15.0 * 1.1).sqrt() + 1.0).abs() < 1e-12 && m > 0.083 && m < 0.084);
        assert_eq!(smallest_margin(0.0, 0.0), 0.0);
    }

    #[test]
    fn a_margin_at_or_below_the_resolution_is_refused_with_its_numbers() {
        let arms = ["nvlink".to_string(), "fs".to_string()];
        // Medians in (140, 150] (Envoy: [150, 160)) and (89, 99] (Envoy: [90, 100)).
        let a = histogram(&[130.0, 140.0, 150.0, f64::INFINITY], &[1.0, 3.0, 5.0, 1.0]);
        let b = histogram(&[89.0, 99.0, f64::INFINITY], &[4.0, 5.0, 1.0]);
        let r = resolution(&arms, [&a, &b], Keeping::Envoy, 0.05);
        assert_eq!(r.median["nvlink"].map(|v| (v * 1000.0).round()), Some(67.0));
        assert_eq!(r.median["fs"].map(|v| (v * 1000.0).round()), Some(111.0));
        assert_eq!(
            r.refused.as_deref(),
            Some(
                "equivalent within 5.0 % cannot be shown at this resolution: the medians' buckets are \
                 6.7 % (nvlink) and 11.1 % (fs) wide, allowing no margin below 8.9 %"
            )
        );
        assert_eq!(
            resolution(&arms, [&a, &b], Keeping::Envoy, 0.09).refused,
            None
        );
        // An unbounded median allows no margin.
        let open = histogram(&[100.0, f64::INFINITY], &[1.0, 9.0]);
        let r = resolution(&arms, [&a, &open], Keeping::Envoy, 0.5);
        assert_eq!(r.smallest_margin, None);
        assert!(r
            .refused
            .unwrap()
            .ends_with("unbounded (fs) wide, allowing no margin at all"));
    }

    #[test]
    fn of_histograms_refuses_equivalent_that_envoys_cells_cannot_show() {
        // Bounds at 99 and 100: Envoy counts [100, 110) in (99, 100], so the medians' interval reads
        // 1 % wide where the data know them to 10 %.
        let h = histogram(
            &[90.0, 99.0, 100.0, 120.0, f64::INFINITY],
            &[10.0, 0.0, 1000.0, 10.0, 0.0],
        );
        let arms = ["nvlink".to_string(), "fs".to_string()];
        let rule = Rule {
            level: 0.05,
            tost_level: 0.05,
            min_effect: 0.05,
            tail_margin: 0.25,
        };
        let family = InFamily {
            p: Some(1.0),
            p_adjusted: 1.0,
            level: 0.05,
        };
        let compare = |keeping, rule| {
            let both = [Some(h.clone()), Some(h.clone())];
            of_histograms(
                "request_duration_ms",
                true,
                &arms,
                &both,
                family,
                rule,
                100,
                keeping,
                None,
            )
        };
        // Binned as they were, the buckets allow it.
        let exact = compare(Keeping::Exact, rule);
        assert_eq!(exact.decision, Decision::Equivalent, "{exact:?}");
        assert_eq!(exact.detectable_ratio, None);
        let envoy = compare(Keeping::Envoy, rule);
        assert_eq!(envoy.decision, Decision::Inconclusive);
        assert_eq!(envoy.decision_text(), "inconclusive (resolution)");
        let r = envoy.resolution.as_ref().unwrap();
        assert!(r.smallest_margin.is_some_and(|m| (m - 0.1).abs() < 1e-12));
        assert_eq!(
            envoy.reason().split("; ").nth(1),
            Some(
                "equivalent within 5.0 % cannot be shown at this resolution: the medians' buckets are \
                 10.0 % (nvlink) and 10.0 % (fs) wide, allowing no margin below 10.0 %"
            ),
            "{}",
            envoy.reason()
        );
        assert!(envoy
            .reason()
            .starts_with("request_duration_ms: inconclusive (80 % power from ×"));
        // A margin above the resolution: equivalent again.
        let wide = compare(
            Keeping::Envoy,
            Rule {
                min_effect: 0.11,
                ..rule
            },
        );
        assert_eq!(
            (wide.decision, wide.resolution.unwrap().refused),
            (Decision::Equivalent, None)
        );
    }
}
