//! The levels of a run's looks, by one of three boundaries (`Boundary`, `--boundary`), each keeping the
//! chance of a false claim over all the looks at most α:
//!
//! - **α spent** over the planned looks (Lan & DeMets, *Biometrika* 70, 1983) by the O'Brien–Fleming-type
//!   function (`ObrienFleming`: strict early looks, almost all of α kept for the last) or the Pocock-type
//!   one (`Pocock`: nearly equal levels, so a real effect is found earlier, for a larger planned maximum).
//!   The spending function gives the share of α that may be spent by the information fraction `t` (here:
//!   the requests analysed over the planned budget). The boundary of each look is the `c_k` with
//!   `P(|Z_k| ≥ c_k, |Z_j| < c_j for j < k) = α(t_k) − α(t_{k−1})` under no difference, where
//!   `Z_1, Z_2, ...` are the statistics of a Brownian motion observed at `t_1, t_2, ...` (independent
//!   increments, `corr(Z_j, Z_k) = √(t_j / t_k)`): the canonical joint distribution of group-sequential
//!   statistics (Jennison & Turnbull, *Group Sequential Methods*, 2000, §3.1), found by the recursive
//!   numerical integration of Armitage, McPherson and Rowe (1969).
//! - **Always valid** (`AlwaysValid`): the normal-mixture confidence sequence (Robbins 1970; the mixture
//!   sequential probability ratio test of Johari, Pekelis & Walsh, "Always valid inference", 2017). For a
//!   Brownian motion `S(t)` with `Var S(t) = t`, the mixture martingale over a drift drawn from
//!   `N(0, 1/ρ)` is `√(ρ/(t+ρ)) · exp(S(t)² / (2(t+ρ)))`, so by Ville's inequality
//!   `|S(t)| ≥ √((t+ρ)(ln(1 + t/ρ) + 2 ln(1/α)))` at *any* `t` has probability at most α: a run may look
//!   as often as it likes and stop when it likes, and the bound holds past the plan too (an analysed
//!   window may grow beyond `--plan-requests`; an experiment stops at its `--requests`). Applied to a
//!   family, Holm's levels are taken from the sequence's level, which is not itself a sequence at α/m:
//!   the guarantee there is the calibration's, not Ville's. In `Z(t) = S(t)/√t` that is the
//!   boundary `always_valid_boundary`. The clock `t` is the requests analysed over the planned requests
//!   (information grows with them, for every comparison alike), and `ρ` is fixed in advance so that the
//!   sequence is tightest at the plan (`RHO`).
//!
//! A look's level is the two-sided `2(1 − Φ(c_k))`: every test and interval of that look is made at it.

use statrs::distribution::{Continuous, ContinuousCDF, Normal};

use crate::stats::normal_sf;

/// How the looks' levels are set (`--boundary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Boundary {
    /// α spent by the Lan–DeMets O'Brien–Fleming-type function.
    #[default]
    ObrienFleming,
    /// α spent by the Lan–DeMets Pocock-type function.
    Pocock,
    /// The normal-mixture confidence sequence: any number of looks, at any time.
    AlwaysValid,
}

impl Boundary {
    pub const ALL: [Boundary; 3] = [
        Boundary::ObrienFleming,
        Boundary::Pocock,
        Boundary::AlwaysValid,
    ];

