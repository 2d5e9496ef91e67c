//! The per-request records of `kvab experiment`: written by a live run with `--records FILE`, judged
//! again without traffic by `--judge-records FILE` (docs/experiment.md, "Records").
//!
//! JSON Lines: a header line (`{"kvab_records": 1, ...}`: the design, the method and the run facts),
//! then one line per measured request received, in measured order. Arms and classes are written by name.
//! Floats are written in their shortest form that reads back to the same `f64` (serde_json with
//! `float_roundtrip`), so a judged file gives the live run's figures exactly.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::looks::Until;
use super::measure::Outcome;
use kvab_judge::requests::Design;
use kvab_judge::reuse::{turns_of, Shape};
use kvab_judge::sequential::Boundary;
use kvab_judge::sweep::{Level, Slo};

pub mod read;
pub use read::read;

/// The format version this kvab writes and reads (`kvab_records`).
pub const VERSION: u64 = 1;

/// The defaults of `--tail-margin` and `--error-margin`, and of `--max-time` in seconds: also what a
/// records file written before these were recorded is judged with.
pub const DEFAULT_TAIL_MARGIN: f64 = 0.25;
pub const DEFAULT_ERROR_MARGIN: f64 = 0.02;
pub const DEFAULT_MAX_TIME_S: f64 = 60.0;
/// Largest records file read: 1 GiB.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Longest line read (its end not counted): 4 MiB (a request's inter-token gaps at the largest
/// --max-tokens, 65536, take under 2 MiB).
pub const MAX_LINE_BYTES: usize = 4 << 20;
/// Most cells of a run (classes × workloads × a conversation's turns × load levels).
pub const MAX_CELLS: usize = 256;
/// Most measured requests of a run (all levels, every turn): what a records file may number.
pub const MAX_MEASURED: u64 = 10_000_000;

/// A class of the design, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSpec {
    pub label: String,
    /// The size asked for (`--prompt-tokens`); `null` for prompts from a file.
    pub prompt_tokens: Option<u32>,
    /// In a load sweep: the cell's level, an index into the header's `levels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<usize>,
    /// In a multi-turn workload: the cell's turn (1-based); the label names it (`1024 turn 2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<u32>,
    /// With several workloads: the class's, an index into the header's `workloads`; the label names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<usize>,
}

/// A load sweep's level, as recorded: its load and what the run did at it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelSpec {
    pub concurrency: Option<u32>,
    pub rate: Option<f64>,
    /// Requests sent at this level, warm-up included.
    pub sent: u64,
    /// Open loop: arrivals skipped at --max-in-flight.
    pub skipped: u64,
    /// From the first measured request sent to the last answer received.
    pub measured_s: f64,
}

