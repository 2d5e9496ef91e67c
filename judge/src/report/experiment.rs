//! What `kvab experiment` found, as one value: the `--json` document (docs/experiment.md describes every
//! field), the table on stdout, and the input of the HTML report (with the raw samples beside it).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::comparison::Comparison;
use crate::guardrail::ErrorGuard;
use crate::stats::format_p;
use crate::verdict::{per_arm, verdict_line, Verdict};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    /// Why the verdict is what it is, one sentence each.
    pub reasons: Vec<String>,
    pub arms: Vec<String>,
    pub classes: Vec<Class>,
    pub assignment: Assignment,
    pub errors: Vec<ErrorRates>,
    pub comparisons: Vec<Comparison>,
    pub method: Method,
    pub run: Run,
    /// The prompts' shape and, for a shared-prefix workload, the reuse each arm was sent.
    pub workload: crate::reuse::Workload,
    /// A load sweep (`--concurrency` or `--rate` with several levels): the levels and the arms' curves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<crate::sweep::Sweep>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Class {
    /// The cell's name, as comparisons and error rates name it: the workload class, and in a load sweep
    /// its level (`8192 @ c=16`).
    pub label: String,
    /// In a load sweep: the workload class and the level's index (`sweep.levels`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<usize>,
    /// In a multi-turn workload: the cell's turn (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn: Option<u32>,
    /// The size asked for (`--prompt-tokens`); `null` for prompts from a file.
    pub prompt_tokens: Option<u32>,
    /// Mean `usage.prompt_tokens` the server reported, when it did.
    pub measured_prompt_tokens: Option<f64>,
    /// Measured requests (warm-up excluded).
    pub requests: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Assignment {
    /// Requests assigned to each arm (warm-up excluded).
    pub planned: BTreeMap<String, u64>,
    /// Responses each arm served, by the response's arm tag.
    pub answered: BTreeMap<String, u64>,
    /// Per assigned arm: requests that reached it (answered with its tag, failed too) or got no response
    /// at all; the sample-ratio check compares these with `planned`.
    pub reached: BTreeMap<String, u64>,
    /// Responses served by another arm than assigned (excluded from the timings).
    pub misrouted: u64,
    /// Requests with no response, or a response without an arm tag.
    pub untagged: u64,
    /// p-value of reached against planned (exact binomial for two arms, chi-square otherwise).
    pub srm_p: Option<f64>,
    /// False when `srm_p` is below the sample-ratio threshold: the experiment is invalid.
    pub srm_ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorRates {
    pub class: String,
    /// Per assigned arm: requests, errors (no answer, a non-2xx status, or a broken stream), rate.
    pub arms: BTreeMap<String, ErrorCount>,
    /// Two-proportion z test between the first two arms.
    pub p: Option<f64>,
    /// Error codes seen (`status 503`, `timeout`, ...) and how often, per arm.
    pub codes: BTreeMap<String, BTreeMap<String, u64>>,
    /// The error-rate guardrail of the class (`crate::guardrail::errors`).
    pub guardrail: ErrorGuard,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ErrorCount {
    pub requests: u64,
    pub errors: u64,
    pub rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Method {
    pub alpha: f64,
    pub min_effect: f64,
    /// The tails' relative margin (p90, p99).
    pub tail_margin: f64,
    /// The error guardrail's margin, a difference of error rates.
    pub error_margin: f64,
    /// `--max-time`: where a failed request is ranked in the times to an answer.
    pub max_time_s: f64,
    /// `budget` (one analysis at the end) or `decided` (stop when decided).
    pub until: &'static str,
    /// Analyses planned: 1, or the looks of `--until decided`.
    pub looks: u32,
    /// The looks' levels (`--boundary`): `obrien-fleming`, `pocock` or `always-valid` (with one
    /// analysis, `until` `budget`, it sets nothing).
    pub boundary: crate::sequential::Boundary,
    /// The analyses made before stopping.
    pub looks_made: u32,
    /// The family-wise level of the analysis reported (its look's share of `alpha`:
    /// `crate::sequential`; `alpha` with one analysis).
    pub look_alpha: f64,
    /// The requests of a class per stratum of the tests and intervals (consecutive in measured order;
    /// `kvab_judge::requests::STRATUM`).
    pub stratum: usize,
    pub srm_threshold: f64,
    pub description: &'static str,
}

impl Method {
    /// ` (pocock)`: the boundary of the looks, where there are looks to set (`until` `decided`).
    pub fn boundary_note(&self) -> String {
        match self.until {
            "decided" => format!(" ({})", self.boundary.name()),
            _ => String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub endpoint: String,
    pub stream: bool,
    /// `closed` (a fixed number in flight) or `open` (Poisson arrivals at a rate).
    pub load: &'static str,
    pub concurrency: Option<u32>,
    pub rate: Option<f64>,
    pub seed: u64,
    pub warmup: u64,
    /// Requests sent, warm-up included.
    pub sent: u64,
    pub duration_s: f64,
    /// Measured requests per second over the run.
    pub achieved_rate: f64,
    /// Why the run stopped: `requests`, `duration` or `decided`.
    pub stopped_by: &'static str,
    /// The records file this report was judged from (`--judge-records`); `null` for a live run.
    pub judged_from: Option<String>,
}

/// The raw timings behind the report, for the plots.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub classes: Vec<ClassSamples>,
}

#[derive(Debug, Clone, Default)]
pub struct ClassSamples {
    pub label: String,
    /// Nominal or measured prompt size, for the x axis of "TTFT against prompt size"; `None` for a class
    /// of file prompts without usage.
    pub prompt_tokens: Option<f64>,
    /// In `Report::arms` order; only requests served by their assigned arm.
    pub arms: Vec<ArmSamples>,
}

#[derive(Debug, Clone, Default)]
pub struct ArmSamples {
    pub arm: String,
    pub ttft_ms: Vec<f64>,
    /// Every gap between content events, pooled over requests.
    pub itl_ms: Vec<f64>,
    pub e2e_ms: Vec<f64>,
}

impl Report {
    /// The table printed without `--json`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let [first, second, ..] = self.arms.as_slice() else {
            return out;
        };
        let _ = writeln!(
            out,
            "{:<8} {:<10} {:>7} {:>10} {:>10} {:>8} {:>18} {:>9}  {:<36} {:>10}  tails",
            "metric",
            "class",
            "n",
            format!("p50 {first}"),
            format!("p50 {second}"),
            "ratio",
            "interval",
            "p adj",
            "decision",
            "detectable"
        );
        for c in &self.comparisons {
            let n: u64 = c.n.values().sum();
            let p50 = |arm: &str| c.p50.get(arm).map_or("-".into(), |v| format!("{v:.1}"));
            let decision = format!(
                "{}{}",
                c.decision_text(),
                if c.primary { "" } else { " (secondary)" }
            );
            let _ = writeln!(
                out,
                "{:<8} {:<10} {:>7} {:>10} {:>10} {:>8} {:>18} {:>9}  {:<36} {:>10}  {}",
                c.metric.trim_end_matches("_ms"),
                c.class.as_deref().unwrap_or("-"),
                n,
                p50(first),
                p50(second),
                c.ratio_text(),
                c.ratio_ci_text(),
                c.p_adjusted.map_or("-".into(), format_p),
                decision,
                c.detectable_text(),
                c.tails_text(),
            );
        }
        let a = &self.assignment;
        let _ = writeln!(
            out,
            "\nassignment: planned {}; reached {}; answered {}; misrouted {}; untagged {}; sample ratio p={} ({})",
            per_arm(&a.planned),
            per_arm(&a.reached),
            per_arm(&a.answered),
            a.misrouted,
            a.untagged,
            a.srm_p.map_or("-".into(), format_p),
            if a.srm_ok { "ok" } else { "MISMATCH" }
        );
        for e in &self.errors {
            let rates: Vec<String> = e
                .arms
                .iter()
                .map(|(arm, c)| {
                    format!("{arm} {}/{} ({:.1}%)", c.errors, c.requests, 100.0 * c.rate)
                })
                .collect();
            let _ = writeln!(
                out,
                "errors {}: {}; p={}; guardrail {}",
                e.class,
                rates.join(", "),
                e.p.map_or("-".into(), format_p),
                e.guardrail.summary()
            );
        }
        let _ = writeln!(
            out,
            "run: {} {} requests ({} warm-up) in {:.1} s, {:.1}/s, stopped by {}; {} look(s) of {}{}",
            self.run.sent,
            self.run.endpoint,
            self.run.warmup,
            self.run.duration_s,
            self.run.achieved_rate,
            self.run.stopped_by,
            self.method.looks_made,
            self.method.looks,
            self.method.boundary_note()
        );
        let _ = writeln!(out, "workload: {}", self.workload.text());
        for line in self.workload.reuse_lines() {
            let _ = writeln!(out, "  reuse by construction, {line}");
        }
        out.push_str(&self.sweep_text());
        if let Some(file) = &self.run.judged_from {
            let _ = writeln!(out, "judged from the records in {file} (no traffic sent)");
        }
        let _ = writeln!(out, "verdict: {}", self.verdict_line());
        out
    }

    /// A load sweep's grid: its rows, the workload classes in report order, and per row the index in
    /// `classes` of each level's cell.
    pub fn grid_rows(&self) -> Vec<(String, Vec<Option<usize>>)> {
        let levels = self.sweep.as_ref().map_or(0, |s| s.levels.len());
        let mut rows: Vec<(String, Vec<Option<usize>>)> = Vec::new();
        for (index, class) in self.classes.iter().enumerate() {
            let (Some(name), Some(level)) = (&class.class, class.level) else {
                continue;
            };
            let row = match rows.iter().position(|(n, _)| n == name) {
                Some(row) => row,
                None => {
                    rows.push((name.clone(), vec![None; levels]));
                    rows.len() - 1
                }
            };
            if let Some(cell) = rows
                .get_mut(row)
                .and_then(|(_, cells)| cells.get_mut(level))
            {
                *cell = Some(index);
            }
        }
        rows
    }

    /// The primary comparison of the class (a cell in a load sweep) labelled `label`.
    pub fn primary_of(&self, label: &str) -> Option<&Comparison> {
        self.comparisons
            .iter()
            .find(|c| c.primary && c.class.as_deref() == Some(label))
    }

    /// A load sweep's lines of the table: its levels, the grid and the load curves.
    fn sweep_text(&self) -> String {
        let mut out = String::new();
        let (Some(sweep), [first, second, ..]) = (&self.sweep, self.arms.as_slice()) else {
            return out;
        };
        let _ = writeln!(
            out,
            "{}\nwhere ({second}/{first}, primary metric, ratio [interval] decision):",
            sweep.levels_text()
        );
        let rows = self.grid_rows();
        let width = rows
            .iter()
            .map(|(name, _)| name.chars().count())
            .max()
            .unwrap_or(0);
        for (name, cells) in rows {
            for (level, cell) in sweep.levels.iter().zip(cells) {
                let label = cell
                    .and_then(|i| self.classes.get(i))
                    .map(|c| c.label.as_str());
                let shown = label
                    .and_then(|l| self.primary_of(l))
                    .map_or("-".into(), |c| {
                        format!(
                            "{} {} {}",
                            c.ratio_text(),
                            c.ratio_ci_text(),
                            c.decision_text()
                        )
                    });
                let _ = writeln!(out, "  {name:<width$} {:<8} {shown}", level.label());
            }
        }
        let _ = writeln!(out, "load curves (knee: {}):", sweep.knee_rule);
        for curve in &sweep.curves {
            let class = curve
                .class
                .as_deref()
                .map_or(String::new(), |c| format!(", class {c}"));
            let _ = writeln!(
                out,
                "  {}{class}: knee {}",
                curve.arm,
                sweep.knee_text(curve.knee)
            );
            for (level, p) in sweep.levels.iter().zip(&curve.points) {
                let goodput = p
                    .goodput
                    .map_or(String::new(), |g| format!(", goodput {g:.2}/s"));
                let _ = writeln!(
                    out,
                    "    {:<8} p50 {} ms, p90 {} ms, {:.2}/s, {:.1} in flight, {}/{} answered{goodput}",
                    level.label(),
                    ms_text(p.p50_ms),
                    ms_text(p.p90_ms),
                    p.throughput,
                    p.in_flight,
                    p.answered,
                    p.requests
                );
            }
        }
        out
    }

    pub fn verdict_line(&self) -> String {
        verdict_line(self.verdict, &self.reasons)
    }
}

/// `12.3` milliseconds as the tables show them, `-` without a value.
pub fn ms_text(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.1}"))
}
