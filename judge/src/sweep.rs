//! A load sweep: an experiment run at several load levels, each level's classes a cell of its own (judged
//! with the others in one family), and per arm the latency-versus-load curve with its saturation knee and
//! its goodput under the SLO. Pure: the levels' facts and the outcomes in, the figures out.
//!
//! The knee (docs/experiment.md, "Load sweeps"): with an SLO on the primary metric, the lowest level at
//! which the arm's p90 passes it; without one, the lowest level at which the arm's median is at least
//! `KNEE_FACTOR` times its median at the lightest level. Throughput cannot show it per arm: the
//! randomization gives both arms the same number of requests, so their completion rates stay equal while
//! the slower arm holds more of the requests in flight (`in_flight`, by Little's law).

use serde::{Deserialize, Serialize};

use crate::outcome::Outcome;
use crate::stats::percentile;

/// Without an SLO, the knee is where an arm's median reaches this multiple of its median at the lightest
/// level.
pub const KNEE_FACTOR: f64 = 1.5;

/// Most levels of one sweep.
pub const MAX_LEVELS: usize = 16;

/// `--slo`: per-request targets; a request meets the SLO when it was answered by its arm without error and
/// meets every target given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// Time to first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    /// The request's mean time per output token after the first (vLLM's TPOT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub itl_ms: Option<f64>,
    /// End-to-end time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e2e_ms: Option<f64>,
}

impl Slo {
    /// `ttft=500ms,itl=50ms,e2e=10s`: one or more targets, each `NAME=DURATION` with `ms` or `s`.
    pub fn parse(text: &str) -> Result<Slo, String> {
        let mut slo = Slo::default();
        for part in text.split(',').map(str::trim) {
            let Some((name, value)) = part.split_once('=') else {
                return Err(format!(
                    "`{part}` is not NAME=DURATION (ttft=500ms,itl=50ms,e2e=10s)"
                ));
            };
            let ms = duration_ms(value.trim()).ok_or_else(|| {
                format!("`{value}`: want a duration like 500ms or 2s (over 0, at most 3600s)")
            })?;
            let target = match name.trim() {
                "ttft" => &mut slo.ttft_ms,
                "itl" => &mut slo.itl_ms,
                "e2e" => &mut slo.e2e_ms,
                other => return Err(format!("`{other}`: the targets are ttft, itl and e2e")),
            };
            if target.replace(ms).is_some() {
                return Err(format!("`{}` is given twice", name.trim()));
            }
        }
        Ok(slo)
    }

    /// Answered by its own arm, without error, within every target.
    pub fn met(&self, outcome: &Outcome) -> bool {
        let within = |target: Option<f64>, value: Option<f64>| match (target, value) {
            (None, _) => true,
            (Some(target), Some(value)) => value <= target,
            (Some(_), None) => false,
        };
        outcome.counts()
            && within(self.ttft_ms, outcome.ttft_ms)
            // A one-token answer has no time per output token: nothing to miss.
            && (outcome.tpot_ms().is_none() || within(self.itl_ms, outcome.tpot_ms()))
            && within(self.e2e_ms, Some(outcome.e2e_ms))
    }

    /// The target on the primary metric (TTFT when streamed, else end-to-end).
    fn primary_ms(&self, stream: bool) -> Option<f64> {
        if stream {
            self.ttft_ms
        } else {
            self.e2e_ms
        }
    }
}

fn duration_ms(value: &str) -> Option<f64> {
    let (number, scale) = match value.strip_suffix("ms") {
        Some(number) => (number, 1.0),
        None => (value.strip_suffix('s')?, 1000.0),
    };
    let ms = number.trim().parse::<f64>().ok()? * scale;
    (ms > 0.0 && ms <= 3_600_000.0).then_some(ms)
}

/// One load level and what the run did at it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Level {
    /// `closed` (a number in flight) or `open` (Poisson arrivals).
    pub load: &'static str,
    pub concurrency: Option<u32>,
    pub rate: Option<f64>,
    /// From the first measured request sent to the last answer received (warm-up excluded).
    pub measured_s: f64,
    /// Requests sent at this level, warm-up included.
    pub sent: u64,
    /// Open loop: arrivals skipped at --max-in-flight.
    pub skipped: u64,
}

impl Level {
    /// `c=8` or `5/s`: how the grid and the curves name the level.
    pub fn label(&self) -> String {
        match (self.concurrency, self.rate) {
            (Some(c), _) => format!("c={c}"),
            (None, Some(rate)) => format!("{rate}/s"),
            (None, None) => "-".into(),
        }
    }
}

impl Sweep {
    /// `load sweep, closed loop: c=1, c=8, c=32 (each level with its own warm-up and requests)`.
    pub fn levels_text(&self) -> String {
        let kind = match self.levels.first().map(|l| l.load) {
            Some("open") => "open loop (Poisson arrivals)",
            _ => "closed loop",
        };
        let labels: Vec<String> = self.levels.iter().map(Level::label).collect();
        format!(
            "load sweep, {kind}: {} (each level with its own warm-up and requests)",
            labels.join(", ")
        )
    }