impl LevelSpec {
    /// The judge's form of the level.
    pub fn level(&self) -> Level {
        Level {
            load: if self.rate.is_some() {
                "open"
            } else {
                "closed"
            },
            concurrency: self.concurrency,
            rate: self.rate,
            measured_s: self.measured_s,
            sent: self.sent,
            skipped: self.skipped,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadSpec {
    Closed { concurrency: u32 },
    Open { rate: f64 },
}

/// The method: what `--judge-records` may change.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MethodSpec {
    pub alpha: f64,
    pub min_effect: f64,
    pub tail_margin: f64,
    pub error_margin: f64,
    pub until: Until,
    /// Planned analyses: 1 with `--until budget`.
    pub looks: u32,
    /// The looks' levels (`--boundary`).
    pub boundary: Boundary,
    pub srm_threshold: f64,
}

/// `--judge-records`: the file, the output, and the method flags given (`None`: the recorded value).
#[derive(Debug, Clone)]
pub struct JudgeOptions {
    pub file: PathBuf,
    pub json: bool,
    pub html: Option<PathBuf>,
    pub alpha: Option<f64>,
    pub min_effect: Option<f64>,
    pub tail_margin: Option<f64>,
    pub error_margin: Option<f64>,
    pub until: Option<Until>,
    pub looks: Option<u32>,
    pub boundary: Option<Boundary>,
    pub srm_threshold: Option<f64>,
    /// A load sweep's SLO instead of the recorded one.
    pub slo: Option<Slo>,
}

impl JudgeOptions {
    /// The method of the judgement: each flag given replaces the recorded value. `--looks` not given keeps
    /// the recorded looks when the recorded run looked at its results as it went (`--until decided`), and
    /// is 10 (its default) otherwise; with `--until budget` there is one analysis.
    pub fn method(&self, recorded: MethodSpec) -> MethodSpec {
        let until = self.until.unwrap_or(recorded.until);
        let looks = match (until, self.looks, recorded.until) {
            (Until::Budget, _, _) => 1,
            (Until::Decided, Some(looks), _) => looks,
            (Until::Decided, None, Until::Decided) => recorded.looks,
            (Until::Decided, None, Until::Budget) => DEFAULT_LOOKS,
        };
        MethodSpec {
            alpha: self.alpha.unwrap_or(recorded.alpha),
            min_effect: self.min_effect.unwrap_or(recorded.min_effect),
            tail_margin: self.tail_margin.unwrap_or(recorded.tail_margin),
            error_margin: self.error_margin.unwrap_or(recorded.error_margin),
            until,
            looks,
            boundary: self.boundary.unwrap_or(recorded.boundary),
            srm_threshold: self.srm_threshold.unwrap_or(recorded.srm_threshold),
        }
    }
}

/// The default of `--looks`.
pub const DEFAULT_LOOKS: u32 = 10;

/// What the run did, beyond its outcomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFacts {
    /// Requests sent, warm-up included.
    pub sent: u64,
    /// Open loop: arrivals skipped at --max-in-flight.
    pub skipped: u64,
    pub duration_s: f64,
    /// `requests`, `duration` or `decided`.
    pub stopped_by: String,
}

/// Everything the judgement needs that is not per request.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub arms: Vec<String>,
    pub classes: Vec<ClassSpec>,
    pub stream: bool,
    pub endpoint: String,
    pub load: LoadSpec,
    pub seed: u64,
    pub warmup: u64,
    pub requests: u64,
    /// `--max-time` in seconds: where a failed request is ranked.
    pub max_time_s: f64,
    pub method: MethodSpec,
    pub run: RunFacts,
    /// A load sweep's levels in the order they ran (empty: one level, `load`); `requests` and `warmup`
    /// are each level's.
    pub levels: Vec<LevelSpec>,
    /// A load sweep's `--slo`.
    pub slo: Option<Slo>,
    /// The synthetic prompts' shapes (`--workload`): one, or several (each class names its own).
    pub shapes: Vec<Shape>,
}

impl Header {
    /// The cells' names, in class order: the class label, and in a load sweep its level (`8192 @ c=16`).
    pub fn cell_labels(&self) -> Vec<String> {
        let level = |c: &ClassSpec| c.level.and_then(|l| self.levels.get(l));
        self.classes
            .iter()
            .map(|c| match level(c) {
                Some(level) => format!("{} @ {}", c.label, level.level().label()),
                None => c.label.clone(),
            })
            .collect()
    }

    /// Measured requests planned: `requests` units at each level, each unit a request or a conversation's
    /// turns.
    pub fn planned(&self) -> u64 {
        self.requests * u64::from(turns_of(&self.shapes)) * self.levels.len().max(1) as u64
    }

    /// The shape of class `c`'s prompts.
    pub fn shape_of(&self, class: &ClassSpec) -> Shape {
        let index = class.workload.unwrap_or(0);
        self.shapes.get(index).copied().unwrap_or_default()
    }

    /// What the analysis needs of it.
    pub fn design(&self) -> Design {
        Design {
            arms: self.arms.clone(),
            classes: self.cell_labels(),
            prompt_tokens: self.classes.iter().map(|c| c.prompt_tokens).collect(),
            stream: self.stream,
            // The experiment's α: the looks spend it (`looks::Looks`).
            look_alpha: self.method.alpha,
            min_effect: self.method.min_effect,
            srm_threshold: self.method.srm_threshold,
            max_time_ms: 1000.0 * self.max_time_s,
            tail_margin: self.method.tail_margin,
            error_margin: self.method.error_margin,
            stratum: kvab_judge::requests::STRATUM,
            // A conversation was assigned, not its later turns.
            unit_start: self
                .classes
                .iter()
                .map(|c| c.turn.is_none_or(|t| t == 1))
                .collect(),
        }
    }
}

fn until_word(until: Until) -> &'static str {
    match until {
        Until::Budget => "budget",
        Until::Decided => "decided",
    }
}

