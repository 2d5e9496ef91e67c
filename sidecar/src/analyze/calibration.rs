//! Calibration of `kvab analyze` on production windows at the unit of randomization: simulated windows as
//! Prometheus answers them (the filter's series by arm and source, latencies in whole milliseconds kept at
//! two significant digits and counted at the shipped bucket bounds), judged by `judge` as a run judges them,
//! with the same arms for both (A/A): every `faster` is a false claim. docs/analyze.md, "Calibration", holds
//! the table of the whole run:
//!
//! ```sh
//! cargo test -p kvab analyze::calibration -- --ignored --nocapture
//! ```
//!
//! Scenarios, each against what judging the same requests one by one would claim (the contrast):
//! - a randomized split alone;
//! - 5 % of the requests chose nvlink by header and take three times as long: analyze compares the split's
//!   requests alone; mixed into the split's histograms they would tilt the comparison;
//! - sticky keys (`split.keyHeader`): 40 keys of Zipf-like weights, each key's requests alike (a per-key
//!   latency factor): refused as `sticky`; judged as independent requests, a false `faster` comes often and
//!   the sample-ratio check of the requests false-alarms.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use clap::Parser;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use super::fetch::Answers;
use super::judge::{judge, judge_at, Look};
use super::options::AnalyzeArgs;
use super::prometheus::Labels;
use kvab_contract::metrics::source;
use kvab_judge::report::production::{Report, Window};
use kvab_judge::Decision;

const ARMS: [&str; 2] = ["nvlink", "fs"];
const ALPHA: f64 = 0.05;
/// Split-assigned requests in a window (both arms).
const REQUESTS: usize = 2_000;
/// The median latency, ms, and the spread of log-latency.
const MEDIAN_MS: f64 = 150.0;
const SIGMA: f64 = 0.3;

/// The bucket bounds the gateway patch ships for the filter's histograms (Istio's
/// `sidecar.istio.io/statsHistogramBuckets`, prefix `wasmcustom`).
fn shipped_bounds() -> Vec<f64> {
    let patch = include_str!("../../../manifests/patches/gateway-stats.yaml");
    let document = crate::args::parse_document(patch).unwrap();
    let annotation = document
        .pointer("/spec/infrastructure/annotations/sidecar.istio.io~1statsHistogramBuckets")
        .and_then(serde_json::Value::as_str)
        .unwrap();
    let buckets: serde_json::Value = serde_json::from_str(annotation).unwrap();
    buckets["wasmcustom"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_f64().unwrap())
        .collect()
}

/// A latency as the filter and Envoy keep it: whole milliseconds (the filter divides nanoseconds), then
/// two significant digits (Envoy's circllhist bins), the bin's lower edge.
fn kept(ms: f64) -> f64 {
    let whole = ms.floor().max(0.0);
    if whole < 100.0 {
        return whole;
    }
    let scale = 10f64.powi(whole.log10().floor() as i32 - 1);
    (whole / scale).floor() * scale
}

/// One series of the filter's histograms: cumulative counts at `bounds` and `+Inf`.
struct Series {
    arm: &'static str,
    source: &'static str,
    counts: Vec<f64>,
    total: f64,
}

impl Series {
    fn new(arm: &'static str, source: &'static str, bounds: &[f64]) -> Self {
        Series {
            arm,
            source,
            counts: vec![0.0; bounds.len()],
            total: 0.0,
        }
    }

    fn add(&mut self, bounds: &[f64], ms: f64) {
        let value = kept(ms);
        for (count, bound) in self.counts.iter_mut().zip(bounds) {
            if value <= *bound {
                *count += 1.0;
            }
        }
        self.total += 1.0;
    }

    fn samples(&self, bounds: &[f64]) -> Vec<(Labels, f64)> {
        let labels = |le: String| {
            Labels::from([
                ("backend".to_string(), self.arm.to_string()),
                ("source".to_string(), self.source.to_string()),
                ("le".to_string(), le),
            ])
        };
        bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| (labels(format!("{b}")), *c))
            .chain([(labels("+Inf".into()), self.total)])
            .collect()
    }
}

/// A simulated window: the requests each arm received by source, and their latencies.
#[derive(Default)]
struct Simulated {
    /// (arm, source) → latencies, ms.
    requests: BTreeMap<(&'static str, &'static str), Vec<f64>>,
}

impl Simulated {
    fn push(&mut self, arm: &'static str, source: &'static str, ms: f64) {
        self.requests.entry((arm, source)).or_default().push(ms);
    }

