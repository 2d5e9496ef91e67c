//! The Mann-Whitney test, the Hodges–Lehmann shift and its distribution-free interval within strata:
//! van Elteren's stratified Wilcoxon test (van Elteren, *Bull. Inst. Int. Statist.* 37, 1960) and the
//! shift estimate and interval that invert it (Lehmann, *Nonparametrics*, 1975, §3.3).
//!
//! Each stratum compares only its own values: `U_s` counts the pairs `(a, b)` of stratum `s` with
//! `a > b` (ties one half). The statistic is `T = Σ w_s·U_s` with van Elteren's weights
//! `w_s = 1/(N_s + 1)` (`N_s` the stratum's values; scaled so that the largest strata weigh 1, which
//! changes nothing but keeps equal strata exact), its mean under no difference `Σ w_s·m_s·n_s/2` and its
//! variance `Σ w_s²·m_s·n_s/12·((N_s + 1) − t_s/(N_s(N_s − 1)))` (`t_s` the stratum's tie term). A
//! drift shared by both arms that moves between strata moves no `U_s`: it leaves the test and the
//! interval, where an unstratified Mann-Whitney counts it as noise. The shift estimate is the weighted
//! median of the within-stratum differences `b − a` (pair weight `w_s`); the interval's ends are the
//! weighted order statistics cut where the test at `alpha` would reject. With one stratum every figure
//! is `mann_whitney_u`'s, `hodges_lehmann`'s and `shift_interval`'s. A stratum without a value of either
//! arm holds no pair and is left out.

use statrs::distribution::{ContinuousCDF, Normal};

use super::{differences_at_most, normal_sf, smallest_difference_above, sorted};

/// Two arms' values in strata, each arm's sorted, with the stratum's weight and variance term.
#[derive(Debug, Clone)]
pub struct Strata {
    strata: Vec<Stratum>,
}

#[derive(Debug, Clone)]
struct Stratum {
    first: Vec<f64>,
    second: Vec<f64>,
    weight: f64,
    /// `m·n/12·((N + 1) − t/(N(N − 1)))`: the variance of this stratum's `U`.
    variance: f64,
}

/// The stratified test of no difference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Test {
    /// Standard normal deviate, with a continuity correction of half the largest weight (one half of `U`
    /// with one stratum), signed: positive when the first arm's values are larger.
    pub z: f64,
    /// Two-sided p-value (normal approximation).
    pub p_value: f64,
}

impl Strata {
    /// The values of each arm with the stratum of each (`first[i]` in stratum `first_strata[i]`).
    /// `None` when no stratum holds a value of both arms.
    pub fn new(
        [first, second]: [&[f64]; 2],
        [first_strata, second_strata]: [&[usize]; 2],
    ) -> Option<Strata> {
        let count = first_strata
            .iter()
            .chain(second_strata)
            .max()
            .map_or(0, |s| s + 1);
        let mut values = vec![(Vec::new(), Vec::new()); count];
        for (&v, &s) in first.iter().zip(first_strata) {
            if let Some(slot) = values.get_mut(s) {
                slot.0.push(v);
            }
        }
        for (&v, &s) in second.iter().zip(second_strata) {
            if let Some(slot) = values.get_mut(s) {
                slot.1.push(v);
            }
        }
        let kept: Vec<(Vec<f64>, Vec<f64>)> = values
            .into_iter()
            .filter(|(a, b)| !a.is_empty() && !b.is_empty())
            .collect();
        let largest = kept.iter().map(|(a, b)| a.len() + b.len()).max()?;
        let strata = kept
            .into_iter()
            .map(|(a, b)| {
                let (m, n) = (a.len() as f64, b.len() as f64);
                let total = m + n;
                let pooled = sorted(&[a.as_slice(), b.as_slice()].concat());
                let ties = tie_term(&pooled);
                let variance = if total > 1.0 {
                    m * n / 12.0 * ((total + 1.0) - ties / (total * (total - 1.0)))
                } else {
                    0.0
                };
                Stratum {
                    first: sorted(&a),
                    second: sorted(&b),
                    weight: (largest as f64 + 1.0) / (total + 1.0),
                    variance,
                }
            })
            .collect();
        Some(Strata { strata })
    }

    /// The strata that hold a value of both arms.
    pub fn len(&self) -> usize {
        self.strata.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strata.is_empty()
    }

    /// `Σ w_s·m_s·n_s`: the weight of every within-stratum pair.
    fn pairs(&self) -> f64 {
        self.strata
            .iter()
            .map(|s| s.weight * (s.first.len() * s.second.len()) as f64)
            .sum()
    }

