//! The scenarios, what is a false claim in each, the runner (whole experiments, looks and the stop when
//! decided, as `kvab experiment --until decided` does) and the Clopper–Pearson bounds.

use kvab_judge::requests::{analyze, look_points, Analysis, Design, STRATUM};
use kvab_judge::sequential::{look_levels, Boundary};
use kvab_judge::Decision;
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;

use crate::sim::{simulate, Arm, Drift, World, MAX_TIME_MS};

pub const ALPHA: f64 = 0.05;
pub const ARMS: [&str; 2] = ["a", "b"];
/// A margin of about zero: the test alone guards against a false `faster` (the hardest case for it).
pub const NO_MARGIN: f64 = 1e-9;
pub const MARGIN: f64 = 0.05;
/// `kvab experiment`'s default `--tail-margin` and `--error-margin`.
pub const TAIL_MARGIN: f64 = 0.25;
pub const ERROR_MARGIN: f64 = 0.02;

/// What a scenario counts as a false claim in the analysis an experiment ends with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Claim {
    /// Any comparison (any metric, any class) decided `faster`, either way.
    AnyFaster,
    /// Any comparison decided `faster` for this arm.
    FasterFor(usize),
    /// Any primary comparison decided `equivalent`.
    Equivalent,
}

impl Claim {
    pub fn made(self, analysis: &Analysis) -> bool {
        analysis.comparisons.iter().any(|c| match self {
            Claim::AnyFaster => c.decision == Decision::Faster,
            Claim::FasterFor(arm) => {
                c.decision == Decision::Faster && c.faster.as_deref() == ARMS.get(arm).copied()
            }
            Claim::Equivalent => c.primary && c.decision == Decision::Equivalent,
        })
    }

    pub fn text(self) -> String {
        match self {
            Claim::AnyFaster => "any faster".into(),
            Claim::FasterFor(arm) => format!("{} faster", ARMS[arm]),
            Claim::Equivalent => "equivalent".into(),
        }
    }
}

/// The right decision where there is one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Right {
    /// Every primary comparison `faster` for this arm.
    Faster(usize),
    /// Every primary comparison `equivalent`.
    Equivalent,
}

impl Right {
    pub fn made(self, analysis: &Analysis) -> bool {
        let mut primary = analysis.comparisons.iter().filter(|c| c.primary).peekable();
        primary.peek().is_some()
            && primary.all(|c| match self {
                Right::Faster(arm) => {
                    c.decision == Decision::Faster && c.faster.as_deref() == ARMS.get(arm).copied()
                }
                Right::Equivalent => c.decision == Decision::Equivalent,
            })
    }