    /// The answers analyze would get: the histograms by (arm, split|other), the counters by (arm, source).
    /// `as_split`: every request labelled `split`, as judging them one by one would.
    fn answers(&self, bounds: &[f64], as_split: bool) -> Answers {
        let mut series: Vec<Series> = Vec::new();
        let mut requests: BTreeMap<(&str, &str), f64> = BTreeMap::new();
        for (&(arm, from), times) in &self.requests {
            let from = if as_split { source::SPLIT } else { from };
            let timing = if from == source::SPLIT {
                source::SPLIT
            } else {
                source::OTHER
            };
            let at = match series
                .iter()
                .position(|s| s.arm == arm && s.source == timing)
            {
                Some(at) => at,
                None => {
                    series.push(Series::new(arm, timing, bounds));
                    series.len() - 1
                }
            };
            for ms in times {
                series[at].add(bounds, *ms);
            }
            *requests.entry((arm, from)).or_default() += times.len() as f64;
        }
        let duration: Vec<(Labels, f64)> = series.iter().flat_map(|s| s.samples(bounds)).collect();
        let counter = |extra: Option<(&str, &str)>| -> Vec<(Labels, f64)> {
            requests
                .iter()
                .map(|(&(arm, from), n)| {
                    let mut labels = Labels::from([
                        ("backend".to_string(), arm.to_string()),
                        ("source".to_string(), from.to_string()),
                    ]);
                    if let Some((k, v)) = extra {
                        labels.insert(k.to_string(), v.to_string());
                    }
                    (labels, *n)
                })
                .collect()
        };
        Answers {
            ttfb: duration.clone(),
            duration,
            requests: counter(None),
            responses: counter(Some(("code_class", "2xx"))),
            served: Vec::new(),
            routed: Vec::new(),
            vllm: Vec::new(),
        }
    }
}

fn lognormal(rng: &mut ChaCha8Rng, median: f64, sigma: f64) -> f64 {
    // Box–Muller.
    let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
    let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
    median * (sigma * z).exp()
}

fn arm_at_random(rng: &mut ChaCha8Rng) -> &'static str {
    ARMS[usize::from(rng.random::<bool>())]
}

/// A randomized split of `REQUESTS`, A/A, plus `header` of that many header-chosen requests to nvlink whose
/// latencies are × `header_factor`.
fn split_window(rng: &mut ChaCha8Rng, header: usize, header_factor: f64) -> Simulated {
    let mut w = Simulated::default();
    for _ in 0..REQUESTS {
        let arm = arm_at_random(rng);
        w.push(arm, source::SPLIT, lognormal(rng, MEDIAN_MS, SIGMA));
    }
    for _ in 0..header {
        let ms = header_factor * lognormal(rng, MEDIAN_MS, SIGMA);
        w.push("nvlink", source::HEADER, ms);
    }
    w
}

/// `REQUESTS` key-assigned requests of 40 keys (weights ∝ 1/rank), A/A: each key on an arm at random, its
/// requests × the key's own factor (log-normal, σ 0.4: one user's prompts are alike).
fn sticky_window(rng: &mut ChaCha8Rng) -> Simulated {
    const KEYS: usize = 40;
    let weights: Vec<f64> = (1..=KEYS).map(|rank| 1.0 / rank as f64).collect();
    let total: f64 = weights.iter().sum();
    let keys: Vec<(&'static str, f64)> = (0..KEYS)
        .map(|_| (arm_at_random(rng), lognormal(rng, 1.0, 0.4)))
        .collect();
    let mut w = Simulated::default();
    for _ in 0..REQUESTS {
        let mut point = rng.random::<f64>() * total;
        let key = weights
            .iter()
            .position(|weight| {
                point -= weight;
                point <= 0.0
            })
            .unwrap_or(KEYS - 1);
        let (arm, factor) = keys[key];
        w.push(arm, source::KEY, factor * lognormal(rng, MEDIAN_MS, SIGMA));
    }
    w
}

fn args_with(more: &[&str]) -> AnalyzeArgs {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AnalyzeArgs,
    }
    let command = [
        "analyze",
        "--prometheus",
        "http://prometheus:9090",
        "--split",
        "nvlink=1,fs=1",
        "--alpha",
        "0.05",
    ];
    Cli::try_parse_from(command.iter().chain(more))
        .unwrap()
        .args
}

fn args() -> AnalyzeArgs {
    args_with(&[])
}

