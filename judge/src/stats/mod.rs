//! The statistics behind the verdicts of `kvab check` and `kvab experiment`, with no I/O: percentiles of
//! latencies, the split test (a burst spread across the proxies, or answers per arm against the planned
//! assignment), the Mann-Whitney U test with the Hodges–Lehmann shift and its distribution-free interval,
//! distribution-free intervals of a median, Holm's step-down correction and the two-proportion test.
//!
//! The distributions (normal, chi-square, binomial) are `statrs`'s; what is here is what no crate does the
//! way SciPy does: the tie-corrected Mann-Whitney U, the exact two-sided binomial test, and the order
//! statistics of pairwise differences, found by bisection on counts (O((n + m) log) time, no n × m array).

use statrs::distribution::{Binomial, ChiSquared, ContinuousCDF, Discrete, DiscreteCDF, Normal};

pub mod stratified;

/// The largest count taken as input: 2^53, up to which f64 (Prometheus's values) holds every integer. An
/// increase over a window beyond it is 9·10^15 requests, 285 years at a million a second: a broken series,
/// not traffic, and counts beyond it are no longer exact.
pub const MAX_COUNT: f64 = 9_007_199_254_740_992.0;

/// Why a value is no count of requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InvalidCount {
    NotANumber,
    Infinite(f64),
    Negative(f64),
    Absurd(f64),
}

impl std::fmt::Display for InvalidCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvalidCount::NotANumber => write!(f, "the value is NaN, not a count"),
            InvalidCount::Infinite(v) => write!(f, "the value is {v}, not a count"),
            InvalidCount::Negative(v) => write!(f, "the count {v} is negative"),
            InvalidCount::Absurd(v) => write!(
                f,
                "the count {v:e} is above 2^53 ({MAX_COUNT:e}), more than any window holds"
            ),
        }
    }
}

/// A value that counts requests (a counter's or a bucket's `increase()`): finite, not negative, at most
/// `MAX_COUNT`.
pub fn count(value: f64) -> Result<f64, InvalidCount> {
    if value.is_nan() {
        Err(InvalidCount::NotANumber)
    } else if value.is_infinite() {
        Err(InvalidCount::Infinite(value))
    } else if value < 0.0 {
        Err(InvalidCount::Negative(value))
    } else if value > MAX_COUNT {
        Err(InvalidCount::Absurd(value))
    } else {
        Ok(value)
    }
}

/// Linear-interpolation percentile of a sample, `q` in `0..=100` (Hyndman–Fan type 7: NumPy's default
/// `np.percentile`, also R's `quantile`). `None` for an empty sample.
pub fn percentile(sample: &[f64], q: f64) -> Option<f64> {
    percentile_of_sorted(&sorted(sample), q)
}

/// `percentile` of a sample already sorted ascending.
pub fn percentile_of_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&q) {
        return None;
    }
    let position = q / 100.0 * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    let (low, high) = (sorted.get(below)?, sorted.get(above)?);
    Some(low + (high - low) * (position - below as f64))
}

/// Result of a two-sided Mann-Whitney U test of "the two samples come from the same distribution".
#[derive(Debug, Clone, PartialEq)]
pub struct MannWhitney {
    /// U of the first sample: the number of pairs (a, b) with a > b, ties counting one half.
    pub u_first: f64,
    /// Standard normal deviate, with tie and continuity corrections.
    pub z: f64,
    /// Two-sided p-value (normal approximation, as SciPy's `method="asymptotic"`).
    pub p_value: f64,
    /// Hodges–Lehmann estimate of the shift `second − first`: the median of all pairwise differences.
    pub shift: f64,
}

