//! The statistics behind the verdicts, with no I/O: percentiles of latencies, the split test that tells a
//! burst spread across the proxies from one pinned to a proxy, and the Mann-Whitney U test between the arms.
//!
//! The distributions (normal, chi-square, binomial) are `statrs`'s; what is here is what no crate does the
//! way SciPy does: the tie-corrected Mann-Whitney U and the exact two-sided binomial test.

use statrs::distribution::{Binomial, ChiSquared, ContinuousCDF, Discrete, Normal};

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
    let mut differences: Vec<f64> = first
        .iter()
        .flat_map(|a| second.iter().map(move |b| b - a))
        .collect();
    let shift = percentile(&differences, 50.0).unwrap_or(0.0);
    differences.clear();
    Some(MannWhitney {
        u_first,
        z: if u_first >= mean { z } else { -z },
        p_value,
        shift,
    })
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
/// inputs differ in length, a weight is not positive, or nothing was observed.
pub fn split_test(observed: &[u64], weights: &[f64]) -> Option<SplitTest> {
    let total: u64 = observed.iter().sum();
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

/// Exact two-sided binomial test (SciPy's `binomtest(k, n, p).pvalue`): the total probability of every
/// outcome no more likely than the observed one, with SciPy's relative tolerance of 1e-7 for ties.
pub fn binomial_two_sided(successes: u64, trials: u64, p: f64) -> f64 {
    if successes > trials || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    let observed = binomial_pmf(successes, trials, p);
    let sum: f64 = (0..=trials)
        .map(|k| binomial_pmf(k, trials, p))
        .filter(|&q| q <= observed * (1.0 + 1e-7))
        .sum();
    sum.min(1.0)
}

fn binomial_pmf(k: u64, n: u64, p: f64) -> f64 {
    Binomial::new(p, n).map_or(f64::NAN, |binomial| binomial.pmf(k))
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

    #[test]
    fn split_test_refuses_what_it_cannot_judge() {
        assert!(split_test(&[0, 0], &[1.0, 1.0]).is_none());
        assert!(split_test(&[1, 2], &[1.0]).is_none());
        assert!(split_test(&[1, 2], &[1.0, 0.0]).is_none());
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
}
