//! `kvab experiment`: a randomized A/B of the arms through the gateway, with a verdict (docs/experiment.md).
//!
//! `options` (the command line), `workload` (classes, prompts, bodies), `assign` (balanced randomized
//! blocks), `load` (closed or open loop, one request's measurement), `measure` (server-sent events to
//! timings), `analysis` (the statistics and decisions, no I/O), `report` (JSON and table), `html` (the
//! report with plots). Here: the run, its looks, the progress line and the exit status.

pub mod analysis;
pub mod assign;
pub mod html;
pub mod load;
pub mod measure;
pub mod options;
pub mod report;
pub mod workload;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::check::kube;
use kvab_serve::client::HttpClient;

use analysis::{Analysis, Design};
use measure::Outcome;
use options::{ExperimentArgs, Load, Options, Until};
use report::{Class, Method, Report, Run, Samples, Verdict};

/// How the method is described in the report (docs/experiment.md has the full account).
const METHOD: &str = "randomized balanced blocks per class; Hodges-Lehmann shift with its distribution-free \
                      (Mann-Whitney) interval; Holm across all comparisons; faster needs the interval to exclude 0 \
                      and a shift of at least min_effect; equivalent needs the interval inside ±min_effect; \
                      each analysis at alpha/looks (union bound over the planned looks)";

