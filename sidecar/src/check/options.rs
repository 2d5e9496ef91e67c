//! `kvab check` command line: what the user typed (`CheckArgs`, clap) and what the run uses (`Options`).
//! Every flag, its help text, default and environment variable is defined once, here; `kvab check --help`
//! prints them and docs/check.md shows that output (tests/sidecar/test_cli.py keeps the two equal). Every
//! default is the runbook's (namespaces, names, labels, burst size).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;

pub use crate::args::ServiceRef;
use crate::args::{
    absolute_path, arm_name, fraction, header_name, http_url, local_port, local_url, seconds,
    service, MODEL,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    // URLs only: the local stack of `make demo`, or anything reachable by URL. (Plain comments: a doc
    // comment here would become help text and switch `--help` to its long layout.)
    Local,
    // Kubernetes API (kubeconfig or in-cluster): pods, HTTPRoute, ConfigMap, logs, port-forwards.
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
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[command(next_help_heading = "Cluster names (cluster mode)")]
pub struct ClusterNames {
    /// Namespace of the proxy, prefill and decode pods (and of the sidecar Service).
    #[arg(
        long,
        value_name = "NS",
        default_value = "llm-d-vllm",
        env = "KVAB_CHECK_PROXY_NAMESPACE"
    )]
    pub proxy_namespace: String,
    /// Label selector of the proxy pods (syntax checked as the API server parses it).
    #[arg(long, value_name = "SEL", default_value = "role=proxy", value_parser = label_selector,
          env = "KVAB_CHECK_PROXY_SELECTOR")]
    pub proxy_selector: String,
    /// Label naming a proxy's arm.
    #[arg(long, value_name = "KEY", default_value = "llm-d.ai/kv-backend", value_parser = label_key,
          env = "KVAB_CHECK_BACKEND_LABEL")]
    pub backend_label: String,
    /// Proxy pod port for Step 1 port-forwards.
    #[arg(long, value_name = "N", default_value_t = 8080, value_parser = clap::value_parser!(u16).range(1..),
          env = "KVAB_CHECK_PROXY_PORT")]
    pub proxy_port: u16,
    /// Namespace of the gateway Service and the HTTPRoute.
    #[arg(
        long,
        value_name = "NS",
        default_value = "llm-d-inference-scheduler",
        env = "KVAB_CHECK_GATEWAY_NAMESPACE"
    )]
    pub gateway_namespace: String,
    /// Gateway Service to port-forward to when no --gateway-url is given.
    #[arg(long, value_name = "NAME[:PORT]", default_value = "infra-inference-scheduling-inference-gateway-istio:80",
          value_parser = |v: &str| service(v, 80), env = "KVAB_CHECK_GATEWAY_SERVICE")]
    pub gateway_service: ServiceRef,
    /// The HTTPRoute of Step 2.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "llm-d-inference-scheduling",
        env = "KVAB_CHECK_HTTPROUTE"
    )]
    pub httproute: String,
    /// The InferencePool the HTTPRoute must reference.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "vllm-proxy-performance",
        env = "KVAB_CHECK_INFERENCE_POOL"
    )]
    pub inference_pool: String,
    /// Namespace of the EPP's ConfigMap and Deployment: the pool's, where manifests/epp.yaml runs the EPP
    /// (llm-d-inference-scheduler for an EPP installed the runbook's way).
    #[arg(
        long,
        value_name = "NS",
        default_value = "llm-d-vllm",
        env = "KVAB_CHECK_EPP_NAMESPACE"
    )]
    pub epp_namespace: String,
    /// ConfigMap holding the EPP configuration.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "gaie-inference-scheduling-epp-config",
        env = "KVAB_CHECK_EPP_CONFIGMAP"
    )]
    pub epp_configmap: String,
    /// Key of the EPP configuration in that ConfigMap.
    #[arg(
        long,
        value_name = "KEY",
        default_value = "epp-config.yaml",
        env = "KVAB_CHECK_EPP_CONFIG_KEY"
    )]
    pub epp_config_key: String,
    /// Deployment whose pods' logs are scanned for EPP errors.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "gaie-inference-scheduling-epp",
        env = "KVAB_CHECK_EPP_DEPLOYMENT"
    )]
    pub epp_deployment: String,
    /// The kvab serve Service (in --proxy-namespace) to port-forward to when no --sidecar-url is given.
    #[arg(long, value_name = "NAME[:PORT]", default_value = "kvab:18090", value_parser = |v: &str| service(v, 18090),
          env = "KVAB_CHECK_SIDECAR_SERVICE")]
    pub sidecar_service: ServiceRef,
}