fn judged(answers: &Answers) -> Report {
    judge(
        answers,
        &args(),
        Window::new(0.0, 3600.0).unwrap(),
        Vec::new(),
    )
    .unwrap()
}

/// Hourly peeking over a day: what one run a day would claim, re-run every hour without a plan (each run at
/// alpha), re-run as `--looks 24 --look-every 1h` (alpha spent over the looks), and re-run as `--boundary
/// always-valid --plan-requests` the day's requests (the confidence sequence); A/A, so any `faster` at any
/// hour is a false claim, and "p < alpha at some hour" is what a reader of each run's p-value would see.
#[derive(Debug, Default, Clone, Copy)]
struct Peeking {
    days: u64,
    unplanned_claims: u64,
    unplanned_p: u64,
    planned_claims: u64,
    /// Days whose p-value fell below its look's level at some hour.
    planned_p: u64,
    always_valid_claims: u64,
    /// Days whose p-value fell below the always-valid level at some hour.
    always_valid_p: u64,
}

const HOURS: u32 = 24;
/// Split requests per hour (both arms).
const PER_HOUR: usize = 200;

fn peeking(days: u64, seed: u64) -> Peeking {
    let bounds = shipped_bounds();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (unplanned, planned) = (args(), args_with(&["--looks", "24", "--look-every", "1h"]));
    let day_requests = (HOURS as usize * PER_HOUR).to_string();
    let always_valid = args_with(&[
        "--boundary",
        "always-valid",
        "--plan-requests",
        &day_requests,
    ]);
    // Each hour's look, as `judge::look` finds it, computed once for every day.
    let fractions: Vec<f64> = (1..=HOURS)
        .map(|h| f64::from(h) / f64::from(HOURS))
        .collect();
    let levels = kvab_judge::sequential::levels(
        kvab_judge::sequential::Boundary::ObrienFleming,
        ALPHA,
        &fractions,
    );
    let av_levels = kvab_judge::sequential::levels(
        kvab_judge::sequential::Boundary::AlwaysValid,
        ALPHA,
        &fractions,
    );
    let mut t = Peeking::default();
    for _ in 0..days {
        let mut day = Simulated::default();
        // Unplanned, planned looks, always-valid: (a false claim, p below the level) at some hour.
        let mut seen = [(false, false); 3];
        for hour in 1..=HOURS {
            for _ in 0..PER_HOUR {
                let arm = arm_at_random(&mut rng);
                day.push(arm, source::SPLIT, lognormal(&mut rng, MEDIAN_MS, SIGMA));
            }
            let answers = day.answers(&bounds, false);
            let window = Window::new(0.0, f64::from(hour) * 3600.0).unwrap();
            let once = judge(&answers, &unplanned, window.clone(), Vec::new()).unwrap();
            let at = Look {
                look: hour,
                level: levels[hour as usize - 1],
            };
            let look = judge_at(&answers, &planned, window.clone(), at, Vec::new()).unwrap();
            let av = judge(&answers, &always_valid, window, Vec::new()).unwrap();
            // Its level is the sequence's at the window's split requests over the plan.
            assert_eq!(av.method.look_alpha, av_levels[hour as usize - 1]);
            for (seen, report) in seen.iter_mut().zip([&once, &look, &av]) {
                seen.0 |= false_claim(report) && report.verdict == kvab_judge::Verdict::Decided;
                seen.1 |= p_below_level(report);
            }
        }
        let [unplanned_day, planned_day, always_valid_day] =
            seen.map(|(c, p)| (u64::from(c), u64::from(p)));
        t.days += 1;
        t.unplanned_claims += unplanned_day.0;
        t.unplanned_p += unplanned_day.1;
        t.planned_claims += planned_day.0;
        t.planned_p += planned_day.1;
        t.always_valid_claims += always_valid_day.0;
        t.always_valid_p += always_valid_day.1;
    }
    t
}

/// A false claim in an A/A window: the primary comparison says `faster`.
/// A primary comparison's p-value below the level the run was made at (`method.look_alpha`: alpha for
/// one analysis, its look's or the sequence's level otherwise).
fn p_below_level(report: &Report) -> bool {
    report
        .comparisons
        .iter()
        .any(|c| c.primary && c.p.is_some_and(|p| p < report.method.look_alpha))
}

fn false_claim(report: &Report) -> bool {
    report
        .comparisons
        .iter()
        .any(|c| c.primary && c.decision == Decision::Faster)
}

