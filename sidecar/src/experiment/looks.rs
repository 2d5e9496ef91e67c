//! The sequential looks of `kvab experiment`, with no I/O: the one procedure that both the live run and
//! `--judge-records` follow, so a judged records file decides where the run did.
//!
//! Outcomes are kept by measured number (request number − warm-up); a look analyses the first `n` of them
//! once all `n` are in, so what a look sees is fixed by the assignment order, not by which answers came
//! first. With `--until decided` the looks are at `look_points`; the first look where every primary
//! comparison is decided and the sample-ratio check passes ends the run. Otherwise the analysis is of
//! every outcome received.

use super::measure::Outcome;
pub use kvab_judge::requests::look_points;
use kvab_judge::requests::{self as analysis, Analysis, Design};
use kvab_judge::sequential::{self, Boundary};

/// When the looks stop (`--until`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Until {
    // One analysis when the request or time budget is spent.
    Budget,
    // An analysis at each of --looks points; stop at the first where every primary comparison is decided.
    Decided,
}

/// Why the looks ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A look decided.
    Decided,
    /// Every measured request was in, and no look decided.
    Complete,
    /// The outcomes stopped before every measured request was in (the run's time budget, or a run that
    /// stopped when decided, judged again with another method).
    Short,
}

/// What the looks found.
#[derive(Debug, Clone)]
pub struct Ended {
    pub analysis: Analysis,
    /// The outcomes the analysis saw, in measured order: the deciding look's prefix, or every one
    /// received.
    pub analyzed: Vec<Outcome>,
    /// The analyses made (the final analysis counts as a look when the run ended before its last one).
    pub looks_made: u32,
    /// The level the analysis was made at (`kvab_judge::sequential`: α spent up to its look).
    pub level: f64,
    pub end: End,
}

/// The look procedure, fed one outcome at a time (in any order).
#[derive(Debug, Clone)]
pub struct Looks {
    design: Design,
    /// The experiment's α, spent over the looks.
    alpha: f64,
    /// How the looks' levels are set.
    boundary: Boundary,
    total: usize,
    until: Until,
    points: Vec<u64>,
    /// The level of the look at each point.
    levels: Vec<f64>,
    /// Outcomes by measured number; they grow with the answers (a large --requests reserves nothing).
    slots: Vec<Option<Outcome>>,
    complete_prefix: usize,
    received: usize,
    next_point: usize,
    looks_made: u32,
    decided: Option<(Analysis, usize)>,
}

impl Looks {
    /// `looks` is the planned number of analyses of `--until decided` (ignored with `--until budget`), at
    /// the levels of `boundary`; `design.look_alpha` is the experiment's α (`kvab_judge::sequential`).
    pub fn new(
        design: Design,
        requests: u64,
        until: Until,
        looks: u32,
        boundary: Boundary,
    ) -> Self {
        let points = match until {
            Until::Decided => look_points(requests, looks),
            Until::Budget => Vec::new(),
        };
        let alpha = design.look_alpha;
        Looks {
            levels: sequential::look_levels(boundary, alpha, requests, &points),
            design,
            alpha,
            boundary,
            total: usize::try_from(requests).unwrap_or(usize::MAX),
            until,
            points,
            slots: Vec::new(),
            complete_prefix: 0,
            received: 0,
            next_point: 0,
            looks_made: 0,
            decided: None,
        }
    }

    /// Measured outcomes received (each measured number once).
    pub fn received(&self) -> usize {
        self.received
    }

    /// Outcomes received, by measured number (`None`: not received).
    pub fn slots(&self) -> &[Option<Outcome>] {
        &self.slots
    }

    /// The outcome of measured request `number`; `on_look` sees each look made (its 1-based number and
    /// analysis). True once a look has decided: the run stops, and later outcomes are not taken. A number
    /// beyond the budget, or one already received, is not taken.
    pub fn receive(
        &mut self,
        number: u64,
        outcome: Outcome,
        mut on_look: impl FnMut(u32, &Analysis),
    ) -> bool {
        if self.decided.is_some() {
            return true;
        }
        let Ok(index) = usize::try_from(number) else {
            return false;
        };
        if index >= self.total {
            return false;
        }
        if self.slots.len() <= index {
            self.slots.resize(index + 1, None);
        }
        if self.slots[index].is_some() {
            return false;
        }
        self.slots[index] = Some(outcome);
        self.received += 1;
        while self
            .slots
            .get(self.complete_prefix)
            .is_some_and(Option::is_some)
        {
            self.complete_prefix += 1;
        }
        while let Some(&point) = self.points.get(self.next_point) {
            if (self.complete_prefix as u64) < point {
                break;
            }
            self.design.look_alpha = self.levels.get(self.next_point).copied().unwrap_or(0.0);
            self.next_point += 1;
            self.looks_made += 1;
            let prefix: Vec<Outcome> = self.slots[..point as usize]
                .iter()
                .flatten()
                .cloned()
                .collect();
            let analysis = analysis::analyze(&self.design, &prefix);
            on_look(self.looks_made, &analysis);
            if analysis.decided() && analysis.assignment.srm_ok {
                self.decided = Some((analysis, point as usize));
                return true;
            }
        }
        false
    }