/// The flags of `kvab check`, as typed. `Options::from_args` resolves them.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Run the A/B runbook (prerequisites, Steps 1-4, EPP health, latency verdict) with a verdict",
    after_help = "Exit status: 0 pass, 1 fail, 2 inconclusive, 3 usage error or the check could not run.\n\
                  Every environment variable is used only when its flag is not given."
)]
pub struct CheckArgs {
    /// Local mode: URLs only (the default; the make demo stack on its default ports).
    #[arg(long, conflicts_with = "cluster", help_heading = "Mode and output")]
    local: bool,
    /// Cluster mode: the Kubernetes API via KUBECONFIG or ~/.kube/config, else in-cluster credentials.
    #[arg(long, help_heading = "Mode and output")]
    cluster: bool,
    /// The mode, when neither --local nor --cluster is given.
    #[arg(
        long,
        value_enum,
        default_value = "local",
        env = "KVAB_CHECK_MODE",
        help_heading = "Mode and output"
    )]
    mode: Mode,
    /// JSON report on stdout instead of the table.
    #[arg(long, env = "KVAB_CHECK_JSON", value_parser = BoolishValueParser::new(), help_heading = "Mode and output")]
    json: bool,
    /// Print the requests (as curl lines) and Kubernetes reads it would make; send nothing; exit 0.
    #[arg(long, env = "KVAB_CHECK_DRY_RUN", value_parser = BoolishValueParser::new(), help_heading = "Mode and output")]
    dry_run: bool,

    /// The gateway [local: http://127.0.0.1:$KVAB_GATEWAY_PORT, port 18080 by default; cluster: a port-forward
    /// to --gateway-service].
    #[arg(long, value_name = "URL", value_parser = http_url, env = "KVAB_CHECK_GATEWAY_URL", help_heading = "Targets")]
    gateway_url: Option<String>,
    /// kvab serve, or `none` to run without it (counts from response tags) [local:
    /// http://127.0.0.1:$KVAB_SIDECAR_PORT, 18090; cluster: a port-forward to --sidecar-service].
    #[arg(long, value_name = "URL|none", value_parser = http_url_or_none, env = "KVAB_CHECK_SIDECAR_URL",
          help_heading = "Targets")]
    sidecar_url: Option<String>,
    /// Envoy admin, for the filter's kvab_served_total cross-check, or `none` [local:
    /// http://127.0.0.1:$KVAB_ENVOY_ADMIN_PORT, 18001; cluster: none].
    #[arg(long, value_name = "URL|none", value_parser = http_url_or_none, env = "KVAB_CHECK_ENVOY_ADMIN_URL",
          help_heading = "Targets")]
    envoy_admin_url: Option<String>,
    /// Step 1 target of an arm; repeatable [local: http://127.0.0.1:$KVAB_NVLINK_ARM_PORT (18101) for nvlink,
    /// $KVAB_FS_ARM_PORT (18102) for fs; cluster: a port-forward to a ready proxy pod of the arm].
    #[arg(long, value_name = "ARM=URL", value_parser = arm_url, env = "KVAB_CHECK_PROXY_URL",
          value_delimiter = ' ', help_heading = "Targets")]
    proxy_url: Vec<(String, String)>,

    /// The arms, in comparison order; arm names as the filter takes them (a-z 0-9 . _ -, see
    /// docs/filter.md#arm-names).
    #[arg(long, value_name = "A,B", value_delimiter = ',', default_value = "nvlink,fs", value_parser = arm_name,
          env = "KVAB_CHECK_ARMS", help_heading = "Arms")]
    arms: Vec<String>,
    /// Names the completion id path must show for an arm; repeatable [nvlink:
    /// vllm-prefill-p2p:14579,vllm-decode-p2p:14579; fs: vllm-prefill-fs,vllm-decode-fs].
    #[arg(long, value_name = "ARM=PREFILL,DECODE", value_parser = id_path, env = "KVAB_CHECK_ID_PATH",
          value_delimiter = ' ', help_heading = "Arms")]
    id_path: Vec<(String, String, String)>,
    /// The arm header.
    #[arg(long, value_name = "NAME", default_value = kvab_contract::ARM_HEADER, value_parser = header_name,
          env = "KVAB_CHECK_HEADER", help_heading = "Arms")]
    header: String,
    /// A value the filter must refuse with 400.
    #[arg(
        long,
        value_name = "V",
        default_value = "nvlink2",
        env = "KVAB_CHECK_UNKNOWN_VALUE",
        help_heading = "Arms"
    )]
    unknown_value: String,
    /// Model in every request body.
    #[arg(long, value_name = "M", default_value = MODEL, env = "KVAB_CHECK_MODEL", help_heading = "Arms")]
    model: String,

    /// Step 3 requests per arm (0-1000).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=1000),
          allow_negative_numbers = true,
          env = "KVAB_CHECK_HEADER_REQUESTS", help_heading = "Load")]
    header_requests: u32,
    /// Step 4 requests (0-10000).
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=10_000),
          allow_negative_numbers = true,
          env = "KVAB_CHECK_BURST_REQUESTS", help_heading = "Load")]
    burst_requests: u32,
    /// Step 4 requests in flight (1-256).
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=256),
          allow_negative_numbers = true,
          env = "KVAB_CHECK_CONCURRENCY", help_heading = "Load")]
    concurrency: u32,
    /// Step 4 path.
    #[arg(long, value_name = "PATH", default_value = "/v1/chat/completions", value_parser = absolute_path,
          env = "KVAB_CHECK_BURST_PATH", help_heading = "Load")]
    burst_path: String,
    /// Step 4 asks for "stream": true (time to first byte = first token).
    #[arg(long, env = "KVAB_CHECK_STREAM", value_parser = BoolishValueParser::new(), help_heading = "Load")]
    stream: bool,
    /// Limit of one request, seconds (curl's --max-time in the runbook).
    #[arg(long, value_name = "S", default_value = "25", value_parser = seconds, env = "KVAB_CHECK_MAX_TIME",
          help_heading = "Load")]
    max_time: Duration,
    /// Limit of the whole burst, seconds.
    #[arg(long, value_name = "S", default_value = "120", value_parser = seconds, env = "KVAB_CHECK_BURST_TIME_LIMIT",
          help_heading = "Load")]
    burst_time_limit: Duration,
    /// Longest wait for the counters to show a step's traffic, seconds.
    #[arg(long, value_name = "S", default_value = "5", value_parser = seconds, env = "KVAB_CHECK_SETTLE",
          help_heading = "Load")]
    settle: Duration,

    /// Significance level of the split test.
    #[arg(long, value_name = "P", default_value = "0.01", value_parser = fraction, env = "KVAB_CHECK_ALPHA",
          help_heading = "Verdict")]
    alpha: f64,
    /// Share of the burst that must answer 200.
    #[arg(long = "min-success", value_name = "R", default_value = "0.95", value_parser = fraction,
          env = "KVAB_CHECK_MIN_SUCCESS", help_heading = "Verdict")]
    min_success_ratio: f64,
    /// Expected share of untagged traffic per arm, split evenly among its proxies [every proxy equally].
    #[arg(long, value_name = "ARM=W,...", value_delimiter = ',', value_parser = arm_weight, env = "KVAB_CHECK_SPLIT",
          help_heading = "Verdict")]
    split: Vec<(String, f64)>,
    /// Step 2's HTTPRoute from a file (YAML or JSON) [local: none, the Step 2 checks are skipped].
    #[arg(
        long,
        value_name = "F",
        env = "KVAB_CHECK_HTTPROUTE_FILE",
        help_heading = "Verdict"
    )]
    httproute_file: Option<PathBuf>,
    /// Step 2's EPP configuration from a file (YAML or JSON) [local: none].
    #[arg(
        long,
        value_name = "F",
        env = "KVAB_CHECK_EPP_CONFIG_FILE",
        help_heading = "Verdict"
    )]
    epp_config_file: Option<PathBuf>,
    /// Step 2 fails without a label selector filter plugin (label-selector-filter, or by-label-selector).
    #[arg(long, env = "KVAB_CHECK_REQUIRE_LABEL_SELECTOR", value_parser = BoolishValueParser::new(),
          help_heading = "Verdict")]
    require_label_selector: bool,

    #[command(flatten)]
    cluster_names: ClusterNames,
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
    /// `Some("")`: `--envoy-admin-url none`.
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

