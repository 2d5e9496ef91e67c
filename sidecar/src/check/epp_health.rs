//! EPP health: the scheduler's log since the check started must not show the runbook's selection failures.

use super::options::Options;
use super::report::{signals, Check, Outcome};
use crate::cluster;

/// Reads the log of every pod of `--epp-deployment` since `since_seconds` ago and judges it; local mode has
/// no EPP.
pub async fn check(
    options: &Options,
    cluster: Option<&cluster::Cluster>,
    since_seconds: i64,
) -> Check {
    let Some(cluster) = cluster else {
        return Check::new(
            "epp/health",
            "no selection failures in the EPP log",
            "local mode: no EPP",
            Outcome::Skip,
        );
    };
    let names = &options.cluster;
    match cluster
        .deployment_logs(&names.epp_namespace, &names.epp_deployment, since_seconds)
        .await
    {
        Ok(logs) => judge_epp_logs(&logs),
        Err(e) => Check::new("epp/health", "EPP log readable", e.message, Outcome::Inconclusive)
            .diagnosis(
                "cannot read the scheduler's log: check --epp-namespace, --epp-deployment and the RBAC in docs/check.md",
            ),
    }
}

/// What the EPP logs when no endpoint can take a request (case-insensitive), by EPP version:
/// - GAIE up to v1.4 (llm-d-inference-scheduler up to v0.7): the code `InferencePoolResourceExhausted`
///   (GAIE v1.4.0 pkg/epp/util/error/error.go), the runbook's grep;
/// - GAIE v1.5.0 (the EPP of llm-d-inference-scheduler v0.8.0 and the llm-d router after it): the code was
///   renamed `ResourceExhausted` (pkg/common/error/error.go), logged as `inference error: ResourceExhausted - <msg>`
///   (llm-d-router v0.10.0 pkg/epp/handlers/server.go logs it with "Failed to process request" at the
///   default level);
/// - every version: `failed to run scheduler profile`, which llm-d-router v0.10.0 logs only at verbose level
///   (pkg/epp/scheduling/scheduler.go), so it shows only with a raised `-v`.
pub const FAILURE_PATTERNS: [&str; 3] = [
    "InferencePoolResourceExhausted",
    "inference error: ResourceExhausted",
    "failed to run scheduler profile",
];

/// Judges the EPP logs (one text per pod) read since the check started.
pub fn judge_epp_logs(logs: &[(String, String)]) -> Check {
    let expected = format!(
        "no {} in the EPP log since the check started",
        FAILURE_PATTERNS.join(" / ")
    );
    let patterns: Vec<String> = FAILURE_PATTERNS.iter().map(|p| p.to_lowercase()).collect();
    let mut hits: Vec<(String, &str)> = Vec::new();
    let mut lines = 0;
    for (pod, text) in logs {
        for line in text.lines() {
            lines += 1;
            let lower = line.to_lowercase();
            if patterns.iter().any(|p| lower.contains(p.as_str())) {
                hits.push((pod.clone(), line));
            }
        }
    }
    if logs.is_empty() {
        return Check::new(
            "epp/health",
            expected,
            "no EPP pod found",
            Outcome::Inconclusive,
        )
        .diagnosis("cannot read the scheduler's log: check --epp-deployment and --epp-namespace");
    }
    if hits.is_empty() {
        return Check::new(
            "epp/health",
            expected,
            format!("{lines} log lines from {} pod(s), no match", logs.len()),
            Outcome::Pass,
        );
    }
    let exhausted = hits.iter().any(|(_, l)| {
        let lower = l.to_lowercase();
        patterns[..2].iter().any(|p| lower.contains(p.as_str()))
    });
    let (pod, first) = &hits[0];
    let sample: String = first.chars().take(160).collect();
    Check::new(
        "epp/health",
        expected,
        format!(
            "{} matching line(s), first from {pod}: {sample}",
            hits.len()
        ),
        Outcome::Fail,
    )
    .diagnosis(if exhausted {
        signals::RESOURCE_EXHAUSTED.to_string()
    } else {
        format!(
            "the scheduler could not pick a proxy for some requests; {}",
            signals::RESOURCE_EXHAUSTED
        )
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_log_passes_and_the_runbook_patterns_fail() {
        let clean = vec![(
            "epp-1".to_string(),
            "I0101 scheduled request\nI0101 picked 10.0.0.5:8080\n".to_string(),
        )];
        assert_eq!(judge_epp_logs(&clean).result, Outcome::Pass);

        let exhausted = vec![(
            "epp-1".to_string(),
            "ok\n{\"level\":\"error\",\"msg\":\"failed to schedule\",\"error\":\"inferencepoolresourceexhausted: no pods\"}\n".to_string(),
        )];
        let check = judge_epp_logs(&exhausted);
        assert_eq!(check.result, Outcome::Fail);
        assert!(check.diagnosis.unwrap().contains("failure signal 1"));

        // GAIE v1.5.0's name, in its log format.
        let renamed = vec![(
            "epp-3".to_string(),
            "{\"level\":\"error\",\"msg\":\"Error handling request\",\"error\":\"inference error: ResourceExhausted - failed to find candidate endpoints\"}".to_string(),
        )];
        let check = judge_epp_logs(&renamed);
        assert_eq!(check.result, Outcome::Fail);
        assert_eq!(
            check.diagnosis.as_deref(),
            Some(signals::RESOURCE_EXHAUSTED)
        );
        // A gRPC status code of the same name elsewhere is not the scheduler's failure.
        let grpc = vec![(
            "epp-4".to_string(),
            "rpc error: code = ResourceExhausted desc = body too large".to_string(),
        )];
        assert_eq!(judge_epp_logs(&grpc).result, Outcome::Pass);

        let profile = vec![(
            "epp-2".into(),
            "E0101 Failed to run scheduler profile default: no candidates".into(),
        )];
        let check = judge_epp_logs(&profile);
        assert_eq!(check.result, Outcome::Fail);
        assert!(check.measured.contains("epp-2"));
        assert_eq!(judge_epp_logs(&[]).result, Outcome::Inconclusive);
    }
}
