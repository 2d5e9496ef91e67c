//! Calibration of `kvab analyze`'s judge on bucketed data at Envoy's resolution: each simulated window's
//! times are rounded down to whole milliseconds (as the filter records them), kept at two significant
//! digits (as Envoy's libcircllhist keeps them), counted in Prometheus buckets as Envoy 1.40 counts them
//! (libcircllhist's `hist_approx_count_below_inclusive`: the cells in order while a cell's lower edge,
//! computed in doubles, is at most the bound), binned by the bounds the project ships, and judged by `of_histograms` as analyze
//! judges them. The Envoy side is written here again from libcircllhist's source, not borrowed from the
//! judge, so that a mistake in `kvab_judge::resolution` would show. A test here keeps the shipped bounds
//! one list in both files, every bound one Envoy honours.

use std::collections::BTreeMap;

use kvab_judge::binned::{mann_whitney, Histogram};
use kvab_judge::comparison::{of_histograms, Comparison, InFamily, Rule};
use kvab_judge::resolution::Keeping;
use kvab_judge::Decision;
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;

use crate::sim::normal;
use crate::suite::{
    clopper_pearson, parallel, Claim, Right, Tally, ALPHA, ARMS, MARGIN, NO_MARGIN, TAIL_MARGIN,
};

/// `kvab analyze`'s default `--min-requests`.
const MIN_REQUESTS: u64 = 200;
/// The spread of the simulated times: log-normal, σ 0.3 on the log scale, around the median.
const SIGMA: f64 = 0.3;

/// The bucket bounds shipped for the filter's histograms (`local/envoy-gateway.yaml`; a test keeps
/// `manifests/patches/gateway-stats.yaml` equal).
pub fn shipped_bounds() -> Vec<f64> {
    bounds_in(
        include_str!("../../../local/envoy-gateway.yaml"),
        "buckets: [",
        ']',
    )
}

/// The numbers of the list that follows `start` in `text`, up to `end`.
pub fn bounds_in(text: &str, start: &str, end: char) -> Vec<f64> {
    let from = text.find(start).map_or(text.len(), |i| i + start.len());
    let list = &text[from..];
    let list = &list[..list.find(end).unwrap_or(list.len())];
    list.split(',')
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .collect()
}

/// libcircllhist's cell of a recorded value (`int_scale_to_hist_bucket(r, 0)`): (val, exp).
fn cell(r: u64) -> (u64, i32) {
    if r == 0 {
        return (0, 0);
    }
    if r < 10 {
        return (10 * r, 0);
    }
    let (mut val, mut exp) = (r, 1);
    while val >= 100 {
        val /= 10;
        exp += 1;
    }
    (val, exp)
}

/// A cell's lower edge as libcircllhist computes it: `val/10.0 · 10^exp`, 0 for zero.
fn lower(val: u64, exp: i32) -> f64 {
    if val == 0 {
        return 0.0;
    }
    let power = (0..exp).fold(1.0, |p, _| p * 10.0);
    (val as f64 / 10.0) * power
}

/// The histogram Envoy exports for `times` (ms) under `bounds`.
pub fn envoy_histogram(times: &[f64], bounds: &[f64]) -> Option<Histogram> {
    // Cells in libcircllhist's order (ascending value): keyed by (exp, val), val 0 first.
    let mut cells: BTreeMap<(i32, u64), u64> = BTreeMap::new();
    for t in times {
        let (val, exp) = cell(t.max(0.0).floor() as u64);
        let key = if val == 0 { (i32::MIN, 0) } else { (exp, val) };
        *cells.entry(key).or_default() += 1;
    }
    let total: u64 = cells.values().sum();
    let mut buckets: Vec<(String, f64)> = bounds
        .iter()
        .map(|&bound| {
            let mut below = 0;
            for (&(exp, val), &n) in &cells {
                let edge = if exp == i32::MIN {
                    0.0
                } else {
                    lower(val, exp)
                };
                if edge > bound {
                    break;
                }
                below += n;
            }
            (format!("{bound}"), below as f64)
        })
        .collect();
    buckets.push(("+Inf".into(), total as f64));
    Histogram::from_cumulative(buckets.iter().map(|(le, v)| (le.as_str(), *v))).ok()
}