    /// The variance of `T` under no difference.
    fn variance(&self) -> f64 {
        self.strata
            .iter()
            .map(|s| s.weight * s.weight * s.variance)
            .sum()
    }

    fn largest_weight(&self) -> f64 {
        self.strata.iter().map(|s| s.weight).fold(0.0, f64::max)
    }

    /// The weighted count of within-stratum differences `b − a` at most `t`.
    fn at_most(&self, t: f64) -> f64 {
        self.strata
            .iter()
            .map(|s| s.weight * differences_at_most(&s.first, &s.second, t) as f64)
            .sum()
    }

    /// van Elteren's test of no difference. `None` when every value is the same in every stratum.
    pub fn test(&self) -> Option<Test> {
        let variance = self.variance();
        if variance.is_nan() || variance <= 0.0 {
            return None;
        }
        let t: f64 = self
            .strata
            .iter()
            .map(|s| s.weight * u_first(&s.first, &s.second))
            .sum();
        let mean = self.pairs() / 2.0;
        let z = ((t - mean).abs() - 0.5 * self.largest_weight()) / variance.sqrt();
        Some(Test {
            z: if t >= mean { z } else { -z },
            p_value: (2.0 * normal_sf(z)).min(1.0),
        })
    }

    /// The stratified Hodges–Lehmann shift `second − first`: the weighted median of the within-stratum
    /// differences.
    pub fn shift(&self) -> Option<f64> {
        let half = self.pairs() / 2.0;
        let lower = self.first_reaching(half, false)?;
        let upper = self.first_reaching(half, true)?;
        Some((lower + upper) / 2.0)
    }

    /// The distribution-free `1 − alpha` interval of the shift: the differences where the weighted count
    /// at or below first exceeds `C` and first reaches `W − C`, `C = W/2 − z·√V − (largest weight)/2`.
    /// `None` when the strata hold too few values for the level.
    pub fn interval(&self, alpha: f64) -> Option<(f64, f64)> {
        if !(alpha > 0.0 && alpha < 1.0)
            || self
                .strata
                .iter()
                .all(|s| s.first.len() < 2 || s.second.len() < 2)
        {
            return None;
        }
        let z = Normal::standard().inverse_cdf(1.0 - alpha / 2.0);
        let total = self.pairs();
        let cut = total / 2.0 - z * self.variance().sqrt() - 0.5 * self.largest_weight();
        if cut < 0.0 {
            return None;
        }
        let low = self.first_reaching(cut, true)?;
        let high = self.first_reaching(total - cut, false)?;
        Some((low, high))
    }

    /// The smallest difference `d` with a weighted count at or below it `≥ target` (`> target` when
    /// `strict`): bisection on the value, then the nearest difference above the bracket's low end.
    fn first_reaching(&self, target: f64, strict: bool) -> Option<f64> {
        let reaches = |t: f64| {
            let count = self.at_most(t);
            if strict {
                count > target
            } else {
                count >= target
            }
        };
        let ends = self
            .strata
            .iter()
            .filter_map(|s| {
                Some((
                    s.second.first()? - s.first.last()?,
                    s.second.last()? - s.first.first()?,
                ))
            })
            .fold(None, |acc: Option<(f64, f64)>, (lo, hi)| {
                Some(acc.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))))
            });
        let (mut low, mut high) = ends?;
        if reaches(low) {
            return Some(low);
        }
        if !reaches(high) {
            return None;
        }
        for _ in 0..200 {
            let middle = low + (high - low) / 2.0;
            if middle <= low || middle >= high {
                break;
            }
            if reaches(middle) {
                high = middle;
            } else {
                low = middle;
            }
        }
        // The answer is the smallest difference above `low`: the exact value, not the bracket's end.
        self.strata
            .iter()
            .filter_map(|s| smallest_difference_above(&s.first, &s.second, low))
            .fold(None, |acc: Option<f64>, d| {
                Some(acc.map_or(d, |x| x.min(d)))
            })
            .or(Some(high))
    }
}

/// Mann–Whitney's `U` of the first sample: the pairs `(a, b)` with `a > b`, ties one half (both sorted).
fn u_first(first: &[f64], second: &[f64]) -> f64 {
    let (mut below, mut through) = (0usize, 0usize);
    let mut u = 0.0;
    for &a in first {
        while second.get(below).is_some_and(|&b| b < a) {
            below += 1;
        }
        through = through.max(below);
        while second.get(through).is_some_and(|&b| b <= a) {
            through += 1;
        }
        u += below as f64 + (through - below) as f64 / 2.0;
    }
    u
}