    /// The name in flags, records and reports.
    pub fn name(self) -> &'static str {
        match self {
            Boundary::ObrienFleming => "obrien-fleming",
            Boundary::Pocock => "pocock",
            Boundary::AlwaysValid => "always-valid",
        }
    }

    pub fn parse(name: &str) -> Option<Boundary> {
        Boundary::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// The level of each look at measured-request counts `points` of a budget of `requests`.
pub fn look_levels(boundary: Boundary, alpha: f64, requests: u64, points: &[u64]) -> Vec<f64> {
    let fractions: Vec<f64> = points
        .iter()
        .map(|&p| p as f64 / requests.max(1) as f64)
        .collect();
    levels(boundary, alpha, &fractions)
}

/// Grid points per unit of z in the numerical integration (Simpson's rule).
const POINTS_PER_UNIT: f64 = 40.0;

/// The share of the two-sided `alpha` spent by the information fraction `t` (in `[0, 1]`; beyond 1,
/// all of it), symmetric two-sided:
/// - O'Brien–Fleming type: each side spends `α₁(t) = 2 − 2Φ(z_{1−α₁/2} / √t)` of its `α₁ = alpha / 2`
///   (as R's gsDesign `sfLDOF`);
/// - Pocock type: `alpha · ln(1 + (e − 1)·t)` (as gsDesign's `sfLDPocock`).
///
/// The always-valid boundary has no budget to spend: `levels` sets its levels apart, and here it spends
/// nothing.
pub fn spent(boundary: Boundary, alpha: f64, t: f64) -> f64 {
    if t <= 0.0 {
        return 0.0;
    }
    let t = t.min(1.0);
    match boundary {
        Boundary::ObrienFleming => {
            let z = Normal::standard().inverse_cdf(1.0 - alpha / 4.0);
            (4.0 * normal_sf(z / t.sqrt())).min(alpha)
        }
        Boundary::Pocock => (alpha * (1.0 + (std::f64::consts::E - 1.0) * t).ln()).min(alpha),
        Boundary::AlwaysValid => 0.0,
    }
}

/// The mixture's `ρ` (in planned requests): the one that makes the confidence sequence narrowest at the
/// plan (`t = 1`). The width there is `√((1+ρ)(ln(1 + 1/ρ) + 2L))` with `L = ln(1/α)`; its derivative in
/// `ρ` vanishes where `1/ρ = 2L + ln(1 + 1/ρ)`, found by fixed-point iteration (it contracts: the
/// derivative of the right side is below 1/8 there).
pub fn rho(alpha: f64) -> f64 {
    let two_l = 2.0 * (1.0 / alpha).ln();
    let mut inverse = two_l;
    for _ in 0..50 {
        inverse = two_l + (1.0 + inverse).ln();
    }
    1.0 / inverse
}

/// The always-valid boundary at `t` (requests analysed over planned, any positive value), in standard
/// deviations of `Z(t)`: `√((1 + ρ/t)(ln(1 + t/ρ) + 2 ln(1/α)))`.
pub fn always_valid_boundary(alpha: f64, t: f64) -> f64 {
    let rho = rho(alpha);
    let t = t.max(f64::MIN_POSITIVE);
    ((1.0 + rho / t) * ((1.0 + t / rho).ln() + 2.0 * (1.0 / alpha).ln()))
        .sqrt()
        .min(MAX_BOUNDARY)
}

/// The two-sided level of each look at the information fractions `fractions` (increasing, in
/// `(0, 1]`; the always-valid boundary takes any positive fraction, in any order). α spent by `spent`:
/// a look that may spend nothing more (its share rounds to 0) gets level 0: it cannot decide.
pub fn levels(boundary: Boundary, alpha: f64, fractions: &[f64]) -> Vec<f64> {
    if boundary == Boundary::AlwaysValid {
        return fractions
            .iter()
            .map(|&t| (2.0 * normal_sf(always_valid_boundary(alpha, t))).min(1.0))
            .collect();
    }
    let mut out = Vec::with_capacity(fractions.len());
    // The density of Z at the last look on the paths that have not crossed, on a grid over (−c, c).
    let mut density: Option<Grid> = None;
    let (mut previous_t, mut previous_spent) = (0.0, 0.0);
    for &t in fractions {
        let t = t.clamp(f64::MIN_POSITIVE, 1.0);
        let target = (spent(boundary, alpha, t) - previous_spent).max(0.0);
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

    /// Five equally spaced looks at symmetric two-sided 0.05 (0.025 a side) give `expected`.
    fn five_equal_looks_give(spending: Boundary, expected: [f64; 5]) {
        let levels = levels(spending, 0.05, &[0.2, 0.4, 0.6, 0.8, 1.0]);
        for (level, want) in levels.iter().zip(expected) {
            assert!(
                (boundary(*level) - want).abs() < 2e-3,
                "{spending:?}: {} against {want}",
                boundary(*level)
            );
        }
    }

    #[test]
    fn five_equal_looks_give_the_published_boundaries() {
        // Lan–DeMets O'Brien–Fleming type: R's ldbounds, `bounds(1:5/5, iuse = 1, alpha = 0.025)`, and
        // gsDesign's `sfLDOF`.
        five_equal_looks_give(
            Boundary::ObrienFleming,
            [4.8769, 3.3569, 2.6803, 2.2898, 2.0310],
        );
        // Lan–DeMets Pocock type: gsDesign's `sfLDPocock`.
        five_equal_looks_give(Boundary::Pocock, [2.4380, 2.4268, 2.4101, 2.3966, 2.3859]);
        assert!((spent(Boundary::Pocock, 0.05, 1.0) - 0.05).abs() < 1e-12);
    }

    #[test]
    fn one_look_is_the_fixed_horizon_test_and_the_spending_ends_at_alpha() {
        let one = levels(Boundary::ObrienFleming, 0.05, &[1.0]);
        assert!(one.len() == 1 && (one[0] - 0.05).abs() < 1e-9, "{one:?}");
        assert!((spent(Boundary::ObrienFleming, 0.05, 1.0) - 0.05).abs() < 1e-9);
        assert!(spent(Boundary::ObrienFleming, 0.05, 0.1) < 1e-8);
        // Ten looks: the last keeps most of alpha (Bonferroni would give each 0.005).
        let ten: Vec<f64> = (1..=10).map(|k| f64::from(k) / 10.0).collect();
        let levels = levels(Boundary::ObrienFleming, 0.05, &ten);
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
            let levels = levels(Boundary::ObrienFleming, 0.05, &fractions);
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
        let levels = levels(Boundary::ObrienFleming, 0.05, &[0.25, 0.5, 0.6]);
        assert_eq!(levels.len(), 3);
        assert!(levels[2] > levels[1] && levels[2] < 0.05, "{levels:?}");
    }

    #[test]
    fn the_mixture_is_narrowest_at_the_plan() {
        let alpha = 0.05;
        let rho = rho(alpha);
        let l2 = 2.0 * (1.0 / alpha).ln();
        assert!(
            (1.0 / rho - l2 - (1.0 + 1.0 / rho).ln()).abs() < 1e-9,
            "{rho}"
        );
        let width = |r: f64| ((1.0 + r) * ((1.0 + 1.0 / r).ln() + l2)).sqrt();
        assert!((width(rho) - always_valid_boundary(alpha, 1.0)).abs() < 1e-12);
        assert!(width(rho) < width(0.9 * rho) && width(rho) < width(1.1 * rho));
        // Its level at the plan, and a level that depends on the look alone (not on the others).
        let at_plan = levels(Boundary::AlwaysValid, alpha, &[1.0])[0];
        assert!((0.001..0.005).contains(&at_plan), "{at_plan}");
        let many = levels(Boundary::AlwaysValid, alpha, &[0.1, 0.5, 1.0, 2.0]);
        assert!((many[2] - at_plan).abs() < 1e-15, "{many:?}");
        assert!(
            many[3] < many[2],
            "past the plan it tightens again slowly: {many:?}"
        );
    }

    /// Ville's inequality, seen: Brownian paths with no drift, looked at 100 times up to twice the plan,
    /// cross the always-valid boundary at some look in at most α of 20,000 paths (the continuous-time
    /// bound; discrete looks cross less often).
    #[test]
    fn a_hundred_looks_at_the_always_valid_boundary_cross_in_at_most_alpha() {
        use rand::rngs::ChaCha8Rng;
        use rand::{RngExt, SeedableRng};
        let (alpha, looks, paths) = (0.05, 100u32, 20_000u32);
        let fractions: Vec<f64> = (1..=looks)
            .map(|k| 2.0 * f64::from(k) / f64::from(looks))
            .collect();
        let bounds: Vec<f64> = fractions
            .iter()
            .map(|&t| always_valid_boundary(alpha, t))
            .collect();
        let normal = Normal::standard();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut crossed = 0u32;
        for _ in 0..paths {
            let (mut s, mut previous) = (0.0, 0.0);
            for (&t, &c) in fractions.iter().zip(&bounds) {
                let u: f64 = rng.random::<f64>().max(1e-300);
                s += normal.inverse_cdf(u) * (t - previous).sqrt();
                previous = t;
                if (s / t.sqrt()).abs() >= c {
                    crossed += 1;
                    break;
                }
            }
        }
        let rate = f64::from(crossed) / f64::from(paths);
        assert!(rate < alpha && rate > 0.002, "{rate}");
    }
}
