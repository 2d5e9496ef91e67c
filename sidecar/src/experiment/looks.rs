//! The sequential looks of `kvab experiment`, with no I/O: the one procedure that both the live run and
//! `--judge-records` follow, so a judged records file decides where the run did.
//!
//! Outcomes are kept by measured number (request number − warm-up); a look analyses the first `n` of them
//! once all `n` are in, so what a look sees is fixed by the assignment order, not by which answers came
//! first. With `--until decided` the looks are at `look_points`; the first look where every primary
//! comparison is decided and the sample-ratio check passes ends the run. Otherwise the analysis is of
//! every outcome received.

use super::analysis::{self, Analysis, Design};
use super::measure::Outcome;
use super::options::Until;

/// The measured request counts at which `--until decided` analyses: `looks` evenly spaced points.
pub fn look_points(requests: u64, looks: u32) -> Vec<u64> {
    (1..=u64::from(looks))
        .map(|k| (k * requests).div_ceil(u64::from(looks)))
        .collect()
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
    pub end: End,
}

/// The look procedure, fed one outcome at a time (in any order).
#[derive(Debug, Clone)]
pub struct Looks {
    design: Design,
    total: usize,
    until: Until,
    points: Vec<u64>,
    /// Outcomes by measured number; they grow with the answers (a large --requests reserves nothing).
    slots: Vec<Option<Outcome>>,
    complete_prefix: usize,
    received: usize,
    next_point: usize,
    looks_made: u32,
    decided: Option<(Analysis, usize)>,
}

impl Looks {
    /// `looks` is the planned number of analyses of `--until decided` (ignored with `--until budget`).
    pub fn new(design: Design, requests: u64, until: Until, looks: u32) -> Self {
        let points = match until {
            Until::Decided => look_points(requests, looks),
            Until::Budget => Vec::new(),
        };
        Looks {
            design,
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
                Ended {
                    analysis: analysis::analyze(&self.design, &outcomes),
                    analyzed: outcomes,
                    looks_made: looks_made.max(1),
                    end,
                }
            }
        }
    }
}