/// Two-sided Mann-Whitney U test (Wilcoxon rank-sum) with average ranks for ties, the tie-corrected
/// variance and a continuity correction of one half, exactly as SciPy's
/// `scipy.stats.mannwhitneyu(first, second, method="asymptotic")`. `None` unless both samples are non-empty.
pub fn mann_whitney_u(first: &[f64], second: &[f64]) -> Option<MannWhitney> {
    if first.is_empty() || second.is_empty() {
        return None;
    }
    let (n1, n2) = (first.len() as f64, second.len() as f64);
    let n = n1 + n2;
    let mut pooled: Vec<(f64, bool)> = first
        .iter()
        .map(|&x| (x, true))
        .chain(second.iter().map(|&x| (x, false)))
        .collect();
    pooled.sort_by(|a, b| a.0.total_cmp(&b.0));

    // Average ranks over runs of ties; the run lengths feed the variance correction.
    let mut rank_sum_first = 0.0;
    let mut tie_term = 0.0;
    let mut start = 0;
    while start < pooled.len() {
        let mut end = start + 1;
        while end < pooled.len() && pooled[end].0 == pooled[start].0 {
            end += 1;
        }
        let run = (end - start) as f64;
        let average_rank = (start + end + 1) as f64 / 2.0;
        rank_sum_first += average_rank * pooled[start..end].iter().filter(|p| p.1).count() as f64;
        tie_term += run * run * run - run;
        start = end;
    }
    let u_first = rank_sum_first - n1 * (n1 + 1.0) / 2.0;
    let u_second = n1 * n2 - u_first;
    let mean = n1 * n2 / 2.0;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));

    let (z, p_value) = if variance > 0.0 {
        let z = (u_first.max(u_second) - mean - 0.5) / variance.sqrt();
        (z, (2.0 * normal_sf(z)).min(1.0))
    } else {
        // Every value is the same: no evidence of any difference.
        (0.0, 1.0)
    };
    let shift = hodges_lehmann(first, second).unwrap_or(0.0);
    Some(MannWhitney {
        u_first,
        z: if u_first >= mean { z } else { -z },
        p_value,
        shift,
    })
}

