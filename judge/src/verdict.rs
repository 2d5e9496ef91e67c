//! The verdict on a report and its reasons: one rule and one wording for `kvab experiment` and `kvab
//! analyze`. Each tool says what it found besides its comparisons (`Findings`); the verdict follows.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::comparison::{Comparison, Decision};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every primary comparison is `faster` or `equivalent`, and nothing in the findings stands against it.
    Decided,
    /// At least one primary comparison is undecided, or the data cannot decide (e.g. not randomized).
    Inconclusive,
    /// The data cannot be trusted (sample-ratio mismatch, no answers): no comparison is a finding.
    Invalid,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Decided => "decided",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Invalid => "invalid",
        }
    }

    /// The exit status of `kvab experiment` and `kvab analyze` (3 is for runs that could not be judged).
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Decided => 0,
            Verdict::Invalid => 1,
            Verdict::Inconclusive => 2,
        }
    }
}

/// What a tool found besides its comparisons, by what it does to the verdict. Each is a sentence.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    /// Why no comparison can be trusted (a sample-ratio mismatch, nothing counted): `invalid`.
    pub invalid: Vec<String>,
    /// What the comparisons rest on (e.g. a randomized window): said first, changes nothing.
    pub context: Vec<String>,
    /// Why the comparisons cannot decide however they came out (not randomized, too little traffic):
    /// `inconclusive`.
    pub caveats: Vec<String>,
    /// Said after the comparisons, changing nothing (error rates that differ, misrouted requests).
    pub notes: Vec<String>,
}

/// The verdict and its reasons, in this order: for `invalid`, why, then the notes; otherwise the
/// context, the caveats, each primary comparison (`Comparison::reason`), then the notes. `decided` needs
/// no caveat, at least one primary comparison, and every primary comparison decided.
pub fn verdict(findings: Findings, comparisons: &[Comparison]) -> (Verdict, Vec<String>) {
    let Findings {
        invalid,
        context,
        caveats,
        notes,
    } = findings;
    if !invalid.is_empty() {
        let mut reasons = invalid;
        reasons.extend(notes);
        return (Verdict::Invalid, reasons);
    }
    let undecidable = !caveats.is_empty();
    let mut reasons = context;
    reasons.extend(caveats);
    let primary: Vec<&Comparison> = comparisons.iter().filter(|c| c.primary).collect();
    reasons.extend(primary.iter().map(|c| c.reason()));
    reasons.extend(notes);
    let decided =
        !primary.is_empty() && primary.iter().all(|c| c.decision != Decision::Inconclusive);
    if decided && !undecidable {
        (Verdict::Decided, reasons)
    } else {
        (Verdict::Inconclusive, reasons)
    }
}

/// `decided: reason; reason`, or the bare word without reasons.
pub fn verdict_line(verdict: Verdict, reasons: &[String]) -> String {
    if reasons.is_empty() {
        verdict.word().to_string()
    } else {
        format!("{}: {}", verdict.word(), reasons.join("; "))
    }
}

/// `fs 120, nvlink 120`.
pub fn per_arm(counts: &BTreeMap<String, u64>) -> String {
    counts
        .iter()
        .map(|(arm, n)| format!("{arm} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