pub fn main(args: ExperimentArgs) -> ExitCode {
    let options = match Options::from_args(args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("error: {message}\n\nFor more information, try 'kvab experiment --help'.");
            return ExitCode::from(3);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kvab experiment: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let (report, samples) = match runtime.block_on(run(&options)) {
        Ok(done) => done,
        Err(message) => {
            eprintln!("kvab experiment: {message}");
            return ExitCode::from(3);
        }
    };
    let html = options
        .html
        .as_deref()
        .map(|path| (path, html::render(&report, &samples)));
    report::emit(
        "experiment",
        &report,
        report.verdict,
        options.json,
        || report.table(),
        html,
    )
}

/// The measured request counts at which `--until decided` analyses: `looks` evenly spaced points.
pub fn look_points(requests: u64, looks: u32) -> Vec<u64> {
    (1..=u64::from(looks))
        .map(|k| (k * requests).div_ceil(u64::from(looks)))
        .collect()
}

async fn run(options: &Options) -> Result<(Report, Samples), String> {
    let classes = workload::classes(options)?;
    let (_forward, gateway) = match &options.gateway_url {
        Some(url) => (None, url.clone()),
        None => {
            let cluster = kube::Cluster::connect().await?;
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
    let design = Design {
        arms: options.arms.clone(),
        classes: classes.iter().map(|c| c.label.clone()).collect(),
        prompt_tokens: classes.iter().map(|c| c.prompt_tokens).collect(),
        stream: options.stream,
        look_alpha: options.alpha / f64::from(options.looks),
        min_effect: options.min_effect,
        srm_threshold: options.srm_threshold,
    };
    let started = Instant::now();
    let generator = load::Generator::new(options, classes.clone(), &gateway);
    let shared = load::Run::new(
        generator,
        HttpClient::new(options.max_time),
        started + options.duration,
    );
    let (sender, mut receiver) = mpsc::unbounded_channel::<(u64, Outcome)>();
    let mut senders = load::start(shared.clone(), options, sender);

    // Outcomes by measured number (request number − warm-up); a look analyses the first n of them once
    // all n are in, so what a look sees is fixed by the assignment order, not by which answers came first.
    // The slots grow with the answers (a large --requests reserves nothing up front).
    let total = options.requests as usize;
    let mut slots: Vec<Option<Outcome>> = Vec::new();
    let mut complete_prefix = 0usize;
    let mut received = 0usize;
    let points = match options.until {
        Until::Decided => look_points(options.requests, options.looks),
        Until::Budget => Vec::new(),
    };
    let mut next_point = 0usize;
    let mut looks_made = 0u32;
    let mut decided: Option<(Analysis, usize)> = None;
    let mut progress = Progress::new(options, &design, started);
    while let Some((number, outcome)) = receiver.recv().await {
        let Some(index) = number.checked_sub(options.warmup) else {
            continue;
        };
        let index = index as usize;
        if index >= total {
            continue;
        }
        if slots.len() <= index {
            slots.resize(index + 1, None);
        }
        progress.observe(&outcome, &design);
        slots[index] = Some(outcome);
        received += 1;
        while slots.get(complete_prefix).is_some_and(Option::is_some) {
            complete_prefix += 1;
        }
        progress.update(received);
        while let Some(&point) = points.get(next_point) {
            if (complete_prefix as u64) < point {
                break;
            }
            next_point += 1;
            looks_made += 1;
            let prefix: Vec<Outcome> = slots[..point as usize].iter().flatten().cloned().collect();
            let analysis = analysis::analyze(&design, &prefix);
            progress.look(looks_made, &analysis);
            if analysis.decided() && analysis.assignment.srm_ok {
                decided = Some((analysis, point as usize));
                break;
            }
        }
        if decided.is_some() {
            shared.stop.store(true, Ordering::Relaxed);
            senders.abort_all();
            break;
        }
    }
    while senders.join_next().await.is_some() {}
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    // The slots the analysis saw: the deciding look's prefix, or every answer.
    let (analysis, analyzed, stopped_by) = match decided {
        Some((analysis, point)) => (analysis, point, "decided"),
        None => {
            let outcomes: Vec<Outcome> = slots.iter().flatten().cloned().collect();
            // The final analysis counts as a look when the run ended before its last one.
            if options.until == Until::Decided && next_point < points.len() {
                looks_made += 1;
            }
            let stopped_by = if outcomes.len() >= total {
                "requests"
            } else {
                "duration"
            };
            (
                analysis::analyze(&design, &outcomes),
                slots.len(),
                stopped_by,
            )
        }
    };
    let outcomes: Vec<Outcome> = slots[..analyzed.min(slots.len())]
        .iter()
        .flatten()
        .cloned()
        .collect();
    let samples = analysis::samples(&design, &analysis, &outcomes);
    let report = assemble(
        options,
        &design,
        &classes,
        analysis,
        looks_made.max(1),
        RunFacts {
            sent: shared.sent.load(Ordering::Relaxed),
            skipped: shared.skipped.load(Ordering::Relaxed),
            measured: outcomes.len() as u64,
            elapsed,
            stopped_by,
        },
    );
    Ok((report, samples))
}

struct RunFacts {
    sent: u64,
    skipped: u64,
    measured: u64,
    elapsed: f64,
    stopped_by: &'static str,
}

fn assemble(
    options: &Options,
    design: &Design,
    classes: &[workload::Class],
    analysis: Analysis,
    looks_made: u32,
    facts: RunFacts,
) -> Report {
    let (verdict, reasons) = verdict(design, &analysis);
    let mut reasons = reasons;
    if facts.skipped > 0 {
        reasons.push(format!(
            "{} arrivals skipped: --max-in-flight requests were in flight (the open loop did not hold its rate)",
            facts.skipped
        ));
    }
    let (concurrency, rate, load) = match options.load {
        Load::Closed { concurrency } => (Some(concurrency), None, "closed"),
        Load::Open { rate, .. } => (None, Some(rate), "open"),
    };
    Report {
        verdict,
        reasons,
        arms: options.arms.clone(),
        classes: classes
            .iter()
            .enumerate()
            .map(|(i, c)| Class {
                label: c.label.clone(),
                prompt_tokens: c.prompt_tokens,
                measured_prompt_tokens: analysis.measured_prompt_tokens.get(i).copied().flatten(),
                requests: analysis.requests_per_class.get(i).copied().unwrap_or(0),
            })
            .collect(),
        assignment: analysis.assignment,
        errors: analysis.errors,
        comparisons: analysis.comparisons,
        method: Method {
            alpha: options.alpha,
            min_effect: options.min_effect,
            until: match options.until {
                Until::Budget => "budget",
                Until::Decided => "decided",
            },
            looks: options.looks,
            looks_made,
            look_alpha: design.look_alpha,
            srm_threshold: options.srm_threshold,
            description: METHOD,
        },
        run: Run {
            endpoint: options.path.clone(),
            stream: options.stream,
            load,
            concurrency,
            rate,
            seed: options.seed,
            warmup: options.warmup,
            sent: facts.sent,
            duration_s: facts.elapsed,
            achieved_rate: if facts.elapsed > 0.0 {
                facts.measured as f64 / facts.elapsed
            } else {
                0.0
            },
            stopped_by: facts.stopped_by,
        },
    }
}

fn verdict(design: &Design, analysis: &Analysis) -> (Verdict, Vec<String>) {
    let a = &analysis.assignment;
    let mut reasons = Vec::new();
    let counted: u64 = analysis
        .comparisons
        .iter()
        .filter(|c| c.primary)
        .flat_map(|c| c.n.values())
        .sum();
    if a.misrouted > 0 {
        reasons.push(format!(
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
            reasons.push(format!(
                "error rates differ in class {}: {}",
                e.class,
                rates.join(", ")
            ));
        }
    }
    if counted == 0 {
        reasons.insert(
            0,
            "no request was answered by its assigned arm without error".into(),
        );
        return (Verdict::Invalid, reasons);
    }
    if !a.srm_ok {
        // Requests without response headers have no arm: when there are any, the mismatch may be theirs.
        let untagged = if a.untagged > 0 {
            format!(
                "; {} request(s) without a tagged answer (no response headers, or no known arm in the tag) \
                 are not among the answers",
                a.untagged
            )
        } else {
            String::new()
        };
        reasons.insert(
            0,
            format!(
                "sample-ratio mismatch: answered {} against planned {} (p={}): the routing does not follow the \
                 assignment{untagged}",
                report::per_arm(&a.answered),
                report::per_arm(&a.planned),
                a.srm_p.map_or("-".into(), report::format_p)
            ),
        );
        return (Verdict::Invalid, reasons);
    }
    for c in analysis.comparisons.iter().filter(|c| c.primary) {
        let what = match (&c.decision, &c.faster) {
            (report::Decision::Faster, Some(arm)) => format!(
                "{} {}: {arm} faster by {:.1}%",
                c.metric.name(),
                c.class,
                100.0 * c.relative.unwrap_or(0.0).abs()
            ),
            (report::Decision::Equivalent, _) => {
                format!("{} {}: equivalent", c.metric.name(), c.class)
            }
            _ => format!("{} {}: inconclusive", c.metric.name(), c.class),
        };
        reasons.push(what);
    }
    if analysis.decided() {
        (Verdict::Decided, reasons)
    } else {
        (Verdict::Inconclusive, reasons)
    }
}

/// The progress line on stderr: answers per arm, rate, and the current estimate of each primary
/// comparison (the relative Hodges–Lehmann shift, from running samples; the decisions are the looks').
struct Progress {
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
    fn new(options: &Options, design: &Design, started: Instant) -> Self {
        Progress {
            enabled: !options.quiet,
            terminal: std::io::stderr().is_terminal(),
            started,
            last: started,
            last_estimate: started,
            total: options.requests,
            arms: options.arms.clone(),
            classes: design.classes.clone(),
            per_arm: vec![0; options.arms.len()],
            primary: vec![[Vec::new(), Vec::new()]; design.classes.len()],
            estimate: String::new(),
            look: String::new(),
        }
    }

    fn observe(&mut self, outcome: &Outcome, design: &Design) {
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
        if let (true, Some(value), Some(by_arm)) =
            (outcome.counts(), value, self.primary.get_mut(outcome.class))
        {
            if let Some(values) = by_arm.get_mut(outcome.assigned) {
                values.push(value);
            }
        }
    }

    fn update(&mut self, received: usize) {
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
                    let shift = kvab_judge::stats::hodges_lehmann(first, second)?;
                    let base = kvab_judge::stats::percentile(first, 50.0).filter(|b| *b > 0.0)?;
                    Some(format!("{class} {:+.1}%", 100.0 * shift / base))
                })
                .collect();
            if !estimates.is_empty() {
                self.estimate = format!("; shift {}", estimates.join(", "));
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

    fn look(&mut self, look: u32, analysis: &Analysis) {
        let decided = analysis
            .comparisons
            .iter()
            .filter(|c| c.primary && c.decision != report::Decision::Inconclusive)
            .count();
        let primary = analysis.comparisons.iter().filter(|c| c.primary).count();
        self.look = format!("; look {look}: {decided}/{primary} decided");
    }

    fn finish(&self) {
        if self.enabled && self.terminal {
            eprintln!();
        }
    }
}
