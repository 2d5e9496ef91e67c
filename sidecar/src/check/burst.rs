//! Step 4, the active-request-scorer burst: a bounded load loop (count, concurrency, wall-clock limit), the
//! status histogram, and the test that the untagged traffic spread over every proxy of the pool as expected
//! rather than being pinned to one.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvab_contract::report::{NO_ARM, UNKNOWN_ARM};

use super::observe::Counters;
use super::options::Arm;
use super::report::{signals, Check, Outcome};
use kvab_judge::stats::{split_test, SplitMethod};
use kvab_serve::client::{Exchange, HttpClient, Request};

pub type Shot = Result<Exchange, String>;

/// Sends `request` `count` times, `concurrency` at a time, stopping early when `time_limit` has passed.
pub async fn run(
    client: &HttpClient,
    request: &Request,
    count: u32,
    concurrency: u32,
    time_limit: Duration,
    show_progress: bool,
) -> Vec<Shot> {
    let next = Arc::new(AtomicU32::new(0));
    let deadline = Instant::now() + time_limit;
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..concurrency.min(count) {
        let (client, request, next, sender) = (
            client.clone(),
            request.clone(),
            next.clone(),
            sender.clone(),
        );
        tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let shot = match tokio::time::timeout(remaining, client.send(&request)).await {
                    Ok(shot) => shot,
                    Err(_) => Err("cut off by the burst time limit".to_string()),
                };
                if sender.send(shot).is_err() {
                    break;
                }
            }
        });
    }
    drop(sender);
    let mut progress = Progress::new(count, show_progress);
    let mut shots = Vec::with_capacity(count as usize);
    while let Some(shot) = receiver.recv().await {
        progress.record(&shot);
        shots.push(shot);
    }
    progress.finish();
    shots
}

/// A one-line progress bar on stderr, drawn only on a terminal.
struct Progress {
    total: u32,
    done: u32,
    statuses: BTreeMap<String, u32>,
    enabled: bool,
}

impl Progress {
    fn new(total: u32, wanted: bool) -> Self {
        Self {
            total,
            done: 0,
            statuses: BTreeMap::new(),
            enabled: wanted && std::io::stderr().is_terminal(),
        }
    }

    fn record(&mut self, shot: &Shot) {
        self.done += 1;
        *self.statuses.entry(status_label(shot)).or_default() += 1;
        if self.enabled {
            const WIDTH: u32 = 30;
            let filled = (self.done * WIDTH / self.total.max(1)) as usize;
            let counts: Vec<String> = self
                .statuses
                .iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect();
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\rburst [{}{}] {}/{} {}",
                "#".repeat(filled),
                ".".repeat(WIDTH as usize - filled),
                self.done,
                self.total,
                counts.join(" ")
            );
            let _ = err.flush();
        }
    }

    fn finish(&self) {
        if self.enabled {
            eprintln!();
        }
    }
}

/// `200`, `503`, ... or `000` when no HTTP answer came (curl's `%{http_code}`).
pub fn status_label(shot: &Shot) -> String {
    match shot {
        Ok(e) => e.status.to_string(),
        Err(_) => "000".to_string(),
    }
}

pub fn histogram(shots: &[Shot]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for shot in shots {
        *counts.entry(status_label(shot)).or_default() += 1;
    }
    counts
}