/// The bounds a scenario's gateway uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bounds {
    Shipped,
    /// Every millisecond from 1 to 2,000: finer than Envoy keeps above 100 ms.
    EveryMs,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    /// The first arm's median time (ms); the second arm's is `ratio` times it.
    pub median_ms: f64,
    pub ratio: f64,
    pub per_arm: usize,
    pub bounds: Bounds,
    pub min_effect: f64,
    pub false_claims: Vec<Claim>,
    pub right: Option<Right>,
    pub seed: u64,
}

fn made(claim: Claim, c: &Comparison) -> bool {
    match claim {
        Claim::AnyFaster => c.decision == Decision::Faster,
        Claim::FasterFor(arm) => {
            c.decision == Decision::Faster && c.faster.as_deref() == ARMS.get(arm).copied()
        }
        Claim::Equivalent => c.decision == Decision::Equivalent,
    }
}

fn right(r: Right, c: &Comparison) -> bool {
    match r {
        Right::Faster(arm) => made(Claim::FasterFor(arm), c),
        Right::Equivalent => c.decision == Decision::Equivalent,
    }
}

/// One window: both arms' times, Envoy's histograms, `of_histograms` as analyze calls it (one metric:
/// Holm leaves its p-value and level as they are).
pub fn window(s: &Scenario, bounds: &[f64], rng: &mut ChaCha8Rng) -> Option<Comparison> {
    let arm = |median: f64, rng: &mut ChaCha8Rng| -> Vec<f64> {
        (0..s.per_arm)
            .map(|_| median * (SIGMA * normal(rng)).exp())
            .collect()
    };
    let first = arm(s.median_ms, rng);
    let second = arm(s.median_ms * s.ratio, rng);
    let histograms = [
        Some(envoy_histogram(&first, bounds)?),
        Some(envoy_histogram(&second, bounds)?),
    ];
    let p = match &histograms {
        [Some(a), Some(b)] => mann_whitney(a, b),
        _ => None,
    };
    let family = InFamily {
        p,
        p_adjusted: p.unwrap_or(1.0),
        level: ALPHA,
    };
    let rule = Rule {
        level: ALPHA,
        tost_level: ALPHA,
        min_effect: s.min_effect,
        tail_margin: TAIL_MARGIN,
    };
    let arms: Vec<String> = ARMS.map(String::from).to_vec();
    Some(of_histograms(
        "request_duration_ms",
        true,
        &arms,
        &histograms,
        family,
        rule,
        MIN_REQUESTS,
        Keeping::Envoy,
        None,
    ))
}

/// `trials` windows of `s` (one seed each, so the tally does not depend on the threads).
pub fn run(s: &Scenario, trials: u64) -> Tally {
    let bounds: Vec<f64> = match s.bounds {
        Bounds::Shipped => shipped_bounds(),
        Bounds::EveryMs => (1..=2000).map(f64::from).collect(),
    };
    let one = |i: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(s.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i);
        let mut t = Tally {
            trials: 1,
            ..Tally::default()
        };
        if let Some(c) = window(s, &bounds, &mut rng) {
            t.false_claims = u64::from(s.false_claims.iter().any(|&claim| made(claim, &c)));
            if let Some([lo, hi]) = c.ratio_ci {
                t.with_interval = 1;
                t.covered = u64::from(lo <= s.ratio && s.ratio <= hi);
            }
            t.right = u64::from(s.right.is_some_and(|r| right(r, &c)));
        }
        t
    };
    let mut total = Tally::default();
    for t in parallel(trials, one) {
        total.add(&t);
    }
    total
}

/// A row of the calibration table (looks: 1, a window is judged once).
pub fn row(s: &Scenario, t: &Tally) -> String {
    let (_, upper) = clopper_pearson(t.false_claims, t.trials);
    let percent = |k: u64, n: u64| format!("{:.1} %", 100.0 * k as f64 / n.max(1) as f64);
    let claims: Vec<String> = s.false_claims.iter().map(|c| c.text()).collect();
    let power = s.right.map_or("—".into(), |r| {
        format!("{} {}", r.text(), percent(t.right, t.trials))
    });
    format!(
        "| {} | 1 | {} | {} | {} | {:.4} | {:.4} | ×{}: {} | {} |",
        s.name,
        claims.join(" or "),
        t.trials,
        t.false_claims,
        t.false_claims as f64 / t.trials.max(1) as f64,
        upper,
        s.ratio,
        percent(t.covered, t.with_interval),
        power
    )
}