    /// `at c=32`, or `not reached`.
    pub fn knee_text(&self, knee: Option<usize>) -> String {
        match knee.and_then(|k| self.levels.get(k)) {
            Some(level) => format!("at {}", level.label()),
            None => "not reached".into(),
        }
    }
}

/// One arm at one level.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Measured requests assigned to the arm.
    pub requests: u64,
    /// Of them, answered by the arm without error.
    pub answered: u64,
    /// Answered requests per second of the level's measured time.
    pub throughput: f64,
    /// Mean requests of the arm in flight (its requests' end-to-end time over the measured time).
    pub in_flight: f64,
    /// The primary metric of the requests that count, a failure of the arm ranked at `--max-time`.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    /// With --slo: requests that met it, and their rate (goodput).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo_met: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goodput: Option<f64>,
}

/// An arm's latency-versus-load curve, over every class or of one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Curve {
    pub arm: String,
    /// The workload class; `null`: every class (the sweep's traffic as sent).
    pub class: Option<String>,
    /// One point per level, in level order.
    pub points: Vec<Point>,
    /// The first level at the knee (an index into the levels), if the sweep reached it.
    pub knee: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sweep {
    pub levels: Vec<Level>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slo: Option<Slo>,
    /// How the knee was found, in words.
    pub knee_rule: String,
    pub curves: Vec<Curve>,
}

/// A cell of the sweep: the analysis' class `c` is `cells[c]`, a workload class at a level.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub class: String,
    pub level: usize,
}

/// The sweep's figures: per arm a curve over every class, then one per class when there are several.
/// Outcomes of a class that is no cell are left out.
pub fn sweep(
    levels: Vec<Level>,
    cells: &[Cell],
    arms: &[String],
    outcomes: &[Outcome],
    slo: Option<Slo>,
    stream: bool,
    max_time_ms: f64,
) -> Sweep {
    let target = slo.and_then(|s| s.primary_ms(stream));
    let metric = if stream { "TTFT" } else { "end-to-end time" };
    let knee_rule = match target {
        Some(ms) => format!("the lowest level at which the arm's p90 {metric} passes the SLO's {ms} ms"),
        None => format!(
            "the lowest level at which the arm's median {metric} is at least {KNEE_FACTOR} times its median at \
             the lightest level"
        ),
    };
    let mut classes: Vec<Option<&str>> = vec![None];
    for cell in cells {
        if !classes.contains(&Some(cell.class.as_str())) {
            classes.push(Some(cell.class.as_str()));
        }
    }
    if classes.len() == 2 {
        // One class: its curve is the whole traffic's.
        classes.truncate(1);
    }
    let mut curves = Vec::new();
    for (arm, name) in arms.iter().enumerate() {
        for &class in &classes {
            let points: Vec<Point> = levels
                .iter()
                .enumerate()
                .map(|(level, facts)| {
                    let in_cell = |o: &&Outcome| {
                        cells.get(o.class).is_some_and(|cell| {
                            cell.level == level && class.is_none_or(|c| c == cell.class)
                        })
                    };
                    let of_cell = outcomes
                        .iter()
                        .filter(|o| o.assigned == arm)
                        .filter(in_cell);
                    point(of_cell, facts.measured_s, slo, stream, max_time_ms)
                })
                .collect();
            let knee = knee(&points, target);
            curves.push(Curve {
                arm: name.clone(),
                class: class.map(str::to_string),
                points,
                knee,
            });
        }
    }
    Sweep {
        levels,
        slo,
        knee_rule,
        curves,
    }
}

fn point<'a>(
    outcomes: impl Iterator<Item = &'a Outcome>,
    measured_s: f64,
    slo: Option<Slo>,
    stream: bool,
    max_time_ms: f64,
) -> Point {
    let (mut requests, mut answered, mut busy_ms, mut met) = (0u64, 0u64, 0.0, 0u64);
    let mut values = Vec::new();
    for o in outcomes {
        requests += 1;
        busy_ms += o.e2e_ms;
        met += u64::from(slo.is_some_and(|s| s.met(o)));
        if o.counts() {
            answered += 1;
            values.extend(if stream { o.ttft_ms } else { Some(o.e2e_ms) });
        } else if o.failed() {
            // As the comparisons rank it: an arm that times out under load is slow, not absent.
            values.push(max_time_ms);
        }
    }
    let per_second = |n: u64| {
        if measured_s > 0.0 {
            n as f64 / measured_s
        } else {
            0.0
        }
    };
    Point {
        requests,
        answered,
        throughput: per_second(answered),
        in_flight: if measured_s > 0.0 {
            busy_ms / 1000.0 / measured_s
        } else {
            0.0
        },
        p50_ms: percentile(&values, 50.0),
        p90_ms: percentile(&values, 90.0),
        slo_met: slo.map(|_| met),
        goodput: slo.map(|_| per_second(met)),
    }
}

