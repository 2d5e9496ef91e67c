//! `kvab analyze`: the A/B judged on what Prometheus already holds (docs/analyze.md): the filter's per-arm
//! histograms and counters over a window, with statistics valid on binned data (`binned`), the design
//! read from how requests chose their arm, and the sample-ratio check against the split weights.

pub mod binned;
pub mod options;
pub mod prometheus;

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::Serialize;

use crate::experiment::report::{emit, verdict_line, Decision, Verdict};
use crate::stats::{count, format_p, holm_adjusted, holm_levels, split_test, two_proportion};
use kvab_serve::client::HttpClient;

use binned::{mann_whitney, Histogram};
use options::AnalyzeArgs;
use prometheus::{printable, Labels, Prometheus};

/// Split-assigned share at or above which the comparison counts as randomized.
const RANDOMIZED_SHARE: f64 = 0.95;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub arms: Vec<String>,
    pub window: Window,
    pub design: Design,
    pub assignment: Assignment,
    pub errors: BTreeMap<String, Rate>,
    pub errors_p: Option<f64>,
    pub misroutes: BTreeMap<String, Rate>,
    /// kvab serve's ledger (`kvab_routed_requests_total`) per requested arm, when it is scraped.
    pub routed: Option<BTreeMap<String, f64>>,
    pub comparisons: Vec<Comparison>,
    pub method: Method,
    /// Every PromQL query run, in order.
    pub queries: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub start: f64,
    pub end: f64,
    pub seconds: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Design {
    /// `randomized` (at least 95 % of tagged requests assigned by the split), `observational` (most chose
    /// their arm by header), `mixed`, or `none` (no tagged request).
    pub kind: &'static str,
    /// Tagged requests per arm and `source` (`header`, `split`, `default`).
    pub requests: BTreeMap<String, BTreeMap<String, f64>>,
    pub split_share: Option<f64>,
    pub header_share: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Assignment {
    /// Split-assigned requests per arm.
    pub split: BTreeMap<String, f64>,
    pub weights: Option<BTreeMap<String, f64>>,
    pub srm_p: Option<f64>,
    /// `null` without --split or without split traffic.
    pub srm_ok: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub of: f64,
    pub count: f64,
    pub rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// `request_duration_ms` (the filter's request start to end of stream) or `time_to_first_byte_ms`
    /// (request start to the first response body byte).
    pub metric: &'static str,
    pub primary: bool,
    pub n: BTreeMap<String, f64>,
    /// Prometheus's interpolated estimate, and the bucket that holds the quantile.
    pub p50: BTreeMap<String, f64>,
    pub p50_bucket: BTreeMap<String, [f64; 2]>,
    pub p90: BTreeMap<String, f64>,
    pub p99: BTreeMap<String, f64>,
    /// Difference of the medians' estimates, second minus first (positive: the first arm is faster).
    pub shift_ms: Option<f64>,
    /// Distribution-free interval of the difference of the medians, widened to bucket edges.
    pub ci_ms: Option<[f64; 2]>,
    pub ci_level_alpha: f64,
    pub relative: Option<f64>,
    pub relative_ci: Option<[f64; 2]>,
    pub p: Option<f64>,
    pub p_adjusted: Option<f64>,
    pub decision: Decision,
    pub faster: Option<String>,
    pub buckets: usize,
    /// Per arm, (bucket upper bound, fraction of the requests at or below it) for every finite bound:
    /// the whole histogram the comparison was made on.
    pub cdf: BTreeMap<String, Vec<[f64; 2]>>,
}

impl Comparison {
    /// `nvlink faster`, `equivalent` or `inconclusive`.
    fn decision_text(&self) -> String {
        match (self.decision, &self.faster) {
            (Decision::Faster, Some(arm)) => format!("{arm} faster"),
            (Decision::Equivalent, _) => "equivalent".into(),
            _ => "inconclusive".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Method {
    pub alpha: f64,
    pub min_effect: f64,
    pub min_requests: u64,
    pub srm_threshold: f64,
    pub description: &'static str,
}

const METHOD: &str = "increase() of the filter's histograms and counters over the window; Mann-Whitney with \
                      each bucket a group of ties; the difference of medians with distribution-free median \
                      intervals widened to bucket edges (each at half the level); Holm across the metrics; \
                      faster needs the interval to exclude 0 and a difference of at least min_effect; \
                      equivalent needs the interval inside ±min_effect";

pub fn main(mut args: AnalyzeArgs) -> ExitCode {
    let split_source = match args.filter_config.take() {
        Some(options::FilterSplit(weights)) => {
            args.split = weights;
            "--filter-config's split.weights"
        }
        None => "--split",
    };
    if args.arms.len() != 2 || args.arms[0] == args.arms[1] {
        eprintln!("error: --arms wants two different arms\n\nFor more information, try 'kvab analyze --help'.");
        return ExitCode::from(3);
    }
    let selected: Vec<&String> = args.vllm_selector.iter().map(|(arm, _)| arm).collect();
    if !selected.is_empty()
        && (selected.len() != 2 || !args.arms.iter().all(|a| selected.contains(&a)))
    {
        eprintln!(
            "error: --vllm-selector wants one ARM=MATCHERS for each of the two arms (see --arms)"
        );
        return ExitCode::from(3);
    }
    if let Some((arm, _)) = args.split.iter().find(|(arm, _)| !args.arms.contains(arm)) {
        eprintln!("error: {split_source} names {arm:?}, which is not one of the arms (see --arms)");
        return ExitCode::from(3);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kvab analyze: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let report = match runtime.block_on(run(&args)) {
        Ok(report) => report,
        Err(message) => {
            eprintln!("kvab analyze: {message}");
            return ExitCode::from(3);
        }
    };
    let html = args.html.as_deref().map(|path| {
        let page = crate::experiment::html::page(
            &format!("kvab analyze: {}", report.arms.join(" vs ")),
            &report.verdict_line(),
            report.verdict,
            &report.html_body(),
        );
        (path, page)
    });
    emit(
        "analyze",
        &report,
        report.verdict,
        args.json,
        || report.table(),
        html,
    )
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs a query, keeping it for the report.
struct Queries<'a> {
    prometheus: &'a Prometheus,
    selector: String,
    range: String,
    run: Vec<String>,
}

impl Queries<'_> {
    /// `sum by (<by>) (increase(<metric>{<selector>}[<window>]))`.
    async fn increase(&mut self, metric: &str, by: &str) -> Result<Vec<(Labels, f64)>, String> {
        let selector = self.selector.clone();
        self.increase_with(metric, by, &selector).await
    }

    async fn increase_with(
        &mut self,
        metric: &str,
        by: &str,
        selector: &str,
    ) -> Result<Vec<(Labels, f64)>, String> {
        let query = format!(
            "sum by ({by}) (increase({metric}{{{selector}}}[{}]))",
            self.range
        );
        self.run.push(query.clone());
        self.prometheus.vector(&query).await
    }

    /// vLLM's own histogram per arm (seconds, as `_ms` here): by `--vllm-selector` per arm when given, else
    /// grouped by `--vllm-arm-label`. Empty when vLLM is not scraped (vLLM's series are optional).
    async fn vllm(
        &mut self,
        metric: &str,
        args: &AnalyzeArgs,
    ) -> Result<Vec<(Labels, f64)>, String> {
        let mut samples = Vec::new();
        if args.vllm_selector.is_empty() {
            let by = format!("{}, le", args.vllm_arm_label);
            for (mut labels, value) in self.increase_with(metric, &by, "").await? {
                let arm = labels.remove(&args.vllm_arm_label).unwrap_or_default();
                labels.insert("backend".into(), arm);
                samples.push((labels, value));
            }
        } else {
            for (arm, selector) in &args.vllm_selector {
                for (mut labels, value) in self.increase_with(metric, "le", selector).await? {
                    labels.insert("backend".into(), arm.clone());
                    samples.push((labels, value));
                }
            }
        }
        // Seconds to milliseconds, on the finite bucket bounds (any other `le` is left for
        // `Histogram::from_cumulative` to judge).
        for (labels, _) in &mut samples {
            if let Some(le) = labels.get_mut("le") {
                if let Some(seconds) = le.parse::<f64>().ok().filter(|s| s.is_finite()) {
                    *le = format!("{}", seconds * 1000.0);
                }
            }
        }
        Ok(samples)
    }

    /// As `increase`, with "no series" an error naming the query: the metric is not scraped at all.
    async fn required(&mut self, metric: &str, by: &str) -> Result<Vec<(Labels, f64)>, String> {
        let result = self.increase(metric, by).await?;
        if result.is_empty() {
            return Err(format!(
                "query {}: no series in the window (is the gateway's /stats/prometheus scraped, and does \
                 --selector match it?)",
                self.run.last().map_or("", String::as_str)
            ));
        }
        Ok(result)
    }
}

fn label<'a>(labels: &'a Labels, name: &str) -> &'a str {
    labels.get(name).map_or("", String::as_str)
}

/// A series as PromQL writes it, `metric{label="value", ...}` (`\` and `"` escaped in values), its
/// server-provided text made printable.
fn series(metric: &str, labels: &Labels) -> String {
    let labels: Vec<String> = labels
        .iter()
        .map(|(name, value)| {
            let value = value.replace('\\', "\\\\").replace('"', "\\\"");
            format!("{}=\"{}\"", printable(name), printable(&value))
        })
        .collect();
    format!("{metric}{{{}}}", labels.join(", "))
}

/// The one line of input that cannot be judged, naming its series.
fn invalid_input(metric: &str, labels: &Labels, problem: impl std::fmt::Display) -> String {
    format!("invalid input: {}: {problem}", series(metric, labels))
}

/// Every value of a counter's answer is a count (`stats::count`), or the answer is refused.
fn counts(metric: &str, samples: &[(Labels, f64)]) -> Result<(), String> {
    for (labels, value) in samples {
        count(*value).map_err(|problem| invalid_input(metric, labels, problem))?;
    }
    Ok(())
}

/// Per arm, the histogram of its buckets; `None` for an arm without any; an error naming the arm's series
/// when its buckets are no histogram (`Histogram::from_cumulative`).
fn histograms(
    metric: &str,
    samples: &[(Labels, f64)],
    arms: &[String],
) -> Result<Vec<Option<Histogram>>, String> {
    arms.iter()
        .map(|arm| {
            let buckets: Vec<(&str, f64)> = samples
                .iter()
                .filter(|(l, _)| label(l, "backend") == arm)
                .map(|(l, v)| (label(l, "le"), *v))
                .collect();
            if buckets.is_empty() {
                return Ok(None);
            }
            Histogram::from_cumulative(buckets)
                .map(Some)
                .map_err(|problem| {
                    let labels = Labels::from([("backend".to_string(), arm.clone())]);
                    invalid_input(metric, &labels, problem)
                })
        })
        .collect()
}

/// One answer: `increase()` per series.
type Samples = Vec<(Labels, f64)>;

/// What the queries answered, before any judging.
struct Answers {
    duration: Samples,
    ttfb: Samples,
    requests: Samples,
    responses: Samples,
    served: Samples,
    routed: Samples,
    /// vLLM's histograms, (report name, metric, samples), empty where not scraped.
    vllm: Vec<(&'static str, &'static str, Samples)>,
}

async fn run(args: &AnalyzeArgs) -> Result<Report, String> {
    let end = args.end.unwrap_or_else(now);
    let start = args.start.unwrap_or(end - args.window.as_secs_f64());
    if start >= end {
        return Err(format!(
            "the window is empty: --start {start} is not before --end {end}"
        ));
    }
    let seconds = (end - start).round().max(1.0) as u64;
    let prometheus = Prometheus::new(HttpClient::new(args.max_time), &args.prometheus, end);
    let mut q = Queries {
        prometheus: &prometheus,
        selector: args.selector.clone(),
        range: format!("{seconds}s"),
        run: Vec::new(),
    };
    let mut answers = Answers {
        duration: q
            .required("kvab_request_duration_milliseconds_bucket", "backend, le")
            .await?,
        ttfb: q
            .required("kvab_time_to_first_byte_milliseconds_bucket", "backend, le")
            .await?,
        requests: q.required("kvab_requests_total", "backend, source").await?,
        responses: q
            .required("kvab_responses_total", "backend, code_class")
            .await?,
        served: q.increase("kvab_served_total", "requested, served").await?,
        routed: q
            .increase("kvab_routed_requests_total", "requested")
            .await?,
        vllm: Vec::new(),
    };
    // vLLM's own latencies per arm (vllm/v1/metrics: these three names on current vLLM), when scraped.
    for (name, metric) in [
        ("vllm_ttft_ms", "vllm:time_to_first_token_seconds_bucket"),
        ("vllm_itl_ms", "vllm:inter_token_latency_seconds_bucket"),
        ("vllm_e2e_ms", "vllm:e2e_request_latency_seconds_bucket"),
    ] {
        let samples = q.vllm(metric, args).await?;
        answers.vllm.push((name, metric, samples));
    }
    let window = Window {
        start,
        end,
        seconds,
    };
    judge(&answers, args, window, q.run)
}

/// The report on the answers: every value checked first (`stats::count`, `Histogram::from_cumulative`),
/// so input that is no count or no histogram is an error naming its series, never a verdict.
fn judge(
    answers: &Answers,
    args: &AnalyzeArgs,
    window: Window,
    queries: Vec<String>,
) -> Result<Report, String> {
    let arms = &args.arms;
    let Answers {
        duration,
        ttfb,
        requests,
        responses,
        served,
        routed,
        vllm,
    } = answers;
    counts("kvab_requests_total", requests)?;
    counts("kvab_responses_total", responses)?;
    counts("kvab_served_total", served)?;
    counts("kvab_routed_requests_total", routed)?;

    let design = design(requests, arms);
    let assignment = assignment(requests, arms, &args.split, args.srm_threshold);
    let (errors, errors_p) = errors(responses, arms);
    let misroutes = misroutes(served, arms);
    let routed = (!routed.is_empty()).then(|| {
        routed
            .iter()
            .filter(|(l, _)| arms.iter().any(|a| a == label(l, "requested")))
            .map(|(l, v)| (label(l, "requested").to_string(), *v))
            .collect()
    });

    let mut metrics = vec![
        (
            "request_duration_ms",
            true,
            histograms("kvab_request_duration_milliseconds_bucket", duration, arms)?,
        ),
        (
            "time_to_first_byte_ms",
            false,
            histograms("kvab_time_to_first_byte_milliseconds_bucket", ttfb, arms)?,
        ),
    ];
    for (name, metric, samples) in vllm {
        let found = histograms(metric, samples, arms)?;
        if found.iter().any(Option::is_some) {
            metrics.push((*name, false, found));
        }
    }
    let p_values: Vec<f64> = metrics
        .iter()
        .map(|(_, _, h)| match (&h[0], &h[1]) {
            (Some(a), Some(b)) => mann_whitney(a, b).unwrap_or(1.0),
            _ => 1.0,
        })
        .collect();
    let adjusted = holm_adjusted(&p_values);
    let levels = holm_levels(&p_values, args.alpha);
    let comparisons: Vec<Comparison> = metrics
        .iter()
        .zip(adjusted.iter().zip(&levels))
        .map(|((metric, primary, h), (&p_adjusted, &level))| {
            compare(metric, *primary, arms, h, p_adjusted, level, args)
        })
        .collect();

    let mut report = Report {
        verdict: Verdict::Inconclusive,
        reasons: Vec::new(),
        arms: arms.clone(),
        window,
        design,
        assignment,
        errors,
        errors_p,
        misroutes,
        routed,
        comparisons,
        method: Method {
            alpha: args.alpha,
            min_effect: args.min_effect,
            min_requests: args.min_requests,
            srm_threshold: args.srm_threshold,
            description: METHOD,
        },
        queries,
    };
    (report.verdict, report.reasons) = verdict(&report, args);
    Ok(report)
}

fn compare(
    metric: &'static str,
    primary: bool,
    arms: &[String],
    histograms: &[Option<Histogram>],
    p_adjusted: f64,
    level: f64,
    args: &AnalyzeArgs,
) -> Comparison {
    let mut c = Comparison {
        metric,
        primary,
        n: BTreeMap::new(),
        p50: BTreeMap::new(),
        p50_bucket: BTreeMap::new(),
        p90: BTreeMap::new(),
        p99: BTreeMap::new(),
        shift_ms: None,
        ci_ms: None,
        ci_level_alpha: level,
        relative: None,
        relative_ci: None,
        p: None,
        p_adjusted: None,
        decision: Decision::Inconclusive,
        faster: None,
        buckets: histograms
            .iter()
            .flatten()
            .map(|h| h.upper.len())
            .max()
            .unwrap_or(0),
        cdf: BTreeMap::new(),
    };
    for (arm, h) in arms.iter().zip(histograms) {
        let Some(h) = h else { continue };
        c.n.insert(arm.clone(), h.total());
        c.cdf.insert(arm.clone(), h.cumulative_fractions());
        if let Some((lo, hi, estimate)) = h.quantile(0.5) {
            c.p50.insert(arm.clone(), estimate);
            c.p50_bucket.insert(arm.clone(), [lo, hi]);
        }
        for (q, map) in [(0.9, &mut c.p90), (0.99, &mut c.p99)] {
            if let Some((_, _, estimate)) = h.quantile(q) {
                map.insert(arm.clone(), estimate);
            }
        }
    }
    let (Some(Some(a)), Some(Some(b))) = (histograms.first(), histograms.get(1)) else {
        return c;
    };
    if a.total() < args.min_requests as f64 || b.total() < args.min_requests as f64 {
        return c;
    }
    c.p = mann_whitney(a, b);
    c.p_adjusted = c.p.map(|_| p_adjusted);
    let (Some((_, _, median_a)), Some((_, _, median_b))) = (a.quantile(0.5), b.quantile(0.5))
    else {
        return c;
    };
    c.shift_ms = Some(median_b - median_a);
    // Each median's interval at half the level: both hold together with probability ≥ 1 − level.
    if let (Some((a_lo, a_hi)), Some((b_lo, b_hi))) = (
        a.median_interval(level / 2.0),
        b.median_interval(level / 2.0),
    ) {
        let (lo, hi) = (b_lo - a_hi, b_hi - a_lo);
        if lo.is_finite() && hi.is_finite() {
            c.ci_ms = Some([lo, hi]);
        }
    }
    if median_a > 0.0 {
        c.relative = c.shift_ms.map(|s| s / median_a);
        c.relative_ci = c.ci_ms.map(|[lo, hi]| [lo / median_a, hi / median_a]);
    }
    if let (Some(relative), Some([lo, hi]), Some([rlo, rhi])) = (c.relative, c.ci_ms, c.relative_ci)
    {
        if p_adjusted <= args.alpha && (lo > 0.0 || hi < 0.0) && relative.abs() >= args.min_effect {
            c.decision = Decision::Faster;
            c.faster = Some(if relative > 0.0 {
                arms[0].clone()
            } else {
                arms[1].clone()
            });
        } else if rlo > -args.min_effect && rhi < args.min_effect {
            c.decision = Decision::Equivalent;
        }
    }
    c
}

fn design(requests: &[(Labels, f64)], arms: &[String]) -> Design {
    let mut by_arm: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for (l, v) in requests {
        let arm = label(l, "backend");
        if arms.iter().any(|a| a == arm) {
            *by_arm
                .entry(arm.to_string())
                .or_default()
                .entry(label(l, "source").to_string())
                .or_default() += v;
        }
    }
    let total: f64 = by_arm.values().flat_map(|s| s.values()).sum();
    let share = |source: &str| {
        (total > 0.0).then(|| by_arm.values().filter_map(|s| s.get(source)).sum::<f64>() / total)
    };
    let (split_share, header_share) = (share("split"), share("header"));
    let kind = match (split_share, header_share) {
        (None, _) => "none",
        (Some(s), _) if s >= RANDOMIZED_SHARE => "randomized",
        (_, Some(h)) if h > 0.5 => "observational",
        _ => "mixed",
    };
    Design {
        kind,
        requests: by_arm,
        split_share,
        header_share,
    }
}

fn assignment(
    requests: &[(Labels, f64)],
    arms: &[String],
    split: &[(String, f64)],
    threshold: f64,
) -> Assignment {
    let counts: BTreeMap<String, f64> = arms
        .iter()
        .map(|arm| {
            let n = requests
                .iter()
                .filter(|(l, _)| label(l, "backend") == arm && label(l, "source") == "split")
                .map(|(_, v)| v)
                .sum();
            (arm.clone(), n)
        })
        .collect();
    if split.is_empty() {
        return Assignment {
            split: counts,
            weights: None,
            srm_p: None,
            srm_ok: None,
        };
    }
    let weights: BTreeMap<String, f64> = split.iter().cloned().collect();
    let observed: Vec<u64> = arms
        .iter()
        .map(|a| counts.get(a).copied().unwrap_or(0.0).round() as u64)
        .collect();
    // An arm left out of --split has weight 0: any split request to it is a mismatch by itself.
    let weight: Vec<f64> = arms
        .iter()
        .map(|a| weights.get(a).copied().unwrap_or(0.0))
        .collect();
    let srm_p = if weight.iter().any(|w| *w <= 0.0) {
        let stray = observed
            .iter()
            .zip(&weight)
            .any(|(o, w)| *w <= 0.0 && *o > 0);
        observed
            .iter()
            .any(|o| *o > 0)
            .then_some(if stray { 0.0 } else { 1.0 })
    } else {
        split_test(&observed, &weight).map(|t| t.p_value)
    };
    Assignment {
        split: counts,
        weights: Some(weights),
        srm_p,
        srm_ok: srm_p.map(|p| p >= threshold),
    }
}

/// Per arm (the `key` label), how many of the samples' counts there are and how many `counted` picks.
fn rates(
    samples: &[(Labels, f64)],
    key: &str,
    arms: &[String],
    counted: impl Fn(&Labels, &str) -> bool,
) -> BTreeMap<String, Rate> {
    arms.iter()
        .map(|arm| {
            let (mut of, mut count) = (0.0, 0.0);
            for (labels, value) in samples.iter().filter(|(l, _)| label(l, key) == arm) {
                of += value;
                if counted(labels, arm) {
                    count += value;
                }
            }
            let rate = (of > 0.0).then(|| count / of);
            (arm.clone(), Rate { of, count, rate })
        })
        .collect()
}

/// A 5xx, or no response status at all (reset, timeout): the arm failed the request.
fn errors(responses: &[(Labels, f64)], arms: &[String]) -> (BTreeMap<String, Rate>, Option<f64>) {
    let rates = rates(responses, "backend", arms, |l, _| {
        matches!(label(l, "code_class"), "5xx" | "none")
    });
    let get = |arm: &String| {
        rates
            .get(arm)
            .map_or((0, 0), |r| (r.count.round() as u64, r.of.round() as u64))
    };
    let ((x1, n1), (x2, n2)) = (get(&arms[0]), get(&arms[1]));
    (rates, two_proportion(x1, n1, x2, n2))
}

/// Requests tagged for an arm and served by another.
fn misroutes(served: &[(Labels, f64)], arms: &[String]) -> BTreeMap<String, Rate> {
    rates(served, "requested", arms, |l, arm| {
        label(l, "served") != arm
    })
}

fn verdict(report: &Report, args: &AnalyzeArgs) -> (Verdict, Vec<String>) {
    let mut reasons = Vec::new();
    if report.assignment.srm_ok == Some(false) {
        let counts: Vec<String> = report
            .assignment
            .split
            .iter()
            .map(|(a, n)| format!("{a} {n:.0}"))
            .collect();
        reasons.push(format!(
            "sample-ratio mismatch: split-assigned requests {} against the weights of --split (p={}): the filter's \
             split is not what --split says, or requests are lost on one arm",
            counts.join(", "),
            report.assignment.srm_p.map_or("-".into(), format_p)
        ));
        return (Verdict::Invalid, reasons);
    }
    let mut inconclusive = false;
    match report.design.kind {
        "randomized" => reasons.push(format!(
            "randomized: {:.0} % of tagged requests were assigned by the filter's split",
            100.0 * report.design.split_share.unwrap_or(0.0)
        )),
        "none" => {
            reasons.push("no tagged request in the window".into());
            inconclusive = true;
        }
        kind => {
            reasons.push(format!(
                "{kind}: {:.0} % of tagged requests chose their arm by header (clients chose), only {:.0} % by the \
                 split; the arms saw different clients, prompts and moments, so a difference may come from who \
                 sends to which arm and is no verdict (use onMissing: split, or kvab experiment)",
                100.0 * report.design.header_share.unwrap_or(0.0),
                100.0 * report.design.split_share.unwrap_or(0.0)
            ));
            inconclusive = true;
        }
    }
    for c in &report.comparisons {
        let few: Vec<String> = args
            .arms
            .iter()
            .filter(|a| c.n.get(*a).copied().unwrap_or(0.0) < args.min_requests as f64)
            .map(|a| format!("{a} {:.0}", c.n.get(a).copied().unwrap_or(0.0)))
            .collect();
        if c.primary && !few.is_empty() {
            reasons.push(format!(
                "too little traffic in the window: {} request(s), fewer than --min-requests {}",
                few.join(", "),
                args.min_requests
            ));
            inconclusive = true;
        }
        if c.primary {
            reasons.push(match (&c.decision, &c.faster) {
                (Decision::Faster, Some(arm)) => format!(
                    "{}: {arm} faster by {:.1}% (median)",
                    c.metric,
                    100.0 * c.relative.unwrap_or(0.0).abs()
                ),
                (Decision::Equivalent, _) => format!("{}: equivalent", c.metric),
                _ => format!("{}: inconclusive", c.metric),
            });
        }
    }
    if let Some(p) = report.errors_p.filter(|p| *p < args.alpha) {
        reasons.push(format!(
            "error rates differ between the arms (p={})",
            format_p(p)
        ));
    }
    let misrouted: f64 = report.misroutes.values().map(|r| r.count).sum();
    if misrouted > 0.0 {
        reasons.push(format!(
            "{misrouted:.0} request(s) served by another arm than tagged"
        ));
    }
    let decided = report
        .comparisons
        .iter()
        .filter(|c| c.primary)
        .all(|c| c.decision != Decision::Inconclusive);
    if inconclusive || !decided {
        (Verdict::Inconclusive, reasons)
    } else {
        (Verdict::Decided, reasons)
    }
}

impl Report {
    pub fn verdict_line(&self) -> String {
        verdict_line(self.verdict, &self.reasons)
    }

    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let (first, second) = (&self.arms[0], &self.arms[1]);
        let _ = writeln!(
            out,
            "{:<22} {:>9} {:>9} {:>12} {:>12} {:>10} {:>22} {:>8} {:>9}  decision",
            "metric",
            format!("n {first}"),
            format!("n {second}"),
            format!("p50 {first}"),
            format!("p50 {second}"),
            "shift",
            "interval",
            "rel",
            "p adj"
        );
        for c in &self.comparisons {
            let n = |arm: &str| c.n.get(arm).map_or("-".into(), |v| format!("{v:.0}"));
            let p50 = |arm: &str| c.p50.get(arm).map_or("-".into(), |v| format!("{v:.1}"));
            let decision = c.decision_text();
            let _ = writeln!(
                out,
                "{:<22} {:>9} {:>9} {:>12} {:>12} {:>10} {:>22} {:>8} {:>9}  {}{}",
                c.metric,
                n(first),
                n(second),
                p50(first),
                p50(second),
                c.shift_ms.map_or("-".into(), |v| format!("{v:+.2}")),
                c.ci_ms
                    .map_or("-".into(), |[lo, hi]| format!("[{lo:+.1}, {hi:+.1}]")),
                c.relative
                    .map_or("-".into(), |v| format!("{:+.1}%", 100.0 * v)),
                c.p_adjusted.map_or("-".into(), format_p),
                decision,
                if c.primary { "" } else { " (secondary)" }
            );
        }
        let _ = writeln!(
            out,
            "\ndesign: {} (split {}, header {}); split-assigned {}; sample ratio {}",
            self.design.kind,
            self.design
                .split_share
                .map_or("-".into(), |s| format!("{:.0}%", 100.0 * s)),
            self.design
                .header_share
                .map_or("-".into(), |s| format!("{:.0}%", 100.0 * s)),
            self.assignment
                .split
                .iter()
                .map(|(a, n)| format!("{a} {n:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            match (self.assignment.srm_ok, self.assignment.srm_p) {
                (Some(true), Some(p)) => format!("p={} (ok)", format_p(p)),
                (Some(false), Some(p)) => format!("p={} (MISMATCH)", format_p(p)),
                _ => "not checked (no --split)".into(),
            }
        );
        let rates = |map: &BTreeMap<String, Rate>| {
            map.iter()
                .map(|(a, r)| format!("{a} {:.0}/{:.0}", r.count, r.of))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "errors (5xx or no status): {}; misrouted: {}",
            rates(&self.errors),
            rates(&self.misroutes)
        );
        let _ = writeln!(
            out,
            "window: {} s ending {:.0}",
            self.window.seconds, self.window.end
        );
        let _ = writeln!(out, "verdict: {}", self.verdict_line());
        out
    }

    fn html_body(&self) -> String {
        let escape = crate::experiment::html::escape;
        let mut out = format!("<h2>Comparisons</h2><pre>{}</pre>", escape(&self.table()));
        out.push_str("<h2>Distributions</h2>");
        for c in &self.comparisons {
            let arms: Vec<crate::experiment::html::BinnedCdf> = self
                .arms
                .iter()
                .filter_map(|arm| {
                    let points = c.cdf.get(arm)?.iter().map(|&[x, f]| (x, f)).collect();
                    Some((arm.clone(), c.n.get(arm).copied().unwrap_or(0.0), points))
                })
                .collect();
            let caption = format!(
                "{}: the fraction of requests at or below each bucket bound, per arm ({}).",
                c.metric,
                c.decision_text()
            );
            crate::experiment::html::figure(
                &mut out,
                c.metric,
                &caption,
                crate::experiment::html::binned_cdf_plot(c.metric, "ms (log scale)", &arms),
            );
        }
        out.push_str("<h2>Queries</h2><ul>");
        for q in &self.queries {
            out.push_str(&format!("<li><code>{}</code></li>", escape(q)));
        }
        out.push_str("</ul>");
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;
    use serde_json::{json, Value};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AnalyzeArgs,
    }

    fn args() -> AnalyzeArgs {
        let command = [
            "analyze",
            "--prometheus",
            "http://prometheus:9090",
            "--split",
            "nvlink=1,fs=1",
        ];
        Cli::try_parse_from(command).unwrap().args
    }

    /// The samples of Prometheus's JSON answer to an instant query, read as a run reads it.
    fn answer(series: &[Value]) -> Vec<(Labels, f64)> {
        let body = json!({"status": "success", "data": {"resultType": "vector", "result": series}});
        prometheus::answer(body.to_string().as_bytes(), 200).unwrap()
    }

    fn sample(labels: Value, value: &str) -> Value {
        json!({"metric": labels, "value": [1_796_252_038.6, value]})
    }

    /// One arm's cumulative buckets, as `sum by (backend, le)` returns them.
    fn buckets(arm: &str, cumulative: &[(&str, &str)]) -> Vec<Value> {
        cumulative
            .iter()
            .map(|(le, v)| sample(json!({"backend": arm, "le": le}), v))
            .collect()
    }

    /// A randomized window, 1000 requests per arm, nvlink's durations clearly shorter.
    fn answers(nvlink_duration: &[(&str, &str)], nvlink_split: &str) -> Answers {
        let fs = [
            ("50", "0"),
            ("100", "100"),
            ("200", "900"),
            ("+Inf", "1000"),
        ];
        let duration = answer(&[buckets("nvlink", nvlink_duration), buckets("fs", &fs)].concat());
        let per_arm = |name: &str, other: Value, nvlink: &str| {
            answer(&[
                sample(json!({"backend": "nvlink", name: other}), nvlink),
                sample(json!({"backend": "fs", name: other}), "1000"),
            ])
        };
        Answers {
            ttfb: duration.clone(),
            duration,
            requests: per_arm("source", json!("split"), nvlink_split),
            responses: per_arm("code_class", json!("2xx"), "1000"),
            served: answer(&[
                sample(json!({"requested": "nvlink", "served": "nvlink"}), "1000"),
                sample(json!({"requested": "fs", "served": "fs"}), "1000"),
            ]),
            routed: Vec::new(),
            vllm: Vec::new(),
        }
    }

    const NVLINK: [(&str, &str); 4] = [
        ("50", "900"),
        ("100", "990"),
        ("200", "1000"),
        ("+Inf", "1000"),
    ];

    fn judged(answers: &Answers) -> Result<Report, String> {
        let window = Window {
            start: 0.0,
            end: 3600.0,
            seconds: 3600,
        };
        judge(answers, &args(), window, Vec::new())
    }

    #[test]
    fn series_are_named_as_promql_writes_them_and_printable() {
        let labels = Labels::from([
            ("backend".to_string(), "a\"b\\c\u{1b}[2J".to_string()),
            ("le".to_string(), "50".to_string()),
        ]);
        assert_eq!(
            series("m", &labels),
            r#"m{backend="a\"b\\c\u{1b}[2J", le="50"}"#
        );
    }

    #[test]
    fn a_sound_window_is_judged() {
        let report = judged(&answers(&NVLINK, "1000")).unwrap();
        assert_eq!(report.verdict, Verdict::Decided, "{:?}", report.reasons);
        assert_eq!(report.assignment.srm_ok, Some(true));
        assert_eq!(report.comparisons[0].faster.as_deref(), Some("nvlink"));
    }

    #[test]
    fn input_that_is_no_histogram_is_refused_naming_its_series() {
        let series = "invalid input: kvab_request_duration_milliseconds_bucket{backend=\"nvlink\"}";
        for (buckets, problem) in [
            // Was NaN cast to 0: "decided: nvlink faster by 242.9 %".
            (
                [("50", "NaN"), ("100", "990"), ("200", "1000"), ("+Inf", "1000")],
                "bucket le=\"50\": the value is NaN, not a count",
            ),
            // Was clamped silently into a verdict (nvlink faster).
            (
                [("50", "900"), ("100", "300"), ("200", "1000"), ("+Inf", "1000")],
                "bucket le=\"100\" counts 300 requests, fewer than the 900 of the bucket below it \
                 (cumulative buckets never decrease)",
            ),
            // Was "too little traffic".
            (
                [("50", "900"), ("100", "990"), ("200", "1000"), ("1000", "1000")],
                "no le=\"+Inf\" bucket, so no total",
            ),
            (
                [("50", "900"), ("50.0", "990"), ("200", "1000"), ("+Inf", "1000")],
                "two buckets le=\"50.0\"",
            ),
            (
                [("50", "900"), ("100", "990"), ("200", "1000"), ("+Inf", "1e18")],
                // Was a hang in the median's rank.
                "bucket le=\"+Inf\": the count 1e18 is above 2^53 (9.007199254740992e15), more than any \
                 window holds",
            ),
        ] {
            assert_eq!(
                judged(&answers(&buckets, "1000")).unwrap_err(),
                format!("{series}: {problem}")
            );
        }
    }

    #[test]
    fn counters_that_are_no_counts_are_refused_naming_their_series() {
        // Was u64::MAX steps of the binomial test: a hang.
        assert_eq!(
            judged(&answers(&NVLINK, "+Inf")).unwrap_err(),
            "invalid input: kvab_requests_total{backend=\"nvlink\", source=\"split\"}: the value is inf, \
             not a count"
        );
        assert!(judged(&answers(&NVLINK, "1e18"))
            .unwrap_err()
            .contains("the count 1e18 is above 2^53"));
        assert!(judged(&answers(&NVLINK, "-5"))
            .unwrap_err()
            .contains("the count -5 is negative"));
        // Series repeated until their sum passes u64: no overflow, no sample-ratio p-value.
        let mut repeated = answers(&NVLINK, "9e15");
        repeated.requests = std::iter::repeat_n(repeated.requests, 3_000)
            .flatten()
            .collect();
        assert_eq!(judged(&repeated).unwrap().assignment.srm_p, None);
        // Server-provided label text reaches the message printable.
        let mut bad = answers(&NVLINK, "1000");
        bad.responses = answer(&[sample(
            json!({"backend": "nvlink", "code_class": "\u{1b}]0;x\u{7}"}),
            "NaN",
        )]);
        let message = judged(&bad).unwrap_err();
        assert!(!message.chars().any(char::is_control), "{message:?}");
        assert!(
            message.contains(r#"code_class="\u{1b}]0;x\u{7}""#),
            "{message}"
        );
    }
}