/// The word that turns a target off (`--sidecar-url none`).
const NONE: &str = "none";

/// The runbook's arms and the pod names their id paths show.
fn known_arm(name: &str) -> Arm {
    let (prefill, decode) = match name {
        "nvlink" => (
            Some("vllm-prefill-p2p:14579"),
            Some("vllm-decode-p2p:14579"),
        ),
        "fs" => (Some("vllm-prefill-fs"), Some("vllm-decode-fs")),
        _ => (None, None),
    };
    Arm {
        name: name.to_string(),
        prefill: prefill.map(String::from),
        decode: decode.map(String::from),
        proxy_url: None,
    }
}

impl Options {
    /// Resolves the typed flags: arms with their URLs and id paths, cross-flag rules, local-mode defaults.
    pub fn from_args(args: CheckArgs) -> Result<Options, String> {
        let mode = if args.cluster {
            Mode::Cluster
        } else if args.local {
            Mode::Local
        } else {
            args.mode
        };
        let mut arms: Vec<Arm> = args.arms.iter().map(|name| known_arm(name)).collect();
        for (name, target) in args.proxy_url {
            arm_mut(&mut arms, &name, "--proxy-url")?.proxy_url = Some(target);
        }
        for (name, prefill, decode) in args.id_path {
            let arm = arm_mut(&mut arms, &name, "--id-path")?;
            arm.prefill = Some(prefill);
            arm.decode = Some(decode);
        }
        let split: BTreeMap<String, f64> = args.split.into_iter().collect();
        if let Some(arm) = split
            .keys()
            .find(|arm| !arms.iter().any(|a| &a.name == *arm))
        {
            return Err(format!(
                "--split names {arm:?}, which is not one of the arms (see --arms)"
            ));
        }
        let no_sidecar = args.sidecar_url.as_deref() == Some(NONE);
        let mut options = Options {
            mode,
            json: args.json,
            dry_run: args.dry_run,
            arms,
            header: args.header,
            unknown_value: args.unknown_value,
            model: args.model,
            gateway_url: args.gateway_url,
            sidecar_url: args.sidecar_url.filter(|_| !no_sidecar),
            no_sidecar,
            envoy_admin_url: args.envoy_admin_url.map(|url| {
                if url == NONE {
                    String::new()
                } else {
                    url
                }
            }),
            header_requests: args.header_requests,
            burst_requests: args.burst_requests,
            concurrency: args.concurrency,
            burst_path: args.burst_path,
            stream: args.stream,
            max_time: args.max_time,
            burst_time_limit: args.burst_time_limit,
            settle: args.settle,
            alpha: args.alpha,
            min_success_ratio: args.min_success_ratio,
            split,
            httproute_file: args.httproute_file,
            epp_config_file: args.epp_config_file,
            require_label_selector: args.require_label_selector,
            cluster: args.cluster_names,
        };
        if options.mode == Mode::Local {
            options.apply_local_defaults();
        }
        Ok(options)
    }