/// The header line as written, in this field order.
#[derive(Serialize)]
struct HeaderLine<'a> {
    kvab_records: u64,
    arms: &'a [String],
    classes: &'a [ClassSpec],
    stream: bool,
    endpoint: &'a str,
    load: &'static str,
    concurrency: Option<u32>,
    rate: Option<f64>,
    seed: u64,
    warmup: u64,
    requests: u64,
    max_time_s: f64,
    looks: u32,
    until: &'static str,
    boundary: Boundary,
    alpha: f64,
    min_effect: f64,
    tail_margin: f64,
    error_margin: f64,
    srm_threshold: f64,
    run: &'a RunFacts,
    #[serde(skip_serializing_if = "<[LevelSpec]>::is_empty")]
    levels: &'a [LevelSpec],
    #[serde(skip_serializing_if = "Option::is_none")]
    slo: Option<Slo>,
    /// One shape but unique prompts': `workload`; several: `workloads`.
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<Shape>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workloads: Option<&'a [Shape]>,
}

/// One measured request, as written.
#[derive(Serialize)]
struct RecordLine<'a> {
    number: u64,
    class: &'a str,
    assigned: &'a str,
    served: Option<&'a str>,
    status: Option<u16>,
    error: Option<&'a str>,
    ttft_ms: Option<f64>,
    itl_ms: &'a [f64],
    e2e_ms: f64,
    prompt_tokens: Option<u64>,
    output_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<u32>,
}

fn name(names: &[String], i: usize) -> &str {
    names.get(i).map(String::as_str).unwrap_or("")
}

/// Writes the header and one line per outcome (`slots[i]` is measured request `i`).
pub fn write_to(
    out: &mut impl Write,
    header: &Header,
    slots: &[Option<Outcome>],
) -> std::io::Result<()> {
    let (load, concurrency, rate) = match header.load {
        LoadSpec::Closed { concurrency } => ("closed", Some(concurrency), None),
        LoadSpec::Open { rate } => ("open", None, Some(rate)),
    };
    let line = HeaderLine {
        kvab_records: VERSION,
        arms: &header.arms,
        classes: &header.classes,
        stream: header.stream,
        endpoint: &header.endpoint,
        load,
        concurrency,
        rate,
        seed: header.seed,
        warmup: header.warmup,
        requests: header.requests,
        max_time_s: header.max_time_s,
        looks: header.method.looks,
        until: until_word(header.method.until),
        boundary: header.method.boundary,
        alpha: header.method.alpha,
        min_effect: header.method.min_effect,
        tail_margin: header.method.tail_margin,
        error_margin: header.method.error_margin,
        srm_threshold: header.method.srm_threshold,
        run: &header.run,
        levels: &header.levels,
        slo: header.slo,
        workload: match header.shapes.as_slice() {
            [Shape::Unique] | [] => None,
            [shape] => Some(*shape),
            _ => None,
        },
        workloads: (header.shapes.len() > 1).then_some(header.shapes.as_slice()),
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")?;
    let labels = header.cell_labels();
    for (number, outcome) in slots.iter().enumerate() {
        let Some(o) = outcome else { continue };
        let record = RecordLine {
            number: number as u64,
            class: name(&labels, o.class),
            assigned: name(&header.arms, o.assigned),
            served: o.served.map(|s| name(&header.arms, s)),
            status: o.status,
            error: o.error.as_deref(),
            ttft_ms: o.ttft_ms,
            itl_ms: &o.itl_ms,
            e2e_ms: o.e2e_ms,
            prompt_tokens: o.prompt_tokens,
            output_tokens: o.output_tokens,
            group: o.group,
        };
        serde_json::to_writer(&mut *out, &record)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// A records file being written: its temporary file beside `path` (`FILE.<pid>.tmp`), created before the
/// run sends anything (a path that cannot be written stops the command before the traffic), filled and
/// renamed to `path` at the end, so a reader never sees half a file.
pub struct Pending {
    file: std::fs::File,
    temporary: PathBuf,
    path: PathBuf,
}

impl Pending {
    pub fn create(path: &Path) -> Result<Pending, String> {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(format!(".{}.tmp", std::process::id()));
        let temporary = PathBuf::from(temporary);
        let file = std::fs::File::create(&temporary)
            .map_err(|e| format!("cannot write --records {}: {e}", path.display()))?;
        Ok(Pending {
            file,
            temporary,
            path: path.to_path_buf(),
        })
    }

    /// Writes the header and the records, then renames the file into place.
    pub fn finish(self, header: &Header, slots: &[Option<Outcome>]) -> Result<(), String> {
        let Pending {
            file,
            temporary,
            path,
        } = self;
        let mut out = std::io::BufWriter::new(file);
        let written = write_to(&mut out, header, slots)
            .and_then(|()| out.into_inner().map_err(|e| e.into_error()))
            .and_then(|file| file.sync_all())
            .and_then(|()| std::fs::rename(&temporary, &path));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&temporary);
            format!("cannot write --records {}: {e}", path.display())
        })
    }
}

#[cfg(test)]
mod tests;
