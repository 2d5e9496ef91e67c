//! The statistics behind the verdicts of `kvab check` and `kvab experiment`, with no I/O: percentiles of
//! latencies, the split test (a burst spread across the proxies, or answers per arm against the planned
//! assignment), the Mann-Whitney U test with the Hodges–Lehmann shift and its distribution-free interval,
//! distribution-free intervals of a median, Holm's step-down correction and the two-proportion test.
//!
//! The distributions (normal, chi-square, binomial) are `statrs`'s; what is here is what no crate does the
//! way SciPy does: the tie-corrected Mann-Whitney U, the exact two-sided binomial test, and the order
//! statistics of pairwise differences, found by bisection on counts (O((n + m) log) time, no n × m array).

use statrs::distribution::{Binomial, ChiSquared, ContinuousCDF, Discrete, DiscreteCDF, Normal};

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
    if sample.is_empty() || !(0.0..=100.0).contains(&q) {
        return None;
    }
    let mut sorted = sample.to_vec();
    sorted.sort_by(f64::total_cmp);
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

fn sorted(sample: &[f64]) -> Vec<f64> {
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
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance * expected.abs().max(1e-300),
            "{actual} is not within {tolerance} (relative) of {expected}"
        );
    }

    #[test]
    fn percentiles_interpolate_linearly_like_numpy() {
        // numpy.percentile documentation: a = [[10, 7, 4], [3, 2, 1]]; np.percentile(a, 50) == 3.5.
        let a = [10.0, 7.0, 4.0, 3.0, 2.0, 1.0];
        assert_eq!(percentile(&a, 50.0), Some(3.5));
        assert_eq!(percentile(&a, 0.0), Some(1.0));
        assert_eq!(percentile(&a, 100.0), Some(10.0));
        // By hand: position 0.95 × 3 = 2.85 between 3 and 4.
        close(
            percentile(&[4.0, 1.0, 3.0, 2.0], 95.0).unwrap(),
            3.85,
            1e-12,
        );
        assert_eq!(percentile(&[42.0], 99.0), Some(42.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0], 101.0), None);
    }

    #[test]
    fn mann_whitney_matches_the_scipy_documentation_example() {
        // scipy.stats.mannwhitneyu documentation: ages of male and female faculty.
        // U1 = 17; method="asymptotic" gives p = 0.11134688653314041
        // (by hand: z = (17 − 10 − 0.5) / √(5·4·10/12) = 1.5922, p = 2·(1 − Φ(z))).
        let males = [19.0, 22.0, 16.0, 29.0, 24.0];
        let females = [20.0, 11.0, 17.0, 12.0];
        let result = mann_whitney_u(&males, &females).unwrap();
        assert_eq!(result.u_first, 17.0);
        close(result.p_value, 0.111_346_886_533_140_41, 1e-9);
        close(result.z, 6.5 / (50.0f64 / 3.0).sqrt(), 1e-12);
        // Hodges–Lehmann shift females − males, by hand: the 20 differences sorted are
        // -18 -17 -13 -12 -12 -11 -10 -9 -8 -7 | -7 -5 -5 -4 -4 -2 -2 1 1 4; the median is -7.
        assert_eq!(result.shift, -7.0);
        // Swapping the samples mirrors U and the sign of z, not the p-value.
        let swapped = mann_whitney_u(&females, &males).unwrap();
        assert_eq!(swapped.u_first, 3.0);
        assert_eq!(swapped.p_value, result.p_value);
        assert!(swapped.z < 0.0);
    }

    #[test]
    fn mann_whitney_handles_ties_and_constant_samples() {
        // By hand: pooled [1,2,2,3] → ranks 1, 2.5, 2.5, 4; first = [1, 2] has rank sum 3.5, U1 = 0.5.
        // Tie term 2³ − 2 = 6: variance = 2·2/12 · (5 − 6/12) = 1.5; z = (3.5 − 2 − 0.5)/√1.5.
        let result = mann_whitney_u(&[1.0, 2.0], &[2.0, 3.0]).unwrap();
        assert_eq!(result.u_first, 0.5);
        close(result.p_value, 2.0 * normal_sf(1.0 / 1.5f64.sqrt()), 1e-12);
        let constant = mann_whitney_u(&[5.0, 5.0], &[5.0, 5.0, 5.0]).unwrap();
        assert_eq!(constant.p_value, 1.0);
        assert!(mann_whitney_u(&[], &[1.0]).is_none());
    }

    #[test]
    fn clearly_separated_samples_are_significant() {
        let fast: Vec<f64> = (0..10).map(|i| 10.0 + f64::from(i)).collect();
        let slow: Vec<f64> = (0..10).map(|i| 100.0 + f64::from(i)).collect();
        let result = mann_whitney_u(&fast, &slow).unwrap();
        assert_eq!(result.u_first, 0.0);
        // By hand: z = (100 − 50 − 0.5) / √(10·10·21/12) = 3.7418; p = erfc(z/√2) = 1.826717911e-4
        // (Python's math.erfc as the reference).
        close(result.z, -49.5 / 175.0f64.sqrt(), 1e-12);
        close(result.p_value, 1.826_717_911_095_504e-4, 1e-9);
        assert_eq!(result.shift, 90.0);
    }

    #[test]
    fn chi_square_matches_the_scipy_documentation_examples() {
        // scipy.stats.chisquare documentation: chisquare([16, 18, 16, 14, 12, 12])
        // → statistic 2.0, pvalue 0.84914503608460956.
        let uniform = split_test(&[16, 18, 16, 14, 12, 12], &[1.0; 6]).unwrap();
        assert_eq!(uniform.method, SplitMethod::ChiSquare);
        close(uniform.statistic, 2.0, 1e-12);
        close(uniform.p_value, 0.849_145_036_084_609_6, 1e-9);
        // ... f_exp=[16, 16, 16, 16, 16, 8] → statistic 3.5, pvalue 0.62338762774958223.
        let weighted = split_test(
            &[16, 18, 16, 14, 12, 12],
            &[16.0, 16.0, 16.0, 16.0, 16.0, 8.0],
        )
        .unwrap();
        close(weighted.statistic, 3.5, 1e-12);
        close(weighted.p_value, 0.623_387_627_749_582_2, 1e-9);
    }

    #[test]
    fn binomial_test_matches_exact_sums() {
        // By hand for p = 1/2: P(X ≤ 7 | n = 20) = (1+20+190+1140+4845+15504+38760+77520) / 2^20
        // = 137980 / 1048576; the two-sided p-value doubles it.
        close(
            binomial_two_sided(7, 20, 0.5),
            2.0 * 137_980.0 / 1_048_576.0,
            1e-12,
        );
        close(
            binomial_two_sided(13, 20, 0.5),
            2.0 * 137_980.0 / 1_048_576.0,
            1e-12,
        );
        // A burst of 20 pinned to one of two proxies: 2 / 2^20.
        close(binomial_two_sided(0, 20, 0.5), 2.0 / 1_048_576.0, 1e-9);
        close(binomial_two_sided(10, 20, 0.5), 1.0, 1e-12);
        // Asymmetric: n = 3, p = 0.2: pmf = 0.512, 0.384, 0.096, 0.008; k = 2 sums 0.096 + 0.008.
        close(binomial_two_sided(2, 3, 0.2), 0.104, 1e-12);
        let two = split_test(&[0, 20], &[1.0, 1.0]).unwrap();
        assert_eq!(two.method, SplitMethod::Binomial);
        close(two.p_value, 2.0 / 1_048_576.0, 1e-9);
        close(two.statistic, 20.0, 1e-12);
    }

    /// The definition: the sum over every outcome no more likely than the observed one (SciPy's tolerance).
    fn binomial_two_sided_by_definition(successes: u64, trials: u64, p: f64) -> f64 {
        let binomial = Binomial::new(p, trials).unwrap();
        let observed = binomial.pmf(successes);
        let sum: f64 = (0..=trials)
            .map(|k| binomial.pmf(k))
            .filter(|&q| q <= observed * (1.0 + 1e-7))
            .sum();
        sum.min(1.0)
    }

    #[test]
    fn the_binomial_test_by_bisection_is_the_sum_over_every_outcome() {
        for trials in (1..40).chain([97, 250]) {
            for p in [0.5, 0.2, 0.37, 0.9, 0.01] {
                for successes in 0..=trials {
                    close(
                        binomial_two_sided(successes, trials, p),
                        binomial_two_sided_by_definition(successes, trials, p),
                        1e-9,
                    );
                }
            }
        }
    }

    #[test]
    fn the_binomial_test_of_huge_counts_is_a_closed_form() {
        // One loop step per trial took 7 s at 10^8 and never ended near 2^64. Now a few dozen evaluations:
        // at 10^8 split requests, 20,000 off the half is z = (20,000 − 0.5)/5,000 = 3.9999, p = 6.33e-5.
        let n = 100_000_000;
        close(
            binomial_two_sided(n / 2 + 20_000, n, 0.5),
            2.0 * normal_sf(19_999.5 / 5_000.0),
            1e-3,
        );
        close(binomial_two_sided(n / 2, n, 0.5), 1.0, 1e-12);
        // Beyond EXACT_BINOMIAL_TRIALS, the normal approximation; it meets the exact test at the limit.
        let limit = EXACT_BINOMIAL_TRIALS;
        let off = 40_000; // z = 40,000 / 15,811 = 2.53, p = 0.0114
        close(
            binomial_two_sided(limit / 2 + off, limit, 0.5),
            binomial_two_sided(limit / 2 + 1 + off, limit + 2, 0.5),
            1e-3,
        );
        // 2^53 and u64::MAX trials: answers, not hangs.
        let huge = MAX_COUNT as u64;
        close(binomial_two_sided(huge / 2, huge, 0.5), 1.0, 1e-12);
        assert!(binomial_two_sided(huge / 3, huge, 0.5) < 1e-300);
        close(binomial_two_sided(u64::MAX / 4, u64::MAX, 0.25), 1.0, 1e-6);
        assert_eq!(binomial_two_sided(5, huge, 0.0), 0.0);
    }

    #[test]
    fn counts_are_finite_not_negative_and_at_most_2_to_the_53() {
        assert_eq!(count(0.0), Ok(0.0));
        assert_eq!(count(1234.5), Ok(1234.5));
        assert_eq!(count(MAX_COUNT), Ok(MAX_COUNT));
        assert_eq!(count(f64::NAN), Err(InvalidCount::NotANumber));
        assert_eq!(
            count(f64::INFINITY),
            Err(InvalidCount::Infinite(f64::INFINITY))
        );
        assert_eq!(count(-1.0), Err(InvalidCount::Negative(-1.0)));
        assert_eq!(count(1e18), Err(InvalidCount::Absurd(1e18)));
        assert_eq!(
            InvalidCount::Infinite(f64::INFINITY).to_string(),
            "the value is inf, not a count"
        );
        assert_eq!(
            InvalidCount::Absurd(1e18).to_string(),
            "the count 1e18 is above 2^53 (9.007199254740992e15), more than any window holds"
        );
    }

    #[test]
    fn split_test_refuses_what_it_cannot_judge() {
        assert!(split_test(&[0, 0], &[1.0, 1.0]).is_none());
        assert!(split_test(&[1, 2], &[1.0]).is_none());
        assert!(split_test(&[1, 2], &[1.0, 0.0]).is_none());
        assert!(split_test(&[u64::MAX, 1], &[1.0, 1.0]).is_none());
        assert_eq!(split_test(&[5], &[1.0]).unwrap().method, SplitMethod::None);
    }

    #[test]
    fn tails_agree_with_closed_forms() {
        // Normal quantiles: P(Z > 1.959963984540054) = 0.025, P(Z > 0) = 0.5, P(Z > −1) = 1 − P(Z > 1).
        // statrs's erfc is good to about 1e-10 relative here; p-values need far less.
        close(normal_sf(1.959_963_984_540_054), 0.025, 1e-9);
        close(normal_sf(0.0), 0.5, 1e-15);
        close(normal_sf(-1.0), 1.0 - normal_sf(1.0), 1e-15);
        // Chi-square with 2 degrees of freedom has survival e^(−x/2).
        close(chi_square_sf(3.0, 2.0), (-1.5f64).exp(), 1e-12);
    }

    /// All n·m differences, sorted: the definition the bisection must agree with.
    fn brute_differences(first: &[f64], second: &[f64]) -> Vec<f64> {
        let mut d: Vec<f64> = first
            .iter()
            .flat_map(|a| second.iter().map(move |b| b - a))
            .collect();
        d.sort_by(f64::total_cmp);
        d
    }

    #[test]
    fn order_statistics_of_differences_match_the_brute_force_definition() {
        let first = [3.1, 7.4, 2.2, 9.9, 5.0, 5.0, 1.3];
        let second = [4.4, 8.8, 6.1, 2.2, 10.5];
        let all = brute_differences(&first, &second);
        let (a, b) = (sorted(&first), sorted(&second));
        for k in 1..=all.len() as u64 {
            let found = difference_order_statistic(&a, &b, k).unwrap();
            close(found, all[(k - 1) as usize], 1e-12);
        }
        assert!(difference_order_statistic(&a, &b, 0).is_none());
        assert!(difference_order_statistic(&a, &b, all.len() as u64 + 1).is_none());
        // 35 differences: the median is the 18th.
        close(hodges_lehmann(&first, &second).unwrap(), all[17], 1e-12);
        // Even count: the mean of the two middle ones.
        let all = brute_differences(&first[..6], &second);
        close(
            hodges_lehmann(&first[..6], &second).unwrap(),
            (all[14] + all[15]) / 2.0,
            1e-12,
        );
    }

    #[test]
    fn the_shift_interval_is_cut_by_the_mann_whitney_critical_value() {
        // n = m = 10, no ties: sd = √(100·21/12) = 13.229; z(0.975) = 1.95996;
        // C = floor(50 − 1.95996·13.229 − 0.5) = floor(23.57) = 23, so the interval is [d_24, d_77].
        let first: Vec<f64> = (0..10).map(|i| f64::from(i) * 1.7).collect();
        let second: Vec<f64> = (0..10).map(|i| 4.0 + f64::from(i) * 1.3).collect();
        let all = brute_differences(&first, &second);
        let (low, high) = shift_interval(&first, &second, 0.05).unwrap();
        close(low, all[23], 1e-12);
        close(high, all[76], 1e-12);
        // Too small for the level: with 2 + 2 values no order statistic gives 99.9 %.
        assert!(shift_interval(&[1.0, 2.0], &[3.0, 4.0], 0.001).is_none());
        assert!(shift_interval(&[1.0], &[3.0, 4.0], 0.05).is_none());
    }

    #[test]
    fn median_intervals_take_the_binomial_order_statistics() {
        // n = 10 at 95 %: P(X ≤ 1) = 11/1024 ≤ 0.025 < P(X ≤ 2) = 56/1024, so j = 2: [x_(2), x_(9)].
        let sample: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(median_interval(&sample, 0.05), Some((2.0, 9.0)));
        // Five values cannot give 95 %: P(X = 0) = 1/32 > 0.025.
        assert_eq!(median_interval(&sample[..5], 0.05), None);
        assert_eq!(median_interval(&sample[..6], 0.05), Some((1.0, 6.0)));
    }

    #[test]
    fn the_median_rank_is_the_exact_binomial_one() {
        // Against the definition, scanning every j.
        for n in (1..300).chain([1_000, 12_345]) {
            for alpha in [0.05, 0.01, 0.0025] {
                let binomial = Binomial::new(0.5, n).unwrap();
                let mut j = 0u64;
                while j < n / 2 && binomial.cdf(j) <= alpha / 2.0 {
                    j += 1;
                }
                assert_eq!(
                    median_rank(n, alpha),
                    (j > 0).then_some(j),
                    "n={n} alpha={alpha}"
                );
            }
        }
        // A histogram of ten million: the interval is ±~3,100 ranks around the middle at 95 %.
        let j = median_rank(10_000_000, 0.05).unwrap();
        assert!((5_000_000 - j).abs_diff(3_099) < 5, "{j}");
    }

    #[test]
    fn the_median_rank_of_huge_counts_is_found_by_bisection() {
        // Near 10^18 the old walk never ended (statrs's CDF is not a probability there). By the normal
        // approximation: j = n/2 + 1/2 − 1.96·√n/2 = 5·10^17 − 979,981,992 (to f64's precision).
        let n = 1_000_000_000_000_000_000u64;
        let j = median_rank(n, 0.05).unwrap();
        let expected = 5e17 - 1.959_963_984_540_054 * 1e9 / 2.0;
        assert!((j as f64 - expected).abs() < 1e3, "{j}");
        // At the exact limit and just past it, the two ways agree to a rank.
        let exact = median_rank(EXACT_BINOMIAL_TRIALS, 0.05).unwrap();
        let normal = median_rank(EXACT_BINOMIAL_TRIALS + 2, 0.05).unwrap();
        assert!(normal.abs_diff(exact + 1) <= 1, "{exact} {normal}");
        assert!(median_rank(u64::MAX, 0.05).is_some());
    }

    #[test]
    fn holm_adjusts_step_down_and_stays_monotone() {
        // By hand: sorted 0.01, 0.02, 0.03, 0.5 → 4·0.01 = 0.04, 3·0.02 = 0.06, 2·0.03 = 0.06, 1·0.5 = 0.5.
        let adjusted = holm_adjusted(&[0.03, 0.5, 0.01, 0.02]);
        for (got, want) in adjusted.iter().zip([0.06, 0.5, 0.04, 0.06]) {
            close(*got, want, 1e-12);
        }
        // Levels at α = 0.05: 0.0125 rejects 0.01, then 0.0167 does not reject 0.02: that level for the rest.
        let levels = holm_levels(&[0.03, 0.5, 0.01, 0.02], 0.05);
        for (got, want) in levels
            .iter()
            .zip([0.05 / 3.0, 0.05 / 3.0, 0.0125, 0.05 / 3.0])
        {
            close(*got, want, 1e-12);
        }
        assert!(holm_adjusted(&[]).is_empty());
    }

    #[test]
    fn two_proportions_match_the_pooled_z_test() {
        // By hand: 10/100 against 20/100, pooled 0.15: z = 0.1 / √(0.15·0.85·0.02) = 1.9803, p = 0.04767.
        close(
            two_proportion(10, 100, 20, 100).unwrap(),
            2.0 * normal_sf(0.1 / (0.15f64 * 0.85 * 0.02).sqrt()),
            1e-12,
        );
        close(two_proportion(10, 100, 20, 100).unwrap(), 0.047_670, 1e-4);
        assert_eq!(two_proportion(0, 10, 0, 20), Some(1.0));
        assert_eq!(two_proportion(1, 0, 0, 20), None);
    }
}
