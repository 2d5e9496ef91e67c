//! `kvab experiment` command line (`ExperimentArgs`, clap) and what the run uses (`Options`). Every flag, its
//! help text, default and environment variable (`KVAB_EXPERIMENT_<FLAG>`) is defined once, here;
//! docs/experiment.md shows `kvab experiment --help` (tests/sidecar/test_cli.py keeps the two equal).

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;

mod shape;

pub use super::looks::Until;
pub use super::records::JudgeOptions;
use super::records::{DEFAULT_ERROR_MARGIN, DEFAULT_LOOKS, DEFAULT_TAIL_MARGIN};
use kvab_judge::reuse::Shape;
use kvab_judge::sequential::Boundary;
use kvab_judge::sweep::Slo;

use crate::args::{
    absolute_path, arm_name, boundary, header_name, http_url, local_url, long_seconds,
    open_fraction, rate, seconds, service, slo, think_time, zipf, ServiceRef, MODEL,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    // /v1/chat/completions with `messages`.
    Chat,
    // /v1/completions with `prompt`.
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// The flags of `kvab experiment`, as typed. `Options::from_args` resolves them.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Run a randomized A/B of the arms through the gateway and judge it (time to first token per prompt size)",
    after_help = "Exit status: 0 decided, 1 invalid (sample-ratio mismatch or no answers), 2 inconclusive,\n\
                  3 usage error or the experiment could not run.\n\
                  Every environment variable is used only when its flag is not given."
)]
pub struct ExperimentArgs {
    /// Local mode: the gateway by URL (the default; the make demo stack on its default port).
    #[arg(long, conflicts_with = "cluster", help_heading = "Mode and output")]
    local: bool,
    /// Cluster mode: a port-forward to --gateway-service through the Kubernetes API (as kvab check).
    #[arg(long, help_heading = "Mode and output")]
    cluster: bool,
    /// JSON report on stdout instead of the table.
    #[arg(long, env = "KVAB_EXPERIMENT_JSON", value_parser = BoolishValueParser::new(),
          help_heading = "Mode and output")]
    json: bool,
    /// Also write a self-contained HTML report with plots to this file.
    #[arg(
        long,
        value_name = "FILE",
        env = "KVAB_EXPERIMENT_HTML",
        help_heading = "Mode and output"
    )]
    html: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long, env = "KVAB_EXPERIMENT_QUIET", value_parser = BoolishValueParser::new(),
          help_heading = "Mode and output")]
    quiet: bool,
    /// Also write every measured request's record to this file (JSON Lines, for --judge-records).
    #[arg(
        long,
        value_name = "FILE",
        env = "KVAB_EXPERIMENT_RECORDS",
        help_heading = "Mode and output"
    )]
    records: Option<PathBuf>,
    /// Send nothing: judge a file written by --records as its live run did. The Verdict flags given,
    /// but for --block, replace the recorded ones; the flags that shape traffic are refused.
    #[arg(
        long,
        value_name = "FILE",
        env = "KVAB_EXPERIMENT_JUDGE_RECORDS",
        help_heading = "Mode and output"
    )]
    judge_records: Option<PathBuf>,

    /// The gateway [local: http://127.0.0.1:$KVAB_GATEWAY_PORT, port 18080 by default; cluster: a port-forward
    /// to the gateway Service].
    #[arg(long, value_name = "URL", value_parser = http_url, env = "KVAB_EXPERIMENT_GATEWAY_URL",
          help_heading = "Targets")]
    gateway_url: Option<String>,
    /// Namespace of the gateway Service (cluster mode).
    #[arg(
        long,
        value_name = "NS",
        default_value = "llm-d-inference-scheduler",
        env = "KVAB_EXPERIMENT_GATEWAY_NAMESPACE",
        help_heading = "Targets"
    )]
    gateway_namespace: String,
    /// Gateway Service to port-forward to when no --gateway-url is given (cluster mode).
    #[arg(long, value_name = "NAME[:PORT]", default_value = "infra-inference-scheduling-inference-gateway-istio:80",
          value_parser = |v: &str| service(v, 80), env = "KVAB_EXPERIMENT_GATEWAY_SERVICE", help_heading = "Targets")]
    gateway_service: ServiceRef,

    /// The two arms, in comparison order (shifts are second minus first); arm names as the filter takes them
    /// (a-z 0-9 . _ -, see docs/filter.md#arm-names).
    #[arg(long, value_name = "A,B", value_delimiter = ',', default_value = "nvlink,fs", value_parser = arm_name,
          env = "KVAB_EXPERIMENT_ARMS", help_heading = "Arms")]
    arms: Vec<String>,
    /// The arm header kvab sets on each request (the filter's `header`; its response tag names the arm that
    /// served).
    #[arg(long, value_name = "NAME", default_value = kvab_contract::ARM_HEADER, value_parser = header_name,
          env = "KVAB_EXPERIMENT_HEADER", help_heading = "Arms")]
    header: String,

    /// Synthetic prompts of these sizes in tokens, one workload class each (1-131072).
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_value = "128,2048,8192",
          value_parser = clap::value_parser!(u32).range(1..=131_072), conflicts_with = "prompts",
          env = "KVAB_EXPERIMENT_PROMPT_TOKENS", help_heading = "Workload")]
    prompt_tokens: Vec<u32>,
    /// Prompts from a JSONL file instead: each line {"prompt": "..."} or {"messages": [...]}, optionally
    /// with "class" (default class: file).
    #[arg(
        long,
        value_name = "FILE",
        env = "KVAB_EXPERIMENT_PROMPTS",
        help_heading = "Workload"
    )]
    prompts: Option<PathBuf>,
    /// The shape of the synthetic prompts: unique (no prefix shared: every request moves its whole KV
    /// cache), shared-prefix (each prompt a group's prefix and a unique suffix of --suffix-tokens; the
    /// groups of a class drawn by Zipf popularity, --prefix-groups and --zipf), or multi-turn
    /// (conversations of --turns turns, each on one arm, each turn a message of the class's size sent
    /// with the conversation so far, the turns --think-time apart). Several (unique,shared-prefix) make
    /// each class a cell at each workload; multi-turn goes alone.
    #[arg(
        long,
        value_enum,
        value_name = "KIND,...",
        value_delimiter = ',',
        default_value = "unique",
        env = "KVAB_EXPERIMENT_WORKLOAD",
        help_heading = "Workload"
    )]
    workload: Vec<WorkloadKind>,
    /// shared-prefix: prefix groups per class (1-100000).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000),
          env = "KVAB_EXPERIMENT_PREFIX_GROUPS", help_heading = "Workload")]
    prefix_groups: u32,
    /// shared-prefix: each prompt's unique suffix in tokens, fewer than the smallest --prompt-tokens
    /// (1-131071).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=131_071),
          env = "KVAB_EXPERIMENT_SUFFIX_TOKENS", help_heading = "Workload")]
    suffix_tokens: u32,
    /// multi-turn: turns per conversation (2-64); --requests and --warmup then count conversations.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=64),
          env = "KVAB_EXPERIMENT_TURNS", help_heading = "Workload")]
    turns: u32,
    /// multi-turn: seconds between an answer and the conversation's next turn (0-3600).
    #[arg(long, value_name = "S", default_value = "0", value_parser = think_time,
          env = "KVAB_EXPERIMENT_THINK_TIME", help_heading = "Workload")]
    think_time: f64,
    /// shared-prefix: the Zipf exponent of the groups' popularity (group i drawn ∝ 1/i^S; 0: uniform;
    /// at most 4).
    #[arg(long, value_name = "S", default_value = "1", value_parser = zipf,
          env = "KVAB_EXPERIMENT_ZIPF", help_heading = "Workload")]
    zipf: f64,
    /// max_tokens of every request (1-65536).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65_536),
          env = "KVAB_EXPERIMENT_MAX_TOKENS", help_heading = "Workload")]
    max_tokens: u32,
    /// The API.
    #[arg(
        long,
        value_enum,
        default_value = "chat",
        env = "KVAB_EXPERIMENT_ENDPOINT",
        help_heading = "Workload"
    )]
    endpoint: Endpoint,
    /// Path of the API instead of the endpoint's default.
    #[arg(long, value_name = "PATH", value_parser = absolute_path, env = "KVAB_EXPERIMENT_PATH",
          help_heading = "Workload")]
    path: Option<String>,
    /// Non-streamed requests (end-to-end time only; the primary metric becomes e2e_ms).
    #[arg(long, env = "KVAB_EXPERIMENT_NO_STREAM", value_parser = BoolishValueParser::new(),
          help_heading = "Workload")]
    no_stream: bool,
    /// Model in every request body.
    #[arg(long, value_name = "M", default_value = MODEL, env = "KVAB_EXPERIMENT_MODEL", help_heading = "Workload")]
    model: String,

    /// Closed loop: this many requests in flight (1-4096); several levels (1,8,32) make a load sweep, the
    /// levels run one after the other, each with its own warm-up and --requests.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_value = "8",
          value_parser = clap::value_parser!(u32).range(1..=4096), conflicts_with = "rate",
          env = "KVAB_EXPERIMENT_CONCURRENCY", help_heading = "Load")]
    concurrency: Vec<u32>,
    /// Open loop instead: Poisson arrivals at this many requests per second (at most 100000); several
    /// levels make a load sweep.
    #[arg(long, value_name = "R,...", value_delimiter = ',', value_parser = rate,
          env = "KVAB_EXPERIMENT_RATE", help_heading = "Load")]
    rate: Vec<f64>,
    /// Open loop: most requests in flight; an arrival beyond it is skipped and counted (1-65536).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65_536),
          env = "KVAB_EXPERIMENT_MAX_IN_FLIGHT", help_heading = "Load")]
    max_in_flight: u32,
    /// Measured requests, warm-up not included, of each load level (2-10000000).
    #[arg(long, value_name = "N", default_value_t = 600, value_parser = clap::value_parser!(u64).range(2..=10_000_000),
          env = "KVAB_EXPERIMENT_REQUESTS", help_heading = "Load")]
    requests: u64,
    /// Longest run of each load level, seconds (warm-up included).
    #[arg(long, value_name = "S", default_value = "600", value_parser = long_seconds,
          env = "KVAB_EXPERIMENT_DURATION", help_heading = "Load")]
    duration: Duration,
    /// Requests sent first at each load level and left out of every figure (0-100000).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u64).range(0..=100_000),
          env = "KVAB_EXPERIMENT_WARMUP", help_heading = "Load")]
    warmup: u64,
    /// Limit of one request, seconds; a failed request is ranked at it.
    // The default is records::DEFAULT_MAX_TIME_S, what a records file without `max_time_s` is read with.
    #[arg(long, value_name = "S", default_value = "60", value_parser = seconds, env = "KVAB_EXPERIMENT_MAX_TIME",
          help_heading = "Load")]
    max_time: Duration,
    /// The service-level objective of a load sweep: per-request targets (ttft, itl: the mean time per output
    /// token, e2e), e.g. ttft=500ms,itl=50ms; each arm's goodput (requests within every target per second)
    /// and its knee (the lowest level whose p90 passes the primary metric's target) follow.
    #[arg(long, value_name = "NAME=T,...", value_parser = slo, env = "KVAB_EXPERIMENT_SLO", help_heading = "Load")]
    slo: Option<Slo>,
    /// Seed of the assignment, the class order, the prompts and the arrivals [a random seed, printed in the
    /// report].
    #[arg(
        long,
        value_name = "N",
        env = "KVAB_EXPERIMENT_SEED",
        help_heading = "Load"
    )]
    seed: Option<u64>,

    /// Family-wise error rate of the experiment's claims.
    #[arg(long, value_name = "P", default_value = "0.05", value_parser = open_fraction,
          env = "KVAB_EXPERIMENT_ALPHA", help_heading = "Verdict")]
    alpha: f64,
    /// Smallest relative difference that counts (0.05: 5 % of the first arm's median); inside it the arms
    /// are equivalent.
    #[arg(long, value_name = "R", default_value = "0.05", value_parser = open_fraction,
          env = "KVAB_EXPERIMENT_MIN_EFFECT", help_heading = "Verdict")]
    min_effect: f64,
    /// The tails' margin: p90 and p99 of the arms are alike when the interval of their ratio lies inside
    /// ±R (as a ratio: between 1/(1+R) and 1+R); `equivalent` needs both alike.
    #[arg(long, value_name = "R", default_value_t = DEFAULT_TAIL_MARGIN, value_parser = open_fraction,
          env = "KVAB_EXPERIMENT_TAIL_MARGIN", help_heading = "Verdict")]
    tail_margin: f64,
    /// The error guardrail's margin, in error rate (0.02: 2 percentage points): `equivalent` needs the
    /// arms' error rates shown within it, `faster` is held back when the faster arm is shown to fail more.
    #[arg(long, value_name = "D", default_value_t = DEFAULT_ERROR_MARGIN, value_parser = open_fraction,
          env = "KVAB_EXPERIMENT_ERROR_MARGIN", help_heading = "Verdict")]
    error_margin: f64,
    /// When to stop: when the budget is spent, or as soon as every primary comparison is decided.
    #[arg(
        long,
        value_enum,
        default_value = "budget",
        env = "KVAB_EXPERIMENT_UNTIL",
        help_heading = "Verdict"
    )]
    until: Until,
    /// With --until decided: analyses at this many evenly spaced points of the request budget (1-100),
    /// at the levels of --boundary.
    #[arg(long, value_name = "K", default_value_t = DEFAULT_LOOKS, value_parser = clap::value_parser!(u32).range(1..=100),
          env = "KVAB_EXPERIMENT_LOOKS", help_heading = "Verdict")]
    looks: u32,
    /// With --until decided, the levels of the looks: alpha spent over them, obrien-fleming (early looks
    /// strict, the last near alpha) or pocock (nearly equal levels: an effect found earlier, for a larger
    /// --requests); or always-valid (a confidence sequence: any number of looks, a run stopped or judged at
    /// any point, tightest at --requests).
    #[arg(long, value_name = "NAME", default_value = "obrien-fleming", value_parser = boundary,
          env = "KVAB_EXPERIMENT_BOUNDARY", help_heading = "Verdict")]
    boundary: Boundary,
    /// Sample-ratio check: the experiment is invalid when answers per arm differ from the assignment with a
    /// p-value below this.
    #[arg(long, value_name = "P", default_value = "0.001", value_parser = open_fraction,
          env = "KVAB_EXPERIMENT_SRM_THRESHOLD", help_heading = "Verdict")]
    srm_threshold: f64,
    /// Assignment block per class: each run of this many requests of a class holds every arm equally
    /// (a multiple of the number of arms, 2-64).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=64),
          env = "KVAB_EXPERIMENT_BLOCK", help_heading = "Verdict")]
    block: u32,

    /// Where each flag's value came from (filled from clap's matches by `note_sources`).
    #[arg(skip)]
    sources: Sources,
}

