//! Step 2, gateway + InferencePool wiring, judged on the objects themselves: the HTTPRoute must send traffic
//! to the InferencePool, and the EPP configuration must load and use `active-request-scorer` and
//! `max-score-picker` (and, when present or required, a label selector filter on the backend label). Both
//! generations of the configuration pass: llm-d-router's (`llm-d.ai/v1alpha1`, `label-selector-filter`) and
//! the older one GAIE's EPP and llm-d-inference-scheduler read (`inference.networking.x-k8s.io/v1alpha1`,
//! `by-label-selector`), with a note naming what is deprecated and when it goes. The objects come from the
//! Kubernetes API (cluster mode) or from files (local mode); YAML and JSON both parse.

use serde_json::Value;

use super::options::Options;
use super::report::{Check, Outcome};
use crate::args::parse_document;
use crate::cluster;

/// The HTTPRoute references the InferencePool `pool` in a backendRef.
pub fn judge_httproute(route: &Value, pool: &str, source: &str) -> Check {
    let expected = format!("a rule's backendRef is kind InferencePool, name {pool}");
    let refs: Vec<&Value> = route
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|rule| {
            rule.get("backendRefs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .collect();
    let describe = |r: &Value| {
        format!(
            "{}/{}",
            kind_of(r),
            r.get("name").and_then(Value::as_str).unwrap_or("?")
        )
    };
    let found = refs.iter().any(|r| {
        kind_of(r) == "InferencePool" && r.get("name").and_then(Value::as_str) == Some(pool)
    });
    let listed: Vec<String> = refs.iter().map(|r| describe(r)).collect();
    let measured = if listed.is_empty() {
        format!("{source}: no backendRefs")
    } else {
        format!("{source}: backendRefs {}", listed.join(", "))
    };
    if route
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k != "HTTPRoute")
    {
        return Check::new(
            "step2/httproute",
            expected,
            format!("{source}: not an HTTPRoute"),
            Outcome::Fail,
        );
    }
    let result = if found { Outcome::Pass } else { Outcome::Fail };
    Check::new("step2/httproute", expected, measured, result).diagnosis_unless_pass(format!(
        "untagged traffic does not reach the scheduler: apply inferencepool-proxy-performance.yaml and make the \
         HTTPRoute's backendRef point at InferencePool/{pool} (group inference.networking.k8s.io)"
    ))
}

/// A backendRef without `kind` refers to a Service (Gateway API default).
fn kind_of(backend_ref: &Value) -> &str {
    backend_ref
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("Service")
}

/// The plugins the runbook's EPP profile needs.
const REQUIRED_PLUGINS: [&str; 2] = ["active-request-scorer", "max-score-picker"];
/// The label selector filter's type in llm-d-router (v0.10.0
/// pkg/epp/framework/plugins/scheduling/filter/bylabel/selector.go: LabelSelectorFilterType).
const LABEL_SELECTOR_PLUGIN: &str = "label-selector-filter";
/// Its type before llm-d-router v0.9.0 (and in GAIE's EPP). llm-d-router v0.10.0 cmd/epp/runner/runner.go
/// registers it deprecated in v0.9.0 with removal in v0.11.0; the removal was merged in llm-d/llm-d-router#2865.
const DEPRECATED_LABEL_SELECTOR_PLUGIN: &str = "by-label-selector";
/// The configuration's apiVersion in llm-d-router (v0.10.0 apix/config/v1alpha1: GroupName llm-d.ai).
const CONFIG_API_VERSION: &str = "llm-d.ai/v1alpha1";
/// The apiVersion of GAIE's EPP and llm-d-inference-scheduler <= v0.8; llm-d-router still reads it and logs
/// "DEPRECATION: apiVersion inference.networking.x-k8s.io/v1alpha1/EndpointPickerConfig is deprecated"
/// (v0.10.0 pkg/epp/config/loader/configloader.go: deprecatedSchemeGroupVersion).
const DEPRECATED_CONFIG_API_VERSION: &str = "inference.networking.x-k8s.io/v1alpha1";

/// The EPP configuration (`EndpointPickerConfig`, either apiVersion) declares the runbook's plugins and a
/// scheduling profile uses them; a label selector filter (either type name), when present (or required),
/// selects on `backend_label`. A deprecated name passes with a note saying what replaces it.
pub fn judge_epp_config(
    config: &Value,
    backend_label: &str,
    require_label_selector: bool,
    source: &str,
) -> Check {
    let name = "step2/epp-config";
    let mut expected = format!(
        "plugins {} in a scheduling profile",
        REQUIRED_PLUGINS.join(" + ")
    );
    if require_label_selector {
        expected.push_str(&format!(" + {LABEL_SELECTOR_PLUGIN} on {backend_label}"));
    }
    let mut problems = Vec::new();
    let mut deprecations = Vec::new();
    match config.get("apiVersion").and_then(Value::as_str) {
        // Without one it is left to the EPP's loader (local files are often fragments): only a wrong
        // value is judged.
        None | Some(CONFIG_API_VERSION) => {}
        Some(DEPRECATED_CONFIG_API_VERSION) => deprecations.push(format!(
            "apiVersion {DEPRECATED_CONFIG_API_VERSION} is deprecated in llm-d-router (since v0.9.0); \
             use {CONFIG_API_VERSION}"
        )),
        Some(other) => problems.push(format!(
            "apiVersion {other} is neither {CONFIG_API_VERSION} nor {DEPRECATED_CONFIG_API_VERSION}"
        )),
    }
    let is_label_selector =
        |kind: &str| kind == LABEL_SELECTOR_PLUGIN || kind == DEPRECATED_LABEL_SELECTOR_PLUGIN;
    // Plugin instances: (name used by pluginRef, type). The name defaults to the type.
    let plugins: Vec<(String, String, &Value)> = config
        .get("plugins")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let kind = p.get("type")?.as_str()?.to_string();
            let name = p
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or(&kind)
                .to_string();
            Some((name, kind, p))
        })
        .collect();
    let profile_refs: Vec<(String, Vec<String>)> = config
        .get("schedulingProfiles")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|profile| {
            let refs = profile
                .get("plugins")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|r| {
                    r.get("pluginRef")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .collect();
            (
                profile
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                refs,
            )
        })
        .collect();
    let type_of = |reference: &str| {
        plugins
            .iter()
            .find(|(n, _, _)| n == reference)
            .map(|(_, t, _)| t.as_str())
    };
    // A profile qualifies when its references cover every required plugin type.
    let qualifying = profile_refs.iter().find(|(_, refs)| {
        REQUIRED_PLUGINS
            .iter()
            .all(|required| refs.iter().any(|r| type_of(r) == Some(*required)))
    });
    let types: Vec<&str> = plugins.iter().map(|(_, t, _)| t.as_str()).collect();
    for required in REQUIRED_PLUGINS {
        if !types.contains(&required) {
            problems.push(format!("no {required} plugin"));
        }
    }
    if problems.is_empty() && qualifying.is_none() {
        problems.push("no scheduling profile references both".to_string());
    }
    let selectors: Vec<(&str, &Value)> = plugins
        .iter()
        .filter(|(_, t, _)| is_label_selector(t))
        .map(|(_, t, p)| (t.as_str(), *p))
        .collect();
    if selectors
        .iter()
        .any(|(t, _)| *t == DEPRECATED_LABEL_SELECTOR_PLUGIN)
    {
        deprecations.push(format!(
            "plugin type {DEPRECATED_LABEL_SELECTOR_PLUGIN} is deprecated since llm-d-router v0.9.0, its \
             removal is due in v0.11.0; use {LABEL_SELECTOR_PLUGIN} (same parameters)"
        ));
    }
    let selector_text = match selectors.iter().find(|(_, p)| selects_on(p, backend_label)) {
        Some((kind, _)) => format!("{kind} on {backend_label}"),
        None if selectors.is_empty() => {
            if require_label_selector {
                problems.push(format!("no {LABEL_SELECTOR_PLUGIN} plugin"));
            }
            "no label selector".to_string()
        }
        None => {
            problems.push(format!(
                "{LABEL_SELECTOR_PLUGIN} does not select on {backend_label}"
            ));
            format!("{LABEL_SELECTOR_PLUGIN} on other labels")
        }
    };
    let measured = format!(
        "{source}: plugins [{}]; {}; {selector_text}",
        types.join(", "),
        match qualifying {
            Some((profile, _)) => format!("profile {profile} uses them"),
            None => "no profile uses them".to_string(),
        }
    );
    if problems.is_empty() {
        let check = Check::new(name, expected, measured, Outcome::Pass);
        if deprecations.is_empty() {
            check
        } else {
            check.diagnosis(format!("loads today, but {}", deprecations.join("; ")))
        }
    } else {
        Check::new(name, expected, measured, Outcome::Fail).diagnosis(format!(
            "{}: the EPP cannot score proxies by active requests; apply schedulerinstall-proxy-performance.yaml \
             (see {})",
            problems.join("; "),
            super::report::signals::NO_TRAFFIC
        ))
    }
}