    pub fn text(self) -> String {
        match self {
            Right::Faster(arm) => format!("{} faster", ARMS[arm]),
            Right::Equivalent => "equivalent".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub world: World,
    pub min_effect: f64,
    pub looks: u32,
    /// The looks' levels (`kvab experiment --boundary`).
    pub boundary: Boundary,
    /// False claims: the experiment makes one when its final analysis makes any of these.
    pub false_claims: Vec<Claim>,
    /// The true ratio (second arm's time ÷ first's) where it is known: the ratio interval should cover it.
    pub true_ratio: Option<f64>,
    pub right: Option<Right>,
    pub seed: u64,
    /// The requests of a class per stratum of the analysis (`Design::stratum`; 0: unstratified).
    pub stratum: usize,
}

pub fn design(scenario: &Scenario) -> Design {
    Design {
        stratum: scenario.stratum,
        ..design_of(&scenario.world, scenario.min_effect)
    }
}

/// The design of an experiment in `world` with margin `min_effect`.
pub fn design_of(world: &World, min_effect: f64) -> Design {
    // A load sweep's cells are the analysis' classes.
    let classes = world.classes * world.levels.max(1);
    Design {
        arms: ARMS.map(String::from).to_vec(),
        classes: (0..classes).map(|c| format!("c{c}")).collect(),
        prompt_tokens: vec![None; classes],
        stream: world.stream,
        // The experiment's α; each look's share of it is set by `experiment`.
        look_alpha: ALPHA,
        min_effect,
        srm_threshold: 0.001,
        max_time_ms: MAX_TIME_MS,
        tail_margin: TAIL_MARGIN,
        error_margin: ERROR_MARGIN,
        stratum: STRATUM,
        unit_start: Vec::new(),
    }
}

/// The ratio interval of the first primary comparison (class `c0`).
fn ratio_interval(analysis: &Analysis) -> Option<[f64; 2]> {
    analysis.comparisons.iter().find(|c| c.primary)?.ratio_ci
}

/// One experiment: analysed at each look point, stopped at the first decided look (the last otherwise);
/// its final analysis is what the tool reports, with the measured requests it analysed.
pub fn experiment(
    world: &World,
    looks: u32,
    boundary: Boundary,
    design: &Design,
    rng: &mut ChaCha8Rng,
) -> (Analysis, u64) {
    let outcomes = simulate(world, rng);
    let points = look_points(outcomes.len() as u64, looks);
    // The looks' levels as `kvab experiment` sets them.
    let levels = look_levels(boundary, design.look_alpha, outcomes.len() as u64, &points);
    let mut last = None;
    for (point, level) in points.into_iter().zip(levels) {
        let design = Design {
            look_alpha: level,
            ..design.clone()
        };
        let n = (point as usize).min(outcomes.len());
        let analysis = analyze(&design, &outcomes[..n]);
        let decided = analysis.decided();
        last = Some((analysis, n as u64));
        if decided {
            break;
        }
    }
    last.unwrap_or_else(|| (analyze(design, &outcomes), outcomes.len() as u64))
}

#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub trials: u64,
    pub false_claims: u64,
    pub covered: u64,
    pub with_interval: u64,
    pub right: u64,
}

impl Tally {
    pub fn add(&mut self, other: &Tally) {
        self.trials += other.trials;
        self.false_claims += other.false_claims;
        self.covered += other.covered;
        self.with_interval += other.with_interval;
        self.right += other.right;
    }
}

/// `trials` experiments of `scenario` over the machine's cores; trial `i` has a seed of its own, so the
/// tally does not depend on the number of threads.
pub fn run(scenario: &Scenario, trials: u64) -> Tally {
    let design = design(scenario);
    let one = |i: u64| {
        let mut rng =
            ChaCha8Rng::seed_from_u64(scenario.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i);
        let (analysis, _) = experiment(
            &scenario.world,
            scenario.looks,
            scenario.boundary,
            &design,
            &mut rng,
        );
        let mut t = Tally {
            trials: 1,
            ..Tally::default()
        };
        t.false_claims = u64::from(scenario.false_claims.iter().any(|c| c.made(&analysis)));
        if let (Some(truth), Some([lo, hi])) = (scenario.true_ratio, ratio_interval(&analysis)) {
            t.with_interval = 1;
            t.covered = u64::from(lo <= truth && truth <= hi);
        }
        t.right = u64::from(scenario.right.is_some_and(|r| r.made(&analysis)));
        t
    };
    let mut total = Tally::default();
    for t in parallel(trials, one) {
        total.add(&t);
    }
    total
}

/// `one(i)` for every trial `i` in `0..trials`, over the machine's cores, in trial order.
pub fn parallel<T: Send>(trials: u64, one: impl Fn(u64) -> T + Sync) -> Vec<T> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let one = &one;
    let mut out: Vec<(u64, T)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    let mut done = Vec::new();
                    let mut i = w;
                    while i < trials {
                        done.push((i, one(i)));
                        i += workers;
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}

/// The two-sided 95 % Clopper–Pearson interval of `k` successes in `n` trials, from the beta quantiles.
pub fn clopper_pearson(k: u64, n: u64) -> (f64, f64) {
    use statrs::function::beta::inv_beta_reg;
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, nf) = (k as f64, n as f64);
    let lo = if k == 0.0 {
        0.0
    } else {
        inv_beta_reg(k, nf - k + 1.0, 0.025)
    };
    let hi = if k == nf {
        1.0
    } else {
        inv_beta_reg(k + 1.0, nf - k, 0.975)
    };
    (lo, hi)
}

pub fn plain(requests: usize) -> World {
    World {
        stream: false,
        classes: 1,
        requests,
        arms: [Arm::PLAIN; 2],
        drift: None,
        levels: 1,
    }
}

pub const DRIFT: Drift = Drift { phi: 0.99, sd: 0.3 };

