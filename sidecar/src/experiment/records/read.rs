//! Reading a records file back (`--judge-records`): every line checked, bad input refused with one line
//! naming the file, the line and the field.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{
    ClassSpec, Header, LevelSpec, LoadSpec, MethodSpec, RunFacts, DEFAULT_ERROR_MARGIN,
    DEFAULT_MAX_TIME_S, DEFAULT_TAIL_MARGIN, MAX_CELLS, MAX_FILE_BYTES, MAX_LINE_BYTES,
    MAX_MEASURED, VERSION,
};
use crate::experiment::looks::Until;
use crate::experiment::measure::Outcome;
use kvab_judge::reuse::Shape;
use kvab_judge::sequential::Boundary;
use kvab_judge::sweep::{Slo, MAX_LEVELS};

/// A records file read back: the header, and each measured request's outcome with its number, in file
/// order.
#[derive(Debug, Clone)]
pub struct Records {
    pub header: Header,
    pub outcomes: Vec<(u64, Outcome)>,
}

/// Reads and checks a records file (`--judge-records`).
pub fn read(path: &Path) -> Result<Records, String> {
    let name = format!("--judge-records {}", path.display());
    let file = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let size = file.metadata().map_err(|e| format!("{name}: {e}"))?.len();
    if size > MAX_FILE_BYTES {
        return Err(format!(
            "{name}: {size} bytes, more than the {MAX_FILE_BYTES} a records file may have"
        ));
    }
    parse(BufReader::new(file), &name)
}

/// Reads records from `reader`; errors name `name` and the line.
pub fn parse(reader: impl BufRead, name: &str) -> Result<Records, String> {
    let mut reader = reader.take(MAX_FILE_BYTES + 1);
    let mut line = Vec::new();
    let mut number = 0usize;
    let mut total = 0u64;
    let mut header: Option<Header> = None;
    let mut outcomes = Vec::new();
    // Measured numbers seen, one flag each (below the header's planned requests, at most MAX_MEASURED).
    let mut seen: Vec<bool> = Vec::new();
    // The cells' labels, as the records name their class.
    let mut labels: Vec<String> = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 2)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("{name}: {e}"))?;
        if read == 0 {
            break;
        }
        number += 1;
        total += read as u64;
        if total > MAX_FILE_BYTES {
            return Err(format!(
                "{name}: more than the {MAX_FILE_BYTES} bytes a records file may have"
            ));
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        if line.len() > MAX_LINE_BYTES {
            return Err(format!(
                "{name} line {number}: longer than {MAX_LINE_BYTES} bytes"
            ));
        }
        let at = |what: String| format!("{name} line {number}: {what}");
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let object: Map<String, Value> =
            serde_json::from_slice(&line).map_err(|e| at(format!("not a JSON object: {e}")))?;
        let mut fields = Fields { object };
        match &header {
            None => {
                let read = read_header(&mut fields).map_err(at)?;
                labels = read.cell_labels();
                header = Some(read);
            }
            Some(header) => {
                let (n, outcome) = read_record(&mut fields, header, &labels).map_err(at)?;
                // `n` < requests ≤ 10,000,000 (read_record): the flags stay small.
                let index = n as usize;
                if seen.len() <= index {
                    seen.resize(index + 1, false);
                }
                if std::mem::replace(&mut seen[index], true) {
                    return Err(at(format!(
                        "field `number`: measured request {n} is recorded twice"
                    )));
                }
                outcomes.push((n, outcome));
            }
        }
    }
    let Some(header) = header else {
        return Err(format!("{name}: empty (no header line)"));
    };
    Ok(Records { header, outcomes })
}

/// The fields of one line, taken one by one; those left over are unknown.
struct Fields {
    object: Map<String, Value>,
}

impl Fields {
    fn take<T: DeserializeOwned>(&mut self, field: &str) -> Result<T, String> {
        let value = self
            .object
            .remove(field)
            .ok_or_else(|| format!("field `{field}` is missing"))?;
        serde_json::from_value(value).map_err(|e| format!("field `{field}`: {e}"))
    }

