//! What `kvab experiment` found, as one value: the `--json` document (docs/experiment.md describes every
//! field), the table on stdout, and the input of the HTML report (with the raw samples beside it).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

pub use kvab_judge::stats::format_p;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every primary comparison is `faster` or `equivalent`, and the assignment checks passed.
    Decided,
    /// At least one primary comparison is undecided.
    Inconclusive,
    /// The run cannot be trusted (sample-ratio mismatch, no answers): no comparison is a finding.
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

/// The output of `kvab experiment` and `kvab analyze`: the HTML report (through a temporary file, so a
/// reader never sees half of it), then the JSON or the table on stdout; the exit status is the verdict's.
pub fn emit<T: Serialize>(
    command: &str,
    report: &T,
    verdict: Verdict,
    json: bool,
    table: impl FnOnce() -> String,
    html: Option<(&std::path::Path, String)>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    if let Some((path, page)) = html {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        if let Err(e) =
            std::fs::write(&temporary, page).and_then(|()| std::fs::rename(&temporary, path))
        {
            eprintln!(
                "kvab {command}: cannot write --html {}: {e}",
                path.display()
            );
            return ExitCode::from(3);
        }
    }
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("kvab {command}: cannot encode the report: {e}");
                return ExitCode::from(3);
            }
        }
    } else {
        print!("{}", table());
    }
    ExitCode::from(verdict.exit_code())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Faster,
    Equivalent,
    Inconclusive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Metric {
    #[serde(rename = "ttft_ms")]
    Ttft,
    #[serde(rename = "itl_ms")]
    Itl,
    #[serde(rename = "tpot_ms")]
    Tpot,
    #[serde(rename = "e2e_ms")]
    E2e,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Ttft => "ttft_ms",
            Metric::Itl => "itl_ms",
            Metric::Tpot => "tpot_ms",
            Metric::E2e => "e2e_ms",
        }
    }
}

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
}

#[derive(Debug, Clone, Serialize)]
pub struct Class {
    pub label: String,
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
    /// Responses served by another arm than assigned (excluded from the timings).
    pub misrouted: u64,
    /// Requests with no response, or a response without an arm tag.
    pub untagged: u64,
    /// p-value of answered against planned (exact binomial for two arms, chi-square otherwise).
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
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ErrorCount {
    pub requests: u64,
    pub errors: u64,
    pub rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub metric: Metric,
    pub class: String,
    /// Primary comparisons decide the verdict (time to first token; end-to-end when not streaming).
    pub primary: bool,
    pub n: BTreeMap<String, u64>,
    pub p50: BTreeMap<String, f64>,
    pub p90: BTreeMap<String, f64>,
    pub p99: BTreeMap<String, f64>,
    /// Hodges–Lehmann shift, second arm minus first arm (positive: the first arm is faster).
    pub shift_ms: Option<f64>,
    /// Its distribution-free interval at `1 − ci_level_alpha`.
    pub ci_ms: Option<[f64; 2]>,
    pub ci_level_alpha: f64,
    /// `shift_ms` relative to the first arm's median.
    pub relative: Option<f64>,
    /// `ci_ms` relative to the first arm's median.
    pub relative_ci: Option<[f64; 2]>,
    /// Mann-Whitney U two-sided p-value, and after Holm's correction across every comparison.
    pub p: Option<f64>,
    pub p_adjusted: Option<f64>,
    pub decision: Decision,
    pub faster: Option<String>,
    /// For an inconclusive comparison: an estimate of the further measured requests (both arms, this
    /// class) the interval needs to decide; `null` when no estimate can be made.
    pub more_requests: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Method {
    pub alpha: f64,
    pub min_effect: f64,
    /// `budget` (one analysis at the end) or `decided` (stop when decided).
    pub until: &'static str,
    /// Analyses planned: 1, or the looks of `--until decided`.
    pub looks: u32,
    /// The analyses made before stopping.
    pub looks_made: u32,
    /// The family-wise level of each analysis: `alpha / looks`.
    pub look_alpha: f64,
    pub srm_threshold: f64,
    pub description: &'static str,
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
            "{:<8} {:<10} {:>7} {:>10} {:>10} {:>10} {:>22} {:>8} {:>9}  decision",
            "metric",
            "class",
            "n",
            format!("p50 {first}"),
            format!("p50 {second}"),
            "shift",
            "interval",
            "rel",
            "p adj"
        );
        for c in &self.comparisons {
            let n: u64 = c.n.values().sum();
            let p50 = |arm: &str| c.p50.get(arm).map_or("-".into(), |v| format!("{v:.1}"));
            let decision = c.decision_text();
            let _ = writeln!(
                out,
                "{:<8} {:<10} {:>7} {:>10} {:>10} {:>10} {:>22} {:>8} {:>9}  {}{}",
                c.metric.name().trim_end_matches("_ms"),
                c.class,
                n,
                p50(first),
                p50(second),
                c.shift_ms.map_or("-".into(), |v| format!("{v:+.2}")),
                c.ci_ms
                    .map_or("-".into(), |[lo, hi]| format!("[{lo:+.2}, {hi:+.2}]")),
                c.relative
                    .map_or("-".into(), |v| format!("{:+.1}%", 100.0 * v)),
                c.p_adjusted.map_or("-".into(), format_p),
                decision,
                if c.primary { "" } else { " (secondary)" },
            );
        }
        let a = &self.assignment;
        let _ = writeln!(
            out,
            "\nassignment: planned {}; answered {}; misrouted {}; untagged {}; sample ratio p={} ({})",
            per_arm(&a.planned),
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
                "errors {}: {}; p={}",
                e.class,
                rates.join(", "),
                e.p.map_or("-".into(), format_p)
            );
        }
        let _ = writeln!(
            out,
            "run: {} {} requests ({} warm-up) in {:.1} s, {:.1}/s, stopped by {}; {} look(s) of {}",
            self.run.sent,
            self.run.endpoint,
            self.run.warmup,
            self.run.duration_s,
            self.run.achieved_rate,
            self.run.stopped_by,
            self.method.looks_made,
            self.method.looks
        );
        if let Some(file) = &self.run.judged_from {
            let _ = writeln!(out, "judged from the records in {file} (no traffic sent)");
        }
        let _ = writeln!(out, "verdict: {}", self.verdict_line());
        out
    }

    pub fn verdict_line(&self) -> String {
        verdict_line(self.verdict, &self.reasons)
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

impl Comparison {
    /// `nvlink faster`, `equivalent`, `inconclusive (~N more requests)`.
    pub fn decision_text(&self) -> String {
        match (self.decision, &self.faster) {
            (Decision::Faster, Some(arm)) => format!("{arm} faster"),
            (Decision::Equivalent, _) => "equivalent".into(),
            _ => match self.more_requests {
                Some(more) => format!("inconclusive (~{more} more requests)"),
                None => "inconclusive".into(),
            },
        }
    }
}