/// What a scenario measured over its windows: analyze's false claims, the contrast's (the same requests
/// judged one by one), decided verdicts and sample-ratio false alarms of each.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    trials: u64,
    false_claims: u64,
    decided: u64,
    srm_alarms: u64,
    contrast_false_claims: u64,
    contrast_srm_alarms: u64,
}

fn run(trials: u64, seed: u64, window: impl Fn(&mut ChaCha8Rng) -> Simulated) -> Tally {
    let bounds = shipped_bounds();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = Tally::default();
    for _ in 0..trials {
        let w = window(&mut rng);
        let report = judged(&w.answers(&bounds, false));
        let contrast = judged(&w.answers(&bounds, true));
        t.trials += 1;
        t.false_claims +=
            u64::from(false_claim(&report) && report.verdict == kvab_judge::Verdict::Decided);
        t.decided += u64::from(report.verdict == kvab_judge::Verdict::Decided);
        t.srm_alarms += u64::from(report.assignment.srm_ok == Some(false));
        t.contrast_false_claims += u64::from(false_claim(&contrast));
        t.contrast_srm_alarms += u64::from(contrast.assignment.srm_ok == Some(false));
    }
    t
}

/// The 95 % Clopper–Pearson upper bound of `k` in `n`.
fn upper(k: u64, n: u64) -> f64 {
    if k >= n {
        return 1.0;
    }
    statrs::function::beta::inv_beta_reg(k as f64 + 1.0, (n - k) as f64, 0.975)
}

