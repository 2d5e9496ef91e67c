//! Unit tests of analyze: its design, sample-ratio and comparison logic and its refusals, on answers
//! scripted as Prometheus writes them, and the recorded answers of tests/data/analyze-answers/ judged
//! again to their saved reports.
#![allow(clippy::unwrap_used)]

use clap::Parser;
use serde_json::{json, Value};

use super::design::{assignment, design};
use super::fetch::{fetch, Answers};
use super::judge::judge;
use super::prometheus::Labels;
use super::series::series;
use super::source::{document, save, Recorded, MAX_ANSWERS};
use super::*;
use kvab_judge::binned::Histogram;
use kvab_judge::comparison::{of_histograms, InFamily, Rule};
use kvab_judge::{Decision, Verdict};
use kvab_serve::client::one_shot::{serve_once, Then};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: AnalyzeArgs,
}

fn args() -> AnalyzeArgs {
    args_with(&["--split", "nvlink=1,fs=1"])
}

/// The arguments of `kvab analyze --prometheus http://prometheus:9090 <more>`.
fn args_with(more: &[&str]) -> AnalyzeArgs {
    let command = ["analyze", "--prometheus", "http://prometheus:9090"];
    Cli::try_parse_from(command.iter().chain(more))
        .unwrap()
        .args
}

/// The samples of Prometheus's JSON answer to an instant query, read as a run reads it.
fn answer(series: &[Value]) -> Vec<(Labels, f64)> {
    let body = json!({"status": "success", "data": {"resultType": "vector", "result": series}});
    prometheus::answer(body.to_string().as_bytes(), 200).unwrap()
}

fn sample(labels: Value, value: &str) -> Value {
    json!({"metric": labels, "value": [1_796_252_038.6, value]})
}

/// One arm's cumulative buckets of split-assigned requests, as `sum by (backend, source, le)` returns them.
fn buckets(arm: &str, cumulative: &[(&str, &str)]) -> Vec<Value> {
    buckets_of(arm, "split", cumulative)
}

/// One arm's cumulative buckets of one source.
fn buckets_of(arm: &str, source: &str, cumulative: &[(&str, &str)]) -> Vec<Value> {
    cumulative
        .iter()
        .map(|(le, v)| sample(json!({"backend": arm, "source": source, "le": le}), v))
        .collect()
}