/// The flags given on the command line, and those given by the command line or the environment (ids as
/// clap names them: `gateway_url`).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    typed: Vec<String>,
    given: Vec<String>,
}

/// The flags that `--judge-records` takes: output, and the method (the Verdict flags that judge, not
/// `--block`, which shapes the traffic).
const JUDGE_FLAGS: &[&str] = &[
    "json",
    "html",
    "quiet",
    "judge_records",
    "alpha",
    "min_effect",
    "tail_margin",
    "error_margin",
    "until",
    "looks",
    "boundary",
    "srm_threshold",
    "slo",
];

impl ExperimentArgs {
    /// Notes which flags the command line or the environment gave (clap's matches of `experiment`).
    pub fn note_sources(&mut self, matches: &clap::ArgMatches) {
        use clap::parser::ValueSource;
        // The flags, not the argument group clap names after this struct.
        let command =
            <ExperimentArgs as clap::Args>::augment_args(clap::Command::new("experiment"));
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            match matches.value_source(id) {
                Some(ValueSource::CommandLine) => {
                    self.sources.typed.push(id.to_string());
                    self.sources.given.push(id.to_string());
                }
                Some(ValueSource::EnvVariable) => self.sources.given.push(id.to_string()),
                _ => {}
            }
        }
    }

    fn given(&self, id: &str) -> bool {
        self.sources.given.iter().any(|g| g == id)
    }
}

