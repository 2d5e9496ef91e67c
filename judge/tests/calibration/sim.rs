//! Simulated experiments: the outcomes `kvab experiment` would measure from two arms whose latencies are
//! known, assigned as the real run assigns them (classes interleaved in shuffled blocks holding every
//! class once; within a class, arms in shuffled blocks of `BLOCK` holding each arm equally).

use kvab_judge::requests::Outcome;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use rand::RngExt;

/// `kvab experiment --block`'s default.
pub const BLOCK: usize = 4;
/// `--max-time`'s default (60 s): where a timed-out request's time ends.
pub const MAX_TIME_MS: f64 = 60_000.0;
/// Output tokens of a streamed answer: `TOKENS - 1` inter-token gaps.
const TOKENS: usize = 16;
/// Each class's latency scale (prompt classes of growing size take longer).
const CLASS_SCALE: [f64; 3] = [1.0, 2.0, 4.0];

/// What one arm does beyond the shared base latency.
#[derive(Debug, Clone, Copy)]
pub struct Arm {
    /// Every latency × this: the true ratio of this arm's times to a `scale` 1 arm's.
    pub scale: f64,
    /// Probability that a request stalls: its time (time to first token when streamed) × `stall_factor`.
    pub stall: f64,
    pub stall_factor: f64,
    /// Requests whose latent quantile is above `tail_from` take × `tail_factor`: the median is unchanged
    /// and every quantile above `tail_from` is × `tail_factor`.
    pub tail_from: f64,
    pub tail_factor: f64,
    /// Probability that a request fails: half answered `503` at once, half time out at `MAX_TIME_MS`.
    pub fail: f64,
}

impl Arm {
    pub const PLAIN: Arm = Arm {
        scale: 1.0,
        stall: 0.0,
        stall_factor: 1.0,
        tail_from: 1.0,
        tail_factor: 1.0,
        fail: 0.0,
    };

    pub fn scaled(scale: f64) -> Arm {
        Arm {
            scale,
            ..Arm::PLAIN
        }
    }
}

/// Shared load: an AR(1) process g (coefficient `phi`, stationary standard deviation `sd`) over the
/// requests in sending order; every latency of both arms × exp(g).
#[derive(Debug, Clone, Copy)]
pub struct Drift {
    pub phi: f64,
    pub sd: f64,
}

/// One experiment's world: the traffic and the two arms.
#[derive(Debug, Clone, Copy)]
pub struct World {
    pub stream: bool,
    pub classes: usize,
    /// Measured requests (all classes, both arms).
    pub requests: usize,
    pub arms: [Arm; 2],
    pub drift: Option<Drift>,
    /// Load levels, run one after the other (a load sweep): `classes` cells at each, `requests` each.
    pub levels: usize,
}

/// A load sweep's levels: the time of both arms scaled, and a queueing wait (exponential, this mean in
/// ms × the class scale) added, more at each level.
const LOAD_SCALE: [f64; 3] = [1.0, 1.3, 2.0];
const QUEUE_MS: [f64; 3] = [0.0, 10.0, 60.0];

fn exponential(rng: &mut ChaCha8Rng) -> f64 {
    -(1.0 - rng.random::<f64>()).ln()
}

pub fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The standard normal quantile of `p`.
fn normal_quantile(p: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF, Normal};
    Normal::standard().inverse_cdf(p)
}

/// The base time of a request (ms, before class scale and arm): 15 ms plus a log-normal part (median
/// 20 ms, σ 0.6), from a standard normal `z`.
fn base_ms(z: f64) -> f64 {
    15.0 + 20.0 * (0.6 * z).exp()
}

/// The run's (class, arm) sequence, as `kvab experiment`'s assigner makes it.
fn assignments(rng: &mut ChaCha8Rng, classes: usize, requests: usize) -> Vec<(usize, usize)> {
    let mut class_block: Vec<usize> = Vec::new();
    let mut arm_blocks: Vec<Vec<usize>> = vec![Vec::new(); classes];
    let mut out = Vec::with_capacity(requests);
    for _ in 0..requests {
        if class_block.is_empty() {
            class_block = (0..classes).collect();
            class_block.shuffle(rng);
        }
        let class = class_block.pop().unwrap_or(0);
        let block = &mut arm_blocks[class];
        if block.is_empty() {
            *block = (0..BLOCK).map(|i| i % 2).collect();
            block.shuffle(rng);
        }
        out.push((class, block.pop().unwrap_or(0)));
    }
    out
}

