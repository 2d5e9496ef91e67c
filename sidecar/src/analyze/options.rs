//! `kvab analyze` command line. Every flag, its help text, default and environment variable
//! (`KVAB_ANALYZE_<FLAG>`) is defined once, here; docs/analyze.md shows `kvab analyze --help`.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::ArgGroup;

use crate::args::{arm_name, boundary, fraction, http_url, seconds};
use kvab_judge::sequential::Boundary;

#[derive(Debug, Clone, clap::Args)]
#[command(
    group(ArgGroup::new("source").required(true).args(["prometheus", "answers"])),
    after_help = "Exit status: 0 decided, 1 invalid (sample-ratio mismatch), 2 inconclusive, 3 usage error,\n\
                        a Prometheus query failed (unreachable, bad query, no such series, an answer over 16 MiB,\n\
                        a query not in --answers' file), a file of answers that cannot be read or written, or\n\
                        invalid input (a value that is no count, buckets that are no histogram).\n\
                        Every environment variable is used only when its flag is not given."
)]
pub struct AnalyzeArgs {
    /// Prometheus (its HTTP API at /api/v1/query).
    #[arg(long, value_name = "URL", value_parser = http_url, env = "KVAB_ANALYZE_PROMETHEUS")]
    pub prometheus: Option<String>,
    /// Judge the answers recorded by --save-answers instead of asking Prometheus (no network); the window
    /// is the file's.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["window", "start", "end", "save_answers"],
          env = "KVAB_ANALYZE_ANSWERS")]
    pub answers: Option<PathBuf>,
    /// Also write every query and Prometheus's answer to this file, to judge again with --answers.
    #[arg(long, value_name = "FILE", env = "KVAB_ANALYZE_SAVE_ANSWERS")]
    pub save_answers: Option<PathBuf>,
    /// The window ending at --end: 90s, 30m, 1h, 2d.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = window, conflicts_with = "start",
          env = "KVAB_ANALYZE_WINDOW")]
    pub window: Duration,
    /// Start of the window instead (RFC 3339 or Unix seconds).
    #[arg(long, value_name = "TIME", value_parser = instant, env = "KVAB_ANALYZE_START")]
    pub start: Option<f64>,
    /// End of the window (RFC 3339 or Unix seconds) [now].
    #[arg(long, value_name = "TIME", value_parser = instant, env = "KVAB_ANALYZE_END")]
    pub end: Option<f64>,
    /// The two arms, in comparison order (shifts are second minus first); arm names as the filter takes them
    /// (a-z 0-9 . _ -, see docs/filter.md#arm-names).
    #[arg(long, value_name = "A,B", value_delimiter = ',', default_value = "nvlink,fs", value_parser = arm_name,
          env = "KVAB_ANALYZE_ARMS")]
    pub arms: Vec<String>,
    /// The filter's split weights, for the sample-ratio check of split-assigned requests [no check].
    #[arg(long, value_name = "ARM=W,...", value_delimiter = ',', value_parser = arm_weight, env = "KVAB_ANALYZE_SPLIT")]
    pub split: Vec<(String, f64)>,
    /// Read the split weights from the filter's configuration instead: a WasmPlugin or TrafficExtension
    /// (YAML or JSON, e.g. `kubectl get wasmplugin kvab -o yaml`), or the filter's JSON; FILE "-" is stdin.
    #[arg(long, value_name = "FILE", value_parser = split_of_filter_config, conflicts_with = "split",
          env = "KVAB_ANALYZE_FILTER_CONFIG")]
    pub filter_config: Option<FilterSplit>,
    /// Label matchers added to every query, e.g. 'namespace="llm-d-inference-scheduler"'.
    #[arg(long, value_name = "MATCHERS", default_value = "", value_parser = matchers, env = "KVAB_ANALYZE_SELECTOR")]
    pub selector: String,
    /// The label naming the arm on vLLM's series (a relabeling of the pods' llm-d.ai/kv-backend).
    #[arg(long, value_name = "NAME", default_value = "kv_backend", value_parser = label_name,
          env = "KVAB_ANALYZE_VLLM_ARM_LABEL")]
    pub vllm_arm_label: String,
    /// Label matchers selecting an arm's vLLM series instead, e.g. 'nvlink=pod=~"vllm-decode-p2p.*"';
    /// repeatable, one per arm.
    #[arg(long, value_name = "ARM=MATCHERS", value_parser = arm_matchers, env = "KVAB_ANALYZE_VLLM_SELECTOR",
          value_delimiter = ' ')]
    pub vllm_selector: Vec<(String, String)>,
    /// Fewer requests than this per arm in the window is inconclusive.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 200,
        env = "KVAB_ANALYZE_MIN_REQUESTS"
    )]
    pub min_requests: u64,
    /// Family-wise error rate of the claims.
    #[arg(long, value_name = "P", default_value = "0.05", value_parser = fraction, env = "KVAB_ANALYZE_ALPHA")]
    pub alpha: f64,
    /// Repeated analyses of one growing window: this run is one of K looks planned one every --look-every
    /// from --start (1-100); alpha is spent over them (by --boundary), so re-running at each look makes
    /// no more false claims than one analysis.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100),
          requires = "look_every", env = "KVAB_ANALYZE_LOOKS")]
    pub looks: u32,
    /// With --looks: the time between looks (90s, 30m, 1h, 2d); the look of a run is the one its window's
    /// end reaches from --start.
    #[arg(long, value_name = "DURATION", value_parser = window, requires = "looks", env = "KVAB_ANALYZE_LOOK_EVERY")]
    pub look_every: Option<Duration>,
    /// How repeated runs over one growing window are judged: obrien-fleming or pocock (alpha spent over
    /// the planned looks of --looks), or always-valid (a confidence sequence, valid however often it is
    /// re-run; it needs --plan-requests).
    #[arg(long, value_name = "NAME", default_value = "obrien-fleming", value_parser = boundary,
          env = "KVAB_ANALYZE_BOUNDARY")]
    pub boundary: Boundary,
    /// With --boundary always-valid: the split-assigned requests (both arms) the window is expected to
    /// reach; the sequence is tightest there and valid before and after it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..=1_000_000_000),
          conflicts_with = "looks", env = "KVAB_ANALYZE_PLAN_REQUESTS")]
    pub plan_requests: Option<u64>,
    /// Smallest relative difference of the medians that counts; inside it the arms are equivalent.
    #[arg(long, value_name = "R", default_value = "0.05", value_parser = fraction, env = "KVAB_ANALYZE_MIN_EFFECT")]
    pub min_effect: f64,
    /// The tails' margin: p90 and p99 of the arms are alike when the interval of their ratio lies inside
    /// ±R (between 1/(1+R) and 1+R); `equivalent` needs both alike.
    #[arg(long, value_name = "R", default_value = "0.25", value_parser = fraction, env = "KVAB_ANALYZE_TAIL_MARGIN")]
    pub tail_margin: f64,
    /// The error guardrail's margin, in error rate (0.02: 2 percentage points): `equivalent` needs the
    /// arms' error rates (5xx or no answer) shown within it, `faster` is held back when the faster arm is shown to fail more.
    #[arg(long, value_name = "D", default_value = "0.02", value_parser = fraction, env = "KVAB_ANALYZE_ERROR_MARGIN")]
    pub error_margin: f64,
    /// Sample-ratio check: invalid when split-assigned requests per arm differ from --split with a p-value
    /// below this.
    #[arg(long, value_name = "P", default_value = "0.001", value_parser = fraction,
          env = "KVAB_ANALYZE_SRM_THRESHOLD")]
    pub srm_threshold: f64,
    /// Limit of one query, seconds.
    #[arg(long, value_name = "S", default_value = "30", value_parser = seconds, env = "KVAB_ANALYZE_MAX_TIME")]
    pub max_time: Duration,
    /// JSON report on stdout instead of the table.
    #[arg(long, env = "KVAB_ANALYZE_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
    /// Also write a self-contained HTML report to this file.
    #[arg(long, value_name = "FILE", env = "KVAB_ANALYZE_HTML")]
    pub html: Option<PathBuf>,
}

