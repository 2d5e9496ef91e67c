//! The progress line of a live run on stderr.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::time::Instant;

use kvab_judge::requests::{Analysis, Design};
use kvab_judge::Decision;

use super::measure::Outcome;
use super::options::Options;

/// The progress line on stderr: answers per arm, rate, and the current estimate of each primary
/// comparison (the ratio of the arms' times as comparisons estimate it, failures ranked at --max-time,
/// from running samples; the decisions are the looks').
pub struct Progress {
    enabled: bool,
    terminal: bool,
    started: Instant,
    last: Instant,
    last_estimate: Instant,
    total: u64,
    arms: Vec<String>,
    classes: Vec<String>,
    per_arm: Vec<u64>,
    /// Per class and arm, the primary metric of every request that counts.
    primary: Vec<[Vec<f64>; 2]>,
    estimate: String,
    look: String,
}

impl Progress {
    pub fn new(options: &Options, design: &Design, started: Instant, total: u64) -> Self {
        Progress {
            enabled: !options.quiet,
            terminal: std::io::stderr().is_terminal(),
            started,
            last: started,
            last_estimate: started,
            total,
            arms: options.arms.clone(),
            classes: design.classes.clone(),
            per_arm: vec![0; options.arms.len()],
            primary: vec![[Vec::new(), Vec::new()]; design.classes.len()],
            estimate: String::new(),
            look: String::new(),
        }
    }

    pub fn observe(&mut self, outcome: &Outcome, design: &Design) {
        if !self.enabled {
            return;
        }
        if let Some(n) = self.per_arm.get_mut(outcome.assigned) {
            *n += 1;
        }
        let value = if design.stream {
            outcome.ttft_ms
        } else {
            Some(outcome.e2e_ms)
        };
        let value = if outcome.counts() {
            value
        } else {
            outcome.failed().then_some(design.max_time_ms)
        };
        if let (Some(value), Some(by_arm)) = (value, self.primary.get_mut(outcome.class)) {
            if let Some(values) = by_arm.get_mut(outcome.assigned) {
                values.push(value);
            }
        }
    }

    pub fn update(&mut self, received: usize) {
        let every = if self.terminal {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(5)
        };
        if !self.enabled || self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        if self.last_estimate.elapsed() >= Duration::from_secs(2) {
            self.last_estimate = Instant::now();
            let estimates: Vec<String> = self
                .classes
                .iter()
                .zip(&self.primary)
                .filter_map(|(class, [first, second])| {
                    let ratio = kvab_judge::comparison::ratio_of_samples(first, second)?;
                    Some(format!("{class} ×{ratio:.3}"))
                })
                .collect();
            if !estimates.is_empty() {
                // The second arm's time over the first's.
                let arms: Vec<&str> = self.arms.iter().rev().map(String::as_str).collect();
                let arms = arms.join("/");
                self.estimate = format!("; ratio {arms} {}", estimates.join(", "));
            }
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let arms: Vec<String> = self
            .arms
            .iter()
            .zip(&self.per_arm)
            .map(|(a, n)| format!("{a} {n}"))
            .collect();
        let line = format!(
            "kvab experiment: {received}/{} measured ({}), {:.1}/s{}{}",
            self.total,
            arms.join(", "),
            received as f64 / elapsed.max(1e-9),
            self.estimate,
            self.look
        );
        let mut stderr = std::io::stderr().lock();
        let _ = if self.terminal {
            write!(stderr, "\r\x1b[2K{line}")
        } else {
            writeln!(stderr, "{line}")
        };
        let _ = stderr.flush();
    }

    pub fn look(&mut self, look: u32, analysis: &Analysis) {
        let decided = analysis
            .comparisons
            .iter()
            .filter(|c| c.primary && c.decision != Decision::Inconclusive)
            .count();
        let primary = analysis.comparisons.iter().filter(|c| c.primary).count();
        self.look = format!("; look {look}: {decided}/{primary} decided");
    }

    pub fn finish(&self) {
        if self.enabled && self.terminal {
            eprintln!();
        }
    }
}