/// What `kvab experiment` is asked to do.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Send the traffic and judge it.
    Live(Box<Options>),
    /// Judge a records file.
    Judge(JudgeOptions),
}

/// `--workload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum WorkloadKind {
    Unique,
    SharedPrefix,
    MultiTurn,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Load {
    Closed { concurrency: u32 },
    Open { rate: f64, max_in_flight: u32 },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// Synthetic prompts of these sizes, one class each.
    Synthetic(Vec<u32>),
    /// Prompts from a JSONL file.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub json: bool,
    pub html: Option<PathBuf>,
    pub quiet: bool,
    /// `None` in cluster mode without --gateway-url: port-forward to `gateway_service`.
    pub gateway_url: Option<String>,
    pub gateway_namespace: String,
    pub gateway_service: ServiceRef,
    pub arms: Vec<String>,
    pub header: String,
    pub workload: Workload,
    /// The synthetic prompts' shapes (`--workload`): one, or several (each class at each).
    pub shapes: Vec<Shape>,
    pub max_tokens: u32,
    pub path: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub model: String,
    /// The load levels, in the order they run: one, or a load sweep.
    pub levels: Vec<Load>,
    pub slo: Option<Slo>,
    pub requests: u64,
    pub duration: Duration,
    pub warmup: u64,
    pub max_time: Duration,
    pub seed: u64,
    pub alpha: f64,
    pub min_effect: f64,
    pub tail_margin: f64,
    pub error_margin: f64,
    pub until: Until,
    pub looks: u32,
    pub boundary: Boundary,
    pub srm_threshold: f64,
    pub block: u32,
    /// `--records`: write the per-request records here.
    pub records: Option<PathBuf>,
}