/// `matchLabels` has the key, or a `matchExpressions` entry names it.
fn selects_on(plugin: &Value, label: &str) -> bool {
    let parameters = plugin.get("parameters");
    let in_labels = parameters
        .and_then(|p| p.get("matchLabels"))
        .and_then(Value::as_object)
        .is_some_and(|m| m.contains_key(label));
    let in_expressions = parameters
        .and_then(|p| p.get("matchExpressions"))
        .and_then(Value::as_array)
        .is_some_and(|list| {
            list.iter()
                .any(|e| e.get("key").and_then(Value::as_str) == Some(label))
        });
    in_labels || in_expressions
}

/// Step 2: the HTTPRoute and the EPP configuration, from files or the cluster, judged.
pub async fn check(options: &Options, cluster: Option<&cluster::Cluster>) -> Vec<Check> {
    use cluster::ReadError;
    let names = &options.cluster;
    // A file that cannot be read or parsed, or an object that is absent or not YAML, is a finding
    // (fail); an API read that failed (5xx, RBAC, network) teaches nothing (inconclusive).
    let finding = |message: String| ReadError {
        finding: true,
        message,
    };
    let read_file = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| finding(format!("{}: {e}", path.display())))
            .and_then(|t| parse_document(&t).map_err(finding))
            .map(|v| (v, path.display().to_string()))
    };
    let route: Option<Result<(serde_json::Value, String), ReadError>> =
        match (cluster, &options.httproute_file) {
            (_, Some(path)) => Some(read_file(path)),
            (Some(cluster), None) => Some(
                cluster
                    .httproute(&names.gateway_namespace, &names.httproute)
                    .await
                    .map(|v| {
                        (
                            v,
                            format!("httproute {}/{}", names.gateway_namespace, names.httproute),
                        )
                    }),
            ),
            (None, None) => None,
        };
    let epp: Option<Result<(serde_json::Value, String), ReadError>> =
        match (cluster, &options.epp_config_file) {
            (_, Some(path)) => Some(read_file(path)),
            (Some(cluster), None) => Some(
                cluster
                    .configmap_value(
                        &names.epp_namespace,
                        &names.epp_configmap,
                        &names.epp_config_key,
                    )
                    .await
                    .and_then(|t| {
                        parse_document(&t).map_err(|e| {
                            finding(format!(
                                "ConfigMap {}/{} key {:?}: {e}",
                                names.epp_namespace, names.epp_configmap, names.epp_config_key
                            ))
                        })
                    })
                    .map(|v| {
                        (
                            v,
                            format!("configmap {}/{}", names.epp_namespace, names.epp_configmap),
                        )
                    }),
            ),
            (None, None) => None,
        };
    let unread = |name: &str, flag: &str, e: Option<ReadError>| match e {
        None => Check::new(
            name,
            "read",
            format!("local mode without {flag}"),
            Outcome::Skip,
        ),
        Some(e) if e.finding => Check::new(name, "read", e.message, Outcome::Fail),
        Some(e) => Check::new(name, "read", e.message, Outcome::Inconclusive).diagnosis(
            "the Kubernetes API did not answer the read; nothing was learned about the wiring",
        ),
    };
    vec![
        match route {
            Some(Ok((value, source))) => judge_httproute(&value, &names.inference_pool, &source),
            Some(Err(e)) => unread("step2/httproute", "--httproute-file", Some(e)),
            None => unread("step2/httproute", "--httproute-file", None),
        },
        match epp {
            Some(Ok((value, source))) => judge_epp_config(
                &value,
                &names.backend_label,
                options.require_label_selector,
                &source,
            ),
            Some(Err(e)) => unread("step2/epp-config", "--epp-config-file", Some(e)),
            None => unread("step2/epp-config", "--epp-config-file", None),
        },
    ]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: llm-d-inference-scheduling, namespace: llm-d-inference-scheduler}
