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
/// Most classes (as `--prompts`).
const MAX_CLASSES: usize = 64;
/// Most cells (class × load level) of a load sweep.
pub const MAX_CELLS: usize = 256;

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

    /// Measured requests planned: `requests` at each level.
    pub fn planned(&self) -> u64 {
        self.requests * self.levels.len().max(1) as u64
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
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::rngs::ChaCha8Rng;
    use rand::{RngExt, SeedableRng};

    use super::read::{parse, Records};
    use super::*;

    const HEADER: &str = r#"{"kvab_records":1,"arms":["nvlink","fs"],"classes":[{"label":"128","prompt_tokens":128},{"label":"file","prompt_tokens":null}],"stream":true,"endpoint":"/v1/chat/completions","load":"closed","concurrency":8,"rate":null,"seed":3,"warmup":8,"requests":10,"looks":5,"until":"decided","alpha":0.05,"min_effect":0.05,"srm_threshold":0.001,"run":{"sent":18,"skipped":0,"duration_s":1.5,"stopped_by":"requests"}}"#;
    const RECORD: &str = r#"{"number":0,"class":"128","assigned":"nvlink","served":"fs","status":200,"error":null,"ttft_ms":12.5,"itl_ms":[1.25,2.0],"e2e_ms":20.0,"prompt_tokens":130,"output_tokens":3}"#;

    fn parsed(lines: &[&str]) -> Result<Records, String> {
        parse(format!("{}\n", lines.join("\n")).as_bytes(), "f")
    }

    fn error(lines: &[&str]) -> String {
        parsed(lines).unwrap_err()
    }

    #[test]
    fn a_good_file_reads_by_name() {
        let other = RECORD
            .replace("\"number\":0", "\"number\":7")
            .replace("\"128\"", "\"file\"")
            .replace("\"served\":\"fs\"", "\"served\":null")
            .replace("\"error\":null", "\"error\":\"timeout\"");
        // Blank lines and CRLF ends are read too.
        let text = format!("{HEADER}\r\n{RECORD}\n\n{other}");
        let records = parse(text.as_bytes(), "f").unwrap();
        let h = &records.header;
        assert_eq!(h.arms, ["nvlink", "fs"]);
        assert_eq!(h.classes[1].prompt_tokens, None);
        assert_eq!(h.load, LoadSpec::Closed { concurrency: 8 });
        assert_eq!((h.method.until, h.method.looks), (Until::Decided, 5));
        // A file from before the boundaries spent alpha by O'Brien-Fleming.
        assert_eq!(h.method.boundary, Boundary::ObrienFleming);
        assert_eq!(h.run.stopped_by, "requests");
        let (n, o) = &records.outcomes[0];
        assert_eq!(*n, 0);
        assert_eq!((o.class, o.assigned, o.served), (0, 0, Some(1)));
        assert_eq!(
            (o.ttft_ms, o.itl_ms.as_slice(), o.e2e_ms),
            (Some(12.5), &[1.25, 2.0][..], 20.0)
        );
        let (n, o) = &records.outcomes[1];
        assert_eq!((*n, o.class, o.served), (7, 1, None));
        assert_eq!(o.error.as_deref(), Some("timeout"));
    }

    #[test]
    fn bad_lines_are_named_with_their_field() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "f: empty (no header line)"),
            (
                &["{\"arms\":[]}"],
                "f line 1: not a kvab experiment records header",
            ),
            (&["[1]"], "f line 1: not a JSON object"),
            (
                &[&HEADER.replace("\"kvab_records\":1", "\"kvab_records\":2")],
                "f line 1: field `kvab_records`: version 2",
            ),
            (
                &[&HEADER.replace("\"alpha\":0.05", "\"alpha\":1.5")],
                "f line 1: field `alpha`: must be more than 0",
            ),
            (
                &[&HEADER.replace("\"seed\":3,", "")],
                "f line 1: field `seed` is missing",
            ),
            (
                &[&HEADER.replace("\"seed\":3", "\"seed\":3,\"colour\":1")],
                "f line 1: field `colour` is not known",
            ),
            (
                &[&HEADER.replace("\"looks\":5", "\"looks\":5,\"boundary\":\"bonferroni\"")],
                "f line 1: field `boundary`: must be one of obrien-fleming, pocock, always-valid",
            ),
            (
                &[&HEADER.replace("\"nvlink\",\"fs\"", "\"fs\",\"fs\"")],
                "f line 1: field `arms`: names one arm twice",
            ),
            (
                &[&HEADER.replace("\"rate\":null", "\"rate\":3.0")],
                "f line 1: field `load`",
            ),
            (
                &[
                    HEADER,
                    &RECORD.replace("\"assigned\":\"nvlink\"", "\"assigned\":\"gpu\""),
                ],
                "f line 2: field `assigned`: arm \"gpu\" is not one of the header's arms",
            ),
            (
                &[
                    HEADER,
                    &RECORD.replace("\"served\":\"fs\"", "\"served\":\"gpu\""),
                ],
                "f line 2: field `served`: arm \"gpu\"",
            ),
            (
                &[
                    HEADER,
                    &RECORD.replace("\"class\":\"128\"", "\"class\":\"64\""),
                ],
                "f line 2: field `class`: \"64\" is not one of the header's classes",
            ),
            (
                &[HEADER, RECORD, RECORD],
                "f line 3: field `number`: measured request 0 is recorded twice",
            ),
            (
                &[HEADER, &RECORD.replace("\"number\":0", "\"number\":10")],
                "f line 2: field `number`: measured request 10 is beyond the header's 10 requests",
            ),
            (
                &[
                    HEADER,
                    &RECORD.replace("\"ttft_ms\":12.5", "\"ttft_ms\":-1.0"),
                ],
                "f line 2: field `ttft_ms`: must be milliseconds",
            ),
            (
                &[
                    HEADER,
                    &RECORD.replace("\"e2e_ms\":20.0", "\"e2e_ms\":\"fast\""),
                ],
                "f line 2: field `e2e_ms`: invalid type",
            ),
            (
                &[HEADER, &RECORD.replace(",\"output_tokens\":3", "")],
                "f line 2: field `output_tokens` is missing",
            ),
            (&[HEADER, "{\"number\":1"], "f line 2: not a JSON object"),
        ];
        for (lines, expected) in cases {
            let message = error(lines);
            assert!(message.starts_with(expected), "{message:?} for {lines:?}");
        }
    }

    #[test]
    fn a_load_sweep_reads_by_cell_round_trips_and_refuses_bad_levels() {
        let sweep = HEADER
            .replace(
                r#"{"label":"file","prompt_tokens":null}"#,
                r#"{"label":"128","prompt_tokens":128,"level":1}"#,
            )
            .replace(
                r#"{"label":"128","prompt_tokens":128},"#,
                r#"{"label":"128","prompt_tokens":128,"level":0},"#,
            )
            .replace(r#""until":"decided""#, r#""until":"budget""#)
            .replace(
                r#""run":"#,
                r#""levels":[{"concurrency":1,"rate":null,"sent":18,"skipped":0,"measured_s":2.5},{"concurrency":8,"rate":null,"sent":18,"skipped":0,"measured_s":0.5}],"slo":{"ttft_ms":500.0},"run":"#,
            );
        let record = RECORD
            .replace("\"number\":0", "\"number\":15")
            .replace("\"class\":\"128\"", "\"class\":\"128 @ c=8\"");
        let records = parsed(&[&sweep, &record]).unwrap();
        let header = &records.header;
        assert_eq!(header.cell_labels(), ["128 @ c=1", "128 @ c=8"]);
        assert_eq!((header.planned(), header.levels[1].measured_s), (20, 0.5));
        assert_eq!(header.slo.and_then(|s| s.ttft_ms), Some(500.0));
        assert_eq!(
            (records.outcomes[0].0, records.outcomes[0].1.class),
            (15, 1)
        );
        let mut out = Vec::new();
        write_to(&mut out, header, &[]).unwrap();
        assert_eq!(&parse(out.as_slice(), "f").unwrap().header, header);
        let cases = [
            (
                sweep.replace(r#""level":1"#, r#""level":2"#),
                "field `classes`: at most 64",
            ),
            (
                sweep.replace(r#""level":1"#, r#""level":0"#),
                "field `classes`: the class \"128 @ c=1\" is there twice",
            ),
            (
                sweep.replace(
                    r#"{"concurrency":8,"rate":null,"sent""#,
                    r#"{"concurrency":8,"rate":2.0,"sent""#,
                ),
                "field `levels`: each level",
            ),
            (
                sweep.replace(r#""ttft_ms":500.0"#, r#""ttft_ms":-1.0"#),
                "field `slo`: wants one or more",
            ),
            (
                sweep.replace(r#","level":0"#, ""),
                "field `classes`: at most 64",
            ),
        ];
        for (header, expected) in cases {
            let message = error(&[&header]);
            assert!(
                message.starts_with(&format!("f line 1: {expected}")),
                "{message}"
            );
        }
        let beyond = record.replace("\"number\":15", "\"number\":20");
        assert!(error(&[&sweep, &beyond]).contains("beyond the header's 20 requests"));
    }

    #[test]
    fn a_line_over_the_cap_is_refused_by_its_number() {
        let long = format!("{HEADER}\n{}\n", " ".repeat(MAX_LINE_BYTES + 1));
        assert_eq!(
            parse(long.as_bytes(), "f").unwrap_err(),
            format!("f line 2: longer than {MAX_LINE_BYTES} bytes")
        );
        // At the cap exactly, the line is read (a blank one here).
        let at_cap = format!("{HEADER}\n{}\n", " ".repeat(MAX_LINE_BYTES));
        assert!(parse(at_cap.as_bytes(), "f").is_ok());
    }

    #[test]
    fn the_file_appears_whole_at_the_end_and_no_temporary_file_stays() {
        let dir = std::env::temp_dir().join(format!("kvab-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.jsonl");
        let header = parse(format!("{HEADER}\n").as_bytes(), "f").unwrap().header;
        let pending = Pending::create(&path).unwrap();
        assert!(!path.exists(), "nothing at the path while the run goes on");
        let slots = vec![None, Some(Outcome::default())];
        pending.finish(&header, &slots).unwrap();
        let records = read(&path).unwrap();
        assert_eq!(records.header, header);
        assert_eq!(records.outcomes, vec![(1, Outcome::default())]);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["run.jsonl"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_f64_reads_back_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let header = parse(format!("{HEADER}\n").as_bytes(), "f").unwrap().header;
        let mut slots = Vec::new();
        for i in 0..2000 {
            // Uniform bits (every finite non-negative f64) and timings as the clock gives them.
            let bits = f64::from_bits(rng.random::<u64>() >> 2);
            let clock = f64::from(rng.random_range(0..10_000_000u32)) / 1e6 * 1000.0;
            slots.push(Some(Outcome {
                class: i % 2,
                assigned: i % 2,
                served: Some(i % 2),
                ttft_ms: Some(bits),
                itl_ms: vec![clock, bits / 3.0],
                e2e_ms: clock * 1.000_000_1,
                ..Outcome::default()
            }));
        }
        let mut header = header;
        header.requests = 2000;
        header.run.duration_s = 1.0 / 3.0;
        let mut out = Vec::new();
        write_to(&mut out, &header, &slots).unwrap();
        let records = parse(out.as_slice(), "f").unwrap();
        assert_eq!(records.header, header);
        for (n, outcome) in &records.outcomes {
            let expected = slots[*n as usize].as_ref().unwrap();
            assert_eq!(outcome, expected, "record {n}");
            assert_eq!(
                outcome.ttft_ms.map(f64::to_bits),
                expected.ttft_ms.map(f64::to_bits)
            );
        }
    }
}
