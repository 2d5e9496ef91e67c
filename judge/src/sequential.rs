//! The levels of a run's looks: α spent over the looks by the Lan–DeMets O'Brien–Fleming-type spending
//! function (Lan & DeMets, *Biometrika* 70, 1983), so that a run that looks `K` times and stops at the
//! first look that decides makes a false claim with probability at most α, while keeping almost all of
//! α for the last look (where Bonferroni's α/K throws most of it away).
//!
//! The spending function (`spent`: each side `α₁(t) = 2 − 2Φ(z_{1−α₁/2} / √t)` of `α₁ = α/2`) gives the
//! share of α that may be spent by the information fraction `t` (here: the requests analysed over the
//! planned budget). The boundary of each
//! look is the `c_k` with `P(|Z_k| ≥ c_k, |Z_j| < c_j for j < k) = α(t_k) − α(t_{k−1})` under no
//! difference, where `Z_1, Z_2, ...` are the statistics of a Brownian motion observed at `t_1, t_2, ...`
//! (independent increments, `corr(Z_j, Z_k) = √(t_j / t_k)`): the canonical joint distribution of
//! group-sequential statistics (Jennison & Turnbull, *Group Sequential Methods*, 2000, §3.1), found by
//! the recursive numerical integration of Armitage, McPherson and Rowe (1969). The look's level is the
//! two-sided `2(1 − Φ(c_k))`: every test and interval of that look is made at it.

use statrs::distribution::{Continuous, ContinuousCDF, Normal};

use crate::stats::normal_sf;

/// The level of each look at measured-request counts `points` of a budget of `requests`.
pub fn look_levels(alpha: f64, requests: u64, points: &[u64]) -> Vec<f64> {
    let fractions: Vec<f64> = points
        .iter()
        .map(|&p| p as f64 / requests.max(1) as f64)
        .collect();
    levels(alpha, &fractions)
}

/// Grid points per unit of z in the numerical integration (Simpson's rule).
const POINTS_PER_UNIT: f64 = 40.0;

/// The share of the two-sided `alpha` spent by the information fraction `t`: each side spends
/// `α₁(t) = 2 − 2Φ(z_{1−α₁/2} / √t)` of its `α₁ = alpha / 2` (O'Brien–Fleming type, as R's gsDesign
/// `sfLDOF` for a symmetric two-sided design).
pub fn spent(alpha: f64, t: f64) -> f64 {
    if t <= 0.0 {
        return 0.0;
    }
    let z = Normal::standard().inverse_cdf(1.0 - alpha / 4.0);
    (4.0 * normal_sf(z / t.min(1.0).sqrt())).min(alpha)
}

/// The two-sided level of each look at the information fractions `fractions` (increasing, in
/// `(0, 1]`), spending `alpha` by `spent`. A look that may spend nothing more (its share rounds to 0)
/// gets level 0: it cannot decide.
pub fn levels(alpha: f64, fractions: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(fractions.len());
    // The density of Z at the last look on the paths that have not crossed, on a grid over (−c, c).
    let mut density: Option<Grid> = None;
    let (mut previous_t, mut previous_spent) = (0.0, 0.0);
    for &t in fractions {
        let t = t.clamp(f64::MIN_POSITIVE, 1.0);
        let target = (spent(alpha, t) - previous_spent).max(0.0);
        if t <= previous_t || target <= 0.0 {
            out.push(0.0);
            continue;
        }
        let boundary = match &density {
            // From the lower tail, by symmetry: `1 − target/2` rounds to 1 (an infinite boundary) once
            // `target` is below f64's resolution there, as an early look of many spends (1e-85 at 1/100).
            None => (-Normal::standard().inverse_cdf(target / 2.0)).min(MAX_BOUNDARY),
            Some(grid) => grid.boundary(previous_t, t, target),
        };
        out.push((2.0 * normal_sf(boundary)).min(1.0));
        density = Some(match &density {
            None => Grid::first(boundary),
            Some(grid) => grid.next(previous_t, t, boundary),
        });
        previous_spent += target;
        previous_t = t;
    }
    out
}

/// The largest boundary, in standard deviations: no path crosses it (its two-sided level is 1e-349, below
/// f64's smallest number), and it bounds the grids and the bisection.
const MAX_BOUNDARY: f64 = 40.0;

/// A density on a Simpson grid over `(−c, c)`.
struct Grid {
    z: Vec<f64>,
    /// The density times Simpson's weight and step at each point: sums of `mass[i] · g(z[i])` integrate.
    mass: Vec<f64>,
}

impl Grid {
    /// Odd point count covering `(−c, c)`.
    fn points(c: f64) -> Vec<f64> {
        let c = c.clamp(0.0, MAX_BOUNDARY);
        let half = ((c * POINTS_PER_UNIT).ceil() as usize).max(8);
        let n = 2 * half + 1;
        (0..n)
            .map(|i| -c + 2.0 * c * i as f64 / (n - 1) as f64)
            .collect()
    }

