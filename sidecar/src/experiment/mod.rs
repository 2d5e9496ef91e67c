//! `kvab experiment`: a randomized A/B of the arms through the gateway, with a verdict (docs/experiment.md).
//!
//! `options` (the command line), `workload` (classes, prompts, bodies), `assign` (balanced randomized
//! blocks), `load` (closed or open loop, one request's measurement), `measure` (server-sent events to
//! timings), `looks` (the sequential looks, no I/O: the one procedure of the live run and of
//! `--judge-records`), `records` (the per-request records file: `--records`, `--judge-records`). The
//! statistics, the decisions, the verdict and the report (JSON, table, HTML) are the `kvab-judge`
//! crate's (`requests`, `comparison`, `verdict`, `report::experiment`, `report::html`). Here: the run,
//! the judgement of a records file, the progress line and the exit status.

pub mod assign;
mod conversation;
pub mod load;
pub mod looks;
pub mod measure;
pub mod options;
mod progress;
pub mod records;
mod sharegpt;
pub mod workload;

use std::process::ExitCode;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cluster;
use crate::output::{self, Failure};
use kvab_judge::report::{experiment as report, html};
use kvab_judge::requests as analysis;
use kvab_judge::reuse::{self, turns_of, Workload};
use kvab_judge::stats::format_p;
use kvab_judge::sweep::Cell;
use kvab_judge::verdict::per_arm;
use kvab_judge::{Findings, Verdict};
use kvab_serve::client::HttpClient;

use analysis::{Analysis, Design};
use looks::{End, Looks};
use measure::Outcome;
use options::{ExperimentArgs, JudgeOptions, Load, Options, Plan, Until};
use progress::Progress;
use records::{ClassSpec, Header, LevelSpec, LoadSpec, MethodSpec, RunFacts};
use report::{Class, Method, Report, Run, Samples};

/// How the method is described in the report (docs/experiment.md has the full account).
const METHOD: &str = "randomized balanced blocks per class; every assigned request counts (a failure ranked \
                      worst, at max_time); strata of consecutive requests per class (stratum) shared by both \
                      arms; the ratio of the arms' times from the stratified Hodges-Lehmann shift of log \
                      times with its distribution-free interval (van Elteren's stratified Mann-Whitney); \
                      Holm across all comparisons; \
                      faster needs the interval at the Holm level beyond 1+min_effect; equivalent needs the \
                      1-2*alpha interval inside the margin (two one-sided tests) and every guardrail within; \
                      guardrails: p90 and p99 (order-statistic intervals, tail_margin) and the error rate \
                      (Newcombe's score interval, error_margin); each look at the level of its boundary \
                      (method.boundary): alpha spent over the looks by the Lan-DeMets O'Brien-Fleming-type \
                      or Pocock-type function, or the always-valid normal-mixture confidence sequence";

pub fn main(args: ExperimentArgs) -> ExitCode {
    output::run("experiment", experiment(args))
}

async fn experiment(args: ExperimentArgs) -> Result<ExitCode, Failure> {
    let plan = Options::from_args(args).map_err(Failure::Usage)?;
    let (json, html_path) = match &plan {
        Plan::Live(options) => (options.json, options.html.as_deref()),
        Plan::Judge(judge) => (judge.json, judge.html.as_deref()),
    };
    let (report, samples) = match &plan {
        Plan::Live(options) => run(options).await,
        Plan::Judge(judge) => judge_records(judge),
    }
    .map_err(Failure::Run)?;
    let html = html_path.map(|path| (path, html::render(&report, &samples)));
    output::emit(&report, report.verdict, json, || report.table(), html)
}