/// A randomized window, 1000 requests per arm, nvlink's durations clearly shorter.
fn answers(nvlink_duration: &[(&str, &str)], nvlink_split: &str) -> Answers {
    let duration = answer(&[buckets("nvlink", nvlink_duration), buckets("fs", &FS)].concat());
    let per_arm = |name: &str, other: Value, nvlink: &str| {
        answer(&[
            sample(
                json!({"backend": "nvlink", "source": "split", name: other}),
                nvlink,
            ),
            sample(
                json!({"backend": "fs", "source": "split", name: other}),
                "1000",
            ),
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

const FS: [(&str, &str); 4] = [
    ("50", "0"),
    ("100", "100"),
    ("200", "900"),
    ("+Inf", "1000"),
];

const NVLINK: [(&str, &str); 4] = [
    ("50", "900"),
    ("100", "990"),
    ("200", "1000"),
    ("+Inf", "1000"),
];

fn judged(answers: &Answers) -> Result<Report, String> {
    judged_with(answers, &args())
}

fn judged_with(answers: &Answers, args: &AnalyzeArgs) -> Result<Report, String> {
    let window = Window::new(0.0, 3600.0).unwrap();
    judge(answers, args, window, Vec::new())
}

/// `kvab_requests_total` by (backend, source): (arm, source, count) as Prometheus answers it.
fn requests(counts: &[(&str, &str, &str)]) -> Vec<(Labels, f64)> {
    let series: Vec<Value> = counts
        .iter()
        .map(|(arm, source, n)| sample(json!({"backend": arm, "source": source}), n))
        .collect();
    answer(&series)
}

fn arms() -> Vec<String> {
    vec!["nvlink".to_string(), "fs".to_string()]
}

/// The primary comparison of a report.
fn primary(report: &Report) -> &kvab_judge::Comparison {
    report.comparisons.iter().find(|c| c.primary).unwrap()
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
    let series =
        "invalid input: kvab_request_duration_milliseconds_bucket{backend=\"nvlink\", source=\"split\"}";
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

#[test]
fn a_balanced_split_is_a_randomized_design_that_passes_the_sample_ratio_check() {
    let split = requests(&[("nvlink", "split", "1012"), ("fs", "split", "988")]);
    let found = design(&split, &arms());
    assert_eq!(found.kind, "randomized");
    assert_eq!(
        (found.split_share, found.header_share),
        (Some(1.0), Some(0.0))
    );
    assert_eq!(found.requests["nvlink"]["split"], 1012.0);
    let checked = assignment(&split, &arms(), &args().split, 0.001);
    // Binomial(2000, 1/2), 1012 or more either way: p ≈ 0.61.
    let p = checked.srm_p.unwrap();
    assert!((0.55..0.65).contains(&p), "{p}");
    assert_eq!(checked.srm_ok, Some(true));
    // Header-tagged requests leave it randomized: the split-assigned ones are compared and checked alone.
    let some_headers = requests(&[
        ("nvlink", "split", "1000"),
        ("fs", "split", "1000"),
        ("fs", "header", "40"),
    ]);
    let found = design(&some_headers, &arms());
    assert_eq!((found.kind, found.compared), ("randomized", "split"));
    assert_eq!(found.other_requests, 40.0);
    let checked = assignment(&some_headers, &arms(), &args().split, 0.001);
    assert_eq!(checked.split["fs"], 1000.0);
    assert_eq!(checked.srm_p, Some(1.0));
    // Untagged requests are no arm's, but vLLM's pods served them too.
    let untagged = requests(&[
        ("nvlink", "split", "1000"),
        ("fs", "split", "1000"),
        ("none", "none", "7"),
    ]);
    let found = design(&untagged, &arms());
    assert_eq!((found.kind, found.other_requests), ("randomized", 7.0));
    // One key-assigned request makes the window sticky: all tagged requests are described, none judged.
    let keyed = requests(&[
        ("nvlink", "split", "1000"),
        ("fs", "split", "1000"),
        ("fs", "key", "1"),
    ]);
    let found = design(&keyed, &arms());
    assert_eq!((found.kind, found.compared), ("sticky", "all"));
    // Without --split the ratio is not checked.
    let unchecked = assignment(&split, &arms(), &[], 0.001);
    assert_eq!(
        (unchecked.srm_p, unchecked.srm_ok, unchecked.weights),
        (None, None, None)
    );
}

#[test]
fn a_sample_ratio_mismatch_makes_the_analysis_invalid_whatever_the_comparison() {
    // 1000 against 850 split-assigned at weights 1:1: p ≈ 5e-4, below the 0.001 threshold.
    let mut lost = answers(&NVLINK, "850");
    let report = judged(&lost).unwrap();
    assert_eq!(report.assignment.srm_ok, Some(false));
    assert!(report.assignment.srm_p.unwrap() < 0.001);
    assert_eq!(report.verdict, Verdict::Invalid);
    assert_eq!(report.reasons.len(), 1, "{:?}", report.reasons);
    assert!(
        report.reasons[0].starts_with(
            "sample-ratio mismatch: split-assigned requests fs 1000, nvlink 850 against the weights of --split"
        ),
        "{}",
        report.reasons[0]
    );
    // The same counts against weights that say so pass.
    let report = judged_with(&lost, &args_with(&["--split", "nvlink=0.85,fs=1"])).unwrap();
    assert_eq!(report.assignment.srm_ok, Some(true));
    assert_eq!(report.verdict, Verdict::Decided, "{:?}", report.reasons);
    // A split request to an arm --split leaves out is a mismatch by itself.
    lost.requests = requests(&[("nvlink", "split", "1000"), ("fs", "split", "1")]);
    let report = judged_with(&lost, &args_with(&["--split", "nvlink=1"])).unwrap();
    assert_eq!(
        (report.assignment.srm_p, report.verdict),
        (Some(0.0), Verdict::Invalid)
    );
}

#[test]
fn arms_chosen_by_header_are_no_verdict_however_clear_the_difference() {
    let mut chosen = answers(&NVLINK, "1000");
    // Every tagged request chose by header: observational.
    chosen.requests = requests(&[("nvlink", "header", "900"), ("fs", "header", "700")]);
    chosen.duration = answer(
        &[
            buckets_of("nvlink", "other", &NVLINK),
            buckets_of("fs", "other", &FS),
        ]
        .concat(),
    );
    chosen.ttfb = chosen.duration.clone();
    let report = judged(&chosen).unwrap();
    assert_eq!(
        (report.design.kind, report.design.compared),
        ("observational", "all")
    );
    assert_eq!(report.design.header_share, Some(1.0));
    // The comparison is made and shown, but it is no verdict.
    assert_eq!(primary(&report).decision, Decision::Faster);
    assert_eq!(report.verdict, Verdict::Inconclusive);
    assert!(
        report.reasons[0].starts_with(
            "observational: no request was assigned by the split; 100 % of tagged requests chose their arm by \
             header (clients chose)"
        ),
        "{}",
        report.reasons[0]
    );
    // No tagged request at all.
    chosen.requests = requests(&[("nvlink", "split", "0"), ("fs", "split", "0")]);
    let report = judged(&chosen).unwrap();
    assert_eq!(report.design.kind, "none");
    assert_eq!(report.reasons[0], "no tagged request in the window");
    assert_eq!(report.verdict, Verdict::Inconclusive);
}

#[test]
fn an_arm_clearly_faster_is_decided_with_its_interval_and_effect() {
    let report = judged(&answers(&NVLINK, "1000")).unwrap();
    let c = primary(&report);
    assert_eq!(c.metric, "request_duration_ms");
    assert_eq!(
        (c.decision, c.faster.as_deref()),
        (Decision::Faster, Some("nvlink"))
    );
    assert_eq!((c.n["nvlink"], c.n["fs"]), (1000, 1000));
    // nvlink's median in (0, 50] ms, fs's in (100, 200]: the interval excludes 0, the shift is positive.
    let buckets = c.p50_bucket.as_ref().unwrap();
    assert_eq!(buckets["nvlink"], [0.0, 50.0]);
    assert_eq!(buckets["fs"], [100.0, 200.0]);
    let [lo, hi] = c.ci_ms.unwrap();
    assert!(lo > 0.0 && hi > lo, "{lo} {hi}");
    assert!(
        c.shift_ms.unwrap() > 100.0 && c.relative.unwrap() > 1.0,
        "{c:?}"
    );
    assert!(c.p_adjusted.unwrap() < 1e-10);
    assert_eq!(
        report.reasons,
        [
            "randomized: every tagged request was assigned by the split's random draw",
            "request_duration_ms: nvlink faster by 440.0% [100.0%, ∞]"
        ]
    );
    assert_eq!(report.verdict, Verdict::Decided);
    // The arms in the other order: fs is second, the shift negative, nvlink still the faster.
    let reversed = args_with(&["--arms", "fs,nvlink", "--split", "nvlink=1,fs=1"]);
    let report = judged_with(&answers(&NVLINK, "1000"), &reversed).unwrap();
    let c = primary(&report);
    assert_eq!(c.faster.as_deref(), Some("nvlink"));
    assert!(c.shift_ms.unwrap() < 0.0);
}

#[test]
fn arms_with_the_same_histogram_are_equivalent() {
    // 1000 requests an arm, 50 in each 1 ms bucket from 70 to 90 ms (below 100 ms Envoy keeps every
    // millisecond): the medians' intervals span two buckets, so the difference is within ±2 ms, ±2.5 %
    // of the median, inside --min-effect's 5 %.
    let cumulative: Vec<(String, String)> = (70..=90)
        .map(|le| (le.to_string(), ((le - 70) * 50).to_string()))
        .chain([("+Inf".to_string(), "1000".to_string())])
        .collect();
    let fine: Vec<(&str, &str)> = cumulative
        .iter()
        .map(|(le, n)| (le.as_str(), n.as_str()))
        .collect();
    let mut same = answers(&NVLINK, "1000");
    same.duration = answer(&[buckets("nvlink", &fine), buckets("fs", &fine)].concat());
    let report = judged(&same).unwrap();
    let c = primary(&report);
    assert_eq!(c.decision, Decision::Equivalent, "{c:?}");
    assert_eq!((c.faster.as_deref(), c.shift_ms), (None, Some(0.0)));
    assert_eq!(c.ci_ms, Some([-2.0, 2.0]));
    let [rlo, rhi] = c.relative_ci.unwrap();
    assert!(-0.05 < rlo && rhi < 0.05, "{rlo} {rhi}");
    assert_eq!(
        report.reasons[1],
        "request_duration_ms: equivalent (×1.000 [0.975, 1.025])"
    );
    assert_eq!(report.verdict, Verdict::Decided);
    // The same buckets from 90 to 110 ms: above 100 ms Envoy keeps 10 ms cells whatever the bounds, so
    // the buckets (100, 109] promise what the data cannot hold, and equivalent is refused.
    let above: Vec<(String, String)> = (90..=110)
        .map(|le| (le.to_string(), ((le - 90) * 50).to_string()))
        .chain([("+Inf".to_string(), "1000".to_string())])
        .collect();
    let above: Vec<(&str, &str)> = above
        .iter()
        .map(|(le, n)| (le.as_str(), n.as_str()))
        .collect();
    let mut coarse = answers(&NVLINK, "1000");
    coarse.duration = answer(&[buckets("nvlink", &above), buckets("fs", &above)].concat());
    let refused = primary(&judged(&coarse).unwrap()).clone();
    assert_eq!(refused.decision_text(), "inconclusive (resolution)");
    assert!(refused
        .resolution
        .and_then(|r| r.smallest_margin)
        .is_some_and(|m| (m - 0.1).abs() < 1e-9));
    // The same data with a margin of 1 %: the ±2.5 % interval is no longer inside it.
    let strict = args_with(&["--split", "nvlink=1,fs=1", "--min-effect", "0.01"]);
    let report = judged_with(&same, &strict).unwrap();
    assert_eq!(primary(&report).decision, Decision::Inconclusive);
    assert_eq!(report.verdict, Verdict::Inconclusive);
}

#[test]
fn too_little_traffic_or_a_wide_interval_is_inconclusive() {
    // 20 requests an arm, below --min-requests 200: no test is made.
    let few_fs = [("50", "0"), ("100", "2"), ("200", "18"), ("+Inf", "20")];
    let few_nvlink = [("50", "18"), ("100", "20"), ("200", "20"), ("+Inf", "20")];
    let mut few = answers(&few_nvlink, "20");
    few.duration = answer(&[buckets("nvlink", &few_nvlink), buckets("fs", &few_fs)].concat());
    few.requests = requests(&[("nvlink", "split", "20"), ("fs", "split", "20")]);
    let report = judged(&few).unwrap();
    let c = primary(&report);
    assert_eq!(
        (c.decision, c.p, c.ci_ms),
        (Decision::Inconclusive, None, None)
    );
    assert_eq!(
        report.reasons[1],
        "too little traffic in the window: nvlink 20, fs 20 request(s), fewer than --min-requests 200"
    );
    assert_eq!(report.verdict, Verdict::Inconclusive);
    // Enough requests, but both medians in the one wide bucket (100, 1000]: the interval spans 0 and
    // more than ±min_effect, so neither faster nor equivalent.
    let wide = [("100", "0"), ("1000", "1000"), ("+Inf", "1000")];
    let shifted = [("100", "0"), ("1000", "1000"), ("+Inf", "1000")];
    let mut coarse = answers(&wide, "1000");
    coarse.duration = answer(&[buckets("nvlink", &shifted), buckets("fs", &wide)].concat());
    coarse.ttfb = coarse.duration.clone();
    let report = judged(&coarse).unwrap();
    let c = primary(&report);
    let [lo, hi] = c.ci_ms.unwrap();
    assert!(lo < 0.0 && hi > 0.0, "{lo} {hi}");
    assert_eq!(c.decision, Decision::Inconclusive);
    // The reason says what the window could have found, and that (100, 1000] buckets allow no
    // equivalence within 5 %.
    assert_eq!(
        report.reasons[1],
        "request_duration_ms: inconclusive (80 % power from ×24.927); equivalent within 5.0 % cannot be \
         shown at this resolution: the medians' buckets are 900.0 % (nvlink) and 900.0 % (fs) wide, \
         allowing no margin below 900.0 %"
    );
    assert_eq!(report.verdict, Verdict::Inconclusive);
}

#[test]
fn the_comparison_alone_needs_both_arms() {
    let histogram = Histogram::from_cumulative(vec![("50", 10.0), ("+Inf", 300.0)]).unwrap();
    let args = args();
    let c = of_histograms(
        "request_duration_ms",
        true,
        &arms(),
        &[Some(histogram), None],
        InFamily {
            p: None,
            p_adjusted: 0.01,
            level: 0.05,
        },
        Rule {
            level: args.alpha,
            tost_level: args.alpha,
            min_effect: args.min_effect,
            tail_margin: args.tail_margin,
        },
        args.min_requests,
        kvab_judge::resolution::Keeping::Envoy,
        None,
    );
    assert_eq!(
        (c.n.len(), c.p, c.decision),
        (1, None, Decision::Inconclusive)
    );
}

#[test]
fn negative_and_non_monotone_buckets_are_refused_naming_the_series() {
    let negative = [
        ("50", "-3"),
        ("100", "990"),
        ("200", "1000"),
        ("+Inf", "1000"),
    ];
    assert_eq!(
        judged(&answers(&negative, "1000")).unwrap_err(),
        "invalid input: kvab_request_duration_milliseconds_bucket{backend=\"nvlink\", source=\"split\"}: \
         bucket le=\"50\": the count -3 is negative"
    );
    // On the secondary metric (time to first byte) too, named as such.
    let mut bad = answers(&NVLINK, "1000");
    let falling = [
        ("50", "900"),
        ("100", "990"),
        ("200", "500"),
        ("+Inf", "1000"),
    ];
    bad.ttfb = answer(&[buckets("fs", &falling), buckets("nvlink", &NVLINK)].concat());
    let message = judged(&bad).unwrap_err();
    assert!(
        message.starts_with(
            "invalid input: kvab_time_to_first_byte_milliseconds_bucket{backend=\"fs\", source=\"split\"}: bucket \
             le=\"200\" counts 500"
        ),
        "{message}"
    );
    // vLLM's histograms, bucket bounds that are no number.
    let mut bad = answers(&NVLINK, "1000");
    bad.vllm = vec![(
        "vllm_ttft_ms",
        "vllm:time_to_first_token_seconds_bucket",
        answer(&[
            sample(json!({"backend": "fs", "le": "soon"}), "1"),
            sample(json!({"backend": "fs", "le": "+Inf"}), "2"),
        ]),
    )];
    let message = judged(&bad).unwrap_err();
    assert!(
        message.starts_with(
            "invalid input: vllm:time_to_first_token_seconds_bucket{backend=\"fs\"}: "
        ),
        "{message}"
    );
}

// The recorded answers of tests/data/analyze-answers/ (README.md there), judged again from the file.

const RECORDINGS: [(&str, &str, &str); 3] = [
    (
        "decided",
        include_str!("../../../tests/data/analyze-answers/decided.json"),
        include_str!("../../../tests/data/analyze-answers/decided.report.json"),
    ),
    (
        "srm-mismatch",
        include_str!("../../../tests/data/analyze-answers/srm-mismatch.json"),
        include_str!("../../../tests/data/analyze-answers/srm-mismatch.report.json"),
    ),
    (
        "no-traffic",
        include_str!("../../../tests/data/analyze-answers/no-traffic.json"),
        include_str!("../../../tests/data/analyze-answers/no-traffic.report.json"),
    ),
];

/// The analysis flags of a recorded run, from its saved report.
fn flags_of(saved: &Value) -> Vec<String> {
    let method = &saved["method"];
    let arms: Vec<&str> = saved["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let mut flags = vec![
        "--arms".to_string(),
        arms.join(","),
        "--min-requests".into(),
        method["min_requests"].to_string(),
        "--alpha".into(),
        method["alpha"].to_string(),
        "--min-effect".into(),
        method["min_effect"].to_string(),
        "--srm-threshold".into(),
        method["srm_threshold"].to_string(),
    ];
    for margin in ["tail_margin", "error_margin"] {
        if let Some(value) = method.get(margin) {
            flags.extend([format!("--{}", margin.replace('_', "-")), value.to_string()]);
        }
    }
    if let Some(weights) = saved["assignment"]["weights"].as_object() {
        let split: Vec<String> = weights
            .iter()
            .map(|(arm, w)| format!("{arm}={w}"))
            .collect();
        flags.extend(["--split".to_string(), split.join(",")]);
    }
    flags
}

/// `now` holds every field of `saved` with the same value, but `reasons`, and `n` of a comparison rounded.
fn same_figures(name: &str, now: &Value, saved: &Value) {
    for (key, value) in saved.as_object().unwrap() {
        match key.as_str() {
            "reasons" => {}
            "comparisons" => {
                let (now, saved) = (now[key].as_array().unwrap(), value.as_array().unwrap());
                assert_eq!(now.len(), saved.len(), "{name}: comparisons");
                for (c, s) in now.iter().zip(saved) {
                    for (field, v) in s.as_object().unwrap() {
                        if field == "n" {
                            for (arm, n) in v.as_object().unwrap() {
                                let rounded = n.as_f64().unwrap().round() as u64;
                                assert_eq!(c[field][arm], rounded, "{name}: n of {arm}");
                            }
                        } else {
                            assert_eq!(&c[field], v, "{name}: comparison field {field}");
                        }
                    }
                }
            }
            _ => assert_eq!(&now[key], value, "{name}: {key}"),
        }
    }
}

async fn judged_recording(document: &Value, flags: &[String]) -> Result<Report, String> {
    let recording = Recording::from_document("recorded.json".into(), document)?;
    let window = recording.window();
    let mut source = Source::Recorded(recording);
    let command = ["analyze", "--answers", "recorded.json"];
    let args = Cli::try_parse_from(
        command
            .iter()
            .copied()
            .chain(flags.iter().map(String::as_str)),
    )
    .unwrap()
    .args;
    let (answers, queries) = fetch(&mut source, &args, &window).await?;
    judge(&answers, &args, window, queries)
}

#[tokio::test]
async fn the_recorded_answers_are_judged_to_their_saved_reports() {
    let mut verdicts = Vec::new();
    for (name, recorded, saved) in RECORDINGS {
        let document: Value = serde_json::from_str(recorded).unwrap();
        let flags = flags_of(&serde_json::from_str(saved).unwrap());
        let report = judged_recording(&document, &flags).await.unwrap();
        // The same decisions and figures as the report saved before the one judge (#28): every field but
        // the reasons (their wording is the one judge's, tests/test_analyze_answers.py checks it) and the
        // requests per arm, now whole requests.
        let now = serde_json::to_value(&report).unwrap();
        let saved: Value = serde_json::from_str(saved).unwrap();
        same_figures(name, &now, &saved);
        verdicts.push(report.verdict);
    }
    assert_eq!(
        verdicts,
        [Verdict::Decided, Verdict::Invalid, Verdict::Inconclusive]
    );
}

#[tokio::test]
async fn a_query_the_file_does_not_hold_is_an_error_naming_it() {
    let (_, recorded, _) = RECORDINGS[0];
    let document: Value = serde_json::from_str(recorded).unwrap();
    let error = judged_recording(&document, &["--selector".into(), "job=\"other\"".into()])
        .await
        .unwrap_err();
    // The recorded window's length, in whole seconds, as the queries write it.
    let seconds = Window::new(
        document["window"]["start"].as_f64().unwrap(),
        document["window"]["end"].as_f64().unwrap(),
    )
    .unwrap()
    .seconds;
    assert_eq!(
        error,
        format!(
            "query sum by (backend, source, le) (increase(kvab_request_duration_milliseconds_bucket{{job=\"other\"}}\
             [{seconds}s])): not in --answers recorded.json (--selector, --vllm-selector and --vllm-arm-label shape \
             the queries: are they as when it was recorded?)"
        )
    );
}

#[test]
fn a_file_of_answers_is_refused_naming_the_field() {
    let (_, recorded, _) = RECORDINGS[0];
    let good: Value = serde_json::from_str(recorded).unwrap();
    let refused = |edit: &dyn Fn(&mut Value)| {
        let mut document = good.clone();
        edit(&mut document);
        Recording::from_document("f".into(), &document).unwrap_err()
    };
    assert_eq!(
        refused(&|d| d["format"] = json!(null)),
        "format: wants \"kvab-analyze-answers\" (a file written by kvab analyze --save-answers), found null"
    );
    assert_eq!(
        refused(&|d| d["version"] = json!("1")),
        "version: this kvab reads version 1, found \"1\""
    );
    assert_eq!(
        refused(&|d| d["window"]["start"] = json!(-1)),
        "window.start: wants a time, Unix seconds"
    );
    assert_eq!(
        refused(&|d| d["window"]["start"] = d["window"]["end"].clone()),
        "window: start is not before end"
    );
    assert_eq!(
        refused(&|d| d["answers"] = json!({})),
        "answers: wants a list"
    );
    assert_eq!(
        refused(&|d| d["answers"] = json!(vec![json!({}); MAX_ANSWERS + 1])),
        "answers: 65 answers, more than the 64 a file may hold"
    );
    assert_eq!(
        refused(&|d| d["answers"][2]["time"] = json!(1.5)),
        "answers[2].time: wants a string"
    );
    assert_eq!(
        refused(&|d| d["answers"][4]["answer"] = json!("up 1")),
        "answers[4].answer: wants Prometheus's answer, an object"
    );
    let huge = "x".repeat(super::prometheus::MAX_ANSWER_BYTES);
    assert_eq!(
        refused(&|d| d["answers"][0]["answer"]["padding"] = json!(huge)),
        "answers[0].answer: longer than 16777216 bytes"
    );
    // A recorded error answer replays as the live error did: one line naming the query.
    let mut document = good.clone();
    document["answers"][0]["answer"] =
        json!({"status": "error", "errorType": "bad_data", "error": "x\u{1b}"});
    let recording = Recording::from_document("f".into(), &document).unwrap();
    let query = document["answers"][0]["query"]
        .as_str()
        .unwrap()
        .to_string();
    let error = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(Source::Recorded(recording).vector(&query))
        .unwrap_err();
    assert_eq!(error, format!("query {query}: bad_data: x\\u{{1b}}"));
}

#[tokio::test]
async fn a_live_source_keeps_what_it_was_answered_and_saves_it_to_be_read_back() {
    let body = json!({"status": "success", "data": {"resultType": "vector",
        "result": [{"metric": {"backend": "fs"}, "value": [1_796_252_038.6, "12"]}]}});
    let text = body.to_string();
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
        text.len()
    );
    let url = serve_once(Then::Answer(answer.into_bytes())).await;
    let client = kvab_serve::client::HttpClient::new(std::time::Duration::from_secs(10));
    let mut source = Source::live(Prometheus::new(client, &url, 1_796_252_038.6), true);
    let samples = source.vector("sum by (backend) (up)").await.unwrap();
    assert_eq!(samples[0].1, 12.0);
    let kept = source.kept().unwrap().to_vec();
    assert_eq!(
        kept,
        [Recorded {
            query: "sum by (backend) (up)".into(),
            time: "1796252038.600".into(),
            answer: body,
        }]
    );
    // Written (through a temporary file, renamed) and read back: the same answers, the same samples.
    let directory =
        std::env::temp_dir().join(format!("kvab-analyze-answers-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let path = directory.join("answers.json");
    let window = Window::new(1_796_252_028.6, 1_796_252_038.6).unwrap();
    save(&path, &kept, &window).unwrap();
    assert!(!directory.join("answers.json.tmp").exists());
    let written: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(written, document(&kept, &window));
    let mut replayed = Source::Recorded(Recording::read(&path).unwrap());
    assert_eq!(
        replayed.vector("sum by (backend) (up)").await.unwrap(),
        samples
    );
    assert!(replayed.kept().is_none());
    // A directory that does not exist: one line naming the flag.
    let error = save(&directory.join("no/such.json"), &kept, &window).unwrap_err();
    assert!(
        error.starts_with("--save-answers ") && !error.contains('\n'),
        "{error}"
    );
    std::fs::remove_dir_all(&directory).unwrap();
}

// Production at the unit of randomization: the split's requests compared alone.

/// A randomized window where header-chosen requests, far slower on nvlink, join the split's: left out,
/// the verdict is the split's (nvlink faster), never pulled by who chose what.
#[test]
fn header_chosen_requests_are_left_out_of_a_randomized_comparison() {
    let mut mixed = answers(&NVLINK, "1000");
    // 100 header-chosen requests per arm; nvlink's all beyond 200 ms, fs's all under 50 ms.
    let slow = [("50", "0"), ("100", "0"), ("200", "0"), ("+Inf", "100")];
    let quick = [
        ("50", "100"),
        ("100", "100"),
        ("200", "100"),
        ("+Inf", "100"),
    ];
    let header = [
        buckets_of("nvlink", "other", &slow),
        buckets_of("fs", "other", &quick),
    ]
    .concat();
    let split: Vec<Value> = [buckets("nvlink", &NVLINK), buckets("fs", &FS)].concat();
    mixed.duration = answer(&[split.clone(), header.clone()].concat());
    mixed.ttfb = mixed.duration.clone();
    mixed.requests = requests(&[
        ("nvlink", "split", "1000"),
        ("fs", "split", "1000"),
        ("nvlink", "header", "100"),
        ("fs", "header", "100"),
    ]);
    // The header-chosen requests failed on fs: not the split's error rate.
    mixed.responses = answer(&[
        sample(
            json!({"backend": "nvlink", "source": "split", "code_class": "2xx"}),
            "1000",
        ),
        sample(
            json!({"backend": "fs", "source": "split", "code_class": "2xx"}),
            "1000",
        ),
        sample(
            json!({"backend": "fs", "source": "header", "code_class": "5xx"}),
            "100",
        ),
    ]);
    let report = judged(&mixed).unwrap();
    assert_eq!(report.verdict, Verdict::Decided, "{:?}", report.reasons);
    assert_eq!(
        (report.design.kind, report.design.compared),
        ("randomized", "split")
    );
    let c = primary(&report);
    assert_eq!((c.n["nvlink"], c.n["fs"]), (1000, 1000));
    assert_eq!(c.faster.as_deref(), Some("nvlink"));
    assert_eq!(report.errors["fs"].count, 0.0);
    assert_eq!(report.errors["fs"].of, 1000.0);
    assert!(
        report.reasons[0].starts_with(
            "randomized: the 91 % of tagged requests assigned by the split's random draw are compared alone; \
             the other 9 % (header-chosen, default) are left out"
        ),
        "{:?}",
        report.reasons
    );
    // Described as a whole, the same window is no verdict: every tagged request is summed bound by bound.
    mixed.requests = requests(&[("nvlink", "header", "1100"), ("fs", "header", "1100")]);
    let all = judged(&mixed).unwrap();
    assert_eq!(
        (all.design.compared, all.verdict),
        ("all", Verdict::Inconclusive)
    );
    assert_eq!(primary(&all).n["nvlink"], 1100);
}

/// A window with key-assigned requests: no randomized verdict, with the reason, however clear the
/// difference.
#[test]
fn a_sticky_split_is_refused_with_the_reason() {
    let mut sticky = answers(&NVLINK, "1000");
    sticky.duration = answer(
        &[
            buckets_of("nvlink", "other", &NVLINK),
            buckets_of("fs", "other", &FS),
        ]
        .concat(),
    );
    sticky.ttfb = sticky.duration.clone();
    sticky.requests = requests(&[("nvlink", "key", "1000"), ("fs", "key", "1000")]);
    let report = judged(&sticky).unwrap();
    assert_eq!(report.design.kind, "sticky");
    assert_eq!(report.design.key_share, Some(1.0));
    assert_eq!(primary(&report).decision, Decision::Faster);
    assert_eq!(report.verdict, Verdict::Inconclusive);
    assert!(
        report.reasons[0].starts_with(
            "sticky: 100 % of tagged requests were assigned by their key (split.keyHeader)"
        ) && report.reasons[0].contains("Prometheus holds no per-key data"),
        "{:?}",
        report.reasons
    );
    // No split-assigned request: nothing for the sample-ratio check, never a false alarm.
    assert_eq!(report.assignment.srm_p, None);
}

/// Histograms without a `source` label (a filter that did not tell the split's requests apart) are no
/// randomized verdict, and vLLM's histograms leave a randomized comparison when other requests share the pods.
#[test]
fn unlabelled_histograms_and_vllms_mixed_histograms_are_no_randomized_evidence() {
    let mut old = answers(&NVLINK, "1000");
    let unlabelled = |arm: &str, cumulative: &[(&str, &str)]| -> Vec<Value> {
        cumulative
            .iter()
            .map(|(le, v)| sample(json!({"backend": arm, "le": le}), v))
            .collect()
    };
    old.duration = answer(&[unlabelled("nvlink", &NVLINK), unlabelled("fs", &FS)].concat());
    let report = judged(&old).unwrap();
    assert_eq!(report.verdict, Verdict::Inconclusive);
    assert!(
        report
            .reasons
            .iter()
            .any(|r| r.starts_with("the latency histograms carry no source label")),
        "{:?}",
        report.reasons
    );

    let mut shared = answers(&NVLINK, "1000");
    shared.vllm = vec![(
        "vllm_ttft_ms",
        "vllm:time_to_first_token_seconds_bucket",
        answer(&[unlabelled("nvlink", &NVLINK), unlabelled("fs", &FS)].concat()),
    )];
    assert_eq!(
        judged(&shared).unwrap().comparisons.len(),
        3,
        "every request split-assigned: vLLM's joins"
    );
    shared.requests = requests(&[
        ("nvlink", "split", "1000"),
        ("fs", "split", "1000"),
        ("nvlink", "header", "50"),
    ]);
    let report = judged(&shared).unwrap();
    assert_eq!(report.comparisons.len(), 2);
    assert_eq!(report.verdict, Verdict::Decided, "{:?}", report.reasons);
    assert!(
        report
            .reasons
            .iter()
            .any(|r| r.starts_with("vllm_ttft_ms left out: vLLM's histograms count every request")),
        "{:?}",
        report.reasons
    );
}