/// The knee of one curve (see the module's rule).
fn knee(points: &[Point], target_ms: Option<f64>) -> Option<usize> {
    match target_ms {
        Some(target) => points
            .iter()
            .position(|p| p.p90_ms.is_some_and(|p90| p90 > target)),
        None => {
            let base = points.first()?.p50_ms?;
            points
                .iter()
                .enumerate()
                .skip(1)
                .find(|(_, p)| p.p50_ms.is_some_and(|m| m >= KNEE_FACTOR * base))
                .map(|(level, _)| level)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn answered(class: usize, arm: usize, ttft: f64) -> Outcome {
        Outcome {
            class,
            assigned: arm,
            served: Some(arm),
            status: Some(200),
            ttft_ms: Some(ttft),
            itl_ms: vec![2.0; 7],
            e2e_ms: ttft + 14.0,
            output_tokens: Some(8),
            ..Outcome::default()
        }
    }

    fn level(concurrency: u32) -> Level {
        Level {
            load: "closed",
            concurrency: Some(concurrency),
            rate: None,
            measured_s: 10.0,
            sent: 0,
            skipped: 0,
        }
    }

    #[test]
    fn slo_parses_targets_and_names_what_is_wrong() {
        let slo = Slo::parse("ttft=500ms, itl=50ms,e2e=2s").unwrap();
        assert_eq!(slo.ttft_ms, Some(500.0));
        assert_eq!(slo.itl_ms, Some(50.0));
        assert_eq!(slo.e2e_ms, Some(2000.0));
        for (bad, says) in [
            ("ttft", "NAME=DURATION"),
            ("ttft=5m", "duration"),
            ("ttft=0ms", "duration"),
            ("tpot=5ms", "ttft, itl and e2e"),
            ("ttft=1s,ttft=2s", "twice"),
        ] {
            let error = Slo::parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn a_request_meets_the_slo_only_answered_and_within_every_target() {
        let slo = Slo::parse("ttft=100ms,itl=3ms").unwrap();
        assert!(slo.met(&answered(0, 0, 99.0)));
        assert!(!slo.met(&answered(0, 0, 101.0)));
        let mut slow_tokens = answered(0, 0, 50.0);
        slow_tokens.itl_ms = vec![4.0; 7];
        assert!(!slo.met(&slow_tokens));
        let mut failed = answered(0, 0, 50.0);
        failed.error = Some("status 503".into());
        assert!(!slo.met(&failed));
    }

    #[test]
    fn the_knee_is_where_the_median_grows_by_the_factor_or_the_p90_passes_the_slo() {
        // Two levels, one class: cell 0 at level 0, cell 1 at level 1. Arm 1 slows down 3x at level 1.
        let mut outcomes = Vec::new();
        for i in 0..20 {
            let jitter = i as f64;
            outcomes.push(answered(0, 0, 100.0 + jitter));
            outcomes.push(answered(0, 1, 110.0 + jitter));
            outcomes.push(answered(1, 0, 105.0 + jitter));
            outcomes.push(answered(1, 1, 330.0 + jitter));
        }
        let arms = vec!["nvlink".to_string(), "fs".to_string()];
        let cells = [0, 1].map(|level| Cell {
            class: "8192".into(),
            level,
        });
        let free = sweep(
            vec![level(1), level(8)],
            &cells,
            &arms,
            &outcomes,
            None,
            true,
            60_000.0,
        );
        assert_eq!(free.curves.len(), 2, "one class: one curve per arm");
        assert_eq!(free.curves[0].class, None);
        assert_eq!(free.curves[0].knee, None);
        assert_eq!(free.curves[1].knee, Some(1));
        let point = &free.curves[1].points[1];
        assert_eq!((point.requests, point.answered), (20, 20));
        assert!((point.throughput - 2.0).abs() < 1e-12);
        assert!(point.p90_ms.unwrap() > 330.0);
        let slo = Slo::parse("ttft=120ms").unwrap();
        let bounded = sweep(
            vec![level(1), level(8)],
            &cells,
            &arms,
            &outcomes,
            Some(slo),
            true,
            60_000.0,
        );
        // nvlink's p90 at level 1 is 105 + 17.1 > 120: its knee under the SLO is level 1 too; fs's p90 at
        // level 0 (127.1) already passes it.
        assert_eq!(bounded.curves[0].knee, Some(1));
        assert_eq!(bounded.curves[1].knee, Some(0));
        assert_eq!(bounded.curves[0].points[0].slo_met, Some(20));
        assert!(bounded.knee_rule.contains("120 ms"));
    }
}