/// The records header of a live run: its design and method (the run facts are filled in at the end).
/// In a load sweep each class is a cell at each level, the levels in the order they run.
fn header(options: &Options, classes: &[workload::Class]) -> Header {
    let sweep = options.levels.len() > 1;
    let levels: Vec<Option<usize>> = match sweep {
        true => (0..options.levels.len()).map(Some).collect(),
        false => vec![None],
    };
    let turns: Vec<Option<u32>> = match turns_of(&options.shapes) {
        1 => vec![None],
        turns => (1..=turns).map(Some).collect(),
    };
    let turns = &turns;
    let (shapes, several) = (&options.shapes, options.shapes.len() > 1);
    let load_spec = |load: &Load| match *load {
        Load::Closed { concurrency } => LoadSpec::Closed { concurrency },
        Load::Open { rate, .. } => LoadSpec::Open { rate },
    };
    Header {
        arms: options.arms.clone(),
        // Each class at each level, and in a multi-turn workload at each turn.
        classes: levels
            .iter()
            .flat_map(|&level| {
                classes.iter().flat_map(move |c| {
                    turns.iter().map(move |&turn| ClassSpec {
                        label: match turn {
                            Some(turn) => format!("{} turn {turn}", c.label),
                            None => c.label.clone(),
                        },
                        prompt_tokens: c.prompt_tokens,
                        level,
                        turn,
                        workload: several
                            .then(|| shapes.iter().position(|s| *s == c.shape))
                            .flatten(),
                    })
                })
            })
            .collect(),
        stream: options.stream,
        endpoint: options.path.clone(),
        load: options
            .levels
            .first()
            .map_or(LoadSpec::Closed { concurrency: 1 }, load_spec),
        seed: options.seed,
        warmup: options.warmup,
        requests: options.requests,
        max_time_s: options.max_time.as_secs_f64(),
        method: MethodSpec {
            alpha: options.alpha,
            min_effect: options.min_effect,
            tail_margin: options.tail_margin,
            error_margin: options.error_margin,
            until: options.until,
            looks: options.looks,
            boundary: options.boundary,
            srm_threshold: options.srm_threshold,
        },
        run: RunFacts {
            sent: 0,
            skipped: 0,
            duration_s: 0.0,
            stopped_by: String::new(),
        },
        levels: match sweep {
            true => options
                .levels
                .iter()
                .map(|load| {
                    let (concurrency, rate) = match load_spec(load) {
                        LoadSpec::Closed { concurrency } => (Some(concurrency), None),
                        LoadSpec::Open { rate } => (None, Some(rate)),
                    };
                    LevelSpec {
                        concurrency,
                        rate,
                        sent: 0,
                        skipped: 0,
                        measured_s: 0.0,
                    }
                })
                .collect(),
            false => Vec::new(),
        },
        slo: options.slo,
        shapes: options.shapes.clone(),
    }
}

async fn run(options: &Options) -> Result<(Report, Samples), String> {
    let classes = workload::classes(options)?;
    let mut header = header(options, &classes);
    if header.classes.len() > records::MAX_CELLS {
        return Err(format!(
            "{} cells (classes × workloads × turns × load levels): a run has at most {}",
            header.classes.len(),
            records::MAX_CELLS
        ));
    }
    // The records' temporary file next: a path that cannot be written stops before any traffic.
    let pending = options
        .records
        .as_deref()
        .map(records::Pending::create)
        .transpose()?;
    let (_forward, gateway) = match &options.gateway_url {
        Some(url) => (None, url.clone()),
        None => {
            let cluster = cluster::Cluster::connect().await?;
            let forward = cluster
                .forward_service(
                    &options.gateway_namespace,
                    &options.gateway_service.name,
                    options.gateway_service.port,
                )
                .await?;
            let url = forward.url.clone();
            (Some(forward), url)
        }
    };
    let design = header.design();
    let started = Instant::now();
    // The looks (looks.rs) take each answer by its measured number (the level's offset + request number −
    // warm-up), in the order the answers come; `--judge-records` replays the same procedure over the
    // records.
    let mut looks = Looks::new(
        design.clone(),
        header.planned(),
        options.until,
        options.looks,
        options.boundary,
    );
    let mut progress = Progress::new(options, &design, started, header.planned());
    let (mut sent, mut skipped, mut decided) = (0, 0, false);
    for (level, load) in options.levels.iter().enumerate() {
        let generator = load::Generator::new(options, classes.clone(), &gateway, level as u64);
        let shared = load::Run::new(
            generator,
            HttpClient::new(options.max_time),
            Instant::now() + options.duration,
            options.warmup,
        );
        let (sender, mut receiver) = mpsc::unbounded_channel::<(u64, Outcome)>();
        let mut senders = load::start(shared.clone(), options, load, sender);
        // Measured requests: a conversation's turns each (--warmup and --requests count conversations).
        let per_unit = u64::from(turns_of(&options.shapes));
        let (warmup, requests) = (options.warmup * per_unit, options.requests * per_unit);
        let offset = level as u64 * requests;
        let mut last_answer = None;
        while let Some((number, outcome)) = receiver.recv().await {
            let Some(index) = number.checked_sub(warmup) else {
                continue;
            };
            if index >= requests {
                continue;
            }
            last_answer = Some(Instant::now());
            progress.observe(&outcome, &design);
            decided = looks.receive(offset + index, outcome, |look, analysis| {
                progress.look(look, analysis)
            });
            progress.update(looks.received());
            if decided {
                shared.stop.store(true, Ordering::Relaxed);
                senders.abort_all();
                break;
            }
        }
        while senders.join_next().await.is_some() {}
        let (level_sent, level_skipped) = (
            shared.sent.load(Ordering::Relaxed),
            shared.skipped.load(Ordering::Relaxed),
        );
        (sent, skipped) = (sent + level_sent, skipped + level_skipped);
        if let Some(facts) = header.levels.get_mut(level) {
            facts.sent = level_sent;
            facts.skipped = level_skipped;
            facts.measured_s = match (shared.measuring_since.get(), last_answer) {
                (Some(&since), Some(last)) => last.saturating_duration_since(since).as_secs_f64(),
                _ => 0.0,
            };
        }
        if decided {
            break;
        }
    }
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    let ended = looks.finish();
    header.run = RunFacts {
        sent,
        skipped,
        duration_s: elapsed,
        stopped_by: match ended.end {
            End::Decided => "decided",
            End::Complete => "requests",
            End::Short => "duration",
        }
        .to_string(),
    };
    if let Some(pending) = pending {
        pending.finish(&header, looks.slots())?;
    }
    let samples = analysis::samples(&design, &ended.analysis, &ended.analyzed);
    let report = assemble(&header, &design, ended, &header.run.stopped_by, None);
    Ok((report, samples))
}