/// `Σ (t³ − t)` over the runs of ties `t` of a sorted sample.
fn tie_term(sorted: &[f64]) -> f64 {
    let mut term = 0.0;
    let mut start = 0;
    while let Some(&value) = sorted.get(start) {
        let run = sorted[start..].iter().take_while(|&&v| v == value).count();
        let t = run as f64;
        term += t * t * t - t;
        start += run;
    }
    term
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{hodges_lehmann, mann_whitney_u, shift_interval};
    use super::*;

    /// `n` values on a grid of 0.2 in [0, 10] (many ties), by SplitMix64 from `seed`.
    fn grid_values(seed: u64, n: usize) -> Vec<f64> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (0..n)
            .map(|_| {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 11) as f64 / (1u64 << 53) as f64 * 50.0).round() / 5.0
            })
            .collect()
    }

    #[test]
    fn one_stratum_is_the_unstratified_test_estimate_and_interval() {
        for (m, n, seed) in [(40, 37, 1), (25, 25, 2), (3, 9, 3), (200, 180, 4)] {
            // Rounded values: many ties.
            let a = grid_values(seed, m);
            let b: Vec<f64> = grid_values(seed + 100, n).iter().map(|v| v + 0.6).collect();
            let strata = Strata::new([&a, &b], [&vec![0; m], &vec![0; n]]).unwrap();
            let mw = mann_whitney_u(&a, &b).unwrap();
            let test = strata.test().unwrap();
            assert!((test.p_value - mw.p_value).abs() < 1e-12, "{test:?} {mw:?}");
            assert!((test.z - mw.z).abs() < 1e-9, "{test:?} {mw:?}");
            assert_eq!(strata.shift(), hodges_lehmann(&a, &b));
            for alpha in [0.05, 0.01, 0.2] {
                assert_eq!(
                    strata.interval(alpha),
                    shift_interval(&a, &b, alpha),
                    "{m} {n}"
                );
            }
        }
    }

    #[test]
    fn a_drift_between_strata_moves_neither_the_test_nor_the_interval() {
        // Ten strata of 16 per arm, values in [0, 2]; b is a + 1 in distribution; stratum s adds 10·s to
        // both arms.
        let (mut a, mut b, mut sa, mut sb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in 0..10 {
            for (i, v) in grid_values(s as u64, 16).into_iter().enumerate() {
                a.push(v / 5.0 + 10.0 * s as f64);
                sa.push(s);
                b.push(grid_values(s as u64 + 50, 16)[i] / 5.0 + 1.0 + 10.0 * s as f64);
                sb.push(s);
            }
        }
        let strata = Strata::new([&a, &b], [&sa, &sb]).unwrap();
        let flat: Vec<f64> = a
            .iter()
            .zip(&sa)
            .map(|(v, s)| v - 10.0 * *s as f64)
            .collect();
        let flat_b: Vec<f64> = b
            .iter()
            .zip(&sb)
            .map(|(v, s)| v - 10.0 * *s as f64)
            .collect();
        let undrifted = Strata::new([&flat, &flat_b], [&sa, &sb]).unwrap();
        assert_eq!(strata.test(), undrifted.test());
        assert_eq!(strata.interval(0.05), undrifted.interval(0.05));
        let (lo, hi) = strata.interval(0.05).unwrap();
        assert!(
            lo > 0.0 && lo < 1.0 && hi > 1.0,
            "{lo} {hi} {:?}",
            strata.shift()
        );
        // Unstratified, the drift swamps the shift: its interval is many times as wide.
        let (ulo, uhi) = shift_interval(&a, &b, 0.05).unwrap();
        assert!(uhi - ulo > 5.0 * (hi - lo), "{ulo} {uhi} against {lo} {hi}");
        assert!(strata.test().unwrap().p_value < 1e-6);
        assert!(mann_whitney_u(&a, &b).unwrap().p_value > 0.1);
    }

    #[test]
    fn strata_without_both_arms_are_left_out() {
        let strata = Strata::new([&[1.0, 2.0, 3.0], &[2.0, 3.0]], [&[0, 0, 1], &[0, 2]]).unwrap();
        assert_eq!(strata.len(), 1);
        assert!(Strata::new([&[1.0], &[2.0]], [&[0], &[1]]).is_none());
    }
}