/// Every scenario of the suite.
pub fn scenarios() -> Vec<Scenario> {
    let stalls = Arm {
        stall: 0.10,
        stall_factor: 6.0,
        ..Arm::PLAIN
    };
    let mut out = Vec::new();
    let mut add = |name, world, min_effect, looks, false_claims, true_ratio, right| {
        let seed = 1000 + out.len() as u64;
        out.push(Scenario {
            name,
            world,
            min_effect,
            looks,
            boundary: Boundary::ObrienFleming,
            false_claims,
            true_ratio,
            right,
            seed,
            stratum: STRATUM,
        });
    };
    use Claim::*;
    for looks in [1, 10] {
        add(
            "A/A, margin 0",
            plain(600),
            NO_MARGIN,
            looks,
            vec![AnyFaster],
            Some(1.0),
            None,
        );
    }
    for looks in [1, 10] {
        add(
            "A/A",
            plain(3000),
            MARGIN,
            looks,
            vec![AnyFaster],
            Some(1.0),
            Some(Right::Equivalent),
        );
    }
    for looks in [1, 10] {
        let world = World {
            arms: [Arm::PLAIN, Arm::scaled(1.0 + MARGIN)],
            ..plain(3000)
        };
        add(
            "b ×1.05 (at the margin)",
            world,
            MARGIN,
            looks,
            vec![Equivalent, FasterFor(1)],
            Some(1.0 + MARGIN),
            None,
        );
    }
    // Enough requests for the tails' intervals to fit their margin: the equivalence test itself decides.
    let world = World {
        arms: [Arm::PLAIN, Arm::scaled(1.0 + MARGIN)],
        ..plain(10_000)
    };
    add(
        "b ×1.05 (at the margin), 10,000 requests",
        world,
        MARGIN,
        1,
        vec![Equivalent, FasterFor(1)],
        Some(1.0 + MARGIN),
        None,
    );
    for looks in [1, 10] {
        let world = World {
            arms: [Arm::PLAIN, Arm::scaled(1.10)],
            ..plain(1000)
        };
        add(
            "b ×1.10",
            world,
            MARGIN,
            looks,
            vec![Equivalent, FasterFor(1)],
            Some(1.10),
            Some(Right::Faster(0)),
        );
    }
    let world = World {
        arms: [stalls; 2],
        ..plain(600)
    };
    add(
        "stalls 10 % ×6, both arms, margin 0",
        world,
        NO_MARGIN,
        1,
        vec![AnyFaster],
        Some(1.0),
        None,
    );
    let world = World {
        stream: true,
        arms: [Arm::PLAIN, stalls],
        ..plain(2000)
    };
    add(
        "stream: b stalls 10 % ×6",
        world,
        MARGIN,
        1,
        vec![Equivalent, FasterFor(1)],
        None,
        None,
    );
    for fail in [0.03, 0.08] {
        let failing = Arm { fail, ..Arm::PLAIN };
        let world = World {
            stream: true,
            arms: [Arm::PLAIN, failing],
            ..plain(3000)
        };
        let name = if fail < 0.05 {
            "stream: b fails 3 %"
        } else {
            "stream: b fails 8 %"
        };
        add(
            name,
            world,
            MARGIN,
            1,
            vec![Equivalent, FasterFor(1)],
            None,
            None,
        );
    }
    let tail = Arm {
        tail_from: 0.98,
        tail_factor: 3.0,
        ..Arm::PLAIN
    };
    let world = World {
        arms: [Arm::PLAIN, tail],
        ..plain(4000)
    };
    add(
        "tail only: b's top 2 % ×3",
        world,
        MARGIN,
        1,
        vec![Equivalent],
        None,
        None,
    );
    let world = World {
        drift: Some(DRIFT),
        ..plain(600)
    };
    add(
        "drift AR(1), A/A, margin 0",
        world,
        NO_MARGIN,
        1,
        vec![AnyFaster],
        Some(1.0),
        None,
    );
    let world = World {
        drift: Some(DRIFT),
        arms: [Arm::PLAIN, Arm::scaled(1.0 + MARGIN)],
        ..plain(3000)
    };
    add(
        "drift AR(1), b ×1.05 (at the margin)",
        world,
        MARGIN,
        1,
        vec![Equivalent, FasterFor(1)],
        Some(1.0 + MARGIN),
        None,
    );
    for looks in [1, 10] {
        let world = World {
            stream: true,
            classes: 3,
            ..plain(1200)
        };
        add(
            "stream, 3 classes × 4 metrics, A/A, margin 0",
            world,
            NO_MARGIN,
            looks,
            vec![AnyFaster],
            Some(1.0),
            None,
        );
    }
    let world = World {
        stream: true,
        classes: 3,
        arms: [Arm::PLAIN, Arm::scaled(1.10)],
        ..plain(3000)
    };
    add(
        "stream, 3 classes × 4 metrics, b ×1.10",
        world,
        MARGIN,
        1,
        vec![Equivalent, FasterFor(1)],
        Some(1.10),
        Some(Right::Faster(0)),
    );
    let world = World {
        drift: Some(DRIFT),
        arms: [Arm::PLAIN, Arm::scaled(1.10)],
        ..plain(1000)
    };
    add(
        "drift AR(1), b ×1.10",
        world,
        MARGIN,
        1,
        vec![Equivalent, FasterFor(1)],
        Some(1.10),
        Some(Right::Faster(0)),
    );
    // A load sweep: 3 classes at 3 load levels, 9 cells × 4 metrics in one family (Holm across all).
    let sweep = World {
        stream: true,
        classes: 3,
        levels: 3,
        ..plain(1200)
    };
    add(
        "load sweep, 3 levels × 3 classes × 4 metrics, A/A, margin 0",
        sweep,
        NO_MARGIN,
        1,
        vec![AnyFaster],
        Some(1.0),
        None,
    );
    add(
        "load sweep, 3 levels × 3 classes × 4 metrics, b ×1.25",
        World {
            arms: [Arm::PLAIN, Arm::scaled(1.25)],
            ..sweep
        },
        MARGIN,
        1,
        vec![Equivalent, FasterFor(1)],
        Some(1.25),
        Some(Right::Faster(0)),
    );
    // The same experiments (same seeds) judged without strata: what the strata change.
    for (original, name) in [
        ("A/A, margin 0", "A/A, margin 0, unstratified"),
        ("b ×1.10", "b ×1.10, unstratified"),
        (
            "drift AR(1), A/A, margin 0",
            "drift AR(1), A/A, margin 0, unstratified",
        ),
        ("drift AR(1), b ×1.10", "drift AR(1), b ×1.10, unstratified"),
    ] {
        if let Some(s) = one_look(&out, original) {
            out.push(Scenario {
                name,
                stratum: 0,
                ..s
            });
        }
    }
    // The same experiments (same seeds) looked at by the other boundaries: Pocock's spending over 4
    // looks, and the always-valid sequence looked at 100 times (open-ended: its levels do not depend on
    // how many looks there are); with the stream family's A/A, where Holm's levels are taken from the
    // sequence's level (no theorem covers that).
    for original in [
        "A/A, margin 0",
        "A/A",
        "b ×1.05 (at the margin)",
        "b ×1.10",
        "stream, 3 classes × 4 metrics, A/A, margin 0",
    ] {
        for (looks, boundary) in BOUNDARIES {
            if let Some(s) = one_look(&out, original) {
                out.push(Scenario {
                    looks,
                    boundary,
                    ..s
                });
            }
        }
    }
    out
}

/// The scenario named `name` with one look: the original that a twin (unstratified, another boundary)
/// runs again on the same seeds.
fn one_look(scenarios: &[Scenario], name: &str) -> Option<Scenario> {
    scenarios
        .iter()
        .find(|s| s.name == name && s.looks == 1)
        .cloned()
}

/// The boundaries beside O'Brien–Fleming's in the suite, with their looks.
pub const BOUNDARIES: [(u32, Boundary); 2] = [(4, Boundary::Pocock), (100, Boundary::AlwaysValid)];

/// A scenario's looks as the tables show them: the count, and the boundary unless O'Brien–Fleming's.
pub fn looks_text(looks: u32, boundary: Boundary) -> String {
    match boundary {
        Boundary::ObrienFleming => looks.to_string(),
        other => format!("{looks} {}", other.name()),
    }
}
