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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::comparison::{of_samples, InFamily, Rule};

    fn arms() -> Vec<String> {
        vec!["nvlink".into(), "fs".into()]
    }

    /// A primary comparison of `first` against `second` (as times in ms) at a loose level.
    fn compared(first: &[f64], second: &[f64], class: &str) -> Comparison {
        let p = crate::stats::mann_whitney_u(first, second).map(|t| t.p_value);
        of_samples(
            "ttft_ms",
            Some(class.into()),
            true,
            &arms(),
            [first, second],
            None,
            None,
            InFamily {
                p,
                p_adjusted: p.unwrap_or(1.0),
                level: 0.05,
            },
            Rule {
                level: 0.05,
                tost_level: 0.05,
                min_effect: 0.05,
                tail_margin: 0.25,
            },
            None,
        )
    }

    fn spread(centre: f64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| centre + (i % 10) as f64 * 0.01 * centre / 10.0)
            .collect()
    }

    #[test]
    fn one_rule_decides_faster_equivalent_and_inconclusive() {
        let faster = compared(&spread(100.0, 200), &spread(150.0, 200), "short");
        assert_eq!(
            (faster.decision, faster.faster.as_deref()),
            (Decision::Faster, Some("nvlink"))
        );
        assert_eq!(
            faster.reason(),
            "ttft_ms short: nvlink faster by 50.0% [49.9%, 50.1%]"
        );
        // Enough requests to bound each arm's p99 (368 at the 5 % level).
        let same = compared(&spread(100.0, 400), &spread(100.0, 400), "short");
        assert_eq!(same.decision, Decision::Equivalent);
        assert_eq!(
            same.reason(),
            "ttft_ms short: equivalent (×1.000 [1.000, 1.000])"
        );
        let few = compared(&[100.0, 180.0], &[120.0, 90.0], "short");
        assert_eq!(few.decision, Decision::Inconclusive);
        assert_eq!(few.decision_text().split(' ').next(), Some("inconclusive"));
    }

    #[test]
    fn the_verdict_orders_its_reasons_and_the_findings_weigh_as_documented() {
        let decided = compared(&spread(100.0, 200), &spread(150.0, 200), "short");
        let findings = Findings {
            invalid: Vec::new(),
            context: vec!["context".into()],
            caveats: Vec::new(),
            notes: vec!["note".into()],
        };
        let (judged, reasons) = verdict(findings.clone(), std::slice::from_ref(&decided));
        assert_eq!(judged, Verdict::Decided);
        assert_eq!(
            reasons,
            [
                "context",
                "ttft_ms short: nvlink faster by 50.0% [49.9%, 50.1%]",
                "note"
            ]
        );
        // A caveat keeps a decided comparison from deciding the verdict.
        let caveat = Findings {
            caveats: vec!["caveat".into()],
            ..findings.clone()
        };
        let (judged, reasons) = verdict(caveat, std::slice::from_ref(&decided));
        assert_eq!(judged, Verdict::Inconclusive);
        assert_eq!(reasons[1], "caveat");
        // Invalid: why, then the notes, and no comparison.
        let invalid = Findings {
            invalid: vec!["mismatch".into()],
            ..findings.clone()
        };
        assert_eq!(
            verdict(invalid, std::slice::from_ref(&decided)),
            (Verdict::Invalid, vec!["mismatch".into(), "note".into()])
        );
        // No primary comparison decides nothing.
        let mut secondary = decided;
        secondary.primary = false;
        assert_eq!(verdict(findings, &[secondary]).0, Verdict::Inconclusive);
        assert_eq!(verdict_line(Verdict::Decided, &[]), "decided");
    }
}