/// One simulated experiment's outcomes, in sending order: the levels one after the other, the cells of
/// level `l` after the classes of the earlier levels.
pub fn simulate(world: &World, rng: &mut ChaCha8Rng) -> Vec<Outcome> {
    let mut out = Vec::new();
    for level in 0..world.levels.max(1) {
        let offset = level * world.classes;
        out.extend(simulate_level(world, level, rng).into_iter().map(|mut o| {
            o.class += offset;
            o
        }));
    }
    out
}

fn simulate_level(world: &World, level: usize, rng: &mut ChaCha8Rng) -> Vec<Outcome> {
    let (load, queue) = (
        LOAD_SCALE[level % LOAD_SCALE.len()],
        QUEUE_MS[level % QUEUE_MS.len()],
    );
    let plan = assignments(rng, world.classes, world.requests);
    let tail_z = world.arms.map(|a| normal_quantile(a.tail_from));
    let (mut g, innovation) = match world.drift {
        Some(d) => (
            d.sd * normal(rng),
            d.sd * (1.0 - d.phi * d.phi).max(0.0).sqrt(),
        ),
        None => (0.0, 0.0),
    };
    let phi = world.drift.map_or(0.0, |d| d.phi);
    plan.into_iter()
        .map(|(class, assigned)| {
            if world.drift.is_some() {
                g = phi * g + innovation * normal(rng);
            }
            let arm = world.arms[assigned];
            // Shared by both arms: the class, the load of the moment.
            let class_scale = CLASS_SCALE[class % CLASS_SCALE.len()];
            let common = class_scale * g.exp() * arm.scale * load;
            let z = normal(rng);
            let mut first = base_ms(z) * common;
            if queue > 0.0 {
                first += queue * class_scale * arm.scale * exponential(rng);
            }
            if z > tail_z[assigned] {
                first *= arm.tail_factor;
            }
            if rng.random::<f64>() < arm.stall {
                first *= arm.stall_factor;
            }
            let mut outcome = Outcome {
                class,
                assigned,
                served: Some(assigned),
                status: Some(200),
                ..Outcome::default()
            };
            let failed = rng.random::<f64>() < arm.fail;
            let timeout = rng.random::<f64>() < 0.5;
            if world.stream {
                // Inter-token gaps: 8 ms median, log-normal, scaled with the load and the arm alone.
                let gap = 8.0 * g.exp() * arm.scale;
                let gaps: Vec<f64> = (1..TOKENS)
                    .map(|_| gap * (0.3 * normal(rng)).exp())
                    .collect();
                if failed && !timeout {
                    // 503 before any token.
                    outcome.status = Some(503);
                    outcome.error = Some("status 503".into());
                    outcome.e2e_ms = 0.2 * first;
                    return outcome;
                }
                if failed {
                    // Headers came, the first token never did.
                    outcome.error = Some("timeout".into());
                    outcome.e2e_ms = MAX_TIME_MS;
                    return outcome;
                }
                outcome.e2e_ms = first + gaps.iter().sum::<f64>();
                outcome.ttft_ms = Some(first);
                outcome.itl_ms = gaps;
                outcome.output_tokens = Some(TOKENS as u64);
            } else if failed && !timeout {
                outcome.status = Some(503);
                outcome.error = Some("status 503".into());
                outcome.e2e_ms = 0.2 * first;
            } else if failed {
                outcome.error = Some("timeout".into());
                outcome.e2e_ms = MAX_TIME_MS;
            } else {
                outcome.e2e_ms = first;
            }
            outcome
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normal_quantile_inverts_known_points() {
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959964),
            (0.98, 2.053749),
            (0.01, -2.326348),
        ] {
            assert!(
                (normal_quantile(p) - z).abs() < 1e-5,
                "{p}: {}",
                normal_quantile(p)
            );
        }
        assert_eq!(normal_quantile(1.0), f64::INFINITY);
    }
}