/// A scenario: its name, its seed, and how it makes a window.
type Scenario = (&'static str, u64, Box<dyn Fn(&mut ChaCha8Rng) -> Simulated>);

fn scenarios() -> Vec<Scenario> {
    vec![
        (
            "split alone, A/A",
            1,
            Box::new(|rng: &mut ChaCha8Rng| split_window(rng, 0, 1.0)),
        ),
        (
            "5 % header-chosen to nvlink, ×3 slower, A/A",
            2,
            Box::new(|rng: &mut ChaCha8Rng| split_window(rng, REQUESTS / 19, 3.0)),
        ),
        ("sticky: 40 keys, A/A", 3, Box::new(sticky_window)),
    ]
}

/// The sample-ratio check's threshold (`--srm-threshold`'s default): its false-alarm rate on a sound split.
const SRM_THRESHOLD: f64 = 0.001;

/// Runs every scenario at `trials`; the table's rows, and the rows whose false claims exceed α + `slack`, or
/// whose sample-ratio false alarms exceed its threshold + `slack`, at the 95 % upper bound.
fn measure(trials: u64, slack: f64) -> (Vec<String>, Vec<String>) {
    let (mut rows, mut over) = (Vec::new(), Vec::new());
    for (name, seed, window) in scenarios() {
        let t = run(trials, seed, window);
        let bound = upper(t.false_claims, t.trials);
        let row = format!(
            "| {name} | {} | {} | {:.4} | {} | {} | {} |",
            t.trials,
            t.false_claims,
            bound,
            t.srm_alarms,
            t.contrast_false_claims,
            t.contrast_srm_alarms
        );
        println!("{row}");
        if bound > ALPHA + slack || upper(t.srm_alarms, t.trials) > SRM_THRESHOLD + slack {
            over.push(row.clone());
        }
        rows.push(row);
    }
    (rows, over)
}

#[test]
fn kept_latencies_are_whole_milliseconds_at_two_significant_digits() {
    assert_eq!(kept(42.9), 42.0);
    assert_eq!(kept(157.3), 150.0);
    assert_eq!(kept(1234.0), 1200.0);
    assert_eq!(kept(99.99), 99.0);
    assert!(shipped_bounds().windows(2).all(|w| w[0] < w[1]));
}

/// The fast subset, in `cargo test`: 200 windows per scenario; a method at α passes unless it makes over
/// 19 false claims in 200 (upper bound ≤ α + 0.04).
#[test]
fn production_windows_make_false_claims_within_alpha_at_the_unit_of_randomization() {
    let (_, over) = measure(200, 0.04);
    assert!(over.is_empty(), "over the bound:\n{}", over.join("\n"));
}

/// The sticky scenario's contrast bites: judged one by one, the same key-assigned requests would be called
/// `faster` far more often than α — which is why analyze refuses them.
#[test]
fn sticky_requests_judged_one_by_one_would_claim_far_too_much() {
    let t = run(100, 3, sticky_window);
    assert_eq!(t.decided, 0, "{t:?}");
    assert!(t.contrast_false_claims > 20, "{t:?}");
}

/// The looks the peeking precomputes are those a run finds from its window.
#[test]
fn the_precomputed_looks_are_the_runs() {
    let planned = args_with(&["--looks", "24", "--look-every", "1h"]);
    let fractions: Vec<f64> = (1..=HOURS)
        .map(|h| f64::from(h) / f64::from(HOURS))
        .collect();
    let levels = kvab_judge::sequential::levels(
        kvab_judge::sequential::Boundary::ObrienFleming,
        ALPHA,
        &fractions,
    );
    for hour in [1u32, 7, 24] {
        let window = Window::new(0.0, f64::from(hour) * 3600.0).unwrap();
        let found = super::judge::look(&planned, &window);
        assert_eq!((found.look, found.level), (hour, levels[hour as usize - 1]));
    }
    // Part of an hour is the next look; past the last, the last.
    let found = super::judge::look(&planned, &Window::new(0.0, 3601.0).unwrap());
    assert_eq!(found.look, 2);
    let found = super::judge::look(&planned, &Window::new(0.0, 30.0 * 3600.0).unwrap());
    assert_eq!((found.look, found.level), (24, levels[23]));
    assert_eq!(
        super::judge::look(&args(), &Window::new(0.0, 10.0).unwrap()).level,
        ALPHA
    );
    // Pocock's spending, when asked for: its own levels at the same looks.
    let pocock = args_with(&[
        "--looks",
        "24",
        "--look-every",
        "1h",
        "--boundary",
        "pocock",
    ]);
    let levels =
        kvab_judge::sequential::levels(kvab_judge::sequential::Boundary::Pocock, ALPHA, &fractions);
    let found = super::judge::look(&pocock, &Window::new(0.0, 7.0 * 3600.0).unwrap());
    assert_eq!((found.look, found.level), (7, levels[6]));
    assert!(levels[6] > 0.005, "{levels:?}");
}

/// Hourly re-runs over a day: with `--looks 24 --look-every 1h` the days with a false claim stay within
/// alpha; without a plan, p < alpha comes at some hour far more often than below the looks' levels (the
/// peeking the looks correct).
#[test]
fn hourly_peeking_is_corrected_by_looks() {
    let t = peeking(60, 4);
    println!("{t:?}");
    assert!(upper(t.planned_claims, t.days) <= ALPHA + 0.06, "{t:?}");
    assert!(
        upper(t.always_valid_claims, t.days) <= ALPHA + 0.06,
        "{t:?}"
    );
    assert!(t.unplanned_p >= 2 * t.planned_p.max(3), "{t:?}");
    assert!(t.unplanned_p >= 2 * t.always_valid_p.max(3), "{t:?}");
}

#[test]
#[ignore = "the whole run: cargo test -p kvab analyze::calibration -- --ignored --nocapture"]
fn the_whole_run() {
    let trials = std::env::var("KVAB_CALIBRATION_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    println!("| scenario | windows | false claims | 95 % CP upper | sample-ratio alarms | judged one by one: false claims | sample-ratio alarms |");
    println!("|---|---|---|---|---|---|---|");
    let (_, over) = measure(trials, 0.01);
    let days = trials / 5;
    let t = peeking(days, 4);
    println!(
        "\nhourly peeking, {} days of {HOURS} looks: days with a false claim re-run unplanned {} (p < alpha at \
         some hour {}), with --looks {HOURS} --look-every 1h {} (95 % CP upper {:.4}; p < the look's level at \
         some hour {}, upper {:.4}), with --boundary always-valid --plan-requests {} {} (upper {:.4}; p < \
         its level at some hour {}, upper {:.4})",
        t.days,
        t.unplanned_claims,
        t.unplanned_p,
        t.planned_claims,
        upper(t.planned_claims, t.days),
        t.planned_p,
        upper(t.planned_p, t.days),
        HOURS as usize * PER_HOUR,
        t.always_valid_claims,
        upper(t.always_valid_claims, t.days),
        t.always_valid_p,
        upper(t.always_valid_p, t.days)
    );
    assert!(over.is_empty(), "over the bound:\n{}", over.join("\n"));
    assert!(upper(t.planned_claims, t.days) <= ALPHA + 0.01, "{t:?}");
    assert!(
        upper(t.always_valid_claims, t.days) <= ALPHA + 0.01,
        "{t:?}"
    );
}