/// `--judge-records`: the records' header with the method flags given, and the look procedure of the live
/// run replayed over the records.
fn judge_records(judge: &JudgeOptions) -> Result<(Report, Samples), String> {
    let records = records::read(&judge.file)?;
    let mut header = records.header;
    let recorded = header.method;
    header.method = judge.method(recorded);
    if !header.levels.is_empty() && header.method.until == Until::Decided {
        return Err(
            "these records are a load sweep, which runs every level to its budget: judge them \
                    with --until budget"
                .into(),
        );
    }
    if judge.slo.is_some() {
        if header.levels.is_empty() {
            return Err("--slo applies to a load sweep; these records have one load level".into());
        }
        header.slo = judge.slo;
    }
    let design = header.design();
    let ended = replay(&header, records.outcomes);
    let stopped_by = match ended.end {
        End::Decided => "decided",
        End::Complete => "requests",
        // The records end where the run stopped: its time budget, or its own decision.
        End::Short if header.run.stopped_by == "decided" => "decided",
        End::Short => "duration",
    };
    let samples = analysis::samples(&design, &ended.analysis, &ended.analyzed);
    let undecided_replay = ended.end != End::Decided && stopped_by == "decided";
    let mut report = assemble(
        &header,
        &design,
        ended,
        stopped_by,
        Some(judge.file.display().to_string()),
    );
    if undecided_replay {
        report.reasons.push(format!(
            "the records end where the recorded run stopped, decided by its own method (alpha {}, min effect \
             {}, {} look(s)); this method did not decide at any look before",
            recorded.alpha, recorded.min_effect, recorded.looks
        ));
    }
    Ok((report, samples))
}

/// The looks over recorded outcomes, in measured order (the same procedure as the live run's, which
/// takes them in the order they come: what each look sees does not depend on it).
pub fn replay(header: &Header, mut outcomes: Vec<(u64, Outcome)>) -> looks::Ended {
    outcomes.sort_by_key(|(number, _)| *number);
    let mut looks = Looks::new(
        header.design(),
        header.planned(),
        header.method.until,
        header.method.looks,
        header.method.boundary,
    );
    for (number, outcome) in outcomes {
        if looks.receive(number, outcome, |_, _| {}) {
            break;
        }
    }
    looks.finish()
}