pub fn sorted(sample: &[f64]) -> Vec<f64> {
    let mut sorted = sample.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// How many pairwise differences `b − a` (a from `first`, b from `second`, both sorted) are `≤ t`.
fn differences_at_most(first: &[f64], second: &[f64], t: f64) -> u64 {
    // For ascending b, the a with a ≥ b − t start further right: one pass of two pointers.
    let mut count = 0u64;
    let mut start = 0usize;
    for &b in second {
        // Compared as `b − a > t`, the very expression of the differences (not `a < b − t`, which rounds
        // differently).
        while start < first.len() && b - first[start] > t {
            start += 1;
        }
        count += (first.len() - start) as u64;
    }
    count
}

/// The `k`-th smallest (1-based) of the `n·m` differences `b − a`, from sorted samples: bisection on the
/// value until the bracket holds one difference (to the precision of f64), then the nearest difference.
fn difference_order_statistic(first: &[f64], second: &[f64], k: u64) -> Option<f64> {
    let total = (first.len() as u64) * (second.len() as u64);
    if k == 0 || k > total {
        return None;
    }
    let (a_min, a_max) = (*first.first()?, *first.last()?);
    let (b_min, b_max) = (*second.first()?, *second.last()?);
    let (mut low, mut high) = (b_min - a_max, b_max - a_min);
    // Invariant: fewer than k differences are ≤ low (or low is the minimum), at least k are ≤ high.
    if differences_at_most(first, second, low) >= k {
        return Some(low);
    }
    for _ in 0..200 {
        let middle = low + (high - low) / 2.0;
        if middle <= low || middle >= high {
            break;
        }
        if differences_at_most(first, second, middle) >= k {
            high = middle;
        } else {
            low = middle;
        }
    }
    // The k-th difference is the smallest one above `low`: the exact value, not the bracket's end.
    smallest_difference_above(first, second, low).or(Some(high))
}

/// The smallest difference `b − a` greater than `t`, from sorted samples: for each b, the largest a below
/// `b − t` (one pass of two pointers).
fn smallest_difference_above(first: &[f64], second: &[f64], t: f64) -> Option<f64> {
    let mut best: Option<f64> = None;
    let mut below = 0usize;
    for &b in second {
        while below < first.len() && b - first[below] > t {
            below += 1;
        }
        // first[..below] all give b − a > t; the largest of them gives the smallest such difference.
        if let Some(&a) = below.checked_sub(1).and_then(|i| first.get(i)) {
            let d = b - a;
            best = Some(best.map_or(d, |x: f64| x.min(d)));
        }
    }
    best
}

/// Hodges–Lehmann estimate of the shift `second − first`: the median of all pairwise differences.
pub fn hodges_lehmann(first: &[f64], second: &[f64]) -> Option<f64> {
    let (first, second) = (sorted(first), sorted(second));
    let total = (first.len() as u64) * (second.len() as u64);
    if total == 0 {
        return None;
    }
    let lower = difference_order_statistic(&first, &second, total.div_ceil(2))?;
    if total % 2 == 1 {
        return Some(lower);
    }
    let upper = difference_order_statistic(&first, &second, total / 2 + 1)?;
    Some((lower + upper) / 2.0)
}

/// Distribution-free `1 − alpha` confidence interval of the shift `second − first` (the Hodges–Lehmann
/// interval, Lehmann 1975 §2.6): the `k`-th smallest and largest pairwise differences, `k` from the
/// Mann-Whitney statistic's normal approximation with the tie-corrected variance. Valid when the two
/// distributions differ by a shift. `None` with fewer than 2 values on either side, or when the samples are
/// too small for the level (the interval would be unbounded).
pub fn shift_interval(first: &[f64], second: &[f64], alpha: f64) -> Option<(f64, f64)> {
    if first.len() < 2 || second.len() < 2 || !(alpha > 0.0 && alpha < 1.0) {
        return None;
    }
    let (n1, n2) = (first.len() as f64, second.len() as f64);
    let n = n1 + n2;
    let mut pooled: Vec<f64> = first.iter().chain(second).copied().collect();
    pooled.sort_by(f64::total_cmp);
    let mut tie_term = 0.0;
    let mut start = 0;
    while start < pooled.len() {
        let end = start
            + pooled[start..]
                .iter()
                .take_while(|&&v| v == pooled[start])
                .count();
        let run = (end - start) as f64;
        tie_term += run * run * run - run;
        start = end;
    }
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    let z = Normal::standard().inverse_cdf(1.0 - alpha / 2.0);
    // C_alpha: the number of differences cut off below the interval (and above it).
    let cut = (n1 * n2 / 2.0 - z * variance.sqrt() - 0.5).floor();
    if cut < 0.0 {
        return None;
    }
    let cut = cut as u64;
    let total = (first.len() as u64) * (second.len() as u64);
    let (first, second) = (sorted(first), sorted(second));
    let low = difference_order_statistic(&first, &second, cut + 1)?;
    let high = difference_order_statistic(&first, &second, total - cut)?;
    Some((low, high))
}

/// Distribution-free `1 − alpha` confidence interval of a median: the order statistics `(l, u)` of the
/// sorted sample with `P(l ≤ median ≤ u) ≥ 1 − alpha` under Binomial(n, 1/2), taken symmetric. `None` when
/// the sample is too small for the level (fewer than 6 values at 95 %).
pub fn median_interval(sample: &[f64], alpha: f64) -> Option<(f64, f64)> {
    let n = sample.len() as u64;
    let j = median_rank(n, alpha)?;
    let sorted = sorted(sample);
    let low = *sorted.get((j - 1) as usize)?;
    let high = *sorted.get((n - j) as usize)?;
    Some((low, high))
}

/// The rank `j` of the distribution-free median interval `[x_(j), x_(n+1−j)]`: the largest `j ≤ n/2` with
/// `P(Binomial(n, 1/2) ≤ j − 1) ≤ alpha/2`, found by bisection: about 2·log2(n) CDF evaluations whatever
/// `n` is (exact up to `EXACT_BINOMIAL_TRIALS`, the normal approximation beyond). `None` when no `j ≥ 1`
/// qualifies.
pub fn median_rank(n: u64, alpha: f64) -> Option<u64> {
    if n == 0 || !(alpha > 0.0 && alpha < 1.0) {
        return None;
    }
    let at_most = binomial_cdf(n, 0.5)?;
    let fits = |j: u64| at_most(j - 1) <= alpha / 2.0;
    // `fits` holds from j = 1 up to the rank sought and fails beyond it.
    let highest = (n / 2).max(1);
    match first_where(1, highest, |j| !fits(j)) {
        Some(1) => None,
        Some(j) => Some(j - 1),
        None => Some(highest),
    }
}

/// The ranks `(l, u)` of the distribution-free interval `[x_(l), x_(u)]` of the `q`-quantile of `n`
/// values (the order-statistic interval: Conover, *Practical Nonparametric Statistics*, 3rd ed., §3.2):
/// `l` the largest rank with `P(Binomial(n, q) ≤ l − 1) ≤ alpha/2`, so `P(x_(l) > ξ_q) ≤ alpha/2`; `u` the
/// smallest with `P(Binomial(n, q) ≤ u − 1) ≥ 1 − alpha/2`, so `P(x_(u) < ξ_q) ≤ alpha/2` (exact for
/// continuous data, conservative with ties). Each side `None` when `n` is too small to bound it (a p99's
/// upper side needs `n ≥ 368` at `alpha` = 0.05). Bisection, as `median_rank`. Counts beyond `MAX_COUNT`
/// (no sample or histogram holds them) have no ranks: the bisection's range would overflow at `u64::MAX`.
pub fn quantile_ranks(n: u64, q: f64, alpha: f64) -> (Option<u64>, Option<u64>) {
    if n == 0 || n as f64 > MAX_COUNT || !(alpha > 0.0 && alpha < 1.0) || !(q > 0.0 && q < 1.0) {
        return (None, None);
    }
    let Some(at_most) = binomial_cdf(n, q) else {
        return (None, None);
    };
    let lower = match first_where(1, n, |l| at_most(l - 1) > alpha / 2.0) {
        Some(1) => None,
        Some(l) => Some(l - 1),
        None => Some(n),
    };
    let upper = first_where(1, n, |u| at_most(u - 1) >= 1.0 - alpha / 2.0);
    (lower, upper)
}

/// Largest trial count whose binomial probabilities are computed exactly (statrs's regularized incomplete
/// beta and log-gamma). Beyond it they lose precision: at 10^11 trials statrs's `P(X ≤ x)` at the 2.5 %
/// point is off by 2e-5 and at 10^15 it exceeds 1, while the normal approximation with a continuity
/// correction is then good to far better than any threshold needs (for p = 1/2 its error is O(1/n);
/// otherwise Berry–Esseen bounds it by 0.48/√(n·p·(1−p)), below 2e-5 at 10^9 trials unless one arm's
/// share is under 0.1 %).
pub const EXACT_BINOMIAL_TRIALS: u64 = 1_000_000_000;

/// `x ↦ P(X ≤ x)` for `X ~ Binomial(trials, p)`: exact up to `EXACT_BINOMIAL_TRIALS`, the normal
/// approximation with a continuity correction beyond. `None` for a `p` outside `0..=1`.
fn binomial_cdf(trials: u64, p: f64) -> Option<impl Fn(u64) -> f64> {
    let binomial = Binomial::new(p, trials).ok()?;
    let (mean, sd) = (trials as f64 * p, (trials as f64 * p * (1.0 - p)).sqrt());
    Some(move |x: u64| {
        if trials <= EXACT_BINOMIAL_TRIALS || sd == 0.0 {
            binomial.cdf(x)
        } else {
            Normal::standard().cdf((x as f64 + 0.5 - mean) / sd)
        }
    })
}

/// The smallest `x` in `low..=high` where `holds` does, for a `holds` false up to some point and true from
/// there on (a bisection: log2(high − low) calls). `None` when it holds nowhere in the range.
fn first_where(low: u64, high: u64, holds: impl Fn(u64) -> bool) -> Option<u64> {
    let (mut low, mut high) = (low, high.checked_add(1)?);
    let end = high;
    while low < high {
        let middle = low + (high - low) / 2;
        if holds(middle) {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    (low < end).then_some(low)
}

/// Holm's step-down adjusted p-values, in the input's order: `p_(i)` times the number of hypotheses not yet
/// rejected, made monotone, capped at 1. A hypothesis is rejected at family-wise level α when its
/// adjusted p-value is ≤ α.
pub fn holm_adjusted(p_values: &[f64]) -> Vec<f64> {
    let m = p_values.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let mut adjusted = vec![1.0; m];
    let mut running: f64 = 0.0;
    for (rank, &index) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p_values[index]).min(1.0));
        adjusted[index] = running;
    }
    adjusted
}

