//! Unit tests of analyze: its design, sample-ratio and comparison logic and its refusals, on answers
//! scripted as Prometheus writes them, and the recorded answers of tests/data/analyze-answers/ judged
//! again to their saved reports.
#![allow(clippy::unwrap_used)]

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