impl Options {
    /// The live run's options, or the judgement's with `--judge-records` (which refuses the traffic flags
    /// typed on the command line and ignores their environment variables).
    pub fn from_args(args: ExperimentArgs) -> Result<Plan, String> {
        let Some(file) = args.judge_records.clone() else {
            return Options::live(args).map(|options| Plan::Live(Box::new(options)));
        };
        let refused: Vec<String> = args
            .sources
            .typed
            .iter()
            .filter(|id| !JUDGE_FLAGS.contains(&id.as_str()))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect();
        if !refused.is_empty() {
            return Err(format!(
                "--judge-records sends no traffic: {} only apply to a live run (the judgement takes the \
                 output flags and --alpha, --min-effect, --tail-margin, --error-margin, --until, --looks, \
                 --boundary, --srm-threshold, --slo)",
                refused.join(", ")
            ));
        }
        let given = |id: &str| args.given(id);
        Ok(Plan::Judge(JudgeOptions {
            file,
            json: args.json,
            html: args.html.clone(),
            alpha: given("alpha").then_some(args.alpha),
            min_effect: given("min_effect").then_some(args.min_effect),
            tail_margin: given("tail_margin").then_some(args.tail_margin),
            error_margin: given("error_margin").then_some(args.error_margin),
            until: given("until").then_some(args.until),
            looks: given("looks").then_some(args.looks),
            boundary: given("boundary").then_some(args.boundary),
            srm_threshold: given("srm_threshold").then_some(args.srm_threshold),
            slo: args.slo,
        }))
    }