pub fn render_histogram(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k}×{v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// "Burst returns mostly/all 200".
pub fn judge_status(shots: &[Shot], planned: u32, min_success_ratio: f64) -> Check {
    let expected = format!(
        "≥ {:.0}% of {planned} answered 200",
        min_success_ratio * 100.0
    );
    if shots.is_empty() {
        return Check::new(
            "step4/status",
            expected,
            "no request sent",
            Outcome::Inconclusive,
        )
        .diagnosis("no traffic: nothing to judge (--burst-requests 0?)");
    }
    let counts = histogram(shots);
    let ok = counts.get("200").copied().unwrap_or(0);
    let mut measured = render_histogram(&counts);
    if (shots.len() as u32) < planned {
        measured.push_str(&format!(
            " ({} of {planned} sent before the time limit)",
            shots.len()
        ));
    }
    let ratio = ok as f64 / planned.max(1) as f64;
    let result = if ratio >= min_success_ratio {
        Outcome::Pass
    } else {
        Outcome::Fail
    };
    let first_error = shots.iter().find_map(|s| match s {
        Err(e) => Some(e.clone()),
        Ok(e) if e.status != 200 => {
            Some(String::from_utf8_lossy(&e.body).chars().take(120).collect())
        }
        Ok(_) => None,
    });
    let dropped = dropped_reasons(shots);
    if !dropped.is_empty() {
        measured.push_str(&format!(
            "; dropped by flow control: {}",
            render_histogram(&dropped)
        ));
    }
    let cause = if !dropped.is_empty() {
        let reasons: Vec<String> = dropped
            .keys()
            .map(|reason| format!("{reason}: {}", dropped_reason_diagnosis(reason)))
            .collect();
        format!(
            "the llm-d router's flow control dropped requests ({DROPPED_REASON_HEADER}): {}",
            reasons.join("; ")
        )
    } else if counts.contains_key("429") || counts.contains_key("503") {
        format!(
            "429/503 from the scheduler: it found no proxy to pick; {}",
            signals::RESOURCE_EXHAUSTED
        )
    } else {
        "requests through the gateway fail: check the gateway, the proxies and the EPP".to_string()
    };
    Check::new("step4/status", expected, measured, result).diagnosis_unless_pass(
        match first_error {
            Some(e) => format!("{cause} (first error: {e})"),
            None => cause,
        },
    )
}

/// The header llm-d-router's EPP sets on the 429/503 answers of requests its flow control rejected before
/// dispatch or evicted after it (v0.10.0 pkg/common/error/error.go: RequestDroppedReasonHeaderKey; set in
/// pkg/epp/requestcontrol/admission.go and, for evictions, pkg/epp/handlers/server.go).
pub const DROPPED_REASON_HEADER: &str = "x-llm-d-request-dropped-reason";

/// Answers by dropped reason: 429 and 503 answers that carry `DROPPED_REASON_HEADER`.
fn dropped_reasons(shots: &[Shot]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for exchange in shots.iter().flatten() {
        if matches!(exchange.status, 429 | 503) {
            if let Some(reason) = exchange.header(DROPPED_REASON_HEADER) {
                *counts.entry(reason.to_string()).or_default() += 1;
            }
        }
    }
    counts
}

/// What a dropped reason means for the burst and what to change. The reasons and their status codes are
/// llm-d-router v0.10.0's (pkg/common/error/error.go, pkg/epp/requestcontrol/admission.go).
fn dropped_reason_diagnosis(reason: &str) -> &'static str {
    match reason {
        "rejected-saturated" => {
            "429, the saturation detector found the pool full before dispatch: the burst is more than \
             the proxies take at once; lower --concurrency or raise flowControl.saturationDetector's \
             thresholds in the EPP configuration"
        }
        "rejected-no-endpoints" => {
            "503, no endpoint passed the filters: no ready proxy, or the label selector filter keeps \
             none (failure signal 3: check the proxies' labels and the filter's selector)"
        }
        "rejected-ttl-expired" => {
            "429, queued longer than flowControl.defaultRequestTTL: the pool is saturated for longer \
             than the TTL; lower --concurrency or raise the TTL"
        }
        "rejected-context-cancelled" => {
            "503, the client gave up while the request was queued: kvab's request timeout is shorter \
             than the queueing; raise --max-time or lower --concurrency"
        }
        "rejected-shutting-down" => {
            "503, the EPP was shutting down (a rollout or restart): run the check again once it is ready"
        }
        "evicted" | "evicted-queue-pressure" | "evicted-priority" => {
            "429, dispatched and then evicted by flow control to make room (queue pressure or a higher \
             priority): the pool is overloaded at this concurrency"
        }
        _ => "a reason this version of kvab does not know: see the EPP's flow control documentation",
    }
}