    /// A field written since a later kvab: `default` when the line does not have it.
    fn take_or<T: DeserializeOwned>(&mut self, field: &str, default: T) -> Result<T, String> {
        match self.object.contains_key(field) {
            true => self.take(field),
            false => Ok(default),
        }
    }

    fn finish(&self) -> Result<(), String> {
        match self.object.keys().next() {
            Some(field) => Err(format!("field `{field}` is not known")),
            None => Ok(()),
        }
    }
}

fn check(ok: bool, field: &str, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("field `{field}`: {what}"))
    }
}

fn open_fraction(fields: &mut Fields, field: &str) -> Result<f64, String> {
    let value: f64 = fields.take(field)?;
    check(
        value > 0.0 && value < 1.0,
        field,
        "must be more than 0 and less than 1",
    )?;
    Ok(value)
}

fn read_header(fields: &mut Fields) -> Result<Header, String> {
    let Some(version) = fields.object.remove("kvab_records") else {
        return Err(
            "not a kvab experiment records header (no \"kvab_records\" field; the first line is the header)"
                .into(),
        );
    };
    if version.as_u64() != Some(VERSION) {
        return Err(format!(
            "field `kvab_records`: version {version} is not one this kvab reads (it reads {VERSION})"
        ));
    }
    let arms: Vec<String> = fields.take("arms")?;
    check(arms.len() == 2, "arms", "wants exactly two arms")?;
    check(
        arms.iter().all(|a| !a.is_empty() && a.trim() == a),
        "arms",
        "an arm name is empty or has spaces around it",
    )?;
    check(arms[0] != arms[1], "arms", "names one arm twice")?;
    let classes: Vec<ClassSpec> = fields.take("classes")?;
    check(!classes.is_empty(), "classes", "wants 1 to 64 classes")?;
    for class in &classes {
        check(
            !class.label.is_empty() && class.label.chars().count() <= 64,
            "classes",
            "a label must have 1 to 64 characters",
        )?;
    }
    let stream: bool = fields.take("stream")?;
    let endpoint: String = fields.take("endpoint")?;
    check(endpoint.starts_with('/'), "endpoint", "must be a path")?;
    let load: String = fields.take("load")?;
    let concurrency: Option<u32> = fields.take("concurrency")?;
    let rate: Option<f64> = fields.take("rate")?;
    let load = match (load.as_str(), concurrency, rate) {
        ("closed", Some(concurrency), None) => {
            check(
                (1..=4096).contains(&concurrency),
                "concurrency",
                "must be 1 to 4096",
            )?;
            LoadSpec::Closed { concurrency }
        }
        ("open", None, Some(rate)) => {
            check(
                rate > 0.0 && rate <= 100_000.0,
                "rate",
                "must be more than 0 and at most 100000",
            )?;
            LoadSpec::Open { rate }
        }
        _ => {
            return Err(
                "field `load`: `closed` with a `concurrency` and a null `rate`, or `open` with a `rate` \
                 and a null `concurrency`"
                    .into(),
            )
        }
    };
    let seed: u64 = fields.take("seed")?;
    let warmup: u64 = fields.take("warmup")?;
    check(warmup <= 100_000, "warmup", "must be at most 100000")?;
    let requests: u64 = fields.take("requests")?;
    check(
        (2..=10_000_000).contains(&requests),
        "requests",
        "must be 2 to 10000000",
    )?;
    let looks: u32 = fields.take("looks")?;
    check((1..=100).contains(&looks), "looks", "must be 1 to 100")?;
    let until = match fields.take::<String>("until")?.as_str() {
        "budget" => Until::Budget,
        "decided" => Until::Decided,
        _ => return Err("field `until`: must be \"budget\" or \"decided\"".into()),
    };
    // Written since the boundaries came; a file from before spent alpha by O'Brien-Fleming.
    let boundary: String = fields.take_or("boundary", Boundary::ObrienFleming.name().into())?;
    let boundary =
        crate::args::boundary(&boundary).map_err(|e| format!("field `boundary`: {e}"))?;
    let alpha = open_fraction(fields, "alpha")?;
    let min_effect = open_fraction(fields, "min_effect")?;
    // Written since the guardrails came; a file from before has the defaults of the flags it ran with.
    let max_time_s = fields.take_or("max_time_s", DEFAULT_MAX_TIME_S)?;
    let in_range = max_time_s > 0.0 && max_time_s <= 86_400.0;
    check(
        in_range,
        "max_time_s",
        "must be more than 0 and at most 86400",
    )?;
    let tail_margin = fields.take_or("tail_margin", DEFAULT_TAIL_MARGIN)?;
    let error_margin = fields.take_or("error_margin", DEFAULT_ERROR_MARGIN)?;
    for (field, value) in [("tail_margin", tail_margin), ("error_margin", error_margin)] {
        check(
            value > 0.0 && value < 1.0,
            field,
            "must be more than 0 and less than 1",
        )?;
    }
    let srm_threshold = open_fraction(fields, "srm_threshold")?;
    let run: RunFacts = fields.take("run")?;
    check(
        run.duration_s.is_finite() && run.duration_s >= 0.0,
        "run",
        "duration_s must be a number of seconds, 0 or more",
    )?;
    check(
        matches!(run.stopped_by.as_str(), "requests" | "duration" | "decided"),
        "run",
        "stopped_by must be \"requests\", \"duration\" or \"decided\"",
    )?;
    // Written by a load sweep.
    let levels: Vec<LevelSpec> = fields.take_or("levels", Vec::new())?;
    check(
        levels.len() <= MAX_LEVELS,
        "levels",
        "a sweep has at most 16 levels",
    )?;
    for level in &levels {
        let load_ok = match (level.concurrency, level.rate) {
            (Some(c), None) => (1..=4096).contains(&c),
            (None, Some(rate)) => rate > 0.0 && rate <= 100_000.0,
            _ => false,
        };
        check(
            load_ok,
            "levels",
            "each level has a concurrency of 1 to 4096 or a rate over 0 and at most 100000, not both",
        )?;
        check(
            level.measured_s.is_finite() && level.measured_s >= 0.0,
            "levels",
            "measured_s must be a number of seconds, 0 or more",
        )?;
    }
    let cells_ok = if levels.is_empty() {
        classes.len() <= MAX_CELLS && classes.iter().all(|c| c.level.is_none())
    } else {
        classes.len() <= MAX_CELLS
            && classes
                .iter()
                .all(|c| c.level.is_some_and(|l| l < levels.len()))
    };
    check(
        cells_ok,
        "classes",
        "at most 256 cells, in a load sweep each with the index of one of the `levels`",
    )?;
    // Written since the workloads came; a file from before had unique prompts.
    let shapes: Vec<Shape> = match fields.take_or::<Option<Shape>>("workload", None)? {
        Some(shape) => vec![shape],
        None => fields.take_or("workloads", vec![Shape::Unique])?,
    };
    let sizes: Option<Vec<u32>> = classes.iter().map(|c| c.prompt_tokens).collect();
    for shape in &shapes {
        shape
            .check(sizes.as_deref())
            .map_err(|e| format!("field `workload`: {e}"))?;
    }
    let one_unit = shapes.iter().filter(|s| s.turns() > 1).count() == 0 || shapes.len() == 1;
    let indexed = classes.iter().all(|c| {
        c.workload.unwrap_or(0) < shapes.len() && (shapes.len() > 1) == c.workload.is_some()
    });
    check(
        !shapes.is_empty() && shapes.len() <= 3 && one_unit && indexed,
        "workloads",
        "one to three shapes (a multi-turn one alone), each class naming its own with several",
    )?;
    let slo: Option<Slo> = fields.take_or("slo", None)?;
    let slo_ok = slo.is_none_or(|s| {
        let targets = [s.ttft_ms, s.itl_ms, s.e2e_ms];
        targets.iter().any(Option::is_some)
            && targets
                .iter()
                .flatten()
                .all(|ms| *ms > 0.0 && ms.is_finite())
    });
    check(
        slo_ok,
        "slo",
        "wants one or more targets, each a number of milliseconds over 0",
    )?;
    fields.finish()?;
    let header = Header {
        arms,
        classes,
        stream,
        endpoint,
        load,
        seed,
        warmup,
        requests,
        max_time_s,
        method: MethodSpec {
            alpha,
            min_effect,
            tail_margin,
            error_margin,
            until,
            looks: if until == Until::Budget { 1 } else { looks },
            boundary,
            srm_threshold,
        },
        run,
        levels,
        slo,
        shapes,
    };
    check(
        header.planned() <= MAX_MEASURED,
        "requests",
        "times the turns and the levels is more than the 10000000 measured requests a run may have",
    )?;
    let mut cells = HashSet::new();
    for label in header.cell_labels() {
        if !cells.insert(label.clone()) {
            return Err(format!(
                "field `classes`: the class {label:?} is there twice"
            ));
        }
    }
    Ok(header)
}

