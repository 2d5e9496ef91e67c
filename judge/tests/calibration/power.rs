//! Requests to a decision (docs/experiment.md, "Requests to a decision"): at a true effect of twice the
//! margin, the fixed-horizon request count `n_fixed` at which one analysis at α has 80 % power (found by
//! simulation), then `--until decided` on the same simulated world, planned at `n_fixed` and above it:
//! its power, and the median and mean requests it analysed when it stopped, against `n_fixed`.

use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;

use crate::sim::World;
use crate::suite::{clopper_pearson, design_of, experiment, looks_text, parallel, Claim, Right};
use kvab_judge::sequential::Boundary;

/// The power the fixed-horizon test is sized for.
pub const POWER: f64 = 0.80;
/// `n_fixed` is searched in steps of this many requests (both arms).
const STEP: usize = 20;

/// A world whose only free parameter is the request count, and what is right and wrong in it.
pub struct Study {
    pub name: &'static str,
    pub world: fn(usize) -> World,
    pub min_effect: f64,
    pub right: Right,
    pub false_claims: Vec<Claim>,
    pub seed: u64,
}

/// What `trials` experiments of one design did.
#[derive(Debug, Clone, Default)]
pub struct Stops {
    pub trials: u64,
    pub right: u64,
    pub false_claims: u64,
    /// The measured requests each experiment analysed when it stopped, ascending.
    pub requests: Vec<u64>,
}

impl Stops {
    pub fn power(&self) -> f64 {
        self.right as f64 / self.trials.max(1) as f64
    }

    /// The median of the requests to a decision (the lower middle value for an even count).
    pub fn median(&self) -> f64 {
        let n = self.requests.len();
        if n == 0 {
            return f64::NAN;
        }
        let (lo, hi) = (self.requests[(n - 1) / 2], self.requests[n / 2]);
        (lo + hi) as f64 / 2.0
    }

    /// The share of the experiments that had stopped (decided) by `requests`.
    pub fn stopped_by(&self, requests: f64) -> f64 {
        let early = self
            .requests
            .iter()
            .filter(|&&r| r as f64 <= requests)
            .count();
        early as f64 / self.requests.len().max(1) as f64
    }

    pub fn mean(&self) -> f64 {
        self.requests.iter().sum::<u64>() as f64 / self.requests.len().max(1) as f64
    }
}

/// `trials` experiments of `study` with `requests` planned and `looks` looks; trial `i` has a seed of its
/// own (the same for every request count and design: common random numbers).
pub fn stops(study: &Study, requests: usize, looks: u32, boundary: Boundary, trials: u64) -> Stops {
    let world = (study.world)(requests);
    let design = design_of(&world, study.min_effect);
    let results = parallel(trials, |i| {
        let mut rng = ChaCha8Rng::seed_from_u64(study.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i);
        let (analysis, analysed) = experiment(&world, looks, boundary, &design, &mut rng);
        (
            study.right.made(&analysis),
            study.false_claims.iter().any(|c| c.made(&analysis)),
            analysed,
        )
    });
    let mut out = Stops {
        trials,
        ..Stops::default()
    };
    for (right, wrong, analysed) in results {
        out.right += u64::from(right);
        out.false_claims += u64::from(wrong);
        out.requests.push(analysed);
    }
    out.requests.sort_unstable();
    out
}

/// The fixed-horizon request count (both arms, a multiple of `STEP`): the smallest at which one analysis
/// at α makes the right decision in at least `POWER` of `trials` experiments, by bisection on the
/// request count (power grows with it), with that count's `Stops`.
pub fn fixed_horizon(study: &Study, trials: u64) -> (usize, Stops) {
    let at = |n: usize| stops(study, n, 1, Boundary::ObrienFleming, trials);
    let mut high = 25 * STEP;
    let mut high_stops = at(high);
    while high_stops.power() < POWER {
        high *= 2;
        high_stops = at(high);
    }
    let mut low = 0;
    while high - low > STEP {
        let middle = (low + high) / 2 / STEP * STEP;
        let s = at(middle);
        if s.power() >= POWER {
            (high, high_stops) = (middle, s);
        } else {
            low = middle;
        }
    }
    (high, high_stops)
}

pub fn header() -> String {
    "| study | looks | planned requests | trials | right decision (power) | false claims | 95 % CP upper | \
     requests to a decision: median | mean | median ÷ n_fixed | mean ÷ n_fixed | decided by 0.7 × n_fixed |\n\
     |---|---|---|---|---|---|---|---|---|---|---|---|"
        .into()
}

pub fn row(
    study: &Study,
    looks: u32,
    boundary: Boundary,
    planned: usize,
    n_fixed: usize,
    s: &Stops,
) -> String {
    let (_, upper) = clopper_pearson(s.false_claims, s.trials);
    let fixed = n_fixed as f64;
    format!(
        "| {} | {} | {planned} ({:.2} × n_fixed) | {} | {} {:.1} % | {} | {upper:.4} | {:.0} | {:.0} | {:.3} | {:.3} | {:.1} % |",
        study.name,
        looks_text(looks, boundary),
        planned as f64 / fixed,
        s.trials,
        study.right.text(),
        100.0 * s.power(),
        s.false_claims,
        s.median(),
        s.mean(),
        s.median() / fixed,
        s.mean() / fixed,
        100.0 * s.stopped_by(0.7 * fixed),
    )
}

/// The designs measured against `n_fixed`: (looks, boundary, planned requests ÷ n_fixed).
pub const DESIGNS: [(u32, Boundary, f64); 10] = [
    (1, Boundary::ObrienFleming, 1.0),
    (10, Boundary::ObrienFleming, 1.0),
    (10, Boundary::ObrienFleming, 1.05),
    (10, Boundary::ObrienFleming, 1.10),
    (2, Boundary::Pocock, 1.2),
    (2, Boundary::Pocock, 1.3),
    (2, Boundary::Pocock, 1.4),
    (4, Boundary::Pocock, 1.35),
    // The always-valid sequence's power hardly depends on how often it looks: 20 looks here (its false
    // claims at 100 looks are the suite's).
    (20, Boundary::AlwaysValid, 1.0),
    (20, Boundary::AlwaysValid, 2.0),
];

/// The studies: a true ×1.10 with a 5 % margin (twice the margin).
pub fn studies() -> Vec<Study> {
    use crate::sim::Arm;
    use crate::suite::{plain, MARGIN};
    vec![Study {
        name: "power: b ×1.10, margin 5 %",
        world: |n| World {
            arms: [Arm::PLAIN, Arm::scaled(1.10)],
            ..plain(n)
        },
        min_effect: MARGIN,
        right: Right::Faster(0),
        false_claims: vec![Claim::Equivalent, Claim::FasterFor(1)],
        seed: 3000,
    }]
}