/// The level at which Holm's procedure judges each hypothesis, in the input's order: `alpha / (m − rank)`
/// along the sorted p-values up to the first one not rejected; that one's level for it and every later one.
/// An interval at `1 − level` excludes the null value exactly when the hypothesis is rejected (for tests
/// that invert to the interval).
pub fn holm_levels(p_values: &[f64], alpha: f64) -> Vec<f64> {
    let m = p_values.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let mut levels = vec![alpha; m];
    let mut stopped: Option<f64> = None;
    for (rank, &index) in order.iter().enumerate() {
        let level = stopped.unwrap_or(alpha / (m - rank) as f64);
        if stopped.is_none() && p_values[index] > level {
            stopped = Some(level);
        }
        levels[index] = level;
    }
    levels
}

/// Two-sided p-value of the pooled two-proportion z test of `x1/n1` against `x2/n2`. `None` without
/// trials on either side; 1 when neither side or both sides are all failures or all successes.
pub fn two_proportion(x1: u64, n1: u64, x2: u64, n2: u64) -> Option<f64> {
    if n1 == 0 || n2 == 0 || x1 > n1 || x2 > n2 {
        return None;
    }
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let pooled = (x1 + x2) as f64 / (n1f + n2f);
    let variance = pooled * (1.0 - pooled) * (1.0 / n1f + 1.0 / n2f);
    if variance <= 0.0 {
        return Some(1.0);
    }
    let z = (x1 as f64 / n1f - x2 as f64 / n2f).abs() / variance.sqrt();
    Some((2.0 * normal_sf(z)).min(1.0))
}

