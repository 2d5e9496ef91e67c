//! `kvab serve` configuration: a strict TOML file. Unknown keys are errors, and every error names the key and,
//! where the file has one, its line and column. Defaults are documented in `docs/sidecar.md`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use kvab_contract::report::{is_report_token, MAX_REPORT_TOKEN_LEN, MIN_REPORT_TOKEN_LEN};
use kvab_contract::ArmName;
use serde::Deserialize;
use toml::Spanned;

mod raw;
mod sources;

use raw::{Locator, RawConfig};
use sources::{kubernetes, static_endpoints};

/// Used when neither `--config` nor `KVAB_CONFIG` is given: static endpoints for the local stack.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/local.toml");
pub const EMBEDDED_DEFAULT_NAME: &str = "<embedded serve/config/local.toml>";

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `health_listen`: a listener of its own for `GET /healthz` and `GET /readyz`, answered even while
    /// clients hold every connection of `listen`.
    pub health_listen: Option<SocketAddr>,
    pub arms: Vec<String>,
    pub source: Source,
    pub probe: Probe,
    pub shutdown: Shutdown,
    /// Path of the filter module served at `GET /v1/filter.wasm`; `None`: that route answers 404.
    pub filter_wasm: Option<String>,
    /// `reports.state_file`: where the report ledger is kept across restarts.
    pub reports_state_file: Option<std::path::PathBuf>,
    /// `reports.retire_after_seconds`: a reporter silent this long is retired (its counts stay).
    pub reports_retire_after: Duration,
    /// `reports.token_file`: reports must carry `Authorization: Bearer <this token>`.
    pub reports_token: Option<String>,
    /// `reports.max_reporters`: reporters (filter VMs) the ledger holds at most.
    pub reports_max_reporters: usize,
    /// `reports.max_entries`: per-reporter totals the ledger holds at most, all reporters together.
    pub reports_max_entries: usize,
}

