//! `kvab check` command line. Every default is the runbook's (namespaces, names, labels, burst size); every
//! flag is documented in the README, section "kvab check".

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// URLs only: the local stack of `make demo`, or anything reachable by URL.
    Local,
    /// Kubernetes API (kubeconfig or in-cluster): pods, HTTPRoute, ConfigMap, logs, port-forwards.
    Cluster,
}

/// One arm and how the runbook recognizes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    pub name: String,
    /// Names the completion `id` path must show (`vllm-prefill-fs`, `vllm-prefill-p2p:14579`, ...).
    pub prefill: Option<String>,
    pub decode: Option<String>,
    /// Where Step 1 sends its direct completion; cluster mode without it port-forwards to a proxy pod.
    pub proxy_url: Option<String>,
}

/// Names in the cluster, defaulting to the runbook's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNames {
    pub proxy_namespace: String,
    pub proxy_selector: String,
    pub backend_label: String,
    pub proxy_port: u16,
    pub gateway_namespace: String,
    pub gateway_service: String,
    pub gateway_service_port: u16,
    pub httproute: String,
    pub inference_pool: String,
    /// Namespace of the EPP's ConfigMap and Deployment: the pool's, since the EPP must run next to it.
    pub epp_namespace: String,
    pub epp_configmap: String,
    pub epp_config_key: String,
    pub epp_deployment: String,
    pub sidecar_service: String,
    pub sidecar_service_port: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub mode: Mode,
    pub json: bool,
    pub dry_run: bool,
    pub arms: Vec<Arm>,
    pub header: String,
    pub unknown_value: String,
    pub model: String,
    /// `None` in cluster mode: port-forward to the gateway Service.
    pub gateway_url: Option<String>,
    /// `None`: no sidecar (cluster mode: port-forward to its Service unless `--sidecar-url none`).
    pub sidecar_url: Option<String>,
    pub no_sidecar: bool,
    pub envoy_admin_url: Option<String>,
    pub header_requests: u32,
    pub burst_requests: u32,
    pub concurrency: u32,
    pub burst_path: String,
    pub stream: bool,
    pub max_time: Duration,
    pub burst_time_limit: Duration,
    pub settle: Duration,
    pub alpha: f64,
    pub min_success_ratio: f64,
    /// Expected share of untagged traffic per arm (split evenly among the arm's proxies).
    pub split: BTreeMap<String, f64>,
    pub httproute_file: Option<PathBuf>,
    pub epp_config_file: Option<PathBuf>,
    pub require_label_selector: bool,
    pub cluster: ClusterNames,
}

pub const MODEL: &str = "Qwen/Qwen3-Coder-30B-A3B-Instruct";

/// Port of the local stack from its environment variable, else the public default.
fn local_port(variable: &str, default: u16) -> u16 {
    std::env::var(variable)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn local_url(variable: &str, default: u16) -> String {
    format!("http://127.0.0.1:{}", local_port(variable, default))
}

fn default_arms() -> Vec<Arm> {
    vec![
        Arm {
            name: "nvlink".into(),
            prefill: Some("vllm-prefill-p2p:14579".into()),
            decode: Some("vllm-decode-p2p:14579".into()),
            proxy_url: None,
        },
        Arm {
            name: "fs".into(),
            prefill: Some("vllm-prefill-fs".into()),
            decode: Some("vllm-decode-fs".into()),
            proxy_url: None,
        },
    ]
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: Mode::Local,
            json: false,
            dry_run: false,
            arms: default_arms(),
            header: "x-kv-backend".into(),
            unknown_value: "nvlink2".into(),
            model: MODEL.into(),
            gateway_url: None,
            sidecar_url: None,
            no_sidecar: false,
            envoy_admin_url: None,
            header_requests: 3,
            burst_requests: 20,
            concurrency: 5,
            burst_path: "/v1/chat/completions".into(),
            stream: false,
            max_time: Duration::from_secs(25),
            burst_time_limit: Duration::from_secs(120),
            settle: Duration::from_secs(5),
            alpha: 0.01,
            min_success_ratio: 0.95,
            split: BTreeMap::new(),
            httproute_file: None,
            epp_config_file: None,
            require_label_selector: false,
            cluster: ClusterNames {
                proxy_namespace: "llm-d-vllm".into(),
                proxy_selector: "role=proxy".into(),
                backend_label: "llm-d.ai/kv-backend".into(),
                proxy_port: 8080,
                gateway_namespace: "llm-d-inference-scheduler".into(),
                gateway_service: "infra-inference-scheduling-inference-gateway-istio".into(),
                gateway_service_port: 80,
                httproute: "llm-d-inference-scheduling".into(),
                inference_pool: "vllm-proxy-performance".into(),
                epp_namespace: "llm-d-vllm".into(),
                epp_configmap: "gaie-inference-scheduling-epp-config".into(),
                epp_config_key: "epp-config.yaml".into(),
                epp_deployment: "gaie-inference-scheduling-epp".into(),
                sidecar_service: "kvab".into(),
                sidecar_service_port: 18090,
            },
        }
    }
}