    fn live(args: ExperimentArgs) -> Result<Options, String> {
        let mut sizes = args.prompt_tokens.clone();
        sizes.sort_unstable();
        sizes.dedup();
        let workload = match args.prompts.clone() {
            Some(file) => Workload::File(file),
            None => Workload::Synthetic(sizes),
        };
        let shapes = shape::shapes(&args, &workload)?;
        let levels = shape::levels(&args, &shapes)?;
        let arms = args.arms;
        if arms.len() != 2 {
            return Err(format!("--arms wants exactly two arms, got {}", arms.len()));
        }
        if arms[0] == arms[1] {
            return Err(format!("--arms names {:?} twice", arms[0]));
        }
        if !args.block.is_multiple_of(2) {
            return Err(format!(
                "--block {} is not a multiple of the 2 arms",
                args.block
            ));
        }
        let cluster = args.cluster && !args.local;
        let gateway_url = match args.gateway_url {
            Some(url) => Some(url),
            None if cluster => None,
            None => Some(local_url("KVAB_GATEWAY_PORT", 18080)),
        };
        let looks = match args.until {
            Until::Budget => 1,
            Until::Decided => args.looks,
        };
        Ok(Options {
            json: args.json,
            html: args.html,
            quiet: args.quiet,
            gateway_url,
            gateway_namespace: args.gateway_namespace,
            gateway_service: args.gateway_service,
            arms,
            header: args.header,
            workload,
            shapes,
            max_tokens: args.max_tokens,
            path: args
                .path
                .unwrap_or_else(|| args.endpoint.path().to_string()),
            endpoint: args.endpoint,
            stream: !args.no_stream,
            model: args.model,
            levels,
            slo: args.slo,
            requests: args.requests,
            duration: args.duration,
            warmup: args.warmup,
            max_time: args.max_time,
            seed: args.seed.unwrap_or_else(random_seed),
            alpha: args.alpha,
            min_effect: args.min_effect,
            tail_margin: args.tail_margin,
            error_margin: args.error_margin,
            until: args.until,
            looks,
            boundary: args.boundary,
            srm_threshold: args.srm_threshold,
            block: args.block,
            records: args.records,
        })
    }
}