    /// Local mode: the ports of `make demo` (overridable by the same environment variables) and its files.
    fn apply_local_defaults(&mut self) {
        self.gateway_url
            .get_or_insert_with(|| local_url("KVAB_GATEWAY_PORT", 18080));
        if !self.no_sidecar {
            self.sidecar_url
                .get_or_insert_with(|| local_url("KVAB_SIDECAR_PORT", 18090));
        }
        self.envoy_admin_url
            .get_or_insert_with(|| local_url("KVAB_ENVOY_ADMIN_PORT", 18001));
        for arm in &mut self.arms {
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
}

/// The options of a bare `kvab check`, for unit tests of the steps.
#[cfg(test)]
impl Default for Options {
    fn default() -> Self {
        match crate::cli::parse_from(["kvab", "check"]) {
            Ok(crate::cli::Command::Check(args)) => match Options::from_args(*args) {
                Ok(options) => options,
                Err(e) => unreachable!("the defaults are valid: {e}"),
            },
            other => unreachable!("a bare `kvab check` parses: {other:?}"),
        }
    }
}

fn arm_mut<'a>(arms: &'a mut [Arm], name: &str, flag: &str) -> Result<&'a mut Arm, String> {
    arms.iter_mut()
        .find(|a| a.name == name)
        .ok_or_else(|| format!("{flag} names {name:?}, which is not one of the arms (see --arms)"))
}

// Value parsers of check alone (the shared ones are `crate::args`): clap names the flag and the value in
// front of each message.

fn http_url_or_none(value: &str) -> Result<String, String> {
    if value == NONE {
        Ok(NONE.into())
    } else {
        http_url(value).map_err(|e| format!("{e} (nor `none`)"))
    }
}

/// `ARM=VALUE`: the arm must be an [`kvab_contract::ArmName`].
fn pair(value: &str, shape: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((arm_name(k)?, v.to_string())),
        _ => Err(format!("wants {shape}")),
    }
}

fn arm_url(value: &str) -> Result<(String, String), String> {
    let (arm, target) = pair(value, "ARM=URL")?;
    Ok((arm, http_url(&target)?))
}

fn id_path(value: &str) -> Result<(String, String, String), String> {
    let shape = "ARM=PREFILL,DECODE";
    let (arm, names) = pair(value, shape)?;
    match names.split_once(',') {
        Some((prefill, decode)) if !prefill.is_empty() && !decode.is_empty() => {
            Ok((arm, prefill.to_string(), decode.to_string()))
        }
        _ => Err(format!("wants {shape}")),
    }
}

