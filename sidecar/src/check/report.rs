//! The report: one row per named check (expected, measured, result, diagnosis), the overall verdict and its
//! exit code, rendered as a table for people or as JSON for machines.

use std::fmt::Write as _;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Not applicable in this mode, or turned off; neutral for the verdict.
    Skip,
    Pass,
    /// Not enough evidence either way (e.g. no traffic observed). Never counted as a pass.
    Inconclusive,
    Fail,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Skip => "skip",
            Outcome::Pass => "pass",
            Outcome::Inconclusive => "inconclusive",
            Outcome::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// Stable name, `<step>/<what>`, e.g. `step3/header-nvlink`.
    pub name: String,
    pub expected: String,
    pub measured: String,
    pub result: Outcome,
    /// Why it is off and what to look at (the runbook's "Common Failure Signals" where one applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<String>,
}

impl Check {
    pub fn new(
        name: &str,
        expected: impl Into<String>,
        measured: impl Into<String>,
        result: Outcome,
    ) -> Self {
        Self {
            name: name.to_string(),
            expected: expected.into(),
            measured: measured.into(),
            result,
            diagnosis: None,
        }
    }

    pub fn diagnosis(mut self, text: impl Into<String>) -> Self {
        self.diagnosis = Some(text.into());
        self
    }

    /// A diagnosis only when the check did not pass.
    pub fn diagnosis_unless_pass(self, text: impl Into<String>) -> Self {
        if matches!(self.result, Outcome::Pass | Outcome::Skip) {
            self
        } else {
            self.diagnosis(text)
        }
    }
}

/// The runbook's "Common Failure Signals", quoted in diagnoses.
pub mod signals {
    pub const RESOURCE_EXHAUSTED: &str =
        "failure signal 1 (InferencePoolResourceExhausted; ResourceExhausted since GAIE v1.5.0): usually a proxy \
        label mismatch or a proxy metrics endpoint that is unavailable";
    pub const METRICS_404: &str =
        "failure signal 2 (proxy /metrics returns 404): the active-request-scorer cannot \
        score endpoints; fix the proxy script / metrics pass-through";
    pub const NO_TRAFFIC: &str =
        "failure signal 3 (one proxy never gets traffic): check the labels on the proxy \
        pods and the EPP's label selector filter (label-selector-filter, formerly by-label-selector)";
    pub const HEADER_MISMATCH: &str =
        "failure signal 4 (header A/B mismatch): verify httproute-ab.yaml and the \
        ReferenceGrant in llm-d-vllm";
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    pub verdict: Outcome,
    pub exit_code: u8,
    pub checks: Vec<Check>,
    /// Per-arm latency figures and the Mann-Whitney comparison, when the burst produced them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ab: Option<serde_json::Value>,
}

impl Report {
    pub fn new(mode: &str, checks: Vec<Check>, ab: Option<serde_json::Value>) -> Self {
        let verdict = verdict(&checks);
        Self {
            mode: mode.to_string(),
            verdict,
            exit_code: exit_code(verdict),
            checks,
            ab,
        }
    }
}

/// Any failure fails; otherwise anything inconclusive (or nothing judged at all) is inconclusive.
pub fn verdict(checks: &[Check]) -> Outcome {
    let worst = checks
        .iter()
        .map(|c| c.result)
        .max()
        .unwrap_or(Outcome::Skip);
    match worst {
        Outcome::Skip => Outcome::Inconclusive,
        other => other,
    }
}

pub fn exit_code(verdict: Outcome) -> u8 {
    match verdict {
        Outcome::Pass => 0,
        Outcome::Fail => 1,
        Outcome::Inconclusive | Outcome::Skip => 2,
    }
}