/// A seed from the operating system's randomness (std's hash keys are drawn from it).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u8(0);
    hasher.finish()
}

#[cfg(test)]
#[allow(clippy::panic, clippy::unwrap_used)]
mod tests {
    use super::super::records::MethodSpec;
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let line = ["kvab", "experiment"].iter().chain(args);
        match crate::cli::parse_from(line) {
            Ok(crate::cli::Command::Experiment(args)) => Options::from_args(*args),
            other => panic!("not parsed as experiment: {other:?}"),
        }
    }

    fn judge(args: &[&str]) -> JudgeOptions {
        match plan(args) {
            Ok(Plan::Judge(judge)) => judge,
            other => panic!("not a judgement: {other:?}"),
        }
    }

    #[test]
    fn judging_records_refuses_the_traffic_flags_by_name() {
        let refused = plan(&[
            "--judge-records",
            "r.jsonl",
            "--gateway-url",
            "http://gw:80",
            "--json",
            "--seed",
            "3",
            "--block",
            "8",
        ])
        .unwrap_err();
        assert!(
            refused.starts_with(
                "--judge-records sends no traffic: --gateway-url, --seed, --block only apply"
            ),
            "{refused}"
        );
        assert!(plan(&["--judge-records", "r.jsonl", "--records", "s.jsonl"]).is_err());
        assert!(
            matches!(plan(&["--records", "s.jsonl"]), Ok(Plan::Live(o)) if o.records.is_some())
        );
    }

    #[test]
    fn several_levels_make_a_sweep_run_to_its_budget_and_the_slo_needs_one() {
        let Ok(Plan::Live(sweep)) = plan(&["--concurrency", "1,8,32", "--slo", "ttft=500ms"])
        else {
            panic!("a sweep is a live run");
        };
        let concurrency: Vec<Load> = [1, 8, 32]
            .map(|concurrency| Load::Closed { concurrency })
            .to_vec();
        assert_eq!(sweep.levels, concurrency);
        assert_eq!(sweep.slo.and_then(|s| s.ttft_ms), Some(500.0));
        let Ok(Plan::Live(open)) = plan(&["--rate", "5,20"]) else {
            panic!("an open-loop sweep is a live run");
        };
        assert!(matches!(open.levels[1], Load::Open { rate, .. } if rate == 20.0));
        let decided = plan(&["--concurrency", "1,8", "--until", "decided"]).unwrap_err();
        assert!(decided.contains("--until budget"), "{decided}");
        let lone = plan(&["--slo", "ttft=500ms"]).unwrap_err();
        assert!(lone.starts_with("--slo applies to a load sweep"), "{lone}");
        let many: Vec<String> = (1..=17).map(|c| c.to_string()).collect();
        let too_many = plan(&["--concurrency", &many.join(",")]).unwrap_err();
        assert!(too_many.starts_with("17 load levels"), "{too_many}");
    }

    #[test]
    fn a_shared_prefix_workload_needs_synthetic_prompts_longer_than_its_suffix() {
        let Ok(Plan::Live(shared)) = plan(&[
            "--workload",
            "shared-prefix",
            "--prompt-tokens",
            "8192,512",
            "--prefix-groups",
            "32",
            "--suffix-tokens",
            "256",
            "--zipf",
            "0.8",
        ]) else {
            panic!("a live run");
        };
        let expected = Shape::SharedPrefix {
            groups: 32,
            suffix_tokens: 256,
            zipf: 0.8,
        };
        assert_eq!(shared.shapes, [expected]);
        let short = plan(&["--workload", "shared-prefix", "--prompt-tokens", "64"]).unwrap_err();
        assert!(
            short.contains("a suffix of 64 tokens leaves no prefix"),
            "{short}"
        );
        let file = plan(&["--workload", "shared-prefix", "--prompts", "p.jsonl"]).unwrap_err();
        assert!(
            file.contains("prompts from a file have their own"),
            "{file}"
        );
        assert!(matches!(plan(&[]), Ok(Plan::Live(o)) if o.shapes == [Shape::Unique]));
        let Ok(Plan::Live(both)) = plan(&["--workload", "unique,shared-prefix"]) else {
            panic!("a live run");
        };
        assert_eq!(both.shapes.len(), 2);
        let mixed = plan(&["--workload", "unique,multi-turn"]).unwrap_err();
        assert!(mixed.contains("it goes alone"), "{mixed}");
    }

    #[test]
    fn method_flags_given_replace_the_recorded_ones_and_the_rest_are_kept() {
        let recorded = MethodSpec {
            alpha: 0.1,
            min_effect: 0.02,
            tail_margin: 0.25,
            error_margin: 0.02,
            until: Until::Decided,
            looks: 5,
            boundary: Boundary::Pocock,
            srm_threshold: 0.01,
        };
        let kept = judge(&["--judge-records", "r.jsonl", "--json"]);
        assert!(kept.json && kept.alpha.is_none() && kept.looks.is_none());
        assert_eq!(kept.method(recorded), recorded);
        let margin = judge(&[
            "--judge-records",
            "r.jsonl",
            "--min-effect",
            "0.2",
            "--alpha",
            "0.05",
        ]);
        assert_eq!(
            margin.method(recorded),
            MethodSpec {
                min_effect: 0.2,
                alpha: 0.05,
                ..recorded
            }
        );
        let always = judge(&["--judge-records", "r.jsonl", "--boundary", "always-valid"]);
        assert_eq!(
            always.method(recorded),
            MethodSpec {
                boundary: Boundary::AlwaysValid,
                ..recorded
            }
        );
        let budget = judge(&[
            "--judge-records",
            "r.jsonl",
            "--until",
            "budget",
            "--looks",
            "4",
        ]);
        assert_eq!(budget.method(recorded).looks, 1);
        // A run of one analysis judged with looks: --looks, or its default.
        let one = MethodSpec {
            until: Until::Budget,
            looks: 1,
            ..recorded
        };
        let decided = judge(&["--judge-records", "r.jsonl", "--until", "decided"]);
        assert_eq!(decided.method(one).looks, DEFAULT_LOOKS);
        let three = judge(&[
            "--judge-records",
            "r.jsonl",
            "--until",
            "decided",
            "--looks",
            "3",
        ]);
        assert_eq!(three.method(one).looks, 3);
    }
}