fn arm_weight(value: &str) -> Result<(String, f64), String> {
    let (arm, weight) = pair(value.trim(), "ARM=WEIGHT")?;
    match weight.parse::<f64>() {
        Ok(w) if w > 0.0 && w.is_finite() => Ok((arm, w)),
        _ => Err(format!("the weight of {arm} must be a positive number")),
    }
}

fn label_selector(value: &str) -> Result<String, String> {
    kvab_serve::selector::validate(value)?;
    Ok(value.to_string())
}

fn label_key(value: &str) -> Result<String, String> {
    kvab_serve::selector::validate_key(value)?;
    Ok(value.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::cli;

    fn parse(list: &[&str]) -> Result<Options, String> {
        let mut args = vec!["kvab", "check"];
        args.extend_from_slice(list);
        match cli::parse_from(args) {
            Ok(cli::Command::Check(check)) => Options::from_args(*check),
            Ok(_) => panic!("not parsed as check"),
            Err(e) => Err(e.to_string()),
        }
    }

    fn run(list: &[&str]) -> Options {
        parse(list).unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(list: &[&str]) -> String {
        match parse(list) {
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
            o.cluster.gateway_service.to_string(),
            "infra-inference-scheduling-inference-gateway-istio:80"
        );
        assert_eq!(o.cluster.sidecar_service.to_string(), "kvab:18090");
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
            "--header",
            "X-Arm",
            "--cluster",
        ]);
        assert_eq!((o.burst_requests, o.concurrency), (40, 8));
        assert!(o.json && o.no_sidecar && o.sidecar_url.is_none());
        assert_eq!(o.split["nvlink"], 3.0);
        assert_eq!(o.arms[1].prefill.as_deref(), Some("pre"));
        assert_eq!(o.arms[0].proxy_url.as_deref(), Some("http://10.0.0.1:8080"));
        assert_eq!(o.header, "x-arm");
        assert_eq!(
            o.cluster.gateway_service,
            ServiceRef {
                name: "gw".into(),
                port: 8080
            }
        );
        assert_eq!(o.mode, Mode::Cluster);
        assert_eq!(
            o.gateway_url, None,
            "cluster mode port-forwards unless given a URL"
        );
    }

    #[test]
    fn an_arm_outside_the_runbook_has_no_id_path_until_given_one() {
        let o = run(&["--arms", "gpu,fs", "--id-path", "gpu=a,b"]);
        assert_eq!(o.arms[0].name, "gpu");
        assert_eq!(o.arms[0].prefill.as_deref(), Some("a"));
        assert_eq!(o.arms[0].proxy_url, None, "no local port is known for gpu");
        assert_eq!(o.arms[1].prefill.as_deref(), Some("vllm-prefill-fs"));
    }

    #[test]
    fn mistakes_are_named() {
        assert!(error(&["--burst-requests", "-1"]).contains("--burst-requests"));
        assert!(error(&["--burst-requests", "10001"]).contains("--burst-requests"));
        assert!(error(&["--concurrency"]).contains("--concurrency"));
        assert!(error(&["--split", "gpu=1"]).contains("not one of the arms"));
        assert!(error(&["--split", "fs=0"]).contains("positive number"));
        assert!(error(&["--gateway-url", "https://x"]).contains("http://"));
        assert!(error(&["--json=yes"]).contains("--json"));
        assert!(error(&["--frobnicate"]).contains("--frobnicate"));
        assert!(error(&["--alpha", "2"]).contains("--alpha"));
        assert!(error(&["--arms", "nvlink,,fs"]).contains("empty arm name"));
        let rule = kvab_contract::ArmName::parse("NVLink")
            .unwrap_err()
            .to_string();
        for args in [
            &["--arms", "NVLink,fs"][..],
            &["--proxy-url", "NVLink=http://127.0.0.1:1"],
            &["--id-path", "NVLink=a,b"],
            &["--split", "NVLink=1"],
        ] {
            let e = error(args);
            assert!(e.contains(&rule), "{args:?}: {e}");
        }
        assert!(error(&["--id-path", "fs=onlyone"]).contains("ARM=PREFILL,DECODE"));
        assert!(error(&["--local", "--cluster"]).contains("--cluster"));
        assert!(error(&["--sidecar-service", "kvab:0"]).contains("--sidecar-service"));
        assert!(error(&["--burst-path", "v1/x"]).contains("must start with /"));
        assert!(error(&["--proxy-selector", "role=pro xy"]).contains("--proxy-selector"));
    }
}