#[derive(Debug, Clone)]
pub enum Source {
    Kubernetes(Kubernetes),
    Static(Vec<StaticEndpoint>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubernetes {
    /// Empty: all namespaces (one cluster-wide watch).
    pub namespaces: Vec<String>,
    pub pod_selector: String,
    pub backend_label: String,
    pub endpoint_port: EndpointPort,
    /// How long the watch may fail without a single success before `/readyz` answers 503.
    pub unready_after: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum EndpointPort {
    Number(u16),
    /// A container port name, looked up in the pod's `spec.containers[].ports[]`.
    Name(String),
}

impl fmt::Display for EndpointPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointPort::Number(n) => write!(f, "{n}"),
            EndpointPort::Name(name) => write!(f, "{name:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticEndpoint {
    pub backend: String,
    pub address: String,
    pub pod: String,
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// `None`: probing disabled (`interval_seconds = 0`).
    pub interval: Option<Duration>,
    pub timeout: Duration,
    pub path: String,
    /// Probes in flight at once: a map of 10,000 pods is probed in rounds, not all at once.
    pub concurrency: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Shutdown {
    pub drain_delay: Duration,
    pub grace: Duration,
}

/// A configuration error: origin (file name), optional position, and a message naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: String,
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(
                f,
                "{}: line {line}, column {column}: {}",
                self.origin, self.message
            ),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:18090";
pub const DEFAULT_ARMS: [&str; 2] = ["nvlink", "fs"];
pub const DEFAULT_POD_SELECTOR: &str = "role=proxy";
pub const DEFAULT_BACKEND_LABEL: &str = "llm-d.ai/kv-backend";
pub const DEFAULT_ENDPOINT_PORT: u16 = 8080;
pub const DEFAULT_UNREADY_AFTER_SECONDS: f64 = 30.0;
pub const DEFAULT_PROBE_INTERVAL_SECONDS: f64 = 10.0;
pub const DEFAULT_PROBE_TIMEOUT_SECONDS: f64 = 2.0;
pub const DEFAULT_PROBE_PATH: &str = "/metrics";
pub const DEFAULT_PROBE_CONCURRENCY: usize = 64;
pub const DEFAULT_RETIRE_AFTER_SECONDS: f64 = 86_400.0;
/// Shorter would retire filter VMs that are only between bursts.
pub const MIN_RETIRE_AFTER_SECONDS: f64 = 60.0;
/// Reporters the ledger holds (a filter VM is one; each restart brings a new id, kept until retired).
pub const DEFAULT_MAX_REPORTERS: usize = 4096;
pub const MAX_MAX_REPORTERS: usize = 1_000_000;
/// Entries the ledger holds, all reporters together (BENCHMARKS.md: memory, state and restart at this cap).
pub const DEFAULT_MAX_ENTRIES: usize = 200_000;
pub const MAX_MAX_ENTRIES: usize = 10_000_000;
pub const DEFAULT_DRAIN_DELAY_SECONDS: f64 = 0.0;
pub const DEFAULT_GRACE_SECONDS: f64 = 10.0;

impl Config {
    /// Reads the file named by `--config` or `KVAB_CONFIG`, or the embedded local default.
    pub fn load(path: Option<&str>) -> Result<Config, ConfigError> {
        match path {
            None => Config::parse(EMBEDDED_DEFAULT, EMBEDDED_DEFAULT_NAME),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    origin: path.to_string(),
                    position: None,
                    message: format!("cannot read the configuration file: {e}"),
                })?;
                Config::parse(&text, path)
            }
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let loc = Locator { origin, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's Display spans several lines; keep one line and put the position in front.
            loc.error(e.span(), e.message().trim().replace('\n', " "))
        })?;

        let listen: SocketAddr = match &raw.listen {
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|_| loc.error(None, "internal: bad default listen address"))?,
            Some(value) => value.get_ref().parse().map_err(|_| {
                loc.at(
                    value,
                    format!(
                        "`listen` must be an `ip:port` socket address, got {:?}",
                        value.get_ref()
                    ),
                )
            })?,
        };

        let health_listen = match &raw.health_listen {
            None => None,
            Some(value) => {
                let address: SocketAddr = value.get_ref().parse().map_err(|_| {
                    loc.at(
                        value,
                        format!(
                            "`health_listen` must be an `ip:port` socket address, got {:?}",
                            value.get_ref()
                        ),
                    )
                })?;
                if address.port() != 0 && address.port() == listen.port() {
                    return Err(loc.at(
                        value,
                        format!("`health_listen` must use another port than `listen` ({listen})"),
                    ));
                }
                Some(address)
            }
        };

        let arms = match &raw.arms {
            None => DEFAULT_ARMS.iter().map(|s| s.to_string()).collect(),
            Some(value) => {
                let arms = value.get_ref().clone();
                if arms.is_empty() {
                    return Err(loc.at(value, "`arms` must list at least one arm"));
                }
                let mut seen = BTreeSet::new();
                for arm in &arms {
                    // The contract's grammar, the filter's too: the same name, refused with the same rule.
                    if let Err(e) = ArmName::parse(arm) {
                        return Err(loc.at(value, format!("`arms`: {e}")));
                    }
                    if !seen.insert(arm.as_str()) {
                        return Err(loc.at(value, format!("`arms`: {arm:?} is listed twice")));
                    }
                }
                arms
            }
        };

        let source_name = raw
            .source
            .as_ref()
            .map_or("static", |s| s.get_ref().as_str());
        // Both sections are validated whichever source is chosen: a mistake in the other one is still a mistake.
        let kubernetes = kubernetes(&loc, raw.kubernetes)?;
        let static_endpoints = static_endpoints(&loc, raw.static_source, &arms)?;
        let source = match source_name {
            "kubernetes" => Source::Kubernetes(kubernetes),
            "static" => Source::Static(static_endpoints),
            other => {
                let span = raw.source.as_ref().map(|s| s.span());
                return Err(loc.error(
                    span,
                    format!("`source` must be \"kubernetes\" or \"static\", got {other:?}"),
                ));
            }
        };

        let interval = loc.seconds(
            raw.probe.interval_seconds,
            "probe.interval_seconds",
            DEFAULT_PROBE_INTERVAL_SECONDS,
            true,
        )?;
        let probe = Probe {
            interval: (!interval.is_zero()).then_some(interval),
            timeout: loc.seconds(
                raw.probe.timeout_seconds,
                "probe.timeout_seconds",
                DEFAULT_PROBE_TIMEOUT_SECONDS,
                false,
            )?,
            path: match raw.probe.path {
                None => DEFAULT_PROBE_PATH.to_string(),
                Some(path)
                    if path.get_ref().starts_with('/')
                        && !path.get_ref().contains(char::is_whitespace) =>
                {
                    path.into_inner()
                }
                Some(path) => {
                    return Err(loc.at(
                        &path,
                        "`probe.path` must start with `/` and contain no spaces",
                    ))
                }
            },
            concurrency: match raw.probe.concurrency {
                None => DEFAULT_PROBE_CONCURRENCY,
                Some(n) => match usize::try_from(*n.get_ref()) {
                    Ok(n @ 1..=1024) => n,
                    _ => {
                        return Err(loc.at(
                            &n,
                            format!("`probe.concurrency` must be 1..=1024, got {}", n.get_ref()),
                        ))
                    }
                },
            },
        };

        let shutdown = Shutdown {
            drain_delay: loc.seconds(
                raw.shutdown.drain_delay_seconds,
                "shutdown.drain_delay_seconds",
                DEFAULT_DRAIN_DELAY_SECONDS,
                true,
            )?,
            grace: loc.seconds(
                raw.shutdown.grace_seconds,
                "shutdown.grace_seconds",
                DEFAULT_GRACE_SECONDS,
                false,
            )?,
        };

        let filter_wasm = match raw.filter_wasm {
            None => None,
            Some(path) if path.get_ref().starts_with('/') => Some(path.into_inner()),
            Some(path) => {
                return Err(loc.at(
                    &path,
                    format!(
                        "`filter_wasm` must be an absolute path to kvab_filter.wasm, got {:?}",
                        path.get_ref()
                    ),
                ))
            }
        };

        let reports_state_file = match raw.reports.state_file {
            None => None,
            Some(path) if !path.get_ref().trim().is_empty() => {
                Some(std::path::PathBuf::from(path.into_inner()))
            }
            Some(path) => return Err(loc.at(&path, "`reports.state_file` must be a file path")),
        };
        let retire_after_key = raw.reports.retire_after_seconds.clone();
        let reports_retire_after = loc.seconds(
            raw.reports.retire_after_seconds,
            "reports.retire_after_seconds",
            DEFAULT_RETIRE_AFTER_SECONDS,
            false,
        )?;
        if let Some(value) = retire_after_key.filter(|v| *v.get_ref() < MIN_RETIRE_AFTER_SECONDS) {
            return Err(loc.at(
                &value,
                format!(
                    "`reports.retire_after_seconds` must be at least {MIN_RETIRE_AFTER_SECONDS}"
                ),
            ));
        }
        let reports_token = match raw.reports.token_file {
            None => None,
            Some(path) => {
                let token = std::fs::read_to_string(path.get_ref()).map_err(|e| {
                    loc.at(
                        &path,
                        format!(
                            "`reports.token_file`: cannot read {:?}: {e}",
                            path.get_ref()
                        ),
                    )
                })?;
                let token = token.trim().to_string();
                if !is_report_token(&token) {
                    return Err(loc.at(
                        &path,
                        format!("`reports.token_file`: the token must be {MIN_REPORT_TOKEN_LEN} to {MAX_REPORT_TOKEN_LEN} printable ASCII characters without spaces"),
                    ));
                }
                Some(token)
            }
        };

        let count = |value: Option<Spanned<i64>>, key: &str, default: usize, max: usize| match value
        {
            None => Ok(default),
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(v) if (1..=max).contains(&v) => Ok(v),
                _ => Err(loc.at(
                    &n,
                    format!("`{key}` must be 1..={max}, got {}", n.get_ref()),
                )),
            },
        };
        let reports_max_reporters = count(
            raw.reports.max_reporters,
            "reports.max_reporters",
            DEFAULT_MAX_REPORTERS,
            MAX_MAX_REPORTERS,
        )?;
        let reports_max_entries = count(
            raw.reports.max_entries,
            "reports.max_entries",
            DEFAULT_MAX_ENTRIES,
            MAX_MAX_ENTRIES,
        )?;