fn milliseconds(value: f64) -> bool {
    value.is_finite() && value >= 0.0
}

fn read_record(
    fields: &mut Fields,
    header: &Header,
    labels: &[String],
) -> Result<(u64, Outcome), String> {
    let number: u64 = fields.take("number")?;
    check(
        number < header.planned(),
        "number",
        &format!(
            "measured request {number} is beyond the header's {} requests",
            header.planned()
        ),
    )?;
    let arm =
        |field: &str, name: &str| {
            header.arms.iter().position(|a| a == name).ok_or_else(|| {
                format!("field `{field}`: arm {name:?} is not one of the header's arms")
            })
        };
    let class: String = fields.take("class")?;
    let class = labels
        .iter()
        .position(|c| *c == class)
        .ok_or_else(|| format!("field `class`: {class:?} is not one of the header's classes"))?;
    let assigned = arm("assigned", &fields.take::<String>("assigned")?)?;
    let served = match fields.take::<Option<String>>("served")? {
        Some(name) => Some(arm("served", &name)?),
        None => None,
    };
    let status: Option<u16> = fields.take("status")?;
    let error: Option<String> = fields.take("error")?;
    let ttft_ms: Option<f64> = fields.take("ttft_ms")?;
    check(
        ttft_ms.is_none_or(milliseconds),
        "ttft_ms",
        "must be milliseconds, 0 or more",
    )?;
    let itl_ms: Vec<f64> = fields.take("itl_ms")?;
    check(
        itl_ms.iter().copied().all(milliseconds),
        "itl_ms",
        "must be milliseconds, 0 or more",
    )?;
    let e2e_ms: f64 = fields.take("e2e_ms")?;
    check(
        milliseconds(e2e_ms),
        "e2e_ms",
        "must be milliseconds, 0 or more",
    )?;
    let prompt_tokens: Option<u64> = fields.take("prompt_tokens")?;
    let output_tokens: Option<u64> = fields.take("output_tokens")?;
    // Written for a shared-prefix workload.
    let group: Option<u32> = fields.take_or("group", None)?;
    let groups = match header.classes.get(class).map(|c| header.shape_of(c)) {
        Some(Shape::SharedPrefix { groups, .. }) => groups,
        _ => 0,
    };
    check(
        group.is_none_or(|g| g < groups),
        "group",
        "wants a group of the header's shared-prefix workload",
    )?;
    fields.finish()?;
    Ok((
        number,
        Outcome {
            class,
            assigned,
            served,
            status,
            error,
            ttft_ms,
            itl_ms,
            e2e_ms,
            prompt_tokens,
            output_tokens,
            group,
        },
    ))
}