/// "Not pinned": every proxy of the pool got traffic, judged against the expected split.
///
/// `pool` lists (arm, pod) of every ready proxy; `counts` are requests per pod; `split` gives per-arm
/// weights (empty: every proxy equally). The two-sided test (exact binomial for two proxies, chi-square
/// beyond) asks whether a split this far from the expected one is plausible by chance:
/// - nothing counted: inconclusive, never a pass;
/// - p < alpha: fail, "pinned" when a proxy got nothing, else "skewed";
/// - a proxy got nothing but p ≥ alpha: inconclusive (too few requests to tell pinning from chance);
/// - otherwise pass.
pub fn judge_spread(
    pool: &[(String, String)],
    counts: &BTreeMap<String, f64>,
    split: &BTreeMap<String, f64>,
    alpha: f64,
    source: &str,
) -> Check {
    let name = "step4/not-pinned";
    let proxies_of = |arm: &str| pool.iter().filter(|(a, _)| a == arm).count() as f64;
    let weights: Vec<f64> = pool
        .iter()
        .map(|(arm, _)| {
            if split.is_empty() {
                1.0
            } else {
                split.get(arm).copied().unwrap_or(0.0) / proxies_of(arm)
            }
        })
        .collect();
    let weight_sum: f64 = weights.iter().sum();
    let expected = format!(
        "every proxy gets traffic; split {} not rejected at α={alpha}",
        pool.iter()
            .zip(&weights)
            .map(|((_, pod), w)| format!(
                "{pod} {:.0}%",
                100.0 * w / weight_sum.max(f64::MIN_POSITIVE)
            ))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    if pool.is_empty() {
        return Check::new(
            name,
            expected,
            "no proxy in the pool",
            Outcome::Inconclusive,
        )
        .diagnosis("the sidecar's map lists no ready proxy: see prerequisites");
    }
    let observed: Vec<u64> = pool
        .iter()
        .map(|(_, pod)| counts.get(pod).copied().unwrap_or(0.0).round() as u64)
        .collect();
    let outside: f64 = counts
        .iter()
        .filter(|(pod, _)| !pool.iter().any(|(_, p)| &p == pod))
        .map(|(_, v)| v)
        .sum();
    let total: u64 = observed.iter().sum();
    let mut measured = pool
        .iter()
        .zip(&observed)
        .map(|((_, pod), n)| format!("{pod} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    measured.push_str(&format!(" of {total} ({source})"));
    if outside > 0.0 {
        measured.push_str(&format!("; {outside} to endpoints outside the pool"));
    }
    let Some(test) = split_test(&observed, &weights).filter(|_| weights.iter().all(|w| *w > 0.0))
    else {
        let (result, diagnosis) = if total == 0 && source == NO_ENDPOINT_TAGS {
            (
                Outcome::Inconclusive,
                "the burst was answered, but the gateway's filter does not tag answers with their \
                 endpoint (responseEndpointHeader: false, as manifests/wasmplugin.yaml ships it) and \
                 kvab serve's map and counters were not read, so nothing attributes the answers to \
                 proxies: give --sidecar-url, or set responseEndpointHeader: true while the check runs"
                    .to_string(),
            )
        } else if total == 0 {
            (
                Outcome::Inconclusive,
                format!("no traffic observed: nothing shows the burst reached a proxy ({source})"),
            )
        } else {
            (
                Outcome::Inconclusive,
                "--split gives a proxy of the pool no weight: nothing to test".into(),
            )
        };
        return Check::new(name, expected, measured, result).diagnosis(diagnosis);
    };
    let method = match test.method {
        SplitMethod::Binomial => "binomial",
        SplitMethod::ChiSquare => "chi-square",
        SplitMethod::None => "single proxy",
    };
    measured.push_str(&format!(
        "; {method} p={}",
        kvab_judge::stats::format_p(test.p_value)
    ));
    let starved: Vec<&str> = pool
        .iter()
        .zip(&observed)
        .filter(|(_, n)| **n == 0)
        .map(|((_, pod), _)| pod.as_str())
        .collect();
    if test.p_value < alpha {
        let diagnosis = if starved.is_empty() {
            format!("traffic is skewed away from the expected split (set --split if it is intended); {}", signals::NO_TRAFFIC)
        } else {
            format!(
                "pinned: {} got no traffic; {}",
                starved.join(", "),
                signals::NO_TRAFFIC
            )
        };
        Check::new(name, expected, measured, Outcome::Fail).diagnosis(diagnosis)
    } else if !starved.is_empty() {
        Check::new(name, expected, measured, Outcome::Inconclusive).diagnosis(format!(
            "{} got no traffic, but {total} requests are too few to tell pinning from chance: raise --burst-requests",
            starved.join(", ")
        ))
    } else {
        Check::new(name, expected, measured, Outcome::Pass)
    }
}

/// Step 4's pool, `(arm, proxy)`, and what each proxy answered below 500, with where the counts come from:
/// the sidecar's map and counters when both are there, else the proxy URLs and the responses' endpoint tag.
pub fn pool_and_counts(
    map: Option<&[(String, String, String, bool)]>,
    delta: &Counters,
    proxies: &[(Arm, Result<String, String>)],
    shots: &[Shot],
    endpoint_header: &str,
) -> (Vec<(String, String)>, BTreeMap<String, f64>, &'static str) {
    if let (Some(map), Some(_)) = (map, &delta.routed) {
        let pool = map
            .iter()
            .filter(|(.., ready)| *ready)
            .map(|(arm, pod, ..)| (arm.clone(), pod.clone()))
            .collect();
        return (
            pool,
            delta.answered_by_pod(NO_ARM),
            "sidecar counters, answers below 500",
        );
    }
    let pool = proxies
        .iter()
        .filter_map(|(arm, url)| {
            url.as_ref().ok().map(|u| {
                (
                    arm.name.clone(),
                    u.trim_start_matches("http://").to_string(),
                )
            })
        })
        .collect();
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    let mut untagged = 0;
    for exchange in shots.iter().flatten().filter(|e| e.status < 500) {
        match exchange.header(endpoint_header) {
            Some(endpoint) => *counts.entry(endpoint.to_string()).or_default() += 1.0,
            None => untagged += 1,
        }
    }
    if counts.is_empty() && untagged > 0 {
        return (pool, counts, NO_ENDPOINT_TAGS);
    }
    (pool, counts, "response endpoint tags, answers below 500")
}

/// Step 4's source when the proxies answered but no answer names its endpoint.
const NO_ENDPOINT_TAGS: &str = "answers below 500, none with an endpoint tag";

/// "No misroutes": over the whole check, no request tagged for one arm was served by another.
pub fn judge_misroutes(delta: &Counters, arms: &[Arm]) -> Check {
    let name = "step4/misroutes";
    let expected = "0 requests served by an arm other than the one requested";
    let mut tagged = 0.0;
    let mut misrouted: BTreeMap<String, f64> = BTreeMap::new();
    let mut unknown = 0.0;
    let mut source = "";
    let mut count = |requested: &str, served: &str, value: f64| {
        tagged += value;
        if served == UNKNOWN_ARM {
            unknown += value;
        } else if served != requested && served != NO_ARM {
            *misrouted
                .entry(format!("{requested}→{served}"))
                .or_default() += value;
        }
    };
    if let Some(routed) = &delta.routed {
        source = "sidecar";
        for ((requested, served, _, _), v) in routed {
            if arms.iter().any(|a| &a.name == requested) {
                count(requested, served, *v);
            }
        }
    } else if let Some(served) = &delta.served {
        source = "filter";
        for ((requested, s), v) in served {
            if arms.iter().any(|a| &a.name == requested) {
                count(requested, s, *v);
            }
        }
    }
    // Sums start at -0.0; counts are whole numbers.
    let total_misrouted: f64 = misrouted.values().sum::<f64>() + 0.0;
    let mut measured = format!(
        "{total_misrouted} of {tagged} tagged requests misrouted{}",
        if misrouted.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                misrouted
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    if unknown > 0.0 {
        measured.push_str(&format!("; {unknown} with served=unknown (stale map)"));
    }
    if !source.is_empty() {
        measured.push_str(&format!(" ({source} counters)"));
    }
    if total_misrouted > 0.0 {
        Check::new(name, expected, measured, Outcome::Fail).diagnosis(signals::HEADER_MISMATCH)
    } else if tagged == 0.0 {
        Check::new(name, expected, measured, Outcome::Inconclusive)
            .diagnosis("no tagged request was counted: the counters cannot show misroutes (is the filter linked to kvab serve?)")
    } else {
        Check::new(name, expected, measured, Outcome::Pass)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn answered(status: u16, endpoint: &str) -> Shot {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-kv-backend-endpoint", endpoint.parse().unwrap());
        Ok(Exchange {
            status,
            headers,
            body: bytes::Bytes::new(),
            time_to_first_byte: Duration::ZERO,
            total: Duration::ZERO,
        })
    }

    #[test]
    fn the_pool_comes_from_the_sidecar_when_it_counted_else_from_the_response_tags() {
        let map = vec![
            (
                "nvlink".to_string(),
                "ns/a".to_string(),
                "10.0.0.1:8080".to_string(),
                true,
            ),
            (
                "fs".to_string(),
                "ns/b".to_string(),
                "10.0.0.2:8080".to_string(),
                false,
            ),
        ];
        let counted = Counters {
            routed: Some(BTreeMap::from([
                (
                    ("none".into(), "nvlink".into(), "ns/a".into(), "2xx".into()),
                    4.0,
                ),
                (
                    ("none".into(), "nvlink".into(), "ns/a".into(), "5xx".into()),
                    9.0,
                ),
                (("fs".into(), "fs".into(), "ns/b".into(), "2xx".into()), 7.0),
            ])),
            served: None,
        };
        let arms = crate::check::options::Options::default().arms;
        let proxies = vec![
            (arms[0].clone(), Ok("http://127.0.0.1:18101".to_string())),
            (arms[1].clone(), Err("no --proxy-url".to_string())),
        ];
        let shots = vec![
            answered(200, "127.0.0.1:18101"),
            answered(503, "127.0.0.1:18101"),
            Err("timeout".into()),
        ];
        let header = "x-kv-backend-endpoint";
        let (pool, counts, source) =
            pool_and_counts(Some(&map), &counted, &proxies, &shots, header);
        assert_eq!(
            pool,
            vec![("nvlink".to_string(), "ns/a".to_string())],
            "ready only"
        );
        assert_eq!(
            counts,
            BTreeMap::from([("ns/a".to_string(), 4.0)]),
            "untagged, below 500"
        );
        assert!(source.starts_with("sidecar counters"));

        let uncounted = Counters::default();
        let (pool, counts, source) =
            pool_and_counts(Some(&map), &uncounted, &proxies, &shots, header);
        assert_eq!(
            pool,
            vec![("nvlink".to_string(), "127.0.0.1:18101".to_string())]
        );
        assert_eq!(
            counts,
            BTreeMap::from([("127.0.0.1:18101".to_string(), 1.0)])
        );
        assert!(source.starts_with("response endpoint tags"));
    }

    fn dropped(status: u16, reason: &str) -> Shot {
        let mut shot = answered(status, "127.0.0.1:1");
        if let Ok(exchange) = &mut shot {
            exchange
                .headers
                .insert(DROPPED_REASON_HEADER, reason.parse().unwrap());
        }
        shot
    }

    #[test]
    fn dropped_requests_are_counted_by_reason_with_the_flow_control_diagnosis() {
        let mut shots: Vec<Shot> = (0..10).map(|_| answered(200, "127.0.0.1:1")).collect();
        shots.extend((0..6).map(|_| dropped(429, "rejected-saturated")));
        shots.extend((0..3).map(|_| dropped(503, "rejected-no-endpoints")));
        // Only 429/503 answers are counted as dropped, whatever header another status carries.
        shots.push(dropped(500, "rejected-saturated"));
        let check = judge_status(&shots, 20, 0.95);
        assert_eq!(check.result, Outcome::Fail);
        assert!(
            check
                .measured
                .contains("dropped by flow control: rejected-no-endpoints×3 rejected-saturated×6"),
            "{check:?}"
        );
        let diagnosis = check.diagnosis.unwrap();
        assert!(
            diagnosis.contains("flow control dropped requests (x-llm-d-request-dropped-reason)"),
            "{diagnosis}"
        );
        assert!(diagnosis.contains("rejected-saturated: 429, the saturation detector"));
        assert!(diagnosis.contains("rejected-no-endpoints: 503, no endpoint passed the filters"));
        assert!(
            !diagnosis.contains("failure signal 1"),
            "a flow-control drop is not the scheduler's ResourceExhausted: {diagnosis}"
        );

        // Without the header, 429/503 keep the runbook's failure signal 1.
        let mut plain: Vec<Shot> = (0..10).map(|_| answered(200, "127.0.0.1:1")).collect();
        plain.extend((0..10).map(|_| answered(429, "127.0.0.1:1")));
        let check = judge_status(&plain, 20, 0.95);
        assert!(!check.measured.contains("dropped"), "{check:?}");
        assert!(check.diagnosis.unwrap().contains("failure signal 1"));

        let unknown = judge_status(&[dropped(429, "rejected-new-reason")], 1, 0.95);
        assert!(unknown
            .diagnosis
            .unwrap()
            .contains("rejected-new-reason: a reason"));
    }

    fn pool() -> Vec<(String, String)> {
        vec![
            ("nvlink".into(), "p2p-proxy".into()),
            ("fs".into(), "fs-proxy".into()),
        ]
    }

    fn counts(a: f64, b: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([("p2p-proxy".to_string(), a), ("fs-proxy".to_string(), b)])
    }

    #[test]
    fn an_even_burst_passes_and_a_pinned_one_fails() {
        let even = judge_spread(
            &pool(),
            &counts(11.0, 9.0),
            &BTreeMap::new(),
            0.01,
            "sidecar",
        );
        assert_eq!(even.result, Outcome::Pass, "{even:?}");
        assert!(
            even.measured
                .contains("p2p-proxy 11, fs-proxy 9 of 20 (sidecar); binomial p="),
            "{even:?}"
        );
        let pinned = judge_spread(
            &pool(),
            &counts(20.0, 0.0),
            &BTreeMap::new(),
            0.01,
            "sidecar",
        );
        assert_eq!(pinned.result, Outcome::Fail);
        assert!(pinned
            .diagnosis
            .unwrap()
            .contains("pinned: fs-proxy got no traffic; failure signal 3"));
    }

    #[test]
    fn more_than_zero_is_not_enough_and_zero_is_not_always_pinned() {
        // 19 / 1 of an even split: binomial p = 2·21/2^20 = 4.0e-5, a skew far beyond chance.
        let skewed = judge_spread(
            &pool(),
            &counts(19.0, 1.0),
            &BTreeMap::new(),
            0.01,
            "sidecar",
        );
        assert_eq!(skewed.result, Outcome::Fail);
        assert!(skewed.diagnosis.unwrap().contains("skewed"));
        // 3 / 0: p = 0.25, too few requests to call it pinned.
        let few = judge_spread(
            &pool(),
            &counts(3.0, 0.0),
            &BTreeMap::new(),
            0.01,
            "sidecar",
        );
        assert_eq!(few.result, Outcome::Inconclusive);
        // The expected split matters: 15 / 5 is fine for a 3:1 split.
        let split = BTreeMap::from([("nvlink".to_string(), 3.0), ("fs".to_string(), 1.0)]);
        assert_eq!(
            judge_spread(&pool(), &counts(15.0, 5.0), &split, 0.01, "s").result,
            Outcome::Pass
        );
    }

    #[test]
    fn no_traffic_is_inconclusive_never_a_pass() {
        let none = judge_spread(&pool(), &BTreeMap::new(), &BTreeMap::new(), 0.01, "sidecar");
        assert_eq!(none.result, Outcome::Inconclusive);
        assert!(none.diagnosis.unwrap().contains("no traffic observed"));
        assert_eq!(judge_status(&[], 20, 0.95).result, Outcome::Inconclusive);
        assert_eq!(
            judge_misroutes(&Counters::default(), &[]).result,
            Outcome::Inconclusive
        );
    }

    #[test]
    fn misroutes_are_counted_from_the_sidecar() {
        let arms = crate::check::options::Options::default().arms;
        let key = |r: &str, s: &str| {
            (
                r.to_string(),
                s.to_string(),
                "pod".to_string(),
                "2xx".to_string(),
            )
        };
        let delta = Counters {
            routed: Some(BTreeMap::from([
                (key("nvlink", "fs"), 3.0),
                (key("fs", "fs"), 3.0),
                (key("none", "fs"), 9.0),
            ])),
            served: None,
        };
        let check = judge_misroutes(&delta, &arms);
        assert_eq!(check.result, Outcome::Fail);
        assert!(
            check
                .measured
                .starts_with("3 of 6 tagged requests misrouted (nvlink→fs 3)"),
            "{check:?}"
        );
        let clean = Counters {
            routed: Some(BTreeMap::from([(key("fs", "fs"), 3.0)])),
            served: None,
        };
        assert_eq!(judge_misroutes(&clean, &arms).result, Outcome::Pass);
    }
}
