//! The runbook's prerequisites: proxy and prefill/decode pods healthy, proxy pods labelled with a configured
//! arm, every proxy's `/metrics` answering 200.

use std::collections::BTreeMap;

use super::observe::SidecarView;
use super::options::{Arm, Mode, Options};
use super::prom::{self, Sample};
use super::report::{signals, Check, Outcome};
use super::requests;
use super::targets::Targets;
use crate::cluster::PodState;
use kvab_serve::client::HttpClient;

/// Name prefix of the pods behind an id-path name: `vllm-prefill-p2p:14579` → `vllm-prefill-p2p`.
fn pod_prefix(id_name: &str) -> &str {
    id_name.split(':').next().unwrap_or(id_name)
}

fn is_pod_of(pod: &str, prefix: &str) -> bool {
    pod == prefix
        || pod
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// Cluster mode: prefill, decode and proxy pods of every arm exist and are Running and Ready. `pods` are
/// all pods of the namespace (prefill and decode are found by name), `proxies` those of the proxy
/// selector (an arm's proxies carry its backend label; other pods may carry it too).
pub fn judge_pods(
    pods: &[PodState],
    proxies: &[PodState],
    arms: &[Arm],
    backend_label: &str,
) -> Check {
    let mut measured = Vec::new();
    let mut problems = Vec::new();
    for arm in arms {
        let mut roles: Vec<(&str, Vec<&PodState>)> = Vec::new();
        for (role, name) in [("prefill", &arm.prefill), ("decode", &arm.decode)] {
            if let Some(name) = name {
                let prefix = pod_prefix(name);
                roles.push((
                    role,
                    pods.iter().filter(|p| is_pod_of(&p.name, prefix)).collect(),
                ));
            }
        }
        roles.push((
            "proxy",
            proxies
                .iter()
                .filter(|p| p.labels.get(backend_label) == Some(&arm.name))
                .collect(),
        ));
        for (role, found) in roles {
            let healthy = found.iter().filter(|p| p.healthy()).count();
            measured.push(format!("{} {role} {healthy}/{}", arm.name, found.len()));
            if found.is_empty() {
                problems.push(format!("no {} {role} pod", arm.name));
            } else if healthy < found.len() {
                let sick: Vec<String> = found
                    .iter()
                    .filter(|p| !p.healthy())
                    .map(|p| {
                        format!(
                            "{} ({}{})",
                            p.name,
                            p.phase,
                            if p.ready { "" } else { ", not ready" }
                        )
                    })
                    .collect();
                problems.push(sick.join(", "));
            }
        }
    }
    let result = if problems.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail
    };
    Check::new(
        "prerequisites/pods",
        "prefill, decode and proxy pods of every arm Running and Ready",
        measured.join("; "),
        result,
    )
    .diagnosis_unless_pass(format!("unhealthy backends: {}", problems.join("; ")))
}

/// Local mode: the sidecar's map has a ready proxy for every arm, and every listed proxy is ready.
pub fn judge_map_readiness(endpoints: &[(String, String, String, bool)], arms: &[Arm]) -> Check {
    let mut measured = Vec::new();
    let mut problems = Vec::new();
    for arm in arms {
        let listed: Vec<_> = endpoints.iter().filter(|(a, ..)| a == &arm.name).collect();
        let ready = listed.iter().filter(|(.., r)| *r).count();
        measured.push(format!("{} {ready}/{} ready", arm.name, listed.len()));
        if ready == 0 {
            problems.push(format!("{} has no ready proxy", arm.name));
        }
        for (_, pod, _, r) in &listed {
            if !r {
                problems.push(format!("{pod} not ready"));
            }
        }
    }
    let result = if problems.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail
    };
    Check::new(
        "prerequisites/proxies",
        "every arm has ready proxies (kvab serve /v1/endpoints)",
        measured.join("; "),
        result,
    )
    .diagnosis_unless_pass(format!(
        "{}: requests for the arm get 503 kv_backend_unavailable",
        problems.join("; ")
    ))
}

/// Cluster mode: every pod matching the proxy selector carries the backend label with a configured arm.
pub fn judge_pod_labels(proxies: &[PodState], arms: &[Arm], backend_label: &str) -> Check {
    let known: Vec<&str> = arms.iter().map(|a| a.name.as_str()).collect();
    let mut by_arm: BTreeMap<String, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for pod in proxies {
        match pod.labels.get(backend_label) {
            Some(value) if known.contains(&value.as_str()) => {
                *by_arm.entry(value.clone()).or_default() += 1
            }
            Some(value) => bad.push(format!("{} has {backend_label}={value}", pod.name)),
            None => bad.push(format!("{} has no {backend_label}", pod.name)),
        }
    }
    labels_check(by_arm, bad, arms, backend_label)
}