fn assemble(
    header: &Header,
    design: &Design,
    ended: looks::Ended,
    stopped_by: &str,
    judged_from: Option<String>,
) -> Report {
    // The analysis was made at its look's level.
    let design = &Design {
        look_alpha: ended.level,
        ..design.clone()
    };
    let analysis = ended.analysis;
    let facts = &header.run;
    let measured = ended.analyzed.len() as u64;
    let (verdict, reasons) = verdict(design, &analysis);
    let mut reasons = reasons;
    if facts.skipped > 0 {
        reasons.push(format!(
            "{} arrivals skipped: --max-in-flight requests were in flight (the open loop did not hold its rate)",
            facts.skipped
        ));
    }
    let (concurrency, rate, load) = match (header.load, header.levels.is_empty()) {
        // A load sweep's levels are the sweep's.
        (LoadSpec::Closed { .. }, false) => (None, None, "closed"),
        (LoadSpec::Open { .. }, false) => (None, None, "open"),
        (LoadSpec::Closed { concurrency }, true) => (Some(concurrency), None, "closed"),
        (LoadSpec::Open { rate }, true) => (None, Some(rate), "open"),
    };
    let method = header.method;
    let cell_labels = header.cell_labels();
    let reuse_cells: Vec<reuse::Cell> = header
        .classes
        .iter()
        .zip(&cell_labels)
        .map(|(c, label)| reuse::Cell {
            label: label.clone(),
            class: c.label.clone(),
            prompt_tokens: c.prompt_tokens,
            turn: c.turn,
            shape: header.shape_of(c),
        })
        .collect();
    let sweep = (!header.levels.is_empty()).then(|| {
        let cells: Vec<Cell> = header
            .classes
            .iter()
            .map(|c| Cell {
                class: c.label.clone(),
                level: c.level.unwrap_or(usize::MAX),
            })
            .collect();
        kvab_judge::sweep::sweep(
            header.levels.iter().map(LevelSpec::level).collect(),
            &cells,
            &header.arms,
            &ended.analyzed,
            header.slo,
            header.stream,
            1000.0 * header.max_time_s,
        )
    });
    Report {
        verdict,
        reasons,
        arms: header.arms.clone(),
        classes: header
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| Class {
                label: cell_labels.get(i).cloned().unwrap_or_default(),
                class: c.level.map(|_| c.label.clone()),
                level: c.level,
                turn: c.turn,
                prompt_tokens: c.prompt_tokens,
                measured_prompt_tokens: analysis.measured_prompt_tokens.get(i).copied().flatten(),
                requests: analysis.requests_per_class.get(i).copied().unwrap_or(0),
            })
            .collect(),
        assignment: analysis.assignment,
        errors: analysis.errors,
        comparisons: analysis.comparisons,
        method: Method {
            alpha: method.alpha,
            min_effect: method.min_effect,
            tail_margin: method.tail_margin,
            error_margin: method.error_margin,
            max_time_s: header.max_time_s,
            until: match method.until {
                Until::Budget => "budget",
                Until::Decided => "decided",
            },
            looks: method.looks,
            boundary: method.boundary,
            looks_made: ended.looks_made,
            look_alpha: design.look_alpha,
            stratum: design.stratum,
            srm_threshold: method.srm_threshold,
            description: METHOD,
        },
        run: Run {
            endpoint: header.endpoint.clone(),
            stream: header.stream,
            load,
            concurrency,
            rate,
            seed: header.seed,
            warmup: header.warmup,
            sent: facts.sent,
            duration_s: facts.duration_s,
            achieved_rate: if facts.duration_s > 0.0 {
                measured as f64 / facts.duration_s
            } else {
                0.0
            },
            stopped_by: stopped_word(stopped_by),
            judged_from,
        },
        sweep,
        workload: Workload {
            shapes: header.shapes.clone(),
            reuse: reuse::reuse(&reuse_cells, &header.arms, &ended.analyzed),
        },
    }
}

/// The report's word for why the run stopped.
fn stopped_word(stopped_by: &str) -> &'static str {
    match stopped_by {
        "decided" => "decided",
        "duration" => "duration",
        _ => "requests",
    }
}

/// What the run shows besides its comparisons, for the one verdict rule (`kvab_judge::verdict`): nothing
/// counted or a sample-ratio mismatch makes it invalid; misrouted answers and differing error rates are
/// noted.
fn verdict(design: &Design, analysis: &Analysis) -> (Verdict, Vec<String>) {
    let a = &analysis.assignment;
    let mut findings = Findings::default();
    let counted: u64 = analysis
        .comparisons
        .iter()
        .filter(|c| c.primary)
        .flat_map(|c| c.n.values())
        .sum();
    if counted == 0 {
        findings
            .invalid
            .push("no request was answered by its assigned arm without error".into());
    } else if !a.srm_ok {
        // An answer without a known arm's tag did not reach its arm as far as kvab can tell: when there are
        // any, the mismatch may be theirs.
        let untagged = if a.untagged > 0 {
            format!(
                "; {} request(s) without a tagged answer (no response headers, or no known arm in the tag)",
                a.untagged
            )
        } else {
            String::new()
        };
        findings.invalid.push(format!(
            "sample-ratio mismatch: reached {} of planned {} (p={}): the routing does not follow the \
             assignment{untagged}",
            per_arm(&a.reached),
            per_arm(&a.planned),
            a.srm_p.map_or("-".into(), format_p)
        ));
    }
    if a.misrouted > 0 {
        findings.notes.push(format!(
            "{} response(s) served by another arm than assigned (excluded from the timings)",
            a.misrouted
        ));
    }
    for e in &analysis.errors {
        if e.p.is_some_and(|p| p < design.look_alpha) {
            let rates: Vec<String> = e
                .arms
                .iter()
                .map(|(arm, c)| format!("{arm} {:.1}%", 100.0 * c.rate))
                .collect();
            findings.notes.push(format!(
                "error rates differ in class {}: {}",
                e.class,
                rates.join(", ")
            ));
        }
    }
    kvab_judge::verdict::verdict(findings, &analysis.comparisons)
}