/// The binned scenarios: times log-normal around the median, 2,000 requests an arm unless named.
pub fn scenarios() -> Vec<Scenario> {
    use Claim::*;
    let mut out = Vec::new();
    let mut add = |name, (median_ms, per_arm), ratio, bounds, min_effect, false_claims, right| {
        let seed = 5000 + out.len() as u64;
        out.push(Scenario {
            name,
            median_ms,
            ratio,
            per_arm,
            bounds,
            min_effect,
            false_claims,
            right,
            seed,
        });
    };
    add(
        "binned at Envoy's resolution, 150 ms, A/A, margin 0",
        (150.0, 2000),
        1.0,
        Bounds::Shipped,
        NO_MARGIN,
        vec![AnyFaster],
        None,
    );
    add(
        "binned at Envoy's resolution, 610 ms, 20,000 an arm, A/A",
        (610.0, 20_000),
        1.0,
        Bounds::Shipped,
        MARGIN,
        vec![AnyFaster],
        Some(Right::Equivalent),
    );
    add(
        "binned at Envoy's resolution, 610 ms, 20,000 an arm, b ×1.05 (at the margin)",
        (610.0, 20_000),
        1.0 + MARGIN,
        Bounds::Shipped,
        MARGIN,
        vec![Equivalent, FasterFor(1)],
        None,
    );
    add(
        "binned at Envoy's resolution, 150 ms, b ×1.05 (at the margin)",
        (150.0, 2000),
        1.0 + MARGIN,
        Bounds::Shipped,
        MARGIN,
        vec![Equivalent, FasterFor(1)],
        None,
    );
    // Bounds finer than Envoy keeps: the buckets' edges promise 0.6 % where the cells are 6 to 7 % wide.
    // Both medians (151.5 and 159.1 ms) lie in the cell [150, 160), counted in the bucket (149, 150],
    // and 20,000 requests an arm keep their intervals inside it: only the resolution's refusal stands
    // between this and a false `equivalent`.
    add(
        "binned at Envoy's resolution, 151.5 ms, bounds every 1 ms, 20,000 an arm, b ×1.05 (at the margin)",
        (151.5, 20_000),
        1.0 + MARGIN,
        Bounds::EveryMs,
        MARGIN,
        vec![Equivalent, FasterFor(1)],
        None,
    );
    add(
        "binned at Envoy's resolution, 155 ms, 20,000 an arm, b ×1.10",
        (155.0, 20_000),
        1.10,
        Bounds::Shipped,
        MARGIN,
        vec![Equivalent, FasterFor(1)],
        Some(Right::Faster(0)),
    );
    out
}

#[test]
fn the_envoy_side_counts_cells_as_envoy_does() {
    // 150 to 159 ms are one cell, counted from le="150" on (its lower edge); 115 ms is in [110, 120),
    // whose lower edge is 110.00000000000001 in doubles: not counted at le="110", counted at "111";
    // 99.5 ms is the recorded 99, in [99, 100), counted from le="99".
    let h = envoy_histogram(
        &[150.2, 159.9, 115.0, 99.5],
        &[98.0, 99.0, 110.0, 111.0, 149.0, 150.0],
    );
    assert_eq!(
        h.map(|h| h.counts),
        Some(vec![0.0, 1.0, 0.0, 1.0, 0.0, 2.0, 0.0])
    );
}

#[test]
fn the_shipped_bounds_are_one_list_in_which_envoy_counts_every_bucket() {
    let local = shipped_bounds();
    let istio = bounds_in(
        include_str!("../../../manifests/patches/gateway-stats.yaml"),
        "{\"wasmcustom\":[",
        ']',
    );
    assert_eq!(
        local, istio,
        "local/envoy-gateway.yaml and manifests/patches/gateway-stats.yaml"
    );
    assert!(local.windows(2).all(|w| w[0] < w[1]), "{local:?}");
    let redundant = kvab_judge::resolution::envoy_redundant(&local);
    assert!(
        redundant.is_empty(),
        "bounds whose bucket Envoy leaves empty: {redundant:?}"
    );
}