/// A p-value as reports print it: four decimals, scientific below 1e-4.
pub fn format_p(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

/// Which test judged a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitMethod {
    /// Two proxies: exact two-sided binomial test of the first proxy's count.
    Binomial,
    /// Three or more: Pearson's chi-square goodness of fit with `k − 1` degrees of freedom.
    ChiSquare,
    /// A single proxy: nothing to test.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SplitTest {
    pub method: SplitMethod,
    /// The chi-square statistic (also computed for two proxies, for the report), 0 for one proxy.
    pub statistic: f64,
    /// Probability, if traffic followed the expected split, of a split at least this far from it.
    pub p_value: f64,
}

/// Tests observed request counts per proxy against expected weights (any positive scale). `None` when the
/// inputs differ in length, a weight is not positive, nothing was observed, or the total overflows u64.
pub fn split_test(observed: &[u64], weights: &[f64]) -> Option<SplitTest> {
    let total = observed
        .iter()
        .try_fold(0u64, |sum, o| sum.checked_add(*o))?;
    let weight_sum: f64 = weights.iter().sum();
    if observed.len() != weights.len()
        || observed.is_empty()
        || total == 0
        || weights.iter().any(|w| !(*w > 0.0 && w.is_finite()))
    {
        return None;
    }
    let expected: Vec<f64> = weights
        .iter()
        .map(|w| w / weight_sum * total as f64)
        .collect();
    let statistic: f64 = observed
        .iter()
        .zip(&expected)
        .map(|(&o, &e)| (o as f64 - e).powi(2) / e)
        .sum();
    Some(match observed {
        [_] => SplitTest {
            method: SplitMethod::None,
            statistic: 0.0,
            p_value: 1.0,
        },
        [first, _] => SplitTest {
            method: SplitMethod::Binomial,
            statistic,
            p_value: binomial_two_sided(*first, total, weights[0] / weight_sum),
        },
        _ => SplitTest {
            method: SplitMethod::ChiSquare,
            statistic,
            p_value: chi_square_sf(statistic, (observed.len() - 1) as f64),
        },
    })
}

/// Two-sided binomial test (SciPy's `binomtest(k, n, p).pvalue`): the total probability of every outcome
/// no more likely than the observed one, with SciPy's relative tolerance of 1e-7 for ties. As SciPy, the
/// outcomes on the other side of the mean are found by bisection on the probability mass (it falls away
/// from the mode on both sides) and summed by the CDF: a few dozen evaluations whatever the count. Exact
/// up to `EXACT_BINOMIAL_TRIALS`; beyond, the normal approximation with a continuity correction.
pub fn binomial_two_sided(successes: u64, trials: u64, p: f64) -> f64 {
    if successes > trials || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    let (k, mean) = (successes as f64, trials as f64 * p);
    if trials > EXACT_BINOMIAL_TRIALS {
        let sd = (mean * (1.0 - p)).sqrt();
        let z = ((k - mean).abs() - 0.5).max(0.0) / sd;
        return if sd > 0.0 {
            (2.0 * normal_sf(z)).min(1.0)
        } else {
            f64::from(u8::from(k == mean))
        };
    }
    let Ok(binomial) = Binomial::new(p, trials) else {
        return f64::NAN;
    };
    let likely = |x: u64| binomial.pmf(x) > binomial.pmf(successes) * (1.0 + 1e-7);
    let p_value = if k == mean {
        1.0
    } else if k < mean {
        // Above the mean the mass falls: the outcomes from the first one no more likely, upward.
        let first = first_where(mean.ceil() as u64, trials, |x| !likely(x));
        binomial.cdf(successes) + first.map_or(0.0, |x| binomial.sf(x.saturating_sub(1)))
    } else {
        // Below the mean the mass rises: the outcomes up to the last one no more likely.
        let beyond = first_where(0, mean.floor() as u64, likely);
        let below = match beyond {
            Some(0) => 0.0,
            Some(x) => binomial.cdf(x - 1),
            None => binomial.cdf(mean.floor() as u64),
        };
        below + binomial.sf(successes.saturating_sub(1))
    };
    p_value.min(1.0)
}

/// Upper tail of the chi-square distribution with `df` degrees of freedom.
pub fn chi_square_sf(x: f64, df: f64) -> f64 {
    ChiSquared::new(df).map_or(f64::NAN, |chi_square| chi_square.sf(x))
}

/// Upper tail of the standard normal distribution, `P(Z > z)`.
pub fn normal_sf(z: f64) -> f64 {
    Normal::standard().sf(z)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