const SWITCHES: &[&str] = &[
    "--json",
    "--dry-run",
    "--stream",
    "--require-label-selector",
    "--cluster",
    "--local",
];

const VALUE_FLAGS: &[&str] = &[
    "--mode",
    "--gateway-url",
    "--sidecar-url",
    "--envoy-admin-url",
    "--proxy-url",
    "--id-path",
    "--arms",
    "--header",
    "--unknown-value",
    "--model",
    "--header-requests",
    "--burst-requests",
    "--concurrency",
    "--burst-path",
    "--max-time",
    "--burst-time-limit",
    "--settle",
    "--alpha",
    "--min-success",
    "--split",
    "--httproute-file",
    "--epp-config-file",
    "--proxy-namespace",
    "--proxy-selector",
    "--backend-label",
    "--proxy-port",
    "--gateway-namespace",
    "--gateway-service",
    "--httproute",
    "--inference-pool",
    "--epp-namespace",
    "--epp-configmap",
    "--epp-config-key",
    "--epp-deployment",
    "--sidecar-service",
];

pub enum Parsed {
    Run(Box<Options>),
    Help,
}

/// Parses the arguments after `kvab check`. Flags take `--flag VALUE` or `--flag=VALUE`.
pub fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut options = Options::default();
    let mut arm_urls: Vec<(String, String)> = Vec::new();
    let mut id_paths: Vec<(String, String, String)> = Vec::new();
    let mut arm_names: Option<Vec<String>> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (arg.as_str(), None),
        };
        if matches!(flag, "-h" | "--help") {
            return Ok(Parsed::Help);
        }
        if SWITCHES.contains(&flag) {
            if inline.is_some() {
                return Err(format!("{flag} takes no value"));
            }
            match flag {
                "--json" => options.json = true,
                "--dry-run" => options.dry_run = true,
                "--stream" => options.stream = true,
                "--require-label-selector" => options.require_label_selector = true,
                "--cluster" => options.mode = Mode::Cluster,
                _ => options.mode = Mode::Local,
            }
            continue;
        }
        if !VALUE_FLAGS.contains(&flag) {
            return Err(format!("unknown argument {arg:?} for `kvab check`"));
        }
        let value = match inline {
            Some(value) => value,
            None => rest
                .next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))?,
        };
        let c = &mut options.cluster;
        match flag {
            "--mode" => {
                options.mode = match value.as_str() {
                    "local" => Mode::Local,
                    "cluster" => Mode::Cluster,
                    other => return Err(format!("--mode must be local or cluster, not {other:?}")),
                }
            }
            "--gateway-url" => options.gateway_url = Some(url(&value)?),
            "--sidecar-url" if value == "none" => options.no_sidecar = true,
            "--sidecar-url" => options.sidecar_url = Some(url(&value)?),
            "--envoy-admin-url" if value == "none" => options.envoy_admin_url = Some(String::new()),
            "--envoy-admin-url" => options.envoy_admin_url = Some(url(&value)?),
            "--proxy-url" => {
                let (arm, target) = pair(flag, &value)?;
                arm_urls.push((arm, url(&target)?));
            }
            "--id-path" => {
                let (arm, names) = pair(flag, &value)?;
                let (prefill, decode) = names
                    .split_once(',')
                    .ok_or_else(|| format!("{flag} wants ARM=PREFILL,DECODE, got {value:?}"))?;
                id_paths.push((arm, prefill.to_string(), decode.to_string()));
            }
            "--arms" => arm_names = Some(list(flag, &value)?),
            "--header" => options.header = value.to_ascii_lowercase(),
            "--unknown-value" => options.unknown_value = value,
            "--model" => options.model = value,
            "--header-requests" => options.header_requests = number(flag, &value, 0, 1000)?,
            "--burst-requests" => options.burst_requests = number(flag, &value, 0, 10_000)?,
            "--concurrency" => options.concurrency = number(flag, &value, 1, 256)?,
            "--burst-path" if value.starts_with('/') => options.burst_path = value,
            "--burst-path" => return Err(format!("--burst-path must start with /, got {value:?}")),
            "--max-time" => options.max_time = seconds(flag, &value)?,
            "--burst-time-limit" => options.burst_time_limit = seconds(flag, &value)?,
            "--settle" => options.settle = seconds(flag, &value)?,
            "--alpha" => options.alpha = fraction(flag, &value)?,
            "--min-success" => options.min_success_ratio = fraction(flag, &value)?,
            "--split" => {
                for item in list(flag, &value)? {
                    let (arm, weight) = pair(flag, &item)?;
                    let weight: f64 = weight
                        .parse()
                        .ok()
                        .filter(|w: &f64| *w > 0.0 && w.is_finite())
                        .ok_or_else(|| {
                            format!("{flag}: weight of {arm} must be a positive number")
                        })?;
                    options.split.insert(arm, weight);
                }
            }
            "--httproute-file" => options.httproute_file = Some(PathBuf::from(value)),
            "--epp-config-file" => options.epp_config_file = Some(PathBuf::from(value)),
            "--proxy-namespace" => c.proxy_namespace = value,
            "--proxy-selector" => {
                crate::selector::validate(&value).map_err(|e| format!("{flag}: {e}"))?;
                c.proxy_selector = value
            }
            "--backend-label" => {
                crate::selector::validate_key(&value).map_err(|e| format!("{flag}: {e}"))?;
                c.backend_label = value
            }
            "--proxy-port" => c.proxy_port = number(flag, &value, 1, 65535)?,
            "--gateway-namespace" => c.gateway_namespace = value,
            "--gateway-service" => {
                (c.gateway_service, c.gateway_service_port) = service(flag, &value, 80)?
            }
            "--httproute" => c.httproute = value,
            "--inference-pool" => c.inference_pool = value,
            "--epp-namespace" => c.epp_namespace = value,
            "--epp-configmap" => c.epp_configmap = value,
            "--epp-config-key" => c.epp_config_key = value,
            "--epp-deployment" => c.epp_deployment = value,
            "--sidecar-service" => {
                (c.sidecar_service, c.sidecar_service_port) = service(flag, &value, 18090)?
            }
            _ => return Err(format!("unknown argument {arg:?} for `kvab check`")),
        }
    }

    if let Some(names) = arm_names {
        let known = default_arms();
        options.arms = names
            .into_iter()
            .map(|name| {
                known
                    .iter()
                    .find(|a| a.name == name)
                    .cloned()
                    .unwrap_or(Arm {
                        name,
                        prefill: None,
                        decode: None,
                        proxy_url: None,
                    })
            })
            .collect();
    }
    for (name, target) in arm_urls {
        arm_mut(&mut options.arms, &name, "--proxy-url")?.proxy_url = Some(target);
    }
    for (name, prefill, decode) in id_paths {
        let arm = arm_mut(&mut options.arms, &name, "--id-path")?;
        arm.prefill = Some(prefill);
        arm.decode = Some(decode);
    }
    for arm in options.split.keys() {
        if !options.arms.iter().any(|a| &a.name == arm) {
            return Err(format!(
                "--split names {arm:?}, which is not one of the arms"
            ));
        }
    }
    if options.mode == Mode::Local {
        apply_local_defaults(&mut options);
    }
    Ok(Parsed::Run(Box::new(options)))
}

