//! `kvab analyze`: the A/B judged on what Prometheus already holds (docs/analyze.md): the filter's per-arm
//! histograms and counters over a window, with statistics valid on binned data (`kvab_judge::binned`),
//! the design read from how requests chose their arm, and the sample-ratio check against the split
//! weights.
//!
//! The run: options -> a `source` of answers (Prometheus, or a file recorded by `--save-answers`) ->
//! `fetch` (the queries) -> `judge` (`series`, `design`; the comparisons, the verdict and the report are
//! `kvab_judge`'s; no I/O) -> `crate::output` (table, JSON, HTML).

#[cfg(test)]
mod calibration;
mod design;
mod fetch;
mod judge;
pub mod options;
pub mod prometheus;
mod series;
mod source;
#[cfg(test)]
mod tests;

use std::process::ExitCode;

use crate::output::{self, Failure};
use kvab_judge::report::production::{Report, Window};
use kvab_judge::sequential::Boundary;
use kvab_serve::client::HttpClient;

use options::AnalyzeArgs;
use prometheus::Prometheus;
use source::{Recording, Source};

pub fn main(args: AnalyzeArgs) -> ExitCode {
    output::run("analyze", analyze(args))
}

async fn analyze(mut args: AnalyzeArgs) -> Result<ExitCode, Failure> {
    let split_source = match args.filter_config.take() {
        Some(options::FilterSplit(weights)) => {
            args.split = weights;
            "--filter-config's split.weights"
        }
        None => "--split",
    };
    if args.arms.len() != 2 || args.arms[0] == args.arms[1] {
        return Err(Failure::Usage("--arms wants two different arms".into()));
    }
    let selected: Vec<&String> = args.vllm_selector.iter().map(|(arm, _)| arm).collect();
    if !selected.is_empty()
        && (selected.len() != 2 || !args.arms.iter().all(|a| selected.contains(&a)))
    {
        return Err(Failure::Usage(
            "--vllm-selector wants one ARM=MATCHERS for each of the two arms (see --arms)".into(),
        ));
    }
    if let Some((arm, _)) = args.split.iter().find(|(arm, _)| !args.arms.contains(arm)) {
        return Err(Failure::Usage(format!(
            "{split_source} names {arm:?}, which is not one of the arms (see --arms)"
        )));
    }
    if args.looks > 1 && args.start.is_none() && args.answers.is_none() {
        return Err(Failure::Usage(
            "--looks wants --start: the looks judge one window growing from one start".into(),
        ));
    }
    let always_valid = args.boundary == Boundary::AlwaysValid;
    if always_valid != args.plan_requests.is_some() {
        return Err(Failure::Usage(
            "--boundary always-valid and --plan-requests go together: the sequence is tightest at the \
             planned requests"
                .into(),
        ));
    }
    if always_valid && args.start.is_none() && args.answers.is_none() {
        return Err(Failure::Usage(
            "--boundary always-valid wants --start: the runs judge one window growing from one start"
                .into(),
        ));
    }
    let report = run(&args).await.map_err(Failure::Run)?;
    let html = args.html.as_deref().map(|path| {
        let page = kvab_judge::report::html::page(
            &format!("kvab analyze: {}", report.arms.join(" vs ")),
            &report.verdict_line(),
            report.verdict,
            &report.html_body(),
        );
        (path, page)
    });
    output::emit(&report, report.verdict, args.json, || report.table(), html)
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn run(args: &AnalyzeArgs) -> Result<Report, String> {
    let (mut source, window) = match (&args.answers, &args.prometheus) {
        (Some(path), _) => {
            let recording = Recording::read(path)?;
            let window = recording.window();
            (Source::Recorded(recording), window)
        }
        (None, Some(url)) => {
            let end = args.end.unwrap_or_else(now);
            let window = Window::new(args.start.unwrap_or(end - args.window.as_secs_f64()), end)?;
            let prometheus = Prometheus::new(HttpClient::new(args.max_time), url, end);
            (
                Source::live(prometheus, args.save_answers.is_some()),
                window,
            )
        }
        // clap's group `source` wants one of the two.
        (None, None) => return Err("--prometheus or --answers is required".into()),
    };
    let (answers, queries) = fetch::fetch(&mut source, args, &window).await?;
    if let (Some(path), Some(kept)) = (&args.save_answers, source.kept()) {
        source::save(path, kept, &window)?;
    }
    judge::judge(&answers, args, window, queries)
}