/// The table a person reads. Long cells wrap inside their column so the table stays aligned.
pub fn render_table(report: &Report) -> String {
    const WIDTHS: [usize; 4] = [27, 32, 46, 12];
    let mut out = String::new();
    let header = ["check", "expected", "measured", "result"];
    let row = |cells: [&str; 4], out: &mut String| {
        let wrapped: Vec<Vec<String>> = cells
            .iter()
            .zip(WIDTHS)
            .map(|(cell, width)| wrap(cell, width))
            .collect();
        let lines = wrapped.iter().map(Vec::len).max().unwrap_or(1);
        for i in 0..lines {
            let mut line = String::new();
            for (column, width) in wrapped.iter().zip(WIDTHS) {
                let text = column.get(i).map(String::as_str).unwrap_or("");
                let _ = write!(line, "{text:width$}  ");
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    };
    row(header, &mut out);
    let rule: String = WIDTHS.iter().map(|w| "-".repeat(*w) + "  ").collect();
    let _ = writeln!(out, "{}", rule.trim_end());
    for check in &report.checks {
        row(
            [
                &check.name,
                &check.expected,
                &check.measured,
                check.result.label(),
            ],
            &mut out,
        );
        if let Some(diagnosis) = &check.diagnosis {
            for line in wrap(diagnosis, WIDTHS.iter().sum::<usize>() - 4) {
                let _ = writeln!(out, "    -> {line}");
            }
        }
    }
    let counts = [
        Outcome::Pass,
        Outcome::Fail,
        Outcome::Inconclusive,
        Outcome::Skip,
    ]
    .map(|o| {
        format!(
            "{} {}",
            report.checks.iter().filter(|c| c.result == o).count(),
            o.label().to_lowercase()
        )
    });
    let _ = writeln!(
        out,
        "\nverdict: {} ({}; exit {})",
        report.verdict.label().to_uppercase(),
        counts.join(", "),
        report.exit_code
    );
    out
}

/// Greedy word wrap; words longer than the width are cut.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let mut word = word.to_string();
        loop {
            let current = lines.last_mut();
            let Some(current) = current else { break };
            let needed = if current.is_empty() {
                word.chars().count()
            } else {
                current.chars().count() + 1 + word.chars().count()
            };
            if needed <= width {
                if !current.is_empty() {
                    current.push(' ');
                }
                current.push_str(&word);
                break;
            }
            if current.is_empty() {
                let head: String = word.chars().take(width).collect();
                word = word.chars().skip(width).collect();
                current.push_str(&head);
                lines.push(String::new());
                if word.is_empty() {
                    break;
                }
            } else {
                lines.push(String::new());
            }
        }
    }
    if lines.len() > 1 && lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    lines
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn check(result: Outcome) -> Check {
        Check::new("x/y", "e", "m", result)
    }

    #[test]
    fn the_worst_result_decides_and_skips_are_neutral() {
        assert_eq!(
            verdict(&[check(Outcome::Pass), check(Outcome::Skip)]),
            Outcome::Pass
        );
        assert_eq!(
            verdict(&[check(Outcome::Pass), check(Outcome::Inconclusive)]),
            Outcome::Inconclusive
        );
        assert_eq!(
            verdict(&[check(Outcome::Inconclusive), check(Outcome::Fail)]),
            Outcome::Fail
        );
        assert_eq!(
            verdict(&[check(Outcome::Skip)]),
            Outcome::Inconclusive,
            "nothing judged is no pass"
        );
        assert_eq!(verdict(&[]), Outcome::Inconclusive);
        assert_eq!(exit_code(Outcome::Pass), 0);
        assert_eq!(exit_code(Outcome::Fail), 1);
        assert_eq!(exit_code(Outcome::Inconclusive), 2);
    }

    #[test]
    fn the_table_wraps_cells_and_shows_diagnoses() {
        let report = Report::new(
            "local",
            vec![
                Check::new(
                    "step1/direct-fs",
                    "200, id names vllm-prefill-fs",
                    "404 from http://127.0.0.1:18102/v1/completions",
                    Outcome::Fail,
                )
                .diagnosis("the FS proxy does not serve completions"),
                check(Outcome::Pass).diagnosis_unless_pass("never shown"),
            ],
            None,
        );
        let table = render_table(&report);
        assert!(table.starts_with("check "), "{table}");
        assert!(
            table.contains("    -> the FS proxy does not serve completions"),
            "{table}"
        );
        assert!(!table.contains("never shown"));
        assert!(
            table.contains("verdict: FAIL (1 pass, 1 fail, 0 inconclusive, 0 skip; exit 1)"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .all(|l| l.chars().count() <= 27 + 32 + 46 + 12 + 6),
            "{table}"
        );
    }

    #[test]
    fn wrapping_keeps_words_and_cuts_only_overlong_ones() {
        assert_eq!(wrap("a bb ccc", 4), ["a bb", "ccc"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("", 4), [""]);
    }
}
