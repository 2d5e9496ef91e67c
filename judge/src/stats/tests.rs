//! Tests of the statistics: values checked against the numpy and scipy documentation, closed forms and
//! brute force, and the bounds on counts.

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

#[test]
fn quantile_ranks_refuse_counts_no_data_holds() {
    // At u64::MAX the bisection's range would overflow and read as "no rank fits".
    assert_eq!(quantile_ranks(u64::MAX, 0.99, 0.05), (None, None));
    assert!(quantile_ranks(1 << 53, 0.99, 0.05).1.is_some());
}