/// Local mode (and a second opinion in a cluster): the sidecar's map and `kvab_unlabeled_proxies`.
pub fn judge_sidecar_labels(
    endpoints: &[(String, String, String, bool)],
    samples: &[Sample],
    arms: &[Arm],
    backend_label: &str,
) -> Check {
    let mut by_arm: BTreeMap<String, usize> = BTreeMap::new();
    for (arm, _, _, _) in endpoints {
        *by_arm.entry(arm.clone()).or_default() += 1;
    }
    let mut bad = Vec::new();
    for (reason, what) in [
        ("missing_label", "without"),
        ("unknown_backend", "with an unknown value of"),
    ] {
        let count = prom::sum(samples, "kvab_unlabeled_proxies", &[("reason", reason)]);
        if count > 0.0 {
            bad.push(format!(
                "{count} proxy pod(s) {what} {backend_label} (kvab_unlabeled_proxies)"
            ));
        }
    }
    labels_check(by_arm, bad, arms, backend_label)
}

fn labels_check(
    by_arm: BTreeMap<String, usize>,
    mut bad: Vec<String>,
    arms: &[Arm],
    backend_label: &str,
) -> Check {
    for arm in arms {
        if !by_arm.contains_key(&arm.name) {
            bad.push(format!("no proxy labelled {backend_label}={}", arm.name));
        }
    }
    let measured = arms
        .iter()
        .map(|a| format!("{} {}", a.name, by_arm.get(&a.name).copied().unwrap_or(0)))
        .chain(bad.iter().cloned())
        .collect::<Vec<_>>()
        .join("; ");
    let result = if bad.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail
    };
    Check::new(
        "prerequisites/proxy-labels",
        format!("every proxy labelled {backend_label} with an arm; each arm has one"),
        measured,
        result,
    )
    .diagnosis_unless_pass(format!(
        "label the proxy pods ({}); {}",
        arms.iter()
            .map(|a| format!("{backend_label}={}", a.name))
            .collect::<Vec<_>>()
            .join(", "),
        signals::RESOURCE_EXHAUSTED
    ))
}

/// One proxy's `/metrics` as seen directly and by the sidecar's prober.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsProbe {
    pub arm: String,
    pub pod: String,
    /// Status of our own GET, or why it failed; `None` when not reachable from here.
    pub direct: Option<Result<u16, String>>,
    /// `kvab_proxy_metrics_status_code` (0 = no HTTP answer); `None` when the sidecar has no figure.
    pub sidecar: Option<u16>,
}

pub fn sidecar_probe_status(samples: &[Sample], arm: &str, pod: &str) -> Option<u16> {
    prom::select(
        samples,
        "kvab_proxy_metrics_status_code",
        &[("backend", arm), ("pod", pod)],
    )
    .next()
    .map(|s| s.value as u16)
}

pub fn judge_metrics(probes: &[MetricsProbe]) -> Check {
    let expected = "200 from every proxy's /metrics";
    if probes.is_empty() {
        return Check::new(
            "prerequisites/proxy-metrics",
            expected,
            "no proxy to probe",
            Outcome::Inconclusive,
        );
    }
    let mut measured = Vec::new();
    let mut not_found = false;
    let mut failing = false;
    let mut unknown = false;
    for probe in probes {
        let mut seen = Vec::new();
        match &probe.direct {
            Some(Ok(code)) => {
                seen.push(format!("{code}"));
                not_found |= *code == 404;
                failing |= *code != 200;
            }
            Some(Err(e)) => {
                seen.push(format!("unreachable ({e})"));
                failing = true;
            }
            None => {}
        }
        if let Some(code) = probe.sidecar {
            seen.push(format!(
                "sidecar probe {}",
                if code == 0 {
                    "no answer".into()
                } else {
                    code.to_string()
                }
            ));
            not_found |= code == 404;
            failing |= code != 200;
        }
        if seen.is_empty() {
            seen.push("not probed".into());
            unknown = true;
        }
        measured.push(format!("{} ({}) {}", probe.pod, probe.arm, seen.join(", ")));
    }
    let result = if failing {
        Outcome::Fail
    } else if unknown {
        Outcome::Inconclusive
    } else {
        Outcome::Pass
    };
    let diagnosis = if not_found {
        signals::METRICS_404.to_string()
    } else {
        "a proxy does not answer on /metrics: check that the pod runs and listens on its port; without metrics \
         the active-request-scorer cannot score it"
            .to_string()
    };
    Check::new(
        "prerequisites/proxy-metrics",
        expected,
        measured.join("; "),
        result,
    )
    .diagnosis_unless_pass(diagnosis)
}