spec:
  parentRefs: [{name: infra-inference-scheduling-inference-gateway}]
  rules:
  - backendRefs:
    - group: inference.networking.k8s.io
      kind: InferencePool
      name: vllm-proxy-performance
"#;

    const EPP: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: active-request-scorer
- type: max-score-picker
  name: picker
- type: by-label-selector
  name: kv-backend-filter
  parameters:
    matchExpressions:
    - {key: llm-d.ai/kv-backend, operator: In, values: [nvlink, fs]}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: kv-backend-filter
  - pluginRef: active-request-scorer
  - pluginRef: picker
"#;

    #[test]
    fn an_httproute_to_the_pool_passes_and_one_to_a_service_fails() {
        let route = parse_document(ROUTE).unwrap();
        let check = judge_httproute(&route, "vllm-proxy-performance", "route.yaml");
        assert_eq!(check.result, Outcome::Pass, "{check:?}");
        assert!(check
            .measured
            .contains("InferencePool/vllm-proxy-performance"));

        let to_service = ROUTE.replace(
            "group: inference.networking.k8s.io\n      kind: InferencePool",
            "kind: Service",
        );
        let check = judge_httproute(
            &parse_document(&to_service).unwrap(),
            "vllm-proxy-performance",
            "r",
        );
        assert_eq!(check.result, Outcome::Fail);
        assert!(
            check.measured.contains("Service/vllm-proxy-performance"),
            "{check:?}"
        );
        assert!(
            judge_httproute(&parse_document(ROUTE).unwrap(), "other-pool", "r").result
                == Outcome::Fail
        );
    }

    #[test]
    fn the_runbooks_epp_profile_passes() {
        let check = judge_epp_config(
            &parse_document(EPP).unwrap(),
            "llm-d.ai/kv-backend",
            true,
            "epp.yaml",
        );
        assert_eq!(check.result, Outcome::Pass, "{check:?}");
        assert!(
            check.measured.contains("profile default uses them"),
            "{check:?}"
        );
        assert!(check
            .measured
            .contains("by-label-selector on llm-d.ai/kv-backend"));
    }

    #[test]
    fn both_config_generations_pass_and_the_deprecated_names_are_noted() {
        let current = EPP
            .replace(
                "inference.networking.x-k8s.io/v1alpha1",
                "llm-d.ai/v1alpha1",
            )
            .replace("by-label-selector", "label-selector-filter");
        let check = judge_epp_config(
            &parse_document(&current).unwrap(),
            "llm-d.ai/kv-backend",
            true,
            "f",
        );
        assert_eq!(check.result, Outcome::Pass, "{check:?}");
        assert!(check
            .measured
            .contains("label-selector-filter on llm-d.ai/kv-backend"));
        assert_eq!(check.diagnosis, None, "nothing deprecated: no note");

        let old = judge_epp_config(
            &parse_document(EPP).unwrap(),
            "llm-d.ai/kv-backend",
            true,
            "f",
        );
        assert_eq!(old.result, Outcome::Pass, "{old:?}");
        let note = old.diagnosis.unwrap();
        assert!(
            note.contains("apiVersion inference.networking.x-k8s.io/v1alpha1 is deprecated")
                && note.contains("use llm-d.ai/v1alpha1"),
            "{note}"
        );
        assert!(
            note.contains("by-label-selector is deprecated since llm-d-router v0.9.0")
                && note.contains("v0.11.0")
                && note.contains("use label-selector-filter"),
            "{note}"
        );

        // One old name alone is noted alone.
        let mixed = current.replace("label-selector-filter", "by-label-selector");
        let note = judge_epp_config(
            &parse_document(&mixed).unwrap(),
            "llm-d.ai/kv-backend",
            true,
            "f",
        )
        .diagnosis
        .unwrap();
        assert!(
            note.contains("by-label-selector") && !note.contains("apiVersion"),
            "{note}"
        );

        let unknown = current.replace("llm-d.ai/v1alpha1", "llm-d.ai/v9");
        let check = judge_epp_config(
            &parse_document(&unknown).unwrap(),
            "llm-d.ai/kv-backend",
            true,
            "f",
        );
        assert_eq!(check.result, Outcome::Fail);
        assert!(check
            .diagnosis
            .unwrap()
            .contains("apiVersion llm-d.ai/v9 is neither"));
    }

    #[test]
    fn a_missing_plugin_an_unused_plugin_or_a_wrong_selector_fails() {
        let without_scorer =
            EPP.replace("- type: active-request-scorer\n", "- type: queue-scorer\n");
        let check = judge_epp_config(
            &parse_document(&without_scorer).unwrap(),
            "llm-d.ai/kv-backend",
            false,
            "f",
        );
        assert_eq!(check.result, Outcome::Fail);
        assert!(check
            .diagnosis
            .unwrap()
            .contains("no active-request-scorer plugin"));

        let unused = EPP.replace("  - pluginRef: picker\n", "");
        let check = judge_epp_config(
            &parse_document(&unused).unwrap(),
            "llm-d.ai/kv-backend",
            false,
            "f",
        );
        assert_eq!(check.result, Outcome::Fail);
        assert!(check
            .diagnosis
            .unwrap()
            .contains("no scheduling profile references both"));

        let check = judge_epp_config(&parse_document(EPP).unwrap(), "app", false, "f");
        assert_eq!(
            check.result,
            Outcome::Fail,
            "a selector on other labels is a misconfiguration"
        );

        let no_selector: String = EPP.lines().take(7).collect::<Vec<_>>().join("\n")
            + "\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: active-request-scorer\n  - pluginRef: picker\n";
        let config = parse_document(&no_selector).unwrap();
        assert_eq!(
            judge_epp_config(&config, "llm-d.ai/kv-backend", false, "f").result,
            Outcome::Pass
        );
        assert_eq!(
            judge_epp_config(&config, "llm-d.ai/kv-backend", true, "f").result,
            Outcome::Fail
        );
    }
}