fn window(value: &str) -> Result<Duration, String> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err("wants a number with s, m, h or d (90s, 30m, 1h, 2d)".into()),
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 && n * scale <= 90 * 86_400 => Ok(Duration::from_secs(n * scale)),
        _ => Err("must be more than 0 and at most 90d".into()),
    }
}

fn instant(value: &str) -> Result<f64, String> {
    if let Ok(seconds) = value.parse::<f64>() {
        return if seconds.is_finite() && seconds > 0.0 {
            Ok(seconds)
        } else {
            Err("not a time".into())
        };
    }
    value
        .parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond() as f64 / 1000.0)
        .map_err(|e| format!("neither RFC 3339 nor Unix seconds: {e}"))
}

fn arm_weight(value: &str) -> Result<(String, f64), String> {
    match value.trim().split_once('=') {
        Some((arm, w)) if !arm.is_empty() => match w.parse::<f64>() {
            Ok(w) if w > 0.0 && w.is_finite() => Ok((arm_name(arm)?, w)),
            _ => Err(format!("the weight of {arm} must be a positive number")),
        },
        _ => Err("wants ARM=WEIGHT".into()),
    }
}

/// The split weights of the filter configuration in `path`: its `split.weights` when `onMissing` is
/// `split`. The configuration is a WasmPlugin's `spec.pluginConfig`, a TrafficExtension's
/// `spec.wasm.pluginConfig` (Istio 1.30 CRD), or the document itself.
fn split_of_filter_config(path: &str) -> Result<FilterSplit, String> {
    use std::io::Read as _;
    let mut text = String::new();
    let read = if path == "-" {
        std::io::stdin().read_to_string(&mut text).map(drop)
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    read.map_err(|e| format!("{path}: {e}"))?;
    let document = crate::args::parse_document(&text).map_err(|e| format!("{path}: {e}"))?;
    let config = ["/spec/pluginConfig", "/spec/wasm/pluginConfig"]
        .iter()
        .find_map(|pointer| document.pointer(pointer))
        .unwrap_or(&document);
    let on_missing = config
        .get("onMissing")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("passthrough");
    if on_missing != "split" {
        return Err(format!(
            "{path}: the filter's onMissing is {on_missing:?}, not \"split\": it assigns no arm at random, \
             so there are no weights to check"
        ));
    }
    let weights = config
        .pointer("/split/weights")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| format!("{path}: onMissing is \"split\" but split.weights is missing"))?;
    weights
        .iter()
        .map(|(arm, weight)| match weight.as_f64() {
            Some(w) if w > 0.0 && w.is_finite() => Ok((
                arm_name(arm).map_err(|e| format!("{path}: split.weights: {e}"))?,
                w,
            )),
            _ => Err(format!(
                "{path}: split.weights.{arm} is not a positive number"
            )),
        })
        .collect::<Result<_, _>>()
        .map(FilterSplit)
}

/// The split weights read by `--filter-config` (a type of its own: clap would take a bare `Vec` for
/// a repeatable flag).
#[derive(Debug, Clone)]
pub struct FilterSplit(pub Vec<(String, f64)>);

/// PromQL label matchers, kept as typed but refusing what would break out of the braces.
fn matchers(value: &str) -> Result<String, String> {
    if value.contains(['{', '}']) {
        return Err("label matchers only, without braces: 'namespace=\"x\",pod=~\"gw-.*\"'".into());
    }
    Ok(value.trim().trim_matches(',').to_string())
}

fn arm_matchers(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((arm, selector)) if !arm.is_empty() && !selector.is_empty() => {
            Ok((arm_name(arm)?, matchers(selector)?))
        }
        _ => Err("wants ARM=MATCHERS".into()),
    }
}

/// A Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
fn label_name(value: &str) -> Result<String, String> {
    let mut chars = value.chars();
    let first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(value.to_string())
    } else {
        Err("not a Prometheus label name (letters, digits and _, not starting with a digit)".into())
    }
}