/// Prerequisite 3: every proxy's `/metrics`, as the sidecar's probes saw it and (locally) read directly.
pub async fn probe_metrics(
    options: &Options,
    client: &HttpClient,
    sidecar: Option<&SidecarView>,
    targets: &Targets,
) -> Vec<MetricsProbe> {
    let mut probes = Vec::new();
    let probe = |url: String| async move {
        client
            .send(&requests::metrics(&url))
            .await
            .map(|e| e.status)
    };
    match sidecar.filter(|v| v.map.is_some()) {
        Some(view) => {
            for (arm, pod, address, _) in view.endpoints() {
                // Pod addresses are reachable from here only locally.
                let direct = match options.mode {
                    Mode::Local => Some(probe(format!("http://{address}")).await),
                    Mode::Cluster => None,
                };
                let sidecar = sidecar_probe_status(&view.samples, &arm, &pod);
                probes.push(MetricsProbe {
                    arm,
                    pod,
                    direct,
                    sidecar,
                });
            }
        }
        None => {
            for (arm, url) in &targets.proxies {
                if let Ok(url) = url {
                    probes.push(MetricsProbe {
                        arm: arm.name.clone(),
                        pod: url.clone(),
                        direct: Some(probe(url.clone()).await),
                        sidecar: None,
                    });
                }
            }
        }
    }
    probes
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::check::options::Options;

    fn pod(name: &str, labels: &[(&str, &str)], ready: bool) -> PodState {
        PodState {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            phase: "Running".into(),
            ready,
        }
    }

    fn runbook_pods() -> Vec<PodState> {
        let label = "llm-d.ai/kv-backend";
        vec![
            pod("vllm-prefill-p2p", &[], true),
            pod("vllm-decode-p2p", &[], true),
            pod("vllm-prefill-fs", &[], true),
            pod("vllm-decode-fs-7d9c", &[], true),
            pod(
                "vllm-p2p-proxy-abc",
                &[("role", "proxy"), (label, "nvlink")],
                true,
            ),
            pod(
                "vllm-fs-proxy-def",
                &[("role", "proxy"), (label, "fs")],
                true,
            ),
        ]
    }

    #[test]
    fn healthy_runbook_pods_pass_and_a_sick_decode_fails() {
        let arms = Options::default().arms;
        let pods = runbook_pods();
        let check = judge_pods(&pods, &pods[4..], &arms, "llm-d.ai/kv-backend");
        assert_eq!(check.result, Outcome::Pass, "{check:?}");
        assert!(check.measured.contains("fs decode 1/1"));
        let mut pods = runbook_pods();
        pods[3].ready = false;
        let check = judge_pods(&pods, &pods[4..], &arms, "llm-d.ai/kv-backend");
        assert_eq!(check.result, Outcome::Fail);
        assert!(check
            .diagnosis
            .unwrap()
            .contains("vllm-decode-fs-7d9c (Running, not ready)"));
        // `vllm-prefill-fs` must not match `vllm-prefill-fsx`.
        assert!(!is_pod_of("vllm-prefill-fsx", "vllm-prefill-fs"));
    }

    #[test]
    fn only_pods_of_the_proxy_selector_count_as_proxies() {
        // The whole arm labelled (prefill and decode too) but its proxy gone: still no proxy.
        let label = "llm-d.ai/kv-backend";
        let arms = Options::default().arms;
        let mut pods = runbook_pods();
        for p in pods.iter_mut().take(4) {
            let arm = if p.name.contains("p2p") {
                "nvlink"
            } else {
                "fs"
            };
            p.labels.insert(label.into(), arm.into());
        }
        pods.pop();
        let check = judge_pods(&pods, &pods[4..], &arms, label);
        assert_eq!(check.result, Outcome::Fail, "{check:?}");
        assert!(check.measured.contains("nvlink proxy 1/1; fs prefill 1/1"));
        assert!(
            check.measured.ends_with("fs proxy 0/0"),
            "{}",
            check.measured
        );
        assert!(check.diagnosis.unwrap().contains("no fs proxy pod"));
    }

    #[test]
    fn a_proxy_without_its_label_fails_with_signal_one() {
        let arms = Options::default().arms;
        let proxies = vec![
            pod(
                "vllm-p2p-proxy-abc",
                &[("role", "proxy"), ("llm-d.ai/kv-backend", "nvlink")],
                true,
            ),
            pod("vllm-fs-proxy-def", &[("role", "proxy")], true),
        ];
        let check = judge_pod_labels(&proxies, &arms, "llm-d.ai/kv-backend");
        assert_eq!(check.result, Outcome::Fail);
        assert!(
            check
                .measured
                .contains("vllm-fs-proxy-def has no llm-d.ai/kv-backend"),
            "{check:?}"
        );
        assert!(check
            .measured
            .contains("no proxy labelled llm-d.ai/kv-backend=fs"));
        assert!(check
            .diagnosis
            .unwrap()
            .contains("InferencePoolResourceExhausted"));
    }

    #[test]
    fn a_404_on_metrics_is_signal_two() {
        let probe = |code| MetricsProbe {
            arm: "fs".into(),
            pod: "p".into(),
            direct: Some(Ok(code)),
            sidecar: Some(code),
        };
        assert_eq!(judge_metrics(&[probe(200)]).result, Outcome::Pass);
        let check = judge_metrics(&[probe(200), probe(404)]);
        assert_eq!(check.result, Outcome::Fail);
        assert!(check.diagnosis.unwrap().contains("failure signal 2"));
        let unprobed = MetricsProbe {
            arm: "fs".into(),
            pod: "p".into(),
            direct: None,
            sidecar: None,
        };
        assert_eq!(judge_metrics(&[unprobed]).result, Outcome::Inconclusive);
    }
}