/// Local mode: the ports of `make demo` (overridable by the same environment variables) and its files.
fn apply_local_defaults(options: &mut Options) {
    options
        .gateway_url
        .get_or_insert_with(|| local_url("KVAB_GATEWAY_PORT", 18080));
    if !options.no_sidecar {
        options
            .sidecar_url
            .get_or_insert_with(|| local_url("KVAB_SIDECAR_PORT", 18090));
    }
    options
        .envoy_admin_url
        .get_or_insert_with(|| local_url("KVAB_ENVOY_ADMIN_PORT", 18001));
    for arm in &mut options.arms {
        let port = match arm.name.as_str() {
            "nvlink" => Some(local_port("KVAB_NVLINK_ARM_PORT", 18101)),
            "fs" => Some(local_port("KVAB_FS_ARM_PORT", 18102)),
            _ => None,
        };
        if arm.proxy_url.is_none() {
            arm.proxy_url = port.map(|p| format!("http://127.0.0.1:{p}"));
        }
    }
}

fn arm_mut<'a>(arms: &'a mut [Arm], name: &str, flag: &str) -> Result<&'a mut Arm, String> {
    arms.iter_mut()
        .find(|a| a.name == name)
        .ok_or_else(|| format!("{flag} names {name:?}, which is not one of the arms (see --arms)"))
}

fn url(value: &str) -> Result<String, String> {
    if value.starts_with("http://") && value.len() > "http://".len() {
        Ok(value.trim_end_matches('/').to_string())
    } else {
        Err(format!("{value:?} is not an http:// URL"))
    }
}

fn pair(flag: &str, value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{flag} wants KEY=VALUE, got {value:?}")),
    }
}