    fn simpson(z: Vec<f64>, density: impl Fn(f64) -> f64) -> Grid {
        let n = z.len();
        let step = if n > 1 { z[1] - z[0] } else { 0.0 };
        let mass = z
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let weight = if i == 0 || i + 1 == n {
                    1.0
                } else if i % 2 == 1 {
                    4.0
                } else {
                    2.0
                };
                weight * step / 3.0 * density(x)
            })
            .collect();
        Grid { z, mass }
    }

    /// The first look: the standard normal density on `(−c, c)`.
    fn first(c: f64) -> Grid {
        let normal = Normal::standard();
        Grid::simpson(Grid::points(c), |x| normal.pdf(x))
    }

    /// The probability of crossing `±c` at fraction `t`, continuing from this density at `s`.
    fn crossing(&self, s: f64, t: f64, c: f64) -> f64 {
        let (rs, rt, rd) = (s.sqrt(), t.sqrt(), (t - s).sqrt());
        self.z
            .iter()
            .zip(&self.mass)
            .map(|(&u, &m)| {
                let upper = normal_sf((c * rt - u * rs) / rd);
                let lower = normal_sf((c * rt + u * rs) / rd);
                m * (upper + lower)
            })
            .sum()
    }

    /// The `c` whose crossing probability at `t` is `target` (bisection: it falls as `c` grows).
    fn boundary(&self, s: f64, t: f64, target: f64) -> f64 {
        let (mut low, mut high) = (0.0, MAX_BOUNDARY);
        for _ in 0..200 {
            let middle = (low + high) / 2.0;
            if self.crossing(s, t, middle) > target {
                low = middle;
            } else {
                high = middle;
            }
            if high - low < 1e-10 {
                break;
            }
        }
        (low + high) / 2.0
    }

    /// The density at `t` on the paths that did not cross, on `(−c, c)`.
    fn next(&self, s: f64, t: f64, c: f64) -> Grid {
        let normal = Normal::standard();
        let (rs, rt, rd) = (s.sqrt(), t.sqrt(), (t - s).sqrt());
        Grid::simpson(Grid::points(c), |z| {
            self.z
                .iter()
                .zip(&self.mass)
                .map(|(&u, &m)| m * normal.pdf((z * rt - u * rs) / rd) * rt / rd)
                .sum()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boundary(level: f64) -> f64 {
        Normal::standard().inverse_cdf(1.0 - level / 2.0)
    }

    #[test]
    fn five_equal_looks_give_the_published_boundaries() {
        // Lan–DeMets O'Brien–Fleming-type spending, five equally spaced looks, symmetric two-sided 0.05
        // (0.025 a side): the boundaries 4.8769, 3.3569, 2.6803, 2.2898, 2.0310 (R's ldbounds,
        // `bounds(1:5/5, iuse = 1, alpha = 0.025)`, and gsDesign's `sfLDOF`).
        let expected = [4.8769, 3.3569, 2.6803, 2.2898, 2.0310];
        let levels = levels(0.05, &[0.2, 0.4, 0.6, 0.8, 1.0]);
        for (level, want) in levels.iter().zip(expected) {
            assert!(
                (boundary(*level) - want).abs() < 2e-3,
                "{} against {want}",
                boundary(*level)
            );
        }
    }

    #[test]
    fn one_look_is_the_fixed_horizon_test_and_the_spending_ends_at_alpha() {
        let one = levels(0.05, &[1.0]);
        assert!(one.len() == 1 && (one[0] - 0.05).abs() < 1e-9, "{one:?}");
        assert!((spent(0.05, 1.0) - 0.05).abs() < 1e-9);
        assert!(spent(0.05, 0.1) < 1e-8);
        // Ten looks: the last keeps most of alpha (Bonferroni would give each 0.005).
        let ten: Vec<f64> = (1..=10).map(|k| f64::from(k) / 10.0).collect();
        let levels = levels(0.05, &ten);
        assert!(levels[9] > 0.035 && levels[0] < 1e-8, "{levels:?}");
        assert!(levels.windows(2).all(|w| w[0] < w[1]), "{levels:?}");
    }

    /// Many looks: the first ones spend less than f64 can tell from 1 − share (1e-85 at 1/100), which once
    /// made an infinite boundary and a grid of `usize::MAX` points (an overflow: a panic, or an abort in a
    /// release build). Each look's level is now finite, rising, and the last near alpha.
    #[test]
    fn a_hundred_looks_have_finite_rising_levels() {
        for looks in [24u32, 100] {
            let fractions: Vec<f64> = (1..=looks)
                .map(|k| f64::from(k) / f64::from(looks))
                .collect();
            let levels = levels(0.05, &fractions);
            assert_eq!(levels.len(), looks as usize);
            assert!(
                levels
                    .iter()
                    .all(|l| l.is_finite() && (0.0..0.05).contains(l)),
                "{levels:?}"
            );
            assert!(levels.windows(2).all(|w| w[0] <= w[1]), "{levels:?}");
            assert!(levels[looks as usize - 1] > 0.025, "{levels:?}");
        }
    }

    #[test]
    fn an_unplanned_last_look_spends_what_is_left_at_its_fraction() {
        // Looks at 0.25 and 0.5, then the run ends at 0.6: the third look spends alpha(0.6) − alpha(0.5).
        let levels = levels(0.05, &[0.25, 0.5, 0.6]);
        assert_eq!(levels.len(), 3);
        assert!(levels[2] > levels[1] && levels[2] < 0.05, "{levels:?}");
    }
}