        Ok(Config {
            listen,
            health_listen,
            arms,
            source,
            probe,
            shutdown,
            filter_wasm,
            reports_state_file,
            reports_retire_after,
            reports_token,
            reports_max_reporters,
            reports_max_entries,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn error(text: &str) -> ConfigError {
        match Config::parse(text, "t.toml") {
            Err(e) => e,
            Ok(c) => panic!("expected an error, got {c:?}"),
        }
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:18090");
        assert_eq!(c.health_listen, None);
        assert_eq!(c.arms, ["nvlink", "fs"]);
        assert!(matches!(c.source, Source::Static(ref e) if e.is_empty()));
        assert_eq!(c.probe.interval, Some(Duration::from_secs(10)));
        assert_eq!(c.probe.timeout, Duration::from_secs(2));
        assert_eq!(c.probe.path, "/metrics");
        assert_eq!(c.probe.concurrency, 64);
        assert_eq!(
            (c.reports_max_reporters, c.reports_max_entries),
            (DEFAULT_MAX_REPORTERS, DEFAULT_MAX_ENTRIES)
        );
        assert_eq!(c.shutdown.drain_delay, Duration::ZERO);
        assert_eq!(c.shutdown.grace, Duration::from_secs(10));
    }

    #[test]
    fn filter_wasm_is_an_optional_absolute_path() {
        assert_eq!(Config::parse("", "t").unwrap().filter_wasm, None);
        let c = Config::parse("filter_wasm = \"/kvab/kvab_filter.wasm\"\n", "t").unwrap();
        assert_eq!(c.filter_wasm.as_deref(), Some("/kvab/kvab_filter.wasm"));
        let e = error("filter_wasm = \"kvab_filter.wasm\"\n");
        assert_eq!(e.position, Some((1, 15)));
        assert!(e.message.contains("`filter_wasm`"), "{e}");
    }

    #[test]
    fn kubernetes_defaults() {
        let c = Config::parse("source = \"kubernetes\"", "t.toml").unwrap();
        let Source::Kubernetes(k) = c.source else {
            panic!("not kubernetes")
        };
        assert_eq!(
            k,
            Kubernetes {
                namespaces: vec![],
                pod_selector: "role=proxy".into(),
                backend_label: "llm-d.ai/kv-backend".into(),
                endpoint_port: EndpointPort::Number(8080),
                unready_after: Duration::from_secs(30),
            }
        );
    }

    #[test]
    fn endpoint_port_accepts_a_number_or_a_name() {
        let c = Config::parse(
            "source = \"kubernetes\"\n[kubernetes]\nendpoint_port = \"http\"\n",
            "t",
        )
        .unwrap();
        let Source::Kubernetes(k) = c.source else {
            panic!("not kubernetes")
        };
        assert_eq!(k.endpoint_port, EndpointPort::Name("http".into()));
        let e = error("[kubernetes]\nendpoint_port = 0\n");
        assert_eq!(e.position, Some((2, 17)));
        assert!(e.message.contains("kubernetes.endpoint_port"), "{e}");
    }

    #[test]
    fn unknown_key_is_reported_with_line_and_column() {
        let e = error("listen = \"127.0.0.1:1\"\n[probe]\ninterval = 3\n");
        assert_eq!(e.position, Some((3, 1)));
        assert!(e.message.contains("unknown field `interval`"), "{e}");
        let line = e.to_string();
        assert!(line.starts_with("t.toml: line 3, column 1: "), "{line}");
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn static_endpoint_must_name_a_configured_arm() {
        let e = error("[[static.endpoints]]\nbackend = \"p2p\"\naddress = \"127.0.0.1:1\"\n");
        assert_eq!(e.position, Some((2, 11)));
        assert!(
            e.message
                .contains("\"p2p\" is not one of the configured arms"),
            "{e}"
        );
    }

    #[test]
    fn static_endpoint_defaults_and_duplicates() {
        let c = Config::parse(
            "[[static.endpoints]]\nbackend = \"fs\"\naddress = \"127.0.0.1:1\"\n",
            "t",
        )
        .unwrap();
        let Source::Static(endpoints) = c.source else {
            panic!("not static")
        };
        assert_eq!(
            endpoints,
            [StaticEndpoint {
                backend: "fs".into(),
                address: "127.0.0.1:1".into(),
                pod: "127.0.0.1:1".into(),
                ready: true
            }]
        );
        let e = error(
            "[[static.endpoints]]\nbackend = \"fs\"\naddress = \"127.0.0.1:1\"\n\
             [[static.endpoints]]\nbackend = \"nvlink\"\naddress = \"127.0.0.1:1\"\n",
        );
        assert_eq!(e.position, Some((6, 11)));
    }

    #[test]
    fn the_report_token_is_refused_as_the_filter_refuses_it() {
        let dir = std::env::temp_dir().join(format!("kvab-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (token, accepted) in [
            ("0123456789abcdef", true),
            ("0123456789abcde", false),
            (&"x".repeat(256)[..], true),
            (&"x".repeat(257)[..], false),
            ("0123456789 abcdef", false),
        ] {
            let path = dir.join("token");
            std::fs::write(&path, format!("{token}\n")).unwrap();
            let text = format!("[reports]\ntoken_file = {:?}\n", path.display().to_string());
            let result = Config::parse(&text, "t");
            assert_eq!(
                result.is_ok(),
                accepted,
                "{} characters: {result:?}",
                token.len()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `NVLink` is a valid Kubernetes label value, but no arm name: the filter refuses it (it would not
    /// lowercase it either), so `kvab serve` refuses it too, with the contract's message, the filter's.
    #[test]
    fn an_uppercase_arm_is_refused_with_the_contract_rule() {
        let e = error("arms = [\"NVLink\", \"fs\"]");
        let rule = kvab_contract::ArmName::parse("NVLink")
            .unwrap_err()
            .to_string();
        assert_eq!(e.message, format!("`arms`: {rule}"));
        assert!(e.message.contains(kvab_contract::ARM_NAME_RULE), "{e}");
        assert_eq!(e.position, Some((1, 8)), "{e}");
        for arm in ["fs-", "-fs", " fs", &"a".repeat(33), "nvlinké"] {
            let e = error(&format!("arms = [{arm:?}]"));
            assert!(e.message.contains(kvab_contract::ARM_NAME_RULE), "{e}");
        }
        assert!(Config::parse("arms = [\"nv.link_2-x\", \"0\"]", "t.toml").is_ok());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("listen = \"localhost\"", "`listen`"),
            ("health_listen = \"localhost:1\"", "`health_listen`"),
            (
                "listen = \"127.0.0.1:18090\"\nhealth_listen = \"0.0.0.0:18090\"",
                "another port than `listen`",
            ),
            ("arms = []", "`arms`"),
            ("arms = [\"fs\", \"fs\"]", "listed twice"),
            ("arms = [\"none\"]", "reserved"),
            ("arms = [\"fs\", \"unknown\"]", "reserved"),
            ("arms = [\"NV link\"]", "label value"),
            ("source = \"etcd\"", "`source`"),
            ("[probe]\ninterval_seconds = -1", "probe.interval_seconds"),
            ("[probe]\ntimeout_seconds = 0", "probe.timeout_seconds"),
            ("[probe]\npath = \"metrics\"", "probe.path"),
            ("[probe]\nconcurrency = 0", "probe.concurrency"),
            (
                "[reports]\nretire_after_seconds = 10",
                "reports.retire_after_seconds",
            ),
            ("[probe]\nconcurrency = 5000", "probe.concurrency"),
            ("[reports]\nmax_reporters = 0", "reports.max_reporters"),
            ("[reports]\nmax_entries = -1", "reports.max_entries"),
            ("[reports]\nmax_entries = 10000001", "reports.max_entries"),
            (
                "[kubernetes]\nnamespaces = [\"Bad_NS\"]",
                "kubernetes.namespaces",
            ),
            (
                "[kubernetes]\nbackend_label = \"a=b\"",
                "kubernetes.backend_label",
            ),
            (
                "[kubernetes]\npod_selector = \"role in (proxy\"",
                "`kubernetes.pod_selector` is not a label selector: unbalanced '('",
            ),
            (
                "[kubernetes]\npod_selector = \"role=proxy,,tier=x\"",
                "empty requirement",
            ),
            ("[shutdown]\ngrace_seconds = 0", "shutdown.grace_seconds"),
        ] {
            let e = error(text);
            assert!(e.message.contains(key), "{text:?} gave {e}");
            assert!(e.position.is_some(), "{text:?} gave no position: {e}");
        }
    }

    #[test]
    fn probe_interval_zero_disables_probing() {
        let c = Config::parse("[probe]\ninterval_seconds = 0", "t").unwrap();
        assert_eq!(c.probe.interval, None);
    }

    #[test]
    fn shipped_example_files_parse() {
        for (name, text) in [
            ("local.toml", EMBEDDED_DEFAULT),
            (
                "in-cluster.toml",
                include_str!("../../config/in-cluster.toml"),
            ),
        ] {
            Config::parse(text, name).unwrap();
        }
        let in_cluster = Config::parse(include_str!("../../config/in-cluster.toml"), "c").unwrap();
        assert_eq!(
            in_cluster.health_listen.map(|a| a.to_string()).as_deref(),
            Some("0.0.0.0:18091")
        );
    }
}