fn list(flag: &str, value: &str) -> Result<Vec<String>, String> {
    let items: Vec<String> = value.split(',').map(|s| s.trim().to_string()).collect();
    if items.iter().any(String::is_empty) {
        return Err(format!("{flag}: empty item in {value:?}"));
    }
    Ok(items)
}

fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    flag: &str,
    value: &str,
    min: T,
    max: T,
) -> Result<T, String> {
    value
        .parse::<T>()
        .ok()
        .filter(|n| *n >= min && *n <= max)
        .ok_or_else(|| format!("{flag} must be a whole number from {min} to {max}, got {value:?}"))
}

fn seconds(flag: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && *s <= 3600.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            format!("{flag} must be seconds, more than 0 and at most 3600, got {value:?}")
        })
}

fn fraction(flag: &str, value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("{flag} must be a number from 0 to 1, got {value:?}"))
}

/// `NAME` or `NAME:PORT`.
fn service(flag: &str, value: &str, default_port: u16) -> Result<(String, u16), String> {
    match value.split_once(':') {
        None => Ok((value.to_string(), default_port)),
        Some((name, port)) => Ok((name.to_string(), number(flag, port, 1, 65535)?)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn run(list: &[&str]) -> Options {
        let args: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        match parse(&args) {
            Ok(Parsed::Run(options)) => *options,
            Ok(Parsed::Help) => panic!("help"),
            Err(e) => panic!("{e}"),
        }
    }

    fn error(list: &[&str]) -> String {
        let args: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        match parse(&args) {
            Err(e) => e,
            Ok(_) => panic!("accepted {list:?}"),
        }
    }

    #[test]
    fn defaults_are_the_runbooks() {
        let o = run(&[]);
        assert_eq!(o.mode, Mode::Local);
        assert_eq!((o.burst_requests, o.concurrency), (20, 5));
        assert_eq!(o.burst_path, "/v1/chat/completions");
        assert_eq!(o.max_time, Duration::from_secs(25));
        assert_eq!(o.arms[0].prefill.as_deref(), Some("vllm-prefill-p2p:14579"));
        assert_eq!(o.arms[1].decode.as_deref(), Some("vllm-decode-fs"));
        assert_eq!(
            o.cluster.gateway_service,
            "infra-inference-scheduling-inference-gateway-istio"
        );
        assert!(o
            .gateway_url
            .as_deref()
            .unwrap()
            .starts_with("http://127.0.0.1:"));
        // The EPP runs next to its pool (manifests/epp.yaml), not with the gateway.
        assert_eq!(
            (
                o.cluster.epp_namespace.as_str(),
                o.cluster.gateway_namespace.as_str()
            ),
            ("llm-d-vllm", "llm-d-inference-scheduler")
        );
        let o = run(&["--epp-namespace=llm-d-inference-scheduler"]);
        assert_eq!(o.cluster.epp_namespace, "llm-d-inference-scheduler");
    }

    #[test]
    fn flags_take_separate_or_inline_values() {
        let o = run(&[
            "--burst-requests=40",
            "--concurrency",
            "8",
            "--json",
            "--split",
            "nvlink=3,fs=1",
            "--id-path",
            "fs=pre,dec",
            "--proxy-url=nvlink=http://10.0.0.1:8080/",
            "--sidecar-url",
            "none",
            "--gateway-service",
            "gw:8080",
            "--cluster",
        ]);
        assert_eq!((o.burst_requests, o.concurrency), (40, 8));
        assert!(o.json && o.no_sidecar);
        assert_eq!(o.split["nvlink"], 3.0);
        assert_eq!(o.arms[1].prefill.as_deref(), Some("pre"));
        assert_eq!(o.arms[0].proxy_url.as_deref(), Some("http://10.0.0.1:8080"));
        assert_eq!(
            (
                o.cluster.gateway_service.as_str(),
                o.cluster.gateway_service_port
            ),
            ("gw", 8080)
        );
        assert_eq!(o.mode, Mode::Cluster);
        assert_eq!(
            o.gateway_url, None,
            "cluster mode port-forwards unless given a URL"
        );
    }

    #[test]
    fn mistakes_are_named() {
        assert!(error(&["--burst-requests", "-1"]).contains("--burst-requests"));
        assert!(error(&["--concurrency"]).contains("needs a value"));
        assert!(error(&["--split", "gpu=1"]).contains("not one of the arms"));
        assert!(error(&["--gateway-url", "https://x"]).contains("http://"));
        assert!(error(&["--json=yes"]).contains("takes no value"));
        assert!(error(&["--frobnicate"]).contains("unknown argument"));
        assert!(error(&["--alpha", "2"]).contains("--alpha"));
    }
}