    /// The level of a final analysis of `n` outcomes that no look decided: α with one analysis; the last
    /// look's when every look was made (the final analysis is that look's); otherwise a look at `n`
    /// spending what is left at its fraction.
    fn final_level(&self, n: usize) -> f64 {
        if self.until == Until::Budget {
            return self.alpha;
        }
        let made = self.points.get(..self.next_point).unwrap_or(&[]);
        if made.len() == self.points.len() {
            return self.levels.last().copied().unwrap_or(self.alpha);
        }
        let mut points = made.to_vec();
        points.push(n as u64);
        let levels = sequential::look_levels(self.boundary, self.alpha, self.total as u64, &points);
        levels.last().copied().unwrap_or(0.0)
    }

    /// The analysis of the run: the deciding look's, or a final one of every outcome received.
    pub fn finish(&self) -> Ended {
        match &self.decided {
            Some((analysis, point)) => Ended {
                analysis: analysis.clone(),
                analyzed: self.slots[..(*point).min(self.slots.len())]
                    .iter()
                    .flatten()
                    .cloned()
                    .collect(),
                looks_made: self.looks_made.max(1),
                level: self.design.look_alpha,
                end: End::Decided,
            },
            None => {
                let outcomes: Vec<Outcome> = self.slots.iter().flatten().cloned().collect();
                let mut looks_made = self.looks_made;
                if self.until == Until::Decided && self.next_point < self.points.len() {
                    looks_made += 1;
                }
                let end = if outcomes.len() >= self.total {
                    End::Complete
                } else {
                    End::Short
                };
                let design = Design {
                    look_alpha: self.final_level(outcomes.len()),
                    ..self.design.clone()
                };
                Ended {
                    analysis: analysis::analyze(&design, &outcomes),
                    analyzed: outcomes,
                    looks_made: looks_made.max(1),
                    level: design.look_alpha,
                    end,
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::rngs::ChaCha8Rng;
    use rand::seq::SliceRandom;
    use rand::{RngExt, SeedableRng};

    use super::*;
    use crate::experiment::records::{self, ClassSpec, Header, LoadSpec, MethodSpec, RunFacts};
    use crate::experiment::{assemble, replay};

    fn header(until: Until, looks: u32, requests: u64) -> Header {
        Header {
            arms: vec!["nvlink".into(), "fs".into()],
            classes: vec![
                ClassSpec {
                    label: "128".into(),
                    prompt_tokens: Some(128),
                    level: None,
                    turn: None,
                    workload: None,
                },
                ClassSpec {
                    label: "2048".into(),
                    prompt_tokens: Some(2048),
                    level: None,
                    turn: None,
                    workload: None,
                },
            ],
            stream: true,
            endpoint: "/v1/chat/completions".into(),
            load: LoadSpec::Closed { concurrency: 8 },
            seed: 7,
            warmup: 4,
            requests,
            max_time_s: 60.0,
            method: MethodSpec {
                alpha: 0.05,
                min_effect: 0.05,
                tail_margin: 0.25,
                error_margin: 0.02,
                until,
                looks,
                boundary: Boundary::ObrienFleming,
                srm_threshold: 0.001,
            },
            run: RunFacts {
                sent: requests + 4,
                skipped: 0,
                duration_s: 3.217_654_321,
                stopped_by: "requests".into(),
            },
            levels: Vec::new(),
            slo: None,
            shapes: vec![kvab_judge::reuse::Shape::Unique],
        }
    }

    /// A scripted experiment: fs is 40 % slower in class 2048 and 30 % in class 128 (arms alike could not
    /// be shown equivalent with 100 requests per arm: no p99 bound); a few errors, misroutes and untagged
    /// answers; timings with every bit of an f64 in use.
    fn outcomes(n: usize, seed: u64) -> Vec<Outcome> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let class = (i / 2) % 2;
                let assigned = i % 2;
                let base = if class == 0 { 30.0 } else { 80.0 };
                let slow = match (class, assigned) {
                    (1, 1) => 1.4,
                    (0, 1) => 1.3,
                    _ => 1.0,
                };
                let ttft = base * slow * (1.0 + 0.1 * rng.random::<f64>());
                let served = match rng.random_range(0..100) {
                    0 => None,
                    1 => Some(1 - assigned),
                    _ => Some(assigned),
                };
                let error = (rng.random_range(0..50) == 0).then(|| "status 503".to_string());
                Outcome {
                    class,
                    assigned,
                    served,
                    status: served.map(|_| if error.is_some() { 503 } else { 200 }),
                    error,
                    ttft_ms: Some(ttft),
                    itl_ms: (0..3).map(|_| rng.random::<f64>() * 3.0).collect(),
                    e2e_ms: ttft + 10.0 * rng.random::<f64>(),
                    prompt_tokens: Some(if class == 0 { 130 } else { 2050 }),
                    output_tokens: Some(4),
                    group: None,
                }
            })
            .collect()
    }

    /// The looks by hand: the first planned point whose prefix decides, at its level, with the sample
    /// ratio ok.
    fn first_deciding_point(header: &Header, outcomes: &[Outcome]) -> Option<u64> {
        let points = look_points(header.requests, header.method.looks);
        let levels = sequential::look_levels(
            header.method.boundary,
            header.method.alpha,
            header.requests,
            &points,
        );
        points.into_iter().zip(levels).find_map(|(p, level)| {
            let design = Design {
                look_alpha: level,
                ..header.design()
            };
            let a = analysis::analyze(&design, &outcomes[..p as usize]);
            (a.decided() && a.assignment.srm_ok).then_some(p)
        })
    }

    fn report_json(
        header: &Header,
        ended: Ended,
        judged_from: Option<String>,
    ) -> serde_json::Value {
        let stopped_by = match ended.end {
            End::Decided => "decided",
            End::Complete => "requests",
            End::Short => "duration",
        };
        serde_json::to_value(assemble(
            header,
            &header.design(),
            ended,
            stopped_by,
            judged_from,
        ))
        .unwrap()
    }

    #[test]
    fn the_live_order_and_the_replay_of_the_written_records_give_the_same_report() {
        let mut decided_early = 0;
        for (until, looks, seed, boundary) in [
            (Until::Decided, 10, 1, Boundary::ObrienFleming),
            (Until::Decided, 3, 2, Boundary::ObrienFleming),
            (Until::Budget, 1, 3, Boundary::ObrienFleming),
            (Until::Decided, 4, 4, Boundary::Pocock),
            (Until::Decided, 20, 5, Boundary::AlwaysValid),
        ] {
            let mut header = header(until, looks, 400);
            header.method.boundary = boundary;
            let all = outcomes(400, seed);
            // The live run: answers arrive out of order (up to 8 in flight), and it stops taking them once
            // a look decides; those already in stay in the records.
            let mut arrival: Vec<usize> = (0..all.len()).collect();
            for chunk in arrival.chunks_mut(8) {
                chunk.shuffle(&mut ChaCha8Rng::seed_from_u64(seed + 100));
            }
            let mut live = Looks::new(header.design(), header.requests, until, looks, boundary);
            let mut seen_looks = Vec::new();
            for &i in &arrival {
                if live.receive(i as u64, all[i].clone(), |k, _| seen_looks.push(k)) {
                    break;
                }
            }
            let live_ended = live.finish();
            let expected = if until == Until::Decided {
                first_deciding_point(&header, &all)
            } else {
                None
            };
            match expected {
                Some(point) => {
                    decided_early += usize::from(point < 400);
                    assert_eq!(live_ended.end, End::Decided, "until {until:?}");
                    assert_eq!(live_ended.analyzed.len() as u64, point);
                    let k = look_points(400, looks)
                        .iter()
                        .position(|&p| p == point)
                        .unwrap();
                    assert_eq!(live_ended.looks_made as usize, k + 1);
                    assert_eq!(seen_looks, (1..=k as u32 + 1).collect::<Vec<_>>());
                }
                None => assert_eq!(live_ended.end, End::Complete),
            }
            let mut written = Vec::new();
            records::write_to(&mut written, &header, live.slots()).unwrap();
            let parsed = records::read::parse(written.as_slice(), "test").unwrap();
            assert_eq!(parsed.header, header);
            assert_eq!(parsed.outcomes.len(), live.received());
            for (number, outcome) in &parsed.outcomes {
                assert_eq!(Some(outcome), all.get(*number as usize), "record {number}");
            }
            let judged = replay(&parsed.header, parsed.outcomes);
            assert_eq!(judged.end, live_ended.end);
            assert_eq!(judged.looks_made, live_ended.looks_made);
            assert_eq!(judged.analyzed, live_ended.analyzed);
            assert_eq!(
                report_json(&parsed.header, judged, None),
                report_json(&header, live_ended, None)
            );
        }
        assert!(decided_early >= 2, "scripts that stop at a look");
    }

    #[test]
    fn a_run_cut_short_makes_its_last_analysis_a_look() {
        let header = header(Until::Decided, 4, 400);
        // No answer is tagged: no look can decide.
        let all = outcomes(150, 4)
            .into_iter()
            .map(|o| Outcome { served: None, ..o });
        let mut looks = Looks::new(
            header.design(),
            400,
            Until::Decided,
            4,
            Boundary::ObrienFleming,
        );
        let mut made = Vec::new();
        for (i, o) in all.enumerate() {
            assert!(!looks.receive(i as u64, o, |k, _| made.push(k)));
        }
        assert_eq!(made, [1]);
        // Out of the budget, and twice: not taken.
        assert!(!looks.receive(400, Outcome::default(), |_, _| {}));
        assert!(!looks.receive(3, Outcome::default(), |_, _| {}));
        assert_eq!(looks.received(), 150);
        let ended = looks.finish();
        assert_eq!(ended.end, End::Short);
        assert_eq!(
            ended.looks_made, 2,
            "the look at 100, then the final analysis"
        );
        assert_eq!(ended.analyzed.len(), 150);
    }
}
